"""What keytrace needs of an ELF file to name an address: its load span and its function
symbols, from .symtab and .dynsym, and from the separate debug file under /usr/lib/debug that a
build-id or .gnu_debuglink points to. Parsed once per file identity (device, inode).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

DEBUG_ROOT = Path(os.environ.get("KEYTRACE_DEBUG_ROOT", "/usr/lib/debug"))
# keytrace's cache of what it worked out about this host (kernel headers, decoded files, the
# single-step check): one place, for every module that keeps something.
CACHE_DIR = Path(os.environ.get("KEYTRACE_CACHE", "/var/cache/keytrace"))
PAGE = 4096


@dataclass
class ElfInfo:
    path: str               # the first path the file was met by
    lo: int                 # first PT_LOAD vaddr, page-aligned: where the mapping starts
    hi: int                 # end of the last PT_LOAD
    static: bool = False    # an executable with no PT_INTERP: no dynamic loader, no libc.so
    _syms: Optional[tuple] = None  # (starts, ends, names, debug file), read on first use
    # Every path the file was met by, plain ones first: /proc links die with their process.
    paths: list = field(default_factory=list)

    def met_as(self, path: str) -> None:
        if path not in self.paths:
            self.paths.insert(0 if not path.startswith("/proc/") else len(self.paths), path)
            del self.paths[8:]

    def _symbols(self) -> tuple:
        if self._syms is None:
            parts: list = []
            debug = None
            for path in self.paths or [self.path]:
                try:
                    with open(path, "rb") as fh:
                        elf = ELFFile(fh)
                        _functions(elf, parts)
                        debug = _debug_file(elf, path)
                    if debug is not None:
                        with open(debug, "rb") as dfh:
                            _functions(ELFFile(dfh), parts)
                    break
                except OSError:  # a link of an exited process: try the next path
                    parts = []
                    continue
                except (ELFError, ValueError):
                    break
            else:
                return (np.zeros(0, np.uint64), np.zeros(0, np.uint64),
                        (b"", np.zeros(1, np.uint64)), None)  # not kept: a later call retries
            # Compact, for an agent that keeps the tables of many large libraries: two arrays
            # of addresses and one blob of names; a name is decoded when it is asked for.
            self._syms = (*_merge(parts), str(debug) if debug else None)
        return self._syms

    @property
    def debug_file(self) -> Optional[str]:
        return self._symbols()[3]

    @staticmethod
    def _name(names: tuple, i: int) -> str:
        blob, offsets = names
        return blob[int(offsets[i]):int(offsets[i + 1])].decode("utf-8", "replace")

    def address_of(self, name: str) -> Optional[int]:
        """The address of a function symbol, by name."""
        starts, _, names, _ = self._symbols()
        return next((int(starts[i]) for i in range(len(starts)) if self._name(names, i) == name),
                    None)

    def symbol(self, vaddr: int) -> Optional[tuple]:
        """(name, offset) of the function containing vaddr, if any."""
        starts, ends, names, _ = self._symbols()
        i = int(np.searchsorted(starts, np.uint64(vaddr), side="right")) - 1
        if i >= 0 and vaddr < int(ends[i]):
            return self._name(names, i), vaddr - int(starts[i])
        return None


_SYM = np.dtype([("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"),
                 ("value", "<u8"), ("size", "<u8")])  # Elf64_Sym
_TYPES = {1: "STT_OBJECT", 2: "STT_FUNC", 10: "STT_GNU_IFUNC"}


def _tables(elf: ELFFile) -> list:
    """[(section name, Elf64_Sym array, its names)] of .dynsym then .symtab, read in one go:
    pyelftools' symbol objects cost a second per libc; a numpy view and one split do not."""
    out = []
    for section in (".dynsym", ".symtab"):
        sec = elf.get_section_by_name(section)
        # absent, or NOBITS in a debug file
        if not isinstance(sec, SymbolTableSection) or sec["sh_type"] == "SHT_NOBITS":
            continue
        syms = np.frombuffer(sec.data(), dtype=_SYM)
        strtab = elf.get_section(sec["sh_link"]).data()
        names = [strtab[o:strtab.index(b"\0", o)].decode("utf-8", "replace")
                 for o in syms["name"].tolist()]
        out.append((section, syms, names))
    return out


