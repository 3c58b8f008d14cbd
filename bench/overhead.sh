#!/usr/bin/env bash
# Per-run overhead: `chan-run run -c x -- true` against `flock L timeout 300 true`,
# measured side by side by hyperfine (interleaved warm-up, many runs), on tmpfs and on
# disk, plus callgrind instruction counts (noise-free on a shared machine).
# Usage: bench/overhead.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-500}
command -v hyperfine >/dev/null || { apt-get update -qq && apt-get install -y -qq hyperfine; }
cargo build --release --quiet
bin=$PWD/target/release/chan-run
true_bin=$(command -v true)
for base in /dev/shm /var/tmp; do
  work=$(mktemp -d "$base/chan-run-overhead.XXXXXX")
  "$bin" --state-dir "$work/state" run -c x -- "$true_bin"
  echo "== $base ($(stat -f -c %T "$base"))"
  hyperfine -N -w 30 -r "$runs" --export-json "$work/h.json" \
    "$bin --state-dir $work/state run -c x -- $true_bin" \
    "flock $work/flock.lock timeout 300 $true_bin" \
    "flock $work/flock.lock $true_bin" >/dev/null
  python3 - "$work/h.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
med = [x["median"] * 1000 for x in r]
names = ["chan-run run -c x -- true", "flock L timeout 300 true", "flock L true"]
for n, m in zip(names, med):
    print(f"  {n:28} median {m:6.2f} ms")
print(f"  chan-run / (flock + timeout) = {med[0] / med[1]:.2f}")
PY
  rm -rf "$work"
done
if command -v valgrind >/dev/null; then
  work=$(mktemp -d /dev/shm/chan-run-cg.XXXXXX)
  "$bin" --state-dir "$work/state" run -c x -- "$true_bin"
  count() { valgrind --tool=callgrind --callgrind-out-file=/dev/null "$@" 2>&1 >/dev/null | sed -n 's/.*Collected : //p' | tail -1; }
  c=$(count "$bin" --state-dir "$work/state" run -c x -- "$true_bin")
  f=$(count flock "$work/f.lock" "$true_bin")
  t=$(count timeout 300 "$true_bin")
  echo "== instructions (callgrind, chan-run's own process; child not counted)"
  echo "  chan-run run: $c   flock: $f   timeout: $t   flock+timeout: $((f + t))"
  rm -rf "$work"
fi
