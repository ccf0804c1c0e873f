#!/usr/bin/env bash
# A small decoder LLM, ours vs PyTorch (transformers + PEFT), same machine, same run, 2 threads
# each: encode tokens/s and a LoRA training step.
#   scripts/bench/decoder.sh [N_PASSAGES] [STEPS]   (defaults 1000 and 6)
# Model: a random-weight Qwen2 of 51.8M parameters (scripts/bench/make_decoder.py 50m), fp32.
# Encode: the first N InsuranceQA answers, --passage_max_len 128, batch 32, last-token pooling;
# tokens/s counts real (unpadded) tokens. Ours is the whole command (start, load, tokenize,
# encode, write); PyTorch's is the batched forward loop alone, after loading.
# Train: Tevatron's LoRA defaults (r 16, alpha 64, dropout 0.1, the seven projections), 8 queries,
# group 4, lengths 32/128, last-token pooling, normalize, temperature 0.01; seconds per optimizer
# step, median of steps 2..N (ours from the log's timestamps).
# PRECISION=bf16: ours with --bf16 (bf16 products where the CPU has AMX-BF16 or AVX-512 BF16,
# docs/bf16.md), PyTorch under torch.autocast("cpu", torch.bfloat16) for both.
# Needs TEVATRON_BENCH_VENV (or .cache/bench-venv) with torch, transformers and peft.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
n=${1:-1000}
steps=${2:-6}
work=$root/.cache/bench/decoder
mkdir -p "$work"
cargo build --release -q -p tevatron-cli
data=${INSURANCEQA:-$(scripts/fetch-insuranceqa.sh)}
minilm=$(scripts/fetch-minilm.sh)
venv=${TEVATRON_BENCH_VENV:-$root/.cache/bench-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch transformers peft
fi
py=$venv/bin/python
model=$work/qwen2-50m
case ${PRECISION:-f32} in
  f32) ours_precision=(); amp= ;;
  bf16) ours_precision=(--bf16); amp=bf16 ;;
  *) echo "PRECISION is f32 or bf16, not $PRECISION" >&2; exit 2 ;;
esac
[ -f "$model/model.safetensors" ] || "$py" scripts/bench/make_decoder.py 50m "$minilm" "$model" > /dev/null
head -n "$n" "$data/corpus.jsonl" > "$work/passages.jsonl"

start=$(date +%s.%N)
RAYON_NUM_THREADS=2 target/release/tevatron encode --model_name_or_path "$model" \
  --dataset_path "$work/passages.jsonl" --encode_output_path "$work/ours.safetensors" \
  --passage_max_len 128 --per_device_eval_batch_size 32 --pooling last --quiet ${ours_precision[@]+"${ours_precision[@]}"}
ours_encode=$(echo "$(date +%s.%N) - $start" | bc -l)
read -r tokens theirs_encode < <(TRAIN_STEP_AMP=$amp OMP_NUM_THREADS=2 "$py" - "$model" "$work/passages.jsonl" <<'PY'
import json, os, sys, time
import torch
from transformers import AutoModel, AutoTokenizer
torch.set_num_threads(2)
model_dir, path = sys.argv[1:3]
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModel.from_pretrained(model_dir).eval()
texts = [json.loads(l)["text"] for l in open(path)]
ids = tok(texts, truncation=True, max_length=128)["input_ids"]
order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
start = time.perf_counter()
amp = os.environ.get("TRAIN_STEP_AMP") == "bf16"
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
    for s in range(0, len(order), 32):
        b = tok.pad({"input_ids": [ids[i] for i in order[s:s + 32]]}, pad_to_multiple_of=16, return_tensors="pt")
        model(**b)
print(sum(len(x) for x in ids), time.perf_counter() - start)
PY
)

RAYON_NUM_THREADS=2 target/release/tevatron train --output_dir "$work/lora" \
  --model_name_or_path "$model" --dataset_path "$data/train.small.jsonl" --lora \
  --per_device_train_batch_size 8 --train_group_size 4 --query_max_len 32 --passage_max_len 128 \
  --pooling last --normalize --temperature 0.01 --learning_rate 1e-4 --max_steps "$steps" \
  --logging_steps 1 --save_strategy no --overwrite_output_dir \
  --dataset_cache_dir "$work/cache" ${ours_precision[@]+"${ours_precision[@]}"} 2> "$work/lora.log"
ours_step=$("$py" scripts/bench/step_seconds.py "$work/lora.log")
theirs_step=$(TRAIN_STEP_AMP=$amp OMP_NUM_THREADS=2 "$py" scripts/bench/train_step.py "$model" "$data/train.small.jsonl" \
  "$steps" 8 4 32 128 last true 0.01 lora \
  | "$py" -c 'import json,sys; print("%.2f" % json.loads(sys.stdin.read())["sec_per_step"])')

ratio() { echo "$1 / $2" | bc -l | xargs printf %.2f; }
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); ${PRECISION:-f32}"
printf "| measure | ours | PyTorch | ours vs PyTorch |\n|---|---|---|---|\n"
printf "| encode, %s passages (%s tokens) | %.0f tokens/s | %.0f tokens/s | %sx |\n" "$n" "$tokens" \
  "$(echo "$tokens / $ours_encode" | bc -l)" "$(echo "$tokens / $theirs_encode" | bc -l)" "$(ratio "$theirs_encode" "$ours_encode")"
printf "| LoRA train step (8 q x group 4) | %s s | %s s | %sx |\n" "$ours_step" "$theirs_step" "$(ratio "$theirs_step" "$ours_step")"
