#!/usr/bin/env bash
# The retrieval research loop on InsuranceQA, stage by stage, each evaluated on the same dev set:
#   zero_shot    all-MiniLM-L6-v2 as it comes;
#   seed_recipe  Tevatron's first-stage recipe: the data's pool negatives, 16 queries x group 4,
#                one epoch;
#   round1       in-batch negatives with a large batch through GradCache, the checkpoint chosen
#                by validation nDCG@10 during training (held-out training questions, never dev);
#   round2       hard negatives mined with the round-1 model (tevatron mine, with false-negative
#                filters), then trained from the round-1 model, again chosen by validation;
#   rerank       a cross-encoder trained from round 2's model on every training question's
#                mined groups (tevatron train-reranker) rescoring round 2's top 100 (tevatron
#                rerank);
#   fused        the reranker's and round 2's scores, z-scored and weighted (tevatron fuse),
#                the weight chosen on the validation questions;
#   distilled    round 2 trained further on the reranker's scores of its groups (tevatron
#                annotate, tevatron train --distillation), chosen by validation.
#   scripts/recipe-insuranceqa.sh           # the full recipe: all 2,000 dev questions over all
#                                           # 27,413 answers, 4,000 training questions a stage
#   QUICK=1 scripts/recipe-insuranceqa.sh   # the quick recipe: the quickstart's dev subset (200
#                                           # questions over 4,000 answers), 600 training questions
#   CONTROL=1 ...                           # adds two controls of round 2 (the same questions,
#                                           # flags and start): the data's pool negatives instead
#                                           # of mined ones, and negatives mined without the
#                                           # filters (mining leaves out a question it finds no
#                                           # negative for: see the summary)
#   MATRYOSHKA=1 ...                        # adds rounds 1 and 2 trained with the Matryoshka
#                                           # loss on 384, 192 and 96 dimensions, and each
#                                           # round's two models searched at 192 and 96 (rows
#                                           # <stage>@<k>)
#   RERANKER_FROM=base ...                  # the reranker starts from the base model, not
#                                           # from round 2's (the default)
#   RERANKER_NEGATIVES=top ...              # the reranker's negatives are round 1's closest
#                                           # (the 15 after the 3 closest left by the
#                                           # filters), not a random draw from the rest of
#                                           # its top 100 (the default); a folder whose
#                                           # reranker/mined.jsonl exists keeps it: give a new
#                                           # RECIPE_OUT or remove reranker/
#   RERANKER_EPOCHS=1 ...                   # the reranker's epochs over its mined groups
#                                           # (default 2); a folder whose reranker/model is
#                                           # trained keeps it: to redo stages 5-7, remove
#                                           # reranker/model, rerank/, fused/, distilled/ and
#                                           # round2/valid/rerank.tsv, and their times.json keys
#                                           # (times add up across re-runs)
#   RECIPE_TRAIN_FLAGS=--bf16 ...           # adds flags to every training (train and
#                                           # train-reranker; encoding, reranking and annotation
#                                           # stay F32); set RECIPE_OUT to a new folder, since
#                                           # finished stages are reused as they are
# Writes runs/recipe-insuranceqa[-quick]/metrics.json {"zero_shot": {...}, "seed_recipe": ...,
# "round1": ..., "round2": ..., "rerank": ..., "fused": ..., "distilled": ...}, times.json
# (wall seconds per stage), report.md, and each stage's model in <stage>/model (the reranker
# in reranker/model). Re-running reuses every finished stage; an interrupted training resumes
# from its last checkpoint. Data and model are fetched as the quickstart fetches them.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# The reranker's settings, checked before any stage runs.
case ${RERANKER_FROM:=round2} in
  round2 | base) ;;
  *) echo "recipe: RERANKER_FROM must be round2 or base" >&2; exit 2 ;;
esac
case ${RERANKER_NEGATIVES:=random} in
  random | top) ;;
  *) echo "recipe: RERANKER_NEGATIVES must be random or top" >&2; exit 2 ;;
