"""Where glibc keeps a process's pthread key table, and how it is laid out.

`__pthread_keys` (GLIBC_PRIVATE) is an array of `struct pthread_key_struct { uintptr_t seq;
void (*destr)(void *); }`; a slot is in use while its sequence number is odd. glibc describes the
layout for libthread_db in `_thread_db_*` descriptors beside it, and those are read here, never
assumed: `_thread_db___pthread_keys` = {element bits, element count, 0},
`_thread_db_pthread_key_struct_seq` / `_destr` = {field bits, 1, byte offset},
`_thread_db_sizeof_pthread_key_struct` = {struct size}. Parsed once per file identity.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from .elfinfo import FileCache, defined_symbols

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


def _read(elf: ELFFile, vaddr: int, size: int) -> bytes:
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_filesz"]:
            elf.stream.seek(seg["p_offset"] + vaddr - seg["p_vaddr"])
            return elf.stream.read(size)
    raise ValueError(f"address {vaddr:#x} is not in the file")


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
            bits, count, _ = struct.unpack("<3I", _read(elf, syms[DESCRIPTORS["table"]][0], 12))
            (stride,) = struct.unpack("<I", _read(elf, syms[DESCRIPTORS["sizeof"]][0], 4))
            fields = {}
            for f in ("seq", "destr"):
                fbits, _, off = struct.unpack("<3I", _read(elf, syms[DESCRIPTORS[f]][0], 12))
                fields[f] = (off, fbits // 8)
    except (OSError, ELFError, ValueError, struct.error):
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
