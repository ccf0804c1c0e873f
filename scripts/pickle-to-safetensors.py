#!/usr/bin/env python3
"""Convert Tevatron's pickled embeddings to the safetensors files `tevatron search` reads.

Tevatron's `driver.encode` writes `pickle.dump((reps, lookup_indices), f)`: a float array
`[n, d]` and a list of `n` ids. `tevatron` reads safetensors: `embeddings` (F32 `[n, d]`) and
`ids` (UTF-8 bytes of the ids joined with newlines). Each PICKLE becomes PICKLE's name with
`.safetensors` in place of `.pkl` (or added), beside it.

    python scripts/pickle-to-safetensors.py emb/corpus.*.pkl emb/query.pkl

Needs numpy and safetensors (`pip install numpy safetensors`). Only open pickles you trust:
loading one runs the code it names.
"""
import pickle
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def convert(src: Path) -> Path:
    with open(src, "rb") as f:
        reps, ids = pickle.load(f)
    reps = np.ascontiguousarray(np.asarray(reps, dtype=np.float32))
    ids = [str(i) for i in ids]
    if reps.ndim != 2 or reps.shape[0] != len(ids):
        sys.exit(f"{src}: expected (reps [n, d], n ids), got reps {reps.shape} and {len(ids)} ids")
    if any("\n" in i for i in ids):
        sys.exit(f"{src}: an id holds a newline, which the ids tensor uses to join them")
    joined = "\n".join(ids).encode("utf-8")
    dst = src.with_suffix(".safetensors") if src.suffix == ".pkl" else Path(f"{src}.safetensors")
    tmp = dst.with_name(dst.name + ".tmp")
    save_file({"embeddings": reps, "ids": np.frombuffer(joined, dtype=np.uint8)}, str(tmp))
    tmp.replace(dst)
    return dst


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for arg in sys.argv[1:]:
        print(convert(Path(arg)))
