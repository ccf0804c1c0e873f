#!/usr/bin/env bash
# The quality of compact search on real embeddings: all-MiniLM-L6-v2 (zero-shot) over the full
# InsuranceQA dev set (2,000 questions, 27,413 answers), searched exactly in F32 and with
# int8 and binary codes at several rescoring multipliers (1 = no candidates beyond the depth)
# and through HNSW graphs (M 32, ef_construction 128; the graph's vectors in F32, bf16 and i8)
# at two ef_search (and ef_search 128 with rescoring x2),
# each evaluated with tevatron eval (nDCG@10, recall@100), timed, and compared with the exact
# search's top 100 (the share of it each query keeps: recall@100 against exact search).
#   scripts/bench/compact-quality.sh
# BINARY_MULTS="1 4 6 10" sets the binary rescoring multipliers (default 1 4 10).
# MODEL=path/to/model scores another model. The embeddings are kept in .cache/compact-quality.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
cargo build --release -q -p tevatron-cli
bin=$root/target/release/tevatron
data=$("$root/scripts/fetch-insuranceqa.sh" "$bin")
model=${MODEL:-$("$root/scripts/fetch-minilm.sh")}
work=$root/.cache/compact-quality
mkdir -p "$work"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); model $model"
if [ ! -f "$work/corpus.safetensors" ]; then
  "$bin" encode --model_name_or_path "$model" --dataset_path "$data/corpus.jsonl" \
    --encode_output_path "$work/corpus.safetensors" --passage_max_len 128 \
    --per_device_eval_batch_size 64 --quiet
fi
if [ ! -f "$work/queries.safetensors" ]; then
  "$bin" encode --model_name_or_path "$model" --dataset_path "$data/queries.dev.jsonl" \
    --encode_is_query --encode_output_path "$work/queries.safetensors" --query_max_len 32 --quiet
fi
for q in int8 binary; do
  [ -f "$work/idx/corpus.$q.safetensors" ] ||
    "$bin" index --passage_reps "$work/corpus.safetensors" --quantize "$q" --output_dir "$work/idx" --quiet
done
# The graphs: F32 vectors (the default) in idx/, and with --hnsw_dtype bf16 and i8 beside it.
for dt in f32 bf16 i8; do
  g=$work/idx; [ "$dt" = f32 ] || g=$work/idx-$dt
  if [ ! -f "$g/corpus.hnsw.json" ]; then
    start=$(date +%s.%N)
    "$bin" index --passage_reps "$work/corpus.safetensors" --hnsw --hnsw_dtype "$dt" --output_dir "$g" --quiet
    echo "HNSW graph, $dt vectors: built in $(echo "$(date +%s.%N) - $start" | bc -l | xargs printf %.2f) s"
  fi
  echo "HNSW graph, $dt vectors: $(stat -c %s "$g/corpus.hnsw.usearch") bytes"
done
printf '%-24s %9s %10s %9s %15s\n' search "nDCG@10" "recall@100" "seconds" "of exact top100"
run() {  # label search-flags...
  local label=$1 start end
  shift
  start=$(date +%s.%N)
  "$bin" search --query_reps "$work/queries.safetensors" --passage_reps "$work/corpus.safetensors" \
    --depth 100 --batch_size 0 --save_ranking_to "$work/run.tsv" --save_text --quiet "$@"
  end=$(date +%s.%N)
  "$bin" eval --qrels "$data/qrels.dev.tsv" --run "$work/run.tsv" -m ndcg@10 -m recall@100 --json \
    > "$work/m.json"
  if [ "$label" = "exact F32" ]; then cp "$work/run.tsv" "$work/exact.tsv"; fi
  python3 "$root/scripts/bench/metrics_row.py" "$work/m.json" "$label" "$(echo "$end - $start" | bc -l)" \
    "$work/run.tsv" "$work/exact.tsv"
}
run "exact F32"
for m in 1 2 4; do
  run "int8, rescore x$m" --quantize int8 --compact_reps "$work/idx/corpus.int8.safetensors" --rescore_multiplier $m
done
for m in ${BINARY_MULTS:-1 4 10}; do
  run "binary, rescore x$m" --quantize binary --compact_reps "$work/idx/corpus.binary.safetensors" --rescore_multiplier $m
done
for dt in f32 bf16 i8; do
  g=$work/idx; [ "$dt" = f32 ] || g=$work/idx-$dt
  for ef in 32 128; do
    run "HNSW $dt ef $ef, x1" --hnsw --compact_reps "$g/corpus.hnsw.json" --hnsw_ef_search $ef --rescore_multiplier 1
  done
  run "HNSW $dt ef 128, x2" --hnsw --compact_reps "$g/corpus.hnsw.json" --hnsw_ef_search 128 --rescore_multiplier 2
done
