"""A user's own resource: any acquire/release pair of library functions, declared on the command
line as `LIB:ACQUIRE=WHERE/RELEASE=WHERE` (keytrace watch --pair, KeyTracer(pairs=...)).

LIB, ACQUIRE and RELEASE are found as `keytrace calls` finds its patterns (a library's name or
a glob, a function's name or a glob, IFUNCs, a process's own copy in its mount namespace).
WHERE says where the handle is: `ret` (the acquire's return value), `argN` (an argument, N from
0 to 5), or `*argN` (what an argument points at, read when the acquire returns); a release
takes its handle as `argN`. What success is, and how wide the handle is, comes from the
functions' prototypes where keytrace knows them (an int acquire that returns a descriptor
succeeds at >= 0, a pointer at non-NULL, a status at 0; a pthread_key_t is 32 bits); else a
pointer-sized handle, and success as a returned pointer or a zero status.

    libc:fopen=ret/fclose=arg0
    libc:timer_create=*arg2/timer_delete=arg0
    libsqlite3:sqlite3_open_v2=*arg1/sqlite3_close=arg0
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from .. import resource
from ..errors import UsageError
from ..host import prototypes

USAGE = ("a pair is LIB:ACQUIRE=WHERE/RELEASE=WHERE, WHERE one of ret, argN, *argN (N 0-5), "
         "e.g. 'libc:fopen=ret/fclose=arg0' or 'libc:timer_create=*arg2/timer_delete=arg0'")
_NAME = re.compile(r"[A-Za-z_*?\[][A-Za-z0-9_.*?\[\]!-]*")  # a name, or a glob as calls takes
_WHERE = re.compile(r"(ret|\*?arg(\d+))")
_ARGS = 6  # x86-64 passes six integer arguments in registers

# What an acquire's return says of its success (probes/pairs.bpf.c KP_OK_*).
OK_ZERO, OK_POSITIVE, OK_NONNEG, OK_ALWAYS = 0, 1, 2, 3


@dataclass(frozen=True)
class Pair:
    text: str
    library: str
    acquire: str
    acquire_where: str
    release: str
    release_where: str

    @property
    def name(self) -> str:
        return f"{self.acquire}/{self.release}"


def parse(text: str) -> Pair:
    """A --pair checked for form: UsageError, one line, when it is not one."""
    spec = text.strip()
    head, slash, rel = spec.rpartition("/")
    if not slash or "=" not in rel:
        raise UsageError(f"--pair {text!r} has no release after '/': {USAGE}")
    library, colon, acq = head.rpartition(":")
    if not colon or not library:
        library, acq = "libc", head
    if "=" not in acq or acq.startswith("="):
        raise UsageError(f"--pair {text!r} has no acquire before '/': {USAGE}")
    acquire, _, a_where = acq.partition("=")
    release, _, r_where = rel.partition("=")
    for name in (acquire, release):
        if not _NAME.fullmatch(name):
            raise UsageError(f"--pair {text!r}: {name!r} is not a function name: {USAGE}")
    for where, side in ((a_where, "acquire"), (r_where, "release")):
        m = _WHERE.fullmatch(where)
        if not m:
            raise UsageError(f"--pair {text!r}: the {side}'s handle {where!r} is none of ret, "
                             f"argN, *argN: {USAGE}")
        if m.group(2) is not None and int(m.group(2)) >= _ARGS:
            raise UsageError(f"--pair {text!r}: {where} is out of range: keytrace reads the six "
                             "register arguments, arg0 to arg5")
    if not r_where.startswith("arg"):
        raise UsageError(f"--pair {text!r}: a release takes its handle as an argument (argN), "
                         f"not {r_where!r}")
    if acquire == release:
        raise UsageError(f"--pair {text!r}: the acquire and the release are one function")
    return Pair(spec, library, acquire, a_where, release, r_where)


def declare(pair: Pair, limit: Optional[int] = None, **declared) -> resource.Resource:
    """The pair as a resource, registered: its handle's width and what success is come from the
    functions' prototypes (tracer.host.prototypes) where keytrace knows them. declared: the
    rest of a resource declared on top of a pair (a name, a reader, limit_of, words)."""
    acq, rel = prototypes.lookup(pair.acquire), prototypes.lookup(pair.release)
    rel_n = int(pair.release_where[3:])
    narrow = {"int", "uint", "fd"}
    if rel is not None and rel_n < len(rel.args):
        width = 4 if rel.args[rel_n].kind in narrow else 8
    elif pair.acquire_where == "ret" and acq is not None:
        width = 4 if acq.ret in narrow else 8
    else:
        width = 8
    if pair.acquire_where == "ret":
        ok_if = OK_NONNEG if acq is not None and acq.ret in ("int", "fd") else OK_POSITIVE
    else:
        ok_if = OK_ALWAYS if acq is not None and acq.ret == "void" else OK_ZERO
    fields = dict(
        name=pair.name, acquire=(pair.acquire,), release=(pair.release,),
        handle=pair.acquire_where, release_handle=pair.release_where,
        success={OK_ZERO: "zero", OK_POSITIVE: "positive", OK_NONNEG: "nonneg",
                 OK_ALWAYS: "always"}[ok_if],
        limit=limit, inherit_on_fork=True, keep_on_exec=False,
        extra={"library": pair.library, "width": width, "ok_if": ok_if, "spec": pair.text})
    return resource.register(resource.Resource(**{**fields, **declared}))
