#!/usr/bin/env bash
# Pools (`--pool NAME:N`), issue 13's two figures:
# 1. Per-run cost of `--pool p:8` with free seats against no pool: `chan-run run -c x --
#    true` and `chan-run run -c y --pool p:8 -- true`, side by side (bench/benchlib.py's
#    interleave: every round runs each once in a fresh random order), on tmpfs.
# 2. Hand-off latency from a seat's release to the next waiter's command start: 9
#    callers on 9 different channels through `--pool p:1` (so only the seat makes them
#    wait), against the same 9 callers on one channel with no pool (the channel's own
#    hand-off, bench/handoff.sh's figure), rounds alternating. Each command stamps its
#    start and end with bash's $EPOCHREALTIME; the gap between one command's end and
#    the next one's start is the hand-off.
# With `--store URL` both run on that store too (e.g. the PostgreSQL server of
# scripts/test-postgres), reported beside the local store's.
# Usage: bench/pool.sh [--store URL] [ROUNDS] [HANDOFF_ROUNDS]
#        (defaults 600 and 40; QUICK=1: 40 and 4)
set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
store=
if [ "${1:-}" = --store ]; then
  store=$2
  shift 2
fi
rounds=${1:-$([ "$QUICK" = 1 ] && echo 40 || echo 600)}
handoff_rounds=${2:-$([ "$QUICK" = 1 ] && echo 4 || echo 40)}
mkwork work /dev/shm pool
local_opts=(--state-dir "$work/state")
# The first runs make the state directory, the pool's folder and its seat files.
"$bin" "${local_opts[@]}" run -q -c x -- "$true_bin"
"$bin" "${local_opts[@]}" run -q -c y --pool p:8 -- "$true_bin"
if [ -n "$store" ]; then
  "$bin" --store "$store" run -q -c x -- "$true_bin"
  "$bin" --store "$store" run -q -c y --pool p:8 -- "$true_bin"
fi

echo "== per-run cost of --pool p:8 with free seats, $rounds interleaved rounds (tmpfs)"
python3 - "$bench_dir" "$rounds" "$bin" "$true_bin" "$store" "${local_opts[@]}" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
from benchlib import interleave, median, pct, record
rounds, bin, true, store, local = int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:]
stores = [("local", local)] + ([("postgres", ["--store", store])] if store else [])
spec = {}
for name, opts in stores:
    spec[f"{name}: no pool"] = [bin, *opts, "run", "-q", "-c", "x", "--", true]
    spec[f"{name}: --pool p:8"] = [bin, *opts, "run", "-q", "-c", "y", "--pool", "p:8", "--", true]
res = interleave(rounds, spec)
print(f"  {'command':24} {'p50 ms':>8} {'p10 ms':>8} {'p90 ms':>8}")
for n, xs in res.items():
    print(f"  {n:24} {median(xs):8.3f} {pct(xs, 10):8.3f} {pct(xs, 90):8.3f}")
for name, _ in stores:
    a, b = res[f"{name}: no pool"], res[f"{name}: --pool p:8"]
    ratio = median(b) / median(a)
    print(f"  {name}: --pool p:8 / no pool: ratio of medians {ratio:.3f} ({median(b) - median(a):+.3f} ms)")
    record({"id": f"pool-overhead-{name}", "what": f"pools: per-run cost of --pool p:8, free seats ({name} store, tmpfs)",
            "figure": f"{median(b):.2f} ms", "ref": f"no pool {median(a):.2f} ms ({ratio:.2f}x)",
            "goal": "(none; reported)", "met": None, "detail": f"{median(b) - median(a):+.3f} ms a run"})
PY

callers=9
stamp='echo "s $EPOCHREALTIME" >> "$LOG"; sleep 0.02; echo "e $EPOCHREALTIME" >> "$LOG"'
round() { # round KIND LOG OPTS...
  local kind=$1 log=$2 i
  shift 2
  for i in $(seq 1 $callers); do
    if [ "$kind" = pool ]; then
      LOG=$log "$bin" "$@" run -q -c "c$i" --pool p:1 -- bash -c "$stamp" &
    else
      LOG=$log "$bin" "$@" run -q -c one -- bash -c "$stamp" &
    fi
    sleep 0.005
  done
  wait
}
kinds=(channel pool)
[ -z "$store" ] || kinds+=(pg-channel pg-pool)
for r in $(seq "$handoff_rounds"); do
  round channel "$work/channel.$r.log" "${local_opts[@]}"
  round pool "$work/pool.$r.log" "${local_opts[@]}"
  if [ -n "$store" ]; then
    round channel "$work/pg-channel.$r.log" --store "$store"
    round pool "$work/pg-pool.$r.log" --store "$store"
  fi
done
python3 - "$bench_dir" "$work" "$handoff_rounds" "${kinds[@]}" <<'PY'
import sys, glob
sys.path.insert(0, sys.argv[1])
from benchlib import pct, record
work, rounds, kinds = sys.argv[2], int(sys.argv[3]), sys.argv[4:]
def gaps(kind):
    out = []
    for path in glob.glob(f"{work}/{kind}.*.log"):
        runs, cur = [], {}
        for line in open(path):
            k, t = line.split()
            cur[k] = float(t)
            if k == "e":
                runs.append((cur["s"], cur["e"]))
        runs.sort()
        out += [(b[0] - a[1]) * 1000 for a, b in zip(runs, runs[1:])]
    return sorted(out)
print(f"== hand-off latency, {rounds} rounds x 9 callers (tmpfs): a seat of --pool p:1 (9 channels) vs one channel")
print(f"  {'hand-off':12} {'n':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
res = {k: gaps(k) for k in kinds}
for k, xs in res.items():
    print(f"  {k:12} {len(xs):5d} {pct(xs, 50):8.2f} {pct(xs, 90):8.2f} {pct(xs, 99):8.2f} {xs[-1]:8.2f}")
for seat, chan, name in (("pool", "channel", "local"), ("pg-pool", "pg-channel", "postgres")):
    if seat not in res:
        continue
    s, c = res[seat], res[chan]
    record({"id": f"pool-handoff-{name}", "what": f"pools: hand-off from a seat's release to the next command ({name} store, tmpfs)",
            "figure": f"p50 {pct(s, 50):.2f} / p99 {pct(s, 99):.2f} ms",
            "ref": f"a channel's hand-off p50 {pct(c, 50):.2f} / p99 {pct(c, 99):.2f} ms",
            "goal": "(none; reported)", "met": None,
            "detail": f"p99 {pct(s, 99) - pct(c, 99):+.2f} ms vs the channel's"})
PY
