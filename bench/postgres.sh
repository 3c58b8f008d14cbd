#!/usr/bin/env bash
# The PostgreSQL store (`chan-run --store postgres://…`), on loopback against real
# servers started with scripts/test-postgres, next to the local store:
#   1. per-run overhead: `chan-run --store URL run -c ch -- true` vs the local store on
#      tmpfs (and on disk) vs `flock L timeout 300 true`, side by side in interleaved
#      rounds (bench/benchlib.py), medians and ratios. Then where the PG time goes:
#      - the protocol: request/response round trips per run (counted with strace on
#        chan-run's socket), transactions that write (xids the server hands out) and
#        WAL flushes (pg_stat_wal.wal_sync, on the fsync=on cluster) per run;
#      - in the same rounds, a minimal client (bench/pgwire.py, in-process: no client
#        library, no process start) doing a bare connect + close, and a connect + the
#        same number of round trips and commits with trivial statements; and one round
#        trip / one commit on an already open connection;
#      - CPU per run: chan-run's own (wait4's rusage) and the server backend's (the
#        postmaster's reaped-children CPU), for chan-run and for a bare connection.
#      And the same runs through PgBouncer in session mode (`scripts/test-postgres
#      pgbouncer bench session 16`): what reusing server backends saves.
#   2. hand-off latency, 8 waiters: bench/handoff.sh --store ... on tmpfs, whose rounds
#      alternate flock, the local store, each PG cluster and the PgBouncer.
# Two clusters: `bench`, as scripts/test-postgres makes every test cluster (fsync=off,
# synchronous_commit=off: no commit waits for the disk), and `bench-fsync`, the same
# with fsync, synchronous_commit and full_page_writes back on (ALTER SYSTEM + reload),
# as production servers run, its data on ${TMPDIR:-/tmp}'s file system. Clusters this
# script started are destroyed on exit; ones already running are left running.
# No server (no scripts/test-postgres, or it cannot start one): says why, records a
# "skipped" row and exits 0.
# Usage: bench/postgres.sh [ROUNDS] [HANDOFF_ROUNDS]   (default 600 and 80; QUICK=1: 30, 4)
#   TEST_POSTGRES=PATH uses another copy of scripts/test-postgres.
set -euo pipefail
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
rounds=${1:-$([ "$QUICK" = 1 ] && echo 30 || echo 600)}
handoff_rounds=${2:-$([ "$QUICK" = 1 ] && echo 4 || echo 80)}
cpu_runs=$([ "$QUICK" = 1 ] && echo 20 || echo 200)
tp=${TEST_POSTGRES:-$PWD/scripts/test-postgres}

skip() {
  echo "postgres.sh: SKIPPED, no PostgreSQL server: $1" >&2
  record "$(python3 -c 'import json, sys; print(json.dumps({"id": "pg-skipped", "what": "PostgreSQL store (bench/postgres.sh)",
    "figure": "-", "ref": "-", "goal": "-", "met": None, "skipped": True, "detail": sys.argv[1]}))' "$1")"
  exit 0
}

url='' url_fsync='' url_pool='' shm='' disk='' # set by `cluster NAME VAR` and `mkwork VAR ...`
started=()
_pg_cleanup() {
  local n
  for n in "${started[@]}"; do bash "$tp" destroy "$n" >/dev/null 2>&1 || echo "postgres.sh: could not destroy cluster $n" >&2; done
  _bench_cleanup
}
trap _pg_cleanup EXIT

cluster() { # cluster NAME VAR: VAR=the URL of NAME, started if it is not running
  local u
  if ! u=$(bash "$tp" url "$1" 2>/dev/null); then
    u=$(bash "$tp" start "$1") || return 1
    started+=("$1")
  fi
  printf -v "$2" %s "$u"
}

[ -f "$tp" ] || skip "$tp is missing (TEST_POSTGRES=PATH names another copy)"
cluster bench url || skip "$tp start bench failed (see its message above)"
if cluster bench-fsync url_fsync; then
  # fsync and full_page_writes are reloadable, synchronous_commit is per session.
  if ! python3 - "$bench_dir" "$url_fsync" <<'PY'; then
