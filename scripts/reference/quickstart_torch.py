"""The quickstart's recipe in PyTorch + transformers, for comparison with `tevatron train`.

Tevatron's algorithm on the same data, hyperparameters and seed as scripts/quickstart.sh:
all-MiniLM-L6-v2, mean pooling, normalized, temperature 0.05, batch 32 queries, group size 1
(the positive only; in-batch negatives), query/passage lengths 32/128, AdamW lr 2e-5 (no weight
decay), linear schedule with warmup ratio 0.1, gradient clipping at 1.0, 80 steps, fp32, dropout
on (model.train()). The batches are the very ones `tevatron train --seed 42` makes: this script
reproduces its sampler (SplitMix64 permutation per epoch, positive `(item + seed + epoch) % n`),
so the two runs differ only in dropout masks and floating-point summation order.

Then it encodes the quickstart's evaluation subset with the trained model (eval mode, mean
pooling, normalize), searches exactly (top 100 by inner product) and writes a ranking that
`tevatron eval` scores like the quickstart's.

    python quickstart_torch.py MODEL TRAIN_JSONL EVAL_DATA_DIR OUT_DIR [STEPS]
Prints one JSON line: {"train_seconds", "encode_seconds", "losses"}.
"""
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

MASK = (1 << 64) - 1
SEED, BATCH, QLEN, PLEN, TEMP, LR, WARMUP_RATIO, CLIP = 42, 32, 32, 128, 0.05, 2e-5, 0.1, 1.0


class SplitMix64:
    """crates/tevatron-model/src/rng.rs, bit for bit."""

    def __init__(self, seed):
        self.state = seed & MASK

    def next_u64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def below(self, n):
        while True:
            m = self.next_u64() * n
            if (m & MASK) >= ((-n) & MASK) % n:
                return m >> 64

    def shuffle(self, items):
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]


def mix(seed, parts):
    h = SplitMix64(seed ^ 0x5851F42D4C957F2D).next_u64()
    for p in parts:
        h = SplitMix64(h ^ ((p * 0x2545F4914F6CDD1D) & MASK)).next_u64()
    return h


def epoch_order(n, seed, epoch):
    """crates/tevatron-train/src/data.rs `epoch_order`."""
    order = list(range(n))
    SplitMix64(mix(seed, [epoch, 0x0E90C4])).shuffle(order)
    return order


def passage_text(p):
    # Tevatron's text form: title + ' ' + text, not stripped.
    return p["title"] + " " + p["text"]


def encode(model, tok, texts, max_len):
    batch = tok(texts, truncation=True, max_length=max_len, padding=True, pad_to_multiple_of=16,
                return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    reps = (hidden * mask).sum(1) / mask.sum(1)
    return F.normalize(reps, dim=-1)


def train(model, tok, rows, steps):
    per_epoch = math.ceil(len(rows) / BATCH)
    warmup = math.ceil(steps * WARMUP_RATIO)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(1, warmup) if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    model.train()
    losses, order = [], None
    for step in range(steps):
        epoch, b = divmod(step, per_epoch)
        if b == 0:
            order = epoch_order(len(rows), SEED, epoch)
        items = order[b * BATCH:(b + 1) * BATCH]
        queries = [rows[i]["query"] for i in items]
        passages = []
        for i in items:
            pos = rows[i]["positive_passages"]
            passages.append(passage_text(pos[(i + SEED + epoch) % len(pos)]))
        q = encode(model, tok, queries, QLEN)
        p = encode(model, tok, passages, PLEN)
        scores = q @ p.T / TEMP
        loss = F.cross_entropy(scores, torch.arange(len(items)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def encode_file(model, tok, path, key, text_of, max_len):
    rows = [json.loads(l) for l in open(path)]
    reps = [encode(model, tok, [text_of(r) for r in rows[i:i + 64]], max_len) for i in range(0, len(rows), 64)]
    return [r[key] for r in rows], torch.cat(reps).numpy()


def main():
    model_dir, train_path, eval_dir, out = sys.argv[1:5]
    steps = int(sys.argv[5]) if len(sys.argv) > 5 else 80
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir)
    rows = [json.loads(l) for l in open(train_path)]

    start = time.time()
    losses = train(model, tok, rows, steps)
    train_seconds = time.time() - start

    start = time.time()
    model.eval()
    # The quickstart's corpus rows are format B (the corpus): title + ' ' + text, stripped.
    doc_ids, docs = encode_file(model, tok, f"{eval_dir}/corpus.jsonl", "docid",
                                lambda r: (r.get("title", "") + " " + r["text"]).strip(), PLEN)
    qids, queries = encode_file(model, tok, f"{eval_dir}/queries.jsonl", "query_id",
                                lambda r: r["query"], QLEN)
    encode_seconds = time.time() - start
    scores = queries @ docs.T
    os.makedirs(out, exist_ok=True)
    with open(f"{out}/run.tsv", "w") as f:
        for qi, qid in enumerate(qids):
            top = np.argsort(-scores[qi], kind="stable")[:100]
            f.writelines(f"{qid}\t{doc_ids[d]}\t{scores[qi, d]}\n" for d in top)
    print(json.dumps({"train_seconds": train_seconds, "encode_seconds": encode_seconds,
                      "losses": losses}))


if __name__ == "__main__":
    main()
