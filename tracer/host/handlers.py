"""The fork and exit handlers a process has registered with glibc, read from its memory.

glibc keeps neither table where a symbol names it, so where each lives is read from the code
that fills it in (capstone), per file identity, and nothing is assumed that the code does not
show:
- fork handlers (pthread_atfork, __register_atfork): `__register_atfork` grows a dynarray
  {used, allocated, array, scratch...} through `__libc_dynarray_emplace_enlarge(list, scratch,
  element size)`; those arguments give the array's header and its stride, and the stores of
  the function's own arguments into a new element give the offsets of prepare, parent, child
  and dso_handle.
- exit handlers (atexit, on_exit, __cxa_atexit): `__cxa_atexit` passes `&__exit_funcs` to
  `__internal_atexit`. The list is glibc's `struct exit_function_list {next, idx, fns[32]}`
  of `struct exit_function {flavor, fn, arg, dso_handle}` (stdlib/exit.h, unchanged since
  glibc 2.2.5); a block that does not fit it makes the table unreadable, never a count. Its
  function pointers are mangled with the process's pointer guard, which glibc takes from bytes
  8..15 of AT_RANDOM (/proc/PID/auxv); the guard is taken as proved only when it turns a
  handler into an address in an executable mapping (every dynamic program has ld.so's
  _dl_fini there).

A handler is *orphaned* when the library instance that registered it is gone: its code lies in
no mapping (the next fork or exit jumps into unmapped memory), or it is a second copy of one
registration (a library that registers with no DSO handle, unloaded and loaded again at the
same address, leaves its first instance's handler behind; it runs twice, and crashes the first
fork or exit that finds the library unloaded or moved). Thread-exit handlers
(__cxa_thread_atexit_impl) pin their library (glibc will not unmap it) and are not read.
"""
from __future__ import annotations

import bisect
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np
from capstone import CS_ARCH_X86, CS_MODE_64, Cs, CsError
from capstone import x86 as X
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from . import proc
from . import tables
from .elf import MappedCache, defined_symbols, read_at, with_load_base
from .tables import Unreadable

REGISTER, ENLARGE, CXA_ATEXIT = "__register_atfork", "__libc_dynarray_emplace_enlarge", \
    "__cxa_atexit"
_ARGS = {"rdi": "prepare", "rsi": "parent", "rdx": "child", "rcx": "dso"}
_FORK_FIELDS = ("prepare", "parent", "child", "dso")
# struct exit_function_list / exit_function (glibc stdlib/exit.h)
_EXIT_BLOCK, _EXIT_FNS, _EXIT_STRIDE, _EXIT_PER_BLOCK = 16, 16, 32, 32
_EF_FREE, _EF_US, _EF_ON, _EF_AT, _EF_CXA = range(5)
_AT_RANDOM = 25
_MAX_BLOCKS = 4096  # a chain longer than this is not glibc's list (a cycle, a bad guess)
_MAX_FORK = 1 << 20


@dataclass(frozen=True)
class Layout:
    forks: int        # vaddr of the fork handlers' dynarray header {used, allocated, array}
    stride: int       # bytes per fork handler
    fields: dict      # prepare, parent, child, dso -> byte offset in a fork handler
    exits: int        # vaddr of __exit_funcs (a pointer to the first block)
    source: str


@dataclass(frozen=True)
class Handler:
    kind: str                 # "fork" or "exit"
    address: int              # its code (the first non-null of prepare/parent/child for fork)
    ident: tuple              # what one registration is: its functions, argument, DSO handle
    library: Optional[str]    # the file of the executable mapping its code lies in; None:
                              # in none ("": a fork handler with no functions)


def _reg(name: str) -> str:
    """A register by its 64-bit name (edx -> rdx, r12d -> r12): a 32-bit write zero-extends."""
    if len(name) == 3 and name[0] == "e":
        return "r" + name[1:]
    if name[0] == "r" and name[-1] in "dwb" and name[1:-1].isdigit():
        return name[:-1]
    return name


def _code(elf: ELFFile, name: str) -> tuple:
    sym = defined_symbols(elf, [name], kinds=("STT_FUNC",)).get(name)
    if sym is None or not sym["st_size"]:
        raise LookupError(f"no {name}")
    return sym["st_value"], read_at(elf, sym["st_value"], sym["st_size"])


def _disasm(elf: ELFFile, name: str):
    addr, code = _code(elf, name)
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    md.detail = True
    return md.disasm(code, addr)


