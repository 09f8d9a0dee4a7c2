"""The calls unit's programs, one small wrapper per probed function, and what its maps hold.

Each function gets an index; its wrappers pass that index and what to read (which arguments are
strings, what return value is a failure) as constants to the helpers of probes/calls.bpf.c, so
the verifier sees straight-line code and the kernel does no lookups to know the function.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from .. import wire
from .loader import Unit

CALLS = Unit("calls")
SLOTS = 64  # log2 latency buckets per function (KC_SLOTS)
ERR_MODES = {None: 0, "int": 1, "long": 2, "null": 3}  # KC_ERR_*
MODES = ("count", "time", "trace")  # KC_MODE
SYS = 0x40000000  # a record's fn for system call nr: SYS | nr (KC_SYS)
NR_MAX = 512


@dataclass(frozen=True)
class Probe:
    """One function, as the kernel side sees it."""
    index: int
    slots: tuple = ()            # what the record's text slots hold (prototypes.Slot, at most
    failure: Optional[str] = None  # CALL_STRINGS); what return is a failure: "int", "long",
    #                                "null" or None
    caller: int = -1             # only calls made from this object (FUNC@OBJECT; -1: any)
    calibration: bool = False    # -T's null function: seen in the calibration child alone


def prelude(count: int, strsize: int, ring_pages: int, stacks: bool, errno: bool = False,
            objects: int = 0, syscalls: Optional[str] = None, calibrate: bool = False) -> str:
    """errno: watch failed system calls inside traced calls (a tracepoint on every syscall
    exit of the host, so only when a traced function reports failures through errno). objects:
    how many objects some functions count only the calls of (FUNC@OBJECT). syscalls: the mode
    (count, time, trace) system calls are seen in (-S). calibrate: -T's calibration child is
    kept from every program but its own (tracer.bpf.calibrate)."""
    lines = [f"#define KC_FUNCS {max(count, 1)}", f"#define KC_RING_PAGES {ring_pages}"]
    if syscalls is not None:
        lines += ["#define KC_SYSCALLS", f"#define KC_MODE {MODES.index(syscalls)}"]
    if objects:
        lines += ["#define KC_CALLERS", f"#define KC_OBJECTS {objects}"]
    if stacks:
        lines.append("#define KC_STACKS")
    if calibrate:
        lines.append("#define KC_CALIBRATE")
    if errno:
        lines.append("#define KC_ERRNO")
    return "\n".join(lines + [wire.c_struct("call", wire.call_record(strsize)), ""])


def _calls(p: Probe, mode: str) -> tuple:
    """(entry helper call, return helper call or None) of one function in a mode."""
    if mode == "count":
        return f"kc_count(ctx, {p.index}, {p.caller})", None
    if mode == "time":
        cal = int(p.calibration)
        return (f"kc_enter(ctx, {p.index}, {p.caller}, {cal})",
                f"kc_exit(ctx, {p.index}, {ERR_MODES[p.failure]}, {cal})")
    # per slot: the argument (-1: none), what is read (KC_SLOT_*), the length argument
    s = [(x.arg, x.mode, x.length) for x in p.slots[:wire.CALL_STRINGS]]
    (a0, m0, l0), (a1, m1, l1) = (s + [(-1, -1, -1)] * 2)[:2]
    return (f"kc_trace_entry(ctx, {p.index}, {a0}, {m0}, {l0}, {a1}, {m1}, {l1}, {p.caller})",
            f"kc_trace_return(ctx, {p.index}, {ERR_MODES[p.failure]}, {m0}, {m1})")


def programs(groups: Iterable[list], mode: str, objects: Iterable[tuple] = ()) -> str:
    """The programs of each group of functions probed at one site (one function, or one asked
    for from several callers: FUNC@MAIN and FUNC): kc_entry_N, and kc_return_N unless counting,
    N the group's first function; the return runs the group's calls in reverse, as their frames
    were pushed. And for each caller object (site, lo, hi: file vaddrs of code that runs first,
    and of its image) kc_start_K."""
    out = [f"int kc_start_{k}(struct pt_regs *ctx) "
           f"{{ return kc_place(ctx, {k}, {at:#x}ULL, {lo:#x}ULL, {hi:#x}ULL); }}"
           for k, (at, lo, hi) in enumerate(objects)]
    for group in groups:
        calls = [_calls(p, mode) for p in group]
        n = group[0].index
        out.append(f"int kc_entry_{n}(struct pt_regs *ctx) {{ "
                   + " ".join(f"{entry};" for entry, _ in calls) + " return 0; }")
        if mode != "count":
            out.append(f"int kc_return_{n}(struct pt_regs *ctx) {{ "
                       + " ".join(f"{ret};" for _, ret in reversed(calls)) + " return 0; }")
    return "\n".join(out) + "\n"


def names(index: int, mode: str) -> tuple:
    """(entry program, return program or None) of a group of functions (by its first) in a
    mode."""
    return f"kc_entry_{index}", None if mode == "count" else f"kc_return_{index}"


def read_stats(program, count: int) -> np.ndarray:
    """Per function: calls, errors, total_ns, max_ns, summed over CPUs (max: the largest)."""
    table = program.bpf[b"kc_stats"]
    out = np.zeros((count, 4), dtype=np.uint64)
    for i in range(count):
        per_cpu = table[table.Key(i)]
        out[i, 0] = sum(v.calls for v in per_cpu)
        out[i, 1] = sum(v.errors for v in per_cpu)
        out[i, 2] = sum(v.total_ns for v in per_cpu)
        out[i, 3] = max((v.max_ns for v in per_cpu), default=0)
    return out


def read_histograms(program, count: int) -> np.ndarray:
    """[function, log2 bucket] counts: bucket b holds calls of 2**b to 2**(b+1) - 1 ns."""
    table = program.bpf[b"kc_hist"]
    out = np.zeros((count, SLOTS), dtype=np.uint64)
    for i in range(count):
        for b in range(SLOTS):
            out[i, b] = sum(table[table.Key(i * SLOTS + b)])
    return out


def read_stack_counts(program) -> dict:
    """{(function index, stack id, pid, return address read at the entry): calls} (with
    --stack)."""
    return {(int(k.fn), int(k.stack), int(k.pid), int(k.caller)): int(v.value)
            for k, v in program.bpf[b"kc_stack_counts"].items()}


def stack(program, stack_id: int) -> list:
    """A user stack's addresses, innermost first."""
    if stack_id < 0:
        return []
    try:
        return list(program.bpf[b"kc_stacks"].walk(stack_id))
    except KeyError:
        return []


