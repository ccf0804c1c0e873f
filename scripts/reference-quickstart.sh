#!/usr/bin/env bash
# The quickstart's recipe trained in PyTorch + transformers (scripts/reference/quickstart_torch.py:
# same data, batches, hyperparameters and seed), evaluated on the same subset with the same
# `tevatron eval`, and compared with `tevatron train`'s result. Not part of CI.
#   scripts/reference-quickstart.sh      # after scripts/quickstart.sh (runs it if needed)
# Needs a virtualenv with torch, transformers and numpy: REFERENCE_VENV=/path, else one is
# created in .cache/reference-venv (torch from PyPI, several GB). Writes
# runs/quickstart/reference/{run.tsv,metrics.json} and runs/quickstart/comparison.md.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${QUICKSTART_OUT:-$root/runs/quickstart}
steps=${QUICKSTART_STEPS:-80}
[ -f "$out/metrics.json" ] || "$root/scripts/quickstart.sh"
bin=$root/target/release/tevatron
data=${INSURANCEQA:-$("$root/scripts/fetch-insuranceqa.sh" "$bin")}
model=${QUICKSTART_MODEL:-$("$root/scripts/fetch-minilm.sh")}
venv=${REFERENCE_VENV:-$root/.cache/reference-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch transformers numpy
fi
mkdir -p "$out/reference"
# Our training again, in this run, so that both wall times come from the same conditions; only
# the time is kept (the quickstart's own model is the one evaluated).
echo "reference: timing tevatron train ($steps steps)" >&2
rm -rf "$out/reference/tevatron-model"
start=$(date +%s.%N)
source "$root/scripts/quickstart-recipe.sh"
"$bin" train --output_dir "$out/reference/tevatron-model" --model_name_or_path "$model" \
  --dataset_path "$data/train.small.jsonl" --max_steps "$steps" "${recipe[@]}" \
  --save_strategy no --dataset_cache_dir "$out/cache" --quiet
python3 -c "import sys; print(f'{{\"train_seconds\": {float(sys.argv[2]) - float(sys.argv[1]):.1f}}}')" \
  "$start" "$(date +%s.%N)" > "$out/reference/tevatron-timing.json"
rm -rf "$out/reference/tevatron-model"
echo "reference: training in PyTorch ($steps steps)" >&2
"$venv/bin/python" "$root/scripts/reference/quickstart_torch.py" "$model" "$data/train.small.jsonl" \
  "$out/data" "$out/reference" "$steps" > "$out/reference/timing.json"
"$bin" eval --qrels "$out/data/qrels.tsv" --run "$out/reference/run.tsv" -m ndcg@10 -m mrr@10 \
  -m recall@100 --json > "$out/reference/metrics.json"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
ours = json.load(open(f"{out}/fine-tuned/metrics.json"))
zero = json.load(open(f"{out}/zero-shot/metrics.json"))
ref = json.load(open(f"{out}/reference/metrics.json"))
timing = json.load(open(f"{out}/reference/timing.json"))
state = json.load(open(f"{out}/model/trainer_state.json"))
our_seconds = json.load(open(f"{out}/reference/tevatron-timing.json"))["train_seconds"]
rows = ["| measure | zero-shot | tevatron (Rust) | PyTorch reference | difference |", "|---|---|---|---|---|"]
rows += [f"| {k} | {zero[k]:.4f} | {ours[k]:.4f} | {ref[k]:.4f} | {ours[k] - ref[k]:+.4f} |"
         for k in ("ndcg@10", "mrr@10", "recall@100")]
rows += ["", f"Training wall time on this machine, same run, 2 threads each: tevatron "
         f"{our_seconds:.0f} s (whole command), PyTorch {timing['train_seconds']:.0f} s (training loop "
         f"only); PyTorch / tevatron = {timing['train_seconds'] / our_seconds:.2f}."]
our_losses = [e["loss"] for e in state["log_history"] if "loss" in e]
rows += [f"Final logged loss: tevatron {our_losses[-1]:.4f}; PyTorch mean of the last "
         f"{state['logging_steps']} steps {sum(timing['losses'][-state['logging_steps']:]) / state['logging_steps']:.4f}."]
open(f"{out}/comparison.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
gap = abs(ours["ndcg@10"] - ref["ndcg@10"])
print(f"nDCG@10 gap {gap:.4f} ({'within' if gap <= 0.005 else 'NOT within'} 0.005)")
PY
