#!/usr/bin/env bash
# Pass-through: 1 GiB of the command's stdout through chan-run, against the same
# pipeline with `cat` in chan-run's place:
#   chan-run run -c x -- head -c 1G /dev/zero | cat >/dev/null
#   head -c 1G /dev/zero | cat                | cat >/dev/null
# Each middle stage runs under `/usr/bin/time -f "%M %w"`: peak RSS (for chan-run the max
# over chan-run and the `head` it waits for) and voluntary context switches (chan-run's
# count includes head's; a proxy for how many bytes each wake-up moves). Pairs alternate which goes first;
# MB/s (10^6 bytes/s) is from the median wall. One more run counts the bytes that come
# out of chan-run (nothing lost). State on tmpfs (/dev/shm).
# Goals (issue 5): >= 0.5x cat's MB/s, and chan-run's peak RSS under 16 MiB.
# Usage: bench/passthrough.sh [PAIRS] [SIZE]   (default 9 pairs of 1G; QUICK=1: 2 of 256M)
set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
pairs=${1:-$([ "$QUICK" = 1 ] && echo 2 || echo 9)}
size=${2:-$([ "$QUICK" = 1 ] && echo 256M || echo 1G)}
bytes=$(numfmt --from=iec "$size")
need /usr/bin/time time
mkwork work /dev/shm passthrough
state=$work/state
"$bin" --state-dir "$state" run -q -c x -- "$true_bin"

one() { # one TOOL: prints "start end rss-KiB voluntary-switches"
  local t0 t1
  if [ "$1" = chan-run ]; then
    t0=$EPOCHREALTIME
    /usr/bin/time -f "%M %w" -o "$work/rss" "$bin" --state-dir "$state" run -q -c x -- head -c "$size" /dev/zero | cat >/dev/null
    t1=$EPOCHREALTIME
  else
    t0=$EPOCHREALTIME
    head -c "$size" /dev/zero | /usr/bin/time -f "%M %w" -o "$work/rss" cat | cat >/dev/null
    t1=$EPOCHREALTIME
  fi
  echo "$t0 $t1 $(tail -1 "$work/rss")"
}

echo "== pass-through of $size ($bytes bytes), $pairs alternating pairs, state on /dev/shm"
samples=()
for ((p = 0; p < pairs; p++)); do
  if ((p % 2 == 0)); then order="cat chan-run"; else order="chan-run cat"; fi
  for tool in $order; do
    read -r t0 t1 rss csw < <(one "$tool")
    samples+=("$tool:$t0:$t1:$rss:$csw")
  done
done
out=$("$bin" --state-dir "$state" run -q -c x -- head -c "$size" /dev/zero | wc -c)
python3 - "$bench_dir" "$bytes" "$out" "${samples[@]}" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
from benchlib import median, record
n, out = int(sys.argv[2]), int(sys.argv[3])
wall, rss, csw = ({"cat": [], "chan-run": []} for _ in range(3))
for s in sys.argv[4:]:
    tool, t0, t1, kib, sw = s.split(":")
    wall[tool].append(float(t1) - float(t0))
    rss[tool].append(int(kib))
    csw[tool].append(int(sw))
rate = {t: n / median(w) / 1e6 for t, w in wall.items()}
for t in ("cat", "chan-run"):
    each = " ".join(f"{n / w / 1e6:.0f}" for w in wall[t])
    print(f"  {t:9} median {rate[t]:6.0f} MB/s (each: {each})   peak RSS max {max(rss[t]) / 1024:.1f} MiB")
for t in ("cat", "chan-run"):
    sw = median(csw[t])
    print(f"  {t:9} voluntary context switches, median {sw:.0f} ({n / max(sw, 1) / 1024:.0f} KiB moved per switch)"
          + (" (head's included)" if t == "chan-run" else ""))
ratio = rate["chan-run"] / rate["cat"]
mib = max(rss["chan-run"]) / 1024
print(f"  chan-run / cat = {ratio:.2f} (goal >= 0.5); chan-run peak RSS {mib:.1f} MiB (goal < 16)")
print(f"  bytes out of chan-run in the counting run: {out} of {n} {'(all)' if out == n else '(LOST BYTES)'}")
record({"id": "passthrough-rate", "what": f"5. pass-through {n >> 20} MiB, throughput",
        "figure": f"{rate['chan-run']:.0f} MB/s", "ref": f"cat {rate['cat']:.0f} MB/s ({ratio:.2f}x)",
        "goal": ">= 0.5x cat" + ("" if out == n else ", every byte out"), "met": ratio >= 0.5 and out == n,
        "detail": f"{ratio / 0.5:.2f}x the goal ({ratio:.2f} vs 0.50)" + ("" if out == n else f"; {out} of {n} bytes out")})
record({"id": "passthrough-rss", "what": f"5. pass-through {n >> 20} MiB, chan-run peak RSS",
        "figure": f"{mib:.1f} MiB", "ref": f"cat {max(rss['cat']) / 1024:.1f} MiB",
        "goal": "< 16 MiB", "met": mib < 16, "detail": f"{mib / 16:.2f}x the limit"})
PY
