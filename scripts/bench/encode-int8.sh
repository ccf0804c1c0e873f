#!/usr/bin/env bash
# Encode throughput in F32, bf16 and int8, ours against sentence-transformers (PyTorch F32, and
# bf16 weights where PyTorch runs bf16 products) and ONNX Runtime (F32, and int8 by dynamic
# quantization), same machine, same passages, same run, 2 threads each. Ours --bf16 runs bf16
# products only on a CPU with AMX-BF16, or AVX-512 BF16 except on Intel's (F32 elsewhere, as
# its log says).
#   scripts/bench/encode-int8.sh [N]   (default 512 InsuranceQA answers; REPEAT=2 runs each twice)
# The ONNX models are made by a committed step below: torch.onnx.export of the transformers
# model, then onnxruntime.quantization.quantize_dynamic (weights int8 per output channel,
# activations u8 per tensor at run time): the int8 scheme closest to ours (weights int8 per
# channel, activations int8 per token; docs/int8.md).
# Ours: the whole command (process start, model load and quantization, encode, write). The
# peers: tokenization, the model and mean pooling + normalisation, after the model is loaded.
# Data: InsuranceQA (scripts/fetch-insuranceqa.sh). Python: .cache/bench-venv (torch,
# sentence-transformers, onnx, onnxruntime, onnxscript), made here when missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
n=${1:-512}
work=$root/.cache/bench-int8
mkdir -p "$work"
cargo build --release -q -p tevatron-cli
bin=$root/target/release/tevatron
model=$(scripts/fetch-minilm.sh)
data=${INSURANCEQA:-$(scripts/fetch-insuranceqa.sh "$bin")}
venv=${TEVATRON_BENCH_VENV:-$root/.cache/bench-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch sentence-transformers onnx onnxruntime onnxscript
fi
py=$venv/bin/python
head -n "$n" "$data/corpus.jsonl" > "$work/passages.jsonl"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); int8 and bf16 flags: $(grep -m1 -o -w -E 'avx512_vnni|avx_vnni|avx512_bf16|amx_int8|amx_bf16' /proc/cpuinfo | sort -u | xargs || true)"
# The ONNX models (once).
if [ ! -f "$work/int8.onnx" ]; then
  OMP_NUM_THREADS=2 "$py" - "$model" "$work" <<'PY'
import sys, torch
from transformers import AutoModel, AutoTokenizer
from onnxruntime.quantization import QuantType, quantize_dynamic
model_dir, work = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(model_dir)

class Hidden(torch.nn.Module):  # the transformers model with its inputs by name
    def __init__(self, m):
        super().__init__(); self.m = m
    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.m(input_ids=input_ids, attention_mask=attention_mask,
                      token_type_ids=token_type_ids).last_hidden_state
m = Hidden(AutoModel.from_pretrained(model_dir).eval())
x = tok(["an example passage"] * 2, return_tensors="pt", padding="max_length", max_length=16)
names = ["input_ids", "attention_mask", "token_type_ids"]
axes = {k: {0: "batch", 1: "len"} for k in names}
axes["last_hidden_state"] = {0: "batch", 1: "len"}
torch.onnx.export(m, tuple(x[k] for k in names), f"{work}/f32.onnx", input_names=names,
                  output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17,
                  dynamo=False)
quantize_dynamic(f"{work}/f32.onnx", f"{work}/int8.onnx", weight_type=QuantType.QInt8,
                 per_channel=True)
PY
fi
runs=${REPEAT:-1}
: > "$work/times.txt"
for r in $(seq "$runs"); do
  for flag in "" --bf16 --int8; do
    start=$(date +%s.%N)
    RAYON_NUM_THREADS=2 "$bin" encode --model_name_or_path "$model" --dataset_path "$work/passages.jsonl" \
      --encode_output_path "$work/ours${flag}.safetensors" --passage_max_len 128 \
      --per_device_eval_batch_size 64 --device cpu --quiet $flag
    t=$(echo "$(date +%s.%N) - $start" | bc)
    printf '%-34s %7.2f s %7.1f passages/s\n' "ours ${flag:-F32}" "$t" "$(echo "$n / $t" | bc -l)"
    echo "ours ${flag:-F32}|$t" >> "$work/times.txt"
  done
  OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 "$py" - "$model" "$work" "$n" <<'PY'
import json, sys, time
import numpy as np, onnxruntime as ort, torch
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer
torch.set_num_threads(2)
model_dir, work, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
texts = [json.loads(l)["text"].strip() for l in open(f"{work}/passages.jsonl")]
def show(label, seconds):
    print(f"{label:<34} {seconds:7.2f} s {n / seconds:7.1f} passages/s")
    with open(f"{work}/times.txt", "a") as f:
        f.write(f"{label}|{seconds}\n")
st = SentenceTransformer(model_dir, device="cpu"); st.max_seq_length = 128
t = time.perf_counter(); st.encode(texts, batch_size=64); show("sentence-transformers F32", time.perf_counter() - t)
st = SentenceTransformer(model_dir, device="cpu", model_kwargs={"torch_dtype": torch.bfloat16}); st.max_seq_length = 128
t = time.perf_counter(); st.encode(texts, batch_size=64); show("sentence-transformers bf16", time.perf_counter() - t)
tok = AutoTokenizer.from_pretrained(model_dir)
for name in ("f32", "int8"):
    so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.inter_op_num_threads = 1
    s = ort.InferenceSession(f"{work}/{name}.onnx", so, providers=["CPUExecutionProvider"])
    t = time.perf_counter()
    out = []
    for i in range(0, len(texts), 64):
        x = tok(texts[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="np")
        h = s.run(None, {k: x[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})[0]
        m = x["attention_mask"][..., None].astype(np.float32)
        e = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
        out.append(e / np.linalg.norm(e, axis=1, keepdims=True))
    show(f"ONNX Runtime {name.upper()}", time.perf_counter() - t)
    np.save(f"{work}/ort-{name}.npy", np.concatenate(out))
PY
done
"$py" - "$work" <<'PY'
import sys, numpy as np
from safetensors.numpy import load_file
w = sys.argv[1]
f = load_file(f"{w}/ours.safetensors")["embeddings"]
cos = lambda a, b: (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
for label, e in (("ours bf16", load_file(f"{w}/ours--bf16.safetensors")["embeddings"]),
                 ("ours int8", load_file(f"{w}/ours--int8.safetensors")["embeddings"]),
                 ("ONNX Runtime F32", np.load(f"{w}/ort-f32.npy")),
                 ("ONNX Runtime int8", np.load(f"{w}/ort-int8.npy"))):
    c = cos(f, e)
    print(f"cosine to our F32, {label:<18} min {c.min():.5f} mean {c.mean():.5f}")
best = {}
for line in open(f"{w}/times.txt"):
    label, t = line.rsplit("|", 1)
    best[label] = min(best.get(label, 1e30), float(t))
runs = sum(1 for line in open(f"{w}/times.txt") if line.startswith("ours F32|"))
for ours, peer in (("ours F32", "sentence-transformers F32"), ("ours F32", "ONNX Runtime F32"),
                   ("ours --bf16", "ours F32"), ("ours --bf16", "sentence-transformers bf16"),
                   ("ours --int8", "ONNX Runtime INT8"), ("ours --int8", "ours F32")):
    print(f"speed {ours} / {peer}: {best[peer] / best[ours]:.2f}x (best of {runs} runs)")
PY
