"""Naming addresses in ELF files: symbol tables, separate debug files, stripped files."""
import shutil
import subprocess

from tracer.host.elf import elf_info


def test_symbols_come_back_from_a_debuglink_file(bins, tmp_path):
    lib = tmp_path / "libb.so"
    shutil.copy(bins["libb"], lib)
    (tmp_path / ".debug").mkdir()
    debug = tmp_path / ".debug" / "libb.so.debug"
    subprocess.run(["objcopy", "--only-keep-debug", str(lib), str(debug)], check=True)
    subprocess.run(["strip", "--strip-all", str(lib)], check=True)
    subprocess.run(["objcopy", f"--add-gnu-debuglink={debug}", str(lib)], check=True)
    init = elf_info(bins["libb"]).address_of("init")
    info = elf_info(str(lib))
    assert info.debug_file == str(debug)
    assert info.symbol(init + 3) == ("init", 3)


def test_a_stripped_file_has_only_its_exports(bins):
    info = elf_info(bins["libb_stripped"])
    assert info.address_of("init") is None  # static: gone with .symtab
    assert info.address_of("keytrace_status") is not None  # exported: still in .dynsym
    assert info.debug_file is None


def test_unreadable_or_not_elf_is_none(tmp_path):
    p = tmp_path / "x.so"
    p.write_bytes(b"not an elf")
    assert elf_info(str(p)) is None and elf_info(str(tmp_path / "missing.so")) is None
