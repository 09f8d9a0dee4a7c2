"""What `keytrace calls` knows of a library function's arguments: a table of libc prototypes,
the prototype DWARF gives where a file has it, and ltrace-style formatting of the raw register
values the BPF side captures (x86-64: the first 6 integer arguments, and rax on return).

Argument kinds: "int" (signed 32), "long" (signed 64), "uint"/"ulong" (unsigned 32/64), "ptr"
(hex, NULL), "str" (a NUL-terminated string read on entry; as a return kind, the string
returned, read on return), "cbuf" (`const void *buf`: bytes read on entry, as many as the next
argument says), "buf" (`void *buf`: bytes the call filled, read on return, as many as it
returned), "fd" (an int naming a file descriptor), "void" (returns only).
"""
from __future__ import annotations

import errno as _errno
import os
import re
from dataclasses import dataclass
from typing import Collection, Optional

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from .elf import FileCache, _debug_file, defined_symbols

MAX_STRINGS = 2     # strings and buffers the BPF side reads per call (its slots)
REGISTER_ARGS = 6   # rdi, rsi, rdx, rcx, r8, r9
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Arg:
    name: str
    kind: str


@dataclass(frozen=True)
class Prototype:
    name: str
    ret: str
    args: tuple
    errno_on: Optional[str] = None  # "-1": -1 (MAP_FAILED, SIG_ERR) sets errno; "null": NULL does
    variadic: bool = False          # args stop at the "...": the rest is not typed


