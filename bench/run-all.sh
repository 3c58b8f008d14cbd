#!/usr/bin/env bash
# Runs every benchmark of issue 5 and prints one summary table: each figure next to
# its reference, the goal, and whether it was met (and by how much), plus the machine
# it ran on. About 6-8 minutes on a 2-core machine once built; QUICK=1 runs a short
# smoke version of each (about a minute; its figures are not for publishing).
# Usage: bench/run-all.sh [SUMMARY.md]    (also writes the summary to SUMMARY.md if given)
# The scripts, one per measurement (each also runs alone; see bench/README.md):
#   callgrind.sh   7. instructions per run (first: it needs no quiet machine)
#   overhead.sh    1. per-run overhead, tmpfs and disk
#   throughput.sh  2. serialized throughput, 4 loops x 500 runs on one channel
#   handoff.sh     3. hand-off latency with 8 waiters
#   scale.sh       4. 1 to 100,000 channels in active.json: overhead and peak RSS
#   passthrough.sh 5. 1 GiB through chan-run's stdout
#   timeout.sh     6. timeout precision
#   pool.sh        pools: the per-run cost of --pool p:8 with free seats, and a seat's
#                  hand-off latency against a channel's (local store)
#   postgres.sh    the PostgreSQL store: per-run overhead and hand-off latency against
#                  throw-away servers from scripts/test-postgres (skipped, with the reason
#                  in the summary, when no server can be started)
set -euo pipefail
cd "$(dirname "$0")/.."
summary_out=${1:-}
export QUICK=${QUICK:-0}
results=$(mktemp /tmp/chan-run-bench.XXXXXX)
trap 'rm -f "$results"' EXIT
export BENCH_RESULTS=$results

scripts/build >/dev/null
start=$(date -u +%Y-%m-%dT%H:%M:%SZ)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
t0=$EPOCHREALTIME
failed=()
for script in callgrind overhead throughput handoff scale passthrough timeout pool postgres; do
  echo
  echo "######## bench/$script.sh"
  s0=$EPOCHREALTIME
  if ! bash "bench/$script.sh"; then
    failed+=("$script")
    echo "{\"id\": \"$script\", \"what\": \"bench/$script.sh\", \"figure\": \"-\", \"ref\": \"-\", \"goal\": \"-\", \"met\": false, \"detail\": \"the script FAILED\"}" >>"$results"
  fi
  echo "(bench/$script.sh took $(python3 -c "print(f'{$EPOCHREALTIME - $s0:.0f}')") s)"
done
elapsed=$(python3 -c "print(f'{$EPOCHREALTIME - $t0:.0f}')")
load_end=$(cut -d' ' -f1-3 /proc/loadavg)

cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
fs_shm=$(findmnt -n -o FSTYPE -T /dev/shm | head -1)
fs_disk=$(findmnt -n -o FSTYPE -T /var/tmp | head -1)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=
if git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null | grep -q .; then dirty=" (src modified)"; fi
python3 - "$results" "$summary_out" <<PY
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
order = ["overhead-tmpfs", "overhead-disk", "throughput-tmpfs", "throughput-disk", "handoff-tmpfs",
         "handoff-disk", "scale-time-tmpfs", "scale-time-disk", "scale-new-tmpfs", "scale-new-disk",
         "scale-rss-tmpfs", "scale-rss-disk", "rss-run-tmpfs", "rss-run-disk",
         "passthrough-rate", "passthrough-rss", "timeout", "callgrind", "pool-overhead-local",
         "pool-handoff-local",
         "pg-overhead-fsync-off", "pg-overhead-fsync-on", "pg-overhead-pool", "handoff-pg-fsync-off",
         "handoff-pg-fsync-on", "handoff-pg-pool", "pg-skipped"]
rows.sort(key=lambda r: order.index(r["id"]) if r["id"] in order else len(order))
def verdict(r):
    if r.get("skipped"):
        return f"skipped - {r['detail']}"
    return {True: "met", False: "**MISSED**", None: "(no goal)"}[r["met"]] + f" - {r['detail']}"
out = []
out.append("| measurement | chan-run | reference (same run) | goal | result |")
out.append("|---|---|---|---|---|")
for r in rows:
    out.append(f"| {r['what']} | {r['figure']} | {r['ref']} | {r['goal']} | {verdict(r)} |")
met = sum(r["met"] is True for r in rows)
missed = sum(r["met"] is False for r in rows)
facts = [
    f"machine: $cpu, $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo); kernel $(uname -r)",
    f"filesystems: /dev/shm $fs_shm (tmpfs rows), /var/tmp $fs_disk (disk rows)",
    f"date: $start; chan-run $commit$dirty; $(rustc --version 2>/dev/null | cut -d' ' -f1-2); QUICK=$QUICK; $elapsed s in all",
    f"load average (1/5/15 min): $load_start at the start, $load_end at the end (a shared machine: other jobs ran too)",
    f"goals: {met} met, {missed} missed" + (" (QUICK=1: smoke-test figures, not for publishing)" if "$QUICK" == "1" else ""),
]
text = "\n".join(out) + "\n\n" + "\n".join(f"- {f}" for f in facts) + "\n"
print()
print("######## summary")
print(text)
if sys.argv[2]:
    open(sys.argv[2], "w").write(text)
PY
if [ ${#failed[@]} -gt 0 ]; then
  echo "run-all.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
