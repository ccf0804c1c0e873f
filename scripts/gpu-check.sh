#!/usr/bin/env bash
# GPU checks for a machine with an NVIDIA GPU, PyTorch and transformers but no cargo and no
# network. Run from the repository root with the CUDA binary carried in .device/:
#   .device/tevatron.xz (from scripts/build-cuda.sh, xz-compressed) and .device/tok/ (a BERT
#   tokenizer + config: the all-MiniLM-L6-v2 files without weights).
#   Optionally .device/model-tests.xz and .device/train-tests.xz (scripts/build-cuda.sh tests,
#   xz-compressed).
# It builds a random-weight MiniLM-shaped BERT with transformers, then checks
#   0. our kernels (training ops, AdamW, gradient norm) on the GPU against the CPU, if carried,
#   1. CUDA vs CPU parity of our embeddings (f32 max abs <= 1e-4; bf16/f16 cosine >= 0.999 per row),
#      and two encode processes on the GPU from one command (--nproc_per_node 2) against one,
#   2. encode throughput, ours vs transformers (mean pooling) on the same GPU, f32 and fp16,
#   3. search: GPU (f32 and the default f16 index) against CPU over the same embeddings,
#   4. training on the GPU: a 30-step bf16 run whose loss must fall, its step time against a
#      PyTorch Tevatron-style step (same model, batch, lengths, bf16 autocast), and two ranks on
#      the one GPU (--nproc_per_node 2, TCP collectives) against one process with twice the batch,
#   5. a few f32 steps with dropout on against the same steps on the CPU (same masks), with
#      candle's composed attention and with our fused attention kernels
#      (--attn_implementation flash_attention_2), and a bf16 run's step time with the latter,
#   6. a profile of four bf16 steps: per phase, the host's issue time and the device's, with our
#      fused kernels and with candle's composed ops (TEVATRON_GPU_COMPOSED_OPS=1),
#   7. three LoRA steps of a tiny Mistral (testdata/tiny) on the GPU against the CPU, with
#      the composed and with the fused attention.
# The 7B LoRA benchmark is scripts/bench/gpu-llm.sh, run as its own command when time allows.
# Prints every figure and the ratios; ends with "gpu-check: all checks passed" or a FAIL line.
# A dry run of the script's logic on a machine without a GPU (any binary, fewer passages):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_PASSAGES=1000 GPU_CHECK_STEPS=9 GPU_CHECK_BATCH=8 \
#     GPU_CHECK_BINARY=target/release/tevatron scripts/gpu-check.sh
set -euo pipefail
dev=${GPU_CHECK_DEVICE:-cuda}
n_passages=${GPU_CHECK_PASSAGES:-20000}
steps=${GPU_CHECK_STEPS:-30}
bs=${GPU_CHECK_BATCH:-32}
dev0=$dev; [ "$dev" = cuda ] && dev0=cuda:0
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out" /tmp/tev
py=${GPU_CHECK_PYTHON:-$(command -v python3)}
if [ -n "${GPU_CHECK_BINARY:-}" ]; then
  cp "$GPU_CHECK_BINARY" /tmp/tev/tevatron
else
  python3 -c 'import lzma, shutil; shutil.copyfileobj(lzma.open(".device/tevatron.xz"), open("/tmp/tev/tevatron", "wb"))'
fi
chmod +x /tmp/tev/tevatron
if [ "$dev" = cuda ]; then
  # cuBLAS/cuRAND/NVRTC/cudart from PyTorch's CUDA 13 wheels.
  libs=$("$py" -c 'import nvidia, os, glob; print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + "/**/lib*.so*", recursive=True)})))')
  export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
