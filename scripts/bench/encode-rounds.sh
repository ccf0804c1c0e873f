#!/usr/bin/env bash
# Encode speed, ours against sentence-transformers, in interleaved rounds: each round runs our
# whole `encode` command (process start, model load, encode, write) on N InsuranceQA answers,
# then sentence-transformers' `encode` of the same texts in one Python process (its model
# loaded once, outside the timing), 2 threads each; it prints each round's ratio and the median
# of the rounds' ratios. On a VM whose speed moves from minute to minute (host load), a ratio
# of runs made one right after the other holds up better than best against best
# (scripts/bench/encode-int8.sh).
#   scripts/bench/encode-rounds.sh [ROUNDS] [N]   (default 10 rounds, 512 answers)
#   PRECISION=bf16 (default; ours --bf16, sentence-transformers with bf16 weights) or f32
# Each round also prints the CPU time the host took from this VM during it (steal, from
# /proc/stat, in 1/100 s), the usual cause of a slow round.
# Data: InsuranceQA (scripts/fetch-insuranceqa.sh). Python: .cache/bench-venv (torch,
# sentence-transformers), made here when missing.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
rounds=${1:-10}
n=${2:-512}
precision=${PRECISION:-bf16}
case "$precision" in bf16 | f32) ;; *) echo "PRECISION must be bf16 or f32" >&2; exit 2 ;; esac
work=$root/.cache/bench-rounds
mkdir -p "$work"
cargo build --release -q -p tevatron-cli
bin=$root/target/release/tevatron
model=$(scripts/fetch-minilm.sh)
data=${INSURANCEQA:-$(scripts/fetch-insuranceqa.sh "$bin")}
venv=${TEVATRON_BENCH_VENV:-$root/.cache/bench-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch sentence-transformers
fi
head -n "$n" "$data/corpus.jsonl" > "$work/passages.jsonl"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $precision, $n passages, $rounds rounds"
OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 "$venv/bin/python" - "$bin" "$model" "$work" "$precision" "$rounds" <<'PY'
import json, os, statistics, subprocess, sys, time
import torch
from sentence_transformers import SentenceTransformer
bin_, model_dir, work, precision, rounds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
torch.set_num_threads(2)
texts = [json.loads(l)["text"].strip() for l in open(f"{work}/passages.jsonl")]
kwargs = {"model_kwargs": {"torch_dtype": torch.bfloat16}} if precision == "bf16" else {}
st = SentenceTransformer(model_dir, device="cpu", **kwargs)
st.max_seq_length = 128
st.encode(texts[:64], batch_size=64)  # warm-up
command = [bin_, "encode", "--model_name_or_path", model_dir, "--dataset_path", f"{work}/passages.jsonl",
           "--encode_output_path", f"{work}/ours.safetensors", "--passage_max_len", "128",
           "--per_device_eval_batch_size", "64", "--device", "cpu", "--quiet"]
if precision == "bf16":
    command.append("--bf16")
def steal():
    return int(open("/proc/stat").readline().split()[8])
ours, peer, ratios = [], [], []
for r in range(rounds):
    s0, t = steal(), time.perf_counter()
    subprocess.run(command, check=True, env=dict(os.environ, RAYON_NUM_THREADS="2"))
    a, s1 = time.perf_counter() - t, steal()
    t = time.perf_counter()
    st.encode(texts, batch_size=64)
    p, s2 = time.perf_counter() - t, steal()
    ours.append(a); peer.append(p); ratios.append(p / a)
    print(f"round {r + 1}: ours {a:.2f} s (steal {s1 - s0}), sentence-transformers {p:.2f} s "
          f"(steal {s2 - s1}), ratio {p / a:.2f}x", flush=True)
n = len(texts)
print(f"median: ours {statistics.median(ours):.2f} s ({n / statistics.median(ours):.1f} passages/s), "
      f"sentence-transformers {statistics.median(peer):.2f} s ({n / statistics.median(peer):.1f})")
print(f"speed ours / sentence-transformers {precision}: median of the rounds' ratios "
      f"{statistics.median(ratios):.2f}x (from {min(ratios):.2f}x to {max(ratios):.2f}x); "
      f"best against best {min(peer) / min(ours):.2f}x")
PY