def syscall_names() -> dict:
    """x86-64 system call numbers -> names (bcc's table, bcc/syscall.py, read as a module of
    its own: importing the bcc package would map LLVM into the tracer)."""
    import importlib.util
    spec = importlib.util.find_spec("bcc")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = os.path.join(list(spec.submodule_search_locations)[0], "syscall.py")
    table = importlib.util.spec_from_file_location("keytrace_bcc_syscall", path)
    module = importlib.util.module_from_spec(table)
    try:
        table.loader.exec_module(module)
    except OSError:
        return {}
    return {int(nr): name.decode() for nr, name in module.syscalls.items() if int(nr) < NR_MAX}


def set_syscall_slots(program, slots: dict) -> None:
    """What -S reads of each system call's arguments: nr -> [prototypes.Slot] (at most 2)."""
    table = program.bpf[b"kc_sys_slots"]
    for nr, got in slots.items():
        s = [(x.arg, x.mode, x.length) for x in got[:wire.CALL_STRINGS]]
        (a0, m0, l0), (a1, m1, l1) = (s + [(-1, -1, -1)] * 2)[:2]
        table[table.Key(nr)] = table.Leaf(a0, m0, l0, a1, m1, l1)


def read_syscall_stats(program) -> dict:
    """nr -> (calls, errors, total_ns, max_ns) of the system calls made."""
    table = program.bpf[b"kc_sys_stats"]
    out = {}
    for nr in range(NR_MAX):
        per_cpu = table[table.Key(nr)]
        calls = sum(v.calls for v in per_cpu)
        if calls:
            out[nr] = (calls, sum(v.errors for v in per_cpu), sum(v.total_ns for v in per_cpu),
                       max((v.max_ns for v in per_cpu), default=0))
    return out


def lost(program) -> int:
    return int(sum(program.bpf[b"kc_lost"][0]))
