"""The record every probe writes, and the op codes: defined here once.

The C side never spells a number: `c_definitions()` turns this module into the `#define`s and the
`struct event` the probes are compiled with (tracer.bpf.loader puts it in front of the sources).
A batch of records is decoded at once: strings are decoded per distinct value, timestamps are
shifted to wall-clock time in one vector operation.

Two kinds of rows share one events frame: the ones the kernel sends (KERNEL_OPS), and facts the
host gave when a process was first met (HOST_OPS: its identity, modules mapped, handles already
live). Both are saved, so a saved ledger replays exactly as the live one did.

Records know resources by id only: a resource (pthread keys, a user's --pair) registers its name
here (register_resource), and frames carry that name. What a resource's acquire, release, handle
and owner mean is said by its declaration (tracer.resources), never here.
"""
from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

PATH_LEN = 256
MAX_MODULES = 16        # link_map entries one dlopen reports
MAX_ENTRIES = 65536     # per-pid and per-thread BPF hash maps
DLOPEN_DEPTH = 4        # dlopens in flight on one thread (a constructor may dlopen)

# Mirrors `struct event` field for field (all naturally aligned, no padding).
RECORD = np.dtype([
    ("ts", "<u8"),          # bpf_ktime_get_boot_ns()
    ("load", "<u8"),        # acquire: the innermost dlopen in flight on the thread; dlopen/map: its id
    ("owner", "<u8"),       # acquire: a code address the handle belongs to, if any (a callback)
    ("caller", "<u8"),      # acquire: return address (the call site)
    ("handle", "<u8"),      # acquire (success) / release / held: the handle
    ("aux", "<u8"),         # dlopen: returned handle; dlclose: argument; map/unmap: load base;
                            # acquire: the C library it ran in (LIBCS)
    ("pid", "<u4"),         # tgid
    ("tid", "<u4"),
    ("other", "<u4"),       # fork: child pid; exec: pid before exec; acquire/release/held where
                            # the probe sees it: the handle's new sequence number (0: unknown)
    ("op", "<u4"),
    ("ret", "<i4"),         # acquire/release: return value (a failed release keeps op release)
    ("res", "<u4"),         # acquire, acquire_failed, release, held, table, counted: resource id
    ("stack", "<i4"),       # acquire: user stack id (negative: none)
    ("index", "<u4"),       # map: position in the link_map chain
    ("comm", "S16"),
    ("path", f"S{PATH_LEN}"),  # dlopen: file argument; exec: filename; map: l_name
])
_C_TYPES = {"<u8": "u64", "<u4": "u32", "<i4": "s32"}  # numpy type -> C

# The C libraries an acquire can come from: the probe attached to each says which.
LIBCS = ["glibc", "musl"]

# Op codes, in order; the index is the code (0 is never sent).
# dlopen_begin: a dlopen has begun (load: its id; the dlopen record with that id ends it): its
# constructors may be running, so a table read now is mid-cycle.
KERNEL_OPS = ["acquire", "acquire_failed", "release", "dlopen", "dlclose", "exec", "exit",
              "fork", "map", "unmap", "dlopen_begin"]
# seen: a process met while already running (path: exe, aux: its start, ns since the epoch);
# mapped: a module it had mapped then (path, aux: load base), as /proc/PID/maps showed it;
# table: a resource's table of it was read, or could not be (path: "read" or why not); tracing
#   of it is complete from its first such row on (ret 1: from this row on: its C library was
#   probed late);
# held: a handle in use in that table (handle, owner; ret 1: the owner lay in no mapping);
# counted: the kernel's own counts of a resource for the process image, kept whatever records
#   were lost (aux: acquires, caller: failed acquires, owner: releases, load: failed releases);
# sample: a resource's table read now, not traced (path: the limit that binds, or "not read:
#   why"; aux: in use; owner: the limit, 0 for none; caller: headroom; ts: when the read ended,
#   load: when it began);
# owned: one owner's count in the sample before it (path: the owner, aux: handles).
HOST_OPS = ["seen", "mapped", "table", "held", "counted", "sample", "owned"]
OPS = [""] + KERNEL_OPS + HOST_OPS
CODE = {name: i for i, name in enumerate(OPS) if name}