import sys, time
sys.path.insert(0, sys.argv[1])
from pgwire import Conn, one_value
url = sys.argv[2]
c = Conn(url)
for setting in ("fsync", "synchronous_commit", "full_page_writes"):
    c.query(f"ALTER SYSTEM SET {setting} = on")
c.query("SELECT pg_reload_conf()")
c.close()
deadline = time.monotonic() + 10
while one_value(url, "SELECT current_setting('fsync') || current_setting('synchronous_commit') || current_setting('full_page_writes')") != "ononon":
    if time.monotonic() > deadline:
        sys.exit("bench-fsync: the settings did not take")
    time.sleep(0.05)
PY
    echo "postgres.sh: cannot turn fsync on in cluster bench-fsync: no fsync=on rows" >&2
    url_fsync=
  fi
else
  echo "postgres.sh: cannot start a second cluster (bench-fsync): no fsync=on rows" >&2
fi
# The same server behind PgBouncer in session mode (one server connection per client,
# reset with DISCARD ALL, which drops advisory locks, when the client leaves): backends
# are reused, so no fork and warm caches. 16 server connections: the hand-off's 9
# clients each keep one.
if ! url_pool=$(bash "$tp" pgbouncer bench session 16); then
  echo "postgres.sh: cannot start PgBouncer in front of cluster bench: no pooled rows" >&2
  url_pool=
fi
pg_log=$(bash "$tp" log bench 2>/dev/null || true)
need strace strace || true

mkwork shm /dev/shm pg
mkwork disk /var/tmp pg
# First runs: create the tables (PG) and the state directories; not counted.
for u in "$url" $url_fsync $url_pool; do "$bin" --store "$u" run -c ch -- "$true_bin"; done
"$bin" --state-dir "$shm/state" run -c ch -- "$true_bin"
"$bin" --state-dir "$disk/state" run -c ch -- "$true_bin"

echo "== PostgreSQL store: per-run overhead, $rounds interleaved rounds"
echo "  fsync off: $url; fsync on: ${url_fsync:-(none)}; PgBouncer (session pool, fsync off): ${url_pool:-(none)}"
python3 - "$bench_dir" "$rounds" "$cpu_runs" "$shm" "$disk" "$bin" "$true_bin" "$url" "$url_fsync" \
  "$(command -v strace || true)" "$(fstype /dev/shm)" "$(fstype /var/tmp)" "$url_pool" "$pg_log" <<'PY'
import os, re, subprocess, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
from benchlib import interleave, median, pct, record
from pgwire import Conn, one_value, parse_url
rounds, cpu_runs = int(sys.argv[2]), int(sys.argv[3])
shm, disk, bin, true, url, url_fsync, strace, fs_shm, fs_disk, url_pool, pg_log = sys.argv[4:15]
data_dir = one_value(url, "SHOW data_directory")
fs_data = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", data_dir], capture_output=True, text=True).stdout.split()
fs_data = fs_data[0] if fs_data else "?"

def pg_run(u):
    return [bin, "--store", u, "run", "-c", "ch", "--", true]
def local_run(d):
    return [bin, "--state-dir", f"{d}/state", "run", "-c", "ch", "--", true]

# --- The protocol, counted.
def round_trips(u):
    """Request/response exchanges on chan-run's connection in one run: every send on the
    socket but the final Terminate waits for the server's answer."""
    if not strace:
        return None
    port = parse_url(u)[1]
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        subprocess.run([strace, "-f", "-qq", "-e", "trace=connect,sendto", "-o", out.name] + pg_run(u),
                       check=True, stdout=subprocess.DEVNULL)
        lines = out.read().splitlines()
    fds = {m[1] for l in lines if (m := re.search(rf"connect\((\d+), \{{sa_family=AF_INET6?, sin6?_port=htons\({port}\)", l))}
    sends = [l for l in lines if (m := re.search(r"sendto\((\d+), \"(.)", l)) and m[1] in fds and m[2] != "X"]
    return len(sends)

