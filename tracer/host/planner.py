"""Where to put the probes of pthread_key_create / pthread_key_delete so that they cost little,
proved from the function's own machine code.

A uprobe on a function's first instruction makes the x86 kernel single-step that instruction out
of line (~14 us a hit). Some instructions it emulates instead (arch/x86/kernel/uprobes.c: relative
jmp/jcc/call, `push reg`, nops), ~0.4 us. Both functions claim or release a key slot with one
`lock cmpxchg` followed by a jcc: a probe on that jcc, with a predicate on the flags, sees exactly
the calls that succeeded. Each failing return (a block that puts a non-zero constant in eax on its
way to `ret`) gets a probe of its own at its first instruction: a rare path, single-stepped.

Nothing here trusts a shape by name: the function is disassembled (capstone), cut into basic
blocks, and a plan is only returned when the control-flow graph proves that every call reports
exactly one event and every value the probes read (key, destructor, caller, errno) is where the
plan says at the site. Anything else raises Refused, and keytrace falls back to entry probes.
"""
from __future__ import annotations

import os
import re
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Optional

from capstone import CS_ARCH_X86, CS_MODE_64, Cs, CsError
from capstone import x86 as X
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from . import branches, isa
from .elf import build_id, defined_symbols, got_slot, load_segments

FUNCTIONS = ("pthread_key_create", "pthread_key_delete")

# Index = the x86 condition code (the low nibble of jcc/setcc/cmovcc opcodes). The expressions
# are C over 0/1 flags, shared with the BPF programs. They are written so that they mean the same
# in Python once `!x` reads `(not x)`: every ==/!= stands alone or in parentheses (C ranks them
# above & and |, Python below).
CONDITIONS: list = [
    ("o", "OF"), ("no", "!OF"), ("b", "CF"), ("ae", "!CF"),
    ("e", "ZF"), ("ne", "!ZF"), ("be", "CF | ZF"), ("a", "!(CF | ZF)"),
    ("s", "SF"), ("ns", "!SF"), ("p", "PF"), ("np", "!PF"),
    ("l", "SF != OF"), ("ge", "SF == OF"), ("le", "ZF | (SF != OF)"), ("g", "!ZF & (SF == OF)"),
]
FLAG_BITS = {"CF": 0, "PF": 2, "ZF": 6, "SF": 7, "OF": 11}   # in EFLAGS
_PYTHON = [compile(re.sub(r"!(\w+|\([^()]*\))", r"(not \1)", expr), f"<j{name}>", "eval")
           for name, expr in CONDITIONS]


def condition_holds(cc: int, flags: int) -> bool:
    """Whether condition code cc holds for an EFLAGS value: CONDITIONS[cc] evaluated in Python."""
    env = {name: (flags >> bit) & 1 for name, bit in FLAG_BITS.items()}
    return bool(eval(_PYTHON[cc], {"__builtins__": {}}, env))


@dataclass(frozen=True)
class Value:
    """How a probe reads a value at its site, from pt_regs. Keys are the low 32 bits."""
    kind: str           # "reg": (regs.<reg> >> shift); "stack": u64 at rsp + offset; "const": value
    reg: str = ""       # pt_regs field: ax bx cx dx si di bp sp r8..r15
    shift: int = 0
    offset: int = 0
    value: int = 0


@dataclass(frozen=True)
class Site:
    address: int        # ELF virtual address (the symbol's space) of the probed instruction
    size: int
    insn: bytes         # its bytes, checked against the file at attach
    emulated: bool      # the kernel emulates it instead of single-stepping it
    event: str          # create, create_failed, delete, delete_failed
    cc: int             # condition code of the jcc at the site, -1: unconditional
    taken: bool         # with cc >= 0: the event is the taken edge (True) or the fall-through
    values: dict = field(hash=False)   # name -> Value


@dataclass(frozen=True)
class Plan:
    path: str
    function: str
    address: int
    size: int
    build_id: str
    sites: tuple
    # the GOT slot of ld.so's _rtld_global, whose first word is the head of the link_map chain:
    # a create site walks it once per image, so short-lived processes' modules are known (0: none)
    rtld_slot: int = 0


class Refused(Exception):
    """No plan can be proved; str() says why."""


# ---- reading the function --------------------------------------------------------------------

