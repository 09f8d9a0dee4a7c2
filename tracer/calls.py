"""CallTracer: `keytrace calls`, ltrace's interface on keytrace's engine.

Patterns are resolved to functions (tracer.host.patterns), typed from the prototype table or
DWARF (tracer.host.prototypes), and probed in one of three modes:

  count (-c)       one probe per function bumps a per-CPU counter; no record per call. It sits
                   on the function's planned site (an emulated instruction of its prologue,
                   tracer.host.planner.plan_entry) where there is one, else on the entry;
  time (-c -T)     entry and return probes: counts, errors, total and max time, and a log2
                   latency histogram per function, all kept in the kernel;
  trace (default)  an entry record (arguments, strings) and a return record per call, paired
                   per thread into ltrace's lines.
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence

import numpy as np

from . import wire
from .analysis import calls as report
from .bpf import calls as kc
from .bpf import calibrate, stepcheck, units
from .bpf.loader import DEFAULT_RING_PAGES, Program, check_ring_pages
from .errors import KeytraceError, UsageError
from .host import patterns as pat
from .host import planner
from .host import prototypes as protos
from .host import proc
from .host.demangle import demangle as demangled
from .host.elf import read_vaddr
from .tracing import Tracing, check_sites

if TYPE_CHECKING:  # frames are built by tracer.analysis.calls, after tracing
    import pandas as pd

LIFECYCLE_PAGES = 64  # fork/exec/exit records only: 256 KiB


def prototype(t: pat.Target) -> Optional[protos.Prototype]:
    """The table's prototype, else what DWARF says (an IFUNC pair named a|b: by the first)."""
    name = t.function.split("|")[0]
    return protos.lookup(name) or protos.dwarf_prototype(t.path, name)


MAX_STRSIZE = 4096  # -s: a record has two slots of about this size (lengths kept in 16 bits)


