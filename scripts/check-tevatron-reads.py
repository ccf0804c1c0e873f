#!/usr/bin/env python3
"""Checks that Tevatron's Python `train` reads a training file in the ids form (as `tevatron
mine` writes it) with its corpus: both are loaded as Tevatron's TrainDataset loads them
(`datasets.load_dataset("json", data_files=...)`, the corpus indexed by `docid`), and every row
is resolved the way its `__getitem__` resolves one: `query_id`, `query_text`, a positive from
`positive_document_ids` and `train_group_size - 1` negatives from `negative_document_ids`, each
looked up in the corpus with the id check Tevatron asserts. Needs the `datasets` package only.

    python scripts/check-tevatron-reads.py mined.jsonl corpus.jsonl [train_group_size]

Prints what it read and exits 1 naming the first row Tevatron could not use.
"""
import random
import sys

from datasets import load_dataset


def main():
    train_path, corpus_path = sys.argv[1], sys.argv[2]
    group = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    train = load_dataset("json", data_files=train_path, split="train")
    corpus = load_dataset("json", data_files=corpus_path, split="train")
    index = {docid: i for i, docid in enumerate(corpus.select_columns(["docid"])["docid"])}
    negatives_read = 0
    for item in range(len(train)):
        row = train[item]
        where = f"{train_path}: row {item + 1} (query {row.get('query_id')!r})"
        if "positive_passages" in row:
            sys.exit(f"{where}: the text form, not the ids form `tevatron mine` writes")
        text = row.get("query_text", "") or ""
        positives, negatives = row["positive_document_ids"], row["negative_document_ids"]
        if not text or not positives:
            sys.exit(f"{where}: no query_text or no positive")
        if group > 1 and not negatives:
            sys.exit(f"{where}: no negatives; Tevatron's random.choices fails on the empty list")
        for docid in positives + negatives:  # every id, as Tevatron may draw any of them
            if docid not in index:
                sys.exit(f"{where}: document {docid!r} is not in {corpus_path}")
        # One group as Tevatron draws it: its texts read through the index.
        chosen = [positives[item % len(positives)]]
        if group > 1:
            chosen += random.Random(item).choices(negatives, k=group - 1)
        texts = [corpus[index[docid]].get("text", "") for docid in chosen]
        if len(texts) != group:
            sys.exit(f"{where}: a group of {len(texts)}, not {group}")
        negatives_read += len(negatives)
    print(
        f"Tevatron's TrainDataset reads {train_path}: {len(train)} rows, {negatives_read} "
        f"negatives, every id found among the {len(corpus)} passages of {corpus_path}"
    )


if __name__ == "__main__":
    main()
