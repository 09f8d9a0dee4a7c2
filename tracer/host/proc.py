"""Everything keytrace reads from /proc: processes, their identity, mappings and ELF modules."""
from __future__ import annotations

import ctypes
import os
import re
from dataclasses import dataclass
from typing import Optional

from ..wire import boot_to_wall_offset_ns
from .elf import elf_info

PF_KTHREAD = 0x00200000
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Stat:
    comm: str
    state: str            # R, S, Z, ...
    ppid: int
    flags: int
    start_ns: int         # when the process started, ns since the epoch

    @property
    def kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)


def boot_start_ns(pid: int) -> int:
    """When the process started on the boot clock (CLOCK_BOOTTIME), which no wall-clock step
    moves. Raises OSError (gone) or ValueError."""
    with open(f"/proc/{pid}/stat", errors="replace") as fh:
        return int(fh.read().rpartition(")")[2].split()[19]) * 10**9 // _TICKS


def stat(pid: int) -> Stat:
    """Raises OSError (FileNotFoundError: gone; PermissionError)."""
    with open(f"/proc/{pid}/stat", errors="replace") as fh:
        text = fh.read()
    head, _, rest = text.rpartition(")")
    f = rest.split()
    return Stat(comm=head.split("(", 1)[1], state=f[0], ppid=int(f[1]), flags=int(f[6]),
                # starttime counts boot-clock ticks (suspend included)
                start_ns=boot_to_wall_offset_ns() + int(f[19]) * 10**9 // _TICKS)


def exe(pid: int) -> Optional[str]:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        return stat(pid).state != "Z"
    except (OSError, IndexError, ValueError):
        return False


def exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def pids() -> list[int]:
    return sorted(int(d) for d in os.listdir("/proc") if d.isdigit())


def with_descendants(roots) -> list[int]:
    """roots and every process descended from them now (children, their children...)."""
    children: dict = {}
    for pid in pids():
        try:
            children.setdefault(stat(pid).ppid, []).append(pid)
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    out, todo = set(roots), list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return sorted(out)


def trim_heap() -> None:
    """Give the C heap's free pages back to the system. glibc keeps what a burst of work freed
    (raising its mmap threshold as it goes), so an always-on process would keep its peak."""
    ctypes.CDLL(None).malloc_trim(0)


def image(pid: int) -> Optional[tuple]:
    """What decides which files a process maps: its executable file and its mount namespace
    ((dev, inode) each); None when it is gone or unreadable."""
    try:
        exe, ns = os.stat(f"/proc/{pid}/exe"), os.stat(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None
    return (exe.st_dev, exe.st_ino, ns.st_ino)


def mappings(pid: int) -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, path or pseudo-name) of every mapping, in address order.
    Raises OSError (FileNotFoundError: the process is gone; PermissionError)."""
    with open(f"/proc/{pid}/maps", errors="surrogateescape") as fh:  # paths as their bytes
        text = fh.read()
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        start, end = parts[0].split("-", 1)
        out.append((int(start, 16), int(end, 16), int(parts[2], 16), parts[5] if len(parts) == 6 else ""))
    return out


def file_mappings(pid: int) -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, path) of each file-backed mapping; [] if unreadable."""
    try:
        maps = mappings(pid)
    except OSError:
        return []
    return [m for m in maps if m[3].startswith("/") and not m[3].endswith("(deleted)")]


def map_file(pid: int, start: int, end: int, path: str = "") -> str:
    """The mapped file itself, whatever mount namespace or chroot the process is in. Following
    /proc/PID/map_files takes CAP_SYS_ADMIN (CAP_CHECKPOINT_RESTORE on newer kernels), so an
    ordinary user gets path instead, when the process sees the same files as we do (its mount
    namespace is ours)."""
    if path and _UNPRIVILEGED and _same_files(pid):
        return path
    return f"/proc/{pid}/map_files/{start:x}-{end:x}"


_UNPRIVILEGED = os.geteuid() != 0


def _same_files(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return False


def modules(pid: int) -> list[tuple[str, int, str]]:
    """(path, load bias, openable path) of every ELF module mapped by pid. path is as
    /proc/PID/maps shows it; the file is opened through /proc/PID/map_files."""
    seen: dict = {}
    for start, end, offset, path in file_mappings(pid):
        if offset == 0 and path not in seen:
            opened = map_file(pid, start, end, path)
            info = elf_info(opened)
            if info is not None:
                seen[path] = (path, start - info.lo, opened)
    return list(seen.values())


_CONTAINER = re.compile(r"(?:docker|libpod|cri-containerd|crio)-([0-9a-f]{12,64})|"
                        r"/(?:docker|lxc|kubepods[^/]*(?:/[^/]+)*)/([0-9a-f]{12,64})")


def container(pid: int) -> str:
    """The container a process runs in, from its cgroup path (the runtime's id, cut to 12
    characters as `docker ps` shows it); "" on the host or when unreadable."""
    try:
        with open(f"/proc/{pid}/cgroup", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return ""
    m = _CONTAINER.search(text)
    return (m.group(1) or m.group(2))[:12] if m else ""