esac
if ! [[ ${RERANKER_EPOCHS:=2} =~ ^[1-9][0-9]*$ ]]; then
  echo "recipe: RERANKER_EPOCHS must be a whole number of epochs, 1 or more" >&2
  exit 2
fi
quick=${QUICK:-0}
if [ "$quick" = 1 ]; then default_out=$root/runs/recipe-insuranceqa-quick; else default_out=$root/runs/recipe-insuranceqa; fi
out=${RECIPE_OUT:-$default_out}
mkdir -p "$out"
cargo build --release -q -p tevatron-cli --manifest-path "$root/Cargo.toml"
bin=$root/target/release/tevatron
data=${INSURANCEQA:-$("$root/scripts/fetch-insuranceqa.sh" "$bin")}
model=${RECIPE_MODEL:-$("$root/scripts/fetch-minilm.sh")}
echo "recipe: model $model, data $data, output $out" >&2

# Stage sizes (the split's own, training and validation questions and corpora, are
# scripts/recipe_insuranceqa_data.py's; the full reranker_rows is its 12,681 training questions).
# Each trained stage reads the first rows of the training questions: seed_rows, round1_rows (for
# round1_epochs, gc_batch questions a step), round2_rows (mined, then trained on).
# The reranker trains on reranker_rows questions (every training question in the full recipe).
if [ "$quick" = 1 ]; then
  gc_batch=64
  seed_rows=600 round1_rows=600 round1_epochs=2 round2_rows=600 reranker_rows=600
else
  gc_batch=128
  seed_rows=4000 round1_rows=4000 round1_epochs=1 round2_rows=4000 reranker_rows=12681
fi

# 1. Data (deterministic; python3 standard library only): the dev set for evaluation, training
# questions, validation questions held out of training, and the corpus mining searches.
if [ ! -f "$out/data/done" ]; then
  rm -rf "$out/data.tmp" && mkdir -p "$out/data.tmp"
  if [ "$quick" = 1 ]; then mode=quick; else mode=full; fi
  python3 "$root/scripts/recipe_insuranceqa_data.py" "$data" "$out/data.tmp" "$mode"
  rm -rf "$out/data" && mv "$out/data.tmp" "$out/data"
fi
d=$out/data

# Stage timing: seconds per stage, kept across re-runs.
times=$out/times.json
[ -f "$times" ] || echo '{}' > "$times"
record_time() {  # stage seconds
  python3 - "$times" "$1" "$2" <<'PY'
import json, sys
path, stage, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
t = json.load(open(path)); t[stage] = t.get(stage, 0) + seconds
json.dump(t, open(path, "w"), indent=1)
PY
}

# Encodes the dev corpus and questions with a model into <dir> (each file kept if there).
encode_dev() {  # model dir
  mkdir -p "$2"
  [ -f "$2/corpus.safetensors" ] || "$bin" encode --model_name_or_path "$1" \
    --dataset_path "$d/eval.corpus.jsonl" --encode_output_path "$2/corpus.safetensors" \
    --passage_max_len 128 --per_device_eval_batch_size 64 --quiet
  [ -f "$2/queries.safetensors" ] || "$bin" encode --model_name_or_path "$1" \
    --dataset_path "$d/eval.queries.jsonl" --encode_is_query \
    --encode_output_path "$2/queries.safetensors" --query_max_len 32 --quiet
}

# Searches <dir>'s embeddings (extra search flags given) and evaluates into <to>/metrics.json.
search_dev() {  # dir to search-flags...
  local dir=$1 to=$2
  shift 2
  mkdir -p "$to"
  "$bin" search --query_reps "$dir/queries.safetensors" --passage_reps "$dir/corpus.safetensors" \
    --depth 100 --batch_size 0 --save_ranking_to "$to/run.tsv" --save_text --quiet "$@"
  "$bin" eval --qrels "$d/eval.qrels.tsv" --run "$to/run.tsv" -m ndcg@10 -m mrr@10 -m recall@100 \
    --json > "$to/metrics.json.tmp"
  mv "$to/metrics.json.tmp" "$to/metrics.json"
}

