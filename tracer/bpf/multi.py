"""uprobe_multi links (Linux 6.6+): one BPF link puts one program on many sites of a file.

Why: a uprobe attached the classic way is a perf event, and closing one makes the kernel wait
out a grace period while it holds the global event_mutex (perf_trace_event_unreg), so detaching
N probes costs N grace periods one after another, threads or not (about 0.1 s each here:
1000 probes took 109 s). A uprobe_multi link is released with no such wait. bcc 0.26 cannot make
one, so the link is created with the bpf(2) system call (tracer.bpf.kernel), on programs loaded
with expected_attach_type BPF_TRACE_UPROBE_MULTI.
"""
from __future__ import annotations

import errno
import os
from typing import Optional, Sequence

from . import kernel
from .kernel import BPF_PROG_TYPE_KPROBE, BPF_TRACE_UPROBE_MULTI  # noqa: F401 (re-exported)

_supported: Optional[bool] = None


def link(prog_fd: int, path: str, offsets: Sequence[int], is_return: bool) -> int:
    """One link putting the program (loaded with expected_attach_type BPF_TRACE_UPROBE_MULTI)
    at these file offsets of path, on every process; its fd, closed to detach them all."""
    return kernel.uprobe_multi_link(prog_fd, path, offsets, is_return)


def supported() -> bool:
    """Whether this kernel makes uprobe_multi links, found as libbpf finds it: a trivial program
    loaded for them, linked to "/", fails with EBADF (a directory is no file to probe) only on a
    kernel that knows the link type. Asked once per process."""
    global _supported
    if _supported is None:
        try:
            _supported = probe()
        except PermissionError:
            _supported = False
    return _supported


def probe() -> bool:
    """supported(), asked now; PermissionError when this process may not load programs."""
    insns = bytes.fromhex("b700000000000000" "9500000000000000")  # r0 = 0; exit
    try:
        prog = kernel.prog_load(BPF_PROG_TYPE_KPROBE, insns, "GPL",
                                expected_attach_type=BPF_TRACE_UPROBE_MULTI)
    except PermissionError:
        raise
    except OSError:  # (an older kernel refuses the attach type)
        return False
    try:
        fd = link(prog, "/", [0], False)
    except OSError as e:
        return e.errno == errno.EBADF
    else:  # not expected, but it is a link: the kernel makes them
        os.close(fd)
        return True
    finally:
        os.close(prog)
