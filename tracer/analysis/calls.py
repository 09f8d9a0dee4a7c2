"""What `keytrace calls` reports, decided once for the CLI, the notebook and files: calls paired
from their entry and return records, ltrace's line for each, and the -c table and latency
histograms from the kernel's counters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pandas as pd

from .. import wire
from ..host import prototypes as protos

CALL_COLUMNS = ["ts", "pid", "tid", "comm", "library", "function", "args", "ret", "duration_ns",
                "stack"]
COUNT_COLUMNS = ["library", "function", "calls", "errors", "total_ns", "mean_ns", "max_ns",
                 "time_pct"]
HISTOGRAM_COLUMNS = ["library", "function", "from_ns", "to_ns", "calls"]


@dataclass(frozen=True)
class Function:
    """A probed function, as reports name and type it."""
    library: str
    name: str
    proto: Optional[protos.Prototype]


def failure_of(proto: Optional[protos.Prototype]) -> Optional[str]:
    """What return value the kernel counts as an error: "int" (-1 in 32 bits), "long" (-1 in
    64: ssize_t, MAP_FAILED), "null", or None (unknown: nothing is an error)."""
    if proto is None or proto.errno_on is None:
        return None
    if proto.errno_on == "null":
        return "null"
    return "int" if proto.ret in ("int", "uint", "fd") else "long"


class Pairer:
    """Entry and return records in, finished calls out: per thread a stack of open calls, so
    nested probed calls (fopen calling malloc) pair right. A call still open when its process
    exits, or at the end, is finished with no return value (exit, longjmp, a trace cut short)."""

    def __init__(self, functions: list, strsize: int, offset_ns: int,
                 stack_of: Optional[Callable[[int], list]] = None):
        self.functions = functions
        self.strsize = strsize
        self.offset = offset_ns
        self.stack_of = stack_of
        # per function: which arguments are strings, in the record's string slots' order
        self.string_args = [protos.string_args(f.proto) for f in functions]
        self.open: dict = {}  # tid -> [entry row]

    def feed(self, batch: np.ndarray) -> list:
        done = []
        for r in batch:
            tid = int(r["tid"])
            if int(r["kind"]) == 0:
                self.open.setdefault(tid, []).append(self._entry(r))
                continue
            stack = self.open.get(tid, [])
            fn = int(r["fn"])
            at = next((i for i in range(len(stack) - 1, -1, -1) if stack[i]["_fn"] == fn), None)
            if at is None:
                continue  # its entry came before the probes did
            row = stack.pop(at)
            del stack[at:]  # calls left open inside it never returned (longjmp)
            self._strings(row, r)
            done.append(self._finish(row, int(r["args"][0]), int(r["ts"]), int(r["err"])))
        return done

    def end(self, pid: Optional[int] = None) -> list:
        """Finish the open calls of a process (all when None) with no return."""
        done = []
        for tid, stack in list(self.open.items()):
            if stack and (pid is None or stack[0]["pid"] == pid):
                done += [self._finish(row, None, None) for row in stack]
                del self.open[tid]
        return done

    @staticmethod
    def _read(r, slot: int) -> Optional[tuple]:
        """(bytes, cut) of string slot of a record, None when it could not be read."""
        flags = int(r["cut"])
        if flags >> (2 + slot) & 1:
            return None
        return r[f"str{slot}"].split(b"\0", 1)[0], bool(flags >> slot & 1)

    def _strings(self, row: dict, ret) -> None:
        """Strings unreadable at entry, as read at return (their pages touched by the call)."""
        for slot, at in enumerate(self.string_args[row["_fn"]]):
            if at not in row["_strings"] and row["_raw"][at]:
                got = self._read(ret, slot)
                if got is not None:
                    row["_strings"][at] = got[0]
                    if got[1]:
                        row["_cut"].add(at)

    def _entry(self, r) -> dict:
        fn = self.functions[int(r["fn"])]
        args = [int(a) for a in r["args"]]
        strings, cut = {}, set()
        for slot, at in enumerate(self.string_args[int(r["fn"])]):
            got = self._read(r, slot) if args[at] else None
            if got is not None:
                strings[at] = got[0]
                if got[1]:
                    cut.add(at)
        stack = ""
        if self.stack_of is not None and int(r["stack"]) >= 0:
            stack = " ".join(f"{a:#x}" for a in self.stack_of(int(r["stack"])))
        return {"_fn": int(r["fn"]), "_raw": args, "_strings": strings, "_cut": cut,
                "_ts": int(r["ts"]),
                "ts": int(r["ts"]) + self.offset, "pid": int(r["pid"]), "tid": int(r["tid"]),
                "comm": r["comm"].split(b"\0", 1)[0].decode("utf-8", "replace"),
                "library": fn.library, "function": fn.name, "stack": stack}

    def _finish(self, row: dict, ret: Optional[int], ts: Optional[int], err: int = 0) -> dict:
        fn = self.functions[row["_fn"]]
        out = {k: v for k, v in row.items() if not k.startswith("_")}
        out["args"] = protos.format_call(fn.proto, row["_raw"], row["_strings"], self.strsize,
                                         row["_cut"])
        out["ret"] = "?" if ret is None else protos.format_return(fn.proto, ret, err or None)
        out["errno"] = (protos.errno_name(err) if err and ret is not None
                        and protos.is_error(fn.proto, ret) else None)
        out["error"] = ret is not None and protos.is_error(fn.proto, ret)
        out["duration_ns"] = None if ts is None else ts - row["_ts"]
        out["json_args"] = _json_args(fn.proto, row["_raw"], row["_strings"])
        out["json_ret"] = None if ret is None else _json_ret(fn.proto, ret)
        return out


def _json_args(proto, raw: list, strings: dict) -> list:
    if proto is None:
        return [protos.json_value("ptr", v) for v in raw]
    return [protos.json_value(a.kind, raw[i], strings.get(i))
            for i, a in enumerate(proto.args[:wire.CALL_ARGS])]


def _json_ret(proto, raw: int):
    if proto is None:
        return protos.json_value("ptr", raw)
    return None if proto.ret == "void" else protos.json_value(proto.ret, raw)


def line(call: dict, timing: bool = False) -> str:
    """ltrace's line: `PID COMM LIB!FUNC(args) = ret`, a thread as PID/TID, -T's <seconds>."""
    who = str(call["pid"]) if call["tid"] == call["pid"] else f"{call['pid']}/{call['tid']}"
    ret = f" = {call['ret']}" if call["ret"] != "" else ""
    text = f"{who} {call['comm']} {call['library']}!{call['function']}({', '.join(call['args'])}){ret}"
    if timing and call["duration_ns"] is not None:
        text += f" <{call['duration_ns'] / 1e9:.6f}>"
    return text


def calls_frame(calls: list) -> pd.DataFrame:
    """Finished calls as a frame: args a list of ltrace's texts, ret the typed text."""
    df = pd.DataFrame([{c: r.get(c) for c in CALL_COLUMNS} for r in calls], columns=CALL_COLUMNS)
    df["ts"] = pd.to_datetime(df["ts"].astype("int64"), unit="ns", utc=True)
    df["duration_ns"] = df["duration_ns"].astype("Int64")
    return df


