"""`keytrace calls -e PATTERN`: patterns resolved against the real files of this machine."""
import fnmatch
import os
import re
import subprocess
import sys
import time

import pytest

from tracer.errors import KeytraceError
from tracer.host import patterns, proc
from tracer.host.patterns import Target, ld_cache, parse_pattern, resolve

WORK = "int work(int x){return x+1;} int main(){return work(1);}\n"
# The same program, waiting when given an argument: a process whose main program is traced.
WAITING = ("#include <unistd.h>\nint work(int x){return x+1;}\n"
           "int main(int argc, char **argv){if (argc > 1) pause(); return work(1);}\n")


def nm(path: str, dynamic: bool = False) -> dict:
    """name -> address of the defined functions, as binutils' nm reads them."""
    out = subprocess.run(["nm", "--defined-only"] + (["-D"] if dynamic else []) + [path],
                         capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in "TtWiI":
            found.setdefault(parts[2].split("@")[0], int(parts[0], 16))
    return found


def same_file(a: str, b: str) -> bool:
    return os.path.samefile(a, b)


def compile_c(source: str, out, *flags) -> str:
    src = out.with_suffix(".c")
    src.write_text(source)
    subprocess.run(["gcc", "-O0", *flags, str(src), "-o", str(out)], check=True)
    return str(out)


def error_of(*args, **kwargs) -> str:
    with pytest.raises(KeytraceError) as info:
        resolve(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


LIBC = ld_cache().get("libc.so.6")
needs_glibc = pytest.mark.skipif(LIBC is None, reason="no x86-64 libc.so.6 in ld.so.cache")


# ---- ld.so.cache and libraries -----------------------------------------------------------

@needs_glibc
def test_ld_cache_holds_the_x86_64_entries_first_path_first():
    listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True,
                             check=True).stdout
    entries = re.findall(r"^\s*(\S+) \(([^)]*)\) => (\S+)$", listing, re.MULTILINE)
    first: dict = {}
    for name, flags, path in entries:
        if "x86-64" in flags.split(","):
            first.setdefault(name, path)
    assert ld_cache() == first and os.path.exists(ld_cache()["libc.so.6"])
    others = {name for name, flags, _ in entries if "x86-64" not in flags} - set(first)
    assert not others & set(ld_cache())


@needs_glibc
def test_libc_short_name_is_the_libc_of_ld_so_cache():
    # host-wide, "libc" is the system's libc.so.6, not musl's loader that the cache may list
    [t] = resolve(["libc:malloc"])
    assert same_file(t.path, LIBC)
    assert t.name == os.path.realpath(LIBC) and t.library == "libc.so.6"
    assert t.function == "malloc" and t.size > 0
    assert t.address == nm(LIBC, dynamic=True)["malloc"]


@needs_glibc
def test_a_bare_function_is_looked_up_in_libc():
    assert resolve(["malloc"]) == resolve(["libc:malloc"])


@needs_glibc
def test_a_function_glob_selects_several_sorted_by_name():
    found = resolve(["libc:str*cmp"])
    names = [t.function for t in found]
    assert {"strcmp", "strncmp", "strcasecmp"} <= set(names)
    assert all(fnmatch.fnmatchcase(n, "str*cmp") for n in names)
    assert names == sorted(names) and len(set(names)) == len(names)


@needs_glibc
def test_aliases_select_one_address_shown_by_the_name_asked_for():
    [malloc] = resolve(["libc:malloc"])
    [alias] = resolve(["libc:__libc_malloc"])
    assert alias.address == malloc.address and alias.function == "__libc_malloc"
    assert resolve(["libc:malloc", "libc:__libc_malloc", "malloc"]) == [malloc]
    # a name asked for is shown as asked; a glob shows the plainest name it matched
    assert [t.function for t in resolve(["strchr"])] == ["strchr"]
    assert {t.function for t in resolve(["libc:__libc_mallo?"])} == {"__libc_malloc"}
    assert "strchr" in {t.function for t in resolve(["libc:strc*"])}  # not its alias index


@needs_glibc
def test_a_glob_excludes_by_the_name_shown_an_exact_name_by_any_alias():
    shown = {t.function for t in resolve(["libc:m*", "!_*"])}
    assert "malloc" in shown and not any(n.startswith("_") for n in shown)  # __libc_malloc aside
    assert "malloc" not in {t.function for t in resolve(["libc:m*", "!__libc_malloc"])}


def test_version_suffixes_are_cut_and_each_version_is_selected(tmp_path):
    # f@V1 (old_f) and f@@V2 (new_f): two addresses, both shown as f.
    src = tmp_path / "v.c"
    src.write_text("int old_f(void){return 1;} int new_f(void){return 2;}\n"
                   '__asm__(".symver old_f,f@V1"); __asm__(".symver new_f,f@@V2");\n')
    (tmp_path / "v.map").write_text("V1 { global: f; local: *; };\nV2 { global: f; } V1;\n")
    lib = tmp_path / "libv.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O0", f"-Wl,--version-script={tmp_path}/v.map",
                    str(src), "-o", str(lib)], check=True)
    local = nm(str(lib))
    found = resolve([f"{lib}:f"])
    assert [t.function for t in found] == ["f", "f"]
    assert sorted(t.address for t in found) == sorted([local["old_f"], local["new_f"]])
    by_glob = resolve([f"{lib}:*_f"])  # the same two addresses, by the names the glob matched
    assert {t.address for t in by_glob} == {t.address for t in found}
    assert {t.function for t in by_glob} == {"old_f", "new_f"}
    # .symtab's f@V1 is f: a version is not given, and '@' is for MAIN
    assert "'V1' after '@' looks like a symbol version" in error_of([f"{lib}:f@V1"])


