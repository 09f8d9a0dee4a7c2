"""tracer.host.planner: probe sites proved from machine code. Pure Python and gcc: no root, no
BPF. The condition table is checked against the processor and the assembler; the planner against
this machine's libc, an assembled copy of it, and assembled shapes it must prove or refuse."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from tracer.host import planner
from tracer.host.planner import Refused, Value

LIBC = Path("/lib/x86_64-linux-gnu/libc.so.6")
FIXTURES = Path(__file__).parent / "fixtures" / "planner"
GCC = shutil.which("gcc")
needs_gcc = pytest.mark.skipif(GCC is None, reason="gcc is needed to build the fixtures")


def gcc(tmp: Path, source: Path, out: str, *flags) -> Path:
    target = tmp / out
    subprocess.run([GCC, *flags, "-o", str(target), str(source)], check=True,
                   capture_output=True, text=True)
    return target


def file_bytes(path, vaddr: int, size: int) -> bytes:
    """The bytes of an ELF file at a virtual address, read independently of the planner."""
    with open(path, "rb") as fh:
        for seg in ELFFile(fh).iter_segments():
            start, end = seg["p_vaddr"], seg["p_vaddr"] + seg["p_filesz"]
            if seg["p_type"] == "PT_LOAD" and start <= vaddr < end:
                fh.seek(seg["p_offset"] + vaddr - seg["p_vaddr"])
                return fh.read(size)
    raise AssertionError(f"{vaddr:#x} is in no segment")


def by_event(plan) -> dict:
    out: dict = {}
    for s in plan.sites:
        out.setdefault(s.event, []).append(s)
    return out


def check_sites(path, plan) -> None:
    """What holds of every site: the bytes are the file's, a jcc site's encoding has its cc."""
    for s in plan.sites:
        assert plan.address <= s.address < plan.address + plan.size
        assert file_bytes(path, s.address, s.size) == s.insn
        if s.cc >= 0:
            assert s.insn[0] == 0x70 + s.cc or s.insn[:2] == bytes([0x0F, 0x80 + s.cc])
            assert s.emulated
        assert s.values["caller"].kind == "stack"


def describe(plan) -> str:
    lines = [f"{plan.function} at {plan.address:#x} ({plan.size} bytes), build {plan.build_id}"]
    for s in plan.sites:
        when = (f"j{planner.CONDITIONS[s.cc][0]} {'taken' if s.taken else 'not taken'}"
                if s.cc >= 0 else "always")
        vals = ", ".join(f"{k}={v.kind}:{v.reg or ''}{'>>' + str(v.shift) if v.shift else ''}"
                         f"{v.offset if v.kind == 'stack' else ''}"
                         f"{v.value if v.kind == 'const' else ''}" for k, v in s.values.items())
        lines.append(f"  +{s.address - plan.address:#x} {s.insn.hex()} {s.event} when {when}, "
                     f"{'emulated' if s.emulated else 'single-stepped'}: {vals}")
    return "\n".join(lines)


def check_glibc_236(path) -> dict:
    """The plan of glibc 2.36's two functions (the real file or the assembled copy)."""
    plans = planner.plan_file(str(path))
    assert set(plans) == set(planner.FUNCTIONS)
    for plan in plans.values():
        check_sites(path, plan)
    create, delete = by_event(plans["pthread_key_create"]), by_event(plans["pthread_key_delete"])
    base_c, base_d = plans["pthread_key_create"].address, plans["pthread_key_delete"].address

    (ok,) = create["create"]
    assert (ok.address - base_c, ok.cc, ok.taken, ok.emulated) == (0x39, 5, False, True)
    assert ok.values == {"key": Value("reg", reg="cx"), "destructor": Value("reg", reg="si"),
                         "caller": Value("stack", offset=0), "seq": Value("reg", reg="r9")}
    (failed,) = create["create_failed"]
    assert (failed.address - base_c, failed.cc) == (0x2A, -1)
    assert failed.values == {"errno": Value("const", value=11), "caller": Value("stack", offset=0)}

    (ok,) = delete["delete"]
    assert (ok.address - base_d, ok.cc, ok.taken, ok.emulated) == (0x2A, 5, False, True)
    assert ok.values == {"key": Value("reg", reg="di", shift=4), "caller": Value("stack", offset=0),
                         "seq": Value("reg", reg="cx")}
    (failed,) = delete["delete_failed"]   # entered from 3 places: one site, no single key
    assert (failed.address - base_d, failed.cc) == (0x30, -1)
    assert failed.values == {"errno": Value("const", value=22), "caller": Value("stack", offset=0)}
    return plans


