# The quickstart's training recipe, sourced by scripts/quickstart.sh and
# scripts/reference-quickstart.sh so that the run they compare is the one the quickstart makes
# (scripts/reference/quickstart_torch.py mirrors these values in Python).
# shellcheck disable=SC2034  # used by the scripts that source it
recipe=(--per_device_train_batch_size 32 --train_group_size 1 --query_max_len 32
  --passage_max_len 128 --pooling mean --normalize --temperature 0.05 --learning_rate 2e-5
  --warmup_ratio 0.1 --seed 42 --logging_steps 2)