# One declaration a line, after its errno column ("-1", "null" or "."). The table's `const` is
# what matters, not the ABI: `const char *` is a string read on entry (so strcat's dest is one),
# a plain `char *` is a buffer the call fills, shown as a pointer.
_TABLE = """
.    size_t strlen(const char *s)
.    int strcmp(const char *s1, const char *s2)
.    int strncmp(const char *s1, const char *s2, size_t n)
.    int strcasecmp(const char *s1, const char *s2)
.    char *strcpy(char *dest, const char *src)
.    char *strncpy(char *dest, const char *src, size_t n)
.    char *strcat(const char *dest, const char *src)
.    char *strncat(const char *dest, const char *src, size_t n)
.    char *strchr(const char *s, int c)
.    char *strrchr(const char *s, int c)
.    char *strstr(const char *haystack, const char *needle)
null char *strdup(const char *s)
null char *strndup(const char *s, size_t n)
.    char *strerror(int errnum)
.    void *memcpy(void *dest, const void *src, size_t n)
.    void *memmove(void *dest, const void *src, size_t n)
.    void *memset(void *s, int c, size_t n)
.    int memcmp(const void *s1, const void *s2, size_t n)
.    void *memchr(const void *s, int c, size_t n)
.    int printf(const char *format, ...)
.    int fprintf(FILE *stream, const char *format, ...)
.    int sprintf(char *str, const char *format, ...)
.    int snprintf(char *str, size_t size, const char *format, ...)
.    int puts(const char *s)
.    int fputs(const char *s, FILE *stream)
null FILE *fopen(const char *pathname, const char *mode)
-1   int fclose(FILE *stream)
.    size_t fread(void *ptr, size_t size, size_t nmemb, FILE *stream)
.    size_t fwrite(const void *ptr, size_t size, size_t nmemb, FILE *stream)
-1   int fflush(FILE *stream)
.    char *fgets(char *s, int size, FILE *stream)
-1   ssize_t getline(char **lineptr, size_t *n, FILE *stream)
-1   int open(const char *pathname, int flags, ...)
-1   int open64(const char *pathname, int flags, ...)
-1   int openat(int dirfd, const char *pathname, int flags, ...)
-1   int openat64(int dirfd, const char *pathname, int flags, ...)
-1   int close(int fd)
-1   ssize_t read(int fd, void *buf, size_t count)
-1   ssize_t write(int fd, const void *buf, size_t count)
-1   ssize_t pread(int fd, void *buf, size_t count, off_t offset)
-1   ssize_t pread64(int fd, void *buf, size_t count, off_t offset)
-1   ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset)
-1   ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset)
-1   off_t lseek(int fd, off_t offset, int whence)
-1   int stat(const char *pathname, struct stat *statbuf)
-1   int fstat(int fd, struct stat *statbuf)
-1   int lstat(const char *pathname, struct stat *statbuf)
-1   int fstatat(int dirfd, const char *pathname, struct stat *statbuf, int flags)
-1   int newfstatat(int dirfd, const char *pathname, struct stat *statbuf, int flags)
-1   int __xstat(int ver, const char *pathname, struct stat *statbuf)
-1   int __fxstat(int ver, int fd, struct stat *statbuf)
-1   int __lxstat(int ver, const char *pathname, struct stat *statbuf)
-1   int access(const char *pathname, int mode)
-1   int unlink(const char *pathname)
-1   int rename(const char *oldpath, const char *newpath)
-1   int mkdir(const char *pathname, mode_t mode)
-1   int rmdir(const char *pathname)
-1   int chdir(const char *path)
null char *getcwd(char *buf, size_t size)
-1   int dup(int oldfd)
-1   int dup2(int oldfd, int newfd)
-1   int pipe(int pipefd[2])
-1   int pipe2(int pipefd[2], int flags)
-1   int fcntl(int fd, int cmd, ...)
-1   int ioctl(int fd, unsigned long request, ...)
null void *malloc(size_t size)
null void *calloc(size_t nmemb, size_t size)
null void *realloc(void *ptr, size_t size)
.    void free(void *ptr)
-1   void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
-1   int munmap(void *addr, size_t length)
-1   int mprotect(void *addr, size_t len, int prot)
.    int posix_memalign(void **memptr, size_t alignment, size_t size)
null void *aligned_alloc(size_t alignment, size_t size)
-1   pid_t fork(void)
-1   pid_t vfork(void)
-1   int execve(const char *pathname, char *const argv[], char *const envp[])
-1   int execvp(const char *file, char *const argv[])
-1   pid_t waitpid(pid_t pid, int *wstatus, int options)
.    void exit(int status)
.    void _exit(int status)
.    pid_t getpid(void)
.    pid_t getppid(void)
-1   int kill(pid_t pid, int sig)
.    int raise(int sig)
-1   sighandler_t signal(int signum, sighandler_t handler)
-1   int sigaction(int signum, const struct sigaction *act, struct sigaction *oldact)
.    char *getenv(const char *name)
-1   int setenv(const char *name, const char *value, int overwrite)
-1   int unsetenv(const char *name)
-1   time_t time(time_t *tloc)
-1   int gettimeofday(struct timeval *tv, void *tz)
-1   int clock_gettime(clockid_t clockid, struct timespec *tp)
-1   int nanosleep(const struct timespec *req, struct timespec *rem)
-1   int usleep(useconds_t usec)
.    unsigned int sleep(unsigned int seconds)
-1   int socket(int domain, int type, int protocol)
-1   int connect(int sockfd, const struct sockaddr *addr, socklen_t addrlen)
-1   int bind(int sockfd, const struct sockaddr *addr, socklen_t addrlen)
-1   int listen(int sockfd, int backlog)
-1   int accept(int sockfd, struct sockaddr *addr, socklen_t *addrlen)
-1   int accept4(int sockfd, struct sockaddr *addr, socklen_t *addrlen, int flags)
-1   ssize_t send(int sockfd, const void *buf, size_t len, int flags)
-1   ssize_t recv(int sockfd, void *buf, size_t len, int flags)
-1   ssize_t sendto(int sockfd, const void *buf, size_t len, int flags, const struct sockaddr *dest_addr, socklen_t addrlen)
-1   ssize_t recvfrom(int sockfd, void *buf, size_t len, int flags, struct sockaddr *src_addr, socklen_t *addrlen)
-1   int setsockopt(int sockfd, int level, int optname, const void *optval, socklen_t optlen)
-1   int getsockopt(int sockfd, int level, int optname, void *optval, socklen_t *optlen)
-1   int shutdown(int sockfd, int how)
.    int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res)
.    void freeaddrinfo(struct addrinfo *res)
.    void *dlopen(const char *filename, int flags)
.    int dlclose(void *handle)
.    void *dlsym(void *handle, const char *symbol)
.    int pthread_create(pthread_t *thread, const pthread_attr_t *attr, void *(*start_routine)(void *), void *arg)
.    int pthread_join(pthread_t thread, void **retval)
.    int pthread_mutex_lock(pthread_mutex_t *mutex)
.    int pthread_mutex_unlock(pthread_mutex_t *mutex)
.    int pthread_key_create(pthread_key_t *key, void (*destructor)(void *))
.    int pthread_key_delete(pthread_key_t key)
.    void *pthread_getspecific(pthread_key_t key)
.    int pthread_setspecific(pthread_key_t key, const void *value)
.    int pthread_once(pthread_once_t *once_control, void (*init_routine)(void))
.    int atoi(const char *nptr)
.    long atol(const char *nptr)
.    long strtol(const char *nptr, char **endptr, int base)
.    unsigned long strtoul(const char *nptr, char **endptr, int base)
.    void qsort(void *base, size_t nmemb, size_t size, int (*compar)(const void *, const void *))
.    void abort(void)
.    int __printf_chk(int flag, const char *format, ...)
.    int __fprintf_chk(FILE *stream, int flag, const char *format, ...)
.    int __sprintf_chk(char *s, int flag, size_t slen, const char *format, ...)
.    int __snprintf_chk(char *s, size_t maxlen, int flag, size_t slen, const char *format, ...)
.    void *__memcpy_chk(void *dest, const void *src, size_t len, size_t destlen)
.    void *__memmove_chk(void *dest, const void *src, size_t len, size_t destlen)
.    void *__memset_chk(void *s, int c, size_t len, size_t destlen)
.    char *__strcpy_chk(char *dest, const char *src, size_t destlen)
-1   ssize_t __read_chk(int fd, void *buf, size_t nbytes, size_t buflen)
"""

