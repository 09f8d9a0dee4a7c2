"""What the x86-64 kernel does with a uprobe on one instruction, decided from its bytes the way
arch/x86/kernel/uprobes.c decides it (arch_uprobe_analyze_insn), and the class the empirical
single-step check (tracer/bpf/stepcheck.py) rules on.

The kernel does one of three things with a probed instruction:
- refuses it (bad prefixes, opcodes missing from its good-instruction tables, 16-bit
  branches): the probe fails to attach, or, for a file no process maps yet, silently never
  fires;
- emulates it: relative jmp/call/jcc, nop, `push reg`; no single-step;
- single-steps a copy of it out of line, with fix-ups (rip-relative operands through a scratch
  register, return addresses of calls).

The kernel looks at the opcode byte only, also after a VEX or EVEX prefix: there it takes
vpbroadcastb (opcode 0x78/0x7a), vmovdqu (0x7f) or vzeroupper (0x77) for a jcc and "emulates"
them by skipping them, which corrupts the probed process (what glibc's AVX-512 memset showed).
So the class of an instruction is its encoding and what the kernel does with it:
"evex/emulated-jcc", "legacy/stepped-rip", ... Which classes are safe is not decided here: the
empirical check runs one instruction of each class under a uprobe in a sacrificial process.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from capstone import CS_ARCH_X86, CS_MODE_64, Cs, CsError
from capstone import x86 as X

# The kernel's good-instruction tables (arch/x86/kernel/uprobes.c, good_insns_64 and
# good_2byte_insns), a row of 16 opcodes per string.
_GOOD_64 = ("1111110011111101" "1111110011111100" "1111111011111110" "1111111011111110"
            "1111111111111111" "1111111111111111" "0001111111110000" "1111111111111111"
            "1101111111111111" "1111111111011111" "1111111111111111" "1111111111111111"
            "1111111111110000" "1111000111111111" "1111000011010000" "1011011111001111")
_GOOD_2BYTE = ("0011100000101111" "1111111111111111" "1111111111111111" "0111001011111111"
               "1111111111111111" "1111111111111111" "1111111111111111" "1111111100111111"
               "1111111111111111" "1111111111111111" "1111111111111101" "1111111111111111"
               "1111111111111111" "1111111111111111" "1111111111111111" "1111111111111111")
GOOD_64 = frozenset(i for i, c in enumerate(_GOOD_64) if c == "1")
GOOD_2BYTE = frozenset(i for i, c in enumerate(_GOOD_2BYTE) if c == "1")

_LEGACY_PREFIXES = {0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3}
_BAD_PREFIXES = {0x26: "es:", 0x2E: "cs:", 0x36: "ss:", 0x3E: "ds:", 0xF0: "lock"}
_COND = set(range(0x70, 0x80))
# String instructions: with a rep prefix the CPU re-executes them, one trap per iteration.
_STRING = {0x6C, 0x6D, 0x6E, 0x6F, 0xA4, 0xA5, 0xA6, 0xA7, 0xAA, 0xAB, 0xAC, 0xAD, 0xAE, 0xAF}
# Entries to the kernel, single-stepped with the trap flag set across them: a class of their own.
_SYSTEM = {b"\x0f\x05", b"\x0f\x34", b"\x0f\x07", b"\x0f\x35"}

_md = Cs(CS_ARCH_X86, CS_MODE_64)
_md.detail = True


@dataclass(frozen=True)
class View:
    """One instruction as the kernel's uprobe code sees it."""
    length: int
    text: str            # `mnemonic operands`
    encoding: str        # legacy, vex, evex or xop
    action: str          # refused, emulated or stepped
    how: str             # emulated: jcc jmp call nop push; stepped: ip rip ret call popf
    why: str = ""        # refused: the kernel's reason
    features: tuple = field(default=())   # stepped: syscall, vector, seg, rep, x87, pushf, ...

    @property
    def klass(self) -> str:
        """The class the single-step check rules on: "legacy/stepped-rip+vector"."""
        if self.action == "refused":
            return "refused"
        name = f"{self.encoding}/{self.action}-{self.how}".replace("stepped-ip", "stepped")
        return name + "".join(f"+{f}" for f in self.features)