def server_counts(u, runs):
    """Per run: transactions that write (xids handed out) and WAL flushes (wal_sync)."""
    q = ("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint, "
         "(SELECT wal_sync FROM pg_stat_wal)")
    time.sleep(0.3)  # let the last backends exit and flush their statistics
    x0, s0 = (int(v) for v in Conn(u).query(q)[0])
    for _ in range(runs):
        subprocess.run(pg_run(u), check=True, stdout=subprocess.DEVNULL)
    time.sleep(0.5)
    x1, s1 = (int(v) for v in Conn(u).query(q)[0])
    return (x1 - x0) / runs, (s1 - s0) / runs

def statement_time(u, runs):
    """Per run, from the server's log with log_min_duration_statement=0 for chan-run's
    sessions only: the statements (parse messages) and the server's time in them (parse
    + bind + execute). The log is the one `scripts/test-postgres log` names; None
    without one."""
    log = pg_log
    if not log or not os.access(log, os.R_OK):
        return None
    start = os.path.getsize(log)
    logged = u + ("&" if "?" in u else "?") + "options=-c%20log_min_duration_statement%3D0"
    for _ in range(runs):
        subprocess.run(pg_run(logged), check=True, stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    with open(log, errors="replace") as f:
        f.seek(start)
        text = f.read()
    ms, parses = {}, {}
    for m in re.finditer(r"\[(\d+)\] LOG:  duration: ([\d.]+) ms(  parse)?", text):
        ms[m[1]] = ms.get(m[1], 0) + float(m[2])
        parses[m[1]] = parses.get(m[1], 0) + bool(m[3])
    return (median(list(parses.values())), median(list(ms.values()))) if len(ms) >= runs // 2 else None

rt = round_trips(url)
stmts = statement_time(url, 20)
writes, _ = server_counts(url, 20)
syncs = server_counts(url_fsync, 20)[1] if url_fsync else None
writes_n = round(writes)
print(f"  server: {one_value(url, 'SELECT version()').split(' on ')[0]}; data directories on"
      f" {fs_data}; shared_buffers {one_value(url, 'SHOW shared_buffers')}")
print(f"  protocol of one run: TCP connect + {rt if rt is not None else '?'} round trips (start-up included; strace),"
      f" {writes:.2f} transactions that write (xids per run)"
      + (f", {syncs:.2f} WAL flushes per run with fsync on (pg_stat_wal.wal_sync)" if syncs is not None else ""))
if stmts:
    print(f"  server log (log_min_duration_statement=0, 20 runs): {stmts[0]:.0f} statements per run, median"
          f" {stmts[1]:.2f} ms of server time in them (parse + bind + execute) per run")
if rt is None:
    rt = 11
    print("  (no strace: the in-process replay below assumes 11 round trips)")

# --- The in-process client: probes on open connections, and chan-run's shape replayed.
setup = ("CREATE TABLE IF NOT EXISTS chan_run_bench_probe (id int PRIMARY KEY, n bigint NOT NULL); "
         "INSERT INTO chan_run_bench_probe VALUES (1, 0), (2, 0) ON CONFLICT DO NOTHING; "
         "CREATE SEQUENCE IF NOT EXISTS chan_run_bench_seq")
cleanup = "DROP TABLE IF EXISTS chan_run_bench_probe; DROP SEQUENCE IF EXISTS chan_run_bench_seq"
urls = [u for u in (url, url_fsync) if u]
for u in urls:
    one_value(u, setup + "; SELECT 1")
open_off = Conn(url)
open_on = Conn(url_fsync) if url_fsync else None

def replay(u):
    """connect; the rest of chan-run's round trips, `writes_n` of them autocommit UPDATEs
    (nextval + one row, as the fence bump), the others SELECTs (the first and last take
    and drop an advisory lock); close."""
    selects = max(0, rt - 1 - writes_n)  # the start-up's round trip is the connect's
    def go():
        c = Conn(u)
        for i in range(selects):
            c.query("SELECT pg_try_advisory_lock(4242)" if i == 0 else
                    "SELECT pg_advisory_unlock(4242)" if i == selects - 1 else "SELECT 1")
        for _ in range(writes_n):
            c.query("UPDATE chan_run_bench_probe SET n = nextval('chan_run_bench_seq') WHERE id = 1")
        c.close()
    return go

commit = "UPDATE chan_run_bench_probe SET n = n + 1 WHERE id = 2"
spec = {"chan-run --store PG, fsync off": pg_run(url)}
if url_fsync:
    spec["chan-run --store PG, fsync on"] = pg_run(url_fsync)
if url_pool:
    spec["chan-run --store PgBouncer session"] = pg_run(url_pool)
spec.update({
    f"chan-run, local store ({fs_shm})": local_run(shm),
    f"chan-run, local store (disk, {fs_disk})": local_run(disk),
    "flock L timeout 300 true": ["/usr/bin/flock", f"{shm}/flock.lock", "/usr/bin/timeout", "300", true],
    "true (harness floor)": [true],
    "chan-run --version (start-up)": [bin, "--version"],
    "in-process: PG connect + close": lambda: Conn(url).close(),
    "in-process: same shape, fsync off": replay(url),
})
if url_fsync:
    spec["in-process: same shape, fsync on"] = replay(url_fsync)
spec["in-process: 1 round trip, open conn"] = lambda: open_off.query("SELECT 1")
spec["in-process: 1 commit, open, fsync off"] = lambda: open_off.query(commit)
if url_fsync:
    spec["in-process: 1 commit, open, fsync on"] = lambda: open_on.query(commit)
res = interleave(rounds, spec)
m = {n: median(xs) for n, xs in res.items()}
print(f"  {'command':40} {'p50 ms':>8} {'p10 ms':>8} {'p90 ms':>8}")
for n, xs in res.items():
    print(f"  {n:40} {m[n]:8.3f} {pct(xs, 10):8.3f} {pct(xs, 90):8.3f}")
pg, loc, locd = m["chan-run --store PG, fsync off"], m[f"chan-run, local store ({fs_shm})"], m[f"chan-run, local store (disk, {fs_disk})"]
ft = m["flock L timeout 300 true"]
conn, shape = m["in-process: PG connect + close"], m["in-process: same shape, fsync off"]
pair = median([a / b for a, b in zip(res["chan-run --store PG, fsync off"], res[f"chan-run, local store ({fs_shm})"])])
print(f"  PG (fsync off) / local store on {fs_shm}: ratio of medians {pg / loc:.2f}, median of per-round ratios {pair:.2f};"
      f" {pg / ft:.2f}x flock+timeout")
print(f"  PG - local = {pg - loc:.2f} ms: a bare connect + close {conn:.2f} ms; the other {rt - 1} round trips"
      f" ({writes_n} commits) with trivial statements {shape - conn:.2f} ms; left {pg - loc - shape:.2f} ms for"
      " chan-run's client side (postgres crate, its runtime, the heartbeat thread) and its real statements'"
      " server work beyond trivial ones"
      + (f" (the server log: {stmts[1]:.2f} ms of server time in chan-run's statements, on a backend whose"
         " catalog caches are cold)" if stmts else ""))
rows = [("off", pg, loc, fs_shm, shape)]
if url_fsync:
    pgs, shapes = m["chan-run --store PG, fsync on"], m["in-process: same shape, fsync on"]
    c_on, c_off = m["in-process: 1 commit, open, fsync on"], m["in-process: 1 commit, open, fsync off"]
    print(f"  PG (fsync on) / local store on disk: {pgs / locd:.2f}; fsync on - off: chan-run {pgs - pg:+.2f} ms,"
          f" in-process shape {shapes - shape:+.2f} ms; one commit on an open connection {c_on:.3f} vs {c_off:.3f} ms")
    rows.append(("on", pgs, locd, f"disk, {fs_disk}", shapes))
if url_pool:
    pool = m["chan-run --store PgBouncer session"]
    print(f"  through PgBouncer in session mode (fsync off): {pool:.2f} ms, {pool - pg:+.2f} ms vs direct,"
          f" {pool / loc:.2f}x the local store")

# --- CPU per run, not interleaved (the ticks are 10 ms: totals over cpu_runs runs).
def postmaster(u):
    c = Conn(u)  # open while its backend's /proc entry is read
    try:
        with open(f"/proc/{c.backend_pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    finally:
        c.close()
def reaped_cpu(pid):
    """CPU seconds of pid's exited and reaped children (the server's backends)."""
    with open(f"/proc/{pid}/stat") as f:
        v = f.read().rsplit(")", 1)[1].split()
    return (int(v[13]) + int(v[14])) / os.sysconf("SC_CLK_TCK")
def own_cpu(argv):
    pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=[
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0), (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0)])
    _, status, ru = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv} failed")
    return (ru.ru_utime + ru.ru_stime) * 1000
