#!/usr/bin/env bash
# Checks that the quickstart survives interruption: runs it in a fresh folder, interrupts it
# (SIGINT to the whole process group, as Ctrl-C does; SIGKILL with KILL=1) after each of the
# given numbers of seconds, then lets it finish and compares metrics.json with a reference run.
# (A job started with & ignores SIGINT, so python restores the default before starting it.)
#   scripts/quickstart-interrupt.sh runs/quickstart/metrics.json 45 200 330
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
reference=$1
shift
out=$(mktemp -d)/quickstart
signal=${KILL:+KILL}
signal=${signal:-INT}
for seconds in "$@"; do
  QUICKSTART_OUT="$out" setsid python3 -c 'import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.execv(sys.argv[1], sys.argv[1:])' "$root/scripts/quickstart.sh" > /dev/null 2>&1 &
  pid=$!
  sleep "$seconds"
  if kill -0 "$pid" 2>/dev/null; then
    kill -"$signal" -- -"$pid"
    wait "$pid" || true
    echo "interrupted after ${seconds} s; in $out: $(ls "$out" | tr '\n' ' ')" >&2
    ls "$out/model" 2>/dev/null | sed 's/^/  model\//' >&2 || true
  else
    wait "$pid" || true
    echo "finished before ${seconds} s" >&2
  fi
done
QUICKSTART_OUT="$out" "$root/scripts/quickstart.sh" > /dev/null
if cmp "$out/metrics.json" "$reference"; then
  echo "same metrics as $reference after interrupts at $* s"
else
  diff "$out/metrics.json" "$reference" >&2
  exit 1
fi
