#!/usr/bin/env bash
# Encode throughput, ours vs sentence-transformers/PyTorch, same machine, same run, 2 threads each.
#   scripts/bench/encode.sh [N_INSURANCEQA]   (default: the whole InsuranceQA corpus, 27,413 passages)
# Inputs: 4,000 passages of about 128 tokens (InsuranceQA answers joined and cut), and the
# InsuranceQA corpus at its real lengths, both at --passage_max_len 128, batch 64, fp32.
# Our time is the whole command (process start, model load, encode, write); PyTorch's is the
# encode() call alone, after model load: a conservative comparison for us.
# Data: InsuranceQA as scripts/fetch-insuranceqa.sh downloads and converts it (into
# .cache/data/insuranceqa), or INSURANCEQA=/path to a folder already converted.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
work=$root/.cache/bench
mkdir -p "$work"
model=$(scripts/fetch-minilm.sh)
cargo build --release -q -p tevatron-cli
data=${INSURANCEQA:-$(scripts/fetch-insuranceqa.sh)}
venv=${TEVATRON_BENCH_VENV:-$root/.cache/bench-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch sentence-transformers
fi
py=$venv/bin/python
"$py" - "$data/corpus.jsonl" "$work" "${1:-0}" <<'PY'
import json, sys
corpus, work, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = [json.loads(l) for l in open(corpus)]
words = " ".join(r["text"] for r in rows[:20000]).split()
with open(f"{work}/p128.jsonl", "w") as f:  # ~100 words is over 128 word pieces; cut at 128
    for i in range(4000):
        f.write(json.dumps({"docid": str(i), "text": " ".join(words[i * 100:(i + 1) * 100])}) + "\n")
with open(f"{work}/iqa.jsonl", "w") as f:
    for r in rows[: limit or None]:
        f.write(json.dumps(r) + "\n")
PY
for input in p128 iqa; do
  n=$(wc -l < "$work/$input.jsonl")
  start=$(date +%s.%N)
  RAYON_NUM_THREADS=2 target/release/tevatron encode --model_name_or_path "$model" --dataset_path "$work/$input.jsonl" \
    --encode_output_path "$work/$input.ours.safetensors" --passage_max_len 128 --per_device_eval_batch_size 64 --quiet
  ours=$(echo "$(date +%s.%N) - $start" | bc)
  theirs=$(OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 "$py" - "$model" "$work/$input.jsonl" <<'PY'
import json, sys, time
import torch
torch.set_num_threads(2)
from sentence_transformers import SentenceTransformer
m = SentenceTransformer(sys.argv[1], device="cpu"); m.max_seq_length = 128
texts = []
for l in open(sys.argv[2]):
    r = json.loads(l)
    texts.append((r["title"] + " " + r["text"]).strip() if "title" in r else r["text"].strip())
t = time.perf_counter(); m.encode(texts, batch_size=64); print(time.perf_counter() - t)
PY
)
  echo "$input: $n passages | ours $(printf %.1f "$ours") s = $(echo "$n / $ours" | bc -l | xargs printf %.1f) p/s | sentence-transformers $(printf %.1f "$theirs") s = $(echo "$n / $theirs" | bc -l | xargs printf %.1f) p/s | ratio $(echo "$theirs / $ours" | bc -l | xargs printf %.2f)x"
done
