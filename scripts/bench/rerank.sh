#!/usr/bin/env bash
# Rerank throughput, ours vs sentence-transformers' CrossEncoder.predict, same machine, same run,
# 2 threads each, on the same pairs and the same model.
#   scripts/bench/rerank.sh [N_QUERIES]   (default 20 dev questions x 50 answers = 1,000 pairs)
# Model: all-MiniLM-L6-v2 with a seeded one-logit head (BertForSequenceClassification, saved by
# transformers with activation_fn identity, so both sides return the raw logit). Pairs: InsuranceQA
# dev questions, each with its judged answers and random others, as (question, answer) text pairs
# (sentence-transformers' form; ours with --pair_format pair), at most 256 tokens, batch 32, fp32.
# Our time is the whole command (process start, model load, reading, scoring, writing);
# sentence-transformers' is the predict() call alone: a conservative comparison for us. The script
# also prints the largest score difference between the two.
#   PRECISION=bf16 scripts/bench/rerank.sh   both in bf16: ours --bf16 (bf16 products on a CPU with
#                                            AMX-BF16 or AVX-512 BF16, docs/bf16.md; F32 elsewhere), the
#                                            CrossEncoder's model loaded in bfloat16
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
# PRECISION: f32 (the default; fp32 also accepted) or bf16, as train.sh takes it.
case ${PRECISION:-f32} in
  f32 | fp32) precision=fp32; ours_precision=() ;;
  bf16) precision=bf16; ours_precision=(--bf16) ;;
  *) echo "PRECISION is f32 or bf16, not $PRECISION" >&2; exit 2 ;;
esac
work=$root/.cache/bench/rerank
mkdir -p "$work"
model=$(scripts/fetch-minilm.sh)
cargo build --release -q -p tevatron-cli
data=${INSURANCEQA:-$(scripts/fetch-insuranceqa.sh)}
venv=${TEVATRON_BENCH_VENV:-$root/.cache/bench-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch transformers sentence-transformers
fi
py=$venv/bin/python
"$py" - "$model" "$data" "$work" "${1:-20}" <<'PY'
import json, random, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model, data, work, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.manual_seed(0)
m = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1)
m.config.sentence_transformers = {"activation_fn": "torch.nn.modules.linear.Identity"}
m.save_pretrained(f"{work}/model")
AutoTokenizer.from_pretrained(model).save_pretrained(f"{work}/model")
corpus = [json.loads(l) for l in open(f"{data}/corpus.jsonl")]
queries = [json.loads(l) for l in open(f"{data}/queries.dev.jsonl")][:n]
qrels = {}
for l in open(f"{data}/qrels.dev.tsv"):
    q, _, d, _ = l.split()
    qrels.setdefault(q, []).append(d)
text = {c["docid"]: c["text"] for c in corpus}
rng = random.Random(13)
with open(f"{work}/pairs.jsonl", "w") as f:
    for q in queries:
        docs = qrels.get(q["query_id"], [])[:10]
        docs += [c["docid"] for c in rng.sample(corpus, 50 - len(docs))]
        for d in docs:
            f.write(json.dumps({"query_id": q["query_id"], "query": q["query"], "docid": d, "title": "", "text": text[d]}) + "\n")
PY
n=$(wc -l < "$work/pairs.jsonl")
start=$(date +%s.%N)
RAYON_NUM_THREADS=2 target/release/tevatron rerank --model_name_or_path "$work/model" --dataset_path "$work/pairs.jsonl" \
  --pair_format pair --rerank_max_len 256 --per_device_eval_batch_size 32 --rerank_output_path "$work/ours.txt" --quiet \
  --device cpu \
  ${ours_precision[@]+"${ours_precision[@]}"}
ours=$(echo "$(date +%s.%N) - $start" | bc)
OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 "$py" - "$work" "$n" "$ours" "$precision" <<'PY'
import json, sys, time
import torch
torch.set_num_threads(2)
from sentence_transformers import CrossEncoder
work, n, ours, precision = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
rows = [json.loads(l) for l in open(f"{work}/pairs.jsonl")]
kwargs = {"model_kwargs": {"torch_dtype": torch.bfloat16}} if precision == "bf16" else {}
ce = CrossEncoder(f"{work}/model", device="cpu", max_length=256, **kwargs)
pairs = [(r["query"], r["text"]) for r in rows]
t = time.perf_counter(); scores = ce.predict(pairs, batch_size=32); theirs = time.perf_counter() - t
got = {}
for l in open(f"{work}/ours.txt"):
    q, d, s = l.split("\t"); got[(q, d)] = float(s)
diff = max(abs(got[(r["query_id"], r["docid"])] - float(s)) for r, s in zip(rows, scores))
print(f"rerank {precision}: {n} pairs | ours {ours:.1f} s = {n / ours:.1f} pairs/s | CrossEncoder.predict {theirs:.1f} s = "
      f"{n / theirs:.1f} pairs/s | ratio {theirs / ours:.2f}x | max score difference {diff:.2e}")
PY