# Encode, search and evaluate a model on the dev set into $out/<stage>/eval; with "keep", the
# corpus embeddings stay there (mining searches the same answers).
evaluate() {  # model stage [keep]
  local m=$1 dir=$out/$2/eval keep=${3:-}
  [ -f "$dir/metrics.json" ] && return 0
  local start=$SECONDS
  encode_dev "$m" "$dir"
  search_dev "$dir" "$dir"
  rm -f "$dir/queries.safetensors"
  [ "$keep" = keep ] || rm -f "$dir/corpus.safetensors"
  record_time "$2 (dev evaluation)" $((SECONDS - start))
}

# The training settings every trained stage shares (the quickstart's, with validation).
common=(--query_max_len 32 --passage_max_len 128 --temperature 0.05 --learning_rate 2e-5
  --warmup_ratio 0.1 --seed 42 --logging_steps 5 --corpus_path "$data/corpus.jsonl"
  --dataset_cache_dir "$out/cache")
validation=(--eval_strategy steps --eval_query_path "$d/valid.queries.jsonl"
  --eval_corpus_path "$d/valid.corpus.jsonl" --eval_qrels_path "$d/valid.qrels.tsv"
  --per_device_eval_batch_size 64 --metric_for_best_model ndcg@10 --load_best_model_at_end
  --save_total_limit 1)

# RECIPE_TRAIN_FLAGS: flags added to every training command (e.g. --bf16).
read -r -a extra_train_flags <<< "${RECIPE_TRAIN_FLAGS:-}"

train_stage() {  # stage base-model extra-flags...
  local stage=$1 base=$2
  shift 2
  [ -f "$out/$stage/model/trainer_state.json" ] && return 0
  echo "recipe: training $stage" >&2
  local start=$SECONDS
  "$bin" train --output_dir "$out/$stage/model" --model_name_or_path "$base" "${common[@]}" "$@" \
    ${extra_train_flags[@]+"${extra_train_flags[@]}"}
  record_time "$stage (training)" $((SECONDS - start))
}

echo "recipe: zero-shot" >&2
evaluate "$model" zero_shot

# The seed recipe: Tevatron's, with the data's pool negatives (no validation, as Tevatron).
head -n "$seed_rows" "$d/train.jsonl" > "$d/seed.train.jsonl"
train_stage seed_recipe "$model" --dataset_path "$d/seed.train.jsonl" \
  --per_device_train_batch_size 16 --train_group_size 4 --num_train_epochs 1 --save_steps 50 \
  --save_total_limit 1
evaluate "$out/seed_recipe/model" seed_recipe

# Round 1: in-batch negatives, a large batch in bounded memory, the best checkpoint by validation.
head -n "$round1_rows" "$d/train.jsonl" > "$d/round1.train.jsonl"
steps1=$(( (round1_rows + gc_batch - 1) / gc_batch * round1_epochs ))
every1=$(( steps1 / 4 > 0 ? steps1 / 4 : 1 ))
round1=(--dataset_path "$d/round1.train.jsonl" --per_device_train_batch_size "$gc_batch"
  --train_group_size 1 --grad_cache --gc_q_chunk_size 32 --gc_p_chunk_size 32
  --num_train_epochs "$round1_epochs" --eval_steps "$every1" --save_steps "$every1"
  "${validation[@]}")
train_stage round1 "$model" "${round1[@]}"
# The full recipe mines the answers it evaluates on: round 1's dev embeddings are reused.
reuse=""
cmp -s "$d/mine.corpus.jsonl" "$d/eval.corpus.jsonl" && reuse=keep
evaluate "$out/round1/model" round1 $reuse

