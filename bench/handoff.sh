#!/usr/bin/env bash
# Hand-off latency: from the holder's command exiting to the next waiter's command
# starting, with 8 waiters queued, chan-run vs a bare `flock`. Each command stamps
# its start and end with bash's $EPOCHREALTIME (no extra process), so both sides pay
# the same bash start-up; the gap between one command's end and the next one's start
# is the hand-off. Rounds alternate between the two tools (flock, chan-run, flock, ...)
# so drift on a shared machine hits both alike.
# chan-run records the run (an in-place write + fdatasync of active.json) before it
# releases the lock, so on disk its hand-off includes one fdatasync; for context the
# script also times 200 in-place 512-byte pwrite + fdatasync in the same directory.
# Goal (issue 5): p99 under 5 ms above flock's p99.
# With `--store NAME=URL` (repeatable; bench/postgres.sh uses it), every round also runs
# the same queue with `chan-run --store URL`, and the rows recorded for the summary are
# those stores', against the local store and flock of the same rounds.
# Usage: bench/handoff.sh [--store NAME=URL]... [ROUNDS] [DIR...]   (DIR: where state
# and lock files live; default /dev/shm (tmpfs) and /var/tmp (disk); ROUNDS default 80,
# QUICK=1: 4)
set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
stores=() # NAME=URL
while [ "${1:-}" = --store ]; do
  case ${2:-} in
    [A-Za-z0-9]*=*) stores+=("$2") ;;
    *) echo "handoff.sh: --store wants NAME=URL, got '${2:-}'" >&2; exit 64 ;;
  esac
  shift 2
done
rounds=${1:-$([ "$QUICK" = 1 ] && echo 4 || echo 80)}
shift || true
dirs=("$@")
[ ${#dirs[@]} -gt 0 ] || dirs=(/dev/shm /var/tmp)
waiters=8
tools=(flock chan-run)
for s in "${stores[@]}"; do tools+=("${s%%=*}"); done
stamp='echo "s $EPOCHREALTIME" >> "$LOG"; sleep 0.02; echo "e $EPOCHREALTIME" >> "$LOG"'

store_url() { # store_url NAME
  local s
  for s in "${stores[@]}"; do [ "${s%%=*}" != "$1" ] || { echo "${s#*=}"; return; }; done
}

round() { # round TOOL LOG
  local tool=$1 log=$2 _
  for _ in $(seq 0 $waiters); do
    if [ "$tool" = flock ]; then
      LOG=$log flock "$work/flock.lock" bash -c "$stamp" &
    elif [ "$tool" = chan-run ]; then
      LOG=$log "$bin" --state-dir "$work/state" run -q -c bench -- bash -c "$stamp" &
    else
      LOG=$log "$bin" --store "$(store_url "$tool")" run -q -c bench -- bash -c "$stamp" &
    fi
    sleep 0.005
  done
  wait
}

for base in "${dirs[@]}"; do
  mkwork work "$base" handoff
  for r in $(seq "$rounds"); do
    for tool in "${tools[@]}"; do round "$tool" "$work/$tool.$r.log"; done
  done
  python3 - "$bench_dir" "$work" "$rounds" "$base" "$(fstype "$base")" "${tools[@]}" <<'PY'
import sys, glob
sys.path.insert(0, sys.argv[1])
from benchlib import pct, record
work, rounds, base, fs, tools = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6:]
def gaps(tool):
    out = []
    for path in glob.glob(f"{work}/{tool}.*.log"):
        runs, cur = [], {}
        for line in open(path):
            kind, t = line.split()
            cur[kind] = float(t)
            if kind == "e":
                runs.append((cur["s"], cur["e"]))
        runs.sort()
        out += [(b[0] - a[1]) * 1000 for a, b in zip(runs, runs[1:])]
    return sorted(out)
res = {t: gaps(t) for t in tools}
import os, time
fd = os.open(f"{work}/sync-probe", os.O_RDWR | os.O_CREAT, 0o600)
os.pwrite(fd, b" " * 4096, 0)
os.fsync(fd)
syncs = []
for i in range(200):
    t0 = time.perf_counter()
    os.pwrite(fd, str(i).encode().ljust(512), 512)
    os.fdatasync(fd)
    syncs.append((time.perf_counter() - t0) * 1000)
os.close(fd)
print(f"== hand-off latency, {rounds} rounds x 8 waiters, dir {base} ({fs})")
w = max(10, *(len(t) for t in tools))
print(f"  {'tool':{w}} {'n':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
for t, xs in res.items():
    print(f"  {t:{w}} {len(xs):5d} {pct(xs,50):8.2f} {pct(xs,90):8.2f} {pct(xs,99):8.2f} {xs[-1]:8.2f}")
f, c = res["flock"], res["chan-run"]
d50, d99 = pct(c, 50) - pct(f, 50), pct(c, 99) - pct(f, 99)
print(f"  chan-run - flock: p50 {d50:+.2f} ms, p99 {d99:+.2f} ms (goal: p99 under +5 ms)")
print(f"  for context, 512-byte pwrite + fdatasync here: p50 {pct(syncs, 50):.2f} ms, p99 {pct(syncs, 99):.2f} ms")
where = "tmpfs" if fs == "tmpfs" else f"disk, {fs}"
for t in tools[2:]:
    s = res[t]
    print(f"  {t} - chan-run (local store): p50 {pct(s, 50) - pct(c, 50):+.2f} ms, p99 {pct(s, 99) - pct(c, 99):+.2f} ms")
    record({"id": f"handoff-{t}", "what": f"3. hand-off latency, 8 waiters, --store {t} (vs the local store in {where})",
            "figure": f"p50 {pct(s, 50):.2f} / p99 {pct(s, 99):.2f} ms",
            "ref": f"local store p50 {pct(c, 50):.2f} / p99 {pct(c, 99):.2f} ms; flock p50 {pct(f, 50):.2f} / p99 {pct(f, 99):.2f} ms",
            "goal": "(none; reported)", "met": None,
            "detail": f"p50 {pct(s, 50) - pct(c, 50):+.2f} ms, p99 {pct(s, 99) - pct(c, 99):+.2f} ms vs the local store"})
if len(tools) > 2:
    sys.exit(0)  # the local store's own row is handoff.sh's alone (run-all.sh runs it too)
record({"id": f"handoff-{'tmpfs' if fs == 'tmpfs' else 'disk'}",
        "what": f"3. hand-off latency, 8 waiters ({where})",
        "figure": f"p50 {pct(c, 50):.2f} / p99 {pct(c, 99):.2f} ms",
        "ref": f"flock p50 {pct(f, 50):.2f} / p99 {pct(f, 99):.2f} ms"
               + ("" if fs == "tmpfs" else f"; fdatasync p99 {pct(syncs, 99):.2f} ms"),
        "goal": "p99 < flock's p99 + 5 ms", "met": d99 < 5,
        "detail": f"p99 {d99:+.2f} ms vs flock ({abs(5 - d99):.2f} ms {'to spare' if d99 < 5 else 'over'})"})
PY
done
