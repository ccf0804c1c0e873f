#!/usr/bin/env bash
# Round 2 of the InsuranceQA recipe again with other training flags, each model searched on the
# full dev set at 384, 192 and 96 dimensions: the probes behind docs/compact.md's Matryoshka
# table (which widths, weights, learning rate and length get a quarter width closest to full).
#   scripts/recipe-insuranceqa.sh                 # first: round 1, its mined negatives
#   scripts/matryoshka-variants.sh NAME [train flags...]
#   e.g. scripts/matryoshka-variants.sh only96 --matryoshka_dims 96
#        scripts/matryoshka-variants.sh only96-kl1 --matryoshka_dims 96 --matryoshka_kl_weight 1
# LR (default 2e-5) and EPOCHS (1) as in round 2; TRAIN=all trains on every training question's
# mined negatives (the reranker stage's file, 12,681 questions) instead of round 2's 4,000;
# EVERY (125) validation steps (200 for TRAIN=all in docs/compact.md); ROUND1=1 first trains
# round 1 again with the same flags (from the base model, RECIPE_MODEL as for the recipe, into
# NAME/round1) and starts round 2 from it (the mined negatives stay the recipe's). Training is
# bf16, as in the bf16 recipe; RECIPE_OUT names that recipe's folder as for the recipe. Results
# in runs/matryoshka-variants/NAME/metrics-<k>.json; a finished step is not redone.
set -euo pipefail
[ $# -ge 1 ] || { sed -n 2,15p "$0"; exit 2; }
name=$1
shift
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release/tevatron
r=${RECIPE_OUT:-$root/runs/recipe-insuranceqa}
d=$r/data
data=${INSURANCEQA:-$("$root/scripts/fetch-insuranceqa.sh" "$bin")}
o=$root/runs/matryoshka-variants/$name
train=$r/round2/mined.jsonl
[ "${TRAIN:-}" = all ] && train=$r/reranker/mined.jsonl
for f in "$r/round1/model/config.json" "$train"; do
  [ -f "$f" ] || { echo "missing $f: run scripts/recipe-insuranceqa.sh first" >&2; exit 1; }
done
mkdir -p "$o"
flags=("$@")
# The training flags both rounds share (the recipe's, with validation, in bf16).
shared=(--query_max_len 32 --passage_max_len 128 --temperature 0.05 --warmup_ratio 0.1 --seed 42
  --logging_steps 5 --corpus_path "$data/corpus.jsonl" --dataset_cache_dir "$r/cache"
  --eval_strategy steps --eval_query_path "$d/valid.queries.jsonl"
  --eval_corpus_path "$d/valid.corpus.jsonl" --eval_qrels_path "$d/valid.qrels.tsv"
  --per_device_eval_batch_size 64 --metric_for_best_model ndcg@10 --load_best_model_at_end
  --save_total_limit 1 --bf16 --quiet)
train_round() {  # label output-dir base-model round-flags...; the flags given to the script last
  local label=$1 out=$2 base=$3 start=$SECONDS
  shift 3
  [ -f "$out/trainer_state.json" ] && return 0
  "$bin" train --output_dir "$out" --model_name_or_path "$base" "${shared[@]}" "$@" \
    ${flags[@]+"${flags[@]}"}
  echo "$name: $label trained in $((SECONDS - start)) s"
}
from=$r/round1/model
if [ "${ROUND1:-0}" = 1 ]; then  # the recipe's round 1 (full size), with the flags given
  from=$o/round1/model
  if [ -f "$o/model/trainer_state.json" ] && [ ! -f "$from/trainer_state.json" ]; then
    echo "$o/model was trained without ROUND1=1: give another NAME" >&2
    exit 2
  fi
  base=${RECIPE_MODEL:-}
  [ -n "$base" ] || base=$("$root/scripts/fetch-minilm.sh")
  train_round "round 1" "$from" "$base" \
    --learning_rate 2e-5 --dataset_path "$d/round1.train.jsonl" \
    --per_device_train_batch_size 128 --train_group_size 1 --grad_cache --gc_q_chunk_size 32 \
    --gc_p_chunk_size 32 --num_train_epochs 1 --eval_steps 8 --save_steps 8
fi
train_round "round 2" "$o/model" "$from" --learning_rate "${LR:-2e-5}" --dataset_path "$train" \
  --per_device_train_batch_size 16 --train_group_size 4 --num_train_epochs "${EPOCHS:-1}" \
  --eval_steps "${EVERY:-125}" --save_steps "${EVERY:-125}"
[ -f "$o/corpus.safetensors" ] || "$bin" encode --model_name_or_path "$o/model" \
  --dataset_path "$d/eval.corpus.jsonl" --encode_output_path "$o/corpus.safetensors" \
  --passage_max_len 128 --per_device_eval_batch_size 64 --quiet
[ -f "$o/queries.safetensors" ] || "$bin" encode --model_name_or_path "$o/model" \
  --dataset_path "$d/eval.queries.jsonl" --encode_is_query \
  --encode_output_path "$o/queries.safetensors" --query_max_len 32 --quiet
for k in 384 192 96; do
  # (search warns when the model was not trained for width k; the figure is still wanted)
  "$bin" search --query_reps "$o/queries.safetensors" --passage_reps "$o/corpus.safetensors" \
    --depth 100 --batch_size 0 --truncate_dim "$k" --save_ranking_to "$o/run-$k.tsv" --save_text \
    --quiet
  "$bin" eval --qrels "$d/eval.qrels.tsv" --run "$o/run-$k.tsv" -m ndcg@10 -m mrr@10 \
    -m recall@100 --json > "$o/metrics-$k.json"
  echo "$name @$k: $(tr -d '\n ' < "$o/metrics-$k.json")"
done
