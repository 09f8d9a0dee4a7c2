"""The per-process tables the kernel shows under /proc, and the limits that bind them: what
`keytrace scan --resource` reads, with no tracing.

A reader raises Unreadable with the reason (the process exited mid-read, permission denied)
rather than return an empty table that would read as an answer.
"""
from __future__ import annotations

import contextlib
import errno
import os
from collections import Counter
from typing import Optional

from ..errors import KeytraceError
from . import libc, proc

UNLIMITED = None


class Unreadable(KeytraceError):
    pass


def why(pid: int, e: OSError) -> Unreadable:
    """The Unreadable to raise for an OSError met reading a process: exited, permission denied,
    or what the error says."""
    if isinstance(e, PermissionError):
        return Unreadable("not read: permission denied")
    if isinstance(e, ProcessLookupError) or e.errno == errno.ESRCH or \
            not os.path.exists(f"/proc/{pid}"):
        return Unreadable("not read: exited")
    return Unreadable(f"not read: {e.strerror or e}")


def read_exactly(mem, addr: int, size: int, what: str) -> bytes:
    """size bytes at addr of an open /proc/PID/mem; a short read is Unreadable (of what)."""
    mem.seek(addr)
    data = mem.read(size)
    if len(data) != size:
        raise Unreadable(f"not read: short read of {what}")
    return data


def _read(pid: int, name: str) -> str:
    # /proc shows names as the bytes they are (a comm cut mid-character): never a decode error
    try:
        with open(f"/proc/{pid}/{name}", errors="replace") as fh:
            return fh.read()
    except OSError as e:
        raise why(pid, e) from None


def of_process(cache: Optional[dict], pid: int) -> dict:
    """What the reads of one process's tables share (its maps, status, limits), inside cache;
    drop_process() ends it. No cache: nothing is shared."""
    return {} if cache is None else cache.setdefault(("process", pid), {})


def drop_process(cache: dict, pid: int) -> None:
    mine = cache.pop(("process", pid), None) or {}
    if "mem" in mine:
        mine["mem"].close()


@contextlib.contextmanager
def memory(pid: int, cache: Optional[dict] = None):
    """/proc/PID/mem open for reading, shared by the readers of one process's tables (closed
    by drop_process), or closed on leaving when there is no cache. Raises OSError."""
    if cache is None:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as fh:
            yield fh
        return
    mine = of_process(cache, pid)
    if "mem" not in mine:
        mine["mem"] = open(f"/proc/{pid}/mem", "rb", buffering=0)
    yield mine["mem"]


def _shared(cache: Optional[dict], pid: int, name: str) -> str:
    mine = of_process(cache, pid)
    if name not in mine:
        mine[name] = _read(pid, name)
    return mine[name]


# ---- file descriptors

def fd_kind(target: str) -> str:
    """What an fd is open to, as a table groups it: a path as it is; the kind of a socket, pipe
    or anonymous inode, whose own number tells nothing ("socket", "anon_inode:[eventfd]")."""
    if target.startswith("/"):
        return target
    if target.startswith("anon_inode:"):
        return target
    return target.split(":", 1)[0]


def _each(pid: int, sub: str, read) -> list:
    """read(path) of every entry of /proc/PID/<sub>; an entry gone mid-read (an fd closed, a
    thread ended) is left out."""
    base = f"/proc/{pid}/{sub}"
    try:
        names = os.listdir(base)
    except OSError as e:
        raise why(pid, e) from None
    out = []
    for name in names:
        try:
            out.append(read(f"{base}/{name}"))
        except (FileNotFoundError, ProcessLookupError):  # gone mid-read (ESRCH: a thread)
            continue
        except OSError as e:
            raise why(pid, e) from None
    return out


def fd_targets(pid: int) -> list:
    """What each open fd points at (readlink of /proc/PID/fd/N), undecodable bytes replaced."""
    return _each(pid, "fd", lambda path: os.fsencode(os.readlink(path)).decode("utf-8",
                                                                                "replace"))


# ---- threads

def task_names(pid: int) -> list:
    """The name (comm) of every thread of the process."""
    def comm(path: str) -> str:
        with open(f"{path}/comm", errors="replace") as fh:
            return fh.read().rstrip("\n")
    return _each(pid, "task", comm)


def host_tasks() -> int:
    """Threads on the host (the fourth field of /proc/loadavg: running/total)."""
    with open("/proc/loadavg") as fh:
        return int(fh.read().split()[3].split("/")[1])


def uid_tasks() -> Counter:
    """Threads per real uid on the host: what RLIMIT_NPROC counts."""
    out: Counter = Counter()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = status(int(d))
            out[int(fields["Uid"].split()[0])] += int(fields["Threads"])
        except (Unreadable, KeyError, ValueError):
            continue
    return out


