"""C libraries: which files they are, which flavour (glibc or musl), their key limit, and which
of them to probe. Every "is this the C library" question in keytrace is answered here.

glibc >= 2.34 has pthread_key_create/delete and dlopen/dlclose in libc.so.6; older glibc has the
pthread functions in libpthread.so.0 and dlopen in libdl.so.2; musl has them all in its one
libc (Alpine: /lib/ld-musl-x86_64.so.1; Debian's musl: /usr/lib/x86_64-linux-musl/libc.so).
Files are told apart by (device, inode), so the libc of a container (reached through
/proc/PID/map_files) gets probes of its own.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Iterable, Optional

from . import proc
from .elf import function_addresses

GLIBC_KEYS_MAX = 1024   # PTHREAD_KEYS_MAX, glibc
MUSL_KEYS_MAX = 128     # PTHREAD_KEYS_MAX, musl

_GLIBC = r"libc\.so\.6|libc-2\.\d+\.so|libpthread\.so\.0|libpthread-2\.\d+\.so|libdl\.so\.2|libdl-2\.\d+\.so"
_MUSL = r"ld-musl-[^/]*\.so\.1|libc\.musl-[^/]*\.so\.1|[^/]*-linux-musl[^/]*/libc\.so"
_LOADER = r"ld-linux[^/]*\.so(\.\d+)?"
# Files that may define the probed functions.
CANDIDATE = re.compile(rf"(^|/)({_GLIBC}|{_MUSL})$")
_MUSL_FILE = re.compile(rf"(^|/)({_MUSL})$")
# The C library and the dynamic loader: frames there are plumbing, never a key's owner.
_PLUMBING = re.compile(rf"(^|/)({_GLIBC}|{_MUSL}|{_LOADER})$")


def is_candidate(path: str) -> bool:
    return bool(CANDIDATE.search(path or ""))


def is_musl(path: str) -> bool:
    """Is this file musl's C library (by any of the names it is installed under)?"""
    return bool(_MUSL_FILE.search(path or ""))


def is_plumbing(path: str) -> bool:
    return bool(_PLUMBING.search(path or ""))


def key_limit(paths: Iterable[str]) -> int:
    """PTHREAD_KEYS_MAX of the C library among a process's mapped files (glibc unless musl)."""
    return MUSL_KEYS_MAX if any(map(is_musl, paths)) else GLIBC_KEYS_MAX


@dataclass
class Target:
    """One ELF file to probe: where to open it and the address of each function it defines."""
    path: str                                      # openable from here (may be a map_files link)
    ident: tuple                                   # (st_dev, st_ino)
    functions: dict = field(default_factory=dict)  # name -> address
    flavour: str = "glibc"                         # glibc or musl

    @property
    def musl(self) -> bool:
        return self.flavour == "musl"


def target(path: str, functions: Iterable[str], name: Optional[str] = None) -> Optional[Target]:
    """The target at path (name: the file's own name, when path is a /proc link)."""
    ident, found = function_addresses(path, functions)
    flavour = "musl" if is_musl(name or path) else "glibc"
    return Target(path, ident, found, flavour) if found else None


def read_ld_cache() -> dict:
    """soname -> path of the x86-64 entries of ld.so.cache (the probes read x86-64 registers),
    the dynamic linker's first choice for each name (`ldconfig -p` lists the best first)."""
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    try:
        text = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=10,
                              check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found: dict = {}
    for m in re.finditer(r"^\s*(\S+)\s+\(([^)]*)\)\s+=>\s+(\S.*?)\s*$", text, re.MULTILINE):
        if "x86-64" in (flag.strip() for flag in m.group(2).split(",")):
            found.setdefault(m.group(1), m.group(3))
    return found


# Read once per process where names are resolved (keytrace calls); ld_cache.cache_clear()
# rereads it.
ld_cache = functools.lru_cache(maxsize=1)(read_ld_cache)


def system_libraries() -> list[str]:
    """The C library files the dynamic linker would give a new process (ld.so.cache, read now:
    an agent may run for months)."""
    out = [path for path in read_ld_cache().values() if is_candidate(path)]
    for fallback in ("/lib/x86_64-linux-gnu/libc.so.6", "/lib64/libc.so.6", "/usr/lib/libc.so.6",
                     "/lib/ld-musl-x86_64.so.1", "/usr/lib/x86_64-linux-musl/libc.so"):
        if os.path.exists(fallback):
            out.append(fallback)
    return out


def mapped_libraries(pid: int) -> list[tuple[str, str]]:
    """Candidate files mapped by a process: (path openable from here, name in its maps)."""
    # map_files reaches the very file mapped, in whatever mount namespace the process is; a
    # file is mapped in several segments: one link (the first) per file.
    first: dict = {}
    for start, end, _, path in proc.file_mappings(pid):
        if is_candidate(path) and path not in first:
            first[path] = proc.map_file(pid, start, end, path)
    return sorted((link, path) for path, link in first.items())


def find_targets(functions: Iterable[str], pids: Optional[Iterable[int]] = None) -> list[Target]:
    """Every distinct file defining any of functions, for these pids (all when None) and for
    processes yet to start (the system's own C libraries)."""
    functions = tuple(functions)
    paths = [(p, p) for p in system_libraries()]
    for pid in (proc.pids() if pids is None else pids):
        paths.extend(mapped_libraries(pid))
    seen: dict = {}
    for p, name in paths:
        t = target(p, functions, name)
        if t is not None and t.ident not in seen:
            seen[t.ident] = t
    return list(seen.values())


def own_libc() -> Optional[str]:
    """The C library this very process runs on (the one a self-test in a forked child uses)."""
    mine = [name for _, name in mapped_libraries(os.getpid())]
    libcs = [name for name in mine if os.path.basename(name).startswith("libc")]
    return (libcs or mine or [None])[0]
