"""Where glibc keeps a process's pthread key table, and how it is laid out.

`__pthread_keys` (GLIBC_PRIVATE) is an array of `struct pthread_key_struct { uintptr_t seq;
void (*destr)(void *); }`; a slot is in use while its sequence number is odd. glibc describes the
layout for libthread_db in `_thread_db_*` descriptors beside it, and those are read here, never
assumed: `_thread_db___pthread_keys` = {element bits, element count, 0},
`_thread_db_pthread_key_struct_seq` / `_destr` = {field bits, 1, byte offset},
`_thread_db_sizeof_pthread_key_struct` = {struct size}. Parsed once per file identity.

read(pid) reads a process's table through /proc/PID/mem: the key numbers in use (a key is its
slot's index) and their destructors. What cannot be read says why (Unreadable), never zero keys.
"""
from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from . import libc, proc
from .elf import FileCache, defined_symbols, read_at

TABLE = "__pthread_keys"
DESCRIPTORS = {
    "table": "_thread_db___pthread_keys",
    "sizeof": "_thread_db_sizeof_pthread_key_struct",
    "seq": "_thread_db_pthread_key_struct_seq",
    "destr": "_thread_db_pthread_key_struct_destr",
}


@dataclass(frozen=True)
class Layout:
    table: int        # vaddr of __pthread_keys in its file
    count: int        # PTHREAD_KEYS_MAX
    stride: int       # sizeof(struct pthread_key_struct)
    seq: tuple        # (byte offset, bytes)
    destr: tuple      # (byte offset, bytes)
    source: str       # the file whose descriptors gave the layout


def _symbols(elf: ELFFile) -> dict:
    syms = defined_symbols(elf, [TABLE, *DESCRIPTORS.values()])
    return {name: (sym["st_value"], sym["st_size"]) for name, sym in syms.items()}


