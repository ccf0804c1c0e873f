"""One table row of a quality benchmark from `tevatron eval --json` output: nDCG@10 and
recall@100, and the seconds when given.

    python3 metrics_row.py METRICS_JSON LABEL [SECONDS]
"""
import json
import sys

m = json.load(open(sys.argv[1]))
m = m.get("all", m)


def get(k):
    return next(v for n, v in m.items() if n.lower().replace("_cut_", "@").startswith(k))


row = f"{sys.argv[2]:<24} {get('ndcg@10'):9.4f} {get('recall@100'):10.4f}"
if len(sys.argv) > 3:
    row += f" {float(sys.argv[3]):9.2f}"
print(row)