def view(code: bytes) -> View:
    """The kernel's view of the instruction at the start of code (at most 15 bytes used)."""
    code = bytes(code[:15])
    try:
        insn = next(_md.disasm(code, 0, 1), None)
    except CsError:
        insn = None
    if insn is None:
        return View(0, f"(bytes {code[:4].hex()})", "legacy", "refused", "",
                    "the bytes do not decode as an instruction")
    text = f"{insn.mnemonic} {insn.op_str}".strip()
    n = 0
    prefixes = []
    while n < len(code) and code[n] in _LEGACY_PREFIXES:
        prefixes.append(code[n])
        n += 1
    rex = code[n] if n < len(code) and 0x40 <= code[n] <= 0x4F else 0
    n += bool(rex)
    lead = code[n] if n < len(code) else 0
    if lead == 0x62:                 # EVEX (bound does not exist in 64-bit mode)
        encoding, opcode, nbytes = "evex", code[n + 4:n + 5], 1
    elif lead == 0xC5:
        encoding, opcode, nbytes = "vex", code[n + 2:n + 3], 1
    elif lead == 0xC4:
        encoding, opcode, nbytes = "vex", code[n + 3:n + 4], 1
    elif lead == 0x8F and n + 1 < len(code) and (code[n + 1] & 0x1F) >= 8:
        encoding, opcode, nbytes = "xop", code[n + 3:n + 4], 1
    elif lead == 0x0F:
        nbytes = 3 if code[n + 1:n + 2] in (b"\x38", b"\x3a") else 2
        encoding, opcode = "legacy", code[n:n + nbytes]
    else:
        encoding, opcode, nbytes = "legacy", code[n:n + 1], 1
    if not opcode:
        return View(insn.size, text, encoding, "refused", "", "truncated instruction")
    op1 = opcode[0]
    modrm_reg = (insn.modrm >> 3) & 7

    def refused(why: str) -> View:
        return View(insn.size, text, encoding, "refused", "", why)

    if encoding == "xop":  # the kernel's decoder has no XOP: what it would do is unknown
        return refused("an XOP instruction (the kernel's decoder does not know them)")
    bad = [_BAD_PREFIXES[p] for p in prefixes if p in _BAD_PREFIXES]
    if bad:
        return refused(f"the kernel refuses the {bad[0]} prefix")
    if op1 == 0x1F or (op1 == 0x8E and modrm_reg == 2):  # insn_masking_exception: any encoding
        return refused("the kernel does not single-step what may load ss (opcode "
                       f"{op1:#04x})")
    if op1 not in GOOD_64 and not (nbytes == 2 and opcode[1] in GOOD_2BYTE):
        return refused(f"opcode {op1:#04x} is not in the kernel's table of good instructions")

    # branch_setup_xol_ops: emulated branches and nops, by the opcode byte alone
    emulated = None
    if op1 in (0xEB, 0xE9):
        emulated = "jmp"
    elif op1 == 0x90:
        return View(insn.size, text, encoding, "emulated", "nop")  # no 0x66 check on this path
    elif op1 == 0xE8:
        emulated = "call"
    elif op1 == 0x0F:
        if nbytes == 2 and (opcode[1] - 0x10) in _COND:
            emulated = "jcc"
    elif op1 in _COND:
        emulated = "jcc"
    if emulated:
        if 0x66 in prefixes:
            return refused("the kernel refuses a branch with a 16-bit (0x66) prefix")
        return View(insn.size, text, encoding, "emulated", emulated)
    # push_setup_xol_ops: push reg, one byte or 41 5x
    if 0x50 <= op1 <= 0x57 and (insn.size == 1 or (insn.size == 2 and rex == 0x41 and n == 1)):
        return View(insn.size, text, encoding, "emulated", "push")

    how = "ip"
    if op1 == 0x9D:
        how = "popf"
    elif op1 in (0xC3, 0xCB, 0xC2, 0xCA, 0xEA):
        how = "ret"
    elif op1 == 0x9A or (op1 == 0xFF and modrm_reg in (2, 3)):
        how = "call"
    elif op1 == 0xFF and modrm_reg in (4, 5):
        how = "ret"                  # an indirect jmp: the kernel fixes no ip either
    rip = any(o.type == X.X86_OP_MEM and o.mem.base == X.X86_REG_RIP for o in insn.operands)
    if rip and how == "ip":
        how = "rip"
    elif rip:
        how += "-rip"
    features = []
    if encoding == "legacy" and bytes(opcode) in _SYSTEM:
        features.append("syscall")
    if encoding == "legacy" and _uses_vector(insn):
        features.append("vector")
    if 0x64 in prefixes or 0x65 in prefixes:
        features.append("seg")
    if (0xF2 in prefixes or 0xF3 in prefixes) and encoding == "legacy" and nbytes == 1 \
            and op1 in _STRING:
        features.append("rep")
    if encoding == "legacy" and 0xD8 <= op1 <= 0xDF:
        features.append("x87")
    if encoding == "legacy" and op1 == 0x9C:  # pushes the flags, trap flag of the step included
        features.append("pushf")
    # Classes of their own, shown by no case, so never probed: xbegin's abort target is not
    # fixed up out of line; a far call or jmp is fixed up as a near one.
    if encoding == "legacy" and op1 == 0xC7 and insn.modrm == 0xF8:
        features.append("xbegin")
    if encoding == "legacy" and op1 == 0xFF and modrm_reg in (3, 5):
        features.append("far")
    return View(insn.size, text, encoding, "stepped", how, features=tuple(features))


def _uses_vector(insn) -> bool:
    """Legacy-encoded SSE/MMX: an operand or implicit register in the vector file."""
    names = [insn.reg_name(r) or "" for r in insn.regs_access()[0] + insn.regs_access()[1]]
    names += [insn.reg_name(o.reg) or "" for o in insn.operands if o.type == X.X86_OP_REG]
    return any(n.startswith(("xmm", "ymm", "zmm", "mm")) for n in names)


def classify(code: bytes) -> Optional[str]:
    """The class of the instruction at the start of code, or None when it does not decode."""
    v = view(code)
    return None if v.length == 0 else v.klass
