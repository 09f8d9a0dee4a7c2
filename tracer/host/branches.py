"""Where code enters a function other than at its top: every direct jmp, jcc and call of a whole
ELF file, and every function symbol, by target address.

A probe past a function's first instruction counts the calls of that function only when nothing
else reaches it: glibc's mempcpy jumps into memmove past memmove's entry, so a site there counts
mempcpy's calls as memmove's. The whole file's code is decoded once per build (capstone's light
mode, ~0.3 s for libc) and kept in memory by file identity and on disk by build id.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
from capstone import CS_ARCH_X86, CS_MODE_64, Cs, CsError
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from .elf import CACHE_DIR, FileCache, _tables, build_id

SYMBOL = -1  # the source of an entry that is a symbol, not a branch
FORMAT = 2   # of the files cached on disk
_SHF_EXECINSTR = 0x4
_PF_X = 0x1
# Mnemonics whose immediate operand is a branch target (capstone's light mode spells a
# prefixed one "bnd jmp", "notrack call"): jmp, jcc, call, loop*, jrcxz, xbegin.
_BRANCHES = ("j", "call", "loop", "xbegin")


def _code_ranges(elf: ELFFile) -> list:
    """(bytes, vaddr) of the executable sections, or of the executable PT_LOAD segments when
    the file has no section headers (a stripped-to-the-bone file still has those)."""
    secs = [(sec.data(), sec["sh_addr"]) for sec in elf.iter_sections()
            if sec["sh_flags"] & _SHF_EXECINSTR and sec["sh_type"] == "SHT_PROGBITS"]
    if secs:
        return secs
    return [(seg.data(), seg["p_vaddr"]) for seg in elf.iter_segments()
            if seg["p_type"] == "PT_LOAD" and seg["p_flags"] & _PF_X]


_WRAPPED = 1 << 63  # a target at or past this is no file address (and no int64)


def _decode(path: str) -> np.ndarray:
    """[(target, source)] of the file's direct branches and calls, and [(symbol, SYMBOL)] of its
    function symbols, sorted by target."""
    pairs: list = []
    with open(path, "rb") as fh:
        elf = ELFFile(fh)
        md = Cs(CS_ARCH_X86, CS_MODE_64)
        for data, base in _code_ranges(elf):
            view, at = memoryview(data), 0
            while at < len(data):  # a byte that does not decode ends a run: skip it, go on
                for addr, size, mnemonic, op in md.disasm_lite(view[at:], base + at):
                    at = addr + size - base
                    if op[:2] == "0x" and mnemonic.split()[-1].startswith(_BRANCHES):
                        target = int(op, 16)
                        if target < _WRAPPED:  # (data decoded as a jump can wrap round to
                            pairs.append((target, addr))  # no address of the file)
                else:
                    at += 1
        for _, syms, _names in _tables(elf):
            funcs = (np.isin(syms["info"] & 0xF, (2, 10)) & (syms["value"] != 0)
                     & (syms["shndx"] != 0))
            pairs += [(int(v), SYMBOL) for v in np.unique(syms["value"][funcs]).tolist()]
    out = np.array(pairs or [(0, 0)], dtype=np.int64).reshape(-1, 2)
    return out[np.argsort(out[:, 0], kind="stable")]


DISK_MIN = 256 * 1024  # bytes of file below which decoding is quicker than keeping it on disk


def _load(path: str) -> Optional[np.ndarray]:
    bid = build_id(path)
    try:
        big = os.path.getsize(path) >= DISK_MIN
    except OSError:
        return None
    cache = CACHE_DIR / f"branches-{FORMAT}-{bid}.npy" if bid and big else None
    if cache is not None:
        try:
            return np.load(cache)
        except (OSError, ValueError):
            pass
    try:
        pairs = _decode(path)
    except (ELFError, ValueError, CsError):
        return None
    if cache is not None:
        try:
            CACHE_DIR.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, pairs)
            tmp.replace(cache)
        except OSError:
            pass  # decoded again next time
    return pairs


_ENTRIES = FileCache(_load, limit=64)


def entries(path: str) -> Optional[np.ndarray]:
    """[(target, source)] of a file, sorted by target; None when it is no ELF file."""
    return _ENTRIES.get(path)[1]


def entering(path: str, lo: int, hi: int, inside: Optional[tuple] = None) -> Optional[list]:
    """The (target, source) entries with lo < target <= hi, except branches whose source lies
    in inside = (start, end) (a function's own branches, which its own analysis covers).
    Source SYMBOL: a function symbol starts there. None when the file could not be read or
    decoded: no proof either way, and callers must not take it for "none"."""
    pairs = entries(path)
    if pairs is None:
        return None
    a, b = np.searchsorted(pairs[:, 0], [lo + 1, hi + 1])
    found = pairs[a:b]
    if inside is not None:
        own = (found[:, 1] >= inside[0]) & (found[:, 1] < inside[1])
        found = found[~own]
    return [(int(t), int(s)) for t, s in found.tolist()]


def describe(entry: tuple, function: str, start: int) -> str:
    """`a jump at 0x16d7c6 lands at memmove+0x3`, for a refusal."""
    target, source = entry
    where = f"{function}+{target - start:#x}"
    return (f"another function symbol starts at {where}" if source == SYMBOL
            else f"a jump or call at {source:#x} lands at {where}")
