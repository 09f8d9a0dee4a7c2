"""The system calls keytrace makes of the kernel's BPF: bpf(2) and perf_event_open(2), through
ctypes, with no library between (bcc's libbcc would map LLVM and clang into the tracer: about
65 MB resident for a compiler it no longer runs; see tracer.bpf.objects).

Every call raises OSError with the kernel's errno on failure. Layouts are union bpf_attr's and
struct perf_event_attr's (include/uapi/linux/bpf.h, perf_event.h), x86-64.
"""
from __future__ import annotations

import ctypes as ct
import errno
import os
from typing import Optional

SYS_BPF = 321
SYS_PERF_EVENT_OPEN = 298
ATTR_SIZE = 128               # of union bpf_attr; the kernel takes a shorter, zero-padded one

# bpf(2) commands
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_MAP_LOOKUP_BATCH = 24
BPF_LINK_CREATE = 28

BPF_PROG_TYPE_KPROBE = 2      # uprobes too
BPF_PROG_TYPE_TRACEPOINT = 5
BPF_TRACE_UPROBE_MULTI = 48   # enum bpf_attach_type
BPF_F_UPROBE_MULTI_RETURN = 1
BPF_OBJ_NAME_LEN = 16

PERF_TYPE_TRACEPOINT = 2
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_SET_BPF = 0x40042408
PERF_ATTR_SIZE = 128

_libc = ct.CDLL(None, use_errno=True)
_libc.syscall.restype = ct.c_long
_libc.ioctl.argtypes = [ct.c_int, ct.c_ulong, ct.c_ulong]


def _check(ret: int) -> int:
    if ret < 0:
        e = ct.get_errno()
        raise OSError(e, os.strerror(e))
    return int(ret)


def bpf(cmd: int, attr) -> int:
    """bpf(2): a descriptor or 0."""
    return _check(_libc.syscall(SYS_BPF, cmd, ct.byref(attr), ATTR_SIZE))


def attr() -> ct.Array:
    return (ct.c_uint8 * ATTR_SIZE)()


def u32(buf, at: int, value: int) -> None:
    ct.c_uint32.from_buffer(buf, at).value = value


def u64(buf, at: int, value: int) -> None:
    ct.c_uint64.from_buffer(buf, at).value = value


def object_name(name: str) -> bytes:
    """A name the kernel takes for a map or program (shown by bpftool): at most 15 of
    [A-Za-z0-9_.]."""
    keep = "".join(c if c.isalnum() or c in "_." else "_" for c in name)
    return keep[:BPF_OBJ_NAME_LEN - 1].encode()


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               flags: int = 0, name: str = "", map_extra: int = 0) -> int:
    a = attr()
    for at, v in enumerate((map_type, key_size, value_size, max_entries, flags)):
        u32(a, 4 * at, v)
    n = object_name(name)
    ct.memmove(ct.addressof(a) + 28, n, len(n))
    u64(a, 64, map_extra)
    return bpf(BPF_MAP_CREATE, a)


class _ElemAttr(ct.Structure):  # union bpf_attr's map element commands: the hot path, kept lean
    _fields_ = [("map_fd", ct.c_uint32), ("pad", ct.c_uint32), ("key", ct.c_uint64),
                ("value", ct.c_uint64), ("flags", ct.c_uint64)]


class _BatchAttr(ct.Structure):  # union bpf_attr's batch member
    _fields_ = [("in_batch", ct.c_uint64), ("out_batch", ct.c_uint64), ("keys", ct.c_uint64),
                ("values", ct.c_uint64), ("count", ct.c_uint32), ("map_fd", ct.c_uint32),
                ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64)]


def _elem(cmd: int, fd: int, key, value, flags: int = 0) -> int:
    a = _ElemAttr(fd, 0, 0 if key is None else ct.addressof(key),
                  0 if value is None else ct.addressof(value), flags)
    return _check(_libc.syscall(SYS_BPF, cmd, ct.byref(a), ct.sizeof(a)))


def _found(cmd: int, fd: int, key, value) -> bool:
    """_elem(); False when the map has no such entry (ENOENT)."""
    try:
        _elem(cmd, fd, key, value)
    except FileNotFoundError:
        return False
    return True


def lookup(fd: int, key, value) -> bool:
    """Fill value with the entry at key; False when there is none."""
    return _found(BPF_MAP_LOOKUP_ELEM, fd, key, value)


def update(fd: int, key, value, flags: int = 0) -> None:
    _elem(BPF_MAP_UPDATE_ELEM, fd, key, value, flags)


def delete(fd: int, key) -> bool:
    """Remove the entry at key; False when there was none."""
    return _found(BPF_MAP_DELETE_ELEM, fd, key, None)


def next_key(fd: int, key, into) -> bool:
    """The key after key (the first, with key None) into into; False at the end."""
    return _found(BPF_MAP_GET_NEXT_KEY, fd, key, into)