def _fork_layout(elf: ELFFile) -> tuple:
    """(header vaddr, stride, {field: offset}) from __register_atfork's code."""
    enlarge = defined_symbols(elf, [ENLARGE], kinds=("STT_FUNC",)).get(ENLARGE)
    if enlarge is None:
        raise LookupError(f"no {ENLARGE}")
    values: dict = {}           # register -> a constant it holds (an address, a size)
    holds = dict(_ARGS)         # register -> the argument of __register_atfork it holds
    stores: dict = {}           # argument -> offset it is stored at in an element
    call = None
    for insn in _disasm(elf, REGISTER):
        ops = insn.operands
        if insn.mnemonic == "call" and ops and ops[0].type == X.X86_OP_IMM:
            if ops[0].imm == enlarge["st_value"] and call is None:
                call = (values.get("rdi"), values.get("rsi"), values.get("rdx"))
            for r in ("rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11"):
                values.pop(r, None)
                holds.pop(r, None)
            continue
        if len(ops) != 2 or ops[0].type != X.X86_OP_REG and insn.mnemonic != "mov":
            for op in ops[:1]:
                if op.type == X.X86_OP_REG:
                    values.pop(_reg(insn.reg_name(op.reg)), None)
                    holds.pop(_reg(insn.reg_name(op.reg)), None)
            continue
        dst, src = ops
        if dst.type == X.X86_OP_MEM:
            if insn.mnemonic == "mov" and src.type == X.X86_OP_REG and dst.mem.base not in (
                    X.X86_REG_RIP, X.X86_REG_RSP) and dst.mem.index == 0:
                arg = holds.get(_reg(insn.reg_name(src.reg)))
                if arg is not None:
                    stores.setdefault(arg, dst.mem.disp)
            continue
        d = _reg(insn.reg_name(dst.reg))
        value, held = None, None
        if insn.mnemonic == "mov" and src.type == X.X86_OP_REG:
            s = _reg(insn.reg_name(src.reg))
            value, held = values.get(s), holds.get(s)
        elif insn.mnemonic == "mov" and src.type == X.X86_OP_IMM:
            value = src.imm
        elif insn.mnemonic == "lea" and src.mem.index == 0:
            if src.mem.base == X.X86_REG_RIP:
                value = insn.address + insn.size + src.mem.disp
            elif src.mem.base:
                base = values.get(_reg(insn.reg_name(src.mem.base)))
                value = None if base is None else base + src.mem.disp
        values.pop(d, None)
        holds.pop(d, None)
        if value is not None:
            values[d] = value
        if held is not None:
            holds[d] = held
    if call is None or None in call:
        raise LookupError(f"{REGISTER} does not call {ENLARGE} with constant arguments")
    header, scratch, stride = call
    fields = {f: stores.get(f) for f in _FORK_FIELDS}
    if scratch != header + 24 or not 8 * len(fields) <= stride <= 256 or \
            None in fields.values() or len(set(fields.values())) != len(fields) or \
            any(not 0 <= off <= stride - 8 for off in fields.values()):
        raise LookupError(f"{REGISTER}'s table is not the dynarray it should be")
    return header, stride, fields


def _exit_list(elf: ELFFile) -> int:
    """&__exit_funcs: what __cxa_atexit passes on (rcx) before its first jump or call."""
    values: dict = {}
    for insn in _disasm(elf, CXA_ATEXIT):
        if insn.mnemonic in ("jmp", "call"):
            break
        ops = insn.operands
        if insn.mnemonic == "lea" and len(ops) == 2 and ops[1].mem.base == X.X86_REG_RIP:
            values[_reg(insn.reg_name(ops[0].reg))] = insn.address + insn.size + ops[1].mem.disp
    if "rcx" not in values:
        raise LookupError(f"{CXA_ATEXIT} passes no list address")
    return values["rcx"]


def _parse(path: str):
    """Layout, or why there is none (a str)."""
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            forks, stride, fields = _fork_layout(elf)
            exits = _exit_list(elf)
    except (LookupError, CsError, ELFError, ValueError, struct.error) as e:
        return f"handler tables not found: {e}"
    return Layout(forks, stride, fields, exits, path)


_FILES = MappedCache(with_load_base(_parse))


def _rol(v: int, n: int) -> int:
    return ((v << n) | (v >> (64 - n))) & 0xFFFFFFFFFFFFFFFF


def _guard(pid: int, mem) -> int:
    """The pointer guard: bytes 8..15 of the 16 random bytes AT_RANDOM points at."""
    with open(f"/proc/{pid}/auxv", "rb") as fh:
        auxv = np.frombuffer(fh.read(), dtype="<u8").reshape(-1, 2)
    at = auxv[auxv[:, 0] == _AT_RANDOM]
    if not len(at):
        raise Unreadable("not read: no AT_RANDOM in the auxiliary vector")
    return struct.unpack("<Q", _read(mem, int(at[0, 1]) + 8, 8))[0]


def _read(mem, addr: int, size: int) -> bytes:
    return tables.read_exactly(mem, addr, size, "a handler table")


