"""uprobe_multi links (Linux 6.6+): one BPF link puts one program on many sites of a file.

Why: a uprobe attached the classic way is a perf event, and closing one makes the kernel wait
out a grace period while it holds the global event_mutex (perf_trace_event_unreg), so detaching
N probes costs N grace periods one after another, threads or not (about 0.1 s each here:
1000 probes took 109 s). A uprobe_multi link is released with no such wait. bcc 0.26 cannot make
one, so the link is created here with the bpf(2) system call, on programs bcc loaded with
expected_attach_type BPF_TRACE_UPROBE_MULTI.
"""
from __future__ import annotations

import ctypes as ct
import errno
import os
from typing import Optional, Sequence

SYS_BPF = 321                 # x86-64
BPF_PROG_LOAD = 5
BPF_LINK_CREATE = 28
BPF_PROG_TYPE_KPROBE = 2
BPF_TRACE_UPROBE_MULTI = 48   # enum bpf_attach_type
BPF_F_UPROBE_MULTI_RETURN = 1
ATTR_SIZE = 128               # of union bpf_attr; the kernel takes a shorter, zero-padded one

_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long
_supported: Optional[bool] = None


def _bpf(cmd: int, attr) -> int:
    """bpf(2); OSError with the kernel's errno on failure."""
    fd = _libc.syscall(SYS_BPF, cmd, ct.byref(attr), ATTR_SIZE)
    if fd < 0:
        e = ct.get_errno()
        raise OSError(e, os.strerror(e))
    return int(fd)


def _u32(attr, at: int, value: int) -> None:
    ct.c_uint32.from_buffer(attr, at).value = value


def _u64(attr, at: int, value: int) -> None:
    ct.c_uint64.from_buffer(attr, at).value = value


def link(prog_fd: int, path: str, offsets: Sequence[int], is_return: bool) -> int:
    """One link putting the program (loaded with expected_attach_type BPF_TRACE_UPROBE_MULTI)
    at these file offsets of path, on every process; its fd, closed to detach them all."""
    name = ct.create_string_buffer(os.fsencode(path))
    offs = (ct.c_uint64 * len(offsets))(*offsets)
    attr = (ct.c_uint8 * ATTR_SIZE)()
    _u32(attr, 0, prog_fd)
    _u32(attr, 8, BPF_TRACE_UPROBE_MULTI)
    # union member uprobe_multi: path, offsets, ref_ctr_offsets, cookies, cnt, flags, pid
    _u64(attr, 16, ct.addressof(name))
    _u64(attr, 24, ct.addressof(offs))
    _u32(attr, 48, len(offsets))
    _u32(attr, 52, BPF_F_UPROBE_MULTI_RETURN if is_return else 0)
    return _bpf(BPF_LINK_CREATE, attr)


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
    insns = (ct.c_uint8 * 16).from_buffer_copy(bytes.fromhex("b700000000000000" "9500000000000000"))
    lic = ct.create_string_buffer(b"GPL")
    attr = (ct.c_uint8 * ATTR_SIZE)()
    _u32(attr, 0, BPF_PROG_TYPE_KPROBE)
    _u32(attr, 4, 2)
    _u64(attr, 8, ct.addressof(insns))
    _u64(attr, 16, ct.addressof(lic))
    _u32(attr, 68, BPF_TRACE_UPROBE_MULTI)
    try:
        prog = _bpf(BPF_PROG_LOAD, attr)
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
