#!/usr/bin/env bash
# A short reranker training of the InsuranceQA recipe with other settings, validated two ways:
# the probes behind docs/recipe-insuranceqa.md's reranker table (which negatives, learning rate
# and start give a cross-encoder that helps round 2).
#   scripts/recipe-insuranceqa.sh                 # first, the full recipe (not QUICK=1): it
#                                                 # keeps round 1's embeddings the mining reuses
#   scripts/reranker-probes.sh NAME [train-reranker flags...]
#   e.g. NEGATIVES=top LR=1e-4 scripts/reranker-probes.sh top-1e-4
# The first ROWS (2000) training questions, negatives mined by round 1 from its top 100 after the 3 closest candidates the filters leave
# (the recipe's filters) and drawn by NEGATIVES (random, the default, or top: the closest), one
# epoch of 8 questions x group 8 (250 steps) at LR (1e-4) from INIT (round 2's model), bf16,
# validated every EVERY (125) steps on round 1's top 20 of the validation questions as in the
# recipe; the last checkpoint then reranks round 2's top 100 of the same questions, as the
# dev reranking does. RERANK_LEN (128, the recipe's) is --rerank_max_len of both. Results in
# runs/reranker-probes/NAME/; a finished step is not redone. Without the full recipe's runs,
# scripts/reranker-probe-base.sh makes a stand-in from the base model (RECIPE_OUT=its folder).
set -euo pipefail
[ $# -ge 1 ] || { sed -n 2,16p "$0"; exit 2; }
name=$1
shift
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release/tevatron
r=${RECIPE_OUT:-$root/runs/recipe-insuranceqa}
d=$r/data
o=$root/runs/reranker-probes/$name
emb=$r/round1/mine-embeddings/reranker.train.queries.safetensors
for f in "$r/round2/model/config.json" "$r/round1/valid/run.tsv" "$r/round2/valid/run.tsv" "$emb" \
  "$r/round1/eval/corpus.safetensors"; do
  [ -f "$f" ] || { echo "missing $f: run the full scripts/recipe-insuranceqa.sh (not QUICK=1) first, or scripts/reranker-probe-base.sh for a stand-in" >&2
    exit 1; }
done
data=${INSURANCEQA:-$("$root/scripts/fetch-insuranceqa.sh" "$bin")}
mkdir -p "$o"
if [ ! -f "$o/train.jsonl" ]; then
  "$bin" mine --query_reps "$emb" --passage_reps "$r/round1/eval/corpus.safetensors" \
    --dataset_path "$d/reranker.train.jsonl" --corpus_path "$d/mine.corpus.jsonl" \
    --dataset_cache_dir "$r/cache" --depth 100 --num_negatives 15 --range_min 3 --drop_same_text \
    --sampling_strategy "${NEGATIVES:-random}" --output_path "$o/mined.jsonl" --quiet
  head -n "${ROWS:-2000}" "$o/mined.jsonl" > "$o/train.jsonl"
fi
if [ ! -f "$o/model/trainer_state.json" ]; then
  start=$SECONDS
  "$bin" train-reranker --output_dir "$o/model" --model_name_or_path "${INIT:-$r/round2/model}" \
    --dataset_path "$o/train.jsonl" --corpus_path "$data/corpus.jsonl" \
    --dataset_cache_dir "$r/cache" --train_group_size 8 --rerank_max_len "${RERANK_LEN:-128}" \
    --per_device_train_batch_size 8 --learning_rate "${LR:-1e-4}" --warmup_ratio 0.1 \
    --num_train_epochs 1 --seed 42 --logging_steps 10 --eval_strategy steps \
    --eval_steps "${EVERY:-125}" --save_steps "${EVERY:-125}" \
    --eval_query_path "$d/valid.queries.jsonl" --eval_corpus_path "$d/valid.corpus.jsonl" \
    --eval_qrels_path "$d/valid.qrels.tsv" --eval_run_path "$r/round1/valid/run.tsv" \
    --eval_rerank_depth 20 --per_device_eval_batch_size 32 --metric_for_best_model ndcg@10 \
    --save_total_limit 1 --bf16 --quiet "$@"
  echo "$name: trained in $((SECONDS - start)) s"
fi
python3 -c 'import json, sys
log = json.load(open(sys.argv[1]))["log_history"]
print("validation nDCG@10 (round 1 top 20) by step:",
      [(e["step"], round(e["eval_ndcg@10"], 4)) for e in log if "eval_ndcg@10" in e])' \
  "$o/model/trainer_state.json"
[ -f "$o/valid-top100.tsv" ] || "$bin" rerank --model_name_or_path "$o/model" \
  --run_path "$r/round2/valid/run.tsv" --query_path "$d/valid.queries.jsonl" \
  --corpus_path "$d/valid.corpus.jsonl" --rerank_depth 100 --rerank_max_len "${RERANK_LEN:-128}" \
  --per_device_eval_batch_size 32 --rerank_output_path "$o/valid-top100.tsv" --quiet
echo "$name, reranking round 2's top 100: $("$bin" eval --qrels "$d/valid.qrels.tsv" \
  --run "$o/valid-top100.tsv" -m ndcg@10 --json | tr -d '\n ')"
