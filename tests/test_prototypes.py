"""Library-call prototypes: the libc table, lookups by symbol name, ltrace-style formatting of
raw register values, and prototypes read from DWARF. No BPF."""
import shutil
import subprocess

import pytest

from tracer.host import prototypes as P
from tracer.host.prototypes import (Arg, Prototype, dwarf_prototype, errno_name, format_call,
                                    format_return, format_value, is_error, json_value, lookup,
                                    string_args)

REQUIRED = """strlen strcmp strncmp strcpy strncpy strcat strchr strrchr strstr strdup strndup memcpy
memmove memset memcmp memchr printf fprintf sprintf snprintf puts fputs fopen fclose fread fwrite
fflush fgets getline open open64 openat openat64 close read write pread64 pwrite64 lseek stat fstat
lstat newfstatat access unlink rename mkdir rmdir chdir dup dup2 pipe pipe2 fcntl ioctl malloc
calloc realloc free mmap munmap mprotect posix_memalign aligned_alloc fork vfork execve execvp
waitpid exit _exit getpid getppid kill raise signal sigaction getenv setenv unsetenv time
gettimeofday clock_gettime nanosleep usleep sleep socket connect bind listen accept accept4 send
recv sendto recvfrom setsockopt getsockopt shutdown getaddrinfo freeaddrinfo dlopen dlclose dlsym
pthread_create pthread_join pthread_mutex_lock pthread_mutex_unlock pthread_key_create
pthread_key_delete pthread_getspecific pthread_setspecific pthread_once atoi atol strtol strtoul
qsort abort""".split()
KINDS = {"int", "long", "uint", "ulong", "ptr", "str", "fd", "buf", "cbuf"}


# --- the table ---

def test_every_table_line_parses_once_and_the_required_functions_are_there():
    lines = P._TABLE.strip().splitlines()
    names = [P.parse(line.split(None, 1)[1]).name for line in lines]
    assert len(names) == len(set(names)) == len(P.PROTOTYPES) >= 120
    assert sorted(set(REQUIRED) - set(P.PROTOTYPES)) == []
    for proto in P.PROTOTYPES.values():
        assert proto.ret in KINDS | {"void"} and proto.errno_on in (None, "-1", "null")
        assert all(a.kind in KINDS for a in proto.args), proto


def test_declarations_parse_to_kinds():
    assert P.PROTOTYPES["read"] == Prototype(
        "read", "long", (Arg("fd", "fd"), Arg("buf", "buf"), Arg("count", "ulong")), "-1")
    assert [a.kind for a in P.PROTOTYPES["mmap"].args] == ["ptr", "ulong", "int", "int", "fd", "long"]
    assert P.PROTOTYPES["mmap"].ret == "ptr" and P.PROTOTYPES["mmap"].errno_on == "-1"
    assert P.PROTOTYPES["malloc"].errno_on == "null" and P.PROTOTYPES["fopen"].errno_on == "null"
    assert P.PROTOTYPES["strlen"].errno_on is None and P.PROTOTYPES["strlen"].ret == "ulong"
    assert P.PROTOTYPES["sleep"].ret == "uint" and P.PROTOTYPES["getpid"].args == ()
    # A char * to fill is a pointer, a string read on entry is a string, a returned char * is
    # the string returned; `void *buf` beside its size is a buffer: filled by the call (read
    # on return) or, const, given to it (read on entry).
    strcpy = P.PROTOTYPES["strcpy"]
    assert [a.kind for a in strcpy.args] == ["ptr", "str"] and strcpy.ret == "str"
    assert P.PROTOTYPES["write"].args[1] == Arg("buf", "cbuf")
    assert P.PROTOTYPES["getenv"].ret == "str" and P.PROTOTYPES["malloc"].ret == "ptr"
    assert [a.kind for a in P.PROTOTYPES["execve"].args] == ["str", "ptr", "ptr"]
    # Function pointers and arrays: pointers, named.
    assert P.PROTOTYPES["qsort"].args[3] == Arg("compar", "ptr")
    assert P.PROTOTYPES["pthread_create"].args[2] == Arg("start_routine", "ptr")
    assert P.PROTOTYPES["pipe"].args == (Arg("pipefd", "ptr"),)


