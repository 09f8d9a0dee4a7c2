"""What `keytrace calls` reports, decided once for the CLI, the notebook and files: calls paired
from their entry and return records, ltrace's line for each, and the -c table and latency
histograms from the kernel's counters.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from .. import wire
from ..host import prototypes as protos

# pandas is imported by the functions that build frames (*_frame, after tracing): it must not be
# resident while bcc compiles the probes.
if TYPE_CHECKING:
    import pandas as pd

CALL_COLUMNS = ["ts", "pid", "tid", "comm", "library", "function", "args", "ret", "duration_ns",
                "caller", "stack", "stack_note"]
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


CUT_NOTE = "stack cut short: a caller without frame pointers"
GONE_NOTE = "not named: the process was gone before its stack was read"
USER_LO, USER_HI = 0x10000, 1 << 47  # where x86-64 user code can be (mmap_min_addr, 47 bits)


class Stacks:
    """User stacks as `lib!symbol+off` frames, innermost first: the function, then where each
    caller returns to, up to the first that cannot be a frame (in no mapped module, or not
    just after a call: past code without frame pointers the walk reads garbage), which is
    said. Named against each process's modules as mapped when its stack is first met (read
    again when a frame lies in none: a library loaded since). depth: frames kept (ltrace -w)."""

    def __init__(self, depth: Optional[int] = None):
        self.depth = depth
        self._resolvers: dict = {}

    def _resolver(self, pid: int, fresh: bool = False):
        """The process's Resolver, None when it has no modules to read (it is gone): the last
        one read while it lived is kept."""
        if fresh or self._resolvers.get(pid) is None:
            from ..host import proc
            from ..state.modules import Module
            from .attribution import Resolver
            mods = [Module(p, b, 0, 0, file=f) for p, b, f in proc.modules(pid)]
            if mods or pid not in self._resolvers:
                self._resolvers[pid] = Resolver(mods, pid) if mods else None
        return self._resolvers[pid]

    def look(self, pid: int) -> None:
        """Read the process's modules now, while it lives: its stacks may be named after it
        is gone (-c --stack names them at the end)."""
        self._resolver(pid, fresh=True)

    def name(self, pid: int, addrs: list) -> tuple:
        """(frames as text, the note when the walk was cut). addrs: the function's address,
        the return address read at its entry, then the frame-pointer walk's."""
        if not addrs:
            return [], ""
        r = self._resolver(pid)
        if r is None or r.module_at(addrs[0], 1, 0) is None:
            r = self._resolver(pid, fresh=True)
        if r is None:  # kept as addresses, up to the first that no user frame can have
            user = addrs
            for i, a in enumerate(addrs):
                if not USER_LO <= a < USER_HI:
                    user = addrs[:i]
                    break
            frames = [f"{a:#x}" for a in user[:self.depth or len(user)]]
            return frames, GONE_NOTE
        frames, note = [str(r.frame(addrs[0], 1, 0))], ""
        for a in addrs[1:]:
            f = r.frame(a, 1, 0)
            if f.module is None or not r.returns_to(f.module, a):
                note = CUT_NOTE
                break
            frames.append(str(f))
        if self.depth is not None and len(frames) > self.depth:
            frames, note = frames[:self.depth], ""
        return frames, note

    def forget(self, pid: int) -> None:
        self._resolvers.pop(pid, None)


