#!/usr/bin/env bash
# What scripts/reranker-probes.sh needs of the InsuranceQA recipe, made from the base model
# alone: the recipe's data split (scripts/recipe_insuranceqa_data.py, full recipe), and
# all-MiniLM-L6-v2 as it comes standing for rounds 1 and 2 (its embeddings mine the reranker's
# negatives and rank the validation questions, and reranker probes start from it). Minutes
# instead of the recipe's first hour, for probes on a machine without the full recipe's runs;
# their figures compare with each other, not with probes started from round 2.
#   scripts/reranker-probe-base.sh                          # -> runs/reranker-probe-base
#   RECIPE_OUT=runs/reranker-probe-base scripts/reranker-probes.sh NAME [flags...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${RECIPE_OUT:-$root/runs/reranker-probe-base}
cargo build --release -q -p tevatron-cli --manifest-path "$root/Cargo.toml"
bin=$root/target/release/tevatron
data=${INSURANCEQA:-$("$root/scripts/fetch-insuranceqa.sh" "$bin")}
model=${RECIPE_MODEL:-$("$root/scripts/fetch-minilm.sh")}
model=$(cd "$model" && pwd)  # absolute, for the links (RECIPE_MODEL: a local folder)
if [ -d "$out/round1/model" ] && [ ! -L "$out/round1/model" ]; then
  echo "$out holds a trained recipe (round1/model is a folder): give another RECIPE_OUT" >&2
  exit 1
fi
mkdir -p "$out"
if [ ! -f "$out/data/done" ]; then
  rm -rf "$out/data.tmp" && mkdir -p "$out/data.tmp"
  python3 "$root/scripts/recipe_insuranceqa_data.py" "$data" "$out/data.tmp" full
  rm -rf "$out/data" && mv "$out/data.tmp" "$out/data"
fi
d=$out/data
cp "$d/train.jsonl" "$d/reranker.train.jsonl"  # every training question, as the recipe's reranker
mkdir -p "$out/round1/eval" "$out/round1/valid" "$out/round2/valid" "$out/round1/mine-embeddings"
ln -sfn "$model" "$out/round1/model"
ln -sfn "$model" "$out/round2/model"
# The answers as the recipe's round-1 dev evaluation keeps them (the mining corpus).
[ -f "$out/round1/eval/corpus.safetensors" ] || "$bin" encode --model_name_or_path "$model" \
  --dataset_path "$d/eval.corpus.jsonl" --encode_output_path "$out/round1/eval/corpus.safetensors" \
  --passage_max_len 128 --per_device_eval_batch_size 64 --quiet
emb=$out/round1/mine-embeddings
if [ ! -f "$emb/reranker.train.queries.safetensors" ]; then
  python3 -c 'import json,sys
for l in open(sys.argv[1]):
    r = json.loads(l); print(json.dumps({"query_id": r["query_id"], "query": r["query_text"]}))' \
    "$d/reranker.train.jsonl" > "$emb/reranker.train.queries.jsonl"
  "$bin" encode --model_name_or_path "$model" --dataset_path "$emb/reranker.train.queries.jsonl" \
    --encode_is_query --encode_output_path "$emb/reranker.train.queries.safetensors" \
    --query_max_len 32 --per_device_eval_batch_size 64 --quiet
fi
# The validation questions' top 100, what the probes' validation and reranking start from.
if [ ! -f "$out/round2/valid/run.tsv" ]; then
  v=$out/round1/valid
  "$root/scripts/rank-valid.sh" "$bin" "$model" "$d" "$v"
  "$bin" eval --qrels "$d/valid.qrels.tsv" --run "$v/run.tsv" -m ndcg@10 -m mrr@10 -m recall@20 \
    --json > "$v/metrics.json"
  cp "$v/run.tsv" "$out/round2/valid/run.tsv.tmp" && mv "$out/round2/valid/run.tsv.tmp" "$out/round2/valid/run.tsv"
fi
echo "$out: the base model's validation run $(tr -d '\n ' < "$out/round1/valid/metrics.json")"
