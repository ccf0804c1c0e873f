# Sourced by the memory benchmarks. peak LABEL COMMAND...: runs the command (stderr to
# $work/LABEL.log) and prints a table row: peak RSS, its anonymous and file-backed parts, and
# the wall time. VmHWM is the kernel's own high-water mark; the split is sampled every 0.1 s.
# RssFile is memory-mapped files (weights, embeddings): page cache, which the kernel can drop
# and read again, shared with every process that maps the file.
peak() {
  local label=$1; shift
  local start=$SECONDS hwm=0 anon=0 file=0 a f h
  "$@" 2> "$work/$label.log" > /dev/null &
  local pid=$!
  while read -r h a f < <(awk '/^VmHWM/{h=$2} /^RssAnon/{a=$2} /^RssFile/{f=$2}
      END{if (h) print h, a, f}' "/proc/$pid/status" 2>/dev/null) && [ -n "$h" ]; do
    hwm=$h; (( a > anon )) && anon=$a; (( f > file )) && file=$f
    sleep 0.1
  done
  wait "$pid" || { echo "$label failed: see $work/$label.log" >&2; return 1; }
  printf "| %s | %d MB | %d MB | %d MB | %d s |\n" "$label" $((hwm / 1024)) $((anon / 1024)) \
    $((file / 1024)) $((SECONDS - start))
}
