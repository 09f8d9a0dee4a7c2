"""Which instruction classes single-step correctly under a uprobe on this kernel and CPU, shown
empirically: a sacrificial process runs one instruction of each class (tracer.host.isa) from a
code file of keytrace's own, once unprobed and once under a uprobe, and the two runs' full
register state (general registers, flags, x87/SSE/AVX/AVX-512 state through XSAVE, the stack
and memory the instruction touches) and the probe's hit count must agree.

Never on libc or any shared file: a uprobe patches the file in every process that maps it, so
a bad class tried on libc would corrupt the host. The code file is written here, mapped only by
the child, and its probes are bound to the child (perf events on the uprobe PMU with its pid:
no BPF program, no compile, gone with their file descriptors).

The result is cached per kernel (release and build) and CPU (model, flags, microcode) in
/var/cache/keytrace; `keytrace doctor` shows it.
"""
from __future__ import annotations

import ctypes as ct
import hashlib
import json
import mmap
import os
import platform
import random
import select
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import KeytraceError
from ..host import isa
from ..host.elf import CACHE_DIR
from . import kernel

RUNS = 3          # each instruction runs this often per pass, with different inputs
SLOT = 512        # bytes of code per case
PAD = 64          # int3 bytes after each case: a branch the kernel gets wrong lands there
TIMEOUT = 30.0    # seconds for the whole check

# ---- the cases: one or more instructions of each class, as GNU as assembles them -------------
# (text, bytes, CPU flag needed, set-up before the site). rip-relative operands are encoded with
# displacement 0 and pointed at the writable data page when laid out. Set-up codes: "cont" puts
# the address after the site in r14, "push-cont" pushes it too (for ret), "slot" also stores it
# in the data slot (for jmp/call through memory), "rcx8"/"rcx4" set a repeat count.


@dataclass(frozen=True)
class Case:
    text: str
    code: bytes
    needs: tuple = ()    # /proc/cpuinfo flags the instruction needs, all of them
    setup: str = ""
    after: bytes = b""   # executed after the site, on the fall-through path only

    @property
    def view(self) -> isa.View:
        return isa.view(self.code)


def _c(text: str, hexcode: str, needs: str = "", setup: str = "", after: str = "") -> Case:
    return Case(text, bytes.fromhex(hexcode), tuple(needs.split()), setup, bytes.fromhex(after))


