"""Static TLS: the block glibc sets aside at start-up for initial-exec TLS, which a dlopened
module built with DF_STATIC_TLS takes its share of; when the surplus left is too small, dlopen
fails with "cannot allocate memory in static TLS block" (dmlc/xgboost#8488, NVIDIA/DALI#5519,
jemalloc/jemalloc#937). glibc gives a closed module's block back only when it was the last one
placed, so reloads that close modules in another order than the reverse of their loads use the
surplus up, one block each (tracer.host.tls reads it).

In use, in bytes, is the end of the farthest block of a live module: a lower bound (a block
kept above every live one is not seen until the next load lands above it), so rows say
`estimate`. Between reloads, with the modules loaded again, it counts every kept block below
them. What grows is a module (its block's bytes), or the blocks no loaded module holds (kept
blocks and alignment). Read only (keytrace scan --resource tls, and watch at each reload cycle)."""
from __future__ import annotations

from collections import Counter

from .. import resource
from ..host import tables, tls

UNHELD = "(kept blocks of unloaded modules, alignment)"


def census(pid: int, cache: dict) -> resource.Census:
    t = tls.read(pid, tables.maps(pid, cache), cache)
    # (a module named as the process sees it, opened through its root: one path may be two
    # files in two containers; block_size keeps each file's answer by its identity)
    owners = Counter({module: tls.block_size(f"/proc/{pid}/root{module}")
                      for module in t.modules})
    unheld = t.used - sum(owners.values())
    if unheld > 0:
        owners[UNHELD] = unheld
    return resource.Census(t.used, t.limit, t.limit - t.used, "static TLS block", +owners,
                           estimate=True)


TLS = resource.register(resource.Resource(
    name="tls", census=census, estimate=True,
    words={"unit": "byte", "units": "bytes", "owner": "module",
           "full": "cannot allocate memory in static TLS block"}))