def cgroup_pids(pid: int, cache: Optional[dict] = None) -> Optional[tuple]:
    """(pids.max, pids.current, cgroup) of the tightest pids controller limit over the process's
    cgroup and its ancestors (v2, or v1's pids hierarchy); None: no limit set."""
    best = None
    for line in _read(pid, "cgroup").splitlines():
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and not controllers:
            roots = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        elif "pids" in controllers.split(","):
            roots = ["/sys/fs/cgroup/pids"]
        else:
            continue
        root = next((r for r in roots if os.path.exists(f"{r}/cgroup.procs")), None)
        if root is None:
            continue
        here = path.rstrip("/")
        while True:
            got = None if cache is None else cache.get(("pids", root, here))
            if got is None:
                try:
                    with open(f"{root}{here}/pids.max") as fh:
                        cap = fh.read().strip()
                    with open(f"{root}{here}/pids.current") as fh:
                        cur = int(fh.read())
                except OSError:
                    cap, cur = "max", 0
                got = (cap, cur)
                if cache is not None:  # (one reading of the host: processes share cgroups)
                    cache[("pids", root, here)] = got
            cap, cur = got
            if cap != "max" and (best is None or int(cap) - cur < best[0] - best[1]):
                best = (int(cap), cur, here or "/")
            if not here:
                break
            here = here.rpartition("/")[0]
    return best


# ---- mappings

def maps(pid: int, cache: Optional[dict] = None) -> list:
    """/proc/PID/maps, each line split into its fields [range, perms, offset, dev, inode,
    path?], read once per process for the readers that share cache."""
    mine = of_process(cache, pid)
    if "maps_split" not in mine:
        mine["maps_split"] = [line.split(None, 5) for line in _read(pid, "maps").splitlines()]
    return mine["maps_split"]


def glibc_files(pid: int, entries: list, cache: Optional[dict] = None) -> dict:
    """glibc's libc.so and ld.so as a process maps them (from maps()): {"libc" | "ld": (path,
    load start, identity (dev, inode, path), /proc/PID/map_files link)}. Raises Unreadable
    for a process on musl, which keeps none of glibc's state."""
    mine = of_process(cache, pid)
    if "glibc" in mine:
        return mine["glibc"]
    out: dict = {}
    for f in entries:
        if len(f) == 6 and f[2] == "00000000":
            path = f[5]
            name = path.rpartition("/")[2]
            kind = "libc" if name.startswith("libc.so") else \
                "ld" if name.startswith("ld-linux") else None
            if "musl" in path and libc.is_musl(path):
                raise Unreadable("not read: unsupported: musl keeps no state of glibc's")
            if kind and kind not in out:
                start, end = (int(x, 16) for x in f[0].split("-", 1))
                out[kind] = (path, start, (f[3], f[4], path), proc.map_file(pid, start, end, path))
    mine["glibc"] = out
    return out


def map_owners(pid: int, cache: Optional[dict] = None) -> list:
    """What each mapping maps: its file, a kernel name ([heap], [stack], [vdso]), or [anon]."""
    return [f[5].strip() or "[anon]" if len(f) == 6 else "[anon]" for f in maps(pid, cache)]


# ---- POSIX timers

def timer_owners(pid: int) -> list:
    """How each POSIX timer notifies (/proc/PID/timers: "signal/pid", "thread/tid", "none"),
    with its signal: all the kernel says of who made it."""
    out = []
    signal = ""
    for line in _read(pid, "timers").splitlines():
        if line.startswith("signal:"):
            signal = line.split()[1].split("/")[0]
        elif line.startswith("notify:"):
            how = line.split()[1].split("/")[0]
            out.append(f"{how}" + (f" (signal {signal})" if how != "none" else ""))
    return out


# ---- limits

_LIMIT_NAMES = {"nofile": "Max open files", "nproc": "Max processes",
                "sigpending": "Max pending signals"}


def soft_limit(pid: int, which: str, cache: Optional[dict] = None) -> Optional[int]:
    """A resource limit's soft value for the process (/proc/PID/limits); None: unlimited."""
    title = _LIMIT_NAMES[which]
    for line in _shared(cache, pid, "limits").splitlines():
        if line.startswith(title):
            soft = line[len(title):].split()[0]
            return int(soft) if soft.isdigit() else UNLIMITED
    raise Unreadable(f"not read: no {title!r} in /proc/{pid}/limits")


def status(pid: int, cache: Optional[dict] = None) -> dict:
    """/proc/PID/status as a dict of its fields' text."""
    out = {}
    for line in _shared(cache, pid, "status").splitlines():
        name, _, value = line.partition(":")
        out[name] = value.strip()
    return out


def sysctl(name: str) -> int:
    with open("/proc/sys/" + name.replace(".", "/")) as fh:
        return int(fh.read())