def _parse_file(path: str) -> tuple[Optional[int], Optional[int], Optional[Layout]]:
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            syms = _symbols(elf)
            if TABLE not in syms:
                return None, None, None
            table, size = syms[TABLE]
            if not all(d in syms for d in DESCRIPTORS.values()):
                return table, size, None
            bits, count, _ = struct.unpack("<3I", read_at(elf, syms[DESCRIPTORS["table"]][0], 12))
            (stride,) = struct.unpack("<I", read_at(elf, syms[DESCRIPTORS["sizeof"]][0], 4))
            fields = {}
            for f in ("seq", "destr"):
                fbits, _, off = struct.unpack("<3I", read_at(elf, syms[DESCRIPTORS[f]][0], 12))
                fields[f] = (off, fbits // 8)
    except (ELFError, ValueError, struct.error):  # an OSError is no answer: FileCache keeps none
        return None, None, None
    if bits // 8 != stride:
        return table, size, None
    return table, size, Layout(table, count, stride, fields["seq"], fields["destr"], path)


_LAYOUTS = FileCache(_parse_file)


def layout(path: str, fallback: Optional[str] = None) -> tuple[Optional[Layout], str]:
    """The key table layout of a file defining __pthread_keys, and how it was found.

    A static executable keeps the table but not the descriptors: then the descriptors of
    fallback (the host's libc) are used if they agree with the table's size.
    """
    ident, parsed = _LAYOUTS.get(path)
    if ident is None or parsed is None:
        return None, "unreadable"
    table, size, own = parsed
    if table is None:
        return None, "no __pthread_keys"
    if own is not None:
        return own, "descriptors"
    if fallback:
        _, ref_parsed = _LAYOUTS.get(fallback)
        ref = ref_parsed[2] if ref_parsed else None
        if ref is not None and ref.count * ref.stride == size:
            return Layout(table, ref.count, ref.stride, ref.seq, ref.destr, fallback), \
                "descriptors of the host libc (static executable)"
    return None, "no _thread_db descriptors to describe __pthread_keys"


class Unreadable(Exception):
    """A process whose table cannot be read; str() is the status to report instead."""


@dataclass
class Table:
    """A process's key table as read now, with the mappings it was read against."""
    pid: int
    comm: str
    exe: str
    start_ns: int
    libc: str              # the file holding the table, as the process sees it
    limit: int
    keys: np.ndarray       # key numbers in use
    destructors: np.ndarray  # their destructors (0: none), in the same order
    seqs: np.ndarray       # their slots' sequence numbers (odd: in use), in the same order
    maps: list             # proc.mappings
    modules: list          # proc.modules

    def unmapped(self) -> np.ndarray:
        """Per key: its destructor is set and lies in no mapping (the library that registered
        it is gone: glibc holds a dangling pointer)."""
        starts = np.array([m[0] for m in self.maps], dtype=np.uint64)
        ends = np.array([m[1] for m in self.maps], dtype=np.uint64)
        i = np.searchsorted(starts, self.destructors, side="right") - 1
        mapped = (i >= 0) & (self.destructors < ends[np.maximum(i, 0)])
        return (self.destructors != 0) & ~mapped


def _status_of(e: OSError) -> str:
    if isinstance(e, (FileNotFoundError, ProcessLookupError)) or e.errno == errno.ESRCH:
        return "exited"
    if isinstance(e, PermissionError):
        return "permission denied"
    return f"unreadable: {e.strerror or e}"


def host_libc() -> Optional[str]:
    """The system libc whose descriptors describe a static executable's table."""
    for path in libc.system_libraries():
        if layout(path)[0] is not None:
            return path
    return None


def _holder(mods: list, exe: str, fallback: Optional[str]):
    """(path as seen by the process, load bias, layout) of the key table's file."""
    # The C library files first (cheap to check), then the executable (static programs).
    ordered = sorted(mods, key=lambda m: (not libc.is_candidate(m[0]), m[0] != exe))
    why = "no module defines __pthread_keys"
    for path, base, opened in ordered:
        if not libc.is_candidate(path) and path != exe:
            continue
        lay, how = layout(opened, fallback=fallback)
        if lay is not None:
            return path, base, lay
        if how != "no __pthread_keys":
            why = f"{os.path.basename(path)}: {how}"
    raise Unreadable(f"unsupported: {why}")


def read(pid: int, fallback: Optional[str] = None) -> Table:
    """The live key table of pid. Raises Unreadable with the status to report: a kernel thread,
    an exited process, permission denied, musl, no table found."""
    try:
        st = proc.stat(pid)
        if st.kernel_thread:
            raise Unreadable("kernel thread")
        exe = os.readlink(f"/proc/{pid}/exe")
        maps = proc.mappings(pid)
        mods = proc.modules(pid)
        if any(libc.is_musl(p) for p, _, _ in mods):
            raise Unreadable("unsupported: musl libc keeps no key table that can be read")
        path, base, lay = _holder(mods, exe, fallback)
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            mem.seek(base + lay.table)
            data = mem.read(lay.count * lay.stride)
    except OSError as e:
        raise Unreadable(_status_of(e)) from None
    except (IndexError, ValueError):
        raise Unreadable("exited") from None
    if len(data) != lay.count * lay.stride:
        raise Unreadable("unreadable: short read of the key table")
    table = np.frombuffer(data, dtype=np.dtype({
        "names": ["seq", "destr"], "formats": [f"<u{lay.seq[1]}", f"<u{lay.destr[1]}"],
        "offsets": [lay.seq[0], lay.destr[0]], "itemsize": lay.stride}))
    in_use = (table["seq"] & 1) == 1  # glibc: odd sequence number = key in use
    return Table(pid, st.comm, exe, st.start_ns, path, lay.count, np.flatnonzero(in_use),
                 table["destr"][in_use].astype(np.uint64), table["seq"][in_use].astype(np.uint64),
                 maps, mods)