class Pairer:
    """Entry and return records in, calls out in record order: ("entry", the call as it began)
    and ("call", the finished call). Per thread a stack of open calls, so nested probed calls
    (fopen calling malloc) pair right. A call still open when its process exits, or at the end,
    is finished with no return value (exit, longjmp, a trace cut short)."""

    def __init__(self, functions: list, strsize: int, offset_ns: int,
                 stack_of: Optional[Callable[[int], list]] = None,
                 stacks: Optional[Stacks] = None, syscalls: Optional[dict] = None,
                 entries: bool = True, costs=None):
        self.functions = functions
        # -T: per function, the ns of the probes' own share taken off each call's time
        self.costs = costs
        self.strsize = strsize
        self.offset = offset_ns
        self.stack_of = stack_of
        self.stacks = stacks or Stacks()
        # per function: what the record's two text slots hold (prototypes.Slot)
        self.slots = [protos.slots(f.proto) for f in functions]
        self.syscalls = syscalls or {}  # -S: system call number -> Function
        self.entries = entries          # give ("entry", call) items too
        self.open: dict = {}  # tid -> [entry row]
        self._ids = 0

    def function(self, fn: int) -> Function:
        """The function a record's fn names: a probed one, or (-S) a system call."""
        if fn & SYS:
            return self.syscalls.get(fn & 0xFFFF) or Function("", f"SYS_{fn & 0xFFFF}", None)
        return self.functions[fn]

    def _slots(self, fn: int) -> list:
        return syscall_slots(self.function(fn).proto) if fn & SYS else self.slots[fn]

    def feed(self, batch: np.ndarray) -> list:
        done = []
        for r in batch:
            tid = int(r["tid"])
            if int(r["kind"]) == 0:
                stack = self.open.setdefault(tid, [])
                row = self._entry(r, len(stack))
                stack.append(row)
                if self.entries:  # (formatted only for who shows calls as they begin)
                    done.append(("entry", self.began(row)))
                continue
            stack = self.open.get(tid, [])
            fn = int(r["fn"])
            at = next((i for i in range(len(stack) - 1, -1, -1) if stack[i]["_fn"] == fn), None)
            if at is None:
                continue  # its entry came before the probes did
            row = stack.pop(at)
            del stack[at:]  # calls left open inside it never returned (longjmp)
            self._strings(row, r)
            done.append(("call", self._finish(row, int(r["args"][0]), int(r["ts"]),
                                              int(r["err"]))))
        return done

    def end(self, pid: Optional[int] = None) -> list:
        """Finish the open calls of a process (all when None) with no return."""
        done = []
        for tid, stack in list(self.open.items()):
            if stack and (pid is None or stack[0]["pid"] == pid):
                done += [("call", self._finish(row, None, None)) for row in stack]
                del self.open[tid]
        return done

    @staticmethod
    def _read(r, slot: int, mode: int) -> Optional[tuple]:
        """(bytes, cut) of a record's text slot, None when nothing was read into it: a string
        up to its NUL, a buffer as many bytes as were read."""
        flags = int(r["cut"])
        if flags >> (2 + slot) & 1:
            return None
        raw = r[f"str{slot}"]
        if mode in (protos.BYTES_IN, protos.BYTES_OUT):
            n = int(r["lens"]) >> (16 * slot) & 0xFFFF
            if n == 0 and not flags >> slot & 1:
                return None
            return bytes(raw[:n]), bool(flags >> slot & 1)
        return raw.split(b"\0", 1)[0], bool(flags >> slot & 1)

    def _strings(self, row: dict, ret) -> None:
        """What a return brings: strings unreadable at entry (their pages touched by the call
        by now), buffers the call filled, the string it returned."""
        for i, s in enumerate(self._slots(row["_fn"])):
            if s.mode == protos.BYTES_IN or (s.mode == protos.STR and (
                    s.arg in row["_strings"] or not row["_raw"][s.arg])):
                continue
            got = self._read(ret, i, s.mode)
            if got is not None:
                row["_strings"][s.arg] = got[0]  # (arg -1: the string returned)
                if got[1]:
                    row["_cut"].add(s.arg)

    def _entry(self, r, depth: int) -> dict:
        fn = self.function(int(r["fn"]))
        self._ids += 1
        args = [int(a) for a in r["args"]]
        strings, cut = {}, set()
        for i, s in enumerate(self._slots(int(r["fn"]))):
            if s.mode not in (protos.STR, protos.BYTES_IN) or not args[s.arg]:
                continue
            got = self._read(r, i, s.mode)
            if got is not None:
                strings[s.arg] = got[0]
                if got[1]:
                    cut.add(s.arg)
        stack, note = "", ""
        if self.stack_of is not None and int(r["stack"]) >= 0:
            walked = self.stack_of(int(r["stack"]))
            # At the entry the frame pointer is still the caller's: its walk skips the caller's
            # own return address, which the entry read at the stack pointer.
            addrs = walked[:1] + ([int(r["ip"])] if int(r["ip"]) else []) + walked[1:]
            frames, note = self.stacks.name(int(r["pid"]), addrs)
            stack = " ".join(frames)
        return {"_fn": int(r["fn"]), "_raw": args, "_strings": strings, "_cut": cut,
                "_ts": int(r["ts"]), "id": self._ids, "depth": depth, "caller": int(r["ip"]),
                "ts": int(r["ts"]) + self.offset, "pid": int(r["pid"]), "tid": int(r["tid"]),
                "comm": r["comm"].split(b"\0", 1)[0].decode("utf-8", "replace"),
                "library": fn.library, "function": fn.name, "stack": stack, "stack_note": note}

    def began(self, row: dict) -> dict:
        """A call as it began: its arguments as read at entry, no return yet."""
        out = {k: v for k, v in row.items() if not k.startswith("_")}
        out["args"] = protos.format_call(self.function(row["_fn"]).proto, row["_raw"],
                                         dict(row["_strings"]), self.strsize, set(row["_cut"]))
        return out

    def _finish(self, row: dict, ret: Optional[int], ts: Optional[int], err: int = 0) -> dict:
        fn = self.function(row["_fn"])
        out = {k: v for k, v in row.items() if not k.startswith("_")}
        out["args"] = protos.format_call(fn.proto, row["_raw"], row["_strings"], self.strsize,
                                         row["_cut"])
        if ret is None:  # it never returned (an exit, a longjmp, the trace cut short)
            out.update(ret="?", errno=None, error=False, json_ret=None)
        elif row["_fn"] & SYS:
            out.update(_syscall_return(fn, ret))
        else:
            out["error"] = protos.is_error(fn.proto, ret)
            out["ret"] = protos.format_return(fn.proto, ret, err or None, row["_strings"].get(-1),
                                              self.strsize, -1 in row["_cut"])
            out["errno"] = protos.errno_name(err) if err and out["error"] else None
            out["json_ret"] = _json_ret(fn.proto, ret, row["_strings"].get(-1), self.strsize)
        out["duration_ns"] = None if ts is None else ts - row["_ts"]
        out["returned"] = None if ts is None else out["ts"] + out["duration_ns"]  # (its time)
        if ts is not None and self.costs is not None and not row["_fn"] & SYS:
            out["duration_ns"] = max(0, out["duration_ns"] - int(self.costs[row["_fn"]]))
        out["json_args"] = _json_args(fn.proto, row["_raw"], row["_strings"], self.strsize)
        # JSON's strings are cut at -s like the lines': which ones were longer ("ret": the return)
        out["truncated"] = [i for i in sorted(row["_strings"]) if i >= 0 and self._cut(row, i)]
        out["truncated"] += ["ret"] if -1 in row["_strings"] and self._cut(row, -1) else []
        return out

    def _cut(self, row: dict, i: int) -> bool:
        """Whether text i (-1: the string returned) is longer than -s shows."""
        text = row["_strings"][i]
        proto = self.function(row["_fn"]).proto
        if i == -1 or proto.args[i].kind == "str":
            text = text.split(b"\0", 1)[0]
        return i in row["_cut"] or len(text) > self.strsize