@needs_glibc
def test_exclusions_apply_after_inclusions():
    names = {t.function for t in resolve(["libc:str*cmp", "!strcmp"])}
    assert "strcmp" not in names and "strncmp" in names
    names = {t.function for t in resolve(["!libc:strn*", "libc:str*cmp"])}
    assert names and not any(n.startswith("strn") for n in names) and "strcmp" in names
    # An exclusion by an alias removes the address.
    names = {t.function for t in resolve(["libc:*alloc", "!__libc_malloc"])}
    assert "calloc" in names and "malloc" not in names


@needs_glibc
def test_soname_form():
    [t] = resolve(["libc.so.6:getpid"])
    assert t == resolve(["libc:getpid"])[0]


@needs_glibc
def test_path_form_and_the_same_file_by_another_path_once(tmp_path):
    [t] = resolve([f"{os.path.realpath(LIBC)}:getpid"])
    assert same_file(t.path, LIBC) and t.function == "getpid" and t.library == "libc.so.6"
    assert t.address == resolve(["getpid"])[0].address
    link = tmp_path / "libc-link.so.6"
    link.symlink_to(LIBC)
    assert len(resolve([f"{link}:getpid", "libc:getpid", "libc.so.6:getpid"])) == 1


def test_path_form_of_another_library():
    crypto = ld_cache().get("libcrypto.so.3") or ld_cache().get("libm.so.6")
    if crypto is None:
        pytest.skip("neither libcrypto.so.3 nor libm.so.6 in ld.so.cache")
    exported = nm(crypto, dynamic=True)
    func = "EVP_DigestInit" if "EVP_DigestInit" in exported else "cos"
    [t] = resolve([f"{crypto}:{func}"])
    assert same_file(t.path, crypto) and t.address == exported[func]
    assert t.library == os.path.basename(crypto)


@needs_glibc
def test_a_glob_over_library_names():
    found = resolve(["libc.so*:getpid"])
    assert "libc.so.6" in {t.library for t in found}
    # matched by soname or by file name (musl's libc.so is listed as ld-musl-x86_64.so.1)
    assert all(fnmatch.fnmatchcase(t.library, "libc.so*")
               or fnmatch.fnmatchcase(os.path.basename(t.name), "libc.so*") for t in found)


