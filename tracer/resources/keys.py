"""pthread keys, the first resource: pthread_key_create acquires a key (written through its
first argument), pthread_key_delete releases it, the destructor is its owner. glibc allows 1024
per process, musl 128. The live table is glibc's __pthread_keys, read through /proc/PID/mem
(tracer.host.keytable); the probes are probes/keys.bpf.c, on sites the planner proves where it
can (tracer.host.planner) and a self-test shows right on this machine."""
from __future__ import annotations

import ctypes
import os
import time
from collections import Counter
from typing import Optional

from .. import resource, wire
from ..analysis.attribution import SAME_PATH_KEYS
from ..bpf.loader import Unit
from ..errors import KeytraceError
from ..host import keytable, libc, planner, tables
from ..host.elf import build_id


def read_table(pid: int, host_libc: Optional[str] = None) -> tuple:
    """(status, [(key, destructor, destructor unmapped, seq)], modules read with the table)."""
    try:
        t = keytable.read(pid, host_libc)
    except keytable.Unreadable as u:
        return f"not read: {u}", [], None
    handles = list(zip(t.keys.tolist(), t.destructors.tolist(), t.unmapped().tolist(),
                       (t.seqs & 0xFFFFFFFF).tolist()))
    return "read", handles, [(path, base) for path, base, _ in t.modules]


def census(pid: int, cache: dict) -> resource.Census:
    """The table now, as keytrace scan reads it: owners are the destructors' libraries."""
    from ..analysis.scan import OK, scan_pid
    if "host_libc" not in cache:
        cache["host_libc"] = keytable.host_libc()
    row = scan_pid(pid, cache["host_libc"])
    if row["status"] != OK:
        status = row["status"]
        raise tables.Unreadable(status if status.startswith("not read") else f"not read: {status}")
    owners = Counter(row["libraries"])
    if row["keys_in_use"] > sum(owners.values()):
        owners["(no destructor)"] = row["keys_in_use"] - sum(owners.values())
    return resource.Census(row["keys_in_use"], row["limit"], row["headroom"], "PTHREAD_KEYS_MAX",
                           owners, judged=Counter(row["destructors"]),
                           orphaned=row["orphaned_keys"])


def limit_of(p) -> int:
    """PTHREAD_KEYS_MAX of the process's C library."""
    return libc.MUSL_KEYS_MAX if p.libc == "musl" else libc.key_limit(p.modules.paths + [p.exe or ""])


# The probe unit: entry and return programs, and musl's return variant (its create reports
# failure differently).
UNIT = Unit("keys", {"pthread_key_create": ("create_enter", "create_return"),
                     "pthread_key_delete": ("delete_enter", "delete_return")},
            variants={"musl": {"create_return": "create_return_musl"}})

KEYS = resource.register(resource.Resource(
    name="keys", acquire=("pthread_key_create",), release=("pthread_key_delete",),
    handle="*arg0", release_handle="arg0", success="zero", owner="arg1",
    limit_of=limit_of, inherit_on_fork=True, keep_on_exec=False, reader=read_table,
    census=census, same_owner=SAME_PATH_KEYS,
    words={"acquires": "creates", "releases": "deletes", "failed_acquires": "failed_creates",
           "failed_releases": "failed_deletes", "in_use": "live_keys", "held": "held_keys",
           "never_released": "never_deleted", "orphaned": "orphaned_keys",
           "same_path": "same_path_keys", "per_cycle": "leak_per_reload",
           "per_second": "keys_per_second", "per_day": "keys_per_day",
           "acquired": "created", "released": "deleted", "left": "keys_left",
           "left_per_cycle": "keys_per_cycle",
           "acquire_call": "pthread_key_create", "acquire_word": "create", "unit": "key",
           "units": "keys", "full": "key table full", "owner": "destructor"},
    extra={"unit": UNIT,
           # what ledgers of schemas 1 and 2 (keys only) called things
           "legacy": {"columns": {"handle": "aux", "key": "handle", "destructor": "owner"},
                      "ops": {"create": "acquire", "create_failed": "acquire_failed",
                              "delete": "release"}}}))


# ---- planned sites: one small program per site of pthread_key_create/delete, generated from the
# planner's plan (tracer.host.planner), calling the planned_* helpers of probes/keys.bpf.c.

def _value(v: "planner.Value") -> str:
    if v.kind == "const":
        return str(v.value)
    if v.kind == "reg":
        return f"(ctx->{v.reg} >> {v.shift})"
    raise KeytraceError(f"a planned site reads a value keytrace cannot: {v}")


def conditions_source() -> str:
    """kt_cc(flags, cc): whether the x86 condition code cc holds, from planner.CONDITIONS (one
    table, shared with Python and tested against the processor)."""
    cases = "\n".join(f"    case {cc}: return ({expr}) != 0;  // j{name}"
                      for cc, (name, expr) in enumerate(planner.CONDITIONS))
    return ("static __always_inline int kt_cc(u64 flags, int cc)\n{\n"
            "    u64 CF = flags & 1, PF = (flags >> 2) & 1, ZF = (flags >> 6) & 1;\n"
            "    u64 SF = (flags >> 7) & 1, OF = (flags >> 11) & 1;\n"
            f"    switch (cc) {{\n{cases}\n    }}\n    return 0;\n}}\n")


