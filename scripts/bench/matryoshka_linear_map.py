"""Can a learned linear map put a frozen model's retrieval quality into the first quarter of its
dimensions? A 384 x 384 map (identity at the start) is trained on round 1's embeddings of the
InsuranceQA recipe with the Matryoshka loss (widths 384, 192, 96; in-batch and three mined
negatives per question, temperature 0.05, Adam), then applied to the dev questions and answers;
runs at 384 and 96 dimensions are written for `tevatron eval` (docs/compact.md has the figures).

From the repository root, with torch and safetensors installed:

    scripts/recipe-insuranceqa.sh   # round 1, its dev answers' and training questions' vectors
    r=runs/recipe-insuranceqa; mkdir -p OUT_DIR
    tevatron encode --model_name_or_path $r/round1/model --dataset_path $r/data/eval.queries.jsonl \
      --encode_is_query --encode_output_path OUT_DIR/dev.safetensors --query_max_len 32
    python3 scripts/bench/matryoshka_linear_map.py OUT_DIR/dev.safetensors LEARNING_RATE EPOCHS OUT_DIR
    tevatron eval --qrels $r/data/eval.qrels.tsv --run OUT_DIR/run-96.tsv -m ndcg@10

EPOCHS 0 leaves the identity: the plain cut, for comparison. Each question trains with its
positive and its first three mined negatives.
"""
import json
import sys

import torch
from safetensors.numpy import load_file

dev_path, lr, epochs, out = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
torch.manual_seed(0)
recipe = "runs/recipe-insuranceqa"


def load(path):
    t = load_file(path)
    return torch.tensor(t["embeddings"]), bytes(t["ids"]).decode().split("\n")


corpus, corpus_ids = load(f"{recipe}/round1/eval/corpus.safetensors")
questions, question_ids = load(f"{recipe}/round1/mine-embeddings/reranker.train.queries.safetensors")
dev, dev_ids = load(dev_path)
at = {c: i for i, c in enumerate(corpus_ids)}
question_at = {q: i for i, q in enumerate(question_ids)}
rows = [json.loads(line) for line in open(f"{recipe}/reranker/mined.jsonl")]
rows = [r for r in rows if len(r["negative_document_ids"]) >= 3]
q_index = torch.tensor([question_at[r["query_id"]] for r in rows])
groups = torch.tensor(
    [[at[r["positive_document_ids"][0]]] + [at[n] for n in r["negative_document_ids"][:3]] for r in rows]
)
width = corpus.shape[1]
widths = [width, width // 2, width // 4]
W = torch.nn.Parameter(torch.eye(width))
opt = torch.optim.Adam([W], lr=lr)


def rep(x, k):
    return torch.nn.functional.normalize((x @ W)[:, :k], dim=-1)


for epoch in range(epochs):
    total = 0.0
    order = torch.randperm(len(rows))
    for b in range(0, len(rows), 64):
        i = order[b : b + 64]
        q, p = questions[q_index[i]], corpus[groups[i].reshape(-1)]
        target = torch.arange(len(i)) * groups.shape[1]
        loss = sum(
            torch.nn.functional.cross_entropy(rep(q, k) @ rep(p, k).T / 0.05, target) for k in widths
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item()
    print(f"epoch {epoch}: loss {total:.1f}", file=sys.stderr)

with torch.no_grad():
    for k in (widths[0], widths[2]):
        top = torch.topk(rep(dev, k) @ rep(corpus, k).T, 100, dim=1)
        with open(f"{out}/run-{k}.tsv", "w") as f:
            for a, qid in enumerate(dev_ids):
                for score, j in zip(top.values[a].tolist(), top.indices[a].tolist()):
                    f.write(f"{qid}\t{corpus_ids[j]}\t{score}\n")