# The columns of an events frame, in order: what decode() makes and what files hold.
# resource: the name of the resource an acquire, release, held handle, table or count is of;
# stack: an acquire's user stack, caller first, as hex addresses separated by spaces;
# child: a fork's child, or the parent of a process seen (as the host showed it).
COLUMNS = ["ts", "pid", "tid", "comm", "op", "resource", "handle", "ret", "owner", "caller",
           "path", "aux", "load", "child", "stack", "seq"]
_HANDLED = [CODE[o] for o in ("acquire", "release", "held")]
_OF_RESOURCE = [CODE[o] for o in ("acquire", "acquire_failed", "release", "held", "table",
                                  "counted", "sample", "owned")]
_PATHED = [CODE[o] for o in ("dlopen", "exec", "map", "seen", "mapped", "table", "sample",
                             "owned")]


def _pid_in_child(op: np.ndarray) -> np.ndarray:
    """Records whose child column is a pid: a fork's child, a process seen's parent."""
    return (op == CODE["fork"]) | (op == CODE["seen"])

# Resources by id, as records carry them; a name is registered once and keeps its id.
RESOURCES: list = []


def register_resource(name: str) -> int:
    """The id of a resource, by name (registered on first use)."""
    if name not in RESOURCES:
        RESOURCES.append(name)
    return RESOURCES.index(name)


def resource_name(res: int) -> str:
    return RESOURCES[res] if 0 <= res < len(RESOURCES) else f"resource {res}"


def c_definitions() -> str:
    """The op codes, limits and `struct event` for the C side, generated from this module."""
    lines = [f"#define OP_{name.upper()} {code}" for name, code in CODE.items()
             if name in KERNEL_OPS]
    lines += [f"#define KT_RES_{name.upper().replace('/', '_')} {code}"
              for code, name in enumerate(RESOURCES) if name.replace("/", "_").isidentifier()]
    lines += [f"#define KT_LIBC_{name.upper()} {code}" for code, name in enumerate(LIBCS)]
    lines += [f"#define KT_RESOURCES {max(len(RESOURCES), 1)}"]
    lines += [f"#define KT_PATH_LEN {PATH_LEN}", f"#define KT_MAX_MODULES {MAX_MODULES}",
              f"#define KT_MAX_ENTRIES {MAX_ENTRIES}", f"#define KT_DLOPEN_DEPTH {DLOPEN_DEPTH}"]
    return "\n".join(lines + [c_struct("event", RECORD), ""])


def c_struct(name: str, dtype: np.dtype) -> str:
    """A C struct mirroring a numpy record dtype, field for field."""
    lines = [f"struct {name} {{"]
    for field, (dt, _) in dtype.fields.items():
        if dt.subdtype is not None:
            base, shape = dt.subdtype
            dims = "".join(f"[{n}]" for n in shape)
            lines.append(f"    {_C_TYPES[base.str]} {field}{dims};")
        elif dt.kind == "S":
            lines.append(f"    char {field}[{dt.itemsize}];")
        else:
            lines.append(f"    {_C_TYPES[dt.str]} {field};")
    return "\n".join(lines + ["};"])


# ---- keytrace calls: a record per call entry and per return, when calls are not only counted --
CALL_ARGS = 6      # x86-64 passes the first six integer arguments in registers
CALL_STRINGS = 2   # strings read per call (tracer.host.prototypes.MAX_STRINGS)
CALL_KINDS = ["entry", "return"]


