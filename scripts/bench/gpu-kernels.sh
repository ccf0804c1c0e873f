#!/usr/bin/env bash
# Where a bf16 training step's GPU time goes, kernel by kernel, ours against PyTorch's: ncu's
# gpu__time_duration of every kernel of three steps of each (clocks and caches left alone), summed
# per kernel name. Run on the GPU machine from the repository root with what scripts/gpu-check.sh
# takes (.device/tevatron.xz, .device/tok/); SKIP_TORCH=1 profiles ours only. Writes
# $OUT/ours.csv and $OUT/torch.csv (ncu's per-kernel summaries) and prints the top kernels.
set -uo pipefail
out=/tmp/gpu-kernels; OUT=${OUT:-$out/report}
mkdir -p "$out" "$OUT" /tmp/tev
python3 -c 'import lzma, shutil; shutil.copyfileobj(lzma.open(".device/tevatron.xz"), open("/tmp/tev/tevatron", "wb"))'
chmod +x /tmp/tev/tevatron
libs=$(python3 -c 'import nvidia, os, glob; print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(d + "/**/lib*.so*", recursive=True)})))')
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
python3 - "$out" <<'PY'
import json, random, shutil, sys
import torch
from transformers import BertConfig, BertModel
out = sys.argv[1]
torch.manual_seed(0)
BertModel(BertConfig.from_pretrained(".device/tok")).eval().save_pretrained(f"{out}/model", safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(f".device/tok/{f}", f"{out}/model/{f}")
vocab = [w for w in open(".device/tok/vocab.txt").read().split("\n") if w.isalpha()]
rng = random.Random(0)
passages = [" ".join(rng.choice(vocab) for _ in range(rng.randint(40, 100))) for _ in range(4000)]
with open(f"{out}/train.jsonl", "w") as f:
    for i in range(1920):
        negs = [passages[rng.randrange(len(passages))] for _ in range(3)]
        f.write(json.dumps({"query": " ".join(rng.sample(passages[i].split(), 8)),
                            "positive_passages": [{"text": passages[i]}],
                            "negative_passages": [{"text": n} for n in negs]}) + "\n")
PY
ncu=(ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv --print-summary per-kernel)
timeout 170 "${ncu[@]}" --log-file "$OUT/ours.csv" /tmp/tev/tevatron train --model_name_or_path "$out/model" \
  --dataset_path "$out/train.jsonl" --output_dir "$out/o" --train_group_size 4 --query_max_len 32 \
  --passage_max_len 128 --pooling mean --normalize --temperature 0.05 --learning_rate 1e-4 --warmup_ratio 0 \
  --logging_steps 1 --save_strategy no --overwrite_output_dir --dataset_cache_dir "$out/cache" --device cuda \
  --bf16 --per_device_train_batch_size 32 --max_steps 3 2> "$out/ours.log" || { tail -5 "$out/ours.log"; exit 1; }
if [ -z "${SKIP_TORCH:-}" ]; then
  TRAIN_STEP_DEVICE=cuda TRAIN_STEP_AMP=bf16 timeout 150 "${ncu[@]}" --log-file "$OUT/torch.csv" \
    python3 scripts/bench/train_step.py "$out/model" "$out/train.jsonl" 3 32 4 32 128 mean true 0.05 > "$out/torch.log" 2>&1 \
    || { tail -5 "$out/torch.log"; exit 1; }
fi
python3 - "$OUT" <<'PY'
import csv, io, os, sys
for name in ("ours", "torch"):
    path = f"{sys.argv[1]}/{name}.csv"
    if not os.path.exists(path):
        continue
    per = {}
    rows = csv.DictReader(io.StringIO("".join(l for l in open(path) if not l.startswith("=="))))
    for r in rows:
        if r["Metric Name"] == "gpu__time_duration.sum":
            ms = int(r["Invocations"]) * float(r["Average"].replace(",", "")) * {"ns": 1e-6, "us": 1e-3, "ms": 1.0}[r["Metric Unit"]]
            n, t = per.get(r["Kernel Name"][:90], (0, 0.0))
            per[r["Kernel Name"][:90]] = (n + int(r["Invocations"]), t + ms)
    print(f"== {name}: {sum(t for _, t in per.values()) / 3:.1f} ms of kernels a step ({sum(n for n, _ in per.values())} launches in 3 steps)")
    for k, (n, t) in sorted(per.items(), key=lambda kv: -kv[1][1])[:15]:
        print(f"{t / 3:7.2f} ms/step {n:6d}  {k}")
PY
