#!/usr/bin/env bash
# Pools on the PostgreSQL store: the per-run cost of `--pool p:8` with free seats
# against no pool (interleaved rounds), and the hand-off latency from a seat holder's
# command end (clean exit, or SIGKILL of its chan-run) to the next waiter's command start.
#
#   bench/pools-postgres.sh [ROUNDS] [HANDOFF_ROUNDS]      (defaults: 100, 30)
#
# Uses the build scripts/build makes (or $CHAN_RUN_BIN) and a `scripts/test-postgres` cluster
# named `bench-pools` (or $CHAN_RUN_TEST_PG), a fresh schema per run of the script.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-100}
HANDOFF=${2:-30}
BIN=${CHAN_RUN_BIN:-$(scripts/build)}
URL=${CHAN_RUN_TEST_PG:-$(scripts/test-postgres start bench-pools)}
SCHEMA=bench_pools_$$
psql -X -q "$URL" -c "CREATE SCHEMA $SCHEMA"
STORE="$URL?options=-c%20search_path%3D$SCHEMA"
[[ $URL == *\?* ]] && STORE="$URL&options=-c%20search_path%3D$SCHEMA"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"; psql -X -q "$URL" -c "DROP SCHEMA $SCHEMA CASCADE" >/dev/null 2>&1 || true' EXIT

BIN=$BIN STORE=$STORE WORK=$WORK ROUNDS=$ROUNDS HANDOFF=$HANDOFF python3 - <<'EOF'
import os, signal, subprocess, sys, time
sys.path.insert(0, "bench")
from benchlib import interleave, median, pct

B, S, W = os.environ["BIN"], os.environ["STORE"], os.environ["WORK"]
rounds, handoff = int(os.environ["ROUNDS"]), int(os.environ["HANDOFF"])
run = lambda *a: [B, "--store", S, "run", *a]

out = interleave(rounds, {
    "no pool": run("-c", "plain", "--", "true"),
    "--pool p:8": run("-c", "pooled", "--pool", "p:8", "--", "true"),
})
a, b = median(out["no pool"]), median(out["--pool p:8"])
print(f"per run, median of {rounds} interleaved: no pool {a:.2f} ms, --pool p:8 {b:.2f} ms "
      f"(+{b - a:.2f} ms, x{b / a:.2f}); p90 {pct(out['no pool'], 90):.2f} / {pct(out['--pool p:8'], 90):.2f} ms")

def ns(path):
    with open(path) as f:
        return int(f.read().strip())

def queued(channel):
    js = subprocess.run([B, "--store", S, "status", "--json"], capture_output=True, check=True).stdout
    import json
    for p in json.loads(js)["pools"]:
        if p["pool"] == "h" and any(w["channel"] == channel for w in p["queue"]):
            return True
    return False

def handoffs(kill, n):
    lat = []
    for i in range(n):
        for f in ("go", "end", "start"):
            try: os.unlink(f"{W}/{f}")
            except FileNotFoundError: pass
        holder = subprocess.Popen(run("-c", "a", "--pool", "h:1", "--", "sh", "-c",
            f'touch {W}/held; while [ ! -e {W}/go ]; do sleep 0.005; done; date +%s%N > {W}/end'))
        while not os.path.exists(f"{W}/held"): time.sleep(0.005)
        waiter = subprocess.Popen(run("-c", "b", "--pool", "h:1", "--", "sh", "-c", f"date +%s%N > {W}/start"))
        while not queued("b"): time.sleep(0.01)
        time.sleep(0.05)
        if kill:
            t0 = time.time_ns(); holder.send_signal(signal.SIGKILL)
        else:
            open(f"{W}/go", "w").close()
        holder.wait(); waiter.wait()
        if not kill: t0 = ns(f"{W}/end")
        lat.append((ns(f"{W}/start") - t0) / 1e6)
        os.unlink(f"{W}/held")
    return lat

for kill, n in ((False, handoff), (True, max(3, handoff // 3))):
    lat = handoffs(kill, n)
    what = "holder's chan-run SIGKILLed -> next command start" if kill else "holder's command end -> next command start"
    print(f"hand-off, {what}: p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms, max {max(lat):.1f} ms ({n} rounds)")
EOF