def test_variadic_arguments_stop_at_the_ellipsis():
    printf, openat = P.PROTOTYPES["printf"], P.PROTOTYPES["openat"]
    assert printf.args == (Arg("format", "str"),) and printf.variadic
    assert [a.name for a in openat.args] == ["dirfd", "pathname", "flags"] and openat.variadic
    assert not P.PROTOTYPES["read"].variadic


def test_a_bad_declaration_is_refused():
    with pytest.raises(ValueError):
        P.parse("int f(int)")  # unnamed argument
    with pytest.raises(KeyError):
        P.parse("float f(int x)")  # a type the table does not know


# --- lookup ---

@pytest.mark.parametrize("name,found", [
    ("open64@GLIBC_2.2.5", "open64"), ("open64@@GLIBC_2.2.5", "open64"), ("__open64", "open64"),
    ("__libc_malloc", "malloc"), ("__close", "close"), ("_IO_puts", "puts"),
    ("__GI___close", "close"), ("fopen64", "fopen"), ("lseek64@GLIBC_2.2.5", "lseek"),
    ("_exit", "_exit"), ("__printf_chk", "__printf_chk"), ("pread64", "pread64"),
])
def test_lookup_falls_back_through_versions_and_aliases(name, found):
    assert lookup(name).name == found


@pytest.mark.parametrize("name", ["my_function", "__my_function@V1", "", "__", "64"])
def test_lookup_of_unknown_names_is_none(name):
    assert lookup(name) is None


def test_string_args_are_the_first_two_register_strings():
    assert string_args(lookup("open")) == [0]
    assert string_args(lookup("openat")) == [1]
    assert string_args(lookup("rename")) == [0, 1]
    assert string_args(lookup("read")) == [1]  # the buffer it fills
    assert P.slots(lookup("read")) == [P.Slot(1, P.BYTES_OUT)]
    assert P.slots(lookup("write")) == [P.Slot(1, P.BYTES_IN, 2)]  # as many bytes as count
    assert P.slots(lookup("getenv")) == [P.Slot(0, P.STR), P.Slot(-1, P.RET_STR)]
    assert P.slots(lookup("strcmp")) == [P.Slot(0, P.STR), P.Slot(1, P.STR)]  # no slot left
    assert string_args(None) == []
    many = Prototype("f", "int", tuple(Arg(f"s{i}", "str") for i in range(8)))
    assert string_args(many) == [0, 1] and P.MAX_STRINGS == 2
    late = Prototype("g", "int", tuple(Arg(f"a{i}", "int") for i in range(6)) + (Arg("s", "str"),))
    assert string_args(late) == []  # the 7th argument is on the stack: not read


# --- formatting ---

def test_integers_by_kind():
    assert format_value("int", 0xFFFFFFFF, None, 32) == "-1"
    assert format_value("int", 0xDEADBEEF_FFFFFFFE, None, 32) == "-2"  # upper half ignored
    assert format_value("fd", 3, None, 32) == "3"
    assert format_value("long", (1 << 64) - 5, None, 32) == "-5"
    assert format_value("long", 0xFFFFFFFF, None, 32) == "4294967295"
    assert format_value("ulong", (1 << 64) - 1, None, 32) == "18446744073709551615"
    assert format_value("ulong", 4096, None, 32) == "4096"
    assert format_value("uint", 0x1_00000007, None, 32) == "7"
    assert format_value("int", -1, None, 32) == "-1"  # a Python negative works too


def test_pointers_and_null():
    assert format_value("ptr", 0x7FFD12345678, None, 32) == "0x7ffd12345678"
    assert format_value("ptr", 0, None, 32) == "NULL"
    assert format_value("str", 0, b"", 32) == "NULL"
    assert format_value("str", 0x5555DEAD, None, 32) == "0x5555dead"  # not read: the pointer
    assert format_value("void", 1234, None, 32) == ""


