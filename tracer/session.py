"""KeyTracer: a tracing session. Probes in, a live Ledger out; for the CLI, notebooks and agents.

    with KeyTracer(command=["./host", "libleaky.so", "10"]) as t:
        t.wait()
    t.ledger.summary()

start() returns once the probes are attached; a background thread drains the ring buffer every
`interval` seconds into the ledger. stop() (also on leaving the with-block, at interpreter exit,
or after a failed start) drains what is left, detaches every probe and ends a launched command.
"""
from __future__ import annotations

import functools
import os
import time
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from . import resource, wire
from .bpf import pairs as bpf_pairs
from .bpf import stepcheck, units
from .bpf.loader import DEFAULT_RING_PAGES, Program, check_ring_pages
from .errors import KeytraceError, UsageError
from .host import keytable, proc, tables
from .host import patterns as pat
from .resources import keys as keys_resource
from .resources import pairs as pair_specs
from .host.sight import sight
from .state.tracker import Tracker
from .discovery import Discovery
from .tracing import Tracing, check_sites

SAMPLE_EVERY = 0.05  # seconds between two reads of one process's sampled tables
QUIET = 0.005        # and since its modules last changed: one quiet poll (a reload going on)
_MODULE_OPS = [wire.CODE[o] for o in ("dlopen_begin", "dlopen", "dlclose", "map", "unmap")]


def _no_reader(pid, host_libc) -> tuple:
    return "not read: keytrace cannot read this table at first sight", [], None


