#!/usr/bin/env bash
# The quality cost of `encode --int8` and `encode --bf16` on the CPU on real data:
# all-MiniLM-L6-v2 (zero-shot) over the full InsuranceQA dev set (2,000 questions, 27,413
# answers), encoded in F32, bf16 and int8 (queries and corpus alike), searched exactly and
# evaluated with tevatron eval (nDCG@10, recall@100); also how close the bf16 and int8
# embeddings are to the F32 ones (cosine, min and mean). --bf16 computes bf16 products only on
# a CPU with AMX-BF16, or AVX-512 BF16 except on Intel's, so elsewhere it is left out.
#   scripts/bench/int8-quality.sh
# MODEL=path/to/model scores another model. Embeddings are kept in .cache/int8-quality (the F32
# ones may be copied from .cache/compact-quality, made by the same command).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
cargo build --release -q -p tevatron-cli
bin=$root/target/release/tevatron
data=$("$root/scripts/fetch-insuranceqa.sh" "$bin")
model=${MODEL:-$("$root/scripts/fetch-minilm.sh")}
work=$root/.cache/int8-quality
mkdir -p "$work"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); model $model"
# bf16 products need AMX-BF16, or AVX-512 BF16 off Intel's CPUs (docs/bf16.md); elsewhere
# --bf16 would compute in F32 and so is left out.
precisions="f32 int8"
if grep -q -w amx_bf16 /proc/cpuinfo ||
  { grep -q -w avx512_bf16 /proc/cpuinfo && ! grep -q -w GenuineIntel /proc/cpuinfo; }; then
  precisions="f32 bf16 int8"
fi
for precision in $precisions; do
  flag=(--device cpu)
  [ "$precision" = f32 ] || flag+=("--$precision")
  [ -f "$work/$precision.corpus.safetensors" ] ||
    "$bin" encode --model_name_or_path "$model" --dataset_path "$data/corpus.jsonl" \
      --encode_output_path "$work/$precision.corpus.safetensors" --passage_max_len 128 \
      --per_device_eval_batch_size 64 --quiet "${flag[@]}"
  [ -f "$work/$precision.queries.safetensors" ] ||
    "$bin" encode --model_name_or_path "$model" --dataset_path "$data/queries.dev.jsonl" \
      --encode_is_query --encode_output_path "$work/$precision.queries.safetensors" \
      --query_max_len 32 --quiet "${flag[@]}"
done
printf '%-24s %9s %10s\n' encode "nDCG@10" "recall@100"
for precision in $precisions; do
  "$bin" search --query_reps "$work/$precision.queries.safetensors" \
    --passage_reps "$work/$precision.corpus.safetensors" --depth 100 --batch_size 0 \
    --save_ranking_to "$work/$precision.run.tsv" --save_text --quiet
  "$bin" eval --qrels "$data/qrels.dev.tsv" --run "$work/$precision.run.tsv" -m ndcg@10 \
    -m recall@100 --json > "$work/$precision.json"
  python3 "$root/scripts/bench/metrics_row.py" "$work/$precision.json" "$precision"
done
python3 - "$work" $precisions <<'PY'
import struct, sys, json
from array import array
def load(path):  # safetensors F32 "embeddings", without numpy
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n]); e = head["embeddings"]
    a, b = e["data_offsets"]
    v = array("f"); v.frombytes(raw[8 + n + a:8 + n + b])
    return v, e["shape"][1]
for precision, part in [(p, part) for p in sys.argv[2:] if p != "f32" for part in ("queries", "corpus")]:
    (f, d), (q, _) = load(f"{sys.argv[1]}/f32.{part}.safetensors"), load(f"{sys.argv[1]}/{precision}.{part}.safetensors")
    cos = []
    for i in range(0, len(f), d):
        a, b = f[i:i + d], q[i:i + d]
        dot = sum(x * y for x, y in zip(a, b))
        na = sum(x * x for x in a) ** 0.5; nb = sum(y * y for y in b) ** 0.5
        cos.append(dot / (na * nb) if na and nb else 1.0)
    print(f"cosine({precision}, F32) {part}: min {min(cos):.5f} mean {sum(cos) / len(cos):.5f} over {len(cos)} rows")
PY