def test_strings_escape_and_truncate():
    assert format_value("str", 0x1000, b"hello world", 5) == '"hello"...'
    assert format_value("str", 0x1000, b"hello", 5) == '"hello"'
    assert format_value("str", 0x1000, b"hello\0junk", 32) == '"hello"'
    assert format_value("str", 0x1000, b'a\n\t"\\\x01\xff', 32) == r'"a\n\t\"\\\x01\xff"'
    assert format_value("str", 0x1000, b"", 32) == '""'
    # The read stopped at its capture length: the string goes on.
    assert format_value("str", 0x1000, b"abc", 32, cut=True) == '"abc"...'


def test_format_call_known_and_unknown():
    args = [0x1234, 0xFFFFFFFF_FFFFFF9C, 0x42, 0x1B6, 0, 0]
    assert format_call(lookup("openat"), args, {1: b"/etc/passwd"}, 32) == ["4660", '"/etc/passwd"', "66"]
    assert format_call(lookup("openat"), [0xFFFFFF9C, 0x7F00, 0], {}, 32) == ["-100", "0x7f00", "0"]
    assert format_call(lookup("read"), [3, 0x7FFD0000, 4096], {}, 32) == ["3", "0x7ffd0000", "4096"]
    assert format_call(lookup("write"), [1], {}, 32) == ["1", "?", "?"]
    assert format_call(lookup("getpid"), args, {}, 32) == []
    assert format_call(lookup("rename"), [1, 2], {0: b"a long name", 1: b"b"}, 4, cut={1}) == \
        ['"a lo"...', '"b"...']
    assert format_call(None, [1, 0, 0x7FFF, 4, 5, 6, 7], {}, 32) == \
        ["0x1", "0x0", "0x7fff", "0x4", "0x5", "0x6"]


def test_errno_names():
    assert errno_name(2) == "ENOENT"
    assert errno_name(13) == "EACCES"
    assert errno_name(99999) == "E???(99999)"


def test_is_error():
    assert is_error(lookup("open"), 0xFFFFFFFF)  # int -1, as rax holds it
    assert is_error(lookup("open"), (1 << 64) - 1)
    assert not is_error(lookup("open"), 3)
    assert not is_error(lookup("open"), 0xFFFFFFFE)
    assert is_error(lookup("read"), (1 << 64) - 1)
    assert not is_error(lookup("read"), 0xFFFFFFFF)  # ssize_t: 4294967295 bytes read
    assert is_error(lookup("fopen"), 0) and not is_error(lookup("fopen"), 0x5555AAA0)
    assert is_error(lookup("mmap"), (1 << 64) - 1) and not is_error(lookup("mmap"), 0)
    assert not is_error(lookup("strcmp"), 0xFFFFFFFF)  # -1 is an answer, not a failure
    assert not is_error(lookup("getenv"), 0)
    assert not is_error(None, 0)


def test_format_return():
    assert format_return(lookup("open"), 3) == "3"
    assert format_return(lookup("open"), 0xFFFFFFFF) == "-1"
    assert format_return(lookup("open"), 0xFFFFFFFF, errno=2) == "-1 ENOENT (No such file or directory)"
    assert format_return(lookup("open"), 3, errno=2) == "3"  # no failure: errno is stale
    assert format_return(lookup("fopen"), 0, errno=13) == "NULL EACCES (Permission denied)"
    assert format_return(lookup("fopen"), 0x55550000) == "0x55550000"
    assert format_return(lookup("mmap"), (1 << 64) - 1, errno=12) == "-1 ENOMEM (Cannot allocate memory)"
    assert format_return(lookup("strlen"), 11) == "11"
    assert format_return(lookup("strcmp"), 0xFFFFFFFF) == "-1"
    assert format_return(lookup("free"), 0x1234) == ""
    assert format_return(lookup("getenv"), 0) == "NULL"
    assert format_return(None, 0xFFFFFFFF) == "0xffffffff"


