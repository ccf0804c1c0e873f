#!/usr/bin/env bash
# GPU checks for a machine with an NVIDIA GPU, PyTorch and transformers but no cargo and no
# network. Run from the repository root with the CUDA binary carried in .device/:
#   .device/tevatron.xz (from scripts/build-cuda.sh, xz-compressed) and .device/tok/ (a BERT
#   tokenizer + config: the all-MiniLM-L6-v2 files without weights).
# It builds a random-weight MiniLM-shaped BERT with transformers, then checks
#   1. CUDA vs CPU parity of our embeddings (f32 max abs <= 1e-4; bf16/f16 cosine >= 0.999 per row),
#   2. encode throughput, ours vs transformers (mean pooling) on the same GPU, f32 and fp16.
# Not covered yet (not built): GPU training and GPU search. Prints every figure.
set -euo pipefail
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out" /tmp/tev
python3 -c 'import lzma, shutil; shutil.copyfileobj(lzma.open(".device/tevatron.xz"), open("/tmp/tev/tevatron", "wb"))'
chmod +x /tmp/tev/tevatron
py=$(command -v python3)
# cuBLAS/cuRAND/NVRTC/cudart from PyTorch's CUDA 13 wheels.
libs=$("$py" -c 'import nvidia, os, glob; print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + "/**/lib*.so*", recursive=True)})))')
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$py" - "$out" <<'PY'
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
    for i in range(20000):
        f.write(json.dumps({"docid": str(i), "text": " ".join(rng.choice(vocab) for _ in range(rng.randint(60, 140)))}) + "\n")
with open(f"{out}/small.jsonl", "w") as f:
    for i in range(256):
        f.write(json.dumps({"docid": str(i), "text": " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 200)))}) + "\n")
PY
T=/tmp/tev/tevatron
enc() { "$T" encode --model_name_or_path "$out/model" --pooling mean --normalize --passage_max_len 128 --quiet "$@"; }
echo "== parity (256 passages of 1 to 200 words, mean pooling, normalized)"
enc --dataset_path "$out/small.jsonl" --device cpu --encode_output_path "$out/cpu.st" --per_device_eval_batch_size 32
enc --dataset_path "$out/small.jsonl" --device cuda --encode_output_path "$out/gpu32.st" --per_device_eval_batch_size 32
enc --dataset_path "$out/small.jsonl" --device cuda --fp16 --encode_output_path "$out/gpu16.st" --per_device_eval_batch_size 32
enc --dataset_path "$out/small.jsonl" --device cuda --bf16 --encode_output_path "$out/gpubf16.st" --per_device_eval_batch_size 32
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
echo "== throughput (20,000 passages of 60-140 words, max 128 tokens, batch 256)"
for flag in "" "--fp16"; do
  start=$(date +%s.%N)
  enc --dataset_path "$out/p.jsonl" --device cuda $flag --encode_output_path "$out/tp.st" --per_device_eval_batch_size 256
  end=$(date +%s.%N)
  "$py" -c "s = $end - $start; print(f'ours ${flag:-fp32}: {s:.2f} s = {20000 / s:.0f} passages/s (whole command)')"
done
"$py" - "$out" <<'PY'
import json, sys, time, torch
from transformers import AutoModel, AutoTokenizer
out = sys.argv[1]
tok = AutoTokenizer.from_pretrained(f"{out}/model")
texts = [json.loads(l)["text"] for l in open(f"{out}/p.jsonl")]
for dtype in (torch.float32, torch.float16):
    model = AutoModel.from_pretrained(f"{out}/model", torch_dtype=dtype).cuda().eval()
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    torch.cuda.synchronize(); t = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(texts), 256):
            b = tok([texts[i] for i in order[s:s + 256]], truncation=True, max_length=128, padding=True, return_tensors="pt").to("cuda")
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            r = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).float().cpu()
    torch.cuda.synchronize(); s = time.perf_counter() - t
    print(f"transformers {dtype}: {s:.2f} s = {len(texts) / s:.0f} passages/s (tokenize + encode, model loaded)")
PY