def _read(path: str, function: str) -> tuple:
    """(address, code bytes, build id) of a function in an ELF file."""
    try:
        with open(path, "rb") as fh:
            elf = ELFFile(fh)
            sym = defined_symbols(elf, [function], kinds=("STT_FUNC",)).get(function)
    except (OSError, ELFError, ValueError) as e:
        raise Refused(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if sym is None:
        raise Refused(f"{path} does not define {function}")
    address = sym["st_value"]
    return address, _code(path, address, sym["st_size"]), build_id(path)


# ---- the control-flow graph ------------------------------------------------------------------

_TRAPS = {X.X86_INS_UD2, X.X86_INS_HLT, X.X86_INS_INT3}
# A system call may not return (execve, exit) or return twice (fork, clone, vfork): no site
# after one is reached once per call.
_SYSCALLS = {X.X86_INS_SYSCALL, X.X86_INS_SYSENTER, X.X86_INS_INT}
# A call may change every register the System V ABI does not make the callee keep.
_CALL_CLOBBERS = {"ax", "cx", "dx", "si", "di", "r8", "r9", "r10", "r11"}


def _family(name: str) -> Optional[str]:
    """The pt_regs field holding a capstone register (rax/eax/ax/al -> ax, r9d -> r9), or None."""
    m = re.fullmatch(r"[re]?([abcd])[xlh]|[re]?(si|di|bp|sp)l?|(r\d+)[dwb]?", name)
    if not m:
        return None
    return (m.group(1) + "x") if m.group(1) else (m.group(2) or m.group(3))


def _writes(insn) -> set:
    out = {_family(insn.reg_name(r)) for r in insn.regs_access()[1]}
    if insn.group(X.X86_GRP_CALL):
        out |= _CALL_CLOBBERS
    return out - {None}


def _cc(insn) -> int:
    """The condition code of a jcc, from its encoding (70+cc rel8, 0f 80+cc rel32), else -1."""
    op = insn.opcode
    if 0x70 <= op[0] <= 0x7F:
        return op[0] - 0x70
    if op[0] == 0x0F and 0x80 <= op[1] <= 0x8F:
        return op[1] - 0x80
    return -1


def _emulated(insn) -> bool:
    """Whether arch/x86/kernel/uprobes.c emulates the instruction rather than single-step it
    (a legacy one: it also "emulates" VEX/EVEX instructions, wrongly; see tracer.host.isa)."""
    v = isa.view(bytes(insn.bytes))
    return v.action == "emulated" and v.encoding == "legacy"


def _probeable(insn) -> bool:
    """Whether the kernel accepts a uprobe on the instruction at all."""
    return isa.view(bytes(insn.bytes)).action != "refused"


@dataclass
class _Block:
    start: int
    insns: list = field(default_factory=list)
    # (target block start, or None: leaves the function; label: True/False for a jcc's
    # taken/fall-through edge, None for any other edge)
    succs: list = field(default_factory=list)


class _Function:
    def __init__(self, name: str, address: int, code: bytes):
        self.name, self.address, self.end = name, address, address + len(code)
        md = Cs(CS_ARCH_X86, CS_MODE_64)
        md.detail = True
        self.insns = list(md.disasm(code, address))
        done = sum(i.size for i in self.insns)
        if done != len(code):
            raise Refused(f"the bytes at {self.at(address + done)} do not decode")
        self.by_addr = {i.address: i for i in self.insns}
        self._cut()
        self.reachable = self.reach_from(self.address)
        if not any(t is None for b in self.reachable for t, _ in self.blocks[b].succs):
            raise Refused(f"{name} never returns (no ret or tail call)")

    def at(self, addr: int) -> str:
        return f"{self.name}+{addr - self.address:#x}"

    def text(self, insn) -> str:
        return f"`{insn.mnemonic} {insn.op_str}`".replace(" `", "`")

    def inside(self, addr: int) -> bool:
        return self.address <= addr < self.end

    def kind(self, insn) -> tuple:
        """(kind, target): ret, jmp, jcc, call, trap or plain; target of a direct branch."""
        if insn.group(X.X86_GRP_RET):
            return "ret", None
        if insn.id in _TRAPS:
            return "trap", None
        jump, call = insn.group(X.X86_GRP_JUMP), insn.group(X.X86_GRP_CALL)
        if not (jump or call):
            return "plain", None
        op = insn.operands[0] if insn.operands else None
        if op is None or op.type != X.X86_OP_IMM:
            what = "call" if call else "jump"
            raise Refused(f"indirect {what} {self.text(insn)} at {self.at(insn.address)}: "
                          "its targets cannot be known")
        target = op.imm
        if jump and self.inside(target) and target not in self.by_addr:
            raise Refused(f"{self.at(insn.address)} jumps into the middle of an instruction")
        if call:
            return "call", target
        return ("jmp" if insn.id == X.X86_INS_JMP else "jcc"), target

    def _cut(self) -> None:
        """Basic blocks: leaders are the entry, jump targets inside, and whatever follows a
        branch, ret or trap. A call falls through."""
        leaders = {self.address}
        for i in self.insns:
            kind, target = self.kind(i)
            if kind in ("jmp", "jcc") and self.inside(target):
                leaders.add(target)
            if kind in ("jmp", "jcc", "ret", "trap"):
                leaders.add(i.address + i.size)
        self.blocks: dict = {}
        self.block_of: dict = {}
        for i in self.insns:
            if i.address in leaders:
                block = self.blocks[i.address] = _Block(i.address)
            block.insns.append(i)
            self.block_of[i.address] = block.start
        for b in self.blocks.values():
            last = b.insns[-1]
            kind, target = self.kind(last)
            nxt = last.address + last.size
            if kind == "ret":
                b.succs = [(None, None)]
            elif kind == "jmp":   # a jmp out of the function is a tail call: an exit
                b.succs = [(target if self.inside(target) else None, None)]
            elif kind == "jcc":
                b.succs = [(target if self.inside(target) else None, True), (nxt, False)]
            elif kind != "trap":
                b.succs = [(nxt, None)]
            if any(t is not None and not self.inside(t) for t, _ in b.succs):
                if kind != "call":
                    raise Refused(f"{self.name} runs past its end after {self.at(last.address)}")
                b.succs = []      # a call that never returns (__stack_chk_fail, abort)

    def reach_from(self, start: int, first_step: bool = False) -> set:
        """Blocks reachable from start (through at least one edge with first_step)."""
        todo = [t for t, _ in self.blocks[start].succs if t is not None] if first_step else [start]
        seen: set = set()
        while todo:
            b = todo.pop()
            if b not in seen:
                seen.add(b)
                todo += [t for t, _ in self.blocks[b].succs if t is not None]
        return seen

    def flow(self, init, step, meet) -> dict:
        """Forward dataflow to a fixed point: the value at each reachable block's entry, from
        init at the function's entry; step(insn, value, block start) -> value."""
        at = {self.address: init}
        todo = [self.address]
        while todo:
            b = self.blocks[todo.pop()]
            v = at[b.start]
            for insn in b.insns:
                v = step(insn, v, b.start)
            for t, _ in b.succs:
                if t is not None:
                    new = v if t not in at else meet(at[t], v, t)
                    if t not in at or new != at[t]:
                        at[t] = new
                        todo.append(t)
        return at

    def before(self, at: dict, step, addr: int):
        """A flow's value just before the instruction at addr."""
        b = self.block_of[addr]
        v = at[b]
        for insn in self.blocks[b].insns:
            if insn.address == addr:
                return v
            v = step(insn, v, b)
        raise AssertionError(addr)


# ---- dataflow values -------------------------------------------------------------------------

@dataclass(frozen=True)
class _Unknown:
    why: str


def _meet_same(fn: _Function):
    """Flat meet: a value known only when it is the same on every path."""
    def meet(old, new, block):
        if isinstance(old, _Unknown):
            return old
        if isinstance(new, _Unknown):
            return new
        return old if old == new else _Unknown(f"it differs between paths into {fn.at(block)} "
                                               f"({old} and {new})")
    return meet


def _untouched(fn: _Function, reg: str):
    """Step: True while no instruction has written the register."""
    def step(insn, v, _b):
        if v is True and reg in _writes(insn):
            return _Unknown(f"{fn.text(insn)} at {fn.at(insn.address)} changes r{reg}")
        return v
    return step


def _stack_step(fn: _Function):
    """Step: bytes between rsp and the return address (push/pop, add/sub rsp with a constant)."""
    def step(insn, depth, _b):
        if isinstance(depth, _Unknown):
            return depth
        ops = insn.operands
        if insn.id in (X.X86_INS_PUSH, X.X86_INS_PUSHFQ):
            return depth + 8
        if insn.id in (X.X86_INS_POP, X.X86_INS_POPFQ) and "sp" not in {
                _family(insn.reg_name(o.reg)) for o in ops if o.type == X.X86_OP_REG}:
            return depth - 8
        if (insn.id in (X.X86_INS_SUB, X.X86_INS_ADD) and ops[0].type == X.X86_OP_REG
                and ops[0].reg == X.X86_REG_RSP and ops[1].type == X.X86_OP_IMM):
            return depth + (ops[1].imm if insn.id == X.X86_INS_SUB else -ops[1].imm)
        if insn.group(X.X86_GRP_CALL) or insn.group(X.X86_GRP_RET):
            return depth      # the callee returns to the same depth; after ret nothing is read
        if "sp" in _writes(insn):
            return _Unknown(f"{fn.text(insn)} at {fn.at(insn.address)} moves rsp by an "
                            "unknown amount")
        return depth
    return step


def _shift_step(fn: _Function):
    """Step for delete's key: rdi = key << shift, through `mov %edi,%edi` (the zero-extension of
    the argument, only before any shift) and shl/shr of rdi by constants, kept within 32 bits so
    that the low 32 bits of (rdi >> shift) are the key."""
    def step(insn, shift, _b):
        if isinstance(shift, _Unknown) or "di" not in _writes(insn):
            return shift
        ops = insn.operands
        reg = [insn.reg_name(o.reg) if o.type == X.X86_OP_REG else None for o in ops]
        imm = ops[1].imm if len(ops) == 2 and ops[1].type == X.X86_OP_IMM else None
        if insn.id == X.X86_INS_MOV and reg == ["edi", "edi"] and shift == 0:
            return 0
        if insn.id in (X.X86_INS_SHL, X.X86_INS_SAL) and reg[0] == "rdi" and imm is not None \
                and shift + imm <= 32:
            return shift + imm
        if insn.id == X.X86_INS_SHR and reg[0] == "rdi" and imm is not None and imm <= shift:
            return shift - imm
        return _Unknown(f"{fn.text(insn)} at {fn.at(insn.address)} changes rdi")
    return step


def _errno_step(insn, consts, block):
    """Step: the (constant, block) pairs eax may hold: `mov $imm,%eax` (imm != 0) in a block."""
    if "ax" not in _writes(insn):
        return consts
    ops = insn.operands
    if (insn.id == X.X86_INS_MOV and ops[0].type == X.X86_OP_REG
            and insn.reg_name(ops[0].reg) in ("eax", "rax") and ops[1].type == X.X86_OP_IMM
            and ops[1].imm != 0):
        return frozenset({(ops[1].imm, block)})
    return frozenset()


def _union(old, new, _block):
    return old | new


# ---- the plan --------------------------------------------------------------------------------

def _analyse(fn: _Function, kind: str) -> list:
    """The sites of one function (kind: create or delete), proved; raises Refused."""
    reach = fn.reachable
    locked = [i for b in sorted(reach) for i in fn.blocks[b].insns
              if i.id == X.X86_INS_CMPXCHG and X.X86_PREFIX_LOCK in i.prefix]
    if len(locked) != 1:
        raise Refused(f"{fn.name} has {len(locked)} lock cmpxchg instructions, not exactly one: "
                      "no single success site")
    cx = locked[0]
    jcc = fn.by_addr.get(cx.address + cx.size)
    if jcc is None or fn.kind(jcc)[0] != "jcc":
        raise Refused(f"no jcc right after the lock cmpxchg at {fn.at(cx.address)}")
    if fn.block_of[jcc.address] != fn.block_of[cx.address]:
        raise Refused(f"the jcc at {fn.at(jcc.address)} is also reached by a jump: its flags do "
                      "not always come from the lock cmpxchg")
    cc = _cc(jcc)
    if cc not in (4, 5):
        raise Refused(f"{fn.text(jcc)} after the lock cmpxchg does not test ZF alone")
    taken = cc == 4               # the slot changed hands on ZF=1: je taken, jne falls through
    home = fn.block_of[jcc.address]
    success_to = dict((label, t) for t, label in fn.blocks[home].succs)[taken]
    after_success = fn.reach_from(success_to) if success_to is not None else set()

    # Failing returns: a non-zero constant put in eax that reaches a ret; the probe goes on the
    # first instruction of the block that sets it (one site for all its predecessors).
    consts = fn.flow(frozenset(), _errno_step, _union)
    failing: dict = {}
    for b in reach:
        last = fn.blocks[b].insns[-1]
        if fn.kind(last)[0] == "ret":
            for errno, where in fn.before(consts, _errno_step, last.address):
                if where not in after_success:     # after a success, a constant is no failure
                    failing.setdefault(where, errno)

    for b in sorted(failing):
        _returns_errno(fn, b, f"{kind}_failed")
    _prove_once(fn, {(home, taken)}, set(failing))

    stack = _stack_step(fn)
    depths = fn.flow(0, stack, _meet_same(fn))

    def caller(addr):
        d = fn.before(depths, stack, addr)
        if isinstance(d, _Unknown):
            raise Refused(f"the return address at {fn.at(addr)} is not at a known stack "
                          f"offset: {d.why}")
        return Value("stack", offset=d)

    def site(insn, event, cc, taken, values) -> Site:
        if not _probeable(insn):
            raise Refused(f"the kernel cannot probe {fn.text(insn)} at {fn.at(insn.address)}")
        return Site(insn.address, insn.size, bytes(insn.bytes), _emulated(insn), event, cc,
                    taken, {**values, "caller": caller(insn.address)})

    if kind == "create":
        values = _create_values(fn, jcc, success_to)
    else:
        shift = _shift_step(fn)
        shifts = fn.flow(0, shift, _meet_same(fn))
        k = fn.before(shifts, shift, jcc.address)
        if isinstance(k, _Unknown):
            raise Refused(f"the key of {fn.name} is not known at {fn.at(jcc.address)}: {k.why}")
        values = {"key": Value("reg", reg="di", shift=k)}
    # The slot's new sequence number, the cmpxchg's source (it is not written by the
    # cmpxchg): a generation per key, so a create and a delete of one key number that reach
    # the ring out of order (two threads) are still paired right.
    src = cx.operands[1]
    if src.type != X.X86_OP_REG:
        raise Refused(f"the lock cmpxchg at {fn.at(cx.address)} has no register source")
    values["seq"] = Value("reg", reg=_family(cx.reg_name(src.reg)))
    sites = [site(jcc, kind, cc, taken, values)]
    for b, errno in sorted(failing.items()):
        values = {"errno": Value("const", value=errno)}
        if kind == "delete":      # the key, where every path agrees on it
            k = fn.before(shifts, shift, b)
            if not isinstance(k, _Unknown):
                values["key"] = Value("reg", reg="di", shift=k)
        sites.append(site(fn.by_addr[b], f"{kind}_failed", -1, False, values))
    return sites


def _no_other_entry(path: str, fn: _Function, sites: tuple) -> None:
    """The proof covers the ways in from the function's top: no jump or call from elsewhere in
    the file, and no other symbol, may land where a site can be reached from."""
    found = branches.entering(path, fn.address, fn.end - 1, inside=(fn.address, fn.end))
    if found is None:
        raise Refused(f"{fn.name}: the rest of {path} could not be decoded: no proof that "
                      "nothing else enters it")
    for target, source in found:
        b = fn.block_of.get(target)
        if b is None or any(fn.block_of[s.address] in fn.reach_from(b) for s in sites):
            raise Refused(f"{fn.name}: " + branches.describe((target, source), fn.name,
                                                             fn.address)
                          + ": counts would include calls that did not enter at its top")


def _returns_errno(fn: _Function, b: int, event: str) -> None:
    """A failure site's block must mean that failure: entered once per call at most (an
    unconditional site in a loop could fire twice), and every way on from its `mov $imm,%eax`
    returns with eax unchanged (no tail call, no other write of eax, calls included)."""
    later = fn.reach_from(b, first_step=True)
    if b in later:
        raise Refused(f"the {event} site at {fn.at(b)} is inside a loop and has no condition: "
                      "one call could report it twice")
    insns = fn.blocks[b].insns
    last_mov = max(n for n, i in enumerate(insns) if "ax" in _writes(i))
    for insn in insns[last_mov + 1:] + [i for c in later for i in fn.blocks[c].insns]:
        kind, target = fn.kind(insn)
        if "ax" in _writes(insn) or (kind in ("jmp", "jcc") and not fn.inside(target)):
            raise Refused(f"the failure code set at {fn.at(insns[last_mov].address)} may not be "
                          f"what the call returns: {fn.text(insn)} at {fn.at(insn.address)}")


def _prove_once(fn: _Function, counted_edges: set, counted_blocks: set) -> None:
    """Every way through the function reports exactly one event. States are (block, events so
    far, saturated at 2); a site counts its jcc edge (block, label) or the entry to its block.
    Breadth-first from the entry, so a refusal names a shortest offending path."""
    def enter(b, n):
        return b, min(2, n + (b in counted_blocks))

    start = enter(fn.address, 0)
    parent = {start: None}
    todo = deque([start])
    while todo:
        state = todo.popleft()
        b, n = state
        for t, label in fn.blocks[b].succs:
            m = n + ((b, label) in counted_edges)
            if t is not None:
                nxt = enter(t, m)
                if nxt not in parent:
                    parent[nxt] = state
                    todo.append(nxt)
            elif m != 1:
                path, s = [], state
                while s is not None:
                    path.append(fn.at(s[0]))
                    s = parent[s]
                last = fn.blocks[b].insns[-1]
                exit_ = f"{last.mnemonic} at {fn.at(last.address)}"
                what = "no event" if m == 0 else "two events"
                raise Refused(f"a call of {fn.name} can return with {what}: "
                              + " -> ".join(path[::-1] + [exit_]))


def _create_values(fn: _Function, jcc, success_to: Optional[int]) -> dict:
    """create's key and destructor at the site. The key is the register that the success path
    stores through rdi (the pthread_key_t *), unchanged since the site; the destructor is rsi,
    unchanged since the entry."""
    meet = _meet_same(fn)
    for reg, name in (("si", "destructor"), ("di", "key pointer")):
        step = _untouched(fn, reg)
        v = fn.before(fn.flow(True, step, meet), step, jcc.address)
        if isinstance(v, _Unknown):
            raise Refused(f"the {name} (r{reg}) is lost before the site at "
                          f"{fn.at(jcc.address)}: {v.why}")
    # Walk the success path, straight-line, to the store of the key through rdi.
    written: set = set()
    addr, seen = success_to, set()
    while addr is not None and fn.inside(addr) and addr not in seen:
        seen.add(addr)
        insn = fn.by_addr[addr]
        ops = insn.operands
        if (insn.id == X.X86_INS_MOV and ops[0].type == X.X86_OP_MEM and ops[0].size == 4
                and ops[0].mem.base == X.X86_REG_RDI and ops[0].mem.index == 0
                and ops[0].mem.disp == 0 and ops[0].mem.segment == 0
                and ops[1].type == X.X86_OP_REG):
            key = _family(insn.reg_name(ops[1].reg))
            if key in written or "di" in written:
                raise Refused(f"the key register r{key} or rdi changes between the site at "
                              f"{fn.at(jcc.address)} and the store at {fn.at(addr)}")
            return {"key": Value("reg", reg=key), "destructor": Value("reg", reg="si")}
        kind, target = fn.kind(insn)
        if kind not in ("plain", "call", "jmp"):
            break
        written |= _writes(insn)
        addr = target if kind == "jmp" else insn.address + insn.size
    raise Refused(f"no store of the key through rdi on the straight path after the site at "
                  f"{fn.at(jcc.address)}")


# ---- entry points ----------------------------------------------------------------------------

_CACHE: dict = {}   # ((dev, inode, mtime) or build id, function, kind) -> Plan or reason


def plan_function(path: str, function: str, kind: Optional[str] = None) -> Plan:
    """The proved probe sites of one function; kind ("create"/"delete") defaults from a name
    holding one of the two words. Raises Refused."""
    kind = kind or next((k for k in ("create", "delete") if k in function), None)
    if kind not in ("create", "delete"):
        raise Refused(f"{function} is neither a create nor a delete function")
    try:
        st = os.stat(path)
    except OSError as e:
        raise Refused(f"cannot read {path}: {e.strerror}") from None
    ident = ((st.st_dev, st.st_ino, st.st_mtime_ns), function, kind)
    if ident not in _CACHE:
        _CACHE[ident] = _plan_or_reason(path, function, kind)
    got = _CACHE[ident]
    if isinstance(got, str):
        raise Refused(got)
    return got if got.path == path else replace(got, path=path)


def _plan_or_reason(path: str, function: str, kind: str):
    """A Plan, or the reason there is none; shared by every file of the same build id."""
    bid = ""
    try:
        address, code, bid = _read(path, function)
        by_build = (bid, function, kind)
        if bid and by_build in _CACHE:
            return _CACHE[by_build]
        fn = _Function(function, address, code)
        sites = tuple(_analyse(fn, kind))
        _no_other_entry(path, fn, sites)
        result = Plan(path, function, address, len(code), bid, sites,
                      got_slot(path, "_rtld_global") if kind == "create" else 0)
    except Refused as e:
        return str(e)
    except CsError as e:          # capstone cannot give an instruction's details
        return f"{function}: capstone: {e}"
    if bid:
        _CACHE[by_build] = result
    return result


def plan_entry(path: str, address: int, size: int, name: str = "", unsafe=None) -> Site:
    """A site that counts every call of any function exactly once, emulated: the first
    instruction of the entry block the kernel emulates (typically the `push` after `endbr64`),
    where nothing in the whole file lands between the entry and the site (a loop back into the
    prologue would count one call twice; mempcpy jumping into memmove's body would count
    mempcpy's calls as memmove's). The arguments may have moved by then: a site for counting,
    not for reading them. unsafe(bytes) says why an instruction may not be probed (None: it
    may). Raises Refused."""
    return _entry_cached(path, name or f"{address:#x}", address, ("entry", size, unsafe), unsafe)


def argument_site(path: str, address: int, name: str, unsafe, args: tuple) -> Site:
    """A site that sees every call once with the given arguments (register numbers, 0-5) as
    passed, emulated: plan_entry's site, when no instruction before it writes one of them. For
    a probe that reads those arguments and nothing else (not the stack, which a push moves):
    a release's handle. Raises Refused."""
    keep = frozenset(_ARGS[n] for n in args)
    return _entry_cached(path, name or f"{address:#x}", address, ("argument", unsafe, keep), unsafe,
                         keep)


def _entry_cached(path: str, name: str, address: int, key: tuple, unsafe, keep=frozenset()) -> Site:
    """_entry_site, once per file version, address and key (a reason it refused, too)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise Refused(f"cannot read {path}: {e.strerror}") from None
    ident = ((st.st_dev, st.st_ino, st.st_mtime_ns), address) + key
    if ident not in _CACHE:
        try:
            _CACHE[ident] = _entry_site(path, name, address, unsafe, keep)
        except Refused as e:
            _CACHE[ident] = str(e)
        except CsError as e:
            _CACHE[ident] = f"{name}: capstone: {e}"
    got = _CACHE[ident]
    if isinstance(got, str):
        raise Refused(got)
    return got


_ARGS = ("di", "si", "dx", "cx", "r8", "r9")  # the System V integer argument registers
_PROLOGUE = 8  # instructions looked at for a site: prologues are short


def _prologue(path: str, address: int) -> list:
    """The first instructions from address, with details (fewer near a segment's end)."""
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    md.detail = True
    return list(md.disasm(_code(path, address, 16 * _PROLOGUE, partial=True), address, _PROLOGUE))


def _ends_block(insn) -> bool:
    return bool(insn.group(X.X86_GRP_JUMP) or insn.group(X.X86_GRP_CALL)
                or insn.group(X.X86_GRP_RET) or insn.id in _TRAPS or insn.id in _SYSCALLS)


def _only_entry(path: str, name: str, address: int, site: int) -> None:
    hits = branches.entering(path, address, site)
    if hits is None:
        raise Refused(f"{name}: {path} could not be decoded: no proof that nothing else enters "
                      f"it before +{site - address:#x}")
    if hits:
        raise Refused(f"{name}: {branches.describe(hits[0], name, address)}, at or before "
                      f"the site at +{site - address:#x}")


def _entry_site(path: str, name: str, address: int, unsafe, keep: frozenset = frozenset()) -> Site:
    site = None
    for insn in _prologue(path, address):
        if _emulated(insn) and _probeable(insn) and not (unsafe and unsafe(bytes(insn.bytes))):
            site = insn
            break
        if _ends_block(insn):
            raise Refused(f"{name}: its entry block ends before an emulated instruction")
        if _writes(insn) & keep:
            raise Refused(f"{name}: `{insn.mnemonic} {insn.op_str}` changes an argument read "
                          "before an emulated instruction")
    if site is None:
        raise Refused(f"{name}: no emulated instruction in its first {_PROLOGUE}")
    _only_entry(path, name, address, site.address)
    return Site(site.address, site.size, bytes(site.bytes), True, "call", -1, False, {})


# Where a function finds its arguments and its return address: an entry probe moved past an
# instruction must find them unchanged.
_ENTRY_STATE = {"di", "si", "dx", "cx", "r8", "r9", "sp"}


def entry_site(path: str, address: int, name: str, unsafe) -> Site:
    """Where an entry probe (and a return probe, which takes the return address at the stack
    pointer) goes: the entry itself when it is safe to probe, else the first later instruction
    that is, reached once per call with the arguments, the stack pointer and memory as they
    were at the entry: the instructions skipped write none of them, none of them branches, and
    nothing in the file lands between the entry and the site. unsafe(bytes) says why an
    instruction may not be probed (None: it may). Raises Refused, saying why."""
    try:
        insns = _prologue(path, address)
    except CsError as e:
        raise Refused(f"{name}: capstone: {e}") from None
    if not insns:
        raise Refused(f"{name}: the bytes at its entry do not decode")
    first = unsafe(bytes(insns[0].bytes))
    if first is None:
        return _site_at(insns[0])
    for insn, nxt in zip(insns, insns[1:]):
        changed = (_writes(insn) & _ENTRY_STATE) or _writes_memory(insn)
        if _ends_block(insn) or changed:
            what = "branches" if _ends_block(insn) else "changes what an entry probe reads"
            raise Refused(f"{name}: its entry `{insn.mnemonic} {insn.op_str}` cannot be probed "
                          f"safely here ({first}), and the next safe instruction comes after "
                          f"one that {what}")
        if unsafe(bytes(nxt.bytes)) is None:
            _only_entry(path, name, address, nxt.address)
            return _site_at(nxt)
    raise Refused(f"{name}: no instruction of its first {len(insns)} can be probed safely "
                  f"here ({first})")


def _site_at(insn) -> Site:
    return Site(insn.address, insn.size, bytes(insn.bytes), isa.view(insn.bytes).action == "emulated",
                "call", -1, False, {})


def keeps_stack(path: str, address: int, site: int) -> bool:
    """Whether no instruction from a function's entry to a site of it moves the stack pointer:
    then the return address is at the top of the stack there, as at the entry."""
    for insn in _prologue(path, address):
        if insn.address >= site:
            return True
        if "sp" in _writes(insn):
            return False
    return False


def _writes_memory(insn) -> bool:
    return any(o.type == X.X86_OP_MEM and o.access & 2 for o in insn.operands)  # CS_AC_WRITE


def _code(path: str, address: int, size: int, partial: bool = False) -> bytes:
    """The bytes of [address, address + size) of an x86-64 ELF file's loaded segments
    (partial: as many as the segment holds from address)."""
    if not size:
        raise Refused(f"the function at {address:#x} has no size in the symbol table")
    try:
        machine, loads = load_segments(path)  # (parsed once per file)
        if machine != "EM_X86_64":
            raise Refused(f"{path} is not x86-64 code")
        for vaddr, filesz, offset in loads:
            end = vaddr + filesz
            if vaddr <= address and (address + size <= end or (partial and address < end)):
                with open(path, "rb") as fh:
                    fh.seek(offset + address - vaddr)
                    return fh.read(min(size, end - address))
    except (OSError, ValueError) as e:
        raise Refused(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    raise Refused(f"{address:#x} lies in no loaded segment of {path}")


def plan_file(path: str) -> dict:
    """{function: Plan} for both FUNCTIONS of a C library file; Refused if either has none."""
    return {f: plan_function(path, f) for f in FUNCTIONS}