def call_record(strsize: int) -> np.dtype:
    """The calls unit's record for a given -s: strings are read strsize + 2 bytes long, so that
    one longer than strsize is known to be cut (rounded up to keep the record aligned)."""
    width = (strsize + 2 + 7) & ~7
    return np.dtype([
        ("ts", "<u8"),             # bpf_ktime_get_boot_ns()
        ("args", "<u8", (CALL_ARGS,)),  # entry: rdi rsi rdx rcx r8 r9; return: rax in args[0]
        ("ip", "<u8"),             # entry: the return address, in the caller (0: unread)
        ("pid", "<u4"),
        ("tid", "<u4"),
        ("fn", "<u4"),             # index of the probed function
        ("kind", "<u4"),           # CALL_KINDS
        ("stack", "<i4"),          # entry: user stack id (negative: none)
        ("cut", "<u4"),            # bit i: string i filled its buffer; bit 2 + i: unreadable
        ("err", "<i4"),            # return: errno of the last syscall that failed in the call
        ("lens", "<u4"),           # bytes read as buffers: slot 0 in the low 16 bits, 1 the high
        ("comm", "S16"),
        ("str0", f"S{width}"),
        ("str1", f"S{width}"),
    ])


@functools.lru_cache(maxsize=1)
def boot_to_wall_offset_ns() -> int:
    """Add to a CLOCK_BOOTTIME reading (bpf_ktime_get_boot_ns, /proc/PID/stat's start) to get
    Unix time in ns. Read once per process: every time keytrace derives from the boot clock
    (records, process starts) uses the same offset, so a process's start read twice is the same
    number even when the wall clock stepped in between (NTP at boot, a VM resumed)."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


@functools.lru_cache(maxsize=1)
def op_type() -> "pd.CategoricalDtype":
    """The op column's dtype. (pandas is imported where frames are built: an agent that
    replays records straight from the ring never loads it.)"""
    import pandas as pd
    return pd.CategoricalDtype(OPS[1:])


def _decode_strings(raw: np.ndarray) -> "pd.Categorical":
    """comm repeats a lot: decode each distinct value once. The 16 bytes are hashed to one
    integer for a hash-based factorize (np.unique would sort); a collision is checked for."""
    import pandas as pd
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


def _ops(batch: np.ndarray) -> np.ndarray:
    op = batch["op"].astype(np.int64)
    if len(op) and (op.min() < 1 or op.max() >= len(OPS)):
        raise ValueError(f"unknown op code in ring buffer record: {sorted(set(op.tolist()))}")
    return op


def _paths(batch: np.ndarray, op: np.ndarray) -> list:
    """Each record's path, None where its op has none or it is empty (dlopen(NULL)), as a saved
    ledger reads back. A string ends at its first NUL: the bytes after it are a reused ring
    slot's leftovers."""
    paths = [None] * len(batch)
    for i in np.flatnonzero(np.isin(op, _PATHED)).tolist():
        paths[i] = batch["path"][i].split(b"\0", 1)[0].decode("utf-8", "replace") or None
    return paths


def decode(batch: np.ndarray, wall_offset_ns: int,
           stack_of: Optional[Callable[[int], list]] = None) -> "pd.DataFrame":
    """Turn a structured array of RECORD into an events frame (see COLUMNS).

    stack_of(stack_id) gives a stack's addresses (from the BPF stack map), innermost first.
    """
    import pandas as pd
    op = _ops(batch)
    paths = np.array(_paths(batch, op), dtype=object)
    frame = pd.DataFrame({
        "ts": pd.to_datetime(batch["ts"].astype(np.int64) + wall_offset_ns, unit="ns", utc=True),
        "pid": batch["pid"].astype(np.int64),
        "tid": batch["tid"].astype(np.int64),
        "comm": _decode_strings(batch["comm"]),
        "op": pd.Categorical.from_codes(op - 1, dtype=op_type()),
        "resource": pd.Series(_resources(batch, op), dtype=object),
        "handle": pd.array(batch["handle"], dtype="UInt64"),
        "ret": batch["ret"].astype(np.int64),
        "owner": batch["owner"],
        "caller": batch["caller"],
        "path": pd.Series(paths, dtype=object),  # object: the same under pandas 2 and 3
        "aux": batch["aux"],
        "load": batch["load"],
        "child": np.where(_pid_in_child(op), batch["other"], 0).astype(np.int64),
        "stack": pd.Series(_stacks(batch, stack_of), dtype=object),
        "seq": np.where(np.isin(op, _HANDLED), batch["other"], 0).astype(np.int64),
    })
    frame["handle"] = frame["handle"].mask(~np.isin(op, _HANDLED))
    return frame


