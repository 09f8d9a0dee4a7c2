"""The raw record of probes/keys.bpf.c as a numpy dtype, and its decoding into event frames.

A batch of records is decoded at once: strings are decoded per distinct value, timestamps are
shifted to wall-clock time in one vector operation. Nothing here loops over rows.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import pandas as pd

PATH_LEN = 256

# Mirrors `struct event` field for field (all naturally aligned, no padding).
RECORD = np.dtype([
    ("ts", "<u8"),
    ("load", "<u8"),
    ("destructor", "<u8"),
    ("caller", "<u8"),
    ("handle", "<u8"),
    ("pid", "<u4"),
    ("tid", "<u4"),
    ("other", "<u4"),
    ("op", "<u4"),
    ("ret", "<i4"),
    ("key", "<u4"),
    ("stack", "<i4"),
    ("index", "<u4"),
    ("comm", "S16"),
    ("path", f"S{PATH_LEN}"),
])

# op codes of the C side, in order; the index is the code.
OPS = ["", "create", "create_failed", "delete", "dlopen", "dlclose", "exec", "exit", "fork",
       "map", "unmap"]
OP_TYPE = pd.CategoricalDtype(OPS[1:])

# The columns of an events frame, in order: what decode() makes and what files hold.
# handle: dlopen's result / dlclose's argument; for map and unmap, the module's load base.
# stack: a create's user stack, caller first, as hex addresses separated by spaces.
COLUMNS = ["ts", "pid", "tid", "comm", "op", "key", "ret", "destructor", "caller",
           "path", "handle", "load", "child", "stack"]


def boot_to_wall_offset_ns() -> int:
    """Add to a CLOCK_BOOTTIME reading (bpf_ktime_get_boot_ns) to get Unix time in ns."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def _decode_strings(raw: np.ndarray) -> pd.Categorical:
    """comm repeats a lot: decode each distinct value once. The 16 bytes are hashed to one
    integer for a hash-based factorize (np.unique would sort); a collision is checked for."""
    lanes = np.ascontiguousarray(raw).view("<u8").reshape(len(raw), 2)
    codes, _ = pd.factorize(lanes[:, 0] ^ (lanes[:, 1] * np.uint64(0x9E3779B97F4A7C15)))
    reps = raw[np.unique(codes, return_index=True)[1]] if len(raw) else raw
    if len(raw) and not (reps[codes] == raw).all():  # two names, one hash: do it the slow way
        uniques, inverse = np.unique(raw, return_inverse=True)
        reps, codes = uniques, inverse.reshape(-1)
    names = [u.decode("utf-8", "replace") for u in reps]
    if len(set(names)) < len(names):  # invalid UTF-8 decoded alike: let pandas merge them
        return pd.Categorical(np.asarray(names, dtype=object)[codes])
    return pd.Categorical.from_codes(codes, categories=names)


def decode(batch: np.ndarray, wall_offset_ns: int,
           stack_of: Optional[Callable[[int], list]] = None) -> pd.DataFrame:
    """Turn a structured array of RECORD into an events frame (see COLUMNS).

    stack_of(stack_id) gives a stack's addresses (from the BPF stack map), innermost first.
    """
    op = batch["op"].astype(np.int64)
    if len(op) and (op.min() < 1 or op.max() >= len(OPS)):
        raise ValueError(f"unknown op code in ring buffer record: {sorted(set(op.tolist()))}")
    key_valid = np.isin(op, (1, 3))  # create, delete
    path_valid = np.isin(op, (4, 6, 9))  # dlopen, exec, map
    paths = np.full(len(batch), None, dtype=object)
    if path_valid.any():
        paths[path_valid] = [p.decode("utf-8", "replace") for p in batch["path"][path_valid]]
    frame = pd.DataFrame({
        "ts": pd.to_datetime(batch["ts"].astype(np.int64) + wall_offset_ns, unit="ns", utc=True),
        "pid": batch["pid"].astype(np.int64),
        "tid": batch["tid"].astype(np.int64),
        "comm": _decode_strings(batch["comm"]),
        "op": pd.Categorical.from_codes(op - 1, dtype=OP_TYPE),
        "key": pd.array(batch["key"], dtype="Int64"),
        "ret": batch["ret"].astype(np.int64),
        "destructor": batch["destructor"],
        "caller": batch["caller"],
        "path": pd.Series(paths, dtype=object),  # object: the same under pandas 2 and 3
        "handle": batch["handle"],
        "load": batch["load"],
        "child": np.where(op == 8, batch["other"], 0).astype(np.int64),
        "stack": pd.Series(_stacks(batch, stack_of), dtype=object),
    })
    frame["key"] = frame["key"].mask(~key_valid)
    return frame


def _stacks(batch: np.ndarray, stack_of) -> np.ndarray:
    out = np.full(len(batch), None, dtype=object)
    if stack_of is None:
        return out
    ids = batch["stack"]
    known = {}
    for sid in np.unique(ids[ids >= 0]).tolist():  # one map read per distinct stack
        known[sid] = stack_of(sid)
    for i in np.flatnonzero(ids >= 0).tolist():
        # The walk from a function's entry skips its caller's frame; the caller goes first.
        frames = [int(batch["caller"][i])] + known[int(ids[i])][1:]
        out[i] = " ".join(f"{a:#x}" for a in frames)
    return out


def empty_events() -> pd.DataFrame:
    return decode(np.zeros(0, dtype=RECORD), 0)