"$py" - "$out" "$n_passages" <<'PY'
import json, os, random, shutil, sys
import torch
from transformers import BertConfig, BertModel
out = sys.argv[1]
torch.manual_seed(0)
cfg = BertConfig.from_pretrained(".device/tok")
model = BertModel(cfg).eval()
model.save_pretrained(f"{out}/model", safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    if os.path.exists(f".device/tok/{f}"):
        shutil.copy(f".device/tok/{f}", f"{out}/model/{f}")
vocab = [w for w in open(".device/tok/vocab.txt").read().split("\n") if w.isalpha()]
rng = random.Random(0)
with open(f"{out}/p.jsonl", "w") as f:
    for i in range(int(sys.argv[2])):
        f.write(json.dumps({"docid": str(i), "text": " ".join(rng.choice(vocab) for _ in range(rng.randint(60, 140)))}) + "\n")
with open(f"{out}/small.jsonl", "w") as f:
    for i in range(256):
        f.write(json.dumps({"docid": str(i), "text": " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 200)))}) + "\n")
# Queries for search, and lexical-match training groups: a query is 8 words of its positive.
passages = [" ".join(rng.choice(vocab) for _ in range(rng.randint(40, 100))) for _ in range(4000)]
with open(f"{out}/q.jsonl", "w") as f:
    for i in range(256):
        words = passages[i].split()
        f.write(json.dumps({"query_id": str(i), "query": " ".join(rng.sample(words, 8))}) + "\n")
with open(f"{out}/train.jsonl", "w") as f:
    for i in range(1920):
        pos = passages[i]
        negs = [passages[rng.randrange(len(passages))] for _ in range(3)]
        f.write(json.dumps({"query": " ".join(rng.sample(pos.split(), 8)),
                            "positive_passages": [{"text": pos}],
                            "negative_passages": [{"text": n} for n in negs]}) + "\n")
PY
T=/tmp/tev/tevatron
echo "== our kernels on the GPU against the CPU (the model and train crates' gpu_tests, if carried)"
# .device/{model,train}-tests.xz are scripts/build-cuda.sh tests' binaries. If a kernel differs,
# the checks below still run, with candle's composed ops instead of our kernels, and the script
# fails at the end.
kernels_failed=
for crate in model train; do
  if [ "$dev" = cuda ] && [ -f ".device/$crate-tests.xz" ]; then
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      ".device/$crate-tests.xz" "/tmp/tev/$crate-tests"
    chmod +x "/tmp/tev/$crate-tests"
    if "/tmp/tev/$crate-tests" gpu_tests:: --test-threads 1 --nocapture > "$out/kernels-$crate.log" 2>&1 \
        && ! grep -q SKIPPED "$out/kernels-$crate.log"; then
      grep -E 'differ|test result' "$out/kernels-$crate.log"
    else
      grep -E 'differ|panicked|SKIPPED|FAILED|test result' "$out/kernels-$crate.log" | head -n 40 || true
      echo "FAIL (going on): the $crate crate's kernels differ from the CPU; the checks below use TEVATRON_GPU_COMPOSED_OPS=1"
      kernels_failed=1
    fi
  else
    echo "not run: no .device/$crate-tests.xz, or not on a GPU"
  fi
done
# Set after both crates' tests, so that the second runs our kernels whatever the first found.
[ -z "$kernels_failed" ] || export TEVATRON_GPU_COMPOSED_OPS=1
enc() { "$T" encode --model_name_or_path "$out/model" --pooling mean --normalize --passage_max_len 128 --quiet "$@"; }
echo "== parity (256 passages of 1 to 200 words, mean pooling, normalized)"
enc --dataset_path "$out/small.jsonl" --device cpu --encode_output_path "$out/cpu.st" --per_device_eval_batch_size 32
enc --dataset_path "$out/small.jsonl" --device "$dev" --encode_output_path "$out/gpu32.st" --per_device_eval_batch_size 32
enc --dataset_path "$out/small.jsonl" --device "$dev" --fp16 --encode_output_path "$out/gpu16.st" --per_device_eval_batch_size 32
enc --dataset_path "$out/small.jsonl" --device "$dev" --bf16 --encode_output_path "$out/gpubf16.st" --per_device_eval_batch_size 32
"$py" - "$out" <<'PY'
import sys, numpy as np
from safetensors.numpy import load_file
out = sys.argv[1]
cpu = load_file(f"{out}/cpu.st")["embeddings"]
for name in ("gpu32", "gpu16", "gpubf16"):
    g = load_file(f"{out}/{name}.st")["embeddings"]
    cos = (g * cpu).sum(1) / np.linalg.norm(g, axis=1) / np.linalg.norm(cpu, axis=1)
    print(f"{name}: max abs diff {np.abs(g - cpu).max():.2e}, min cosine {cos.min():.6f}")
PY
echo "-- two processes on the GPU from one command (encode --nproc_per_node 2) against one process"
enc --dataset_path "$out/small.jsonl" --device "$dev" --encode_output_path "$out/gpu2.st" --per_device_eval_batch_size 32 --nproc_per_node 2
"$py" - "$out" <<'PY'
import sys, numpy as np
from safetensors.numpy import load_file
out = sys.argv[1]
one, two = load_file(f"{out}/gpu32.st"), load_file(f"{out}/gpu2.st")
d = np.abs(one["embeddings"] - two["embeddings"]).max()
print(f"two processes vs one: same ids {bytes(one['ids']) == bytes(two['ids'])}, max abs diff {d:.2e}")
if bytes(one["ids"]) != bytes(two["ids"]) or d > 1e-4:
    sys.exit("FAIL: two encode processes differ from one")
PY
echo "== throughput ($n_passages passages of 60-140 words, max 128 tokens, batch 256)"
for flag in "" "--fp16"; do
  start=$(date +%s.%N)
  enc --dataset_path "$out/p.jsonl" --device "$dev" $flag --encode_output_path "$out/tp.st" --per_device_eval_batch_size 256
  end=$(date +%s.%N)
  "$py" -c "s = $end - $start; print(f'ours ${flag:-fp32}: {s:.2f} s = {$n_passages / s:.0f} passages/s (whole command)')"
done
"$py" - "$out" "$dev" <<'PY'
import json, sys, time, torch
from transformers import AutoModel, AutoTokenizer
out, dev = sys.argv[1], sys.argv[2]
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
tok = AutoTokenizer.from_pretrained(f"{out}/model")
texts = [json.loads(l)["text"] for l in open(f"{out}/p.jsonl")]
for dtype in (torch.float32, torch.float16 if dev == "cuda" else torch.bfloat16):
    model = AutoModel.from_pretrained(f"{out}/model", torch_dtype=dtype).to(dev).eval()
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    sync(); t = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(texts), 256):
            b = tok([texts[i] for i in order[s:s + 256]], truncation=True, max_length=128, padding=True, return_tensors="pt").to(dev)
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            r = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).float().cpu()
    sync(); s = time.perf_counter() - t
    print(f"transformers {dtype}: {s:.2f} s = {len(texts) / s:.0f} passages/s (tokenize + encode, model loaded)")
PY

echo "== search (256 queries over the $n_passages embeddings above, depth 100)"
enc --dataset_path "$out/q.jsonl" --encode_is_query --device "$dev" --encode_output_path "$out/q.st" --query_max_len 32
srch() { local label=$1; shift; local start end; start=$(date +%s.%N)
  "$T" search --query_reps "$out/q.st" --passage_reps "$out/tp.st" --depth 100 --save_ranking_to "$out/$label.tsv" --save_text --quiet "$@"
  end=$(date +%s.%N); "$py" -c "print(f'search $label: {$end - $start:.2f} s (whole command)')"; }
srch cpu --device cpu
srch gpu32 --device "$dev" --gpu_float32
srch gpu16 --device "$dev"
"$py" - "$out" <<'PY'
import sys
from collections import defaultdict
out = sys.argv[1]
def read(name):
    r = defaultdict(list)
    for line in open(f"{out}/{name}.tsv"):
        q, d, s = line.split("\t")
        r[q].append((d, float(s)))
    return r
cpu = read("cpu")
for name in ("gpu32", "gpu16"):
    g = read(name)
    same = sum([d for d, _ in g[q]] == [d for d, _ in cpu[q]] for q in cpu)
    top10 = sum(len({d for d, _ in g[q][:10]} & {d for d, _ in cpu[q][:10]}) for q in cpu) / (10 * len(cpu))
    diff = max(abs(a[1] - b[1]) for q in cpu for a, b in zip(g[q], cpu[q]))
    print(f"{name} vs cpu: identical rankings {same}/{len(cpu)}, top-10 overlap {top10:.4f}, max score diff {diff:.2e}")
    if name == "gpu32" and top10 < 0.999:
        sys.exit("FAIL: the f32 GPU search differs from the CPU search")
PY

echo "== training on the GPU (random-weight MiniLM-shaped BERT, 1,920 lexical-match groups, $steps steps of $bs x group 4, q32/p128)"
tr() { local label=$1; shift
  "$T" train --model_name_or_path "$out/model" --dataset_path "$out/train.jsonl" --output_dir "$out/$label" \
    --train_group_size 4 --query_max_len "${ql:-32}" --passage_max_len "${pl:-128}" --pooling mean --normalize --temperature 0.05 \
    --learning_rate 1e-4 --warmup_ratio 0 --logging_steps 1 --save_strategy no --overwrite_output_dir \
    --dataset_cache_dir "$out/cache" "$@" 2> "$out/$label.log" || { tail -5 "$out/$label.log"; exit 1; }; }
# same_losses RUN_A LABEL_A RUN_B LABEL_B WHAT: prints both runs' per-step losses and the largest
# difference of their gradient norms, and fails with "FAIL: WHAT" unless both agree step by step
# within 1e-3 relative.
same_losses() {
  "$py" - "$out" "$@" <<'PY'
import json, sys
out, run_a, label_a, run_b, label_b, what = sys.argv[1:]
log = lambda n, key: [e[key] for e in json.load(open(f"{out}/{n}/trainer_state.json"))["log_history"] if "loss" in e]
rel = lambda a, b: max(abs(x - y) / abs(x) for x, y in zip(a, b))
a, b = log(run_a, "loss"), log(run_b, "loss")
norms_a, norms_b = log(run_a, "grad_norm"), log(run_b, "grad_norm")
width = max(len(label_a), len(label_b)) + 1
print(f"{label_a + ':':<{width}} {' '.join(f'{x:.5f}' for x in a)}")
print(f"{label_b + ':':<{width}} {' '.join(f'{x:.5f}' for x in b)}  (max relative difference {rel(a, b):.1e})")
print(f"{'':<{width}} gradient norms: max relative difference {rel(norms_a, norms_b):.1e}")
if len(a) != len(b) or rel(a, b) > 1e-3 or rel(norms_a, norms_b) > 1e-3:
    sys.exit(f"FAIL: {what}")
PY
}
tr bf16 --device "$dev" --bf16 --per_device_train_batch_size "$bs" --max_steps "$steps"
ours=$("$py" scripts/bench/step_seconds.py "$out/bf16.log")
theirs=$(TRAIN_STEP_DEVICE=$dev TRAIN_STEP_AMP=bf16 "$py" scripts/bench/train_step.py "$out/model" "$out/train.jsonl" "$steps" "$bs" 4 32 128 mean true 0.05 2>/dev/null \
  | "$py" -c 'import json,sys; print("%.4g" % json.loads(sys.stdin.read())["sec_per_step"])')
"$py" - "$out" "$ours" "$theirs" <<'PY'
import json, sys
out, ours, theirs = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
losses = [e["loss"] for e in json.load(open(f"{out}/bf16/trainer_state.json"))["log_history"] if "loss" in e]
first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
print(f"bf16 loss: first 5 steps {first:.4f} -> last 5 steps {last:.4f} ({len(losses)} steps)")
print(f"train step (bf16): ours {ours * 1000:.1f} ms, PyTorch {theirs * 1000:.1f} ms, ratio (PyTorch/ours) {theirs / ours:.2f}x")
if not last < first:
    sys.exit("FAIL: the loss did not fall")
PY
echo "-- two ranks on one GPU (TCP collectives, f32) vs one process with twice the batch, $((steps / 3)) steps"
# Dropout off: each rank draws its own masks, so only then are the two runs the same steps.
tr one --device "$dev0" --disable_dropout --per_device_train_batch_size "$bs" --max_steps $((steps / 3))
tr two --device "$dev0" --disable_dropout --per_device_train_batch_size $((bs / 2)) --max_steps $((steps / 3)) --nproc_per_node 2
same_losses one "one process" two "two ranks" "two ranks do not train as one process with twice the batch"
echo "-- dropout on, f32: the GPU draws the CPU's masks, so both train alike (3 steps of 8 groups)"
# Every sequence cut at the same length (queries of 8 tokens, passages of 32), so that the CPU
# keeps each side whole and in input order, as a GPU does, for any model (a BERT-family one does
# so anyway, docs/train.md "Real tokens only"; others split by length, "Length buckets"): only
# then are the masks drawn over the same rows.
ql=8 pl=32 tr dcpu --device cpu --per_device_train_batch_size 8 --max_steps 3
ql=8 pl=32 tr dgpu --device "$dev0" --per_device_train_batch_size 8 --max_steps 3
same_losses dcpu cpu dgpu gpu "GPU training with dropout differs from CPU training with the same seed"
echo "-- the same with the fused attention kernels (--attn_implementation flash_attention_2)"
ql=8 pl=32 tr dgpuf --device "$dev0" --per_device_train_batch_size 8 --max_steps 3 --attn_implementation flash_attention_2
same_losses dcpu cpu dgpuf "gpu, fused attention" "GPU training with the fused attention differs from CPU training"
echo "-- a bf16 step with the fused attention kernels against the composed attention above"
tr bf16f --device "$dev" --bf16 --per_device_train_batch_size "$bs" --max_steps "$steps" --attn_implementation flash_attention_2
fused=$("$py" scripts/bench/step_seconds.py "$out/bf16f.log")
"$py" -c "print(f'train step (bf16): composed attention {$ours * 1000:.1f} ms, fused attention {$fused * 1000:.1f} ms')"
echo "-- where a bf16 step's time goes (TEVATRON_PROFILE_STEPS=1: host issue / device done, per phase)"
TEVATRON_PROFILE_STEPS=1 tr prof --device "$dev" --bf16 --per_device_train_batch_size "$bs" --max_steps 4
grep '^profile step' "$out/prof.log" | tail -n 2
echo "   the same with candle's composed ops instead of our fused kernels (TEVATRON_GPU_COMPOSED_OPS=1):"
TEVATRON_GPU_COMPOSED_OPS=1 TEVATRON_PROFILE_STEPS=1 tr profc --device "$dev" --bf16 --per_device_train_batch_size "$bs" --max_steps 4
grep '^profile step' "$out/profc.log" | tail -n 2
echo "-- a tiny Mistral with LoRA (Tevatron's recipe in f32, dropout on): GPU against CPU, 3 steps"
# Goes through the decoder kernels (RMSNorm, rotary, SwiGLU) and LoRA on the GPU. Every text
# is cut (queries at 10 tokens, passages at 15, each keeping words past the prefix), for the
# reason given at the dropout part above.
dec() { local label=$1; shift
  "$T" train --model_name_or_path testdata/tiny/mistral --dataset_path testdata/train/tiny.jsonl \
    --output_dir "$out/$label" --lora --lora_target_modules q_proj,k_proj,v_proj,o_proj,down_proj,up_proj,gate_proj \
    --query_prefix "Query: " --passage_prefix "Passage: " --pooling eos --append_eos_token --normalize \
    --temperature 0.01 --per_device_train_batch_size 4 --train_group_size 3 --learning_rate 1e-4 \
    --query_max_len 10 --passage_max_len 15 --max_steps 3 --logging_steps 1 --save_strategy no \
    --overwrite_output_dir --dataset_cache_dir "$out/cache-dec" "$@" 2> "$out/$label.log" \
    || { tail -5 "$out/$label.log"; exit 1; }; }
dec mcpu --device cpu
dec mgpu --device "$dev0"
same_losses mcpu cpu mgpu gpu "GPU LoRA training of a decoder differs from CPU training with the same seed"
dec mgpuf --device "$dev0" --attn_implementation flash_attention_2
same_losses mcpu cpu mgpuf "gpu, fused attention" "GPU LoRA training with the fused attention differs from CPU training"
[ -z "$kernels_failed" ] || { echo "FAIL: our kernels differ from the CPU (the first part)"; exit 1; }
echo "gpu-check: all checks passed"