# Matryoshka (MATRYOSHKA=1): a round again with the loss on the first 384, 192 and 96
# dimensions (round<n>_matryoshka), and both models searched at 192 and 96 dimensions of their
# dev embeddings (search --truncate_dim; the plain round was not trained for it, so search
# warns). A row <stage>@<k> is that stage's model at k dimensions.
matryoshka=(--matryoshka_dims 384,192,96)
truncated_evals() {  # stage...: each searched at 192 and 96 dimensions
  local stage k start
  for stage in "$@"; do
    for k in 192 96; do
      [ -f "$out/$stage/eval-$k/metrics.json" ] && continue
      start=$SECONDS
      encode_dev "$out/$stage/model" "$out/$stage/eval"
      search_dev "$out/$stage/eval" "$out/$stage/eval-$k" --truncate_dim "$k"
      record_time "$stage@$k (dev evaluation)" $((SECONDS - start))
    done
  done
}
if [ "${MATRYOSHKA:-0}" = 1 ]; then
  train_stage round1_matryoshka "$model" "${round1[@]}" "${matryoshka[@]}"
  evaluate "$out/round1_matryoshka/model" round1_matryoshka keep
  truncated_evals round1 round1_matryoshka
fi

# Mines training questions (round 2's unless given) with the round-1 model into
# <stage>/mined.jsonl, with the filters given: from round 1's dev embeddings when they are the
# mining corpus's, else encoding into round1/mine-embeddings (kept, so a second mining reuses
# them).
head -n "$round2_rows" "$d/train.jsonl" > "$d/round2.train.jsonl"
mine_stage() {  # stage [--rows training-file] filter-flags...
  local stage=$1 output=$out/$1/mined.jsonl rows=$d/round2.train.jsonl
  shift
  if [ "${1:-}" = --rows ]; then rows=$2 && shift 2; fi
  [ -f "$output" ] && return 0
  echo "recipe: mining hard negatives with the round-1 model for $stage" >&2
  mkdir -p "$out/$stage"
  local start=$SECONDS emb=$out/round1/mine-embeddings reps name
  name=$(basename "$rows" .jsonl)
  mkdir -p "$emb"
  if [ -n "$reuse" ] && [ -f "$out/round1/eval/corpus.safetensors" ]; then
    if [ ! -f "$emb/$name.queries.safetensors" ]; then  # the questions; the answers as evaluated
      python3 -c 'import json,sys
for l in open(sys.argv[1]):
    r = json.loads(l); print(json.dumps({"query_id": r["query_id"], "query": r["query_text"]}))' \
        "$rows" > "$emb/$name.queries.jsonl"
      "$bin" encode --model_name_or_path "$out/round1/model" --dataset_path "$emb/$name.queries.jsonl" \
        --encode_is_query --encode_output_path "$emb/$name.queries.safetensors" --query_max_len 32 \
        --per_device_eval_batch_size 64 --quiet
    fi
    reps=(--query_reps "$emb/$name.queries.safetensors"
      --passage_reps "$out/round1/eval/corpus.safetensors")
  else
    reps=(--model_name_or_path "$out/round1/model" --query_max_len 32 --passage_max_len 128
      --per_device_eval_batch_size 64 --embeddings_dir "$emb")
  fi
  "$bin" mine "${reps[@]}" --dataset_path "$rows" \
    --corpus_path "$d/mine.corpus.jsonl" --dataset_cache_dir "$out/cache" --depth 100 \
    --num_negatives 15 --output_path "$output" --quiet "$@"
  record_time "$stage (mining)" $((SECONDS - start))
}

