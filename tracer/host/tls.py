"""Static TLS: how much of the block glibc sets aside for initial-exec TLS a process has used,
read from its memory. A module built with DF_STATIC_TLS (initial-exec TLS) that is dlopened
takes its block from what start-up left over (the surplus: 1664 bytes by default, plus
glibc.rtld.optional_static_tls); when none is left, dlopen fails with "cannot allocate memory in
static TLS block". glibc gives a closed module's block back only when it is the last one placed
(elf/dl-close.c: otherwise "one of them will be leaked"), so reloads can use the surplus up.

Nothing here is assumed that glibc does not describe or its code does not show:
- the block's size: `_dl_get_tls_static_info` (ld.so, exported) loads it first (its alignment
  second) from ld.so's read-only globals; where, is read from its code (capstone);
- each module's place: `l_tls_offset` of its link_map, at the offset libc's libthread_db
  descriptor `_thread_db_link_map_l_tls_offset` gives, the chain walked from `_r_debug.r_map`
  (link.h: {l_addr, l_name, l_ld, l_next, l_prev}, the public ABI);
- the thread control block below the thread pointer: `_thread_db_sizeof_pthread`.

On x86-64 a module's block ends l_tls_offset below the thread pointer, and glibc records the
offset of the last block it placed as what is used; the largest offset among the live modules
is therefore what they show to be used. A block leaked above every live one is not seen (glibc
lists no leaked block), so the count is a lower bound, and is reported as an estimate: the
next reload that places a block above it shows it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

from capstone import CS_ARCH_X86, CS_MODE_64, Cs, CsError
from capstone import x86 as X
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from . import proc, tables
from .elf import FileCache, MappedCache, defined_symbols, read_at, with_load_base
from .tables import Unreadable

INFO, R_DEBUG = "_dl_get_tls_static_info", "_r_debug"
OFFSET_DESC, SIZEOF_PTHREAD = "_thread_db_link_map_l_tls_offset", "_thread_db_sizeof_pthread"
_MAX_MODULES = 4096
_NAME_MAX = 4096
# l_tls_offset values that place no block: NO_TLS_OFFSET (0) and FORCED_DYNAMIC_TLS_OFFSET (-1)
_PLACED = range(1, 1 << 62)


@dataclass(frozen=True)
class Loader:
    r_debug: int     # vaddr of _r_debug in ld.so
    size: int        # vaddr of the static TLS block's size in ld.so


@dataclass(frozen=True)
class Libc:
    offset: int      # l_tls_offset's byte offset in struct link_map
    width: int       # its bytes
    tcb: int         # sizeof (struct pthread): the thread control block


@dataclass
class StaticTls:
    size: int                # the whole static TLS block (_dl_tls_static_size)
    limit: int               # what modules may use of it: the size less the TCB
    used: int                # the largest offset of a live module's block (a lower bound)
    modules: dict            # module path -> its block's offset, for the live ones placed


def _loader(path: str):
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            syms = defined_symbols(elf, [INFO, R_DEBUG])
            if INFO not in syms or R_DEBUG not in syms:
                return f"no {INFO} or {R_DEBUG}"
            info = syms[INFO]
            code = read_at(elf, info["st_value"], max(info["st_size"], 16))
    except (ELFError, ValueError, struct.error) as e:
        return f"unreadable: {e}"
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    md.detail = True
    try:
        for insn in md.disasm(code, info["st_value"]):
            ops = insn.operands
            if insn.mnemonic == "mov" and len(ops) == 2 and ops[0].type == X.X86_OP_REG and \
                    ops[1].type == X.X86_OP_MEM and ops[1].mem.base == X.X86_REG_RIP:
                return Loader(syms[R_DEBUG]["st_value"], insn.address + insn.size + ops[1].mem.disp)
            if insn.mnemonic in ("ret", "jmp", "call"):
                break
    except CsError as e:
        return f"undecodable: {e}"
    return f"{INFO} loads no size"


def _libc(path: str):
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            syms = defined_symbols(elf, [OFFSET_DESC, SIZEOF_PTHREAD])
            if len(syms) != 2:
                return f"no {OFFSET_DESC} or {SIZEOF_PTHREAD}"
            bits, _, off = struct.unpack("<3I", read_at(elf, syms[OFFSET_DESC]["st_value"], 12))
            (tcb,) = struct.unpack("<I", read_at(elf, syms[SIZEOF_PTHREAD]["st_value"], 4))
    except (ELFError, ValueError, struct.error) as e:
        return f"unreadable: {e}"
    if bits not in (32, 64) or not tcb:
        return "descriptors out of shape"
    return Libc(off, bits // 8, tcb)


_LOADERS, _LIBCS = MappedCache(with_load_base(_loader)), MappedCache(with_load_base(_libc))


def _block(path: str) -> int:
    """Bytes of a module's TLS block (its PT_TLS segment's memory size); 0: none."""
    try:
        with open(path, "rb") as fh:
            return next((s["p_memsz"] for s in ELFFile(fh).iter_segments()
                         if s["p_type"] == "PT_TLS"), 0)
    except (ELFError, ValueError):
        return 0


_BLOCKS = FileCache(_block)


def block_size(path: str) -> int:
    return _BLOCKS.get(path)[1] or 0


def _read(mem, addr: int, size: int) -> bytes:
    return tables.read_exactly(mem, addr, size, "the static TLS state")


def _name(mem, addr: int) -> str:
    if not addr:
        return ""
    mem.seek(addr)
    raw = mem.read(_NAME_MAX)
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def read(pid: int, maps: Optional[list] = None,
         cache: Optional[dict] = None) -> StaticTls:
    """The static TLS of pid; maps: its /proc/PID/maps as tracer.host.tables.maps gives it, if
    read already (cache: what other tables' reads of the process share). Raises Unreadable
    with why (exited, permission denied, musl, a static
    program, a layout not proved)."""
    try:
        if maps is None:
            maps = tables.maps(pid)
        if not maps:
            raise Unreadable("not read: kernel thread" if proc.stat(pid).kernel_thread else
                             "not read: exited")
        files = tables.glibc_files(pid, maps, cache)
        if "ld" not in files or "libc" not in files:
            raise Unreadable("not read: unsupported: no shared glibc mapped (a static program)")
        got = [c.get(files[k][2], files[k][3]) for c, k in ((_LOADERS, "ld"), (_LIBCS, "libc"))]
        for facts in got:
            if facts is None or isinstance(facts[1], str):
                raise Unreadable(f"not read: unsupported: {facts[1] if facts else 'unreadable'}")
        (ld_lo, loader), (_, desc) = got
        ld_bias = files["ld"][1] - ld_lo
        span = max(32, desc.offset + desc.width)  # a link_map's head and l_tls_offset: one read
        with tables.memory(pid, cache) as mem:
            (size,) = struct.unpack("<Q", _read(mem, ld_bias + loader.size, 8))
            (lm,) = struct.unpack("<Q", _read(mem, ld_bias + loader.r_debug + 8, 8))
            modules, seen = {}, set()
            while lm:
                if lm in seen or len(seen) >= _MAX_MODULES:
                    raise Unreadable("not read: the link_map chain does not end")
                seen.add(lm)
                head = _read(mem, lm, span)
                _, name, _, nxt = struct.unpack_from("<4Q", head)
                off = int.from_bytes(head[desc.offset:desc.offset + desc.width], "little")
                if off in _PLACED:
                    modules[_name(mem, name) or proc.exe(pid) or "(main program)"] = off
                lm = nxt
    except OSError as e:
        raise tables.why(pid, e) from None
    if not desc.tcb < size < 1 << 30:
        raise Unreadable("not read: the static TLS size read is out of shape")
    return StaticTls(size, size - desc.tcb, max(modules.values(), default=0), modules)