try:
    pm = postmaster(url)
    reaped_cpu(pm)
except OSError as e:
    pm = None
    print(f"  (no server CPU figures: cannot read the postmaster's /proc entry: {e})")
nan = float("nan")
def batch(fn):
    time.sleep(0.3)
    s0 = reaped_cpu(pm) if pm else 0
    own = [fn() for _ in range(cpu_runs)]
    time.sleep(0.5)
    return median(own), ((reaped_cpu(pm) - s0) * 1000 / cpu_runs if pm else nan)
def bare():
    Conn(url).close()
    return 0.0
cpu_pg, srv_pg = batch(lambda: own_cpu(pg_run(url)))
cpu_loc, _ = batch(lambda: own_cpu(local_run(shm)))
_, srv_conn = batch(bare)
shape_off = replay(url)
_, srv_shape = batch(lambda: shape_off() or 0.0)
print(f"  CPU per run ({cpu_runs} runs each): chan-run's own {cpu_pg:.2f} ms with PG vs {cpu_loc:.2f} ms local;"
      f" the server backend's {srv_pg:.2f} ms per chan-run run, {srv_conn:.2f} ms per bare connect + close,"
      f" {srv_shape:.2f} ms per in-process shape (fsync off)")

for u in urls:
    one_value(u, cleanup + "; SELECT 1")
