"""Prerequisite checks: each says pass/fail, what it saw, and the exact fix.

`keytrace doctor` prints them all; require_tracing() runs the ones tracing cannot start
without and raises the first failure as a KeytraceError.
"""
from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import headers
from ..errors import KeytraceError

CAP_PERFMON, CAP_BPF, CAP_SYS_ADMIN = 38, 39, 21
SYS_BPF = 321  # x86-64
BPF_MAP_CREATE, BPF_MAP_TYPE_ARRAY = 0, 2


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges() -> Check:
    caps = _effective_caps()
    has = lambda c: bool(caps >> c & 1)  # noqa: E731
    # Capabilities, not the uid, decide: root in a container may have lost them.
    if (has(CAP_BPF) and has(CAP_PERFMON)) or has(CAP_SYS_ADMIN):
        how = "root" if os.geteuid() == 0 else "capabilities CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN"
        return Check("privileges", True, how)
    return Check("privileges", False, f"running as uid {os.geteuid()} without CAP_BPF and CAP_PERFMON",
                 "run as root (sudo keytrace ...) or grant CAP_BPF,CAP_PERFMON,CAP_SYS_RESOURCE")


def check_bpf_syscall() -> Check:
    # Create (and close) the smallest array map: proves the syscall exists and is allowed.
    attr = (ctypes.c_uint32 * 16)(BPF_MAP_TYPE_ARRAY, 4, 4, 1)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(SYS_BPF, BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd >= 0:
        os.close(fd)
        return Check("bpf syscall", True, "bpf(BPF_MAP_CREATE) works")
    err = ctypes.get_errno()
    if err == errno.ENOSYS:
        return Check("bpf syscall", False, "the kernel has no bpf syscall",
                     "use a kernel built with CONFIG_BPF_SYSCALL=y")
    return Check("bpf syscall", False, f"bpf(BPF_MAP_CREATE) failed: {os.strerror(err)}",
                 "run as root; check kernel.unprivileged_bpf_disabled and seccomp/container policy")


def check_tracefs() -> Check:
    for p in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        if os.path.isdir(os.path.join(p, "events")):  # unreadable (not root) counts as absent
            return Check("tracefs", True, f"mounted at {p}")
    return Check("tracefs", False, "not mounted (keytrace mounts it when it starts, as root)",
                 "mount -t tracefs nodev /sys/kernel/tracing")


def check_uprobes() -> Check:
    if Path("/sys/bus/event_source/devices/uprobe").is_dir():
        return Check("uprobes", True, "uprobe perf PMU present")
    if Path("/sys/kernel/tracing/uprobe_events").exists():
        return Check("uprobes", True, "tracefs uprobe_events present")
    return Check("uprobes", False, "the kernel offers no uprobes",
                 "use a kernel built with CONFIG_UPROBE_EVENTS=y")


BCC_FIX = ("apt-get install python3-bpfcc; run keytrace with /usr/bin/python3 or a venv made "
           "with: /usr/bin/python3 -m venv --system-site-packages .venv "
           "(the PyPI package named bcc is unrelated)")


def check_bcc() -> Check:
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        return Check("bcc", False, f"cannot import bcc ({e})", BCC_FIX)
    return Check("bcc", True, f"bcc {getattr(bcc, '__version__', '')} from {Path(bcc.__file__).parent}")


def check_bcc_found() -> Check:
    """check_bcc() for a tracing run: found, not imported (the compiler runs in a child;
    importing bcc here would map LLVM into the tracer)."""
    import importlib.util
    if importlib.util.find_spec("bcc") is None:
        return Check("bcc", False, "bcc is not importable", BCC_FIX)
    return Check("bcc", True, "found")


def check_headers() -> Check:
    try:
        h = headers.find(build=False)
    except KeytraceError as e:
        return Check("kernel headers", False, str(e).split(" Fix: ")[0], headers.INSTALL_HINT)
    return Check("kernel headers", True, h.detail)


def check_libc() -> Check:
    from .. import resource
    from ..host.libc import system_libraries, target
    from .units import MODULES
    first = resource.default()  # what watch traces
    wanted = sorted(set(first.acquire + first.release) | set(MODULES.uprobes))
    for path in system_libraries():
        t = target(path, wanted)
        if t and set(first.acquire) <= set(t.functions):
            missing = [f for f in wanted if f not in t.functions]
            extra = f" (not here: {', '.join(missing)})" if missing else ""
            return Check("libc symbols", True, f"{path}: {', '.join(sorted(t.functions))}{extra}")
    return Check("libc symbols", False, f"no system C library defining {first.acquire[0]} found",
                 "install glibc's libc6 (keytrace probes libc.so.6 or libpthread.so.0)")


def check_sites() -> Check:
    """Which probe sites watch will use on the system libc: informational, never a failure
    (entry probes work everywhere; planned sites are cheaper)."""
    from ..host import planner
    from ..host.libc import own_libc
    path = own_libc()
    if path is None:
        return Check("probe sites", True, "entry and return probes (no C library found to plan)")
    try:
        plans = planner.plan_file(path)
    except planner.Refused as e:
        return Check("probe sites", True, f"entry and return probes on {path}: no plan ({e})")
    sites = ", ".join(f"{s.event} at {f}+{s.address - p.address:#x}"
                      + (" (emulated)" if s.emulated else " (single-stepped, rare path)")
                      for f, p in sorted(plans.items()) for s in p.sites)
    return Check("probe sites", True, f"planned sites on {path}, verified by a self-test at each "
                 f"start: {sites}")


def check_single_step() -> Check:
    """Which instruction classes single-step correctly under a uprobe on this kernel and CPU
    (tracer.bpf.stepcheck, run once and cached): keytrace never probes the others."""
    from . import stepcheck
    if not check_privileges().ok:
        return Check("probe-site safety", False, "not checked: needs root",
                     "run as root (sudo keytrace doctor)")
    try:
        rep = stepcheck.report()
    except KeytraceError as e:
        return Check("probe-site safety", False, str(e), "see keytrace doctor's other checks")
    bad = rep.unsafe()
    how = "cached" if rep.cached else f"checked now in {rep.seconds:.1f} s"
    lines = [f"{len(rep.classes) - len(bad)} of {len(rep.classes)} instruction classes "
             f"single-step correctly under a uprobe here ({how}). Unsafe here, never probed:"]
    lines += [f"  {k}: {v.detail}" for k, v in bad.items()] or ["  none"]
    lines.append("An entry probe on an unsafe instruction moves to the first safe one that sees "
                 "the same arguments; a function with none is refused, with the reason.")
    return Check("probe-site safety", True, "\n".join(lines))


def check_uprobe_multi() -> Check:
    """Not needed, but without them a run with many probes ends slowly."""
    from . import multi
    try:
        has = multi.probe()
    except PermissionError:
        return Check("uprobe_multi links", False, "could not check: not allowed to load a program",
                     "run as root (sudo keytrace doctor)")
    if has:
        return Check("uprobe_multi links", True, "the kernel has them: all probes detach at once")
    return Check("uprobe_multi links", True,
                 "not on this kernel (Linux 6.6+ has them): probes are perf events, detached one "
                 "grace period (about 0.1 s) at a time, so a run with many probes ends slowly")


def check_compiled() -> Check:
    """Informational: where compiled probes are kept (tracer.bpf.compiled)."""
    from .compiled import cache_dir
    d = cache_dir()
    kept = list(d.glob("*.json")) if d.is_dir() else []
    size = sum(p.stat().st_size for p in kept)
    return Check("compiled probes", True,
                 f"{len(kept)} probe set(s) kept in {d} ({size / 1e6:.1f} MB); a run with a new "
                 "probe set, option, kernel or bcc compiles it first (bcc, in a child process)")


CHECKS: list[Callable[[], Check]] = [check_privileges, check_bpf_syscall, check_tracefs,
                                     check_uprobes, check_bcc, check_headers, check_compiled,
                                     check_libc, check_sites, check_single_step,
                                     check_uprobe_multi]


def _safe(check: Callable[[], Check]) -> Check:
    """A check that cannot even look (not root, an odd filesystem) fails with what it met."""
    try:
        return check()
    except OSError as e:
        name = check.__name__.removeprefix("check_").replace("_", " ")
        return Check(name, False, f"could not check: {e.strerror or e}",
                     "run as root (sudo keytrace doctor)")


def run_all() -> list[Check]:
    return [_safe(c) for c in CHECKS]


def require_tracing() -> None:
    """Raise the first failed prerequisite of tracing (cheap checks first)."""
    for check in (check_privileges, check_bpf_syscall, check_uprobes, check_bcc_found,
                  check_headers):
        c = _safe(check)
        if not c.ok:
            raise KeytraceError(f"{c.name}: {c.detail}" + (f". Fix: {c.fix}" if c.fix else ""))
