"""A process's file mappings (/proc/PID/maps), and the ELF modules they make up."""
from __future__ import annotations

from typing import Optional

from .elfinfo import elf_info


def file_mappings(pid: int) -> list[tuple[int, int, str]]:
    """(start, file offset, path) of each file-backed mapping, in address order."""
    try:
        with open(f"/proc/{pid}/maps") as fh:
            text = fh.read()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].startswith("/") and not parts[5].endswith("(deleted)"):
            out.append((int(parts[0].split("-", 1)[0], 16), int(parts[2], 16), parts[5]))
    return out


def modules(pid: int) -> list[tuple[str, int]]:
    """(path, load bias) of every ELF module mapped by pid, as link_map would report them."""
    seen: dict = {}
    for start, offset, path in file_mappings(pid):
        if offset == 0 and path not in seen:
            # Read through /proc/PID/root: the file as the process sees it.
            info = elf_info(f"/proc/{pid}/root{path}")
            if info is not None:
                seen[path] = start - info.lo
    return list(seen.items())


