#!/usr/bin/env bash
# Training step time and peak memory, ours vs PyTorch, same machine, same run, 2 threads each.
#   scripts/bench/train.sh [STEPS]   (default 6)
#   BATCH=32 GROUP=1 PLAIN_ONLY=1 scripts/bench/train.sh   (the quickstart's shape; 16 x 4 too)
#   PRECISION=bf16 ...   ours with --bf16, PyTorch under torch.autocast(bfloat16), as the
#   Hugging Face Trainer runs --bf16 (on a CPU with AMX-BF16 or AVX-512 BF16 ours runs bf16 products; see
#   docs/bf16.md)
# The default setting: all-MiniLM-L6-v2, 8 queries, group 8 (64 passages), lengths 32/128,
# mean pooling, normalize, temperature 0.05, on the first InsuranceQA training rows (text form,
# 7 hard negatives each); BATCH and GROUP set another shape. Time per optimizer step is the
# median of steps 2..N (ours from the log's timestamps with --logging_steps 1, PyTorch's around
# tokenization+forward+backward+clip+AdamW);
# peak RSS is the whole process. Ours also runs with --grad_cache and --gradient_checkpointing
# (PyTorch with gradient_checkpointing_enable()) to show the memory they save, unless
# PLAIN_ONLY=1.
# PyTorch runs from TEVATRON_BENCH_VENV, else .cache/bench-venv (created with torch and
# transformers when missing). Data: InsuranceQA's train.small.jsonl as scripts/fetch-insuranceqa.sh
# downloads and converts it (into .cache/data/insuranceqa), or INSURANCEQA=/path to a folder
# already converted.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
steps=${1:-6}
batch=${BATCH:-8}
group=${GROUP:-8}
work=$root/.cache/bench/train
mkdir -p "$work"
model=$(scripts/fetch-minilm.sh)
cargo build --release -q -p tevatron-cli
insuranceqa=${INSURANCEQA:-$(scripts/fetch-insuranceqa.sh)}
data=$insuranceqa/train.small.jsonl
venv=${TEVATRON_BENCH_VENV:-$root/.cache/bench-venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q torch transformers
fi
py=$venv/bin/python
common=(--model_name_or_path "$model" --dataset_path "$data" --per_device_train_batch_size "$batch"
  --train_group_size "$group" --query_max_len 32 --passage_max_len 128 --max_steps "$steps"
  --pooling mean --normalize --temperature 0.05 --learning_rate 1e-5 --logging_steps 1
  --save_strategy no --dataset_cache_dir "$work/cache" --overwrite_output_dir)
precision=${PRECISION:-f32}
case $precision in
  f32) ours_precision=(); amp= ;;
  bf16) ours_precision=(--bf16); amp=bf16 ;;
  *) echo "PRECISION is f32 or bf16, not $precision" >&2; exit 2 ;;
esac
ours() {  # $1 label, rest: extra flags; prints "sec_per_step peak_mb"
  local label=$1; shift
  set -- "$@" ${ours_precision[@]+"${ours_precision[@]}"}
  /usr/bin/time -f "%M" -o "$work/$label.rss" env RAYON_NUM_THREADS=2 \
    target/release/tevatron train --output_dir "$work/$label" "${common[@]}" "$@" 2> "$work/$label.log"
  "$py" scripts/bench/step_seconds.py "$work/$label.log" "$work/$label.rss"
}
theirs() {  # $1 mode (plain|ckpt)
  TRAIN_STEP_AMP=$amp OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 "$py" scripts/bench/train_step.py "$model" "$data" "$steps" "$batch" "$group" 32 128 mean true 0.05 "$1" \
    | "$py" -c 'import json,sys; d=json.loads(sys.stdin.read()); print("%.2f %.0f" % (d["sec_per_step"], d["peak_rss_mb"]))'
}
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $batch queries x group $group, lengths 32/128, $precision"
row() {  # label ours_s theirs_s ours_mb theirs_mb
  local ratio=-
  [ "$3" = - ] || ratio="$(echo "$3 / $2" | bc -l | xargs printf %.2f)x"
  local theirs_mb="$5 MB"
  [ "$5" = - ] && theirs_mb=-
  printf "| %s | %s | %s | %s | %s MB | %s |\n" "$1" "$2" "$3" "$ratio" "$4" "$theirs_mb"
}
read -r o_t o_m < <(ours plain)
read -r p_t p_m < <(theirs plain)
printf "| setting | ours s/step | PyTorch s/step | speed ratio | ours peak RSS | PyTorch peak RSS |\n|---|---|---|---|---|---|\n"
row plain "$o_t" "$p_t" "$o_m" "$p_m"
[ "${PLAIN_ONLY:-0}" = 1 ] && exit 0
read -r oc_t oc_m < <(ours ckpt --gradient_checkpointing)
read -r pc_t pc_m < <(theirs ckpt)
read -r og_t og_m < <(ours gc --grad_cache --gc_q_chunk_size 2 --gc_p_chunk_size 16)
row --gradient_checkpointing "$oc_t" "$pc_t" "$oc_m" "$pc_m"
row "--grad_cache (chunks 2/16)" "$og_t" - "$og_m" -
