#!/usr/bin/env bash
# Instructions per run under `valgrind --tool=callgrind` (user-space instructions,
# noise-free on a shared machine where wall times drift 20-30 %): chan-run's own
# process, all its threads (the command, `true`, is not traced), next to `flock L true`
# and `timeout 300 true` (each its own process only), median of a few runs. Then,
# as evidence for where the rest of a run's time goes (kernel work, which callgrind
# does not see), syscalls per run of each side under `strace -f -c` (all processes,
# `true` included on both sides), and chan-run's top inclusive costs by function
# (the release binary is stripped: only libc and ld.so have names).
# Every run goes through bench/no-pr-get-auxv.py: without it chan-run dies of SIGSEGV
# under valgrind 3.19 at its first clock_gettime (see that file), and callgrind still
# prints a "Collected" count, of a run cut short. Each run's exit status is checked.
# Goal (issue 17): fewer than flock and timeout together.
# Counts repeat to within 0.1 % but for one step: glibc gives each of chan-run's two
# output pumps its 256 KiB buffer either from fresh mmap (already zero) or from an
# arena (zeroed by memset, ~130k instructions), depending on thread timing; so the
# range over the runs is printed too.
# Usage: bench/callgrind.sh [RUNS]   (default 5; QUICK=1: 1)
set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
runs=${1:-$([ "$QUICK" = 1 ] && echo 1 || echo 5)}
need valgrind valgrind
mkwork work /dev/shm callgrind
"$bin" --state-dir "$work/state" run -c x -- "$true_bin"

vg() { python3 "$bench_dir/no-pr-get-auxv.py" valgrind --tool=callgrind "$@"; }
count() { # count ARGV...: the callgrind instruction count of ARGV's own process
  local rc=0
  vg --callgrind-out-file=/dev/null --log-file="$work/vg.log" "$@" >/dev/null || rc=$?
  if [ $rc != 0 ]; then
    echo "callgrind.sh: '$*' exited $rc under valgrind:" >&2
    grep -v '^==[0-9]*== *$' "$work/vg.log" | tail -15 >&2
    exit 1
  fi
  sed -n 's/.*Collected : //p' "$work/vg.log" | tail -1
}
med() { printf '%s\n' "$@" | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
cs=() fs=() ts=()
for ((i = 0; i < runs; i++)); do
  cs+=("$(count "$bin" --state-dir "$work/state" run -c x -- "$true_bin")")
  fs+=("$(count flock "$work/f.lock" "$true_bin")")
  ts+=("$(count timeout 300 "$true_bin")")
done
c=$(med "${cs[@]}") f=$(med "${fs[@]}") t=$(med "${ts[@]}")
range() { printf '%s\n' "$@" | sort -n | sed -n '1p;$p' | paste -sd- -; }
echo "== instructions per run (callgrind, median of $runs; each tool's own process, the command not counted)"
printf '  %-28s %12s   (range %s)\n' "chan-run run -c x -- true" "$c" "$(range "${cs[@]}")" \
  "flock L true" "$f" "$(range "${fs[@]}")" "timeout 300 true" "$t" "$(range "${ts[@]}")"
printf '  %-28s %12s\n' "flock + timeout" "$((f + t))"
echo "  chan-run / (flock + timeout) = $(python3 -c "print(f'{$c / ($f + $t):.2f}')")"

if command -v strace >/dev/null; then
  echo "== syscalls per run (strace -f -c, every process of the run)"
  for side in chan-run composition; do
    if [ $side = chan-run ]; then
      strace -f -c -o "$work/st.$side" "$bin" --state-dir "$work/state" run -c x -- "$true_bin"
    else
      strace -f -c -o "$work/st.$side" flock "$work/f.lock" timeout 300 "$true_bin"
    fi
    python3 - "$work/st.$side" "$side" <<'PY'
import sys
rows = []
for line in open(sys.argv[1]):
    p = line.split()
    if len(p) >= 5 and p[0][0].isdigit() and p[-1] != "total":
        calls = int(p[3])
        rows.append((calls, p[-1]))
rows.sort(reverse=True)
total = sum(c for c, _ in rows)
top = ", ".join(f"{n} {c}" for c, n in rows[:8])
procs = sum(c for c, n in rows if n in ("clone", "clone3", "fork", "vfork"))
print(f"  {sys.argv[2]:12} {total:4d} syscalls, {procs} clone/clone3; top: {top}")
PY
  done
fi

vg --callgrind-out-file="$work/cg.out" "$bin" --state-dir "$work/state" run -c x -- "$true_bin" 2>/dev/null
echo "== chan-run's largest inclusive costs with a name (callgrind_annotate --inclusive=yes)"
callgrind_annotate --inclusive=yes "$work/cg.out" 2>/dev/null |
  grep -E '^ *[0-9,]+ \([ 0-9.]+%\) ' | grep -v '???' | sed -n '2,12p' |
  sed -E 's/ \[[^]]*\]$//; s/^/  /'

python3 - "$bench_dir" "$c" "$f" "$t" "$(range "${cs[@]}")" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
from benchlib import record
c, f, t = (int(x) for x in sys.argv[2:5])
lo, hi = (int(x) for x in sys.argv[5].split("-"))
record({"id": "callgrind", "what": "7. instructions per run (callgrind)",
        "figure": f"{c / 1000:.0f} k" + (f" ({lo / 1000:.0f}-{hi / 1000:.0f} k)" if hi - lo > 5000 else ""), "ref": f"flock {f / 1000:.0f} k + timeout {t / 1000:.0f} k = {(f + t) / 1000:.0f} k",
        "goal": "< flock+timeout (issue 17)", "met": c < f + t, "detail": f"{c / (f + t):.2f}x flock+timeout"})
PY