@pytest.mark.skipif(not LIBC.exists() or os.confstr("CS_GNU_LIBC_VERSION") != "glibc 2.36",
                    reason="the expected offsets are glibc 2.36's")
def test_this_machines_libc():
    plans = check_glibc_236(LIBC)
    print("\n" + "\n".join(describe(p) for p in plans.values()))
    assert len({p.build_id for p in plans.values()}) == 1 and plans["pthread_key_create"].build_id


# ---- the condition table ---------------------------------------------------------------------

@needs_gcc
def test_condition_names_are_the_encodings(tmp_path):
    """CONDITIONS[cc] is named as the assembler encodes condition code cc: 70+cc and 0f 80+cc."""
    names = [n for n, _ in planner.CONDITIONS]
    assert len(names) == 16
    src = tmp_path / "jcc.S"
    src.write_text("".join(f"\tj{n} 1f\n" for n in names) + "1:\n"
                   + "".join(f"\tj{n} 2f\n" for n in names) + "\t.skip 256\n2:\tret\n")
    obj = gcc(tmp_path, src, "jcc.o", "-c")
    with open(obj, "rb") as fh:
        text = ELFFile(fh).get_section_by_name(".text").data()
    for cc in range(16):
        assert text[2 * cc] == 0x70 + cc, names[cc]
        assert text[32 + 6 * cc: 34 + 6 * cc] == bytes([0x0F, 0x80 + cc]), names[cc]


FLAGS_PROGRAM = r"""
#include <stdint.h>
#include <stdio.h>

#define EACH(M) %(each)s

/* cmp a, b, then EFLAGS; then, for every condition code, setcc right after a fresh cmp */
static void after_cmp(int64_t a, int64_t b)
{
    uint64_t flags;
    unsigned char r;
    __asm__ volatile("cmpq %%2, %%1\n\tpushfq\n\tpopq %%0" : "=r"(flags) : "r"(a), "r"(b) : "cc");
    printf("cmp %%lld %%lld %%llx", (long long)a, (long long)b, (unsigned long long)flags);
#define CMP(s) __asm__ volatile("cmpq %%2, %%1\n\tset" s " %%0" : "=q"(r) : "r"(a), "r"(b) : "cc"); \
               printf(" %%d", r);
    EACH(CMP)
    printf("\n");
}

/* any combination of the five flags, loaded with popfq, then setcc */
static void after_popf(uint64_t flags)
{
    unsigned char r;
    printf("popf 0 0 %%llx", (unsigned long long)flags);
#define POPF(s) __asm__ volatile("pushq %%1\n\tpopfq\n\tset" s " %%0" : "=q"(r) : "r"(flags) : "cc"); \
                printf(" %%d", r);
    EACH(POPF)
    printf("\n");
}

int main(void)
{
    static const int64_t v[] = {0, 1, -1, 2, -2, 0x7f, 0x80, 0xff, 0x100, 0x7fffffff,
        0x80000000LL, -0x80000000LL, 0xffffffffLL, 0x100000000LL, INT64_MAX, INT64_MIN,
        INT64_MAX - 1, INT64_MIN + 1, 0x5555555555555555LL, -0x5555555555555556LL};
    static const int bits[] = {0, 2, 6, 7, 11};   /* CF PF ZF SF OF */
    unsigned n = sizeof v / sizeof v[0];
    for (unsigned i = 0; i < n; i++)
        for (unsigned j = 0; j < n; j++)
            after_cmp(v[i], v[j]);
    for (unsigned m = 0; m < 32; m++) {
        uint64_t f = 0x202;   /* reserved bit 1 and IF, as user code has them */
        for (unsigned k = 0; k < 5; k++)
            if (m >> k & 1)
                f |= 1ull << bits[k];
        after_popf(f);
    }
    return 0;
}
"""