@needs_glibc
def test_the_files_a_process_maps():
    own = [path for _, _, _, path in proc.file_mappings(os.getpid())
           if os.path.basename(path).startswith("libc.so")]
    [t] = resolve(["libc:getpid"], pids=[os.getpid()])
    assert same_file(t.path, own[0]) and t.name == own[0]
    assert not t.path.startswith("/proc/")  # the same file here: its path outlives the process
    mapped = {os.stat(p)[1:3] for _, _, _, p in proc.file_mappings(os.getpid())}
    in_maps = resolve(["*:malloc"], pids=[os.getpid()])
    assert resolve(["libc:malloc"])[0] in in_maps
    assert all(os.stat(x.path)[1:3] in mapped for x in in_maps)  # only mapped files
    in_cache = resolve(["*:malloc"])
    if any(os.stat(x.path)[1:3] not in mapped for x in in_cache):  # libasan, libmemusage...
        assert len(in_maps) < len(in_cache)


def test_a_process_maps_libm_and_libz_under_their_file_names():
    import math  # noqa: F401  (libm: builtin or extension, whichever this python uses)
    import zlib  # noqa: F401
    maps = {os.path.basename(p): p for _, _, _, p in proc.file_mappings(os.getpid())}
    checked = 0
    for short, func, soname in (("libm", "cos", "libm.so.6"), ("libz", "inflate", "libz.so.1")):
        mapped = [p for name, p in maps.items() if name.startswith(f"{short}.so")]
        if mapped:  # libz.so.1.2.13 in the maps: still libz, shown by its soname
            [t] = resolve([f"{short}:{func}"], pids=[os.getpid()])
            assert t.name == mapped[0] and same_file(t.path, mapped[0])
            assert t.function == func and t.library == soname
            checked += 1
    if not checked:
        pytest.skip("this python maps neither libm nor libz")


@pytest.mark.parametrize("pie", [True, False], ids=["pie", "no-pie"])
def test_the_main_program_by_path_exe_or_name(tmp_path, pie, monkeypatch):
    prog = compile_c(WORK, tmp_path / "worker", "-fPIE" if pie else "-fno-pie",
                     "-pie" if pie else "-no-pie")
    expected = nm(prog)["work"]
    assert (expected < 0x400000) if pie else (expected >= 0x400000)  # no-pie: absolute vaddr
    [t] = resolve([f"{prog}:work"])
    assert t.address == expected and t.function == "work" and t.library == "worker"
    assert same_file(t.path, prog)
    assert resolve(["exe:work"], exe=prog) == [t]
    assert resolve(["worker:work"], exe=prog) == [t]
    assert resolve(["worker:work", "malloc"], exe=prog)[1] == t  # sorted: libc.so.6 < worker
    assert resolve([f"{tmp_path}/work*:work"]) == [t]  # worker.c matches too: not ELF, skipped
    monkeypatch.chdir(tmp_path)
    assert resolve(["./worker:work"]) == [t]


def test_the_main_program_of_a_running_process(tmp_path):
    prog = compile_c(WAITING, tmp_path / "waiter")
    child = subprocess.Popen([prog, "wait"])
    try:
        # /proc/PID/exe changes before execve maps the program: wait for the loader's work.
        deadline = time.time() + 10
        while time.time() < deadline and not any(
                "libc.so" in path for _, _, _, path in proc.file_mappings(child.pid)):
            time.sleep(0.01)
        [t] = resolve(["exe:work"], pids=[child.pid])
        assert same_file(t.path, prog) and t.name == prog and t.address == nm(prog)["work"]
        assert resolve(["waiter:work"], pids=[child.pid]) == [t]
    finally:
        child.kill()
        child.wait()


@needs_glibc
def test_libc_star_is_fast():
    patterns._FUNCTIONS.clear()
    ld_cache.cache_clear()
    start = time.perf_counter()
    found = resolve(["libc:*"], limit=100_000)
    assert time.perf_counter() - start < 1.0
    assert len(found) > 1000
    assert len({(t.path, t.address) for t in found}) == len(found)


# ---- errors ------------------------------------------------------------------------------

