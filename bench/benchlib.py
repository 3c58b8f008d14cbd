"""Helpers for the bench/*.sh scripts' python parts (`sys.path.insert(0, "bench")`).

interleave() times commands side by side: every round runs each command once, in a
fresh random order, so drift on a shared machine (wall times here wander 20-30 % over
minutes) hits every command alike instead of whichever ran last. Each sample is the
wall time of posix_spawn (vfork + exec) to waitpid, measured in this process; the
harness's own cost is the `floor` a run of `true` shows, the same for every command.
"""

import gc
import json
import os
import random
import statistics
import time


def pct(xs, p):
    """The p-th percentile (nearest rank) of xs."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def median(xs):
    return statistics.median(xs)


def spawn_wait(argv, stdout="/dev/null"):
    """Runs argv with stdin and stdout on /dev/null (stderr inherited); returns
    (wall seconds, exit status)."""
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, stdout, os.O_WRONLY, 0),
    ]
    t0 = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
    _, status = os.waitpid(pid, 0)
    t1 = time.perf_counter()
    return t1 - t0, os.waitstatus_to_exitcode(status)


def durable_write(directory, counter=[0]):
    """The one durable write the overhead goal allows on disk: a small file written to
    a temporary name, fsync, rename over the target, fsync of the directory."""
    counter[0] += 1
    tmp = os.path.join(directory, f".dw.{os.getpid()}.{counter[0]}")
    t0 = time.perf_counter()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.write(fd, b"x" * 512)
    os.fsync(fd)
    os.close(fd)
    os.rename(tmp, os.path.join(directory, "durable-write.json"))
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    os.fsync(dfd)
    os.close(dfd)
    return time.perf_counter() - t0


def interleave(rounds, spec, warmup=5):
    """spec: {name: argv list | ("durable_write", dir) | a function}. Runs `warmup`
    unrecorded rounds, then `rounds` recorded ones; returns {name: [ms per round, ...]},
    so out[a][i] and out[b][i] are a pair measured side by side. A function is timed
    in-process, from call to return (bench/postgres.sh: a connection, a query)."""
    names = list(spec)
    out = {n: [] for n in names}
    gc.disable()
    try:
        for r in range(warmup + rounds):
            order = names[:]
            random.shuffle(order)
            for n in order:
                s = spec[n]
                if isinstance(s, tuple) and s[0] == "durable_write":
                    dt = durable_write(s[1])
                elif callable(s):
                    t0 = time.perf_counter()
                    s()
                    dt = time.perf_counter() - t0
                else:
                    dt, code = spawn_wait(s)
                    if code != 0:
                        raise SystemExit(f"{n}: {s} exited {code}")
                if r >= warmup:
                    out[n].append(dt * 1000)
    finally:
        gc.enable()
    return out


def record(obj):
    """Appends one result (a dict) to $BENCH_RESULTS, which run-all.sh summarizes."""
    path = os.environ.get("BENCH_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(obj) + "\n")
