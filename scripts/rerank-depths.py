#!/usr/bin/env python3
"""nDCG@10 when a reranker reorders only the retriever's top K, for several K.

Why: a reranker that helps at the top of the list can hurt deeper down (it promotes candidates
it never saw in training); this shows where, from one reranking at full depth, without scoring
again. The retriever's candidates below K keep their order under the reranked top K.

    scripts/rerank-depths.py RETRIEVER_RUN RERANKED_RUN QRELS [K ...]   (default K: 5 10 20 50 100)

Runs are `qid<TAB>docid<TAB>score` (tevatron search --save_text, tevatron rerank); the reranked run
scores the retriever's top K or more of each query. Evaluated with target/release/tevatron eval.
Standard library only.
"""
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict


def load(path):
    run = defaultdict(dict)
    for number, line in enumerate(open(path), 1):
        fields = line.split()
        if len(fields) != 3:
            sys.exit(f"{path}:{number}: expected qid, docid and score")
        run[fields[0]][fields[1]] = float(fields[2])
    return run


def ranked(scores):
    """Document ids by score, highest first, ties by id descending: the order tevatron eval uses."""
    return sorted(scores, key=lambda d: (scores[d], d), reverse=True)


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    retriever, reranked, qrels = load(sys.argv[1]), load(sys.argv[2]), sys.argv[3]
    depths = [int(k) for k in sys.argv[4:]] or [5, 10, 20, 50, 100]
    binary = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "tevatron")
    orders = {qid: ranked(docs) for qid, docs in retriever.items()}
    deepest = max(depths)
    for qid, order in orders.items():
        missing = [d for d in order[:deepest] if d not in reranked.get(qid, {})]
        if missing:
            sys.exit(f"{sys.argv[2]}: no score for query {qid}, document {missing[0]} (top {deepest})")
    with tempfile.TemporaryDirectory() as tmp:
        for k in [0, *depths]:
            path = os.path.join(tmp, f"top{k}.tsv")
            with open(path, "w") as f:
                for qid, order in orders.items():
                    top = ranked({d: reranked[qid][d] for d in order[:k]})
                    for rank, doc in enumerate(top + order[k:]):
                        f.write(f"{qid}\t{doc}\t{-rank}\n")
            done = subprocess.run([binary, "eval", "--qrels", qrels, "--run", path, "-m", "ndcg@10", "--json"],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"tevatron eval failed: {done.stderr.strip()}")
            out = done.stdout
            label = "the retriever alone" if k == 0 else f"reranked top {k}"
            print(f"{label}: nDCG@10 {json.loads(out)['ndcg@10']:.4f}")


if __name__ == "__main__":
    main()