@needs_gcc
def test_condition_holds_as_the_processor_says(tmp_path):
    """condition_holds(cc, EFLAGS) against setcc (same 16 codes as jcc) on this CPU: after cmp
    of many int64 pairs (equal, signed and unsigned overflow, edges) and for all 32 flag sets."""
    each = " ".join(f'M("{n}")' for n, _ in planner.CONDITIONS)
    src = tmp_path / "flags.c"
    src.write_text(FLAGS_PROGRAM % {"each": each})
    exe = gcc(tmp_path, src, "flags", "-O1", "-mno-red-zone")   # the asm pushes below rsp
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines()]
    wrong, popf = [], set()
    for tag, a, b, flags, *bits in rows:
        a, b, flags, bits = int(a), int(b), int(flags, 16), [bit == "1" for bit in bits]
        assert len(bits) == 16
        for cc in range(16):
            if planner.condition_holds(cc, flags) != bits[cc]:
                wrong.append(f"{tag} {a} {b} flags={flags:#x} j{planner.CONDITIONS[cc][0]}: "
                             f"cpu {bits[cc]}")
        if tag == "cmp":   # the program measured what it claims to
            assert bits[4] == (a == b) and bits[12] == (a < b)
            assert bits[2] == (a % 2**64 < b % 2**64) and bits[7] == (a % 2**64 > b % 2**64)
        else:
            popf.add(flags & 0x8C5)
    assert not wrong, "\n".join(wrong[:20])
    assert len(rows) == 400 + 32 and len(popf) == 32


def test_condition_holds_reads_the_flag_bits():
    assert planner.condition_holds(4, 1 << 6) and not planner.condition_holds(4, 0)
    assert planner.condition_holds(12, 1 << 7) and planner.condition_holds(12, 1 << 11)
    assert not planner.condition_holds(12, (1 << 7) | (1 << 11))
    assert planner.condition_holds(7, 0) and not planner.condition_holds(7, 1)


# ---- assembled shapes ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    if GCC is None:
        pytest.skip("gcc is needed to build the fixtures")
    d = tmp_path_factory.mktemp("planner")
    return {name: gcc(d, FIXTURES / f"{name}.S", f"lib{name}.so", "-shared", "-nostdlib",
                      "-Wl,--build-id")
            for name in ("glibc", "accepted", "refused")}


def test_assembled_copy_of_glibc(libs):
    plans = check_glibc_236(libs["glibc"])
    if LIBC.exists() and os.confstr("CS_GNU_LIBC_VERSION") == "glibc 2.36":
        real = planner.plan_file(str(LIBC))
        for f in planner.FUNCTIONS:   # the copy is the same code: the same sites, other places
            assert [s.insn for s in plans[f].sites] == [s.insn for s in real[f].sites]
            assert [(s.address - plans[f].address, s.event, s.values) for s in plans[f].sites] \
                == [(s.address - real[f].address, s.event, s.values) for s in real[f].sites]


def test_success_on_je_is_the_taken_edge(libs):
    plan = planner.plan_function(str(libs["accepted"]), "create_je")
    check_sites(libs["accepted"], plan)
    (ok,) = by_event(plan)["create"]
    assert (ok.cc, ok.taken) == (4, True)
    assert ok.values["key"] == Value("reg", reg="cx")
    assert ok.values["destructor"] == Value("reg", reg="si")
    assert [s.values["errno"].value for s in by_event(plan)["create_failed"]] == [11]