def defined_symbols(elf: ELFFile, names, kinds=None) -> dict:
    """name -> {"st_value", "st_size", "type"} of the first defined symbol of that name (of
    one of kinds, if given: "STT_FUNC", ...), in .dynsym then .symtab."""
    wanted, found = set(names), {}
    for _, syms, sym_names in _tables(elf):
        for i, name in enumerate(sym_names):
            if name in wanted and name not in found:
                kind = _TYPES.get(int(syms["info"][i]) & 0xF, "")
                if syms["shndx"][i] and syms["value"][i] and (kinds is None or kind in kinds):
                    found[name] = {"st_value": int(syms["value"][i]),
                                   "st_size": int(syms["size"][i]), "type": kind}
    return found


def _functions(elf: ELFFile, into: list) -> None:
    """Append (addresses, sizes, names blob, name offsets) of the function symbols of .symtab
    then .dynsym. Vectorised: a C++ library's tables hold hundreds of thousands of long names,
    and a Python object per name is what a long-running agent's heap would keep the holes of."""
    for section in (".symtab", ".dynsym"):
        sec = elf.get_section_by_name(section)
        if not isinstance(sec, SymbolTableSection) or sec["sh_type"] == "SHT_NOBITS":
            continue
        syms = np.frombuffer(sec.data(), dtype=_SYM)
        func = np.isin(syms["info"] & 0xF, (2, 10)) & (syms["value"] != 0) & (syms["shndx"] != 0)
        if not func.any():
            continue
        strtab = np.frombuffer(elf.get_section(sec["sh_link"]).data(), dtype=np.uint8)
        starts = syms["name"][func].astype(np.int64)
        # a name ends at its NUL, or at "@" (a version: versioned aliases are one function)
        stops = np.append(np.flatnonzero((strtab == 0) | (strtab == ord("@"))), -1)
        ends = stops[np.minimum(np.searchsorted(stops[:-1], starts), len(stops) - 1)]
        named = ends > starts  # (a name past the table's last NUL, in a broken file: none)
        starts, ends = starts[named], ends[named]
        lengths = ends - starts
        offsets = np.zeros(len(lengths) + 1, dtype=np.uint64)
        np.cumsum(lengths, out=offsets[1:])
        # every name's bytes, gathered in one go: start + 0 .. length - 1 for each name
        gather = np.repeat(starts - offsets[:-1].astype(np.int64), lengths) + \
            np.arange(int(offsets[-1]), dtype=np.int64)
        into.append((syms["value"][func][named].astype(np.uint64),
                     np.maximum(syms["size"][func][named], 1).astype(np.uint64),
                     strtab[gather].tobytes(), offsets))


def _merge(parts: list) -> tuple:
    """(starts, ends, (names blob, offsets)) sorted by address, the first name met for an
    address kept (.symtab's, then .dynsym's)."""
    if not parts:
        return (np.zeros(0, np.uint64), np.zeros(0, np.uint64), (b"", np.zeros(1, np.uint64)))
    addrs = np.concatenate([p[0] for p in parts])
    sizes = np.concatenate([p[1] for p in parts])
    base = np.cumsum([0] + [len(p[2]) for p in parts[:-1]]).astype(np.uint64)
    begins = np.concatenate([p[3][:-1] + b for p, b in zip(parts, base)])
    lengths = np.concatenate([np.diff(p[3]) for p in parts])
    blob = np.frombuffer(b"".join(p[2] for p in parts), dtype=np.uint8)
    _, first = np.unique(addrs, return_index=True)  # sorted by address, first occurrence
    lengths = lengths[first].astype(np.int64)
    offsets = np.zeros(len(first) + 1, dtype=np.uint64)
    np.cumsum(lengths, out=offsets[1:])
    gather = np.repeat(begins[first].astype(np.int64) - offsets[:-1].astype(np.int64), lengths) \
        + np.arange(int(offsets[-1]), dtype=np.int64)
    starts = addrs[first]
    return starts, starts + sizes[first], (blob[gather].tobytes(), offsets)