SYS = 0x40000000  # a record's fn for system call nr: SYS | nr (tracer.bpf.calls.SYS)


def _signed(raw: int) -> int:
    raw &= (1 << 64) - 1
    return raw - (1 << 64) if raw >> 63 else raw


def _syscall_return(fn: Function, ret: int) -> dict:
    """A system call's return: -errno when it failed (shown as strace shows it), else typed as
    its libc wrapper returns, or signed."""
    v = _signed(ret)
    if -4096 < v < 0:
        name = protos.errno_name(-v)
        return dict(ret=f"-1 {name} ({os.strerror(-v)})", errno=name, error=True, json_ret=-1)
    if fn.proto is None:
        return dict(ret=str(v), errno=None, error=False, json_ret=v)
    return dict(ret=protos.format_return(fn.proto, ret), errno=None, error=False,
                json_ret=_json_ret(fn.proto, ret, None, 0))


def syscall_slots(proto) -> list:
    """What -S reads of a system call's arguments: its libc wrapper's strings and buffers (a
    system call returns no string)."""
    return [s for s in protos.slots(proto) if s.mode != protos.RET_STR]


def _json_args(proto, raw: list, strings: dict, strsize: int) -> list:
    if proto is None:
        return [protos.json_value("ptr", v) for v in raw]
    return [protos.json_value(a.kind, raw[i], strings.get(i), strsize)
            for i, a in enumerate(proto.args[:wire.CALL_ARGS])]


def _json_ret(proto, raw: int, text: Optional[bytes], strsize: int):
    if proto is None:
        return protos.json_value("ptr", raw)
    return None if proto.ret == "void" else protos.json_value(proto.ret, raw, text, strsize)


@dataclass(frozen=True)
class Style:
    """How lines look, as ltrace's options say: timing (-T: <seconds> after a return), stamps
    (-t, -tt, -ttt, -r), ip (-i: the caller's address), indent (-n: spaces per nesting level of
    the thread's open probed calls)."""
    timing: bool = False
    stamps: str = ""
    ip: bool = False
    indent: int = 0