# Round 2 on mined negatives: skip the 3 closest candidates the filters leave (the likeliest
# unjudged positives) and answers repeated under other ids. A margin below the positive's score is left out: where the
# model ranks a positive low, it removes every candidate above it and leaves the query without
# negatives (with --relative_margin 0.05, 9,358 of 60,000 candidates and every negative of
# some queries, in the quick run).
steps2=$(( (round2_rows + 15) / 16 ))
every2=$(( steps2 / 2 > 0 ? steps2 / 2 : 1 ))
round2_stage() {  # stage training-file [keep [extra-flags...]]
  local stage=$1 data=$2 keep=${3:-}
  shift $(($# < 3 ? $# : 3))
  train_stage "$stage" "$out/round1/model" --dataset_path "$data" --per_device_train_batch_size 16 \
    --train_group_size 4 --num_train_epochs 1 --eval_steps "$every2" --save_steps "$every2" \
    "${validation[@]}" "$@"
  evaluate "$out/$stage/model" "$stage" $keep
}
mine_stage round2 --range_min 3 --drop_same_text
round2_stage round2 "$out/round2/mined.jsonl"
if [ "${MATRYOSHKA:-0}" = 1 ]; then  # round 2's 250 steps on mined negatives, with Matryoshka
  round2_stage round2_matryoshka "$out/round2/mined.jsonl" keep "${matryoshka[@]}"
  truncated_evals round2 round2_matryoshka
fi

# A reranker and distillation: a cross-encoder trained from round 2's model (its score head
# initialised; RERANKER_FROM=base starts it from the base MiniLM instead) on every training
# question with negatives drawn at random from round 1's top 100 after the 3 closest (round 2's filters;
# RERANKER_NEGATIVES=top takes the closest instead), Tevatron's reranker recipe (groups of 8,
# the listwise loss), validated during training by reranking round 1's top 20 of the
# validation questions, the best checkpoint kept; it rescores round 2's top 100 of every dev
# question (stage rerank). It then scores every passage of round 2's training groups
# (tevatron annotate), and round 2's model is trained further to match those
# scores, KL plus the contrastive loss, chosen by validation (stage distilled). The learning
# rate, 1e-4, was chosen by the training loss of two 8 x group-8 probes on 600 training questions
# with pool negatives (never dev): at 3e-5 the loss went from ln 8 = 2.08 to 1.79 in 75 steps, at
# 1e-4 to 1.74 in 50. Why every question and validation: trained on round 2's 4,000 questions,
# checkpoints at 150 and 300 of 500 steps reranked round 1's validation top 20 to nDCG@10 0.598
# and 0.671, below round 1's own 0.742 (docs/recipe-insuranceqa.md). Why round 2's model: on the
# first 2,000 training questions, 250 steps each (bf16, validation as above), the cross-encoder
# started from round 2 reranked to 0.653 at 125 steps and 0.677 at 250, from the base MiniLM to
# 0.610 and 0.653 (at lr 2e-4 from round 2: 0.596 and 0.648; at 3e-5: 0.520 and 0.600). Why
# negatives from the whole top 100: trained on the closest (from rank 4 on), the reranker hurt
# more the deeper it reranked (round 2's validation nDCG@10 0.765; reranking its top 5, 20 and 100:
# 0.730, 0.629, 0.530), having never seen a candidate from further down; on the same 2,000
# questions a random draw from ranks 4-100 validated at 0.672 and 0.695 (closest: 0.653, 0.677)
# and reranked round 2's top 100 to 0.641 (scripts/reranker-probes.sh). Why two epochs: the
# probe's second epoch raised that to 0.671; on the full recipe the reranker's best validation
# went from 0.731 (one epoch) to 0.750 (docs/recipe-insuranceqa.md); a third epoch (best
# validation 0.758) raised the dev reranking alone from 0.4723 to 0.4821 but fused gave 0.5102
# against 0.5137, so the default stays 2.
rerank_len=128
if [ "$RERANKER_FROM" = base ]; then reranker_init=$model; else reranker_init=$out/round2/model; fi
head -n "$reranker_rows" "$d/train.jsonl" > "$d/reranker.train.jsonl"
mine_stage reranker --rows "$d/reranker.train.jsonl" --range_min 3 --drop_same_text \
  --sampling_strategy "$RERANKER_NEGATIVES"
reranker_data=$out/reranker/mined.jsonl
# Round 1's run over the validation questions: what the reranker's validation reranks.
valid_run=$out/round1/valid/run.tsv
if [ ! -f "$out/round1/valid/metrics.json" ]; then
  "$root/scripts/rank-valid.sh" "$bin" "$out/round1/model" "$d" "$out/round1/valid"
  "$bin" eval --qrels "$d/valid.qrels.tsv" --run "$valid_run" -m ndcg@10 -m mrr@10 -m recall@20 \
    --json > "$out/round1/valid/metrics.json.tmp"
  mv "$out/round1/valid/metrics.json.tmp" "$out/round1/valid/metrics.json"
fi
if [ ! -f "$out/reranker/model/trainer_state.json" ]; then
  echo "recipe: training the reranker" >&2
  start=$SECONDS
  rows=$(wc -l < "$reranker_data")
  every_r=$(( (rows + 7) / 8 / 4 > 0 ? (rows + 7) / 8 / 4 : 1 ))  # four validations an epoch
  "$bin" train-reranker --output_dir "$out/reranker/model" --model_name_or_path "$reranker_init" \
    --dataset_path "$reranker_data" --corpus_path "$data/corpus.jsonl" \
    --dataset_cache_dir "$out/cache" --train_group_size 8 --rerank_max_len "$rerank_len" \
    --per_device_train_batch_size 8 --learning_rate 1e-4 --warmup_ratio 0.1 \
    --num_train_epochs "$RERANKER_EPOCHS" --seed 42 --logging_steps 10 --eval_strategy steps \
    --eval_steps "$every_r" --save_steps "$every_r" --eval_query_path "$d/valid.queries.jsonl" \
    --eval_corpus_path "$d/valid.corpus.jsonl" --eval_qrels_path "$d/valid.qrels.tsv" \
    --eval_run_path "$valid_run" --eval_rerank_depth 20 --per_device_eval_batch_size 32 \
    --metric_for_best_model ndcg@10 --load_best_model_at_end --save_total_limit 1 \
    ${extra_train_flags[@]+"${extra_train_flags[@]}"}
  record_time "rerank (training)" $((SECONDS - start))
fi
# Reranking and annotation are the longest steps (hours on 2 cores): each works through ten
# shards of its input (whole queries each), one command a shard writing the shard's output whole
# (tevatron writes under a temporary name), so an interrupted run redoes at most one shard.
run_sharded() {  # step input key ext time-key output: "$step" <shard-input> <shard-output>
  local step=$1 input=$2 key=$3 ext=$4 timekey=$5 output=$6 parts=${6%.*}.shards part start
  if [ ! -f "$parts/split.done" ]; then
    rm -rf "$parts" && mkdir -p "$parts"
    python3 - "$input" "$parts" "$key" <<'PY'
import json, sys
src, dst, key = sys.argv[1:4]
lines = open(src).read().splitlines(keepends=True)
qid = (lambda l: l.split()[0]) if key == "run" else (lambda l: json.loads(l)["query_id"])
order = list(dict.fromkeys(qid(l) for l in lines))
shard = {q: i * 10 // len(order) for i, q in enumerate(order)}
files = [open(f"{dst}/{i:02}.in", "w") for i in range(10)]
for l in lines:
    files[shard[qid(l)]].write(l)
for f in files:
    f.close()
open(f"{dst}/split.done", "w").write("ok\n")
PY
  fi
  for part in "$parts"/*.in; do
    [ -f "${part%.in}.$ext" ] && continue
    start=$SECONDS
    "$step" "$part" "${part%.in}.$ext"
    record_time "$timekey" $((SECONDS - start))
  done
  cat "$parts"/*."$ext" > "$output.tmp"
  mv "$output.tmp" "$output"
}
rerank_shard() {  # run-shard output
  "$bin" rerank --model_name_or_path "$out/reranker/model" --run_path "$1" \
    --query_path "$d/eval.queries.jsonl" --corpus_path "$d/eval.corpus.jsonl" --rerank_depth 100 \
    --rerank_max_len "$rerank_len" --per_device_eval_batch_size 32 --rerank_output_path "$2" --quiet
}
annotate_shard() {  # training-shard output
  "$bin" annotate --model_name_or_path "$out/reranker/model" --dataset_path "$1" \
    --corpus_path "$data/corpus.jsonl" --dataset_cache_dir "$out/cache" --max_negatives 15 \
    --rerank_max_len "$rerank_len" --per_device_eval_batch_size 32 --output_path "$2" --quiet
}
# Distillation first (stage distilled): it needs only the reranker and round 2, and the dev
# reranking below is the longest step.
if [ ! -f "$out/distilled/scored.jsonl" ]; then
  echo "recipe: the reranker scores round 2's training groups" >&2
  mkdir -p "$out/distilled"
  run_sharded annotate_shard "$out/round2/mined.jsonl" jsonl jsonl "distilled (annotation)" \
    "$out/distilled/scored.jsonl"
fi
train_stage distilled "$out/round2/model" --dataset_path "$out/distilled/scored.jsonl" \
  --distillation --distil_temperature 0.05 --distil_teacher_temperature 1 \
  --distil_contrastive_weight 1 --per_device_train_batch_size 16 --train_group_size 4 \
  --num_train_epochs 1 --eval_steps "$every2" --save_steps "$every2" "${validation[@]}"
evaluate "$out/distilled/model" distilled

if [ ! -f "$out/rerank/eval/metrics.json" ]; then
  echo "recipe: reranking round 2's top 100 of every dev question" >&2
  mkdir -p "$out/rerank/eval"
  run_sharded rerank_shard "$out/round2/eval/run.tsv" run tsv "rerank (dev reranking)" \
    "$out/rerank/eval/run.tsv"
  "$bin" eval --qrels "$d/eval.qrels.tsv" --run "$out/rerank/eval/run.tsv" -m ndcg@10 -m mrr@10 \
    -m recall@100 --json > "$out/rerank/eval/metrics.json.tmp"
  mv "$out/rerank/eval/metrics.json.tmp" "$out/rerank/eval/metrics.json"
fi
# Fusion (stage fused): the reranker's scores kept beside round 2's, each z-scored per question,
# weighted a x reranker + (1 - a) x retriever (tevatron fuse --method wsum --normalization zmuv).
# a is chosen on the validation questions, never on dev: round 2's top 100 of each is reranked,
# fused at a = 0, 0.1, ..., 1 (0 is round 2 alone, 1 the reranker alone), and the a with the
# best validation nDCG@10 (the smallest of equals) fuses the dev runs. Why: in the quick recipe a
# reranker trained three epochs levelled off at 0.745 on round 1's validation top 20, below
# round 1's own 0.785, while fusing the two gave 0.811-0.818 (docs/recipe-insuranceqa.md).
if [ ! -f "$out/fused/eval/metrics.json" ]; then
  echo "recipe: fusing the reranker's scores with round 2's, the weight chosen on validation" >&2
  start=$SECONDS
  v=$out/round2/valid
  mkdir -p "$v" "$out/fused/eval"
  [ -f "$v/run.tsv" ] || "$root/scripts/rank-valid.sh" "$bin" "$out/round2/model" "$d" "$v"
  [ -f "$v/rerank.tsv" ] || "$bin" rerank --model_name_or_path "$out/reranker/model" \
    --run_path "$v/run.tsv" --query_path "$d/valid.queries.jsonl" \
    --corpus_path "$d/valid.corpus.jsonl" --rerank_depth 100 --rerank_max_len "$rerank_len" \
    --per_device_eval_batch_size 32 --rerank_output_path "$v/rerank.tsv" --quiet
  # Each pair: the reranker's weight a, the retriever's 1 - a.
  for weights in "0.0 1.0" "0.1 0.9" "0.2 0.8" "0.3 0.7" "0.4 0.6" "0.5 0.5" "0.6 0.4" "0.7 0.3" \
    "0.8 0.2" "0.9 0.1" "1.0 0.0"; do
    a=${weights% *}
    # shellcheck disable=SC2086  # two numbers, split on purpose
    TEVATRON_LOG=warn "$bin" fuse --runs "$v/rerank.tsv" "$v/run.tsv" --method wsum \
      --normalization zmuv --weights $weights --k 100 --output "$v/fused-$a.tsv"
    "$bin" eval --qrels "$d/valid.qrels.tsv" --run "$v/fused-$a.tsv" -m ndcg@10 --json \
      > "$v/fused-$a.json"
  done
  python3 - "$v" "$out/fused/weight.json" <<'PY'
import json, sys
v, dst = sys.argv[1:3]
grid = {a: json.load(open(f"{v}/fused-{a}.json"))["ndcg@10"]
        for a in ["0.0", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "1.0"]}
best = max(grid, key=lambda a: (grid[a], -float(a)))
json.dump({"validation_ndcg@10": grid, "reranker_weight": float(best)}, open(dst, "w"), indent=1)
print(f"recipe: validation nDCG@10 by reranker weight {grid}; chosen {best}", file=sys.stderr)
PY
  weights=$(python3 -c 'import json, sys
w = json.load(open(sys.argv[1]))["reranker_weight"]
print(w, round(1 - w, 10))' "$out/fused/weight.json")
  # shellcheck disable=SC2086  # two numbers, split on purpose
  TEVATRON_LOG=warn "$bin" fuse --runs "$out/rerank/eval/run.tsv" "$out/round2/eval/run.tsv" \
    --method wsum --normalization zmuv --weights $weights --k 100 \
    --output "$out/fused/eval/run.tsv"
  "$bin" eval --qrels "$d/eval.qrels.tsv" --run "$out/fused/eval/run.tsv" -m ndcg@10 -m mrr@10 \
    -m recall@100 --json > "$out/fused/eval/metrics.json.tmp"
  mv "$out/fused/eval/metrics.json.tmp" "$out/fused/eval/metrics.json"
  record_time "fused (validation reranking and fusion)" $((SECONDS - start))
fi

# Controls (CONTROL=1), to say what mining adds: round 2's questions, flags and group from the
# round-1 model with the data's own pool negatives instead of mined ones (round2_pool), and with
# negatives mined without the filters (round2_unfiltered).
stages="zero_shot seed_recipe round1 round2 rerank fused distilled"
if [ "${CONTROL:-0}" = 1 ]; then
  round2_stage round2_pool "$d/round2.train.jsonl"
  mine_stage round2_unfiltered
  round2_stage round2_unfiltered "$out/round2_unfiltered/mined.jsonl"
  stages="$stages round2_pool round2_unfiltered"
fi
if [ "${MATRYOSHKA:-0}" = 1 ]; then
  for r in round1 round2; do
    stages="$stages $r@192 $r@96 ${r}_matryoshka ${r}_matryoshka@192 ${r}_matryoshka@96"
  done
fi

# The table.
python3 - "$out" "$quick" $stages <<'PY'
import json, sys
out, quick, stages = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
def metrics(stage):  # <stage>@<k>: the stage's model searched at k dimensions
    name, _, k = stage.partition("@")
    return json.load(open(f"{out}/{name}/eval{'-' + k if k else ''}/metrics.json"))
m = {s: metrics(s) for s in stages}
json.dump(m, open(f"{out}/metrics.json", "w"), indent=1)
t = json.load(open(f"{out}/times.json"))
rows = ["| stage | nDCG@10 | MRR@10 | Recall@100 | wall time |", "|---|---|---|---|---|"]
for s in stages:
    secs = sum(v for k, v in t.items() if k.startswith(s + " "))
    rows.append(f"| {s} | {m[s]['ndcg@10']:.4f} | {m[s]['mrr@10']:.4f} | {m[s]['recall@100']:.4f} | {secs / 60:.1f} min |")
mined = json.load(open(f"{out}/round2/mined.jsonl.summary.json"))
title = "quick recipe (200 dev questions over 4,000 answers)" if quick else "full recipe (2,000 dev questions over 27,413 answers)"
report = "\n".join([f"# InsuranceQA, {title}", "", *rows, "",
                    f"Mining: {json.dumps(mined['removed'])} removed; positives by rank {mined['positive_ranks']}.", ""])
open(f"{out}/report.md", "w").write(report)
print("\n".join(rows))
PY