for fsync, p, l, where, sh in rows:
    record({"id": f"pg-overhead-fsync-{fsync}",
            "what": f"PG store, per-run overhead, median wall (fsync {fsync}, loopback)",
            "figure": f"{p:.2f} ms",
            "ref": f"local store ({where}) {l:.2f} ms ({p / l:.1f}x); flock+timeout {ft:.2f} ms",
            "goal": "(none; reported)", "met": None,
            "detail": f"+{p - l:.2f} ms vs local: connect {conn:.2f}, {rt} round trips / {writes_n} commits"
                      f" (in-process shape {sh:.2f} ms)"})
if url_pool:
    record({"id": "pg-overhead-pool", "what": "PG store through PgBouncer (session mode), per-run overhead (fsync off)",
            "figure": f"{pool:.2f} ms", "ref": f"direct {pg:.2f} ms; local store ({fs_shm}) {loc:.2f} ms ({pool / loc:.1f}x)",
            "goal": "(none; reported)", "met": None, "detail": f"{pool - pg:+.2f} ms vs direct: no new backend per run"})
PY

echo
stores=(--store "pg-fsync-off=$url")
[ -z "$url_fsync" ] || stores+=(--store "pg-fsync-on=$url_fsync")
[ -z "$url_pool" ] || stores+=(--store "pg-pool=$url_pool")
bash "$bench_dir/handoff.sh" "${stores[@]}" "$handoff_rounds" /dev/shm
