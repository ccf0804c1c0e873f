#!/usr/bin/env bash
# Peak memory of a 0.5B decoder on CPU: a random-weight model with Qwen2-0.5B's shape (494M
# parameters, F32; scripts/bench/make_decoder.py 0.5b). Peak RSS of the whole process, split into
# anonymous memory and the memory-mapped weights file, of
#   - encoding 256 InsuranceQA answers (max 128 tokens, batch 16, last-token pooling),
#   - two such encodes at once, one shard each: their summed PSS counts the mapped weights once,
#   - 2 LoRA training steps (Tevatron's defaults, --gradient_checkpointing, 4 queries x group 2,
#     lengths 32/128),
#   - the same with --bf16 and --gradient_accumulation_steps 2 (bf16 products are computed by
#     widening on the CPU: slow, shown for its memory),
#   - 2 full training steps with the same settings (every weight trainable),
# so the difference between the last two is what a frozen base saves (gradients and AdamW's two
# moments for every base weight).
#   scripts/bench/decoder-memory.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
work=$root/.cache/bench/decoder
mkdir -p "$work"
cargo build --release -q -p tevatron-cli
data=${INSURANCEQA:-$(scripts/fetch-insuranceqa.sh)}
minilm=$(scripts/fetch-minilm.sh)
py=${TEVATRON_BENCH_VENV:-$root/.cache/bench-venv}/bin/python
model=$work/qwen2-0.5b
[ -f "$model/model.safetensors" ] || "$py" scripts/bench/make_decoder.py 0.5b "$minilm" "$model" > /dev/null
head -n 256 "$data/corpus.jsonl" > "$work/passages-256.jsonl"
source "$root/scripts/bench/peak.sh"
pair() {  # two encodes, one per half of the passages, at once: the peak of their summed PSS
  # (proportional set size: a page shared by both counts half to each), against their summed RSS.
  local start=$SECONDS pss=0 rss=0 total p s shard pids=()
  for shard in 0 1; do
    target/release/tevatron encode --model_name_or_path "$model" --dataset_path "$work/passages-256.jsonl" \
      --dataset_number_of_shards 2 --dataset_shard_index $shard --encode_output_path "$work/pair-$shard.safetensors" \
      --passage_max_len 128 --per_device_eval_batch_size 16 --pooling last --quiet 2> "$work/pair-$shard.log" &
    pids+=($!)
  done
  while total=$(for p in "${pids[@]}"; do awk '/^Pss:/{print $2}' "/proc/$p/smaps_rollup" 2>/dev/null; done |
      awk '{t+=$1; n++} END{if (n == 2) print t}') && [ -n "$total" ]; do
    (( total > pss )) && pss=$total
    s=0; for p in "${pids[@]}"; do s=$((s + $(awk '/^VmRSS/{r=$2} END{print r+0}' "/proc/$p/status" 2>/dev/null))); done
    (( s > rss )) && rss=$s
    sleep 0.1
  done
  for p in "${pids[@]}"; do wait "$p" || { echo "pair encode failed: see $work/pair-*.log" >&2; return 1; }; done
  printf "| 2 encodes at once (a shard each) | %d MB summed RSS | %d MB summed PSS | | %d s |\n" \
    $((rss / 1024)) $((pss / 1024)) $((SECONDS - start))
}
train=(target/release/tevatron train --model_name_or_path "$model" --dataset_path "$data/train.small.jsonl"
  --per_device_train_batch_size 4 --train_group_size 2 --query_max_len 32 --passage_max_len 128
  --pooling last --normalize --temperature 0.01 --learning_rate 1e-4 --max_steps 2
  --gradient_checkpointing --logging_steps 1 --save_strategy no --overwrite_output_dir
  --dataset_cache_dir "$work/cache")
echo "| run | peak RSS | of it anonymous (peak) | of it mapped files (peak) | wall time |"
echo "|---|---|---|---|---|"
du -b "$model/model.safetensors" | awk '{printf "| (weights file) | %.0f MB | | | |\n", $1 / 1048576}'
peak encode target/release/tevatron encode --model_name_or_path "$model" \
  --dataset_path "$work/passages-256.jsonl" --encode_output_path "$work/big.safetensors" \
  --passage_max_len 128 --per_device_eval_batch_size 16 --pooling last --quiet
pair
peak train-lora "${train[@]}" --output_dir "$work/big-lora" --lora
peak train-lora-bf16-accum "${train[@]}" --output_dir "$work/big-lora-bf16" --lora --bf16 \
  --gradient_accumulation_steps 2
peak train-full "${train[@]}" --output_dir "$work/big-full"
