"""Median seconds per optimizer step of a `tevatron train --logging_steps 1` log (stderr): the
gaps between the timestamps of consecutive step lines, the first step's start-up excluded.

    python step_seconds.py TRAIN_LOG [PEAK_RSS_FILE]
Prints the median ("%.4g": GPU steps take milliseconds), followed by the peak RSS in MB when /usr/bin/time's "%M" file is given.
"""
import re
import statistics
import sys
from datetime import datetime

lines = open(sys.argv[1])
stamps = [datetime.fromisoformat(m.group(1).rstrip("Z")) for m in
          (re.search(r"(\d{4}-\d\d-\d\dT[\d:.]+Z).*\"step\":\d+\}", line) for line in lines) if m]
out = f"{statistics.median((b - a).total_seconds() for a, b in zip(stamps, stamps[1:])):.4g}"
if len(sys.argv) > 2:
    out += f" {int(open(sys.argv[2]).read().split()[-1]) / 1024:.0f}"
print(out)