def _resources(batch: np.ndarray, op: np.ndarray) -> list:
    """Each record's resource name, None where its op is of none."""
    out = [None] * len(batch)
    for i in np.flatnonzero(np.isin(op, _OF_RESOURCE)).tolist():
        out[i] = resource_name(int(batch["res"][i]))
    return out


def columns(batch: np.ndarray, wall_offset_ns: int,
            stack_of: Optional[Callable[[int], list]] = None) -> tuple:
    """What a replay reads of each record, as Python lists straight from the records (no frame:
    an always-on tracer that keeps no events need not pay pandas per drain): ts, pid, comm, op
    (code), resource (name or None), handle (-1: none), ret, owner, caller, path, aux, load,
    child, stack, seq. The one shape a replay takes: frames give it through frame_columns."""
    op = _ops(batch)
    handled = np.isin(op, _HANDLED)
    uniques, inverse = np.unique(batch["comm"], return_inverse=True)
    names = [u.decode("utf-8", "replace") for u in uniques]
    paths = _paths(batch, op)
    return ((batch["ts"].astype(np.int64) + wall_offset_ns).tolist(), batch["pid"].tolist(),
            [names[i] for i in inverse.reshape(-1).tolist()], op.tolist(),
            _resources(batch, op),
            np.where(handled, batch["handle"].astype(np.int64), -1).tolist(), batch["ret"].tolist(),
            batch["owner"].tolist(), batch["caller"].tolist(), paths,
            batch["aux"].tolist(), batch["load"].tolist(),
            np.where(_pid_in_child(op), batch["other"], 0).tolist(),
            _stacks(batch, stack_of).tolist(), np.where(handled, batch["other"], 0).tolist())


def frame_columns(f: "pd.DataFrame") -> tuple:
    """An events frame as columns() gives records: the same shape, for one replay."""
    return (
        f["ts"].array.asi8.tolist(),
        f["pid"].tolist(), f["comm"].astype(object).tolist(),
        (f["op"].cat.codes + 1).tolist(),
        f["resource"].astype(object).where(f["resource"].notna(), None).tolist(),
        f["handle"].astype("Int64").fillna(-1).astype(np.int64).tolist(),
        f["ret"].tolist(), f["owner"].tolist(), f["caller"].tolist(),
        f["path"].astype(object).tolist(), f["aux"].tolist(), f["load"].tolist(),
        f["child"].tolist(), f["stack"].astype(object).tolist(), f["seq"].tolist(),
    )


def _stacks(batch: np.ndarray, stack_of) -> np.ndarray:
    out = np.full(len(batch), None, dtype=object)
    if stack_of is None:
        return out
    ids = batch["stack"]
    known = {sid: stack_of(sid) for sid in np.unique(ids[ids >= 0]).tolist()}  # one read each
    # The walk from a function's entry skips its caller's frame; the caller goes first.
    for i in np.flatnonzero(ids >= 0).tolist():
        frames = [int(batch["caller"][i])] + known[int(ids[i])][1:]
        out[i] = " ".join(f"{a:#x}" for a in frames)
    return out


def records(rows: list[dict]) -> np.ndarray:
    """Records built from field dicts (op by name): host facts, and tests' synthetic events."""
    a = np.zeros(len(rows), dtype=RECORD)
    a["stack"] = -1
    for i, r in enumerate(rows):
        for k, v in r.items():
            if k == "op":
                v = CODE[v]
            elif k in ("comm", "path"):
                # a path read as bytes (surrogateescape) goes back to its bytes
                v = v.encode("utf-8", "surrogateescape")[:RECORD[k].itemsize - 1]
            elif k in ("child", "seq"):
                k = "other"
            elif k == "resource":
                k, v = "res", register_resource(v)
            a[i][k] = v
    return a


def empty_events() -> "pd.DataFrame":
    return decode(np.zeros(0, dtype=RECORD), 0)