class KeyTracer(Tracing):
    """Trace pthread key creation and deletion.

    pids: trace these running processes (and their children); command: launch this argv and
    trace it with its children; neither: trace the whole host. keep_events=False keeps only
    per-process state (flat memory for long runs). on_ready is called once probes are attached;
    on_note with each line worth telling a user while tracing (a C library probed late, a
    process that cannot be traced), also kept in ``notes``.

    A process met while already running (a -p pid, or host-wide at its first event) starts
    from its live key table (tracer.host.sight): traced events are deltas on it.

    sites: "planned" probes pthread_key_create/delete on instructions the kernel emulates
    (tracer.host.planner), where a plan is proved and passes its self-test; "entry" uses
    entry and return probes everywhere.

    ledger: the state to feed, a tracer.analysis Ledger by default; an agent passes a bare
    Tracker, which needs no pandas.

    resources: the resources keytrace knows to trace and judge (tracer.resources: "keys",
    "timers"; "all"); pairs: acquire/release pairs of the user's to trace beside them, through
    the same ledger ("libc:fopen=ret/fclose=arg0": tracer.resources.pairs); limit: their
    handles' limit per process, for a forecast. ledger.summary(resource="fopen/fclose")
    answers for one; shown lists the resources asked for.
    """

    def __init__(self, pids: Optional[Iterable[int]] = None, command: Optional[Sequence[str]] = None,
                 keep_events: bool = True, ring_pages: int = DEFAULT_RING_PAGES,
                 interval: float = 0.01, on_ready: Optional[Callable[["KeyTracer"], None]] = None,
                 on_note: Optional[Callable[[str], None]] = None, sites: str = "planned",
                 ledger: Optional[Tracker] = None, pairs: Sequence[str] = (),
                 limit: Optional[int] = None, resources: Sequence[str] = ("keys",)):
        if limit is not None and limit < 1:
            raise UsageError(f"--limit takes a number of handles of 1 or more, not {limit}")
        parsed = [pair_specs.parse(p) for p in pairs]  # bad input: one line before anything
        chosen = resource.select(resources, traced=True)
        if limit is not None and not parsed:
            raise UsageError("--limit is the limit of --pair handles; pthread keys' limit is "
                             "their C library's (glibc 1024, musl 128)")
        super().__init__(pids, command, interval, on_note)
        self.sites = check_sites(sites)
        self.on_ready = on_ready
        if ledger is None:
            from .analysis.ledger import Ledger
            ledger = Ledger(keep_events=keep_events)
        self.ledger = ledger
        self._ring_pages = check_ring_pages(ring_pages)
        self._offset = wire.boot_to_wall_offset_ns()
        self._snapshotted: set = set()  # pids whose current image's modules are in the ledger
        self._reread: dict = {}          # pid -> the poll after which its table is read
        self._polls = 0
        self._host_libc: Optional[str] = None
        # What it traces: pthread keys (the first resource registered: its probes and the
        # modules' are the ground every other stands on), the resources chosen, and the user's
        # pairs; shown: the resources its report is about, in order.
        users = [pair_specs.declare(p, limit) for p in parsed]
        self.pairs = [r for r in chosen if "spec" in r.extra] + users
        self._pair_targets: list = []
        self.resources = [resource.default()] + self.pairs
        self.shown = [r.name for r in chosen] + [r.name for r in users]
        # The resources whose tables are read, not traced: at first sight and after each
        # completed reload cycle (an unmap), at most every SAMPLE_EVERY seconds per process.
        self.sampled = [r for r in chosen if not r.traced]
        self._owed: set = set()          # pids whose tables are to be read
        self._sampled_at: dict = {}      # pid -> when its tables were last read (monotonic)
        self._moved_at: dict = {}        # pid -> when its modules last changed (monotonic)
        # Reads made after a drain go in with the next one, in time order among its records:
        # a dlopen the process began between the drain and the read comes before the read.
        self._pending: list = []
        self._units = units.tracer_units([r.extra["unit"] for r in self.resources
                                          if "unit" in r.extra] + ([bpf_pairs.PAIRS] if self.pairs else []))
        self._found = Discovery(units.functions(self._units), self._note)  # the C libraries
        self._readers = {r.name: r.reader or _no_reader for r in self.resources}
        self._early: list = []           # records drained before the poll thread ran
        self._reconciled = 0.0           # when the kernel's counts were last compared
        self._lost_base = 0              # lost by the start-up self-test: not the ledger's
        self.plan_notes: list[str] = []  # which probe sites each file got, and why
        self._policy = None              # which instructions a probe may go on (stepcheck)
    # -- life cycle -----------------------------------------------------------------------------
    thread_name = "keytrace-poll"

    def _prepare(self, exe) -> None:
        """The pairs' functions, found as keytrace calls finds them (a name that is none is a
        mistake in what was asked: one line, before any privilege is needed)."""
        for p in self.pairs:
            lib = p.extra["library"]
            try:
                acq = pat.resolve([f"{lib}:{p.acquire[0]}"], self.pids or (), exe, limit=8)
                rel = pat.resolve([f"{lib}:{p.release[0]}"], self.pids or (), exe, limit=8)
            except KeytraceError as e:
                raise UsageError(f"--pair {p.extra['spec']!r}: {e}") from None
            unprobeable = [t for t in acq + rel if t.unprobeable]
            if unprobeable:
                raise UsageError(f"--pair {p.extra['spec']!r}: {unprobeable[0].unprobeable}")
            self._pair_targets.append((acq, rel))

    def start(self, background: bool = True) -> "KeyTracer":
        super().start(background)
        if self.on_ready:
            self.on_ready(self)
        return self

    def _open(self, filter_pids) -> None:
        targets = self._found.initial(filter_pids, self.command, self.process is not None)
        self._policy = stepcheck.policy(self._note)
        plans, notes = keys_resource.plans(targets, self._policy) if self.sites == "planned" \
            else ({}, [])
        self.plan_notes += notes
        planned, sites = keys_resource.planned_programs(
            [(t.flavour, plans[t.ident]) for t in targets if t.ident in plans])
        self._program = Program(self._units, filter_pids, self._ring_pages, policy=self._policy,
                                programs=planned + "\n" + bpf_pairs.programs(self.pairs),
                                sites=sites, note=self._note)
        self._program.open()
        self._found.program = self._program
        self._attach_targets(targets, plans)
        self._attach_pairs()

    def _attach_pairs(self) -> None:
        """Each pair's acquire gets an entry and a return probe, on sites the policy allows (an
        unsafe entry moves past its first instruction). Its release reads one argument only: its
        probe goes on the first emulated instruction that still sees it (a trap, no single
        step: a twentieth of the cost here), else on the entry."""
        for i, ((acquires, releases), p) in enumerate(zip(self._pair_targets, self.pairs)):
            enter, ret, release = bpf_pairs.names(i)
            for t in acquires:
                site = self._program.entry_site(t.path, t.address, t.function)
                self._program.attach_programs(t.path, [(site, enter, False), (site, ret, True)])
            for t in releases:
                site = self._program.argument_site(t.path, t.address, t.function,
                                                   (int(p.release_handle[3:]),))
                self._program.attach_programs(t.path, [(site, release, False)])

    def _ready(self) -> None:
        # Met now, while they surely run: the -p processes, and the launched command's gate (its
        # exec starts a fresh, fully traced image).
        for pid in (self.pids or []) + ([self.process.pid] if self.process else []):
            self._meet_running(pid)

    def _attach_targets(self, targets, plans) -> None:
        for t in targets:
            self._found.attach(t, plans.get(t.ident))
        for (path, function), (entry, site) in self._program.moved.items():
            self.plan_notes.append(f"{path}: {function}'s entry probe at +{site - entry:#x} "
                                   "(its first instruction is unsafe to probe here)")
        self._host_libc = keytable.host_libc()
        if plans:
            self._self_test(targets, plans)
            self._lost_base = self._program.lost()

    def _self_test(self, targets, plans) -> None:
        """The planned sites are trusted once they pass their self-test on this machine
        (tracer.resources.keys.self_test); else those files go back to entry probes."""
        ok, got, others = keys_resource.self_test(self._program)
        self._early += others
        names = ", ".join(sorted({os.path.basename(t.path) for t in targets if t.ident in plans}))
        if ok:
            self.plan_notes.insert(0, f"planned sites on {names} (self-test passed)")
            return
        self._note(f"the planned probe sites failed their self-test (saw {got}): entry probes "
                   "instead")
        for t in targets:
            if t.ident in plans:
                self._found.reattach(t)
        self.plan_notes.insert(0, "entry probes (the planned sites failed their self-test)")


    def _sight(self, pid: int, identity: bool = True) -> dict:
        """What the host shows of a running process (tracer.host.sight), its modules' munmaps
        watched from now on, so their keys become orphaned when a reload unmaps them."""
        seen = sight(pid, self._readers, self._host_libc, identity)
        units.watch_unmaps(self._program, pid, [base for _, base in seen.get("modules", ())])
        return seen

    def meet(self, pids: Optional[Iterable[int]] = None) -> int:
        """Read the tables of these running processes (every user process when None) into the
        ledger, as at first sight: a process known already gains any key the records missed,
        and none twice. Returns how many were read."""
        n = 0
        for pid in (proc.pids() if pids is None else pids):
            if pid != os.getpid():
                n += self._meet_running(pid)
                if pids is None and self.pids is None:
                    # and the drain looks again for unprobed C libraries: a copy an image maps
                    # only under some environment (LD_LIBRARY_PATH) is found here at the latest
                    self._found.recheck(pid)
        return n

    def _meet_running(self, pid: int) -> int:
        """A process traced by pid is met now, while it surely runs: who it is, its modules, and
        its key table as the state tracing starts from."""
        try:
            st = proc.stat(pid)
        except (OSError, IndexError, ValueError):
            return 0
        if st.kernel_thread:
            return 0
        self._snapshotted.add(pid)
        self.ledger.observe(pid, time.time_ns(), st.comm, **self._sight(pid))
        self._sample([pid])
        return 1

    def _sample(self, pids, defer: bool = False) -> None:
        """Read the sampled resources' tables of these processes now, into the ledger; defer:
        with the next drain's records, where its time puts it among them."""
        if not self.sampled:
            return
        cache: dict = {}
        now = time.monotonic()
        for pid in pids:
            self._sampled_at[pid] = now
            try:
                st = proc.stat(pid)
            except (OSError, IndexError, ValueError):
                continue  # gone: its last read stands
            if st.state == "Z" or not self.ledger.knows(pid):
                continue  # a zombie's tables are empty: not what it held
            comm = st.comm
            # a dangling handler's library, named from the instances traced (it is unmapped)
            cache["library_at"] = functools.partial(self.ledger.library_at, pid)
            for r in self.sampled:
                began = time.time_ns()
                try:
                    census = r.census(pid, cache)
                    rec = Tracker.sample_records(pid, time.time_ns(), comm, r.name, census,
                                                 began=began)
                except (tables.Unreadable, OSError, ValueError, KeyError, IndexError) as e:
                    if not proc.alive(pid):
                        break
                    why = str(e) if isinstance(e, tables.Unreadable) else \
                        f"not read: {type(e).__name__}: {e}"
                    rec = Tracker.sample_records(pid, time.time_ns(), comm, r.name, why=why)
                if defer:
                    self._pending.append(rec)
                else:
                    self.ledger.ingest_records(rec, 0)
            tables.drop_process(cache, pid)

    def _sample_owed(self, final: bool) -> None:
        now = time.monotonic()
        # read between cycles only: its modules still for a moment, and all in one phase (a
        # server mid-restart has half its modules loaded)
        due = [pid for pid in self._owed
               if final or (now - self._sampled_at.get(pid, 0.0) >= SAMPLE_EVERY
                            and now - self._moved_at.get(pid, 0.0) >= QUIET
                            and self.ledger.settled(pid))]
        self._owed.difference_update(due)
        self._sample(due, defer=not final)

    def _read_late(self) -> None:
        for pid, due in list(self._reread.items()):
            if self._polls < due:
                continue
            del self._reread[pid]
            try:
                comm = proc.stat(pid).comm
            except (OSError, IndexError, ValueError):
                continue  # gone: nothing more to read
            self.ledger.observe(pid, time.time_ns(), comm, late=True,
                                **self._sight(pid, identity=False))

    def poll(self, final: bool = False) -> int:
        """Drain the ring buffer into the ledger once; returns the number of events. final:
        nothing more will come (the kernel's counts are then compared once more)."""
        with self._lock:
            if self._program is None:
                return 0
            batch = self._program.drain()
            if self._early:  # drained during the start-up self-test
                batch = np.concatenate(self._early + [batch])
                self._early = []
            lost = self._program.lost() - self._lost_base
            reads, self._pending = self._pending, []
            if len(batch):
                at, stack_of = 0, self._program.stack
                met = self._meet(batch)
                if reads:  # each where its time falls among the records
                    wall = batch["ts"].astype(np.int64) + self._offset
                    met = sorted(met + [(int(np.searchsorted(wall, int(rec["ts"][0]), "right")),
                                         rec) for rec in reads], key=lambda item: item[0])
                for pos, facts in met:
                    self.ledger.ingest_records(batch[at:pos], self._offset, stack_of)
                    self.ledger.ingest_records(facts, 0)
                    at = pos
                self.ledger.ingest_records(batch[at:], self._offset, stack_of, lost=lost,
                                           now=time.time_ns())
                execs = batch["op"] == wire.CODE["exec"]
                if execs.any():
                    self._found.exec_seen(
                        ((pid, raw.split(b"\0", 1)[0].decode("utf-8", "replace"))
                         for pid, raw in zip(batch["pid"][execs].tolist(), batch["path"][execs])),
                        time.monotonic())
            else:  # a quiet poll: no frame to build (decoding costs ~3 ms even when empty)
                for rec in reads:
                    self.ledger.ingest_records(rec, 0)
                self.ledger.advance(lost=lost, now=time.time_ns())
            # Records were lost: the kernel's counts stand in. They also count calls whose
            # records are still in the ring, so they are compared again now and then, and
            # once more at the end, when the ring is empty.
            now = time.monotonic()
            if lost and (final or now - self._reconciled >= 1.0):
                self._reconciled = now
                known = self.ledger.known_pids()
                counts = {k: c for k, c in units.read_counts(self._program).items() if k[0] in known}
                self.ledger.ingest_records(Tracker.counted(counts, time.time_ns()), 0)
            if self.sampled:
                if len(batch):  # a completed cycle (an unmap), or a first sight: read again
                    ops = batch["op"]
                    gone = batch["pid"][ops == wire.CODE["unmap"]].tolist()
                    self._owed.update(gone)
                    moved = np.isin(ops, _MODULE_OPS)
                    if moved.any():
                        at = time.monotonic()
                        self._moved_at.update((pid, at) for pid in batch["pid"][moved].tolist())
                    for pid in batch["pid"][ops == wire.CODE["exit"]].tolist():
                        self._moved_at.pop(pid, None)  # a pid's next process starts afresh
                        self._sampled_at.pop(pid, None)
                self._sample_owed(final)
            self._polls += 1
            if self._reread:
                self._read_late()
            if self._found.pending:
                # Its table is read once the ring's records up to now are in the ledger: an
                # exec it made before the probes arrived must start the image it belongs to.
                for pid in self._found.discover(time.monotonic()):
                    self._reread[pid] = self._polls + 1
            return len(batch)

    def _meet(self, batch: np.ndarray) -> list:
        """Tell the ledger what the host shows of the processes this batch is the first news
        of (identity), and of those about to create keys in a program image whose modules it
        does not know yet (so their callers can be named). dlopens after that are reported by
        the probes themselves."""
        ops, pids = batch["op"], batch["pid"]
        ts = batch["ts"].astype(np.int64) + self._offset
        forked = set(batch["other"][ops == wire.CODE["fork"]].tolist())
        creating = (ops == wire.CODE["acquire"]) | (ops == wire.CODE["acquire_failed"])
        out = []
        order = np.argsort(pids, kind="stable")  # each pid's records, in arrival order
        bounds = np.flatnonzero(np.diff(pids[order])) + 1
        for mine in np.split(order, bounds):
            pid = int(pids[mine[0]])
            first = int(mine[0])
            comm = batch["comm"][first].decode("utf-8", "replace")
            execs = mine[ops[mine] == wire.CODE["exec"]]
            if pid not in forked and not self.ledger.knows(pid):
                # Met while already running: its table now is the state to start from. An exec
                # in this batch started the image the table belongs to: the facts go after it.
                at = int(execs[-1]) + 1 if len(execs) else first
                self._snapshotted.add(pid)
                out.append((at, Tracker.fact_records(pid, int(ts[min(at, len(ts) - 1)]) - 1, comm,
                                             **self._sight(pid))))
                if self.sampled:
                    self._owed.add(pid)
                continue
            if len(execs):  # a new image: its modules are not known yet (curl's first keys)
                self._snapshotted.discard(pid)
            after = mine[mine > execs[-1]] if len(execs) else mine
            makes = after[creating[after]]
            if pid not in self._snapshotted and len(makes):
                self._snapshotted.add(pid)
                at = int(makes[0])
                mods = [(path, base) for path, base, _ in proc.modules(pid)]
                units.watch_unmaps(self._program, pid, [base for _, base in mods])
                out.append((at, Tracker.fact_records(pid, int(ts[at]) - 1, comm, modules=mods)))
            # A new process on the same pid after an exit needs a new snapshot.
            if (ops[mine] == wire.CODE["exit"]).any():
                self._snapshotted.discard(pid)
        return sorted(out, key=lambda item: item[0])

    def _repr_html_(self) -> str:
        from .analysis.html import ledger_html
        state = "tracing" if self._program is not None else "stopped"
        return ledger_html(self.ledger, heading=f"KeyTracer: {state}, {self.attached} probes")