CASES = [
    # legacy, emulated by the kernel
    _c("jne +5 (over mov $1,%eax)", "7505", after="b801000000"),
    _c("je +0", "7400"),
    _c("jb rel32 +5 (over mov $1,%eax)", "0f8205000000", after="b801000000"),
    _c("jmp +5 (over mov $1,%eax)", "eb05", after="b801000000"),
    _c("jmp rel32 +0", "e900000000"),
    _c("call +0", "e800000000"),
    _c("nop", "90"),
    _c("xchg %ax,%ax", "6690"),
    _c("pause", "f390"),
    _c("push %rbx", "53"),
    _c("push %r12", "4154"),
    # legacy, single-stepped
    _c("mov %rdi,%rax", "4889f8"),
    _c("imul %rdx,%rax", "480fafc2"),
    _c("sub $0x18,%rsp", "4883ec18"),
    _c("xor %ecx,%ecx", "31c9"),
    _c("test %rdi,%rdi", "4885ff"),
    _c("cmp $0x3ff,%edi", "81ffff030000"),
    _c("lea (%rdi,%rsi,2),%rax", "488d0477"),
    _c("endbr64", "f30f1efa"),
    _c("nopl (%rax,%rax,1)", "0f1f0400"),
    _c("mov (%rdi),%rax", "488b07"),
    _c("mov %rax,(%rdi)", "488907"),
    _c("add %rdx,0x8(%rdi)", "48015708"),
    _c("pop %rbx", "5b"),
    _c("pushf", "9c"),
    _c("mov $0xb,%eax", "b80b000000"),
    _c("movzbl 0x3(%rsi),%ecx", "0fb64e03"),
    _c("mov 0x0(%rip),%rax", "488b0500000000"),
    _c("mov %rdx,0x0(%rip)", "48891500000000"),
    _c("lea 0x0(%rip),%r8", "4c8d0500000000"),
    _c("cmpq $0x0,0x0(%rip)", "48833d0000000000"),
    _c("cmpb $0x7,0x0(%rip)", "803d0000000007"),
    _c("incl 0x0(%rip)", "ff0500000000"),
    _c("mov 0x0(%rip),%rsi", "488b3500000000"),
    _c("mov 0x0(%rip),%rdi", "488b3d00000000"),
    _c("mov %fs:0x28,%rax", "64488b042528000000"),
    _c("pshufb %xmm0,%xmm1", "660f3800c8", "ssse3"),
    _c("movdqu (%rdi),%xmm0", "f30f6f07"),
    _c("movdqu %xmm1,(%rdi)", "f30f7f0f"),
    _c("pxor %xmm0,%xmm2", "660fefd0"),
    _c("movq %rdi,%xmm0", "66480f6ec7"),
    _c("movaps %xmm1,%xmm3", "0f28d9"),
    _c("movdqa 0x0(%rip),%xmm4", "660f6f2500000000"),
    _c("movdqu 0x0(%rip),%xmm5", "f30f6f2d00000000"),
    _c("ret", "c3", setup="push-cont"),
    _c("jmp *%r14", "41ffe6", setup="cont"),
    _c("call *%r14", "41ffd6", setup="cont"),
    _c("jmp *0x0(%rip)", "ff2500000000", setup="slot"),
    _c("call *0x0(%rip)", "ff1500000000", setup="slot"),
    _c("rep stos %al,%es:(%rdi)", "f3aa", setup="rcx8"),
    _c("rep movsq", "f348a5", setup="rcx4"),
    _c("fld1", "d9e8"),
    _c("fldz", "d9ee"),
    # VEX
    _c("vpminub %xmm1,%xmm2,%xmm3", "c5e9dad9", "avx"),
    _c("vpmovmskb %ymm1,%eax", "c5fdd7c1", "avx2"),
    _c("vpminub (%rdi),%ymm1,%ymm2", "c5f5da17", "avx2"),
    _c("vpbroadcastd %xmm1,%ymm0", "c4e27d58c1", "avx2"),
    _c("vpminub 0x0(%rip),%xmm1,%xmm2", "c5f1da1500000000", "avx"),
    _c("vpbroadcastb %xmm1,%ymm0", "c4e27d78c1", "avx2"),
    _c("vzeroupper", "c5f877", "avx"),
    _c("vmovdqu %ymm0,(%rdi)", "c5fe7f07", "avx"),
    _c("vpcmpeqb (%rdi),%ymm0,%ymm1", "c5fd740f", "avx2"),
    _c("vpshufd $0x1b,%xmm1,%xmm0", "c5f970c11b", "avx"),
    _c("vpsubsb %xmm0,%xmm1,%xmm3", "c5f1e8d8", "avx"),
    _c("vpor %xmm0,%xmm1,%xmm3", "c5f1ebd8", "avx"),
    # EVEX
    _c("vpminub %zmm17,%zmm18,%zmm19", "62a16d40dad9", "avx512bw"),
    _c("vpminub (%rdi),%zmm1,%zmm2", "62f17548da17", "avx512bw"),
    _c("vpminub 0x0(%rip),%zmm1,%zmm2", "62f17548da1500000000", "avx512bw"),
    _c("vpbroadcastb %esi,%zmm16", "62e27d487ac6", "avx512bw"),
    _c("vmovdqu64 %zmm17,(%rdi)", "62e1fe487f0f", "avx512f"),
    _c("vpbroadcastb %esi,%ymm17", "62e27d287ace", "avx512bw avx512vl"),
    _c("vpsubsb %zmm0,%zmm1,%zmm3", "62f17548e8d8", "avx512bw"),
    _c("vpord %zmm0,%zmm1,%zmm3", "62f17548ebd8", "avx512f"),
]

