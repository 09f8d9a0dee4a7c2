"""KeyTracer: a tracing session. Probes in, a live Ledger out; for the CLI, notebooks and agents.

    with KeyTracer(command=["./host", "libleaky.so", "10"]) as t:
        t.wait()
    t.ledger.summary()

start() returns once the probes are attached; a background thread drains the ring buffer every
`interval` seconds into the ledger. stop() (also on leaving the with-block, at interpreter exit,
or after a failed start) drains what is left, detaches every probe and ends a launched command.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import time
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from . import resource, wire
from .bpf import pairs as bpf_pairs
from .bpf import stepcheck, units
from .bpf.loader import DEFAULT_RING_PAGES, Program
from .errors import KeytraceError, UsageError
from .host import keytable, libc, planner, proc
from .host import patterns as pat
from .resources import keys as keys_resource
from .resources import pairs as pair_specs
from .host.elf import build_id, elf_info
from .host.sight import sight
from .state.tracker import Tracker
from .tracing import Tracing, check_sites


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

    pairs: acquire/release pairs of the user's to trace beside the keys, through the same ledger
    ("libc:fopen=ret/fclose=arg0": tracer.resources.pairs); limit: their handles' limit per
    process, for a forecast. ledger.summary(resource="fopen/fclose") answers for one.
    """

    def __init__(self, pids: Optional[Iterable[int]] = None, command: Optional[Sequence[str]] = None,
                 keep_events: bool = True, ring_pages: int = DEFAULT_RING_PAGES,
                 interval: float = 0.01, on_ready: Optional[Callable[["KeyTracer"], None]] = None,
                 on_note: Optional[Callable[[str], None]] = None, sites: str = "planned",
                 ledger: Optional[Tracker] = None, pairs: Sequence[str] = (),
                 limit: Optional[int] = None):
        if limit is not None and limit < 1:
            raise UsageError(f"--limit takes a number of handles of 1 or more, not {limit}")
        parsed = [pair_specs.parse(p) for p in pairs]  # bad input: one line before anything
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
        self._ring_pages = ring_pages
        self._offset = wire.boot_to_wall_offset_ns()
        self._snapshotted: set = set()  # pids whose current image's modules are in the ledger
        self._probed: set = set()        # (dev, inode) of every file probed
        self._pending: dict = {}         # exec'd pid -> deadline to find its C library
        self._settled: set = set()       # images (exe, mount ns) known to map probed files only
        self._reread: dict = {}          # pid -> the poll after which its table is read
        self._polls = 0
        self._host_libc: Optional[str] = None
        # What it traces: pthread keys (the first resource registered), and the user's pairs.
        self.pairs = [pair_specs.declare(p, limit) for p in parsed]
        self._pair_targets: list = []
        self.resources = [resource.default()] + self.pairs
        self._units = units.tracer_units([r.extra["unit"] for r in self.resources
                                          if "unit" in r.extra] + ([bpf_pairs.PAIRS] if self.pairs else []))
        self._functions = units.functions(self._units)
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
        targets = self._targets(filter_pids)
        self._policy = stepcheck.policy(self._note)
        plans = self._plans(targets) if self.sites == "planned" else {}
        planned, sites = keys_resource.planned_programs(
            [(t.flavour, plans[t.ident]) for t in targets if t.ident in plans])
        self._program = Program(self._units, filter_pids, self._ring_pages, policy=self._policy,
                                programs=planned + "\n" + bpf_pairs.programs(self.pairs),
                                sites=sites)
        self._program.open()
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

    def _targets(self, pids) -> list:
        """Every C library the traced processes (or the host) may use, and a launched command
        that is itself one (a static executable)."""
        targets = libc.find_targets(self._functions, pids)
        if self.command and self.process is not None:
            exe = shutil.which(self.command[0])
            static = exe and self._static_target(exe)
            if static:
                targets.append(static)
        if not targets:
            raise KeytraceError("no C library defining pthread_key_create was found to probe")
        return targets

    def _plans(self, targets) -> dict:
        """Planned probe sites (tracer.host.planner) for the targets keytrace can check here:
        those of the very build of the C library this process runs on, which the self-test
        exercises. Any other file gets entry and return probes."""
        own = libc.own_libc()
        own_build = build_id(own) if own else ""
        out = {}
        for t in targets:
            try:
                plan = planner.plan_file(t.path)
                for p in plan.values():
                    for site in p.sites:
                        why = self._policy(site.insn)
                        if why:
                            raise planner.Refused(f"{p.function}+{site.address - p.address:#x}: {why}")
            except planner.Refused as e:
                self.plan_notes.append(f"{t.path}: entry probes ({e})")
                continue
            if not own_build or build_id(t.path) != own_build:
                self.plan_notes.append(f"{t.path}: entry probes (a build the self-test cannot run)")
                continue
            out[t.ident] = plan
        return out

    def _attach_targets(self, targets, plans) -> None:
        for t in targets:
            self._attach(t, plans.get(t.ident))
        for (path, function), (entry, site) in self._program.moved.items():
            self.plan_notes.append(f"{path}: {function}'s entry probe at +{site - entry:#x} "
                                   "(its first instruction is unsafe to probe here)")
        self._host_libc = keytable.host_libc()
        if plans:
            self._self_test(targets, plans)
            self._lost_base = self._program.lost()

    def _self_test(self, targets, plans) -> None:
        """Prove the planned sites on this machine before trusting them: a short-lived child
        makes 3 keys, deletes them, then deletes an invalid key and one twice; exactly those
        events must come out. Otherwise the planned files fall back to entry probes."""
        for _ in range(3):  # a record the kernel fails to queue (6.15+) is no verdict on a plan
            got = self._exercise()
            creates = [int(k) for op, k, r in got if op == wire.CODE["acquire"]]
            deletes = sorted((int(k), int(r)) for op, k, r in got if op == wire.CODE["release"])
            failed = [r for op, k, r in got if op == wire.CODE["release"] and r != 0]
            ok = (len(got) == 8 and len(set(creates)) == 3
                  and sorted(k for k, r in deletes if r == 0) == sorted(creates) and len(failed) == 2)
            if ok:
                break
        names = ", ".join(sorted({os.path.basename(t.path) for t in targets if t.ident in plans}))
        if ok:
            self.plan_notes.insert(0, f"planned sites on {names} (self-test passed)")
            return
        self._note(f"the planned probe sites failed their self-test (saw {got}): entry probes "
                   "instead")
        for t in targets:
            if t.ident in plans:
                self._program.detach(t.path)
                self._probed.discard(t.ident)
                self._attach(t, None)
        self.plan_notes.insert(0, "entry probes (the planned sites failed their self-test)")

    def _exercise(self) -> list:
        """Run the self-test child and take its records out of the ring: (op, key, ret) each.
        The child is a fork of this process, so Python's own after-fork key work comes first:
        only records from the moment the child says it starts count, and every other record
        drained meanwhile is kept for the ledger."""
        r, w = os.pipe()
        child = os.fork()
        if child == 0:  # the child: libc calls, then out without any Python cleanup
            try:
                os.close(r)
                start = time.clock_gettime_ns(time.CLOCK_BOOTTIME)  # the records' clock
                c = ctypes.CDLL(None)
                keys = (ctypes.c_uint * 3)()
                for i in range(3):
                    c.pthread_key_create(ctypes.byref(keys, 4 * i), None)
                for i in range(3):
                    c.pthread_key_delete(keys[i])
                c.pthread_key_delete(1 << 20)   # out of range: EINVAL
                c.pthread_key_delete(keys[0])   # deleted already: EINVAL
                os.write(w, str(start).encode())
            finally:
                os._exit(0)
        os.close(w)
        if self._program.pids is not None:
            self._program.add_pid(child)
        os.waitpid(child, 0)
        with os.fdopen(r) as fh:
            start = int(fh.read() or 0)
        batch = self._program.drain()
        mine = batch["pid"] == child
        self._early.append(batch[~mine])
        mine &= batch["ts"] >= start
        mine &= batch["res"] == self.resources[0].id
        ops = (wire.CODE["acquire"], wire.CODE["acquire_failed"], wire.CODE["release"])
        return [(int(o), int(k), int(r)) for o, k, r in zip(batch["op"][mine], batch["handle"][mine],
                                                             batch["ret"][mine]) if o in ops]

    def _attach(self, t: libc.Target, plan: Optional[dict] = None) -> bool:
        if t.ident in self._probed:
            return False
        self._program.attach(t.path, t.functions, t.flavour, plan)
        self._probed.add(t.ident)
        return True

    def _static_target(self, path: str) -> Optional[libc.Target]:
        """A statically linked glibc executable with symbols defines the functions itself."""
        info = elf_info(path)
        if info is None or not info.static:
            return None
        t = libc.target(path, self._functions)
        return t if t is not None and keytable.layout(path)[1] != "no __pthread_keys" else None

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
                    self._pending.setdefault(pid, (0.0, "", True))
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
        return 1

    def _discover(self, now: float) -> None:
        """C libraries of exec'd processes that no probe covers yet (a container's or a chroot's
        copy, a static executable): probe them as soon as they are mapped, then read the
        process's table, so the keys made before the probes arrived are counted too."""
        for pid, (deadline, exec_path, *recheck) in list(self._pending.items()):
            if self._discover_pid(pid, exec_path, now > deadline, bool(recheck)):
                del self._pending[pid]

    def _discover_pid(self, pid: int, exec_path: str, last_try: bool = False,
                      recheck: bool = False) -> bool:
        """Probe the C library pid's image runs on if none covers it yet; False: its libraries
        are not mapped yet, try again. An image (executable file, mount namespace) once found
        on probed files is not read again (reading maps at every exec of a fork/exec-heavy host
        cost more than the rest of the agent): recheck reads it all the same (a rescan)."""
        image = proc.image(pid)
        if image is not None and image in self._settled and not recheck:
            return True
        exec_path = exec_path or proc.exe(pid) or ""
        alive = image is not None
        exe = f"/proc/{pid}/exe" if alive else exec_path  # gone already: the file it ran
        info = elf_info(exe)
        if info is not None and info.static:
            if recheck:
                return True  # a static image is decided once, at its exec
            found = self._static_target(exe)
            if found is None:
                self._untraceable(pid, exec_path, exe)
                return True
            fresh, done = [found], True
        else:
            paths = libc.mapped_libraries(pid) if alive else []
            done = bool(paths) or last_try or not alive  # mapped, or never will be
            fresh = [t for t in (libc.target(p, self._functions, name) for p, name in paths) if t]
        if done and alive:
            if len(self._settled) > 4096:
                self._settled.clear()
            self._settled.add(image)
        fresh = list({t.ident: t for t in fresh if t.ident not in self._probed}.values())
        if fresh:
            for t in fresh:
                self._attach(t)
            self._note(f"probing {', '.join(t.path for t in fresh)} from now on: first mapped by "
                       f"pid {pid} ({exec_path})")
            # Its table is read once the ring's records up to now are in the ledger: an exec
            # it made before the probes arrived must start the image the table belongs to.
            self._reread[pid] = self._polls + 1
        return done

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

    def _untraceable(self, pid: int, exec_path: str, exe: str) -> None:
        """Say so when an exec'd program is one no probe can cover."""
        why = ("statically linked without symbols" if libc.target(exe, self._functions) is None
               else "statically linked with a C library other than glibc")
        self._note(f"cannot trace pid {pid} ({exec_path}): {why}; its pthread keys are not counted")

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
            if len(batch):
                at, stack_of = 0, self._program.stack
                for pos, facts in self._meet(batch):
                    self.ledger.ingest_records(batch[at:pos], self._offset, stack_of)
                    self.ledger.ingest_records(facts, 0)
                    at = pos
                self.ledger.ingest_records(batch[at:], self._offset, stack_of, lost=lost,
                                           now=time.time_ns())
                execs = batch["op"] == wire.CODE["exec"]
                if execs.any():
                    now = time.monotonic() + 0.5
                    self._pending.update(
                        (pid, (now, raw.split(b"\0", 1)[0].decode("utf-8", "replace")))
                        for pid, raw in zip(batch["pid"][execs].tolist(), batch["path"][execs]))
            else:  # a quiet poll: no frame to build (decoding costs ~3 ms even when empty)
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
            self._polls += 1
            if self._reread:
                self._read_late()
            if self._pending:
                self._discover(time.monotonic())
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
