#!/usr/bin/env bash
# Serialized throughput: 4 concurrent shell loops x 500 runs of `true` on ONE channel,
# runs/s for `chan-run run -q -c x -- true` against `flock L true`, on tmpfs (/dev/shm)
# and on disk (/var/tmp). Trials alternate the two tools (and which goes first), so
# drift hits both; the figure is the median over the trials. Afterwards the channel's
# run count must be exact (nothing lost).
# Goal (issues 5 and 17): on tmpfs, chan-run >= 0.85 x flock's runs/s.
# Usage: bench/throughput.sh [RUNS_PER_LOOP] [TRIALS]   (default 500, 5; QUICK=1: 50, 1)
set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
per_loop=${1:-$([ "$QUICK" = 1 ] && echo 50 || echo 500)}
trials=${2:-$([ "$QUICK" = 1 ] && echo 1 || echo 5)}
loops=4

trial() { # trial TOOL WORK: prints "wall-seconds cpu-seconds" of 4 loops x per_loop runs
  local tool=$1 work=$2
  (
    t0=$EPOCHREALTIME
    for ((l = 0; l < loops; l++)); do
      if [ "$tool" = flock ]; then
        (for ((i = 0; i < per_loop; i++)); do flock "$work/flock.lock" "$true_bin"; done) &
      else
        (for ((i = 0; i < per_loop; i++)); do "$bin" --state-dir "$work/state" run -q -c x -- "$true_bin"; done) &
      fi
    done
    wait
    t1=$EPOCHREALTIME
    # `times`, 2nd line: user and system time of the waited-for children (all runs);
    # run in this shell (a pipe or $(...) would ask a fresh subshell, which has none).
    times >"$work/times"
    # shellcheck disable=SC2046 # `times` prints "0m1.234s 0m0.567s": two words
    python3 -c 'import re, sys
t0, t1, cu, cs = sys.argv[1:5]
sec = lambda s: sum(float(x) * m for x, m in zip(re.findall(r"[\d.]+", s), (60, 1)))
print(f"{float(t1) - float(t0):.4f} {sec(cu) + sec(cs):.4f}")' "$t0" "$t1" $(tail -1 "$work/times")
  )
}

for base in /dev/shm /var/tmp; do
  mkwork work "$base" throughput
  fs=$(fstype "$base")
  echo "== serialized throughput on $base ($fs): $loops loops x $per_loop runs, $trials trials per tool"
  times=()
  for ((t = 0; t < trials; t++)); do
    if ((t % 2 == 0)); then order="flock chan-run"; else order="chan-run flock"; fi
    for tool in $order; do
      read -r wall cpu < <(trial "$tool" "$work")
      echo "  trial $((t + 1)) $tool: $wall s wall, $cpu s CPU"
      times+=("$tool=$wall=$cpu")
    done
  done
  runs=$("$bin" --state-dir "$work/state" status x --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["channels"][0]["runs"])')
  python3 - "$bench_dir" "$fs" "$((loops * per_loop))" "$runs" "$((loops * per_loop * trials))" "${times[@]}" <<'PY'
import os, sys
sys.path.insert(0, sys.argv[1])
from benchlib import median, record
fs, n, runs, expect = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t, cpu = {"flock": [], "chan-run": []}, {"flock": [], "chan-run": []}
for kv in sys.argv[6:]:
    k, w, c = kv.split("=")
    t[k].append(float(w))
    cpu[k].append(float(c))
rate = {k: n / median(v) for k, v in t.items()}
ratio = rate["chan-run"] / rate["flock"]
print(f"  flock L true: {rate['flock']:7.0f} runs/s   chan-run: {rate['chan-run']:7.0f} runs/s   ratio {ratio:.2f}")
cores = os.cpu_count()
for k in t:
    per = median(cpu[k]) / n * 1000
    busy = median([c / w for c, w in zip(cpu[k], t[k])]) / cores
    print(f"  {k:9} CPU per run (loop's bash included) {per:.2f} ms; the {cores} cores {busy:.0%} busy")
print(f"  runs counted in active.json: {runs} of {expect} {'(exact)' if runs == expect else '(LOST RUNS)'}")
where = "tmpfs" if fs == "tmpfs" else f"disk, {fs}"
entry = {"id": f"throughput-{'tmpfs' if fs == 'tmpfs' else 'disk'}",
         "what": f"2. serialized throughput, 4x{n // 4} runs ({where})",
         "figure": f"{rate['chan-run']:.0f} runs/s", "ref": f"flock L true {rate['flock']:.0f} runs/s ({ratio:.2f}x)"}
if runs != expect:
    entry.update(goal="every run counted", met=False, detail=f"{runs} of {expect} counted")
elif fs == "tmpfs":
    met = ratio >= 0.85
    entry.update(goal=">= 0.85x flock", met=met,
                 detail=f"{ratio / 0.85:.2f}x the goal ({ratio:.2f} vs 0.85)")
else:
    entry.update(goal="(none on disk; reported)", met=None, detail=f"{ratio:.2f}x flock; all {runs} runs counted")
record(entry)
PY
done
