"""One table row of a quality benchmark from `tevatron eval --json` output: nDCG@10 and
recall@100, the seconds when given, and, given a run and the exact search's run (both
`qid<TAB>docid<TAB>score`), the mean share of each query's exact top 100 that the run's top 100
holds (recall@100 against exact search, the figure compact search is judged by).

    python3 metrics_row.py METRICS_JSON LABEL [SECONDS [RUN EXACT_RUN]]
"""
import json
import sys
from collections import defaultdict

m = json.load(open(sys.argv[1]))
m = m.get("all", m)


def get(k):
    return next(v for n, v in m.items() if n.lower().replace("_cut_", "@").startswith(k))


def top100(path):
    ranked = defaultdict(list)
    for line in open(path):
        qid, docid, score = line.split("\t")
        ranked[qid].append((-float(score), docid))
    return {q: {d for _, d in sorted(r)[:100]} for q, r in ranked.items()}


row = f"{sys.argv[2]:<24} {get('ndcg@10'):9.4f} {get('recall@100'):10.4f}"
if len(sys.argv) > 3:
    row += f" {float(sys.argv[3]):9.2f}"
if len(sys.argv) > 5:
    run, exact = top100(sys.argv[4]), top100(sys.argv[5])
    if not exact:
        sys.exit(f"{sys.argv[5]}: the exact run is empty")
    share = sum(len(run.get(q, set()) & e) / len(e) for q, e in exact.items()) / len(exact)
    row += f" {share:15.4f}"
print(row)