def _debug_file(elf: ELFFile, path: str) -> Optional[Path]:
    for sec in elf.iter_sections():
        if sec["sh_type"] == "SHT_NOTE":
            for note in sec.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID":
                    bid = note["n_desc"]
                    bid = bid.hex() if isinstance(bid, bytes) else bid
                    cand = DEBUG_ROOT / ".build-id" / bid[:2] / f"{bid[2:]}.debug"
                    if cand.exists():
                        return cand
    link = elf.get_section_by_name(".gnu_debuglink")
    if link is not None:
        name = link.data().split(b"\0", 1)[0].decode(errors="replace")
        d = Path(path).parent
        for cand in (d / name, d / ".debug" / name, DEBUG_ROOT / d.relative_to("/") / name):
            if cand.exists() and str(cand) != path:
                return cand
    return None


class FileCache:
    """What parse(path) made of a file, kept once per file identity (device, inode, mtime):
    the same libc reached through many /proc/PID/map_files links is parsed once."""

    def __init__(self, parse, limit: int = 4096):
        self.parse, self.limit, self.results = parse, limit, {}

    def get(self, path: str) -> tuple:
        """(identity, result); (None, None) when the file cannot be stat'ed."""
        try:
            st = os.stat(path)
        except OSError:
            return None, None
        ident = (st.st_dev, st.st_ino, st.st_mtime_ns)
        if ident not in self.results:
            try:
                result = self.parse(path)
            except OSError:
                # Could not be read just now (a /proc/PID/map_files link whose mapping went
                # away between the stat and the open): no answer about the file, none kept.
                return ident, None
            if len(self.results) >= self.limit:  # a bound for long-running agents
                self.results.clear()
            self.results[ident] = result
        return ident, self.results[ident]

    def clear(self) -> None:
        self.results.clear()


class MappedCache:
    """What parse(path) made of a mapped file, kept by the identity /proc/PID/maps gives it
    (device, inode, name): a reader of every process's memory then stats no /proc/PID/map_files
    link per process. An upgrade replaces a library with a new inode; a file rewritten in place
    keeps its inode (what is read from it is checked where it is used)."""

    def __init__(self, parse, limit: int = 4096):
        self.parse, self.limit, self.results = parse, limit, {}

    def get(self, ident: tuple, path: str):
        """parse(path) for the file of that identity; None when it cannot be read now."""
        if ident not in self.results:
            try:
                result = self.parse(path)
            except OSError:
                return None
            if len(self.results) >= self.limit:
                self.results.clear()
            self.results[ident] = result
        return self.results[ident]


def with_load_base(parse):
    """A parse for MappedCache that gives (the file's lowest mapped address, parse(path)), what
    a reader of a process's memory needs to turn the file's addresses into the process's."""
    def facts(path: str) -> tuple:
        info = elf_info(path)
        return (info.lo, parse(path)) if info else (0, "unreadable")
    return facts


def _segments(path: str) -> Optional[ElfInfo]:
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            segments = list(elf.iter_segments())
            executable = elf["e_type"] == "ET_EXEC" or elf.get_section_by_name(".interp") is not None
    except (ELFError, ValueError):  # not an ELF file: that is an answer (OSError is not)
        return None
    loads = [s for s in segments if s["p_type"] == "PT_LOAD"]
    if not loads:
        return None
    interp = any(s["p_type"] == "PT_INTERP" for s in segments)
    return ElfInfo(path=path, lo=min(s["p_vaddr"] for s in loads) & ~(PAGE - 1),
                   hi=max(s["p_vaddr"] + s["p_memsz"] for s in loads),
                   static=not interp and executable)


_INFOS = FileCache(_segments)


def elf_info(path: str) -> Optional[ElfInfo]:
    """The ELF facts of the file at path (openable from here), or None if it is unreadable."""
    info = _INFOS.get(path)[1]
    if info is not None:
        info.met_as(path)
    return info


def _function_addresses(path: str, names: tuple) -> dict:
    try:
        with open(path, "rb") as fh:
            syms = defined_symbols(ELFFile(fh), names, kinds=("STT_FUNC",))
    except (ELFError, ValueError):
        return {}
    return {name: sym["st_value"] for name, sym in syms.items()}


_ADDRESSES: dict = {}


