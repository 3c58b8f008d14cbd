#!/usr/bin/env bash
# Hand-off latency: from the holder's command exiting to the next waiter's command
# starting, with 8 waiters queued, chan-run vs a bare `flock`. Each command stamps
# its start and end with bash's $EPOCHREALTIME (no extra process), so both sides pay
# the same bash start-up; the gap between one command's end and the next one's start
# is the hand-off. Usage: bench/handoff.sh [ROUNDS] [DIR]   (DIR: where state and lock
# files live; default /dev/shm, a tmpfs).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-20}
base=${2:-/dev/shm}
cargo build --release --quiet
bin=$PWD/target/release/chan-run
work=$(mktemp -d "$base/chan-run-handoff.XXXXXX")
trap 'rm -rf "$work"' EXIT
waiters=8
stamp='echo "s $EPOCHREALTIME" >> "$LOG"; sleep 0.02; echo "e $EPOCHREALTIME" >> "$LOG"'

round() { # round TOOL LOG
  local tool=$1 log=$2 i
  for i in $(seq 0 $waiters); do
    if [ "$tool" = flock ]; then
      LOG=$log flock "$work/flock.lock" bash -c "$stamp" &
    else
      LOG=$log "$bin" --state-dir "$work/state" run -q -c bench -- bash -c "$stamp" &
    fi
    sleep 0.005
  done
  wait
}

for tool in flock chan-run; do
  for r in $(seq "$rounds"); do round "$tool" "$work/$tool.$r.log"; done
done

python3 - "$work" "$rounds" <<'PY'
import sys, glob, statistics
work, rounds = sys.argv[1], int(sys.argv[2])
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
def pct(xs, p):
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]
res = {t: gaps(t) for t in ("flock", "chan-run")}
print(f"hand-off latency, {rounds} rounds x 8 waiters, dir {work.rsplit('/', 1)[0]}")
print(f"{'tool':10} {'n':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
for t, xs in res.items():
    print(f"{t:10} {len(xs):5d} {pct(xs,50):8.2f} {pct(xs,90):8.2f} {pct(xs,99):8.2f}")
f, c = res["flock"], res["chan-run"]
print(f"chan-run - flock: p50 {pct(c,50)-pct(f,50):+.2f} ms, p99 {pct(c,99)-pct(f,99):+.2f} ms")
PY
