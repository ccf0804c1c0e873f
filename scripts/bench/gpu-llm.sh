#!/usr/bin/env bash
# A 7B LoRA retriever on the GPU, ours against PyTorch + PEFT with SDPA in the same run (issue
# 25): random weights in Mistral-7B's shape, Tevatron's RepLLaMA settings (LoRA r 16, alpha 64,
# dropout 0.1 on the seven projections, last-token pooling (the tokenizer ends a text with its
# [SEP]), normalize, temperature 0.01, queries of 32 tokens and passages of 156 padded to a
# multiple of 4 on both sides, bf16, gradient checkpointing).
#
#   scripts/bench/gpu-llm.sh     on the GPU machine from the repository root, with the CUDA
#                                binary and tokenizer carried as for scripts/gpu-check.sh
#                                (.device/tevatron.xz, .device/tok) and PyTorch, transformers
#                                and peft installed
#   GPU_LLM_SHAPE=tiny GPU_LLM_DEVICE=cpu GPU_LLM_BINARY=target/release/tevatron \
#     GPU_LLM_PYTHON=.cache/bench-venv/bin/python scripts/bench/gpu-llm.sh
#                                a dry run of the script's logic on a CPU (a tiny decoder)
#
# Settings (environment): GPU_LLM_BATCHES (queries a step, tried in turn; "8 16"),
# GPU_LLM_GROUP (passages a query; 16), GPU_LLM_STEPS (6), GPU_LLM_PASSAGES (encoded; 2000).
# For each batch size: seconds per optimizer step (median of steps 2..N; ours from the log's
# timestamps, PyTorch's timed with synchronisation) and the GPU memory in use at its peak
# (nvidia-smi polled every 0.2 s, the same way for both), or "does not fit". Ours runs with the
# fused attention kernels (--attn_implementation flash_attention_2) and, if time allows
# (GPU_LLM_COMPOSED=1), with the composed attention too. Then encoding: tokens per second, ours
# (--bf16, the whole command) against PyTorch bf16 with SDPA (the forward loop after loading).
# The tokenizer is MiniLM's WordPiece (a decoder does not care which tokenizer feeds it).
# Prints the table row by row as each run ends, also into $OUT/table.md with the logs (default
# /tmp/gpu-llm); the model, data and embeddings stay in $GPU_LLM_WORK (/tmp/gpu-llm-work), out
# of what a device run brings back. Run it as its own command, after gpu-check: the model's
# creation, four loads of 14 GB, the training runs and the encodes take several minutes; start
# with GPU_LLM_BATCHES=8.
set -euo pipefail
dev=${GPU_LLM_DEVICE:-cuda}
shape=${GPU_LLM_SHAPE:-7b}
batches=${GPU_LLM_BATCHES:-8 16}
group=${GPU_LLM_GROUP:-16}
steps=${GPU_LLM_STEPS:-6}
n_passages=${GPU_LLM_PASSAGES:-2000}
out=${OUT:-/tmp/gpu-llm}
work=${GPU_LLM_WORK:-/tmp/gpu-llm-work}
py=${GPU_LLM_PYTHON:-$(command -v python3)}
mkdir -p "$out" "$work" /tmp/tev
table=$out/table.md
printf "%s\n" "| run | batch | seconds a step | peak GPU memory |" "|---|---|---|---|" > "$table"
row() { echo "$1" | tee -a "$table"; }
T=/tmp/tev/tevatron-llm
if [ -n "${GPU_LLM_BINARY:-}" ]; then
  cp "$GPU_LLM_BINARY" "$T"
else
  "$py" -c 'import lzma, shutil; shutil.copyfileobj(lzma.open(".device/tevatron.xz"), open("/tmp/tev/tevatron-llm", "wb"))'
