#!/usr/bin/env bash
# Compact search speed and recall: ours (tevatron index + search --quantize int8|binary with
# exact rescoring) against exact F32 search and faiss' IndexScalarQuantizer (8-bit) and
# IndexBinaryFlat, and our HNSW (USearch) against faiss' IndexHNSWFlat with the same M and ef,
# same machine, same run, same random unit vectors, 2 threads each.
#   scripts/bench/compact.sh              (100k x 384, 1,000 queries, depth 100)
#   SIZES="c100k c1m" HNSW=0 scripts/bench/compact.sh   (both sizes, no graphs)
# Each line: build seconds (ours: tevatron index; faiss: train + add), search seconds (the whole
# process: load, scan, rescore, write), peak RSS of the search, index size, and recall@100
# against our exact F32 ranking. Rescoring multiplier: MULT (default 4) for int8 and BMULT
# (default 10) for binary; faiss' quantizers return their own top 100 without rescoring.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
work=$root/.cache/bench-search
mkdir -p "$work"
cargo build --release -q -p tevatron-cli
venv=${TEVATRON_BENCH_VENV:-$root/.cache/bench-venv-search}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q numpy faiss-cpu safetensors pytrec-eval-terrier
fi
py=$venv/bin/python
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE || true
export OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 RAYON_NUM_THREADS=2
sizes=${SIZES:-c100k}
mult=${MULT:-4}
bmult=${BMULT:-10}
# HNSW, ours and faiss alike: M, ef_construction, ef_search; ours rescores HMULT x depth.
# HNSW=0 leaves the graphs out (their build grows about as n^1.8 on random vectors: minutes at
# 100k, hours at 1M on 2 cores).
# HNSW_DTYPES (default f32): the graph's vectors (--hnsw_dtype), one graph of ours for each.
hnsw_m=${HNSW_M:-32} hnsw_efc=${HNSW_EFC:-128} hnsw_ef=${HNSW_EF:-128} hmult=${HMULT:-1}
hnsw=${HNSW:-1} hnsw_dtypes=${HNSW_DTYPES:-f32}
bin=target/release/tevatron
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) (family $(grep -m1 'cpu family' /proc/cpuinfo | cut -d: -f2 | xargs), model $(grep -m1 -P '^model\t' /proc/cpuinfo | cut -d: -f2 | xargs)); $(grep -m1 -o -w -E 'avx512_vnni' /proc/cpuinfo || echo 'no VNNI')"
"$py" - "$work" $sizes <<'PY'
import os, sys, numpy as np
from safetensors.numpy import save_file
work, sizes = sys.argv[1], sys.argv[2:]
n_of = {"c100k": 100_000, "c1m": 1_000_000}
def write(name, n, seed):
    if os.path.exists(f"{work}/{name}.npy"):
        return
    x = np.random.default_rng(seed).standard_normal((n, 384), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = "\n".join(str(i) for i in range(n)).encode()
    save_file({"embeddings": x, "ids": np.frombuffer(ids, dtype=np.uint8)}, f"{work}/{name}.safetensors")
    np.save(f"{work}/{name}.npy", x)
write("queries", 1000, 0)
for s in sizes:
    write(s, n_of[s], 1)
PY
timed() {  # label command...: runs it, leaves "seconds rss_mb" in $work/t
  /usr/bin/time -f "%e %M" -o "$work/t.raw" "$@" > /dev/null
  read -r s kb < "$work/t.raw"; echo "$s $((kb / 1024))" > "$work/t"
}
recall() {  # our ranking (safetensors) vs the exact one: recall@100
  "$py" - "$work/exact.ranking" "$1" <<'PY'
import sys
from safetensors.numpy import load_file
def top(p):
    t = load_file(p); d = bytes(t["docids"]).decode().split("\n"); k = t["scores"].shape[1]
    return [set(d[i * k:(i + 1) * k]) for i in range(t["scores"].shape[0])]
a, b = top(sys.argv[1]), top(sys.argv[2])
print(f"{sum(len(x & y) for x, y in zip(a, b)) / sum(len(x) for x in a):.4f}")
PY
}
row() { printf '%-8s %-30s %8s %8s %8s %9s %8s\n' "$@"; }
row corpus method "build s" "search s" "RSS MB" "index MB" recall@100
for c in $sizes; do
  search=(search --query_reps "$work/queries.safetensors" --passage_reps "$work/$c.safetensors"
    --depth 100 --batch_size 0 --quiet)
  timed "$bin" "${search[@]}" --save_ranking_to "$work/exact.ranking"
  read -r s m < "$work/t"
  row "$c" "ours exact F32" - "$s" "$m" $(( $(stat -c %s "$work/$c.safetensors") / 1048576 )) 1.0000
  for q in int8 binary; do
    k=$mult; [ "$q" = binary ] && k=$bmult
    rm -rf "$work/idx-$c"
    timed "$bin" index --passage_reps "$work/$c.safetensors" --quantize "$q" --output_dir "$work/idx-$c" --quiet
    read -r b _ < "$work/t"
    timed "$bin" "${search[@]}" --quantize "$q" --compact_reps "$work/idx-$c/$c.$q.safetensors" \
      --rescore_multiplier "$k" --save_ranking_to "$work/$q.ranking"
    read -r s m < "$work/t"
    row "$c" "ours $q + rescore x$k" "$b" "$s" "$m" $(( $(stat -c %s "$work/idx-$c/$c.$q.safetensors") / 1048576 )) "$(recall "$work/$q.ranking")"
  done
  if [ "$hnsw" = 1 ]; then
    for dt in $hnsw_dtypes; do
      timed "$bin" index --passage_reps "$work/$c.safetensors" --hnsw --hnsw_m "$hnsw_m" \
        --hnsw_ef_construction "$hnsw_efc" --hnsw_dtype "$dt" --output_dir "$work/idx-$c" --quiet
      read -r b _ < "$work/t"
      timed "$bin" "${search[@]}" --hnsw --compact_reps "$work/idx-$c/$c.hnsw.json" \
        --hnsw_ef_search "$hnsw_ef" --rescore_multiplier "$hmult" --save_ranking_to "$work/hnsw.ranking"
      read -r s m < "$work/t"
      row "$c" "ours HNSW $dt + rescore x$hmult" "$b" "$s" "$m" $(( $(stat -c %s "$work/idx-$c/$c.hnsw.usearch") / 1048576 )) "$(recall "$work/hnsw.ranking")"
    done
  fi
  "$py" - "$work" "$c" "$hnsw_m" "$hnsw_efc" "$hnsw_ef" "$hnsw" <<'PY'
import sys, time, resource, numpy as np, faiss
from safetensors.numpy import load_file
faiss.omp_set_num_threads(2)
work, c = sys.argv[1], sys.argv[2]
t = load_file(f"{work}/exact.ranking"); k = t["scores"].shape[1]
d = bytes(t["docids"]).decode().split("\n")
exact = [set(map(int, d[i * k:(i + 1) * k])) for i in range(t["scores"].shape[0])]
q, x = np.load(f"{work}/queries.npy"), np.load(f"{work}/{c}.npy")
def recall(idx):
    return sum(len(e & set(r.tolist())) for e, r in zip(exact, idx)) / sum(map(len, exact))
def report(name, build, search, index_bytes, idx):
    print(f"{c:<8} {name:<30} {build:8.2f} {search:8.2f} {'-':>8} {index_bytes // 1048576:9d} {recall(idx):8.4f}")
t0 = time.perf_counter(); flat = faiss.IndexFlatIP(384); flat.add(x); t1 = time.perf_counter()
_, idx = flat.search(q, 100); t2 = time.perf_counter()
report("faiss IndexFlatIP", t1 - t0, t2 - t1, x.nbytes, idx)
t0 = time.perf_counter()
sq = faiss.IndexScalarQuantizer(384, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
sq.train(x); sq.add(x); t1 = time.perf_counter()
_, idx = sq.search(q, 100); t2 = time.perf_counter()
report("faiss SQ8", t1 - t0, t2 - t1, sq.sa_code_size() * x.shape[0], idx)
t0 = time.perf_counter()
bx = faiss.IndexBinaryFlat(384); bx.add(np.packbits(x > 0, axis=1)); t1 = time.perf_counter()
_, idx = bx.search(np.packbits(q > 0, axis=1), 100); t2 = time.perf_counter()
report("faiss IndexBinaryFlat", t1 - t0, t2 - t1, x.shape[0] * 48, idx)
m, efc, ef, hnsw = (int(v) for v in sys.argv[3:7])
if not hnsw:
    sys.exit(0)
t0 = time.perf_counter()
hn = faiss.IndexHNSWFlat(384, m, faiss.METRIC_INNER_PRODUCT)
hn.hnsw.efConstruction = efc; hn.add(x); t1 = time.perf_counter()
hn.hnsw.efSearch = ef
_, idx = hn.search(q, 100); t2 = time.perf_counter()
report("faiss IndexHNSWFlat", t1 - t0, t2 - t1, x.nbytes + hn.ntotal * m * 2 * 4, idx)
PY
done
echo "(faiss times are in-process, without loading the vectors; ours are whole processes)"