def function_addresses(path: str, names) -> tuple:
    """(file identity, {name: address}) of the functions among names that the file defines
    (versioned aliases share one address). (None, {}) when the file cannot be stat'ed."""
    names = tuple(sorted(names))
    cache = _ADDRESSES.get(names)
    if cache is None:
        cache = _ADDRESSES[names] = FileCache(lambda p: _function_addresses(p, names))
    ident, found = cache.get(path)
    return (ident[:2] if ident else None), dict(found or {})


def read_at(elf: ELFFile, vaddr: int, size: int) -> bytes:
    """size bytes at a virtual address of an open ELF file (from its PT_LOAD segments)."""
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_filesz"]:
            elf.stream.seek(seg["p_offset"] + vaddr - seg["p_vaddr"])
            return elf.stream.read(size)
    raise ValueError(f"address {vaddr:#x} is not in the file")


def _loads(path: str) -> tuple:
    """(e_machine, ((p_vaddr, p_filesz, p_offset) of each PT_LOAD segment)); ("", ()) for a
    file that is no ELF file."""
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            return elf["e_machine"], tuple((s["p_vaddr"], s["p_filesz"], s["p_offset"])
                                           for s in elf.iter_segments() if s["p_type"] == "PT_LOAD")
    except (ELFError, ValueError):
        return "", ()


_LOADS = FileCache(_loads)


def load_segments(path: str) -> tuple:
    """(e_machine, the PT_LOAD segments as (p_vaddr, p_filesz, p_offset)) of the ELF file at
    path, read once per file; OSError when it cannot be read."""
    found = _LOADS.get(path)[1]
    if found is None:
        raise FileNotFoundError(2, "cannot read", path)
    return found


def file_offsets(path: str, vaddrs) -> list:
    """The file offsets of virtual addresses of the ELF file at path (a uprobe is placed by
    its offset in the file). ValueError when one is in no PT_LOAD segment."""
    loads = load_segments(path)[1]
    out = []
    for vaddr in vaddrs:
        seg = next((s for s in loads if s[0] <= vaddr < s[0] + s[1]), None)
        if seg is None:
            raise ValueError(f"address {vaddr:#x} is not in {path}")
        out.append(seg[2] + vaddr - seg[0])
    return out


def read_vaddr(path: str, vaddr: int, size: int) -> bytes:
    """size bytes at a virtual address of the ELF file at path; b"" when unreadable. The
    bytes are read each time; the segment table once per file (a thousand sites of one
    library would parse it a thousand times)."""
    try:
        (offset,) = file_offsets(path, [vaddr])
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(size)
    except (OSError, ValueError):
        return b""


def _build_id(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            for sec in ELFFile(fh).iter_sections():
                if sec["sh_type"] == "SHT_NOTE":
                    for note in sec.iter_notes():
                        if note["n_type"] == "NT_GNU_BUILD_ID":
                            bid = note["n_desc"]
                            return bid.hex() if isinstance(bid, bytes) else bid
    except (ELFError, ValueError):
        pass
    return ""


_BUILD_IDS = FileCache(_build_id)


def build_id(path: str) -> str:
    """The GNU build-id of the file ("" when it has none): the same code, wherever it lies."""
    return _BUILD_IDS.get(path)[1] or ""


_GLOB_DAT = 6  # R_X86_64_GLOB_DAT: a GOT slot the loader fills with a symbol's address


def _got_slots(path: str) -> dict:
    from elftools.elf.relocation import RelocationSection
    out: dict = {}
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            for sec in elf.iter_sections():
                if not isinstance(sec, RelocationSection) or not sec.is_RELA():
                    continue
                symtab = elf.get_section(sec["sh_link"])
                for r in sec.iter_relocations():
                    if r["r_info_type"] == _GLOB_DAT and r["r_info_sym"]:
                        out.setdefault(symtab.get_symbol(r["r_info_sym"]).name, r["r_offset"])
    except (ELFError, ValueError):
        return {}
    return out


_GOT = FileCache(_got_slots)


def got_slot(path: str, name: str) -> int:
    """The vaddr of the GOT slot through which the file reaches symbol name (0: none)."""
    return (_GOT.get(path)[1] or {}).get(name, 0)


def entry_point(path: str) -> Optional[int]:
    """The ELF header's entry point (file vaddr), None if the file is not readable ELF."""
    try:
        with open(path, "rb") as fh:
            return ELFFile(fh).header["e_entry"] or None
    except (OSError, ELFError, ValueError):
        return None