# Non-pointer C types by kind; any pointer is "ptr" (or "str").
_SCALARS = {
    "int": "int", "pid_t": "int", "clockid_t": "int", "long": "long", "long long": "long",
    "ssize_t": "long", "off_t": "long", "off64_t": "long", "time_t": "long",
    "unsigned": "uint", "unsigned int": "uint", "mode_t": "uint", "uid_t": "uint",
    "gid_t": "uint", "socklen_t": "uint", "useconds_t": "uint", "pthread_key_t": "uint",
    "size_t": "ulong", "unsigned long": "ulong", "unsigned long long": "ulong",
    "pthread_t": "ulong", "sighandler_t": "ptr", "void": "void",
}
_FD_NAMES = {"fd", "oldfd", "newfd", "sockfd", "dirfd"}
_QUALIFIERS = {"const", "volatile", "restrict", "__restrict", "struct", "union", "enum"}


def _kind(ctype: str, name: str = "") -> str:
    """The kind of a C type (text, name excluded), e.g. "const char *" -> "str"."""
    stars = ctype.count("*")
    words = [w for w in ctype.replace("*", " ").split() if w not in _QUALIFIERS]
    if stars == 0:
        kind = _SCALARS[" ".join(words)]  # KeyError: a type the table has no business with
        return "fd" if kind == "int" and name in _FD_NAMES else kind
    before_star = ctype.split("*", 1)[0].split()
    if stars == 1 and words == ["void"] and name == "buf":  # a buffer with its size beside it
        return "cbuf" if "const" in before_star else "buf"
    return "str" if stars == 1 and words == ["char"] and "const" in before_star else "ptr"