def test_json_values():
    assert json_value("int", 0xFFFFFFFF, None) == -1
    assert json_value("fd", 7, None) == 7
    assert json_value("ulong", (1 << 64) - 1, None) == (1 << 64) - 1
    assert json_value("long", (1 << 64) - 2, None) == -2
    assert json_value("ptr", 0x7FFD0010, None) == "0x7ffd0010"
    assert json_value("ptr", 0, None) is None
    assert json_value("str", 0x1000, b"caf\xc3\xa9 \xff") == "caf\u00e9 \\xff"
    assert json_value("str", 0x1000, None) == "0x1000"
    assert json_value("str", 0, None) is None
    assert json_value("void", 5, None) is None
    assert json_value("mystery", 255, None) == "0xff"


# --- DWARF ---

C_SOURCE = r"""
#include <stdarg.h>
typedef unsigned long my_size;
typedef const char *name_t;
enum color { RED, GREEN };
int greet(const char *who, long n, void *p) { return (int)n + (who != 0) + (p != 0); }
my_size sized(my_size n, enum color c, unsigned char *bytes, char *buf, int fd, name_t nm)
{ return n + c + (bytes != 0) + (buf != 0) + fd + (nm != 0); }
int say(const char *fmt, ...) { return fmt[0]; }
double half(double x, int y) { return x / 2 + y; }
void nothing(void) {}
"""


def _build(tmp_path, name, *flags):
    src = tmp_path / "greet.c"
    src.write_text(C_SOURCE)
    out = tmp_path / name
    subprocess.run(["gcc", "-shared", "-fPIC", "-O0", *flags, "-o", str(out), str(src)], check=True)
    return str(out)


@pytest.fixture(scope="module")
def dwarf_lib(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    return _build(tmp_path_factory.mktemp("dwarf"), "libgreet.so", "-g")


def test_dwarf_prototype_of_greet(dwarf_lib):
    proto = dwarf_prototype(dwarf_lib, "greet")
    assert proto == Prototype("greet", "int", (Arg("who", "str"), Arg("n", "long"), Arg("p", "ptr")))
    assert string_args(proto) == [0]
    assert dwarf_prototype(dwarf_lib, "greet") is proto  # kept


def test_dwarf_follows_typedefs_enums_and_pointers(dwarf_lib):
    proto = dwarf_prototype(dwarf_lib, "sized")
    assert proto.ret == "ulong"
    assert [(a.name, a.kind) for a in proto.args] == [
        ("n", "ulong"), ("c", "int"), ("bytes", "ptr"), ("buf", "str"), ("fd", "fd"), ("nm", "str")]
    say = dwarf_prototype(dwarf_lib, "say")
    assert say.args == (Arg("fmt", "str"),) and say.variadic
    assert dwarf_prototype(dwarf_lib, "nothing") == Prototype("nothing", "void", ())


def test_dwarf_gives_up_where_registers_would_not_match(dwarf_lib):
    assert dwarf_prototype(dwarf_lib, "half") is None  # a double is not in rdi
    assert dwarf_prototype(dwarf_lib, "no_such_function") is None


def test_no_dwarf_is_none(tmp_path, dwarf_lib):
    plain = _build(tmp_path, "libplain.so")
    assert dwarf_prototype(plain, "greet") is None
    assert dwarf_prototype(str(tmp_path / "missing.so"), "greet") is None
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not an ELF file at all")
    assert dwarf_prototype(str(junk), "greet") is None


def test_dwarf_from_a_debuglink_file(tmp_path, dwarf_lib):
    lib = tmp_path / "libgreet.so"
    shutil.copy(dwarf_lib, lib)
    (tmp_path / ".debug").mkdir()
    debug = tmp_path / ".debug" / "libgreet.so.debug"
    subprocess.run(["objcopy", "--only-keep-debug", str(lib), str(debug)], check=True)
    subprocess.run(["strip", "--strip-all", str(lib)], check=True)
    subprocess.run(["objcopy", f"--add-gnu-debuglink={debug}", str(lib)], check=True)
    proto = dwarf_prototype(str(lib), "greet")
    assert proto is not None and [a.kind for a in proto.args] == ["str", "long", "ptr"]