def site_source(name: str, site: "planner.Site", flavour: str, rtld_slot: int = 0) -> str:
    """One program for one planned site: its predicate and its values as constants. rtld_slot:
    the file's GOT slot of _rtld_global (create sites walk the link_map chain from it)."""
    holds = f"kt_cc(ctx->flags, {site.cc}) == {int(site.taken)}" if site.cc >= 0 else "1"
    v = site.values
    caller = v["caller"].offset
    libc = f"KT_LIBC_{flavour.upper()}"
    seq = _value(v["seq"]) if "seq" in v else "0"
    call = {
        "create": lambda: f"planned_create(ctx, {_value(v['key'])}, {_value(v['destructor'])}, "
                          f"{caller}, {libc}, {seq}, "
                          f"{(rtld_slot - site.address) if rtld_slot else 0}LL)",
        "create_failed": lambda: f"planned_create_failed(ctx, {_value(v['errno'])}, {caller}, {libc})",
        "delete": lambda: f"planned_delete(ctx, {_value(v['key'])}, 0, {seq})",
        "delete_failed": lambda: f"planned_delete(ctx, {_value(v['key']) if 'key' in v else 0}, "
                                 f"{_value(v['errno'])}, 0)",
    }[site.event]()
    return (f"int {name}(struct pt_regs *ctx)  // {site.event} at {site.address:#x}\n"
            f"{{\n    if (!({holds}))\n        return 0;\n    return {call};\n}}\n")


def planned_programs(plans) -> tuple:
    """(program text, {(build id, function): [(site, program name)]}) for plans: (flavour,
    {function: planner.Plan}) of the files probed on planned sites; one build is done once."""
    text, sites = [conditions_source()], {}
    for flavour, functions in plans:
        for function, p in sorted(functions.items()):
            if (p.build_id, function) in sites:
                continue
            named = [(site, f"kt_site_{len(sites)}_{i}") for i, site in enumerate(p.sites)]
            sites[(p.build_id, function)] = named
            text += [site_source(name, site, flavour, p.rtld_slot) for site, name in named]
    return "\n".join(text), sites


def plans(targets, policy) -> tuple:
    """({target ident: {function: planner.Plan}}, notes): planned sites (tracer.host.planner)
    for the targets keytrace can check here, those of the very build of the C library this
    process runs on, which the self-test exercises, every site allowed by policy (stepcheck).
    Any other file gets entry and return probes, and a note says why."""
    own = libc.own_libc()
    own_build = build_id(own) if own else ""
    out, notes = {}, []
    for t in targets:
        try:
            plan = planner.plan_file(t.path)
            for p in plan.values():
                for site in p.sites:
                    why = policy(site.insn)
                    if why:
                        raise planner.Refused(f"{p.function}+{site.address - p.address:#x}: {why}")
        except planner.Refused as e:
            notes.append(f"{t.path}: entry probes ({e})")
            continue
        if not own_build or build_id(t.path) != own_build:
            notes.append(f"{t.path}: entry probes (a build the self-test cannot run)")
            continue
        out[t.ident] = plan
    return out, notes


def self_test(program) -> tuple:
    """(passed, what was seen, the other records drained meanwhile): prove the planned sites
    on this machine before trusting them. A short-lived child makes 3 keys, deletes them, then
    deletes an invalid key and one twice; exactly those events must come out. Tried 3 times: a
    record the kernel fails to queue (6.15+) is no verdict on a plan."""
    others = []
    for _ in range(3):
        got, rest = _exercise(program)
        others.append(rest)
        creates = [int(k) for op, k, r in got if op == wire.CODE["acquire"]]
        deletes = sorted((int(k), int(r)) for op, k, r in got if op == wire.CODE["release"])
        failed = [r for op, k, r in got if op == wire.CODE["release"] and r != 0]
        if (len(got) == 8 and len(set(creates)) == 3
                and sorted(k for k, r in deletes if r == 0) == sorted(creates) and len(failed) == 2):
            return True, got, others
    return False, got, others


def _exercise(program) -> tuple:
    """Run the self-test child and take its records out of the ring: ([(op, key, ret)], every
    other record drained meanwhile). The child is a fork of this process, so Python's own
    after-fork key work comes first: only records from the moment it says it starts count."""
    r, w = os.pipe()
    go_r, go_w = os.pipe()  # the child waits until it is in the pid filter (-p, --)
    child = os.fork()
    if child == 0:  # the child: libc calls, then out without any Python cleanup
        try:
            os.close(r)
            os.close(go_w)
            os.read(go_r, 1)
            start = time.clock_gettime_ns(time.CLOCK_BOOTTIME)  # the records' clock
            c = ctypes.CDLL(None)
            keys = (ctypes.c_uint * 3)()
            for i in range(3):
                c.pthread_key_create(ctypes.byref(keys, 4 * i), None)
            for i in range(3):
                c.pthread_key_delete(keys[i])
            c.pthread_key_delete(1 << 20)   # out of range: EINVAL
            c.pthread_key_delete(keys[0])   # deleted already: EINVAL
            os.write(w, str(start).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.close(go_r)
    try:
        if program.pids is not None:
            program.add_pid(child)
    finally:
        os.write(go_w, b"g")  # (also when adding failed: the child must not wait forever)
        os.close(go_w)
    os.waitpid(child, 0)
    with os.fdopen(r) as fh:
        start = int(fh.read() or 0)
    batch = program.drain()
    mine = batch["pid"] == child
    rest = batch[~mine]
    mine &= batch["ts"] >= start
    mine &= batch["res"] == KEYS.id
    ops = (wire.CODE["acquire"], wire.CODE["acquire_failed"], wire.CODE["release"])
    return [(int(o), int(k), int(r)) for o, k, r in zip(batch["op"][mine], batch["handle"][mine],
                                                         batch["ret"][mine]) if o in ops], rest
