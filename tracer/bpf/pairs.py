"""The pairs unit's programs: three small wrappers per declared pair (acquire entry, acquire
return, release entry) that pass the pair's resource id, where its handle is, how wide it is and
what success is as constants to the helpers of probes/pairs.bpf.c. Generic: a pair is known by
its declaration (tracer.resource.Resource) only."""
from __future__ import annotations

from typing import Iterable

from .loader import Unit

PAIRS = Unit("pairs")
_HANDLE = {"ret": 0, "arg": 1, "*arg": 2}  # KP_HANDLE_*


def _where(where: str) -> tuple:
    """(KP_HANDLE_* code, argument index or -1) of ret, argN or *argN."""
    if where == "ret":
        return _HANDLE["ret"], -1
    deref = where.startswith("*")
    return _HANDLE["*arg" if deref else "arg"], int(where.lstrip("*")[3:])


def names(index: int) -> tuple:
    """(acquire entry, acquire return, release entry) program names of the index-th pair."""
    return f"kp_enter_{index}", f"kp_return_{index}", f"kp_release_{index}"


def programs(pairs: Iterable) -> str:
    out = []
    for i, r in enumerate(pairs):
        how, argn = _where(r.handle)
        _, rel_n = _where(r.release_handle)
        width, ok_if = r.extra.get("width", 8), r.extra.get("ok_if", 0)
        enter, ret, release = names(i)
        out += [f"int {enter}(struct pt_regs *ctx) {{ return pair_enter(ctx, {r.id}, {argn}); }}",
                f"int {ret}(struct pt_regs *ctx) "
                f"{{ return pair_return(ctx, {r.id}, {how}, {width}, {ok_if}); }}",
                f"int {release}(struct pt_regs *ctx) "
                f"{{ return pair_release(ctx, {r.id}, {rel_n}, {width}); }}"]
    return "\n".join(out) + "\n"