@needs_glibc
def test_an_unknown_library_suggests_close_sonames():
    message = error_of(["libc.so.7:malloc"])
    assert message.startswith("no library matches 'libc.so.7': did you mean ")
    assert "libc.so.6" in message
    assert error_of(["zzqqxxjj:malloc"]) == "no library matches 'zzqqxxjj' in ld.so.cache"


def test_a_misspelt_short_name_suggests_the_soname():
    if "libssl.so.3" not in ld_cache():
        pytest.skip("no libssl.so.3 in ld.so.cache")
    assert error_of(["libsssl:SSL_read"]).startswith(
        "no library matches 'libsssl': did you mean libssl.so.3")


@needs_glibc
def test_an_unknown_function_suggests_close_names():
    message = error_of(["libc:mallocc"])
    assert message.startswith("no function in libc.so.6 matches 'mallocc': did you mean malloc")
    assert error_of(["qqzzxxjjw"]) == "no function in libc.so.6 matches 'qqzzxxjjw'"


@needs_glibc
def test_a_pattern_whose_functions_are_all_excluded():
    message = error_of(["libc:strcmp", "libc:strn*", "!str*"])
    assert message == "every function matching 'libc:strcmp' is excluded (by '!str*')"


@needs_glibc
def test_the_limit_counts_what_is_left_after_exclusions():
    message = error_of(["libc:*"])
    assert "more than the limit of 1000" in message and "'libc:*'" in message
    assert "limit of 3" in error_of(["libc:str*cmp"], limit=3)
    kept = resolve(["libc:str*cmp", "!strn*", "!strv*", "!strcase*"], limit=3)
    assert [t.function for t in kept] == ["strcmp"]


@pytest.mark.parametrize("pattern, expected", [
    ("", "empty pattern ''"),
    ("!", "empty pattern '!'"),
    ("libc:", "pattern 'libc:' has an empty function after ':'"),
    (":malloc", "pattern ':malloc' has an empty library before ':'"),
    ("::", "pattern '::' is a C++ name as written: add -C"),
    ("libc:str[cmp", "bad function glob 'str[cmp' in pattern 'libc:str[cmp': '[' is not closed"),
    ("lib[c:malloc", "bad library glob 'lib[c'"),
    ("libc:mal loc", "pattern 'libc:mal loc' is a C++ name as written: add -C"),
    ("libc:mal/loc", "bad function glob 'mal/loc'"),
])
def test_malformed_patterns(pattern, expected):
    assert error_of([pattern]).startswith(expected)


def test_globs_that_parse():
    assert parse_pattern("!libc:str[!n]*") == patterns.Pattern("!libc:str[!n]*", "libc",
                                                               "str[!n]*", True)
    assert parse_pattern("[]x]") == patterns.Pattern("[]x]", None, "[]x]", False)
    assert parse_pattern("/a:b/libx.so:f").library == "/a:b/libx.so"
    # -C: a C++ name as written, '::' and spaces in it; a single ':' still ends the library
    assert parse_pattern("std::*", True) == patterns.Pattern("std::*", None, "std::*", False)
    assert parse_pattern("libstdc++:operator new*", True) == patterns.Pattern(
        "libstdc++:operator new*", "libstdc++", "operator new*", False)


def test_other_usage_errors(tmp_path):
    assert error_of(["!malloc"]).startswith("nothing to trace")
    assert error_of([]).startswith("nothing to trace")
    assert error_of(["exe:work"]).startswith("'exe' names the traced program")
    assert error_of(["/nonexistent/libfoo.so:foo"]) == "no such file: /nonexistent/libfoo.so"
    text = tmp_path / "notelf.so"
    text.write_text("not an ELF file")
    assert error_of([f"{text}:foo"]) == f"{text} is not an ELF file"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert error_of(["malloc"], pids=[dead.pid]) == f"no process {dead.pid}"


def test_target_is_a_frozen_value():
    t = Target("/p", "/p", "p", "f", 1, 2)
    with pytest.raises(AttributeError):
        t.address = 3  # type: ignore[misc]