class Lines:
    """ltrace's lines, in call order: a call that returns before the next record of any thread
    is one line; else its entry is printed when that next record comes, as
    `f(args <unfinished ...>`, and its return later as `<... f resumed> ) = ret`. Feed the
    Pairer's items in order; each feed returns the lines it completes."""

    def __init__(self, style: Style = Style()):
        self.style = style
        self.pending: Optional[dict] = None  # the last entry, printed once something follows
        self.last_ts: Optional[int] = None   # -r: the previous line's time
        self.unfinished: dict = {}  # call id -> its arguments as its unfinished line showed them

    def feed(self, kind: str, item: dict) -> list:
        if kind == "entry":
            out = self.flush()
            self.pending = item
            return out
        if self.pending is not None and self.pending["id"] == item.get("id"):
            self.pending = None
            return [self.whole(item)]
        end = item.get("returned") or item["ts"]  # (not ts + -T's duration: less the share)
        # what the call's return brought to its arguments (a buffer filled, a string readable
        # only once the call touched its page) is shown with the resumed part, as ltrace does
        before = self.unfinished.pop(item.get("id"), item["args"])
        args = ", ".join(item["args"]) if item["args"] != before else ""
        return self.flush() + [self._line(item, end, f"<... {self._name(item)} resumed> {args})"
                                          + self._ret(item))]

    def whole(self, c: dict) -> str:
        """A call's one line: it returned before anything else happened."""
        return self._line(c, c["ts"], self._call(c) + self._ret(c))

    def flush(self) -> list:
        """The pending entry as an unfinished line (something else came, or time passed)."""
        if self.pending is None:
            return []
        item, self.pending = self.pending, None
        self.unfinished[item["id"]] = item["args"]
        return [self._line(item, item["ts"], self._call(item)[:-1] + " <unfinished ...>")]

    def _name(self, c: dict) -> str:
        # a system call (-S) has no library: SYS_openat, as ltrace -S shows it
        return f"{c['library']}!{c['function']}" if c["library"] else c["function"]

    def _call(self, c: dict) -> str:
        return f"{self._name(c)}({', '.join(c['args'])})"

    def _ret(self, c: dict) -> str:
        text = f" = {c['ret']}" if c["ret"] != "" else ""
        if self.style.timing and c.get("duration_ns") is not None:
            text += f" <{c['duration_ns'] / 1e9:.6f}>"
        return text

    def _line(self, c: dict, ts: int, body: str) -> str:
        who = str(c["pid"]) if c["tid"] == c["pid"] else f"{c['pid']}/{c['tid']}"
        head = [who, c["comm"]]
        if self.style.stamps:
            head.append(stamp(self.style.stamps, ts, self.last_ts))
        self.last_ts = ts
        if self.style.ip:
            head.append(f"[{c.get('caller') or 0:#x}]")
        return " ".join(head) + " " + " " * (self.style.indent * c.get("depth", 0)) + body


def stamp(style: str, ts: int, previous: Optional[int]) -> str:
    """A line's time as ltrace writes it: -t 12:01:02, -tt 12:01:02.123456, -ttt
    1700000000.123456 (Unix time), -r the seconds since the previous line."""
    if style == "r":
        return f"{(ts - (previous if previous is not None else ts)) / 1e9:9.6f}"
    if style == "ttt":
        return f"{ts // 10**9}.{ts % 10**9 // 1000:06d}"
    text = time.strftime("%H:%M:%S", time.localtime(ts // 10**9))
    return text + (f".{ts % 10**9 // 1000:06d}" if style == "tt" else "")


def calls_frame(calls: list) -> pd.DataFrame:
    """Finished calls as a frame: args a list of ltrace's texts, ret the typed text."""
    import pandas as pd
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
    if call.get("truncated"):
        out["truncated"] = call["truncated"]
    if call.get("stack") or call.get("stack_note"):
        out["stack"] = call["stack"].split() if call.get("stack") else []
        if call.get("stack_note"):
            out["stack_note"] = call["stack_note"]
    if timing:
        out["duration_ns"] = call["duration_ns"]
    return out


def counts_frame(functions: list, stats: np.ndarray, timed: bool) -> pd.DataFrame:
    """ltrace -c's table from the kernel's counters, busiest first (by time with -T, else by
    calls). Without -T nothing returns to the probes: errors and times are unknown (NA)."""
    import pandas as pd
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
    import pandas as pd
    rows = []
    for i, f in enumerate(functions):
        for b in np.flatnonzero(hist[i]).tolist():
            rows.append((f.library, f.name, 0 if b == 0 else 1 << b, (2 << b) - 1, int(hist[i, b])))
    return pd.DataFrame(rows, columns=HISTOGRAM_COLUMNS)


def stacks_frame(functions: list, counts: dict) -> pd.DataFrame:
    """--stack with -c: calls per (function, user stack), most first. counts: {(function
    index, (frames as text, note)): calls}; the note (the walk was cut, the process was gone)
    closes the stack in brackets."""
    import pandas as pd
    rows = [(functions[fn].library, functions[fn].name,
             " ".join(frames) + (f" [{note}]" if note else ""), n)
            for (fn, (frames, note)), n in counts.items() if fn < len(functions)]
    df = pd.DataFrame(rows, columns=["library", "function", "stack", "calls"])
    return df.sort_values(["calls", "function"], ascending=[False, True], ignore_index=True)