class CallTracer(Tracing):
    """Trace or count library calls. patterns: [LIB:]FUNC globs and !FUNC exclusions; pids or
    command (argv) as KeyTracer takes them, neither: the whole host. count: kernel counters
    only (-c); timing: durations (-T); stacks: user stacks (--stack). on_call(call) gets each
    finished call (a dict, see tracer.analysis.calls) in trace mode; keep: also keep them;
    on_event(kind, item) gets calls begun ("entry") and finished ("call") in call order.
    quiet_stdout: the launched command writes its standard output to our standard error."""

    def __init__(self, patterns: Sequence[str], pids: Optional[Iterable[int]] = None,
                 command: Optional[Sequence[str]] = None, count: bool = False,
                 timing: bool = False, stacks: bool = False, strsize: int = 32,
                 sites: str = "planned", limit: int = pat.DEFAULT_LIMIT, keep: bool = True,
                 on_call: Optional[Callable[[dict], None]] = None, interval: float = 0.05,
                 on_event: Optional[Callable[[str, dict], None]] = None,
                 ring_pages: int = DEFAULT_RING_PAGES,
                 on_note: Optional[Callable[[str], None]] = None, quiet_stdout: bool = False,
                 on_progress: Optional[Callable[[int, int], None]] = None,
                 demangle: bool = False, stack_depth: Optional[int] = None,
                 syscalls: bool = False):
        if not 0 <= strsize <= MAX_STRSIZE:
            raise UsageError(f"-s takes a size from 0 to {MAX_STRSIZE}, not {strsize}")
        super().__init__(pids, command, interval, on_note, quiet_stdout)
        self.patterns = list(patterns)
        self._asked = list(patterns)  # as given (no -e: the imports replace self.patterns)
        if not self.patterns and not (pids or command):
            raise UsageError("-e is needed to trace the whole host (with a command or -p, no -e "
                             "traces the functions the program imports)")
        self.mode = ("time" if timing else "count") if count else "trace"
        self.timing, self.stacks, self.strsize = timing, stacks, strsize
        self.sites, self.limit, self.keep = check_sites(sites), limit, keep
        self.on_call, self.on_event = on_call, on_event
        self.ring_pages = check_ring_pages(ring_pages)
        self.on_progress = on_progress    # (functions attached, of how many) while attaching
        self.demangle = demangle          # -C: C++ names as written, in patterns and output
        if stack_depth is not None and stack_depth < 1:
            raise UsageError(f"-w takes a number of frames of 1 or more, not {stack_depth}")
        self.stack_depth = stack_depth    # -w: frames of each stack shown (stacks: all)
        self._stack_names = report.Stacks(stack_depth)  # -c --stack: named at the end
        self._looked: dict = {}  # pid -> when its modules were last read (-c --stack)
        self.syscalls = syscalls          # -S: system calls beside the library calls
        self._sys: dict = {}              # -S: system call number -> report.Function
        self.targets: list = []
        self.skipped: dict = {}     # "library!function" -> why no probe could go on it
        self.costs = None           # -T: per function, the ns of the probes' share taken off
        self.functions: list = []
        self.placement: dict = {}   # function index -> "planned +0x4" or why the entry
        self.calls: list = []
        self.lost = 0
        self._resolved: list = []
        self._policy = None
        self._sites: list = []
        self._dropped: set = set()  # functions whose probes failed to attach: not in the tables
        self._reader = None
        self._pairer: Optional[report.Pairer] = None
        # (stats, histograms, stack counts, system call stats) read at stop
        self._final: Optional[tuple] = None
        self._objects: list = []  # FUNC@OBJECT: the objects (pat.CallerObject), by index
        self._starts: list = []   # where each object's probe goes (a safe site of its first code)
        self._groups: list = []   # function indexes probed at one site, first first

    # -- life cycle (tracer.tracing) -------------------------------------------------------------
    thread_name = "keytrace-calls"
    from_exec = True  # a launched command is traced from its own exec, not its gate's work

    def _prepare(self, exe) -> None:
        if not self.patterns:  # ltrace's default: every function the program imports
            self.patterns = pat.imports(self.pids or (), exe)
            self._note(f"no -e: the {len(self.patterns)} functions the program imports, the calls "
                       "it makes (FUNC@MAIN)")
        # A pattern that names nothing is told first: it needs no privileges to find out.
        self._resolved = pat.resolve(self.patterns, self.pids or (), exe, self.limit,
                                     self.demangle)
        # FUNC@OBJECT: each object asked for, found now (a usage error says which is not)
        for spec in dict.fromkeys(t.caller for t in self._resolved if t.caller):
            self._objects.append(pat.main_program(self.pids or (), exe) if spec == "MAIN" else
                                 pat.caller_library(spec, self.pids or (), exe))

    def _open(self, filter_pids) -> None:
        self._policy = stepcheck.policy(self._note)
        self.targets, self._sites = self._place(self._resolved)
        # bcc refuses more than BCC_PROBE_LIMIT (1000) probes a process: 2 a function traced
        probes_needed = 2 * len(self.targets) + 2
        if probes_needed > int(os.environ.get("BCC_PROBE_LIMIT", "1000") or 1000):
            os.environ["BCC_PROBE_LIMIT"] = str(probes_needed)
        self.functions = [report.Function(t.library, self._shown(t), prototype(t))
                          for t in self.targets]
        for t in self.targets:
            if t.ifunc and "resolver" in t.ifunc:
                self._note(t.ifunc)
        # functions probed at one site share its probes (one function asked for from two
        # callers): the kernel takes one probe per site, and bcc names a probe by its site
        groups: dict = {}
        for i, (t, (site, count)) in enumerate(zip(self.targets, self._sites)):
            at = count if self.mode == "count" else site
            groups.setdefault((pat.identity(t.path) or t.path, at), []).append(i)
        self._groups = list(groups.values())
        index = {o.spec: k for k, o in enumerate(self._objects)}
        probes = [kc.Probe(i, tuple(protos.slots(f.proto)), report.failure_of(f.proto),
                           index.get(t.caller, -1))
                  for i, (f, t) in enumerate(zip(self.functions, self.targets))]
        self._starts = []
        for o in self._objects:
            try:
                # code of the object that runs before any call it makes: its load bias
                self._starts.append(planner.entry_site(o.path, o.start, f"{o.spec}'s first code",
                                                       self._policy).address)
            except planner.Refused as e:
                raise KeytraceError(f"FUNC@{o.spec}: no probe can go on {o.name}'s first code: "
                                    f"{e}") from None
        trace_pages = self.ring_pages if self.mode == "trace" else 1
        # -T: null functions timed at start under the same programs (calibrate), after ours
        calibration = calibrate.programs(len(probes)) if self.timing else ""
        self._program = Program(
            [kc.CALLS, units.LIFECYCLE], filter_pids, LIFECYCLE_PAGES,
            prelude=kc.prelude(len(probes) + (len(calibrate.KINDS) if self.timing else 0),
                               self.strsize, trace_pages, self.stacks, calibrate=self.timing,
                               errno=self.mode == "trace" and any(
                                   f.proto and f.proto.errno_on for f in self.functions),
                               objects=len(self._objects),
                               syscalls=self.mode if self.syscalls else None),
            programs=kc.programs([[probes[i] for i in g] for g in self._groups], self.mode,
                                 [(at, o.lo, o.hi) for at, o in zip(self._starts, self._objects)])
            + calibration,
            policy=self._policy, note=self._note)
        self._program.open()
        if self.timing:
            self._calibrate(len(probes))
        if self.syscalls:
            names = kc.syscall_names()
            self._sys = {nr: report.Function("", f"SYS_{name}", protos.lookup(name))
                         for nr, name in names.items()}
            kc.set_syscall_slots(self._program, {nr: report.syscall_slots(f.proto)
                                                 for nr, f in self._sys.items() if f.proto})
        if self._objects:
            self._attach_callers(filter_pids)
        self._attach()
        if self.mode == "trace":
            self._reader = self._program.reader("kc_events", wire.call_record(self.strsize),
                                                trace_pages)
            self._pairer = report.Pairer(self.functions, self.strsize,
                                         wire.boot_to_wall_offset_ns(),
                                         self._stack if self.stacks else None,
                                         report.Stacks(self.stack_depth), self._sys,
                                         entries=self.on_event is not None,
                                         costs=self.costs)

    def _attach_callers(self, filter_pids) -> None:
        """Where each FUNC@OBJECT object lies: a probe on its first code (the program's entry
        point, a library's DT_INIT) for the processes that load it from now on, and the -p
        processes' mappings of it now."""
        table = self._program.bpf[b"kc_objects"]
        for k, (o, at) in enumerate(zip(self._objects, self._starts)):
            self._program.attach_programs(o.path, [(at, f"kc_start_{k}", False)])
            ident = pat.identity(o.path)
            for pid in filter_pids or ():
                spans = [s for s, _, off, path in proc.file_mappings(pid)
                         if off == 0 and (path == o.name or pat.identity(path) == ident)]
                if spans:
                    bias = min(spans) - (o.lo & ~0xFFF)
                    table[table.Key(pid, k)] = table.Leaf(bias + o.lo, bias + o.hi)

    def _shown(self, t) -> str:
        """A function's name in output: its symbol, or with -C its C++ name as written; FUNC@OBJECT
        says so."""
        names = t.function.split("|")
        shown = "|".join(demangled(n) for n in names) if self.demangle else t.function
        return shown + (f"@{t.caller}" if t.caller else "")

    def _calibrate(self, first: int) -> None:
        """-T: the probes' own share of a call, measured now on null calls, taken off each
        function's times by the kind of its entry site (tracer.bpf.calibrate); told once."""
        sites = [read_vaddr(t.path, site, 15) for t, (site, _) in zip(self.targets, self._sites)]
        self.costs, measured = calibrate.costs(self._program, sites, first)
        if measured:
            self._note("-T: times are less the probes' own share, measured now on null calls: "
                       + ", ".join(f"{ns / 1000:.2f} us at {calibrate.SAID[k]}"
                                   for k, ns in measured.items()))
        else:
            self._note("-T: times include the probes' own share (no null call could be probed)")

    def _place(self, targets: list) -> tuple:
        """(the targets a probe can go on, their sites: (entry or return site, count site)),
        before anything is attached. A function no probe can safely go on is told and left out;
        one named exactly (not by a glob) is a usage error: the user asked for it by name."""
        named = {p.function for p in (pat.parse_pattern(x, self.demangle) for x in self._asked)
                 if not p.exclude and not pat.is_glob(p.function)}
        kept, sites = [], []
        for t in targets:
            try:
                if t.unprobeable:
                    raise planner.Refused(t.unprobeable)
                if self.mode == "count":
                    count, how = self._count_site(t)
                    entry = count
                else:
                    entry = count = self._entry_site(t)
                    how = "entry and return" + (
                        f" at +{entry - t.address:#x} (its first instruction is unsafe to probe)"
                        if entry != t.address else "")
            except planner.Refused as e:
                why = str(e)
                if named & set(t.function.split("|")):
                    raise UsageError(f"cannot probe {t.library}!{t.function}: {why}") from None
                self.skipped[f"{t.library}!{t.function}"] = why
                self._note(f"skipping {t.library}!{t.function}: {why}")
                continue
            self.placement[len(kept)] = how
            kept.append(t)
            sites.append((entry, count))
        if not kept:
            raise KeytraceError("no function the patterns select can be probed safely here "
                                f"({len(self.skipped)} skipped)")
        return kept, sites

    def _entry_site(self, t: pat.Target) -> int:
        """The function's entry, or the first instruction after it that is safe to probe and
        sees the same arguments (planner.entry_site); Refused when there is none."""
        return planner.entry_site(t.path, t.address, t.function, self._policy).address

    def _count_site(self, t: pat.Target) -> tuple:
        """(address, how) of a counting probe: the planned site, else the (safe) entry site;
        with --stack the entry, where the caller's return address is at the stack pointer."""
        if self.sites != "planned" or self.stacks:
            site = self._entry_site(t)
            why = "asked for" if self.sites != "planned" else "--stack reads the caller there"
            return site, f"entry ({why})" + (f" at +{site - t.address:#x}" if site != t.address else "")
        try:
            planned = planner.plan_entry(t.path, t.address, t.size, t.function, self._policy)
            if t.caller and not planner.keeps_stack(t.path, t.address, planned.address):
                raise planner.Refused("the stack moves before the planned site: no return "
                                      "address to tell the caller by")
        except planner.Refused as e:
            site = self._entry_site(t)
            return site, f"entry{f' +{site - t.address:#x}' if site != t.address else ''} ({e})"
        return planned.address, f"planned +{planned.address - t.address:#x} ({planned.insn.hex()})"

    def _attach(self) -> None:
        """Site by site: one that fails to attach is told and its functions left out."""
        total, done = len(self.targets), 0
        for group in self._groups:
            t = self.targets[group[0]]
            entry, ret = kc.names(group[0], self.mode)
            site, count = self._sites[group[0]]
            probes = [(count if self.mode == "count" else site, entry, False)]
            if ret:
                probes.append((site, ret, True))
            try:
                self._program.attach_programs(t.path, probes)
            except KeytraceError as e:
                for i in group:
                    name = f"{self.targets[i].library}!{self.functions[i].name}"
                    self.skipped[name] = str(e)
                    self._dropped.add(i)
                    self._note(f"skipping {name}: {e}")
            done += len(group)
            if self.on_progress:
                self.on_progress(done, total)
        if self._program.attached == 0:
            raise KeytraceError("no probe could be attached: " + "; ".join(self.skipped.values()))

    def poll(self, final: bool = False) -> int:
        """Drain the rings once; returns the calls finished."""
        with self._lock:
            if self._program is None or self._program.bpf is None:
                return 0
            done = []  # (kind, item) in record order: "entry" (a call begun) or "call" (finished)
            # Exits first: every record a process wrote before an exit read here is in the calls
            # ring by then, so its calls are paired before the exit finishes those left open.
            life = self._program.drain()
            if self._reader is not None:
                done = self._pairer.feed(self._reader.drain())
            for pid in life["pid"][life["op"] == wire.CODE["exit"]].tolist():
                if self._pairer is not None:
                    done += self._pairer.end(pid)
                    self._pairer.stacks.forget(pid)  # (its pid may come back as another process)
            if final and self._pairer is not None:  # calls still open: nothing more will come
                done += self._pairer.end()
            if self._reader is not None:
                self.lost = kc.lost(self._program)
            if self.stacks and self.mode != "trace":
                self._stack_lives(life)
                if self._program.pids is not None:
                    self._look_at_processes()
            finished = 0
            for kind, item in done:
                if self.on_event:
                    self.on_event(kind, item)
                if kind != "call":
                    continue
                finished += 1
                if self.keep:
                    self.calls.append(item)
                if self.on_call:
                    self.on_call(item)
            return finished

    def _stack_lives(self, life) -> None:
        """-c --stack: a process's modules as read are forgotten at its exec (a new image) and
        when its pid is forked anew (another process); kept at its exit (its stacks are named
        after it)."""
        op = life["op"]
        for pid in life["pid"][op == wire.CODE["exec"]].tolist():
            self._stack_names.forget(pid)
            self._looked.pop(pid, None)
        for pid in life["other"][op == wire.CODE["fork"]].tolist():
            self._stack_names.forget(pid)
            self._looked.pop(pid, None)
        for pid in life["pid"][op == wire.CODE["exit"]].tolist():
            self._looked.pop(pid, None)

    def _look_at_processes(self) -> None:
        """-c --stack: the traced processes' modules, read while they live (their stacks are
        named at the end, when most are gone); again each half second (libraries loaded since).
        A process that lives less than a drain's interval is not seen: its frames stay hex."""
        now = time.monotonic()
        for pid in self._program.traced_pids():
            if now - self._looked.get(pid, -1.0) > 0.5:
                self._stack_names.look(pid)
                self._looked[pid] = now

    def _finish(self) -> None:
        self._final = self._counters()

    # -- results --------------------------------------------------------------------------------
    def _stack(self, stack_id: int) -> list:
        return kc.stack(self._program, stack_id)

    def _counters(self) -> tuple:
        n = len(self.functions)
        stats = kc.read_stats(self._program, n)
        hist = kc.read_histograms(self._program, n) if self.mode != "count" else None
        if self.costs is not None and hist is not None:
            # -T: the kernel keeps totals as measured (calibrate); the share comes off each call
            # timed, which the histogram counts (not one still running, nor one too deep)
            share = (hist.sum(axis=1) * self.costs).astype(np.uint64)
            stats[:, 2] = np.where(stats[:, 2] > share, stats[:, 2] - share, 0)
        stacks = None
        if self.stacks and self.mode != "trace":
            stacks = {}
            for (fn, sid, pid, caller), n in kc.read_stack_counts(self._program).items():
                addrs = self._stack(sid)
                if addrs and caller:  # the caller's return address, read at the entry
                    addrs = addrs[:1] + [caller] + addrs[1:]
                frames, note = self._stack_names.name(pid, addrs)
                key = (fn, (tuple(frames), note))
                stacks[key] = stacks.get(key, 0) + n
        sys_stats = kc.read_syscall_stats(self._program) if self.syscalls else {}
        return stats, hist, stacks, sys_stats

    def _now(self) -> tuple:
        if self._final is not None:
            return self._final
        with self._lock:
            if self._program is None:
                raise KeytraceError("this tracer was never started")
            return self._counters()

    def counts(self) -> pd.DataFrame:
        """ltrace -c's table (tracer.analysis.calls.COUNT_COLUMNS), from the kernel's counters
        (exact when records are lost); errors and times where calls are probed at return."""
        kept = self._kept()
        stats, _, _, sys_stats = self._now()
        functions = [self.functions[i] for i in kept]
        rows = stats[kept]
        if sys_stats:  # -S: the system calls' rows too
            functions += [self._sys.get(nr) or report.Function("", f"SYS_{nr}", None)
                          for nr in sys_stats]
            rows = np.vstack([rows, np.array(list(sys_stats.values()), dtype=np.uint64)])
        return report.counts_frame(functions, rows, self.mode != "count")

    def _kept(self) -> list:
        return [i for i in range(len(self.functions)) if i not in self._dropped]

    def histograms(self) -> pd.DataFrame:
        """The log2 latency histograms, kept in the kernel (any mode but -c without -T)."""
        hist = self._now()[1] if self.mode != "count" else None
        if hist is None:
            raise KeytraceError("latency histograms need timing=True (-T) when counting (-c)")
        kept = self._kept()
        return report.histogram_frame([self.functions[i] for i in kept], hist[kept])

    def stack_counts(self) -> pd.DataFrame:
        stacks = self._now()[2] if self.mode != "trace" else None
        if stacks is None:
            raise KeytraceError("calls per stack need count=True, stacks=True (-c --stack)")
        return report.stacks_frame(self.functions, stacks)

    def frame(self) -> pd.DataFrame:
        """Every call kept (trace mode), as a frame (tracer.analysis.calls.CALL_COLUMNS)."""
        return report.calls_frame(self.calls)