fi
chmod +x "$T"
tok=${GPU_LLM_TOKENIZER:-.device/tok}
# PEFT and accelerate from carried wheels when the machine lacks them (no network there):
#   python3 -m pip download --no-deps -d .device/wheels peft accelerate
if ! "$py" -c 'import peft' 2>/dev/null && ls .device/wheels/*.whl > /dev/null 2>&1; then
  "$py" -m pip install -q --no-deps --target /tmp/tev/py .device/wheels/*.whl
  export PYTHONPATH=/tmp/tev/py${PYTHONPATH:+:$PYTHONPATH}
fi
"$py" -c 'import peft' || echo "WARNING: no PEFT here: the PyTorch rows will fail (carry its wheels, see above)"
if [ "$dev" = cuda ]; then
  libs=$("$py" -c 'import nvidia, os, glob; print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + "/**/lib*.so*", recursive=True)})))')
  export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi

echo "== the model ($shape, random bf16 weights) and data"
"$py" - "$work" "$tok" "$shape" "$dev" "$n_passages" <<'PY'
import json, os, random, shutil, sys
import torch
from transformers import MistralConfig, MistralModel
out, tok, shape, dev, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
dims = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128),
}[shape]
if not os.path.exists(f"{out}/model/done"):
    torch.manual_seed(0)
    cfg = MistralConfig(**dims, vocab_size=32000, max_position_embeddings=32768, sliding_window=4096,
                        rope_theta=10000.0, pad_token_id=0, bos_token_id=101, eos_token_id=102,
                        torch_dtype="bfloat16")
    with torch.device(dev):
        model = MistralModel(cfg).to(torch.bfloat16)
    model.save_pretrained(f"{out}/model", safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if os.path.exists(f"{tok}/{f}"):
            shutil.copy(f"{tok}/{f}", f"{out}/model/{f}")
    print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")
    del model
    open(f"{out}/model/done", "w").write("ok\n")
vocab = [w for w in open(f"{tok}/vocab.txt").read().split("\n") if w.isalpha()]
rng = random.Random(0)
words = lambda k: " ".join(rng.choice(vocab) for _ in range(k))
with open(f"{out}/train.jsonl", "w") as f:  # passages fill 156 tokens, queries 32
    for _ in range(64 * 16):
        f.write(json.dumps({"query": words(40), "positive_passages": [{"text": words(200)}],
                            "negative_passages": [{"text": words(200)} for _ in range(15)]}) + "\n")
with open(f"{out}/passages.jsonl", "w") as f:
    for i in range(n):
        f.write(json.dumps({"docid": str(i), "text": words(rng.randint(60, 200))}) + "\n")
PY

# Runs a command while polling the GPU's memory in use; prints the peak in MB ("n/a" on a CPU).
peak_mem() {  # log command...
  local log=$1; shift
  local poll=""
  if [ "$dev" = cuda ]; then
    ( while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1; sleep 0.2; done ) > "$log.mem" &
    poll=$!
  fi
  local rc=0
  "$@" || rc=$?
  [ -n "$poll" ] && kill "$poll" 2>/dev/null && wait "$poll" 2>/dev/null || true
  if [ "$dev" = cuda ]; then sort -n "$log.mem" | tail -n 1; else echo n/a; fi
  return $rc
}
base_mem=0
[ "$dev" = cuda ] && base_mem=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1)
mb() { case $1 in n/a) echo n/a ;; '') echo "not polled" ;; *) echo "$(( $1 - base_mem )) MB" ;; esac; }

lora=(--lora --lora_r 16 --lora_alpha 64 --lora_dropout 0.1
  --lora_target_modules q_proj,k_proj,v_proj,o_proj,down_proj,up_proj,gate_proj)