def _split_args(text: str) -> list:
    """Split at the commas outside parentheses (function-pointer arguments have their own)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    out.append(text[start:].strip())
    return [a for a in out if a and a != "void"]


def parse(decl: str, errno_on: Optional[str] = None) -> Prototype:
    """A Prototype from one C declaration, e.g. "ssize_t read(int fd, void *buf, size_t count)"."""
    head, _, rest = decl.partition("(")
    m = re.fullmatch(r"\s*(.*?)\s*(\w+)\s*", head)
    if not m or not rest.rstrip().endswith(")"):
        raise ValueError(f"not a declaration: {decl!r}")
    # a returned char * is a string (getenv, strdup, fgets, strerror...): read on return
    ret = "str" if re.fullmatch(r"(const\s+)?char\s*\*", m[1].strip()) else _kind(m[1])
    args, variadic = [], False
    for a in _split_args(rest.rstrip()[:-1]):
        if a == "...":
            variadic = True
            break
        if "(" in a:  # a function pointer: void (*name)(void *)
            args.append(Arg(re.search(r"\(\s*\*\s*(\w+)", a)[1], "ptr"))
            continue
        array = "[" in a
        am = re.fullmatch(r"(.*?)\s*(\w+)\s*(\[.*\])?", a)
        if not am or not am[1]:
            raise ValueError(f"unnamed or untyped argument {a!r} in {decl!r}")
        args.append(Arg(am[2], "ptr" if array else _kind(am[1], am[2])))
    return Prototype(m[2], ret, tuple(args), errno_on, variadic)


def _table() -> dict:
    protos = {}
    for line in _TABLE.strip().splitlines():
        mark, decl = line.split(None, 1)
        proto = parse(decl, None if mark == "." else mark)
        if proto.name in protos:
            raise ValueError(f"{proto.name} twice in the prototype table")
        protos[proto.name] = proto
    return protos


PROTOTYPES = _table()


def lookup(name: str) -> Optional[Prototype]:
    """The table's prototype of a symbol name: versions (open64@GLIBC_2.2.5) dropped, then glibc's
    internal aliases (__open64, __libc_malloc, _IO_puts, __GI___close) and a 64 suffix tried."""
    name = name.split("@", 1)[0]
    while name:
        for cand in (name, name[:-2] if name.endswith("64") else None):
            if cand in PROTOTYPES:
                return PROTOTYPES[cand]
        prefix = next((p for p in ("__libc_", "__GI_", "_IO_", "__") if name.startswith(p)), None)
        if prefix is None:
            return None
        name = name[len(prefix):]
    return None


# What a slot of a call record holds (the BPF side's KC_SLOT_*): a string argument read on entry
# (again on return if it could not be), bytes of an argument read on entry (as many as the
# length argument says), bytes of an argument read on return (as many as the call returned),
# the string returned.
STR, BYTES_IN, BYTES_OUT, RET_STR = 0, 1, 2, 3


@dataclass(frozen=True)
class Slot:
    arg: int         # the argument read (-1: the return value)
    mode: int        # STR, BYTES_IN, BYTES_OUT or RET_STR
    length: int = -1  # BYTES_IN: the argument that says how many bytes


def slots(proto: Optional[Prototype]) -> list:
    """What the BPF side reads for a call, at most MAX_STRINGS: string arguments, then buffers,
    then the string returned."""
    if proto is None:
        return []
    out = []
    for i, a in enumerate(proto.args[:REGISTER_ARGS]):
        if a.kind == "str":
            out.append(Slot(i, STR))
    for i, a in enumerate(proto.args[:REGISTER_ARGS]):
        if a.kind == "cbuf" and i + 1 < min(len(proto.args), REGISTER_ARGS):
            out.append(Slot(i, BYTES_IN, i + 1))
        elif a.kind == "buf":
            out.append(Slot(i, BYTES_OUT))
    if proto.ret == "str":
        out.append(Slot(-1, RET_STR))
    return out[:MAX_STRINGS]


def string_args(proto: Optional[Prototype]) -> list:
    """Indexes of the arguments whose text a call record carries (strings and buffers)."""
    return [s.arg for s in slots(proto) if s.arg >= 0]


# --- formatting ---------------------------------------------------------------------------

def _number(kind: str, raw: int) -> Optional[int]:
    """The integer a register holds, as the kind reads it; None for non-numeric kinds."""
    if kind in ("int", "fd"):
        raw &= 0xFFFFFFFF
        return raw - (1 << 32) if raw >> 31 else raw
    if kind == "long":
        raw &= _MASK64
        return raw - (1 << 64) if raw >> 63 else raw
    if kind == "uint":
        return raw & 0xFFFFFFFF
    if kind == "ulong":
        return raw & _MASK64
    return None


_ESCAPES = {0x0A: "\\n", 0x09: "\\t", 0x0D: "\\r", 0x22: '\\"', 0x5C: "\\\\"}


def _escape(data: bytes) -> str:
    return "".join(_ESCAPES.get(b) or (chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}")
                   for b in data)


def format_value(kind: str, raw: int, text: Optional[bytes] = None, strsize: int = 32,
                 cut: bool = False) -> str:
    """One value, ltrace-style. For "str", text is the bytes read (up to a NUL, which ends it)
    and cut says the read stopped at its capture length before the string ended; for "buf" and
    "cbuf", text is the bytes of the buffer (NULs and all)."""
    num = _number(kind, raw)
    if num is not None:
        return str(num)
    raw &= _MASK64
    if kind == "void":
        return ""
    if raw == 0 and kind in ("ptr", "str"):
        return "NULL"
    if kind in ("str", "buf", "cbuf") and text is not None:
        text = text.split(b"\0", 1)[0] if kind == "str" else text
        more = cut or len(text) > strsize
        return f'"{_escape(text[:max(strsize, 0)])}"' + ("..." if more else "")
    return f"{raw:#x}"


def format_call(proto: Optional[Prototype], args: list, strings: dict, strsize: int = 32,
                cut: Collection[int] = ()) -> list:
    """The arguments of one call as text, one string each. strings: arg index -> bytes read;
    cut: indexes whose read stopped at its capture length. Unknown functions: 6 hex registers."""
    if proto is None:
        return [f"{a & _MASK64:#x}" for a in args[:REGISTER_ARGS]]
    return [format_value(a.kind, args[i], strings.get(i), strsize, i in cut) if i < len(args)
            else "?" for i, a in enumerate(proto.args)]


def errno_name(n: int) -> str:
    return _errno.errorcode.get(n, f"E???({n})")


def is_error(proto: Optional[Prototype], raw: int) -> bool:
    """Did this return value report a failure that sets errno?"""
    if proto is None or proto.errno_on is None:
        return False
    if proto.errno_on == "null":
        return raw & _MASK64 == 0
    mask = 0xFFFFFFFF if proto.ret in ("int", "uint", "fd") else _MASK64
    return raw & mask == mask  # -1 in the width of the return type (MAP_FAILED, SIG_ERR too)


def format_return(proto: Optional[Prototype], raw: int, errno: Optional[int] = None,
                  text: Optional[bytes] = None, strsize: int = 32, cut: bool = False) -> str:
    """The return value, typed; with errno (when the BPF side read it) after a failure, strace's
    `-1 ENOENT (No such file or directory)`; text: a returned string as read."""
    if proto is None:
        return f"{raw & _MASK64:#x}"
    if is_error(proto, raw):
        shown = "-1" if proto.errno_on == "-1" else "NULL"
        return shown if errno is None else f"{shown} {errno_name(errno)} ({os.strerror(errno)})"
    return format_value(proto.ret, raw, text, strsize, cut)


def json_value(kind: str, raw: int, text: Optional[bytes] = None, strsize: Optional[int] = None):
    """One value for --json: a number, "0x..." for pointers, the text of strings and buffers
    (up to strsize bytes), None for NULL and void."""
    num = _number(kind, raw)
    if num is not None:
        return num
    raw &= _MASK64
    if kind == "void" or (raw == 0 and kind in ("ptr", "str", "buf", "cbuf")):
        return None
    if kind in ("str", "buf", "cbuf") and text is not None:
        text = text.split(b"\0", 1)[0] if kind == "str" else text
        return text[:strsize].decode("utf-8", "backslashreplace")
    return f"{raw:#x}"


# --- DWARF --------------------------------------------------------------------------------

_DW_SIGNED = {0x05, 0x06}          # DW_ATE_signed, signed_char
_DW_UNSIGNED = {0x02, 0x07, 0x08, 0x10}  # boolean, unsigned, unsigned_char, UTF
_DW_SEE_THROUGH = {"DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type",
                   "DW_TAG_restrict_type", "DW_TAG_atomic_type"}


def _type_of(die):
    """The DIE's DW_AT_type, through typedefs and qualifiers; None for void."""
    for _ in range(64):  # chains are short; the bound only guards against a broken file
        if die is None or "DW_AT_type" not in die.attributes:
            return None
        die = die.get_DIE_from_attribute("DW_AT_type")
        if die.tag not in _DW_SEE_THROUGH:
            return die
    raise ValueError("type chain too long")


