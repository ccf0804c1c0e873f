#!/usr/bin/env bash
# The InsuranceQA recipe's validation questions ranked by a retriever: MODEL encodes the
# validation answers and questions of DATA (the recipe's data folder), exact search writes each
# question's top 100 to OUT/run.tsv (Tevatron's text ranking), and the embeddings are removed.
# Used by scripts/recipe-insuranceqa.sh (rounds 1 and 2) and scripts/reranker-probe-base.sh.
#   scripts/rank-valid.sh BIN MODEL DATA OUT
set -euo pipefail
[ $# -eq 4 ] || { sed -n 2,6p "$0"; exit 2; }
bin=$1 model=$2 d=$3 v=$4
mkdir -p "$v"
"$bin" encode --model_name_or_path "$model" --dataset_path "$d/valid.corpus.jsonl" \
  --encode_output_path "$v/corpus.safetensors" --passage_max_len 128 \
  --per_device_eval_batch_size 64 --quiet
"$bin" encode --model_name_or_path "$model" --dataset_path "$d/valid.queries.jsonl" \
  --encode_is_query --encode_output_path "$v/queries.safetensors" --query_max_len 32 --quiet
"$bin" search --query_reps "$v/queries.safetensors" --passage_reps "$v/corpus.safetensors" \
  --depth 100 --batch_size 0 --save_ranking_to "$v/run.tsv" --save_text --quiet
rm -f "$v/corpus.safetensors" "$v/queries.safetensors"
