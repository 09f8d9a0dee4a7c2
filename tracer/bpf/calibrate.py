"""-T's calibration: the probes' own share of a timed call, measured at start.

A call timed by an entry and a return probe includes some of the probes' own cost: after the
entry program has read the clock, the return to user space (and, where the kernel does not
emulate the probed instruction, its single-step out of line), and before the return program
reads it, the trap of the return probe. That share depends on the kind of the entry site:
emulated instructions (push, nop, jumps) skip a trap that single-stepped ones take.

So at start a child of keytrace calls a null function of each kind (its first instruction a
push, or a mov) under -c -T's programs, from a code file of keytrace's own (never a shared
library: see stepcheck), and each kind's mean is the cost taken off every call on a site of
that kind, in the kernel (kc_cost) and in trace lines. The child is seen by these programs
alone (kc_calibrator), never by the user's.
"""
from __future__ import annotations

import ctypes as ct
import mmap
import os
import shutil
import struct
import tempfile

import numpy as np

from ..host import isa
from . import calls as kc

CALLS = 2000   # null calls per kind
CODE_AT = 0x80  # the null functions' offset in the file (after the ELF and program headers)
# first instruction: emulated (push %rbp), single-stepped out of line (mov %rdi,%rax)
NULLS = {"emulated": bytes.fromhex("55" "5d" "c3"), "stepped": bytes.fromhex("4889f8" "c3")}
KINDS = tuple(NULLS)
SAID = {"emulated": "an emulated entry", "stepped": "a single-stepped entry"}  # as told


def probes(first: int) -> list:
    """The calibration functions, as the kernel side sees them: indices first, first + 1."""
    return [kc.Probe(first + k, calibration=True) for k in range(len(KINDS))]


def programs(first: int) -> str:
    """Their programs: -c -T's timed entry and return. Trace mode's entry does the same work
    inside the timed window but for its record's submit, which the share leaves in."""
    return kc.programs([[p] for p in probes(first)], "time")


def kind(code: bytes) -> str:
    """The kind of a probe site, by its first instruction: emulated, else stepped."""
    return "emulated" if isa.view(code).action == "emulated" else "stepped"


def _code_file(path: str) -> dict:
    """An ELF file (one r-x PT_LOAD over it all, no sections) holding the null functions;
    {kind: file offset}. An ELF file, so that every attach path reads it as it reads a library."""
    body, at = b"", {}
    for k, code in NULLS.items():
        at[k] = CODE_AT + len(body)
        body += code + b"\xcc" * (16 - len(code))
    size = CODE_AT + len(body)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 3, 62, 1, 0, 64,
                       0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, size, size, 0x1000)
    with open(path, "wb") as fh:
        fh.write((ehdr + phdr).ljust(CODE_AT, b"\0") + body)
    return at


def _child(path: str, at: dict, go: int) -> None:
    """Wait for the word, then call each null function CALLS times; never returns."""
    try:
        os.read(go, 1)
        libc = ct.CDLL(None, use_errno=True)
        libc.mmap.restype = ct.c_void_p
        libc.mmap.argtypes = [ct.c_void_p, ct.c_size_t, ct.c_int, ct.c_int, ct.c_int, ct.c_long]
        fd = os.open(path, os.O_RDONLY)
        base = libc.mmap(None, 4096, mmap.PROT_READ | mmap.PROT_EXEC, mmap.MAP_PRIVATE, fd, 0)
        if base in (None, ct.c_void_p(-1).value):  # (MAP_FAILED: a noexec temporary directory)
            os._exit(1)
        for off in at.values():
            fn = ct.CFUNCTYPE(ct.c_long, ct.c_long)(base + off)
            for i in range(CALLS):
                fn(i)
    finally:
        os._exit(0)


def measure(program, first: int) -> dict:
    """{kind: ns} of the probes' share of a null call, per site kind, measured with the
    calibration programs (compiled in at indices first...); a kind whose null function the
    policy will not probe is left out (its sites' times are then not corrected)."""
    tmp = tempfile.mkdtemp(prefix="keytrace-calibrate-")
    path = os.path.join(tmp, "null")
    try:
        at = _code_file(path)
        todo = []
        for k, name in enumerate(KINDS):
            if program.policy(NULLS[name]) is None:
                entry, ret = kc.names(first + k, "time")
                todo += [(at[name], entry, False), (at[name], ret, True)]
        if not todo:
            return {}
        child = program.bpf[b"kc_calibrator"]  # (looked up before there is a child to leave)
        program.attach_programs(path, todo)
        try:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(w)
                _child(path, at, r)
            os.close(r)
            try:
                # seen by the calibration programs only: not traced, not counted, not shown
                child[ct.c_int(0)] = ct.c_uint32(pid)
                os.write(w, b"x")
            finally:
                os.close(w)
                os.waitpid(pid, 0)
                child[ct.c_int(0)] = ct.c_uint32(0)
        finally:
            program.detach(path)
        stats = kc.read_stats(program, first + len(KINDS))
        _forget_stacks(program, first)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {}
    for k, name in enumerate(KINDS):
        calls, _, total, worst = (int(x) for x in stats[first + k])
        if calls > 1:  # the slowest call (the first: faults, the out-of-line slot) left out
            out[name] = (total - worst) / (calls - 1)
    return out


def _forget_stacks(program, first: int) -> None:
    """--stack counts kept for the calibration functions: not the user's."""
    try:
        table = program.bpf[b"kc_stack_counts"]
    except KeyError:
        return
    for key in [k for k in table.keys() if int(k.fn) >= first]:
        del table[key]


def costs(program, sites: list, first: int) -> np.ndarray:
    """Per traced function (its entry site's first instruction bytes, in order): the ns taken
    off each of its calls, written into the kernel's kc_cost. Returns them and the
    measured {kind: ns}."""
    measured = measure(program, first)
    out = np.array([measured.get(kind(code), 0.0) for code in sites], dtype=np.float64)
    table = program.bpf[b"kc_cost"]
    for i, ns in enumerate(out):
        table[table.Key(i)] = table.Leaf(int(ns))
    return out, measured