def _dwarf_kind(t) -> Optional[str]:
    """The kind of a resolved type DIE; None when it is not one integer register (float,
    struct by value, __int128)."""
    if t is None:
        return "void"
    if t.tag == "DW_TAG_pointer_type":
        target = _type_of(t)
        is_char = (target is not None and target.tag == "DW_TAG_base_type"
                   and target.attributes.get("DW_AT_name") is not None
                   and target.attributes["DW_AT_name"].value == b"char")
        return "str" if is_char else "ptr"
    if t.tag in ("DW_TAG_reference_type", "DW_TAG_rvalue_reference_type"):
        return "ptr"
    if t.tag == "DW_TAG_enumeration_type":
        return "int"
    if t.tag == "DW_TAG_base_type":
        size, enc = t.attributes["DW_AT_byte_size"].value, t.attributes["DW_AT_encoding"].value
        if size <= 8 and enc in _DW_SIGNED:
            return "int" if size <= 4 else "long"
        if size <= 8 and enc in _DW_UNSIGNED:
            return "uint" if size <= 4 else "ulong"
    return None


def _has_debug_info(elf: ELFFile) -> bool:
    sec = elf.get_section_by_name(".debug_info") or elf.get_section_by_name(".zdebug_info")
    return sec is not None and sec["sh_type"] != "SHT_NOBITS" and sec["sh_size"] > 0


