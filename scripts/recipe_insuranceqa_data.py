"""The InsuranceQA recipe's data split (scripts/recipe-insuranceqa.sh; also
scripts/reranker-probe-base.sh): the dev questions and answers evaluated on (the quick recipe's
subset of 200 questions over 4,000 answers), the training questions, the held-out training
questions that validate, their answers, and the answers mined over.

python3 recipe_insuranceqa_data.py SRC DST full|quick
"""
import json, random, sys
src, dst, mode = sys.argv[1], sys.argv[2], sys.argv[3]
if mode not in ("full", "quick"):
    sys.exit(f"recipe data: the mode is full or quick, not {mode!r}")
quick = mode == "quick"
# Training questions, validation questions held out after them, the validation answers (their
# positives and others drawn at random), and the answers mined over (0: all).
if quick:
    n_train, n_valid, valid_corpus, mine_corpus = 600, 100, 1000, 4000
else:
    n_train, n_valid, valid_corpus, mine_corpus = 12681, 200, 2000, 0
corpus = [json.loads(l) for l in open(f"{src}/corpus.jsonl")]
def write(name, rows):
    with open(f"{dst}/{name}", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
# Evaluation: the dev set (the quickstart's subset when quick).
queries = [json.loads(l) for l in open(f"{src}/queries.dev.jsonl")]
queries = queries[:200] if quick else queries
qids = {q["query_id"] for q in queries}
qrels = [l.split() for l in open(f"{src}/qrels.dev.tsv") if l.split()[0] in qids]
eval_corpus = corpus
if quick:
    gold = {r[2] for r in qrels}
    others = [c for c in corpus if c["docid"] not in gold]
    keep = gold | {c["docid"] for c in random.Random(13).sample(others, 4000 - len(gold))}
    eval_corpus = [c for c in corpus if c["docid"] in keep]
write("eval.corpus.jsonl", eval_corpus)
write("eval.queries.jsonl", queries)
with open(f"{dst}/eval.qrels.tsv", "w") as f:
    f.writelines(" ".join(r) + "\n" for r in qrels)
# Training questions, and validation questions held out after them.
train = [json.loads(l) for l in open(f"{src}/train.jsonl")]
write("train.jsonl", train[:n_train])
valid = train[n_train:n_train + n_valid]
write("valid.queries.jsonl", [{"query_id": r["query_id"], "query": r["query_text"]} for r in valid])
with open(f"{dst}/valid.qrels.tsv", "w") as f:
    f.writelines(f"{r['query_id']} 0 {d} 1\n" for r in valid for d in r["positive_document_ids"])
vgold = {d for r in valid for d in r["positive_document_ids"]}
vothers = [c for c in corpus if c["docid"] not in vgold]
vkeep = vgold | {c["docid"] for c in random.Random(17).sample(vothers, valid_corpus - len(vgold))}
write("valid.corpus.jsonl", [c for c in corpus if c["docid"] in vkeep])
# The corpus mining searches: all answers, or (quick) the training positives and a sample.
mine = corpus
if mine_corpus:
    tgold = {d for r in train[:n_train] for d in r["positive_document_ids"]}
    tothers = [c for c in corpus if c["docid"] not in tgold]
    tkeep = tgold | {c["docid"] for c in random.Random(19).sample(tothers, mine_corpus - len(tgold))}
    mine = [c for c in corpus if c["docid"] in tkeep]
write("mine.corpus.jsonl", mine)
open(f"{dst}/done", "w").write("ok\n")