def test_several_returns_each_get_a_failure_site(libs):
    plan = planner.plan_function(str(libs["accepted"]), "create_returns")
    check_sites(libs["accepted"], plan)
    events = by_event(plan)
    assert len(events["create"]) == 1
    assert sorted(s.values["errno"].value for s in events["create_failed"]) == [11, 22]
    assert all(s.cc == -1 and not s.emulated for s in events["create_failed"])   # mov $imm,%eax


def test_stack_frame_moves_the_return_address(libs):
    """push rbp; sub $16,%rsp: the return address is 24 bytes above rsp at both sites, and the
    failure joins the success path at a shared `leave; ret`."""
    plan = planner.plan_function(str(libs["accepted"]), "create_frame")
    check_sites(libs["accepted"], plan)
    events = by_event(plan)
    assert [s.values["caller"] for s in plan.sites] == [Value("stack", offset=24)] * 2
    assert events["create"][0].values["key"] == Value("reg", reg="cx")
    assert events["create_failed"][0].values["errno"] == Value("const", value=11)


def test_tail_call_is_an_exit(libs):
    plan = planner.plan_function(str(libs["accepted"]), "delete_tail")
    check_sites(libs["accepted"], plan)
    events = by_event(plan)
    assert events["delete"][0].values["key"] == Value("reg", reg="di", shift=4)
    assert events["delete_failed"][0].values["errno"] == Value("const", value=22)


@pytest.mark.parametrize("function, why", [
    ("create_no_cmpxchg", "has 0 lock cmpxchg"),
    ("create_two_cmpxchg", "has 2 lock cmpxchg"),
    ("create_fail_in_loop", "create_failed site at create_fail_in_loop+0x9 is inside a loop"),
    ("create_rsi_clobbered", "destructor (rsi) is lost"),
    ("create_indirect", "indirect jump `jmp r11` at create_indirect+0x10"),
    ("delete_silent", "can return with no event: delete_silent+0x0 -> delete_silent+0x30 -> ret"),
    ("create_changes_errno", "may not be what the call returns"),
])
def test_refused_shapes(libs, function, why):
    with pytest.raises(Refused) as e:
        planner.plan_function(str(libs["refused"]), function)
    assert why in str(e.value)
    with pytest.raises(Refused) as again:   # cached, and still says why
        planner.plan_function(str(libs["refused"]), function)
    assert str(again.value) == str(e.value)


def test_refused_files_and_names(libs, tmp_path):
    with pytest.raises(Refused, match="does not define pthread_key_create"):
        planner.plan_file(str(libs["refused"]))
    with pytest.raises(Refused, match="neither a create nor a delete"):
        planner.plan_function(str(libs["accepted"]), "helper")
    with pytest.raises(Refused, match="cannot read"):
        planner.plan_function(str(tmp_path / "absent.so"), "pthread_key_create")


def test_plans_are_shared_by_build(libs, tmp_path):
    """One analysis per build id: a copy of the file (another inode) gets the same sites, under
    its own path."""
    first = planner.plan_file(str(libs["glibc"]))
    assert planner.plan_file(str(libs["glibc"])) == first
    copy = tmp_path / "copy.so"
    shutil.copy(libs["glibc"], copy)
    again = planner.plan_file(str(copy))
    for f in planner.FUNCTIONS:
        assert again[f].path == str(copy) and again[f].sites == first[f].sites
        assert again[f].build_id == first[f].build_id != ""


# ---- entry sites: safe, once per call, arguments intact (no BPF: a policy given here) ---------

def no_vex(code: bytes):
    """A policy as this host's check gives it: VEX/EVEX instructions the kernel takes for
    branches, and everything it refuses, are unsafe."""
    from tracer.host import isa
    v = isa.view(code)
    if v.action == "refused":
        return v.why
    return "wrongly emulated" if v.encoding != "legacy" and v.action == "emulated" else None


