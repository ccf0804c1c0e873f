#!/usr/bin/env bash
# Peak memory of `tevatron mine` at MS MARCO's size: 8.8M passages of 384-d F32 embeddings
# (13.5 GB, memory-mapped) and 500k training queries, random unit vectors, with
# --drop_same_text over a corpus file of 8.8M short passages. Exact search of 500k queries over
# 8.8M passages is 3.4 PFLOP (days on 2 cores), so the two sides are measured apart:
#   corpus side:  all 8.8M passages, the first 2,048 training queries (two chunks of 1,024);
#   query side:   all 500k training queries over the first 20,000 passages;
# each with the full query embeddings file. What a run holds for the corpus (the id index, the
# passage ids, the corpus text index) does not grow with the queries, and what it holds for the
# queries (rows, positives, the query id table) does not grow with the corpus; a chunk's search
# buffers are fixed by --batch_size. So the full run's anonymous peak is at most the sum of the
# two anonymous peaks (the query side's corpus part counted twice).
#   scripts/bench/mine-memory.sh   (N_PASSAGES, N_QUERIES to change the sizes; ~20 GB of disk)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
work=${TEVATRON_BENCH_WORK:-$root/.cache/bench/mine}
mkdir -p "$work"
n_passages=${N_PASSAGES:-8800000}
n_queries=${N_QUERIES:-500000}
cargo build --release -q -p tevatron-cli
venv=${TEVATRON_BENCH_VENV:-$root/.cache/bench-venv-mine}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q numpy
fi
"$venv/bin/python" - "$work" "$n_passages" "$n_queries" <<'PY'
import json, os, random, struct, sys
import numpy as np
work, n_passages, n_queries = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
dim, rng = 384, np.random.default_rng(0)

def write_vectors(path, n, prefix):
    """A safetensors file as `tevatron encode` writes it, streamed in blocks of rows."""
    if os.path.exists(path):
        return
    ids = "\n".join(f"{prefix}{i}" for i in range(n)).encode()
    emb = n * dim * 4
    header = {"embeddings": {"dtype": "F32", "shape": [n, dim], "data_offsets": [0, emb]},
              "ids": {"dtype": "U8", "shape": [len(ids)], "data_offsets": [emb, emb + len(ids)]}}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for start in range(0, n, 1 << 18):
            x = rng.standard_normal((min(1 << 18, n - start), dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            f.write(x.tobytes())
        f.write(ids)
    os.rename(path + ".tmp", path)

write_vectors(f"{work}/passages.safetensors", n_passages, "p")
write_vectors(f"{work}/passages-20k.safetensors", 20000, "p")
write_vectors(f"{work}/queries.safetensors", n_queries, "q")
if not os.path.exists(f"{work}/corpus.jsonl"):
    with open(f"{work}/corpus.jsonl.tmp", "w") as f:
        for i in range(n_passages):
            f.write(f'{{"docid":"p{i}","text":"synthetic passage number {i}"}}\n')
    os.rename(f"{work}/corpus.jsonl.tmp", f"{work}/corpus.jsonl")
r = random.Random(0)
def train(path, n, positives_below):
    if os.path.exists(path):
        return
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"query_id": f"q{i}", "query_text": f"synthetic question {i}",
                                "positive_document_ids": [f"p{r.randrange(positives_below)}"],
                                "negative_document_ids": []}) + "\n")
train(f"{work}/train-10.jsonl", 10, 20000)
train(f"{work}/train-2048.jsonl", 2048, n_passages)
train(f"{work}/train-all.jsonl", n_queries, 20000)
PY
source "$root/scripts/bench/peak.sh"
mine() {  # label training-file passages
  peak "$1" target/release/tevatron mine --query_reps "$work/queries.safetensors" \
    --passage_reps "$3" --dataset_path "$2" --corpus_path "$work/corpus.jsonl" \
    --dataset_cache_dir "$work/cache" --drop_same_text --depth 100 --range_min 3 \
    --num_negatives 15 --output_path "$work/$1.mined.jsonl" --quiet
}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
# The corpus index is built once into the cache; a first untimed run builds it.
[ -d "$work/cache" ] || mine index "$work/train-10.jsonl" "$work/passages-20k.safetensors" > /dev/null
echo "| run | peak RSS | of it anonymous (peak) | of it mapped files (peak) | wall time |"
echo "|---|---|---|---|---|"
du -b "$work/passages.safetensors" | awk '{printf "| (passage embeddings file) | %.0f MB | | | |\n", $1 / 1048576}'
mine corpus-side "$work/train-2048.jsonl" "$work/passages.safetensors"
mine query-side "$work/train-all.jsonl" "$work/passages-20k.safetensors"
