"""Fork and exit handlers: what pthread_atfork, atexit, on_exit and __cxa_atexit registered
with glibc (tracer.host.handlers reads both tables from the process's memory). No limit binds:
the danger is a handler its library's unload left behind, which the next fork or exit runs in
code that is gone or has moved (httpd's segfault in fork after a graceful restart with
libcap-ng's atfork handler). One such handler makes the process critical at once.

What grows is the registering library and the handler's kind: "libfoo.so (fork)". Read only
(keytrace scan --resource handlers, and watch at each reload cycle): glibc drops a library's
handlers at dlclose by DSO handle, many at a time, so they are no acquire/release pair."""
from __future__ import annotations

from collections import Counter

from .. import resource
from ..host import handlers, tables


def _owner(h, library_at) -> str:
    """"/usr/lib/libfoo.so (fork)"; a handler whose code is unmapped is named by the library
    instance traced there (watch), else by its address."""
    where = h.library
    if where is None:
        where = (library_at(h.address) if library_at else None) or f"unmapped {h.address:#x}"
    return f"{where} ({h.kind})"


def census(pid: int, cache: dict) -> resource.Census:
    found = handlers.read(pid, tables.maps(pid, cache), cache)
    gone = handlers.orphaned(found)
    named = {h: _owner(h, cache.get("library_at")) for h in set(found)}
    owners = Counter(named[h] for h in found)
    return resource.Census(len(found), None, None, "none", owners,
                           orphaned=sum(gone),
                           orphans=Counter(named[h] for h, g in zip(found, gone) if g))


HANDLERS = resource.register(resource.Resource(
    name="handlers", census=census, orphan_critical=True,
    words={"unit": "handler", "units": "handlers", "owner": "registering library",
           "orphaned_why": "left behind by an unloaded instance of its library, run by the "
                           "next fork or exit"}))