def lookup_batch(fd: int, key_size: int, value_size: int, chunk: int):
    """Every (key bytes, value bytes) of a hash map, a chunk at a time (BPF_MAP_LOOKUP_BATCH,
    Linux 5.6+): one system call per chunk, not two per entry. OSError(EINVAL) where the map
    or kernel has no batch lookup."""
    token_in, token_out = (ct.c_uint8 * 8)(), (ct.c_uint8 * 8)()  # a hash map's bucket index
    first = True
    while True:
        keys = (ct.c_uint8 * (key_size * chunk))()
        values = (ct.c_uint8 * (value_size * chunk))()
        a = _BatchAttr(0 if first else ct.addressof(token_in), ct.addressof(token_out),
                       ct.addressof(keys), ct.addressof(values), chunk, fd, 0, 0)
        done = False
        try:
            _check(_libc.syscall(SYS_BPF, BPF_MAP_LOOKUP_BATCH, ct.byref(a), ct.sizeof(a)))
        except FileNotFoundError:  # the last chunk (maybe empty)
            done = True
        except OSError as e:
            if e.errno == errno.ENOSPC:  # a bucket holds more than a chunk
                chunk *= 2
                continue
            raise
        kb, vb = bytes(keys), bytes(values)
        for i in range(a.count):
            yield (kb[i * key_size:(i + 1) * key_size], vb[i * value_size:(i + 1) * value_size])
        if done:
            return
        ct.memmove(token_in, token_out, 8)
        first = False


def prog_load(prog_type: int, insns: bytes, license: str, name: str = "",
              kern_version: int = 0, expected_attach_type: int = 0,
              log: Optional[ct.Array] = None) -> int:
    """Load a program; with log, the verifier writes what it saw there (level 1)."""
    code = (ct.c_uint8 * len(insns)).from_buffer_copy(insns)
    lic = ct.create_string_buffer(license.encode())
    a = attr()
    u32(a, 0, prog_type)
    u32(a, 4, len(insns) // 8)
    u64(a, 8, ct.addressof(code))
    u64(a, 16, ct.addressof(lic))
    if log is not None:
        u32(a, 24, 1)
        u32(a, 28, len(log))
        u64(a, 32, ct.addressof(log))
    u32(a, 40, kern_version)
    n = object_name(name)
    ct.memmove(ct.addressof(a) + 48, n, len(n))
    u32(a, 68, expected_attach_type)
    return bpf(BPF_PROG_LOAD, a)


def uprobe_multi_link(prog_fd: int, path: str, offsets, is_return: bool) -> int:
    """One link putting a program (loaded with expected_attach_type BPF_TRACE_UPROBE_MULTI) at
    these file offsets of path, in every process; its descriptor, closed to detach them all."""
    name = ct.create_string_buffer(os.fsencode(path))
    offs = (ct.c_uint64 * len(offsets))(*offsets)
    a = attr()
    u32(a, 0, prog_fd)
    u32(a, 8, BPF_TRACE_UPROBE_MULTI)
    # union member uprobe_multi: path, offsets, ref_ctr_offsets, cookies, cnt, flags, pid
    u64(a, 16, ct.addressof(name))
    u64(a, 24, ct.addressof(offs))
    u32(a, 48, len(offsets))
    u32(a, 52, BPF_F_UPROBE_MULTI_RETURN if is_return else 0)
    return bpf(BPF_LINK_CREATE, a)


def _perf_event(perf_type: int, config: int, config1: int = 0, config2: int = 0,
                sample_type: int = 0, pid: int = -1) -> int:
    a = (ct.c_uint8 * PERF_ATTR_SIZE)()
    u32(a, 0, perf_type)
    u32(a, 4, PERF_ATTR_SIZE)
    u64(a, 8, config)
    u64(a, 16, 1)              # sample_period
    u64(a, 24, sample_type)
    u32(a, 48, 1)              # wakeup_events
    u64(a, 56, config1)
    u64(a, 64, config2)
    # every process (pid -1) on cpu 0: a BPF program on the event runs on every CPU; one
    # process's on any CPU
    return _check(_libc.syscall(SYS_PERF_EVENT_OPEN, ct.byref(a), pid, 0 if pid == -1 else -1,
                                -1, PERF_FLAG_FD_CLOEXEC))


def _with_program(fd: int, prog_fd: int) -> int:
    try:
        _check(_libc.ioctl(fd, PERF_EVENT_IOC_SET_BPF, prog_fd))
        _check(_libc.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0))
    except BaseException:
        os.close(fd)
        raise
    return fd


def tracepoint(prog_fd: int, tracefs: str, category: str, event: str) -> int:
    """A tracepoint event running the program; its descriptor, closed to detach."""
    try:
        with open(f"{tracefs}/events/{category}/{event}/id") as fh:
            ident = int(fh.read())
    except (OSError, ValueError) as e:
        raise OSError(getattr(e, "errno", None) or 2,
                      f"no tracepoint {category}:{event} in {tracefs}") from None
    return _with_program(_perf_event(PERF_TYPE_TRACEPOINT, ident, sample_type=PERF_SAMPLE_RAW),
                         prog_fd)


UPROBE_PMU = "/sys/bus/event_source/devices/uprobe"


def uprobe_event(path: str, offset: int, is_return: bool = False, pid: int = -1) -> int:
    """A uprobe of the perf PMU (nothing is written to tracefs) at a file offset of path, in
    every process or in one (pid); its descriptor, closed to unregister it."""
    with open(f"{UPROBE_PMU}/type") as fh:
        pmu = int(fh.read())
    config = 0
    if is_return:  # the retprobe bit, as the PMU describes it ("config:0")
        with open(f"{UPROBE_PMU}/format/retprobe") as fh:
            config = 1 << int(fh.read().split(":")[1])
    name = ct.create_string_buffer(os.fsencode(path))
    return _perf_event(pmu, config, ct.addressof(name), offset, pid=pid)


def uprobe(prog_fd: int, path: str, offset: int, is_return: bool) -> int:
    """uprobe_event() in every process, running the program."""
    return _with_program(uprobe_event(path, offset, is_return), prog_fd)
