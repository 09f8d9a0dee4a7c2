"""Pure: what the kernel does with a uprobe on an instruction (tracer.host.isa), and the
single-step check's own machine code (tracer.bpf.stepcheck), read back by a disassembler."""
from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from tracer.bpf import stepcheck
from tracer.host import isa


def test_isa_views_are_what_the_kernel_does():
    """Pure: the mirror of arch/x86/kernel/uprobes.c on instructions whose fate is known."""
    cases = {
        "62e27d487ac6": ("evex", "emulated", "jcc"),    # vpbroadcastb zmm16, esi (memset)
        "c5f877": ("vex", "emulated", "jcc"),           # vzeroupper: opcode 0x77 = ja
        "c5f1e8d8": ("vex", "emulated", "call"),        # vpsubsb: opcode 0xe8 = call
        "62e1fe486f06": ("evex", "refused", ""),        # vmovdqu64 load: 0x6f not in the table
        "4889f8": ("legacy", "stepped", "ip"),
        "4c8d0529ad1400": ("legacy", "stepped", "rip"),
        "53": ("legacy", "emulated", "push"),
        "4154": ("legacy", "emulated", "push"),
        "7231": ("legacy", "emulated", "jcc"),
        "0f84bf000000": ("legacy", "emulated", "jcc"),
        "f390": ("legacy", "emulated", "nop"),
        "66e900000000": ("legacy", "refused", ""),
        "f0480fb111": ("legacy", "refused", ""),
        "3e4889f8": ("legacy", "refused", ""),
        "c3": ("legacy", "stepped", "ret"),
        "ff2500000000": ("legacy", "stepped", "ret-rip"),
        "ff1500000000": ("legacy", "stepped", "call-rip"),
    }
    for code, (encoding, action, how) in cases.items():
        v = isa.view(bytes.fromhex(code))
        assert (v.encoding, v.action) == (encoding, action), (code, v)
        if action != "refused":
            assert v.how == how, (code, v)
    assert isa.view(bytes.fromhex("f3aa")).klass == "legacy/stepped+rep"
    assert isa.view(bytes.fromhex("9c")).klass == "legacy/stepped+pushf"
    assert isa.view(bytes.fromhex("0f05")).klass == "legacy/stepped+syscall"
    assert isa.view(bytes.fromhex("660f6f0500000000")).klass == "legacy/stepped-rip+vector"


def test_the_checks_harness_is_the_code_it_says():
    """The check's machine code, read back by a disassembler: loads, the site, stores."""
    md = Cs(CS_ARCH_X86, CS_MODE_64)
    blob, layout = stepcheck.assemble(stepcheck.CASES)
    for case, entry, site in zip(stepcheck.CASES, layout.entries, layout.sites):
        text = [f"{i.mnemonic} {i.op_str}".strip() for i in md.disasm(blob[entry:site], entry)]
        assert text[:7] == ["push rbx", "push rbp", "push r12", "push r13", "push r14",
                            "push r15", "mov r15, rdi"]
        assert "xrstor64 ptr [r15]" in text and "popfq" in text
        probed = next(md.disasm(blob[site:site + 16], site))
        alone = next(md.disasm(case.code, 0))  # rip-relative ones differ in displacement only
        assert (probed.mnemonic, probed.size) == (alone.mnemonic, alone.size), case.text
        assert isa.view(case.code).klass == isa.view(bytes(probed.bytes)).klass

