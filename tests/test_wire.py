"""The record layout both sides agree on, and the replay path watch-without-`-o` and the agent
use. The C `struct event` (and `struct call`) is generated from tracer/wire.py; here a C
compiler lays it out and says where each field is, so the numpy mirror that decodes the ring
buffer is checked against the compiler, not against itself."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from tracer import wire
from tracer.analysis.ledger import Ledger
from tracer.state.tracker import Tracker
from conftest import events


def _c_layout(tmp_path, definitions: str, name: str, dtype: np.dtype) -> dict:
    """{field: offset} and "sizeof", as gcc lays the generated struct out."""
    fields = list(dtype.fields)
    src = tmp_path / f"{name}.c"
    src.write_text("#include <stddef.h>\n#include <stdio.h>\n"
                   "typedef unsigned long long u64; typedef unsigned int u32; typedef int s32;\n"
                   + definitions + "\nint main(void) {\n"
                   + "".join(f'    printf("{f} %zu\\n", offsetof(struct {name}, {f}));\n'
                             for f in fields)
                   + f'    printf("sizeof %zu\\n", sizeof(struct {name}));\n    return 0;\n}}\n')
    exe = tmp_path / name
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_struct_event_as_the_c_compiler_lays_it_out_is_what_decode_reads(tmp_path):
    c = _c_layout(tmp_path, wire.c_definitions(), "event", wire.RECORD)
    assert c.pop("sizeof") == wire.RECORD.itemsize
    assert c == {f: off for f, (_, off) in wire.RECORD.fields.items()}


@pytest.mark.parametrize("strsize", [32, 256])
def test_struct_call_as_the_c_compiler_lays_it_out_is_what_decode_reads(tmp_path, strsize):
    dtype = wire.call_record(strsize)
    c = _c_layout(tmp_path, wire.c_struct("call", dtype), "call", dtype)
    assert c.pop("sizeof") == dtype.itemsize
    assert c == {f: off for f, (_, off) in dtype.fields.items()}


RECORDS = [
    dict(op="fork", pid=1, child=10),
    dict(op="dlopen_begin", pid=10, load=5),
    dict(op="acquire", pid=10, handle=3, owner=0x7F00DEAD, caller=0x55AA, load=5),
    dict(op="map", pid=10, load=5, aux=0x7F0000000000, path="/x/libleaky.so"),
    dict(op="dlopen", pid=10, load=5, aux=0xAB, path="/x/libleaky.so"),
    dict(op="dlclose", pid=10, aux=0xAB),
    dict(op="unmap", pid=10, aux=0x7F0000000000),
    dict(op="acquire", pid=10, handle=4, owner=0x7F00BEEF, caller=0x55AB),
    dict(op="release", pid=10, handle=4),
    dict(op="exec", pid=1, path="/bin/sh", comm="sh"),
    dict(op="exit", pid=10),
]


def _records(rows, start_ns=1_000_000_000):
    return wire.records([{"ts": start_ns + i * 1000, "tid": r.get("pid", 0), "comm": "proc", **r}
                         for i, r in enumerate(rows)])


def test_records_replayed_without_a_frame_give_the_summary_decoded_events_give():
    """The agent and watch without -o replay records (wire.columns into ingest_records);
    a saved ledger replays decoded events (a DataFrame): one state either way."""
    by_records = Tracker(keep_events=False)
    by_records.ingest_records(_records(RECORDS), 0)
    by_frame = Ledger()
    by_frame.ingest(events(*RECORDS))
    left, right = by_records.snapshot()[0], by_frame.snapshot()[0]

    def shape(procs):
        return sorted((p.pid, p.exe or "", p.exited is None, p.parent[0] if p.parent else 0,
                       p.table("keys").acquires, p.table("keys").releases,
                       tuple(sorted(p.table("keys").live)),
                       dict(p.modules.cycles_by_path())) for p in procs)
    assert shape(left) == shape(right)
    (child,) = [p for p in left if p.pid == 10]
    assert child.table("keys").acquires == 2 and sorted(child.table("keys").live) == [3]
    assert child.modules.cycles_by_path() == {"/x/libleaky.so": 1}
    assert child.exited is not None
    assert any(p.pid == 1 and p.exe == "/bin/sh" for p in left)


def test_columns_split_records_into_the_fields_replay_reads():
    """Each column holds each record's own field, in record order: a field read from the wrong
    place (owner for caller, aux for load) is caught here, not only through a summary."""
    rows = RECORDS + [dict(op="acquire", pid=2, handle=9, ret=-11, seq=7)]
    got = wire.columns(_records(rows), 0)
    assert len(got) == 15
    cols = dict(zip(("ts", "pid", "comm", "op", "resource", "handle", "ret", "owner", "caller",
                     "path", "aux", "load", "child", "stack", "seq"), got))
    assert all(len(c) == len(rows) for c in cols.values())
    handled = [r["op"] in ("acquire", "release") for r in rows]
    assert cols["ts"] == [1_000_000_000 + i * 1000 for i in range(len(rows))]
    assert cols["comm"] == [r.get("comm", "proc") for r in rows]
    assert cols["op"] == [wire.CODE[r["op"]] for r in rows]
    assert cols["resource"] == ["keys" if h else None for h in handled]
    assert cols["handle"] == [r["handle"] if h else -1 for r, h in zip(rows, handled)]
    assert cols["seq"] == [r.get("seq", 0) for r in rows]
    assert cols["child"] == [r.get("child", 0) for r in rows]
    assert cols["path"] == [r.get("path") for r in rows]
    assert cols["stack"] == [None] * len(rows)
    for field in ("pid", "ret", "owner", "caller", "aux", "load"):
        assert cols[field] == [r.get(field, 0) for r in rows], field
