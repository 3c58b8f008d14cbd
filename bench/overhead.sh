#!/usr/bin/env bash
# Per-run overhead: `chan-run run -c x -- true` against `flock L timeout 300 true`
# (and `flock L true`, for scale), side by side: every round runs each once in a fresh
# random order (bench/benchlib.py), medians and ratios over the rounds; on tmpfs
# (/dev/shm) and on disk (/var/tmp). On disk the goal allows the composition plus one
# durable write (temp file, fsync, rename, fsync of the directory), timed in the same
# rounds. For the breakdown, the same rounds also time each binary's start-up alone
# (`--version`) and the harness's floor (`true`). Instruction counts (noise-free):
# bench/callgrind.sh.
# Goals (issues 5 and 17): tmpfs: median(chan-run) <= 0.75 x median(flock+timeout);
#                  disk:  median(chan-run) <= median(flock+timeout) + median(durable write).
# chan-run is the build users install (scripts/build: static, against musl, on Linux);
# the same code built the default way for the host (dynamic, against glibc) is timed
# beside it, as the reference for what that build choice is worth.
# Usage: bench/overhead.sh [ROUNDS]      (default 1200; QUICK=1: 40)
set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
rounds=${1:-$([ "$QUICK" = 1 ] && echo 40 || echo 1200)}
# The same code built for the host the default way (`cargo build --release`: dynamic,
# glibc), when that is not what `bin` already is.
host_bin=
host_dir=${CARGO_TARGET_DIR:-$PWD/target}
case $host_dir in /*) ;; *) host_dir=$PWD/$host_dir ;; esac
if [ "$host_dir/release/chan-run" != "$bin" ] && cargo build --release --quiet --locked; then
  host_bin=$host_dir/release/chan-run
fi
for base in /dev/shm /var/tmp; do
  mkwork work "$base" overhead
  # The first run creates the state directory and active.json: not counted.
  "$bin" --state-dir "$work/state" run -c x -- "$true_bin"
  [ -z "$host_bin" ] || "$host_bin" --state-dir "$work/host-state" run -c x -- "$true_bin"
  echo "== per-run overhead on $base ($(fstype "$base")), $rounds interleaved rounds"
  python3 - "$bench_dir" "$rounds" "$base" "$(fstype "$base")" "$work" "$bin" "$true_bin" "$host_bin" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
from benchlib import interleave, median, pct, record
rounds, base, fs, work, bin, true = int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7]
host = sys.argv[8]
spec = {
    "chan-run run -c x -- true": [bin, "--state-dir", f"{work}/state", "run", "-c", "x", "--", true],
    "flock L timeout 300 true": ["/usr/bin/flock", f"{work}/flock.lock", "/usr/bin/timeout", "300", true],
    "flock L true": ["/usr/bin/flock", f"{work}/flock.lock", true],
    "durable write (in-process)": ("durable_write", work),
    "true (harness floor)": [true],
    "chan-run --version (start-up)": [bin, "--version"],
    "flock --version": ["/usr/bin/flock", "--version"],
    "timeout --version": ["/usr/bin/timeout", "--version"],
}
if host:
    spec["chan-run, host (glibc) build"] = [host, "--state-dir", f"{work}/host-state", "run", "-c", "x", "--", true]
res = interleave(rounds, spec)
names = list(spec)
print(f"  {'command':30} {'p50 ms':>8} {'p10 ms':>8} {'p90 ms':>8}")
for n in names:
    xs = res[n]
    print(f"  {n:30} {median(xs):8.3f} {pct(xs, 10):8.3f} {pct(xs, 90):8.3f}")
c, f, d = (median(res[n]) for n in (names[0], names[1], names[3]))
pair = median([a / b for a, b in zip(res[names[0]], res[names[1]])])
print(f"  chan-run / (flock + timeout): ratio of medians {c / f:.2f}, median of per-round ratios {pair:.2f}")
if fs == "tmpfs":
    limit, goal = 0.75 * f, "<= 0.75x flock+timeout"
else:
    limit, goal = f + d, "<= flock+timeout + 1 durable write"
met = c <= limit
print(f"  goal {goal}: limit {limit:.3f} ms, chan-run {c:.3f} ms -> {'met' if met else 'MISSED'}"
      f" ({'by' if met else 'over by'} {abs(c - limit):.3f} ms, {c / limit:.2f}x the limit)")
if host:
    s = median(res["chan-run, host (glibc) build"])
    print(f"  host (glibc, dynamic) build: {s:.3f} ms, {s / f:.2f}x flock+timeout ({'within' if s <= limit else 'over'} the goal's limit)")
extra = f"; durable write {d:.2f} ms" if fs != "tmpfs" else ""
if host:
    extra += f"; host (glibc) build {median(res['chan-run, host (glibc) build']):.2f} ms"
where = "tmpfs" if fs == "tmpfs" else f"disk, {fs}"
record({"id": f"overhead-{'tmpfs' if fs == 'tmpfs' else 'disk'}", "what": f"1. per-run overhead, median wall ({where})",
        "figure": f"{c:.2f} ms", "ref": f"flock+timeout {f:.2f} ms ({c / f:.2f}x){extra}",
        "goal": goal + (f" = {limit:.2f} ms"), "met": met,
        "detail": f"{c / limit:.2f}x the limit ({c - limit:+.2f} ms)"})
PY
done
