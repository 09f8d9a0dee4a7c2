"""A process's mappings (/proc/PID/maps), and the ELF modules they make up."""
from __future__ import annotations

from .elfinfo import elf_info


def mappings(pid: int) -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, path or pseudo-name) of every mapping, in address order.
    Raises OSError (FileNotFoundError: the process is gone; PermissionError)."""
    with open(f"/proc/{pid}/maps") as fh:
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


def map_file(pid: int, start: int, end: int) -> str:
    """The mapped file itself, whatever mount namespace or chroot the process is in."""
    return f"/proc/{pid}/map_files/{start:x}-{end:x}"


def modules(pid: int) -> list[tuple[str, int, str]]:
    """(path, load bias, openable path) of every ELF module mapped by pid. path is as
    /proc/PID/maps shows it; the file is opened through /proc/PID/map_files."""
    seen: dict = {}
    for start, end, offset, path in file_mappings(pid):
        if offset == 0 and path not in seen:
            opened = map_file(pid, start, end)
            info = elf_info(opened)
            if info is not None:
                seen[path] = (path, start - info.lo, opened)
    return list(seen.values())
