#!/usr/bin/env bash
# Timeout precision: how late after `--timeout` the command gets SIGTERM. The command
# is bash with a TERM trap that writes $EPOCHREALTIME to a file, waiting on a
# background sleep (`wait` returns at once on a trapped signal; a foreground `sleep`
# would delay the trap). Lateness = the trap's stamp - the moment the harness launched
# chan-run (CLOCK_REALTIME on both sides) - the timeout, so chan-run's own start-up,
# lock and spawn count against it. GNU `timeout` runs the same command in the same
# rounds (random order per round) for reference. State on tmpfs (/dev/shm).
# Goal (issue 5): p99 under 20 ms.
# Usage: bench/timeout.sh [SAMPLES] [TIMEOUT_S]   (default 250, 0.1; QUICK=1: 10)
set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
samples=${1:-$([ "$QUICK" = 1 ] && echo 10 || echo 250)}
limit=${2:-0.1}
mkwork work /dev/shm timeout
"$bin" --state-dir "$work/state" run -q -c t -- "$true_bin"
echo "== timeout precision: --timeout ${limit}s, $samples samples per tool, interleaved"
python3 - "$bench_dir" "$samples" "$limit" "$work" "$bin" <<'PY'
import os, random, sys, time
sys.path.insert(0, sys.argv[1])
from benchlib import pct, median, record
samples, limit, work, bin = int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
bash = "/bin/bash"
script = 'trap \'echo $EPOCHREALTIME > "$1"; exit 0\' TERM; sleep 10 & wait $!; echo "no SIGTERM" >&2; exit 3'
argv = {
    "chan-run": [bin, "--state-dir", f"{work}/state", "run", "-q", "-c", "t", "-t", str(limit), "--"],
    "timeout": ["/usr/bin/timeout", str(limit)],
}
late = {k: [] for k in argv}
null = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0)]
for i in range(samples):
    order = list(argv)
    random.shuffle(order)
    for tool in order:
        out = f"{work}/term.{tool}"
        if os.path.exists(out):
            os.unlink(out)
        cmd = argv[tool] + [bash, "-c", script, "bash", out]
        t0 = time.time()
        pid = os.posix_spawn(cmd[0], cmd, os.environ, file_actions=null)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 124:
            raise SystemExit(f"{tool}: exit {code}, expected 124 (timed out)")
        late[tool].append((float(open(out).read()) - t0 - limit) * 1000)
print(f"  {'tool':9} {'n':>4} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}   (late after the timeout)")
for t, xs in late.items():
    print(f"  {t:9} {len(xs):4d} {pct(xs, 50):8.2f} {pct(xs, 90):8.2f} {pct(xs, 99):8.2f} {max(xs):8.2f}")
c, g = late["chan-run"], late["timeout"]
record({"id": "timeout", "what": "6. timeout precision, SIGTERM late by",
        "figure": f"p50 {pct(c, 50):.2f} / p99 {pct(c, 99):.2f} ms",
        "ref": f"GNU timeout p50 {pct(g, 50):.2f} / p99 {pct(g, 99):.2f} ms",
        "goal": "p99 < 20 ms", "met": pct(c, 99) < 20,
        "detail": f"{pct(c, 99) / 20:.2f}x the limit"})
PY