class _DwarfFile:
    """The DWARF of one ELF file (its own or its separate debug file's), read on first use;
    prototypes found (or not) are kept by name."""

    def __init__(self, path: str):
        self.path, self.source, self.info, self.found = path, None, None, {}
        try:
            with open(path, "rb") as fh:
                elf = ELFFile(fh)
                if _has_debug_info(elf):
                    self.source, debug = path, None
                else:
                    debug = _debug_file(elf, path)
            if debug is not None:
                with open(debug, "rb") as fh:
                    self.source = str(debug) if _has_debug_info(ELFFile(fh)) else None
        except (ELFError, ValueError):
            self.source = None

    def prototype(self, function: str) -> Optional[Prototype]:
        if function not in self.found:
            try:
                self.found[function] = self._read(function) if self.source else None
            except Exception:  # a DWARF form or layout pyelftools or we do not read: no answer
                self.found[function] = None
        return self.found[function]

    def _subprogram(self, function: str):
        """The function's DW_TAG_subprogram, a definition before a declaration."""
        with open(self.source, "rb") as fh:
            elf = ELFFile(fh)
            if self.info is None:  # pyelftools copies the sections: the file may close
                self.info = elf.get_dwarf_info()
            addr = defined_symbols(elf, [function]).get(function, {}).get("st_value")
        if addr is None and self.source != self.path:
            with open(self.path, "rb") as fh:
                addr = defined_symbols(ELFFile(fh), [function]).get(function, {}).get("st_value")
        aranges = self.info.get_aranges()
        if aranges is not None and aranges.entries:
            # The compile unit holding the address: one CU parsed, not all of libc's.
            offset = aranges.cu_offset_at_addr(addr) if addr is not None else None
            dies = self.info.get_CU_at(offset).iter_DIEs() if offset is not None else iter(())
        else:
            dies = (d for cu in self.info.iter_CUs() for d in cu.get_top_DIE().iter_children())
        want, best = function.encode(), None
        for die in dies:
            name = die.attributes.get("DW_AT_name")
            if die.tag == "DW_TAG_subprogram" and name is not None and name.value == want:
                if "DW_AT_declaration" not in die.attributes:
                    return die
                best = best or die
        return best

    def _read(self, function: str) -> Optional[Prototype]:
        sub = self._subprogram(function)
        if sub is None:
            return None
        args, variadic = [], False
        for child in sub.iter_children():
            if child.tag == "DW_TAG_unspecified_parameters":
                variadic = True
                break
            if child.tag != "DW_TAG_formal_parameter":
                continue
            kind = _dwarf_kind(_type_of(child))
            if kind is None:  # not in an integer register: later arguments shift, so no answer
                return None
            name = child.attributes.get("DW_AT_name")
            name = name.value.decode(errors="replace") if name else f"arg{len(args)}"
            args.append(Arg(name, "fd" if kind == "int" and name in _FD_NAMES else kind))
        ret = _dwarf_kind(_type_of(sub))
        # A float or struct return is not in rax: nothing to show. A returned string is not read.
        ret = "void" if ret is None else "ptr" if ret == "str" else ret
        table = lookup(function)
        return Prototype(function, ret, tuple(args), table.errno_on if table else None, variadic)


_DWARF = FileCache(_DwarfFile)


def dwarf_prototype(elf_path: str, function: str) -> Optional[Prototype]:
    """The prototype DWARF gives a function of an ELF file (or of its separate debug file),
    None without DWARF or without the function. errno_on is the table's, for a name it has."""
    try:
        dwarf = _DWARF.get(elf_path)[1]
        return dwarf.prototype(function) if dwarf is not None else None
    except Exception:
        return None
