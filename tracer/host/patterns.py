"""`keytrace calls -e PATTERN`: which functions of which files a list of patterns names.

A pattern is `[LIB:]FUNC[@MAIN]`, with fnmatch globs in both parts; `@MAIN` keeps the calls
the main program makes only; `!` in front excludes what it
matches. LIB (libc when left out) is a short name (`libssl`: libssl.so, libssl.so.3,
libssl-1.1.so), a soname (`libc.so.6`), a glob over those names (`libssl*`), a path to a library
or program, or `exe` (or the program's own file name) for the main program of the traced pids
or command. As bpftrace does, names are looked up in ld.so.cache (`ldconfig -p`, x86-64 entries)
and, when pids are given, first in the files those processes map, opened through
/proc/PID/map_files so that a process in a mount namespace of its own gets its own files.

FUNC globs match the defined function symbols (STT_FUNC, STT_GNU_IFUNC) of .dynsym and .symtab
(and of the separate debug file, when one is installed), `@VERSION` suffixes cut off. Aliases
(malloc, __libc_malloc) share an address: matching any of them selects it once, shown by the
shortest name that does not start with an underscore. Files are told apart by (st_dev, st_ino).
"""
from __future__ import annotations

import difflib
import fnmatch
import dataclasses
import functools
import glob as globbing
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from ..errors import KeytraceError, UsageError
from . import proc
from .demangle import demangle
from .elf import FileCache, _debug_file, _tables, build_id, elf_info, entry_point
from .libc import is_musl, ld_cache

DEFAULT_LIBRARY = "libc"
DEFAULT_LIMIT = 1000
MAIN = "exe"  # the LIB that names the main program of the traced pids or command
MAIN_CALLER = "MAIN"  # FUNC@MAIN: the calls the main program makes (ltrace's word)
USAGE = ("a pattern is [LIB:]FUNC[@OBJECT] or !FUNC to exclude, globs allowed: libc:malloc, "
         "'libssl:SSL_*', malloc@MAIN, malloc@libfoo")
_GLOB = re.compile(r"[*?\[]")
_FUNCTION_TYPES = (2, 10)  # STT_FUNC, STT_GNU_IFUNC


@dataclass(frozen=True)
class Target:
    """One function to probe."""
    path: str      # openable from here (may be a /proc/PID/map_files link)
    name: str      # the file's display path: /usr/lib/x86_64-linux-gnu/libc.so.6
    library: str   # short display name: the soname or the file name, libc.so.6
    function: str  # display name: the shortest alias not starting with "_"
    address: int   # the symbol's st_value: what bcc's attach_uprobe(name=path, addr=...) wants
    size: int
    # "": a plain function; else why the address is not the symbol's: an IFUNC's implementation
    # ("strlen: __strlen_avx2"), or why it could not be found (then the resolver's address)
    ifunc: str = ""
    # why no probe can go on it at all (its code is not in the file: the vDSO's); "" if one can
    unprobeable: str = ""
    caller: str = ""  # FUNC@OBJECT: only the calls OBJECT makes (MAIN, or a library as given)


@dataclass(frozen=True)
class Pattern:
    text: str                # as given
    library: Optional[str]   # None: not given (libc for an inclusion, any for an exclusion)
    function: str
    exclude: bool
    caller: str = ""         # after '@': MAIN, a library, or "" for every caller