def json_record(call: dict, timing: bool) -> dict:
    """--json: one object per call."""
    out = {"ts": call["ts"] / 1e9, "pid": call["pid"], "tid": call["tid"], "comm": call["comm"],
           "library": call["library"], "function": call["function"], "args": call["json_args"],
           "ret": call["json_ret"]}
    if call.get("errno"):
        out["errno"] = call["errno"]
    if timing:
        out["duration_ns"] = call["duration_ns"]
    return out


def counts_frame(functions: list, stats: np.ndarray, timed: bool) -> pd.DataFrame:
    """ltrace -c's table from the kernel's counters, busiest first (by time with -T, else by
    calls). Without -T nothing returns to the probes: errors and times are unknown (NA)."""
    calls = stats[:, 0].astype(np.int64)
    df = pd.DataFrame({"library": [f.library for f in functions],
                       "function": [f.name for f in functions], "calls": calls})
    if timed:
        total = stats[:, 2].astype(np.int64)
        df["errors"] = pd.array(stats[:, 1].astype(np.int64), dtype="Int64")
        df["total_ns"] = pd.array(total, dtype="Int64")
        df["mean_ns"] = pd.array(np.where(calls > 0, total // np.maximum(calls, 1), 0), dtype="Int64")
        df["max_ns"] = pd.array(stats[:, 3].astype(np.int64), dtype="Int64")
        all_ns = total.sum()
        df["time_pct"] = (100.0 * total / all_ns) if all_ns else 0.0
        order = ["total_ns", "calls"]
    else:
        for col in ("errors", "total_ns", "mean_ns", "max_ns"):
            df[col] = pd.array([None] * len(df), dtype="Int64")
        df["time_pct"] = np.nan
        order = ["calls"]
    df = df[df["calls"] > 0]
    return df.sort_values(order + ["function"], ascending=[False] * len(order) + [True],
                          ignore_index=True)[COUNT_COLUMNS]


def histogram_frame(functions: list, hist: np.ndarray) -> pd.DataFrame:
    """The -T histograms: per function, the log2 buckets that hold calls."""
    rows = []
    for i, f in enumerate(functions):
        for b in np.flatnonzero(hist[i]).tolist():
            rows.append((f.library, f.name, 0 if b == 0 else 1 << b, (2 << b) - 1, int(hist[i, b])))
    return pd.DataFrame(rows, columns=HISTOGRAM_COLUMNS)


def stacks_frame(functions: list, counts: dict, stack_of: Callable[[int], list]) -> pd.DataFrame:
    """--stack with -c: calls per (function, user stack), most first."""
    rows = [(functions[fn].library, functions[fn].name,
             " ".join(f"{a:#x}" for a in stack_of(sid)) if sid >= 0 else "", n)
            for (fn, sid), n in counts.items() if fn < len(functions)]
    df = pd.DataFrame(rows, columns=["library", "function", "stack", "calls"])
    return df.sort_values(["calls", "function"], ascending=[False, True], ignore_index=True)