@needs_gcc
def test_entry_sites_move_past_unsafe_first_instructions(tmp_path):
    from tracer.host import branches
    from tracer.host.elf import elf_info
    exe = gcc(tmp_path, Path(__file__).parent / "fixtures" / "entries.c", "entries")
    info = elf_info(str(exe))
    at = {name: info.address_of(name) for name in ("ds_entry", "vex_entry", "lock_entry", "inner", "outer")}
    # ds: mov is refused; the next instruction sees the same arguments
    assert planner.entry_site(str(exe), at["ds_entry"], "ds_entry", no_vex).address == at["ds_entry"] + 4
    # vpbroadcastb (VEX, taken for a js) writes only ymm1: the site moves to the mov after it
    assert planner.entry_site(str(exe), at["vex_entry"], "vex_entry", no_vex).address == at["vex_entry"] + 5
    # a locked store: no probe there, and none past a write to memory
    with pytest.raises(Refused, match="changes what an entry probe reads"):
        planner.entry_site(str(exe), at["lock_entry"], "lock_entry", no_vex)
    # a safe entry stays where it is
    assert planner.entry_site(str(exe), at["inner"], "inner", no_vex).address == at["inner"]
    # outer jumps to inner+3: nothing past inner's entry counts inner's calls alone
    assert branches.entering(str(exe), at["inner"], at["inner"] + 3) == [(at["inner"] + 3, at["outer"] + 4)]
    with pytest.raises(Refused, match="lands at inner\\+0x3"):
        planner.plan_entry(str(exe), at["inner"], 16, "inner", no_vex)


@needs_gcc
def test_a_site_that_reads_one_argument_may_sit_on_the_first_emulated_instruction(tmp_path):
    from tracer.host.elf import elf_info
    exe = gcc(tmp_path, Path(__file__).parent / "fixtures" / "entries.c", "entries")
    info = elf_info(str(exe))
    at = {name: info.address_of(name) for name in ("checks", "clobbers", "inner", "outer")}
    # cmp and mov (to rsi) leave rdi as passed: the ja after them (emulated) sees arg0, not arg1
    assert planner.argument_site(str(exe), at["checks"], "checks", no_vex, (0,)).address == \
        at["checks"] + 11
    with pytest.raises(Refused, match="changes an argument"):
        planner.argument_site(str(exe), at["checks"], "checks", no_vex, (1,))
    with pytest.raises(Refused, match="changes an argument"):
        planner.argument_site(str(exe), at["clobbers"], "clobbers", no_vex, (0,))
    # a site others branch past, or into, is refused as for counting
    with pytest.raises(Refused, match="lands at inner\\+0x3"):
        planner.argument_site(str(exe), at["inner"], "inner", no_vex, (0,))


@needs_gcc
def test_a_jump_that_wraps_round_the_address_space_is_no_branch_into_the_file(tmp_path):
    """libcrypto has bytes that decode as a jump 2 GiB back from near its start: the target
    wraps round to 0xffffffff8....... (no int64), which must not break the file's table."""
    from tracer.host import branches
    src = tmp_path / "wild.c"
    src.write_text('__asm__(".text\\n.globl wild\\nwild: .byte 0xe9, 0, 0, 0, 0x80\\n ret\\n");\n'
                   "int main(void) { return 0; }\n")
    exe = gcc(tmp_path, src, "wild")
    assert branches.entering(str(exe), 0, 1 << 62) is not None


def test_entries_of_an_unreadable_file_are_unknown_never_none(tmp_path):
    from tracer.host import branches
    junk = tmp_path / "junk"
    junk.write_bytes(b"not an ELF file")
    assert branches.entering(str(junk), 0, 100) is None
    assert branches.entering(str(tmp_path / "missing"), 0, 100) is None