def parse_pattern(text: str, demangled: bool = False) -> Pattern:
    """`[!][LIB:]FUNC` split and checked; UsageError when it is malformed. demangled (-C): FUNC
    may be a C++ name as written ('std::*', 'operator new*'), spaces and '::' included."""
    body = text.strip()
    exclude = body.startswith("!")
    body = body[1:] if exclude else body
    caller = ""
    if "@" in body:
        body, _, caller = body.rpartition("@")
        if not caller:
            raise UsageError(f"pattern {text!r} has nothing after '@': MAIN (the calls the main "
                             "program makes) or a library (the calls it makes)")
        if re.fullmatch(r"[A-Z][A-Z0-9_.]*_\d[\d.]*|V\d+", caller):
            raise UsageError(f"pattern {text!r}: {caller!r} after '@' looks like a symbol "
                             "version, which is not given (FUNC names each version); after '@' "
                             "comes MAIN or a library")
        if exclude:
            raise UsageError(f"pattern {text!r}: an exclusion takes no '@'")
        if caller != MAIN_CALLER and "/" not in caller:
            _check_glob(caller, text, "library")
    if not body:
        raise UsageError(f"empty pattern {text!r}: {USAGE}")
    # FUNC holds no single ':' (a symbol, or a C++ name's '::'); a path as LIB might.
    singles = [m.start() for m in re.finditer(r"(?<!:):(?!:)", body)]
    at = singles[-1] if singles else -1
    library, colon, function = (body[:at], ":", body[at + 1:]) if at >= 0 else ("", "", body)
    if not demangled and ("::" in function or re.search(r"\s", function.strip())):
        raise UsageError(f"pattern {text!r} is a C++ name as written: add -C to match names "
                         "demangled")
    if colon and not library:
        raise UsageError(f"pattern {text!r} has an empty library before ':': {USAGE}")
    if colon and not function:
        raise UsageError(f"pattern {text!r} has an empty function after ':': {USAGE}")
    _check_glob(function, text, "function", demangled)
    if colon and "/" not in library:
        _check_glob(library, text, "library")
    return Pattern(text, library if colon else None, function, exclude, caller)


def is_glob(text: str) -> bool:
    return bool(_GLOB.search(text))


def _check_glob(part: str, text: str, what: str, demangled: bool = False) -> None:
    if (re.search(r"\s", part) and not demangled) or (what == "function" and "/" in part
                                                      and not demangled):
        raise UsageError(f"bad {what} glob {part!r} in pattern {text!r}: {USAGE}")
    i = part.find("[")
    while i >= 0:
        # As fnmatch reads a bracket: '!' negates, a ']' right after the opening is literal.
        j = i + 1 + (part[i + 1:i + 2] == "!")
        j += part[j:j + 1] == "]"
        end = part.find("]", j)
        if end < 0:
            raise UsageError(f"bad {what} glob {part!r} in pattern {text!r}: '[' is not closed")
        i = part.find("[", end + 1)


# ---- libraries ---------------------------------------------------------------------------



@dataclass(frozen=True)
class _Library:
    path: str       # openable from here
    name: str       # display path
    library: str    # short display name
    ident: tuple    # (st_dev, st_ino)
    aliases: tuple  # names a LIB may match: sonames, file names
    main: bool = False


def _identity(path: str) -> Optional[tuple]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _display_library(aliases: Sequence[str]) -> str:
    """A versioned soname (libssl.so.3) rather than the development link's (libssl.so)."""
    rank = [(not re.search(r"\.so\.\d", a), ".so" not in a) for a in aliases]
    return aliases[rank.index(min(rank))]


@functools.lru_cache(maxsize=1)
def _cache_files(entries: tuple) -> dict:
    """(st_dev, st_ino) -> [sonames] for ld.so.cache's entries (keyed by them, so that
    ld_cache.cache_clear() clears this too)."""
    files: dict = {}
    for soname, path in entries:
        ident = _identity(path)
        if ident is not None:
            files.setdefault(ident, []).append(soname)
    return files


def _sonames(ident: tuple) -> list:
    return _cache_files(tuple(ld_cache().items())).get(ident, [])


def _library(opened: str, display: str, main: bool = False) -> Optional[_Library]:
    """The file at opened (display: its path as its process sees it)."""
    ident = _identity(opened)
    if ident is None:
        return None
    path = opened
    if opened.startswith("/proc/") and _identity(display) == ident:
        path = display  # the same file in our mount namespace: a path that outlives the process
    aliases = tuple(dict.fromkeys([*_sonames(ident), os.path.basename(display)]))
    library = os.path.basename(display) if main else _display_library(aliases)
    return _Library(path, display, library, ident, aliases, main)


def _cache_libraries() -> list:
    out = []
    for ident, sonames in _cache_files(tuple(ld_cache().items())).items():
        path = os.path.realpath(ld_cache()[sonames[0]])  # as /proc/PID/maps would show it
        out.append(_Library(path, path, _display_library(sonames), ident,
                            tuple(dict.fromkeys([*sonames, os.path.basename(path)]))))
    return out