ours_train() {  # label batch extra...
  local label=$1 b=$2; shift 2
  "$T" train --model_name_or_path "$work/model" --dataset_path "$work/train.jsonl" --output_dir "$work/$label" \
    "${lora[@]}" --bf16 --gradient_checkpointing --pooling last --normalize \
    --temperature 0.01 --per_device_train_batch_size "$b" --train_group_size "$group" \
    --query_max_len 32 --passage_max_len 156 --pad_to_multiple_of 4 --learning_rate 1e-4 --max_steps "$steps" \
    --logging_steps 1 --save_strategy no --overwrite_output_dir --device "$dev" \
    --dataset_cache_dir "$work/cache" "$@" 2> "$out/$label.log"
}
theirs_train() {  # batch
  TRAIN_STEP_DEVICE=$dev TRAIN_STEP_AMP=bf16 TRAIN_STEP_DTYPE=bf16 TRAIN_STEP_ATTN=sdpa TRAIN_STEP_PAD_MULTIPLE=4 \
    "$py" scripts/bench/train_step.py "$work/model" "$work/train.jsonl" "$steps" "$1" "$group" 32 156 last true 0.01 lora-ckpt \
    > "$out/torch-$1.json" 2> "$out/torch-$1.log"
}
for b in $batches; do
  echo "== training, $b queries x group $group, $steps steps"
  runs=("fused:--attn_implementation flash_attention_2")
  [ "${GPU_LLM_COMPOSED:-0}" = 1 ] && runs+=("composed:--attn_implementation sdpa")
  for run in "${runs[@]}"; do
    label=${run%%:*} flags=${run#*:}
    # shellcheck disable=SC2086
    if mem=$(peak_mem "$out/ours-$label-$b.log" ours_train "ours-$label-$b" "$b" $flags); then
      s=$("$py" scripts/bench/step_seconds.py "$out/ours-$label-$b.log")
      row "| ours ($label attention) | $b x $group | $s s | $(mb "$mem") |"
    else
      tail -n 3 "$out/ours-$label-$b.log"
      row "| ours ($label attention) | $b x $group | does not fit or failed | |"
    fi
  done
  if mem=$(peak_mem "$out/torch-$b" theirs_train "$b"); then
    s=$("$py" -c 'import json,sys; print("%.3g" % json.load(open(sys.argv[1]))["sec_per_step"])' "$out/torch-$b.json")
    row "| PyTorch + PEFT (SDPA) | $b x $group | $s s | $(mb "$mem") |"
  else
    tail -n 3 "$out/torch-$b.log"
    row "| PyTorch + PEFT (SDPA) | $b x $group | does not fit or failed | |"
  fi
done

echo "== encoding $n_passages passages (max 156 tokens, bf16, batch 64)"
start=$("$py" -c 'import time; print(time.time())')
if "$T" encode --model_name_or_path "$work/model" --dataset_path "$work/passages.jsonl" --bf16 --device "$dev" \
  --pooling last --normalize --passage_max_len 156 --per_device_eval_batch_size 64 \
  --encode_output_path "$work/enc.safetensors" --quiet 2> "$out/encode.log"; then
  ours_s=$("$py" -c "import time; print(time.time() - $start)")
else
  tail -n 3 "$out/encode.log"; ours_s=""
fi
theirs=$("$py" - "$work" "$dev" <<'PY' 2> "$out/torch-encode.log" || true
import json, sys, time, torch
from transformers import AutoModel, AutoTokenizer
work, dev = sys.argv[1], sys.argv[2]
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
tok = AutoTokenizer.from_pretrained(f"{work}/model")
model = AutoModel.from_pretrained(f"{work}/model", torch_dtype=torch.bfloat16, attn_implementation="sdpa").to(dev).eval()
texts = [json.loads(l)["text"] for l in open(f"{work}/passages.jsonl")]
ids = tok(texts, truncation=True, max_length=156)["input_ids"]
order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
sync(); t = time.perf_counter()
with torch.inference_mode():
    for s in range(0, len(order), 64):
        b = tok.pad({"input_ids": [ids[i] for i in order[s:s + 64]]}, return_tensors="pt").to(dev)
        h = model(**b).last_hidden_state
        r = torch.nn.functional.normalize(h[torch.arange(h.shape[0]), b["attention_mask"].sum(1) - 1].float(), dim=-1).cpu()
sync()
print(sum(len(x) for x in ids), time.perf_counter() - t)
PY
)
read -r tokens theirs_s <<< "${theirs:-0 0}"
row "$("$py" -c "t, a, b = $tokens, '$ours_s', $theirs_s
ours = f'{t / float(a):.0f} tokens/s (whole command, loading included)' if a else 'failed'
theirs = f'{t / b:.0f} tokens/s (forward loop, after loading)' if b else 'failed'
print(f'\nencode {t} tokens: ours {ours}, PyTorch bf16 SDPA {theirs}')")"
