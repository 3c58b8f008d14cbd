#!/usr/bin/env python3
"""Runs a command with prctl(PR_GET_AUXV) failing (EINVAL), by a seccomp filter.

Why: chan-run's rustix (linux_raw backend) reads the aux vector with PR_GET_AUXV
(Linux >= 6.4). Valgrind 3.19 passes that prctl to the kernel, which answers with the
real process's vDSO address, unmapped in valgrind's guest: rustix reads it on its
first clock_gettime and the run dies of SIGSEGV (rustix issue #1559). With the prctl
failing, rustix falls back to /proc/self/auxv, which valgrind answers with the guest's
own aux vector. The cost to the count: one failed prctl and one small file read.
Usage: no-pr-get-auxv.py COMMAND [ARGS...]   (x86_64 and aarch64; elsewhere it just
runs the command)
"""

import ctypes
import os
import platform
import struct
import sys

PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
PR_GET_AUXV = 0x41555856
EINVAL = 22
ARCH = {"x86_64": (0xC000003E, 157), "aarch64": (0xC00000B7, 167)}  # (AUDIT_ARCH, __NR_prctl)


def install():
    arch = ARCH.get(platform.machine())
    if arch is None:
        return
    audit_arch, nr_prctl = arch
    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K
    allow, errno = 0x7FFF0000, 0x00050000 | EINVAL
    prog = [
        (ld, 0, 0, 4),  # seccomp_data.arch
        (jeq, 0, 5, audit_arch),
        (ld, 0, 0, 0),  # seccomp_data.nr
        (jeq, 0, 3, nr_prctl),
        (ld, 0, 0, 16),  # seccomp_data.args[0], low 32 bits
        (jeq, 0, 1, PR_GET_AUXV),
        (ret, 0, 0, errno),
        (ret, 0, 0, allow),
    ]
    filt = b"".join(struct.pack("HBBI", *i) for i in prog)
    buf = ctypes.create_string_buffer(filt, len(filt))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = Fprog(len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


if __name__ == "__main__":
    install()
    os.execvp(sys.argv[1], sys.argv[1:])
