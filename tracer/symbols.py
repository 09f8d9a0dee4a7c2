"""Which files to probe, and where: ELF symbol lookup with pyelftools.

glibc >= 2.34 has pthread_key_create/delete and dlopen/dlclose in libc.so.6; older glibc has the
pthread functions in libpthread.so.0 and dlopen in libdl.so.2; musl has them all in its one
libc. Each function is exported under several symbol versions that alias one address: a probe
goes on each distinct address once. Files are told apart by (device, inode), so the libc of a
container (seen through /proc/PID/root) gets probes of its own.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Iterable, Optional

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from .elfinfo import FileCache, defined_symbols
from .procmaps import file_mappings, map_file

FUNCTIONS = ("pthread_key_create", "pthread_key_delete", "dlopen", "dlclose")
# Files that may define FUNCTIONS: glibc's libc, libpthread and libdl, and musl's libc.
CANDIDATE = re.compile(r"/(libc\.so\.6|libpthread\.so\.0|libdl\.so\.2|libc\.musl-[^/]*\.so\.1|"
                       r"ld-musl-[^/]*\.so\.1|libc-2\.\d+\.so|libpthread-2\.\d+\.so)$")


@dataclass
class Target:
    """One ELF file to probe: where to open it and the address of each function it defines."""
    path: str                               # openable from here (may go through /proc/PID/root)
    ident: tuple                            # (st_dev, st_ino)
    functions: dict = field(default_factory=dict)  # name -> address (st_value)


def _parse(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            syms = defined_symbols(ELFFile(fh), FUNCTIONS, kinds=("STT_FUNC",))
    except (OSError, ELFError):
        return {}
    return {name: sym["st_value"] for name, sym in syms.items()}


_FUNCTIONS = FileCache(_parse)


def target(path: str) -> Optional[Target]:
    ident, funcs = _FUNCTIONS.get(path)
    return Target(path, ident, dict(funcs)) if funcs else None


def system_libraries() -> list[str]:
    """The C library files the dynamic linker would give a new process (ld.so.cache)."""
    out = []
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True,
                                 timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        listing = ""
    for line in listing.splitlines():
        path = line.rpartition("=>")[2].strip()
        if CANDIDATE.search(path) and "x86-64" in line:  # the probes read x86-64 registers
            out.append(path)
    for fallback in ("/lib/x86_64-linux-gnu/libc.so.6", "/lib64/libc.so.6", "/usr/lib/libc.so.6",
                     "/lib/libc.musl-x86_64.so.1", "/lib/ld-musl-x86_64.so.1"):
        if os.path.exists(fallback):
            out.append(fallback)
    return out


def mapped_libraries(pid: int) -> list[str]:
    """Candidate files mapped by a process, as paths openable from here."""
    # map_files reaches the very file mapped, in whatever mount namespace the process is.
    return sorted({map_file(pid, start, end) for start, end, _, path in file_mappings(pid)
                   if CANDIDATE.search(path)})


def all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def find_targets(pids: Optional[Iterable[int]] = None) -> list[Target]:
    """Every distinct file defining the probed functions, for these pids (all when None) and
    for processes yet to start (the system's own libc)."""
    paths = list(system_libraries())
    for pid in (all_pids() if pids is None else pids):
        paths.extend(mapped_libraries(pid))
    seen: dict = {}
    for p in paths:
        t = target(p)
        if t is not None and t.ident not in seen:
            seen[t.ident] = t
    return list(seen.values())