def _forks(mem, bias: int, lay: Layout) -> list:
    used, allocated, array = struct.unpack("<3Q", _read(mem, bias + lay.forks, 24))
    if used == 0:
        return []
    if not used <= allocated <= _MAX_FORK or not array:
        raise Unreadable("not read: the fork handler table does not hold together")
    data = _read(mem, array, used * lay.stride)
    out = []
    for i in range(used):
        f = {name: struct.unpack_from("<Q", data, i * lay.stride + off)[0]
             for name, off in lay.fields.items()}
        code = next((f[k] for k in ("prepare", "parent", "child") if f[k]), 0)
        out.append(("fork", code, (f["prepare"], f["parent"], f["child"], f["dso"])))
    return out


def _exits(mem, bias: int, lay: Layout) -> list:
    """(kind, mangled fn, ident) of each exit handler in use."""
    (block,) = struct.unpack("<Q", _read(mem, bias + lay.exits, 8))
    out, seen = [], set()
    while block:
        if block in seen or len(seen) >= _MAX_BLOCKS:
            raise Unreadable("not read: the exit handler list does not end")
        seen.add(block)
        nxt, idx = struct.unpack("<2Q", _read(mem, block, _EXIT_BLOCK))
        if idx > _EXIT_PER_BLOCK:
            raise Unreadable("not read: the exit handler list does not hold together")
        fns = _read(mem, block + _EXIT_FNS, idx * _EXIT_STRIDE)
        for i in range(idx):
            flavor, fn, arg, dso = struct.unpack_from("<4Q", fns, i * _EXIT_STRIDE)
            if flavor > _EF_CXA:
                raise Unreadable("not read: the exit handler list does not hold together")
            if flavor in (_EF_ON, _EF_AT, _EF_CXA):
                out.append(("exit", fn, (flavor, fn, arg if flavor != _EF_AT else 0,
                                         dso if flavor == _EF_CXA else 0)))
        block = nxt
    return out


def _where(addr: int, code: list) -> Optional[str]:
    """The file of the executable mapping holding addr; None: none does (the code is gone,
    whatever data may be mapped there since)."""
    i = bisect.bisect_right(code, (addr, float("inf"))) - 1
    if i >= 0 and addr < code[i][1]:
        return code[i][2] or "[anon]"
    return None


def _code_mappings(entries: list) -> list:
    """The executable mappings [(start, end, path)] of /proc/PID/maps (tables.maps), in address
    order."""
    out = []
    for f in entries:
        if f[1][2] == "x":
            start, end = f[0].split("-", 1)
            out.append((int(start, 16), int(end, 16), f[5] if len(f) == 6 else ""))
    return out


def read(pid: int, maps: Optional[list] = None, cache: Optional[dict] = None) -> list:
    """Every fork and exit handler of pid, in registration order (fork, then exit); maps: its
    /proc/PID/maps as tracer.host.tables.maps gives it, if read already (cache: what other
    tables' reads of the process share). Raises Unreadable with why (exited, permission
    denied, musl, a layout not proved)."""
    try:
        if maps is None:
            maps = tables.maps(pid)
        if not maps:  # (no mappings: a kernel thread, or a zombie)
            raise Unreadable("not read: kernel thread" if proc.stat(pid).kernel_thread else
                             "not read: exited")
        mine = tables.glibc_files(pid, maps, cache).get("libc")
        if mine is None:
            raise Unreadable("not read: unsupported: no shared glibc mapped (a static program)")
        facts = _FILES.get(mine[2], mine[3])
        if facts is None:
            raise Unreadable("not read: exited")
        lo, lay = facts
        if isinstance(lay, str):
            raise Unreadable(f"not read: unsupported: {lay}")
        bias, maps = mine[1] - lo, _code_mappings(maps)
        with tables.memory(pid, cache) as mem:
            forks = _forks(mem, bias, lay)
            exits = _exits(mem, bias, lay)
            guard = _guard(pid, mem) if exits else 0
    except OSError as e:
        raise tables.why(pid, e) from None
    out = [Handler(kind, code, ident, _where(code, maps) if code else "") for kind, code, ident
           in forks]
    exit_handlers = []
    for kind, fn, ident in exits:
        code = _rol(fn, 64 - 0x11) ^ guard  # PTR_DEMANGLE: ror 0x11, xor the guard
        exit_handlers.append(Handler(kind, code, (*ident[:1], code, *ident[2:]),
                                     _where(code, maps)))
    if exit_handlers and all(h.library is None for h in exit_handlers):
        raise Unreadable("not read: the pointer guard was not proved (no exit handler "
                         "demangles into a mapping)")
    return out + exit_handlers


def orphaned(handlers: list) -> list:
    """Per handler: is it left by a library instance that is gone (its code in no mapping, or
    a second copy of one registration)?"""
    seen: Counter = Counter()
    out = []
    for h in handlers:
        seen[(h.kind, h.ident)] += 1
        out.append(h.library is None or seen[(h.kind, h.ident)] > 1)
    return out