# ---- the harness: machine code around each case -------------------------------------------
# r15 holds the context block for the whole run; r13 and r14 are the harness's. The context:
XIN, XOUT, XCLEAN = 0x0000, 0x1000, 0x2000           # XSAVE areas (standard format)
GIN, FLAGS_IN, SAVED_RSP, MASK = 0x3000, 0x3060, 0x3068, 0x3070
GOUT, FLAGS_OUT, RSP_OUT, STACKTOP = 0x3080, 0x30E0, 0x30E8, 0x30F0
SCRATCH, STACK, STACK_TOP, CTX_SIZE = 0x3100, 0x3400, 0x3600, 0x3800  # a stack of its own
GPRS = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12]          # rax rcx rdx rbx rbp rsi rdi r8-r12
GPR_NAMES = ["rax", "rcx", "rdx", "rbx", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12"]
XFEATURES = 0xE7      # x87, SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM (those XCR0 enables)
FLAGS_MASK = 0x40DD5  # CF PF AF ZF SF TF DF OF AC: what an instruction may change or leak
X87_POINTERS = range(6, 24)  # FOP, FIP, FDP: where the last x87 instruction ran (XOL differs)
DATA = 0x100          # where rip-relative operands point, in the writable page after the code


def _d32(v: int) -> bytes:
    return (v & 0xFFFFFFFF).to_bytes(4, "little")


def _r15(op: bytes, reg: int, disp: int, rex_w: bool = True) -> bytes:
    """An instruction `op` with operand `reg` and memory disp32(%r15)."""
    rex = 0x41 | (0x08 if rex_w else 0) | ((reg >> 3) << 2)
    return bytes([rex]) + op + bytes([0x80 | ((reg & 7) << 3) | 7]) + _d32(disp)


PROLOGUE = bytes.fromhex("53 55 4154 4155 4156 4157 4989ff".replace(" ", ""))  # push ...; mov %rdi,%r15
EPILOGUE = bytes.fromhex("fc 415f 415e 415d 415c 5d 5b c3".replace(" ", ""))   # cld; pop ...; ret
XGETBV = bytes.fromhex("31c9 0f01d0 48c1e220 4809d0 c3".replace(" ", ""))      # XCR0 in rax


def _enter(xsave: bool = True) -> bytes:
    """Load the input state: vector registers (xrstor; fxrstor on a CPU without XSAVE, which
    has no AVX either), flags, general registers."""
    if xsave:
        code = _r15(b"\x8b", 0, MASK, False) + _r15(b"\x8b", 2, MASK + 4, False)  # MASK: eax, edx
        code += _r15(b"\x0f\xae", 5, XIN)                                     # xrstor64 XIN
    else:
        code = _r15(b"\x0f\xae", 1, XIN)                                      # fxrstor64 XIN
    code += _r15(b"\x89", 4, SAVED_RSP)                                      # mov %rsp,SAVED_RSP
    code += _r15(b"\x8d", 4, STACK_TOP)                                      # lea STACK_TOP,%rsp
    code += _r15(b"\xff", 6, FLAGS_IN, False) + b"\x9d"                      # push FLAGS_IN; popf
    for i, reg in enumerate(GPRS):
        code += _r15(b"\x8b", reg, GIN + 8 * i)
    return code


def _leave(xsave: bool = True) -> bytes:
    """Store the output state, then put back a clean one for the caller."""
    code = b"".join(_r15(b"\x89", reg, GOUT + 8 * i) for i, reg in enumerate(GPRS))
    code += b"\x9c" + _r15(b"\x8f", 0, FLAGS_OUT, False)                     # pushf; pop FLAGS_OUT
    code += bytes.fromhex("4c8b3424") + _r15(b"\x89", 14, STACKTOP)          # the word at (%rsp)
    code += _r15(b"\x89", 4, RSP_OUT) + _r15(b"\x8b", 4, SAVED_RSP)
    if xsave:
        code += _r15(b"\x8b", 0, MASK, False) + _r15(b"\x8b", 2, MASK + 4, False)
        code += _r15(b"\x0f\xae", 4, XOUT)                                   # xsave64 XOUT
        code += _r15(b"\x0f\xae", 5, XCLEAN)                                 # xrstor64 XCLEAN
    else:
        code += _r15(b"\x0f\xae", 0, XOUT) + _r15(b"\x0f\xae", 1, XCLEAN)  # fxsave64, fxrstor64
    return code + EPILOGUE


@dataclass(frozen=True)
class Layout:
    size: int              # the code file's size (a page multiple)
    xgetbv: int            # offset of the XCR0 routine
    entries: tuple         # per case: offset of its function
    sites: tuple           # per case: offset of the probed instruction


def assemble(cases: list, xsave: bool = True) -> tuple:
    """(code file bytes, Layout). The writable data page follows the code at `size`."""
    blob = bytearray(XGETBV.ljust(64, b"\xcc"))
    entries, sites = [], []
    size = -(-(64 + SLOT * len(cases)) // 4096) * 4096
    for case in cases:
        start = len(blob)
        code = bytearray(PROLOGUE + _enter(xsave))
        setup_at = len(code)
        setup = {"cont": 7, "push-cont": 9, "slot": 14, "rcx8": 5, "rcx4": 5, "": 0}[case.setup]
        code += b"\x00" * setup              # filled once the site's address is known
        site = start + len(code)
        code += case.code + case.after
        cont_jump_at = len(code)
        code += b"\xe9" + _d32(PAD)           # jmp over the landing pad
        code += b"\xcc" * PAD
        cont = start + len(code)
        code += _leave(xsave)
        if len(code) > SLOT:
            raise AssertionError(f"case {case.text} does not fit its slot")
        data = size + DATA
        # rip-relative operand of the case: to the data page
        v = case.view
        if "rip" in v.how:
            at = _disp_offset(case.code)
            end = site + len(case.code)
            code[site - start + at:site - start + at + 4] = _d32(data - end)
        if case.setup in ("cont", "push-cont", "slot"):
            lea_end = start + setup_at + 7
            setup_code = bytes.fromhex("4c8d35") + _d32(cont - lea_end)   # lea cont(%rip),%r14
            if case.setup == "push-cont":
                setup_code += b"\x41\x56"                                  # push %r14
            if case.setup == "slot":
                store_end = start + setup_at + 14
                setup_code += bytes.fromhex("4c8935") + _d32(data - store_end)  # mov %r14,data(%rip)
            code[setup_at:setup_at + setup] = setup_code
        elif case.setup in ("rcx8", "rcx4"):
            code[setup_at:setup_at + 5] = b"\xb9" + _d32(8 if case.setup == "rcx8" else 4)
        assert code[cont_jump_at] == 0xE9
        blob += code.ljust(SLOT, b"\xcc")
        entries.append(start)
        sites.append(site)
    return bytes(blob.ljust(size, b"\xcc")), Layout(size, 0, tuple(entries), tuple(sites))


def _disp_offset(code: bytes) -> int:
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    md.detail = True
    insn = next(md.disasm(code, 0, 1))
    return insn.disp_offset


# ---- the CPU and the cache ------------------------------------------------------------------

def _cpu() -> tuple:
    """(model name, flags, microcode) from /proc/cpuinfo's first processor."""
    info: dict = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            k, _, v = line.partition(":")
            info[k.strip()] = v.strip()
    except OSError:
        pass
    return info.get("model name", "?"), set(info.get("flags", "").split()), info.get("microcode", "")


def identity() -> str:
    """What the result depends on: the kernel build, the CPU, and the cases themselves."""
    model, flags, microcode = _cpu()
    u = platform.uname()
    cases = hashlib.sha256(repr([(c.text, c.code, c.setup) for c in CASES]).encode()).hexdigest()
    return hashlib.sha256(f"{u.release}|{u.version}|{model}|{sorted(flags)}|{microcode}|{cases}"
                          .encode()).hexdigest()[:16]


@dataclass
class Verdict:
    ok: bool
    detail: str          # what was tried, and how it went


@dataclass
class Report:
    classes: dict        # class -> Verdict
    kernel: str
    cpu: str
    seconds: float
    cached: bool = False
    complete: bool = True  # every case ran (a run that timed out is used, not cached)

    def verdict(self, klass: str) -> Optional[Verdict]:
        return self.classes.get(klass)

    def unsafe(self) -> dict:
        return {k: v for k, v in sorted(self.classes.items()) if not v.ok}

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "cpu": self.cpu, "seconds": self.seconds,
                "classes": {k: {"ok": v.ok, "detail": v.detail} for k, v in self.classes.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "Report":
        return cls({k: Verdict(v["ok"], v["detail"]) for k, v in d["classes"].items()},
                   d["kernel"], d["cpu"], d["seconds"], cached=True)


_REPORT: Optional[Report] = None


def cached() -> Optional[Report]:
    """The stored result for this kernel and CPU, if any."""
    global _REPORT
    if _REPORT is not None:
        return _REPORT
    try:
        d = json.loads((CACHE_DIR / f"stepcheck-{identity()}.json").read_text())
        _REPORT = Report.from_json(d)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return _REPORT


def report(note=None) -> Report:
    """The check's result: cached, or run now (a few seconds, once per kernel and CPU); note is
    told a line when it runs."""
    global _REPORT
    got = cached()
    if got is not None:
        return got
    if note:
        note("checking which instructions single-step correctly under a uprobe on this kernel "
             "and CPU (once; cached in " + str(CACHE_DIR) + ")")
    _REPORT = run()
    if not _REPORT.complete:
        return _REPORT
    try:
        tmp = CACHE_DIR / f".stepcheck-{os.getpid()}.tmp"
        tmp.write_text(json.dumps(_REPORT.to_json(), indent=1) + "\n")
        tmp.replace(CACHE_DIR / f"stepcheck-{identity()}.json")
    except OSError:
        pass  # not cached: checked again next time
    return _REPORT


class Policy:
    """Whether a probe may go on an instruction, from the check's report: policy(code) is None
    when it may, else why not, in words. Refused instructions, classes shown wrong, and classes
    no instruction of which was tried are all unsafe."""

    def __init__(self, rep: Report):
        self.report = rep

    def __call__(self, code: bytes) -> Optional[str]:
        v = isa.view(code)
        if v.action == "refused":
            return f"the kernel refuses a uprobe on `{v.text}`: {v.why}"
        verdict = self.report.verdict(v.klass)
        if verdict is None:
            return (f"`{v.text}` is of a class ({v.klass}) that has not been shown to "
                    "single-step correctly here")
        if not verdict.ok:
            return f"`{v.text}` ({v.klass}) is probed wrongly by this kernel"
        return None


_POLICIES: dict = {}


def policy(note=None) -> Policy:
    """The probe-site policy of this host (the check is run first if it never ran here); one
    object per report, so that what is worked out under it (planned sites) is kept once."""
    rep = report(note)
    if id(rep) not in _POLICIES:
        _POLICIES.clear()
        _POLICIES[id(rep)] = Policy(rep)
    return _POLICIES[id(rep)]


# ---- running it ------------------------------------------------------------------------------

def run() -> Report:
    """Run every case the CPU supports, unprobed then probed, in sacrificial children; never
    longer than TIMEOUT (the cases not run by then count as failed)."""
    t0 = time.monotonic()
    model, flags, _ = _cpu()
    xsave = "xsave" in flags  # without it there is no AVX either: fxsave covers x87 and SSE
    cases = [c for c in CASES if all(f in flags for f in c.needs)]
    blob, layout = assemble(cases, xsave)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    # A file of this run's own: two first runs at once must not replace each other's probed inode.
    path = CACHE_DIR / f".stepcheck-{os.getpid()}-{time.monotonic_ns()}.bin"
    path.write_bytes(blob)
    outcome: dict = {}
    complete = True
    try:
        todo = list(range(len(cases)))
        deadline = time.monotonic() + TIMEOUT
        while todo:
            done = _child_pass(str(path), layout, todo, deadline, xsave)
            outcome.update(done)
            todo = [i for i in todo if i not in outcome]
            if todo and (not done or time.monotonic() >= deadline):  # no progress: give up
                outcome.update((i, "not run: the check ran out of time") for i in todo)
                complete = False
                break
    finally:
        path.unlink(missing_ok=True)
    by_class: dict = {}
    for i, case in enumerate(cases):
        by_class.setdefault(case.view.klass, []).append((case, outcome[i]))
    classes = {}
    for klass, tried in by_class.items():
        bad = [(c, why) for c, why in tried if why]
        if bad:
            detail = "; ".join(f"{c.text}: {why}" for c, why in bad)
        else:
            detail = "right under a uprobe: " + ", ".join(c.text for c, _ in tried)
        classes[klass] = Verdict(not bad, detail)
    u = platform.uname()
    # A run that timed out, or in which nothing came out right, says more about the moment than
    # about the kernel: it is used, never cached.
    complete = complete and any(v.ok for v in classes.values())
    return Report(classes, f"{u.release} {u.version}", model, round(time.monotonic() - t0, 2),
                  complete=complete)


_PR_SET_PDEATHSIG = 1


def _child_pass(path: str, layout: Layout, todo: list, deadline: float, xsave: bool) -> dict:
    """One sacrificial child runs the cases of todo: {case index: "" (right) or what went
    wrong}, for the cases it finished or died on; the rest are left for another child. A case
    that crashes unprobed is broken on this CPU (it proves nothing either way)."""
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no Python clean-up, whatever happens
        code = 1
        try:
            os.close(to_child_w)
            os.close(from_child_r)
            ct.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            _child(path, layout, todo, to_child_r, from_child_w, xsave)
            code = 0
        finally:
            os._exit(code)
    os.close(to_child_r)
    os.close(from_child_w)
    result: dict = {}
    fds: dict = {}
    current = None   # ("base" or "probed", case) being run
    reader = _Lines(from_child_r)
    try:
        while True:  # the unprobed runs
            line = _readline(reader, deadline).strip()
            kind, _, index = line.partition(" ")
            if kind == "base":
                current = ("base", int(index))
            elif line == "ready":
                current = None
                break
            elif current is None:  # it could not even start: nothing it runs would tell more
                return {i: line or "the sacrificial process died before its first case"
                        for i in todo}
            else:
                return result  # it died unprobed: current says in which case
        for i in todo:
            try:
                fds[i] = _open_uprobe(path, layout.sites[i], pid)
            except KeytraceError as e:
                if not _uprobe_pmu():
                    raise
                result[i] = f"the kernel refused the probe ({e})"
        os.write(to_child_w, b"go\n")
        while True:
            line = _readline(reader, deadline)
            if not line:
                break
            kind, _, rest = line.strip().partition(" ")
            index, _, why = rest.partition(" ")
            if kind == "start":
                current = ("probed", int(index))
            elif kind == "done":
                result.setdefault(int(index), why)
                current = None
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        if current is not None:
            result[current[1]] = "hung" + (" under the probe" if current[0] == "probed" else "")
    finally:
        reader.close()
        os.close(to_child_w)
        _, status = os.waitpid(pid, 0)
        if current is not None and current[1] not in result:
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
            died = f"died of {signal.Signals(sig).name}" if sig else "died"
            result[current[1]] = (f"the probed process {died}" if current[0] == "probed"
                                  else f"{died} unprobed: the case itself is broken here")
        for i, fd in fds.items():
            hits = int.from_bytes(os.read(fd, 8), "little")
            if i in result and not result[i] and hits != RUNS:
                result[i] = ("the probe never fired" if hits == 0 else
                             f"the probe fired {hits} times for {RUNS} executions")
        _close_all(list(fds.values()))
    return result


class _Lines:
    """Lines from a pipe, each waited for with a deadline (no buffering that select misses)."""

    def __init__(self, fd: int):
        self.fd, self.buf = fd, b""

    def readline(self, deadline: float) -> str:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.fd, 4096)
            if not chunk:
                line, self.buf = self.buf, b""
                return line.decode()
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode() + "\n"

    def close(self) -> None:
        os.close(self.fd)


def _readline(reader: _Lines, deadline: float) -> str:
    return reader.readline(deadline)


def _close_all(fds: list) -> None:
    """Each uprobe's unregistration waits out an RCU grace period: close them in parallel."""
    if fds:
        with ThreadPoolExecutor(max_workers=min(32, len(fds))) as pool:
            list(pool.map(os.close, fds))


def _uprobe_pmu() -> Optional[int]:
    try:
        return int(Path(kernel.UPROBE_PMU, "type").read_text())
    except (OSError, ValueError):
        return None


def _open_uprobe(path: str, offset: int, pid: int) -> int:
    if _uprobe_pmu() is None:
        raise KeytraceError(f"the kernel has no uprobe PMU ({kernel.UPROBE_PMU})")
    try:
        return kernel.uprobe_event(path, offset, pid=pid)
    except OSError as e:
        raise KeytraceError(f"perf_event_open of a uprobe on {path}+{offset:#x} failed: "
                            f"{e.strerror}") from None


# ---- the sacrificial child -------------------------------------------------------------------

_PROT = mmap.PROT_READ | mmap.PROT_EXEC


def _child(path: str, layout: Layout, todo: list, cmd_fd: int, out_fd: int, xsave: bool) -> None:
    libc = ct.CDLL(None, use_errno=True)
    libc.mmap.restype = ct.c_void_p
    libc.mmap.argtypes = [ct.c_void_p, ct.c_size_t, ct.c_int, ct.c_int, ct.c_int, ct.c_long]
    # The code (read and execute, where the uprobes go) with the writable data page after it.
    base = libc.mmap(None, layout.size + 4096, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    fd = os.open(path, os.O_RDONLY)
    got = libc.mmap(base, layout.size, _PROT, mmap.MAP_PRIVATE | 0x10, fd, 0)  # MAP_FIXED
    os.close(fd)
    if got != base:
        os.write(out_fd, b"could not map the code file\n")
        return
    data = base + layout.size
    buf = ct.create_string_buffer(CTX_SIZE + 64)
    ctx = (ct.addressof(buf) + 63) & ~63
    # XCR0 says which state XSAVE covers (xgetbv faults without XSAVE: fxsave then)
    mask = ct.CFUNCTYPE(ct.c_uint64)(base + layout.xgetbv)() & XFEATURES if xsave else 0
    ct.memmove(ctx + MASK, mask.to_bytes(8, "little"), 8)
    _init_area(ctx + XCLEAN, 0)
    fns = {i: ct.CFUNCTYPE(None, ct.c_void_p)(base + layout.entries[i]) for i in todo}
    inputs = [_inputs(run, mask) for run in range(RUNS)]

    def once(i: int, run: int) -> bytes:
        xin, gprs, flags, scratch, page = inputs[run]
        ct.memmove(ctx + XIN, xin, len(xin))
        _init_area(ctx + XOUT, 0)
        g = list(gprs)
        g[GPRS.index(7)], g[GPRS.index(6)] = ctx + SCRATCH, ctx + SCRATCH + 128  # rdi, rsi
        ct.memmove(ctx + GIN, b"".join(v.to_bytes(8, "little") for v in g), 96)
        ct.memmove(ctx + FLAGS_IN, flags.to_bytes(8, "little"), 8)
        ct.memmove(ctx + SCRATCH, scratch, len(scratch))  # and the stack after it
        ct.memmove(data, page, len(page))
        fns[i](ctx)
        out = bytearray(ct.string_at(ctx + XOUT, 4096))
        out[512:576] = bytes(64)          # the header says which parts are in use: may differ
        for b in X87_POINTERS:
            out[b] = 0
        flags_out = int.from_bytes(ct.string_at(ctx + FLAGS_OUT, 8), "little") & FLAGS_MASK
        rsp = (int.from_bytes(ct.string_at(ctx + RSP_OUT, 8), "little") - (ctx + STACK_TOP)
               ) & (2**64 - 1)
        return (bytes(out) + ct.string_at(ctx + GOUT, 96) + flags_out.to_bytes(8, "little")
                + rsp.to_bytes(8, "little") + ct.string_at(ctx + STACKTOP, 8)
                + ct.string_at(ctx + SCRATCH, STACK + 1024 - SCRATCH) + ct.string_at(data, 4096))

    baseline = {}
    for i in todo:
        os.write(out_fd, f"base {i}\n".encode())
        baseline.update(((i, r), once(i, r)) for r in range(RUNS))
    os.write(out_fd, b"ready\n")
    if os.read(cmd_fd, 16) != b"go\n":
        return
    for i in todo:
        os.write(out_fd, f"start {i}\n".encode())
        why = ""
        for r in range(RUNS):
            got_r = once(i, r)
            if got_r != baseline[(i, r)]:
                why = "results differ under the probe: " + _diff(baseline[(i, r)], got_r)
                break
        os.write(out_fd, f"done {i} {why}\n".encode())


def _diff(a: bytes, b: bytes) -> str:
    """Which part of the state differs first."""
    parts = [("x87/SSE state", 0, 512), ("AVX state", 576, 1088), ("opmask registers", 1088, 1152),
             ("upper ZMM state", 1152, 2688), ("vector state", 2688, 4096)]
    at = 4096
    parts += [(n, at + 8 * i, at + 8 * i + 8) for i, n in enumerate(GPR_NAMES)]
    at += 96
    parts += [("flags", at, at + 8), ("stack pointer", at + 8, at + 16),
              ("the word at the stack pointer", at + 16, at + 24),
              ("memory", at + 24, at + 24 + STACK - SCRATCH),
              ("the stack", at + 24 + STACK - SCRATCH, at + 24 + STACK + 1024 - SCRATCH),
              ("rip-relative memory", at + 24 + STACK + 1024 - SCRATCH, len(a))]
    for name, lo, hi in parts:
        if a[lo:hi] != b[lo:hi]:
            return name
    return "state"


def _init_area(addr: int, bv: int) -> None:
    """An XSAVE area in the initial state: FCW 0x37f, MXCSR 0x1f80, all else zero."""
    area = bytearray(4096)
    area[0:2] = (0x037F).to_bytes(2, "little")
    area[24:28] = (0x1F80).to_bytes(4, "little")
    area[512:520] = bv.to_bytes(8, "little")
    ct.memmove(addr, bytes(area), len(area))


def _inputs(run: int, mask: int) -> tuple:
    """The input state of one run: (XSAVE area, general registers, flags, scratch memory, data
    page), different per run, the same in both passes."""
    rnd = random.Random(0x6B657974 + run)
    area = bytearray(4096)
    area[0:2] = (0x037F).to_bytes(2, "little")
    area[24:28] = (0x1F80).to_bytes(4, "little")
    area[160:416] = rnd.randbytes(256)                      # xmm0-15
    area[512:520] = mask.to_bytes(8, "little")              # XSTATE_BV: load every part
    area[576:832] = rnd.randbytes(256)                      # upper halves of ymm0-15
    area[1088:1152] = rnd.randbytes(64)                     # k0-k7
    area[1152:1664] = rnd.randbytes(512)                    # upper halves of zmm0-15
    area[1664:2688] = rnd.randbytes(1024)                   # zmm16-31
    gprs = [rnd.getrandbits(64) for _ in GPRS]
    flags = 0x202 | [0, 0x8D5, 0x41][run % 3]               # none; CF PF AF ZF SF OF; CF ZF
    return bytes(area), gprs, flags, rnd.randbytes(STACK + 1024 - SCRATCH), rnd.randbytes(4096)