def _short_name(spec: str):
    """libssl matches libssl.so, libssl.so.3 and libssl-1.1.so (not libssl3.so)."""
    return re.compile(rf"{re.escape(spec)}(\.so(\..*)?|-\d[^/]*\.so(\..*)?)\Z").match


class _Scope:
    """The files a LIB may name, for these pids and this command; read once, when needed."""

    def __init__(self, pids: Sequence[int], exe: Optional[str]):
        self.pids, self.exe = list(pids), exe
        self._mapped: Optional[list] = None
        self._main: Optional[list] = None

    def mapped(self) -> list:
        if self._mapped is None:
            self._mapped = []
            for pid in self.pids:
                program = proc.exe(pid)
                for path, _, link in proc.modules(pid):
                    lib = _library(link, path, main=path == program)
                    if lib is not None:
                        self._mapped.append(lib)
        return self._mapped

    def main(self) -> list:
        if self._main is None:
            self._main = [lib for lib in self.mapped() if lib.main]
            if self.exe:
                path = os.path.abspath(self.exe) if "/" in self.exe else shutil.which(self.exe)
                lib = _library(path, os.path.realpath(path), main=True) if path else None
                if lib is None:
                    raise KeytraceError(f"no such program: {self.exe}")
                self._main.append(lib)
        return self._main

    def needed(self) -> list:
        """The libraries the command's program names (DT_NEEDED), found where its loader
        would look: RUNPATH/RPATH ($ORIGIN too), LD_LIBRARY_PATH, then ld.so.cache."""
        if not self.exe or self.pids:
            return []
        out = []
        for program in self.main():
            try:
                with open(program.path, "rb") as fh:
                    dyn = ELFFile(fh).get_section_by_name(".dynamic")
                    tags = list(dyn.iter_tags()) if dyn is not None else []
            except (OSError, ELFError, ValueError):
                continue
            origin = os.path.dirname(program.name)
            dirs = [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)
                    for t in tags if t.entry.d_tag in ("DT_RUNPATH", "DT_RPATH")
                    for d in (t.runpath if t.entry.d_tag == "DT_RUNPATH" else t.rpath).split(":")]
            dirs += [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
            for t in tags:
                if t.entry.d_tag == "DT_NEEDED":
                    path = next((os.path.join(d, t.needed) for d in dirs
                                 if os.path.exists(os.path.join(d, t.needed))),
                                ld_cache().get(t.needed))
                    lib = _library(path, os.path.realpath(path)) if path else None
                    if lib is not None:
                        out.append(lib)
        return out

    def libraries(self, spec: str) -> list:
        """The files spec names, one per identity; KeytraceError when there is none."""
        if spec == MAIN:
            found = self.main()
            if not found:
                raise KeytraceError(f"'{MAIN}' names the traced program: give -p PID or a command")
        elif "/" in spec:
            found = self._paths(spec)
        else:
            match = self._matcher(spec)
            found = [lib for lib in self.mapped() + self.main() + self.needed() if match(lib)]
            if not found:  # not mapped (yet): what the dynamic linker would load
                found = [lib for lib in _cache_libraries() if match(lib, cached=True)]
            if not found:
                raise KeytraceError(self._unknown(spec))
        return list({lib.ident: lib for lib in reversed(found)}.values())[::-1]

    def _matcher(self, spec: str):
        short = _short_name(spec) if not _GLOB.search(spec) and ".so" not in spec else None

        def match(lib: _Library, cached: bool = False) -> bool:
            # "libc" is musl too for a process that maps musl; from ld.so.cache (nothing traced
            # maps one) it is the system's libc.so.N, not musl's loader that the cache also lists
            if spec == DEFAULT_LIBRARY and is_musl(lib.name):
                return not cached
            return any(fnmatch.fnmatchcase(a, spec) or (short and short(a)) for a in lib.aliases)
        return match

    def _paths(self, spec: str) -> list:
        found = []
        spec = os.path.abspath(spec)
        for path in (sorted(globbing.glob(spec)) if _GLOB.search(spec) else [spec]):
            mapped = [lib for lib in self.mapped() if lib.name == path]
            lib = mapped[0] if mapped else _library(path, os.path.realpath(path))
            if lib is None:  # the path as the traced processes see it
                lib = next((_library(f"/proc/{pid}/root{path}", path) for pid in self.pids
                            if _identity(f"/proc/{pid}/root{path}")), None)
            if lib is not None and (path == spec or _FUNCTIONS.get(lib.path)[1] is not None):
                found.append(lib)  # what a glob finds that is not ELF is not a library
        if not found:
            where = f" (nor under /proc/{self.pids[0]}/root)" if self.pids else ""
            raise KeytraceError(f"no such file: {spec}{where}")
        return found

    def _unknown(self, spec: str) -> str:
        names: dict = {}  # a name or its stem -> the name to suggest
        for lib in _cache_libraries() + self.mapped() + self.main() + self.needed():
            for alias in (lib.library, *lib.aliases):
                names.setdefault(alias, lib.library)
                names.setdefault(alias.split(".so")[0], lib.library)
        query = _GLOB.sub("", spec)
        close = list(dict.fromkeys(names[n] for n in difflib.get_close_matches(query, names, n=6)))
        where = "ld.so.cache" + (" or the files mapped by pid " + ", ".join(map(str, self.pids))
                                 if self.pids else "")
        hint = f": did you mean {', '.join(close[:3])}?" if close else f" in {where}"
        return f"no library matches {spec!r}{hint}"


# ---- functions ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Functions:
    """The function symbols of one file, one entry per address."""
    addresses: tuple
    sizes: tuple
    display: tuple     # the plainest name of each address
    names: tuple       # every name of each address
    index: dict        # every name -> positions of its addresses (one name may have several)
    ifuncs: frozenset  # addresses of STT_GNU_IFUNC symbols: resolvers, run once at load


def _read_functions(path: str) -> Optional[_Functions]:
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            tables = _tables(elf)
            debug = _debug_file(elf, path)
    except (ELFError, ValueError):
        return None  # not an ELF file: an answer (an OSError is not)
    try:
        if debug is not None:  # the separate debug file's .symtab: the local functions too
            with open(debug, "rb") as dfh:
                tables += _tables(ELFFile(dfh))
    except (OSError, ELFError, ValueError):
        pass  # the file's own tables still stand
    found: dict = {}  # address -> [size, names]
    ifuncs = set()
    for _, syms, names in tables:
        funcs = np.flatnonzero(np.isin(syms["info"] & 0xF, _FUNCTION_TYPES)
                               & (syms["value"] != 0) & (syms["shndx"] != 0))
        values, sizes = syms["value"][funcs].tolist(), syms["size"][funcs].tolist()
        ifuncs.update(syms["value"][funcs][(syms["info"][funcs] & 0xF) == 10].tolist())
        for i, value, size in zip(funcs.tolist(), values, sizes):
            name = names[i].split("@")[0]
            if name:
                entry = found.setdefault(value, [0, []])
                entry[0] = max(entry[0], size)
                if name not in entry[1]:
                    entry[1].append(name)
    addresses = sorted(found)
    index: dict = {}
    for pos, address in enumerate(addresses):
        for name in found[address][1]:
            index.setdefault(name, []).append(pos)
    return _Functions(tuple(addresses), tuple(found[a][0] for a in addresses),
                      tuple(min(found[a][1], key=_plainest) for a in addresses),
                      tuple(tuple(found[a][1]) for a in addresses), index, frozenset(ifuncs))


_FUNCTIONS = FileCache(_read_functions)


def _functions(lib: _Library) -> _Functions:
    table = _FUNCTIONS.get(lib.path)[1]
    if table is None:
        if _identity(lib.path) is None:
            raise KeytraceError(f"cannot read {lib.name}: the file or its process is gone")
        raise KeytraceError(f"{lib.name} is not an ELF file")
    return table


def _matching(table: _Functions, function: str, demangled: bool = False) -> list:
    """Positions of the addresses whose names function matches (demangled: their C++ names
    as written too)."""
    if not _GLOB.search(function) and not demangled:
        return table.index.get(function, [])
    match = re.compile(fnmatch.translate(function)).fullmatch
    return sorted({p for name, positions in table.index.items()
                   if match(name) or (demangled and name.startswith("_Z") and match(demangle(name)))
                   for p in positions})


def _no_function(pattern: Pattern, libs: list) -> str:
    names = {n for lib in libs for n in _functions(lib).index}
    query = _GLOB.sub("", pattern.function)
    if not query.startswith("_"):
        names = {n for n in names if not n.startswith("_")} or names
    close = difflib.get_close_matches(query, sorted(names), n=3)
    shown = [lib.library for lib in libs]
    where = (", ".join(shown) if len(shown) <= 3
             else f"{len(shown)} libraries matching {pattern.library!r}")
    hint = f": did you mean {', '.join(close)}?" if close else ""
    return f"no function in {where} matches {pattern.function!r}{hint}"


def _shown(table: _Functions, pos: int, function: str) -> str:
    """The symbol a target is shown by: the one asked for, else the plainest the glob matched
    (by its symbol, or by its C++ name as written), else the plainest."""
    if not _GLOB.search(function) and function in table.index:
        return function
    match = re.compile(fnmatch.translate(function)).fullmatch
    return min((n for n in table.names[pos] if match(n) or match(demangle(n))), key=_plainest,
               default=table.display[pos])


def _plainest(name: str) -> tuple:
    return (name.startswith("_"), len(name), name)


def _target(lib: _Library, table: _Functions, pos: int, asked: Optional[str] = None) -> Target:
    address, name = table.addresses[pos], asked or table.display[pos]
    if address not in table.ifuncs:
        return Target(lib.path, lib.name, lib.library, name, address, table.sizes[pos])
    found = _implementation(lib, name)
    if found is None:
        return Target(lib.path, lib.name, lib.library, name, address, table.sizes[pos],
                      ifunc=f"{name} is an IFUNC and keytrace does not map {lib.library} itself: "
                            "its resolver is probed, which runs at load only")
    impl = table.addresses.index(found) if found in table.addresses else None
    size = table.sizes[impl] if impl is not None else 0
    what = table.display[impl] if impl is not None else f"{found:#x}"
    others = [n for p, n in _choices(lib, table).get(found, ()) if p != pos]
    if others:  # one implementation serves several IFUNCs (memcpy, memmove): its row says so
        name = "|".join([name] + others)
    info = elf_info(lib.path)
    if info is not None and not info.lo <= found < info.hi:
        # time, gettimeofday: the resolver hands out the vDSO's function, kernel-provided code
        return Target(lib.path, lib.name, lib.library, name, address, table.sizes[pos],
                      ifunc=f"{name}: the vDSO's",
                      unprobeable=f"{lib.library} runs {name} in the vDSO (code the kernel maps "
                                  "into every process, which no uprobe can reach)")
    return Target(lib.path, lib.name, lib.library, name, found, size, ifunc=f"{name}: {what}")


def _implementation(lib: _Library, name: str) -> Optional[int]:
    """The address (file vaddr) an IFUNC's resolver chose. It runs once, at load, so probes go
    on its choice. This process maps the same file, or a copy of the same build (a container's,
    a private copy), on the same processor: dlsym here returns the choice a traced process made
    too. None when this process maps no such file."""
    import ctypes  # only for IFUNCs
    wanted = build_id(lib.path)
    for path, bias, opened in proc.modules(os.getpid()):
        if _identity(opened) == lib.ident or (wanted and build_id(opened) == wanted):
            try:
                fn = getattr(ctypes.CDLL(path), name)
            except (OSError, AttributeError):
                return None
            return ctypes.cast(fn, ctypes.c_void_p).value - bias
    return None


_CHOICES: dict = {}  # library identity -> {implementation: [(position, name) of its IFUNCs]}


def _choices(lib: _Library, table: _Functions) -> dict:
    """Which implementation each IFUNC of the library chose here, by implementation."""
    if lib.ident not in _CHOICES:
        out: dict = {}
        for pos, address in enumerate(table.addresses):
            if address in table.ifuncs:
                found = _implementation(lib, table.display[pos])
                if found is not None:
                    out.setdefault(found, []).append((pos, table.display[pos]))
        _CHOICES[lib.ident] = out
    return _CHOICES[lib.ident]


def _one_per_address(targets: list) -> list:
    """IFUNCs may choose one implementation (memcpy and memmove): probed once, named by all."""
    by: dict = {}
    for t in targets:
        key = (_identity(t.path), t.address, t.caller)
        if key in by:
            first = by[key]
            names = list(dict.fromkeys(first.function.split("|") + t.function.split("|")))
            by[key] = dataclasses.replace(first, function="|".join(names))
        else:
            by[key] = t
    return list(by.values())


# ---- FUNC@OBJECT: the objects calls are counted from --------------------------------------

@dataclass(frozen=True)
class CallerObject:
    """An object FUNC@OBJECT keeps the calls of: where to probe its first code (the program's
    entry point, a library's DT_INIT), which runs before it makes any call, and its image."""
    spec: str    # as given after '@'
    path: str    # openable from here
    name: str    # its display path (as /proc/PID/maps shows it)
    start: int   # file vaddr of its first code
    lo: int      # its image: file vaddrs
    hi: int


def identity(path: str) -> Optional[tuple]:
    """(st_dev, st_ino) of a file, None when it cannot be stat'ed."""
    return _identity(path)


def caller_library(spec: str, pids: Sequence[int] = (), exe: Optional[str] = None) -> CallerObject:
    """The one library FUNC@LIB means, found as -e's LIB is."""
    libs = _Scope(pids, exe).libraries(spec)
    if len(libs) != 1:
        raise UsageError(f"@{spec} names {len(libs)} libraries ({', '.join(l.library for l in libs[:4])}"
                         f"{', ...' if len(libs) > 4 else ''}): name one")
    lib = libs[0]
    info = elf_info(lib.path)
    start = None
    try:
        with open(lib.path, "rb") as fh:
            dyn = ELFFile(fh).get_section_by_name(".dynamic")
            start = next((t.entry.d_ptr for t in (dyn.iter_tags() if dyn is not None else ())
                          if t.entry.d_tag == "DT_INIT"), None)
    except (OSError, ELFError, ValueError):
        pass
    if info is None or not start:
        raise UsageError(f"@{spec}: {lib.name} has no DT_INIT, the code that tells keytrace "
                         "where it is loaded")
    return CallerObject(spec, lib.path, lib.name, start, info.lo, info.hi)


def main_program(pids: Sequence[int] = (), exe: Optional[str] = None) -> CallerObject:
    """The one program FUNC@MAIN means: the launched command's, or the -p processes' (one
    program for all of them), opened as -e's LIB is (through /proc/PID/map_files: a process in
    a mount namespace of its own has its own file). Its entry point runs before any call it
    makes."""
    mains = {lib.ident: lib for lib in _Scope(pids, exe).main()}
    if len(mains) != 1:
        raise UsageError("FUNC@MAIN needs one main program: a command (after --) or -p "
                         "processes of one program")
    (lib,) = mains.values()
    info, start = elf_info(lib.path), entry_point(lib.path)
    if info is None or start is None:
        raise KeytraceError(f"{lib.name} is not an ELF program: FUNC@MAIN cannot find its code")
    return CallerObject("MAIN", lib.path, lib.name, start, info.lo, info.hi)


# ---- ltrace's default: what the program imports ------------------------------------------

def _undefined_functions(path: str) -> list:
    """The functions a program calls in other objects: its undefined dynamic FUNC symbols."""
    try:
        with open(path, "rb") as fh:
            dynsym = ELFFile(fh).get_section_by_name(".dynsym")
            if dynsym is None:
                return []
            return list(dict.fromkeys(
                s.name.split("@")[0] for s in dynsym.iter_symbols()
                if s.name and s["st_shndx"] == "SHN_UNDEF" and s["st_info"]["type"] == "STT_FUNC"))
    except (OSError, ELFError, ValueError):
        return []


def imports(pids: Sequence[int] = (), exe: Optional[str] = None) -> list[str]:
    """ltrace's default set, as patterns: each function the main program imports, as
    LIB:FUNC@MAIN in the first library it needs that defines it (calls the program makes)."""
    scope = _Scope(pids, exe)
    programs = {lib.ident: lib for lib in scope.main()}
    if len(programs) != 1:
        raise UsageError("with no -e, the functions the program imports are traced: that needs "
                         "one program (a command after --, or -p processes of one program)")
    (program,) = programs.values()
    libs = scope.needed() if exe and not pids else [lib for lib in scope.mapped() if not lib.main]
    out = []
    for name in _undefined_functions(program.path):
        lib = next((lib for lib in libs if name in _functions(lib).index), None)
        if lib is not None:
            out.append(f"{lib.path}:{name}@MAIN")
    if not out:
        raise KeytraceError(f"{program.name} imports no function from a library: name some "
                            "with -e")
    return out


# ---- resolution --------------------------------------------------------------------------

def resolve(patterns: Sequence[str], pids: Sequence[int] = (), exe: Optional[str] = None,
            limit: int = DEFAULT_LIMIT, demangled: bool = False) -> list[Target]:
    """The functions the patterns select, exclusions applied, sorted by (library, function).
    pids: the traced processes (their mapped files are looked at first); exe: the traced
    command's program (a path or a name on PATH). KeytraceError, one line, when a pattern
    names nothing or the selection exceeds limit. demangled (-C): patterns match C++ names as
    written too."""
    parsed = [parse_pattern(p, demangled) for p in patterns]
    if not any(not p.exclude for p in parsed):
        raise UsageError(f"nothing to trace: no pattern selects functions ({USAGE})")
    missing = [pid for pid in pids if not proc.exists(pid)]
    if missing:
        raise KeytraceError(f"no process {missing[0]}")
    scope = _Scope(pids, exe)
    selected: dict = {}   # (ident, address) -> Target
    chosen: dict = {}     # inclusion pattern -> its keys
    libs_of: dict = {}    # ident -> _Library
    for pattern in (p for p in parsed if not p.exclude):
        libs = scope.libraries(pattern.library or DEFAULT_LIBRARY)
        keys = chosen.setdefault(pattern.text, [])
        for lib in libs:
            table = _functions(lib)
            libs_of.setdefault(lib.ident, lib)
            for pos in _matching(table, pattern.function, demangled):
                # (one function asked for from two callers is two rows: FUNC@MAIN and FUNC)
                key = (lib.ident, table.addresses[pos], pattern.caller)
                keys.append(key)
                if key not in selected:
                    # the name shown is the one asked for, or the plainest the glob matched
                    # (strchr, not its alias index)
                    selected[key] = dataclasses.replace(
                        _target(lib, table, pos, _shown(table, pos, pattern.function)),
                        caller=pattern.caller)
        if not keys:
            raise KeytraceError(_no_function(pattern, libs))
    excluded: dict = {}  # (identity, address) -> the exclusion that removed it, whoever calls
    for pattern in (p for p in parsed if p.exclude):
        within = ({lib.ident for lib in scope.libraries(pattern.library)}
                  if pattern.library else None)
        if _GLOB.search(pattern.function):
            # A glob excludes by the name shown: '!_*' must not drop malloc for its alias
            # __libc_malloc. An exact name below excludes its address by any alias.
            match = re.compile(fnmatch.translate(pattern.function)).match
            for key, t in selected.items():
                if (within is None or key[0] in within) and any(
                        match(n) or (demangled and match(demangle(n)))
                        for n in t.function.split("|")):
                    excluded.setdefault(key[:2], pattern.text)
            continue
        for ident, lib in libs_of.items():
            if within is None or ident in within:
                table = _functions(lib)
                for pos in _matching(table, pattern.function, demangled):
                    excluded.setdefault((ident, table.addresses[pos]), pattern.text)
    for text, keys in chosen.items():
        if all(k[:2] in excluded for k in keys):
            by = ", ".join(repr(t) for t in dict.fromkeys(excluded[k[:2]] for k in keys))
            shown = {selected[k].function for k in keys}
            aliases = sorted({parse_pattern(excluded[k[:2]], demangled).function for k in keys}
                             - shown - {text})
            same = (f": {', '.join(aliases)} is another name of the same code as "
                    f"{', '.join(sorted(shown))}" if aliases and not any(map(is_glob, aliases))
                    else "")
            raise UsageError(f"every function matching {text!r} is excluded (by {by}){same}")
    final = _one_per_address([t for k, t in selected.items() if k[:2] not in excluded])
    if len(final) > limit:
        counts = {text: len({k for k in keys if k[:2] not in excluded})
                  for text, keys in chosen.items()}
        worst = max(counts, key=counts.get)
        raise KeytraceError(f"the patterns select {len(final)} functions ({counts[worst]} by "
                            f"{worst!r}), more than the limit of {limit}: narrow them, "
                            "exclude some with '!FUNC', or raise the limit (--max-functions)")
    return sorted(final, key=lambda t: (t.library, t.function, t.name, t.address))
