#!/usr/bin/env bash
# Checks that a reranker folder written by `tevatron train-reranker` loads in transformers and in
# sentence-transformers and gives tevatron rerank's scores:
#   transformers' AutoModelForSequenceClassification on Tevatron's format_pair strings against
#   `tevatron rerank --pair_format tevatron`, and sentence-transformers' CrossEncoder.predict on
#   (query, passage) pairs against `tevatron rerank --pair_format pair`.
#   [MAX_LEN=256] scripts/check-reranker.sh MODEL_DIR [RERANK_INPUT.jsonl]
# Without an input, 50 pairs of InsuranceQA dev questions and answers are made (as
# scripts/fetch-insuranceqa.sh fetches them). Needs a virtualenv with torch, transformers and
# sentence-transformers (TEVATRON_BENCH_VENV, default .cache/bench-venv).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo build --release -q -p tevatron-cli --manifest-path "$root/Cargo.toml"
bin=$root/target/release/tevatron
py=${TEVATRON_BENCH_VENV:-$root/.cache/bench-venv}/bin/python
input=${2:-}
if [ -z "$input" ]; then
  data=${INSURANCEQA:-$("$root/scripts/fetch-insuranceqa.sh" "$bin")}
  input=$work/pairs.jsonl
  python3 - "$data" "$input" <<'PY'
import json, sys
data, out = sys.argv[1], sys.argv[2]
corpus = [json.loads(l) for _, l in zip(range(500), open(f"{data}/corpus.jsonl"))]
queries = [json.loads(l) for _, l in zip(range(10), open(f"{data}/queries.dev.jsonl"))]
with open(out, "w") as f:
    for i, q in enumerate(queries):
        for c in corpus[i * 5:(i + 1) * 5]:
            f.write(json.dumps({"query_id": q["query_id"], "query": q["query"], "docid": c["docid"],
                                "title": c.get("title", ""), "text": c["text"]}) + "\n")
PY
fi
"$bin" rerank --model_name_or_path "$model" --dataset_path "$input" --rerank_max_len "${MAX_LEN:-256}" \
  --pair_format tevatron --rerank_output_path "$work/tevatron.txt" --quiet
"$bin" rerank --model_name_or_path "$model" --dataset_path "$input" --rerank_max_len "${MAX_LEN:-256}" \
  --pair_format pair --rerank_output_path "$work/pair.txt" --quiet
"$py" - "$model" "$input" "$work/tevatron.txt" "$work/pair.txt" "${MAX_LEN:-256}" <<'PY'
import json, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from sentence_transformers import CrossEncoder
model, inp, ours_t, ours_p = sys.argv[1:5]
rows = [json.loads(l) for l in open(inp)]
read = lambda p: {(q, d): float(s) for q, d, s in (l.rstrip("\n").split("\t") for l in open(p))}
ours_t, ours_p = read(ours_t), read(ours_p)
def format_pair(query, passage, title, query_prefix, passage_prefix):  # Tevatron's, verbatim
    title = title.replace('-', ' ').strip()
    return f'{query_prefix} {query} {passage_prefix} {title} {passage}'.strip()
m = AutoModelForSequenceClassification.from_pretrained(model).eval()
tok = AutoTokenizer.from_pretrained(model)
texts = [format_pair(r["query"], r["text"], r.get("title", ""), "query:", "passage:") for r in rows]
with torch.no_grad():
    b = tok(texts, padding=True, truncation=True, max_length=int(sys.argv[5]), return_tensors="pt")
    hf = m(**b).logits.flatten().tolist()
ce = CrossEncoder(model, device="cpu", max_length=int(sys.argv[5]))
passages = [(r["title"] + " " + r["text"]) if r.get("title") else r["text"] for r in rows]
st = ce.predict([(r["query"], p) for r, p in zip(rows, passages)]).tolist()
d_hf = max(abs(ours_t[(r["query_id"], r["docid"])] - s) for r, s in zip(rows, hf))
d_st = max(abs(ours_p[(r["query_id"], r["docid"])] - s) for r, s in zip(rows, st))
print(f"{len(rows)} pairs: transformers vs tevatron rerank max |diff| {d_hf:.2e}; "
      f"sentence-transformers CrossEncoder ({type(ce.activation_fn).__name__}) vs --pair_format pair {d_st:.2e}")
PY
