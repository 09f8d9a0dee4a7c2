"""Compiling probe units (with bcc, in a child, cached: tracer.bpf.compiled), loading them
(tracer.bpf.loaded), attaching them to files at any time, and detaching them on every exit path.

A *unit* is one file of probes/ (`<name>.bpf.c`) and the functions it probes. The units of a
program are compiled together, after probes/keytrace.h and the definitions generated from
tracer.wire, so they share one ring buffer, one pid filter and one count of lost records.
Tracepoints attach at load; uprobes attach per ELF file with attach(path, addresses), whenever
a file is found (a container's libc, a static executable), and detach(path) removes them.
"""
from __future__ import annotations

import ctypes as ct
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .. import wire
from ..errors import KeytraceError, UsageError
from ..host import planner
from ..host.elf import file_offsets, read_vaddr
from . import compiled, kernel, multi, stepcheck
from .loaded import Loaded
from .ringbuf import RingReader

TRACEFS = Path("/sys/kernel/tracing")
DEFAULT_RING_PAGES = 2048  # 8 MiB: ~24k records, 10 ms of a very busy host


@dataclass(frozen=True)
class Unit:
    name: str                                     # probes/<name>.bpf.c
    uprobes: dict = field(default_factory=dict)   # function -> (entry program, return or None)
    variants: dict = field(default_factory=dict)  # flavour -> {program: its variant's program}


def probes_dir() -> Path:
    """Where the probe sources are: KEYTRACE_PROBES, else inside the installed package
    (tracer/probes: the wheel maps the repository's probes/ there), else beside tracer/ in a
    checkout (an editable install)."""
    if os.environ.get("KEYTRACE_PROBES"):
        return Path(os.environ["KEYTRACE_PROBES"])
    package = Path(__file__).resolve().parent.parent
    for cand in (package / "probes", package.parent / "probes"):
        if (cand / "keytrace.h").is_file():
            return cand
    return package / "probes"


def source(units: Iterable[Unit], prelude: str = "") -> str:
    """One compile unit: the generated definitions (and prelude), keytrace.h, then each unit's
    file. Pasted, not #included: bcc rewrites map calls and tracepoint arguments in its main
    text only."""
    d = probes_dir()
    parts = ["#include <uapi/linux/ptrace.h>", wire.c_definitions(), prelude]
    for name in ["keytrace.h"] + [f"{u.name}.bpf.c" for u in units]:
        try:
            parts += [f"// ---- {name}", (d / name).read_text()]
        except OSError as e:
            raise KeytraceError(f"cannot read probe source {d / name}: {e.strerror} "
                                "(set KEYTRACE_PROBES to the probes/ directory)") from None
    return "\n".join(parts) + "\n"


def ensure_tracefs() -> Path:
    """Where tracefs is (bcc reads tracepoint formats there, the loader their ids); mounted where
    it is missing."""
    for d in (TRACEFS, Path("/sys/kernel/debug/tracing")):
        if (d / "events").is_dir():
            return d
    if os.system(f"mount -t tracefs nodev {TRACEFS} 2>/dev/null") != 0:
        raise KeytraceError(f"tracefs is not mounted and mounting it failed: "
                            f"mount -t tracefs nodev {TRACEFS}")
    return TRACEFS


def _exit_has_group_dead() -> bool:
    fmt = TRACEFS / "events/sched/sched_process_exit/format"
    try:
        return "group_dead" in fmt.read_text()
    except OSError:
        return False


def _check_bytes(path: str, p: "planner.Plan") -> None:
    """The file holds, at every site, the instruction the plan was made for."""
    for site in p.sites:
        if read_vaddr(path, site.address, site.size) != site.insn:
            raise KeytraceError(f"{path} changed under its plan: the bytes at {site.address:#x} "
                                f"are not {site.insn.hex()}")


class UnsafeSite(KeytraceError):
    """A probe site that the policy does not allow, or a function with no safe site."""


class _Held:
    """A file held open while probes are checked and attached by its path: the bytes checked
    are the held file's, and the path must still name that file once the probes are on (a
    package upgrade replacing it in between would put probes on bytes nobody checked)."""

    def __init__(self, path: str):
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise KeytraceError(f"cannot open {path}: {e.strerror}") from None
        st = os.fstat(self.fd)
        self.ident, self.name = (st.st_dev, st.st_ino), path
        self.path = f"/proc/self/fd/{self.fd}"

    def still(self) -> None:
        try:
            st = os.stat(self.name)
        except OSError as e:
            raise KeytraceError(f"{self.name} went away while probes were attached to it: "
                                f"{e.strerror}") from None
        if (st.st_dev, st.st_ino) != self.ident:
            raise KeytraceError(f"{self.name} was replaced while probes were attached to it "
                                "(a package upgrade?): not probed; run keytrace again")

    def close(self) -> None:
        os.close(self.fd)


def check_ring_pages(pages: int) -> int:
    """The ring buffer's size in pages: a power of two (the kernel's rule), checked before
    anything is spawned or attached."""
    if pages < 1 or pages & (pages - 1):
        raise UsageError(f"--ring-pages takes a power of two (1, 2, 4, ... 2048), not {pages}")
    return pages


class Program:
    """Compiled probe units: open(), attach(file) as files are found, drain(), always close().

    pids: trace only these processes and their descendants (filtered in the kernel);
    None traces the whole host.
    """

    def __init__(self, units: Iterable[Unit], pids: Optional[Iterable[int]] = None,
                 ring_pages: int = DEFAULT_RING_PAGES, prelude: str = "", programs: str = "",
                 policy=None, sites: Optional[dict] = None, note=None):
        """prelude: definitions the units need (before them); programs: generated programs
        (after them), attached with attach_programs() or, for planned sites, attach(...,
        plan=...): sites maps (build id, function) to [(planner.Site, program name)].
        policy(code) -> None or why a probe may not go on that instruction
        (tracer.bpf.stepcheck.Policy; this host's, by default): every site is checked with it
        before it is attached. note(line) is told when the probes must be compiled (a first run)."""
        check_ring_pages(ring_pages)
        self._note = note
        self.units = list(units)
        self.sites: dict = dict(sites or {})  # (build id, function) -> [(site, program name)]
        self._site_text = [programs]
        self.prelude = prelude
        self.pids = None if pids is None else sorted(set(pids))
        self.ring_pages = ring_pages
        self.bpf: Optional[Loaded] = None
        self.ring: Optional[RingReader] = None
        self._readers: list = []  # reader()s, closed with the program
        self.files: dict[str, list] = {}  # path -> [(address, is_return)] attached there
        self._links: dict[str, list] = {}  # path -> its uprobes' fds (links or perf events)
        self.use_links = False  # uprobes as uprobe_multi links (set at open)
        self._closer: Optional[threading.Thread] = None  # a detach running on (close(wait=False))
        self._close_error: Optional[BaseException] = None
        self.attached = 0  # uprobes attached (entry and return counted apart)
        self._policy = policy
        self.moved: dict = {}  # (path, function) -> (entry, site) where the entry was unsafe

    @property
    def policy(self):
        if self._policy is None:
            self._policy = stepcheck.policy()
        return self._policy

    def _guard(self, path: str, address: int, held: str = "") -> None:
        """No probe goes on an instruction the policy does not allow: never silently. held:
        the file as opened for this attach (/proc/self/fd/N), read instead of path."""
        why = self.policy(read_vaddr(held or path, address, 15))
        if why is not None:
            raise UnsafeSite(f"no probe at {path}:{address:#x}: {why}")

    def open(self) -> "Program":
        try:
            self._compile()
        except BaseException:
            self.close()
            raise
        return self

    def _compile(self) -> None:
        tracefs = ensure_tracefs()
        cflags = [f"-DKT_RING_PAGES={self.ring_pages}"]
        if self.pids is not None:
            cflags.append("-DKT_FILTER")
        if _exit_has_group_dead():
            cflags.append("-DKT_GROUP_DEAD")
        text = source(self.units, self.prelude) + "\n".join(self._site_text)
        obj = compiled.compile(text, cflags, self._note)
        try:
            self.bpf = Loaded(obj, str(tracefs), self_pid=os.getpid())
        except PermissionError:
            raise KeytraceError("loading the probes was refused: run keytrace as root "
                                "(or with CAP_BPF and CAP_PERFMON)") from None
        except OSError as e:
            raise KeytraceError(f"loading the probes failed: {e.strerror or e} "
                                "(run keytrace doctor)") from None
        # one link per program and file where the kernel has them (see multi);
        # KEYTRACE_UPROBE_MULTI=0 takes a perf-event uprobe per site instead
        self.use_links = os.environ.get("KEYTRACE_UPROBE_MULTI", "1") != "0" and multi.supported()
        if self.pids is not None:
            for pid in self.pids:
                self.add_pid(pid)
        events = self.bpf[b"events"]
        self.ring = RingReader(events.map_fd, self.ring_pages * os.sysconf("SC_PAGE_SIZE"),
                               wire.RECORD)

    def attach(self, path: str, addresses: dict, flavour: str = "", plan: Optional[dict] = None) -> int:
        """Attach every unit's uprobes on the functions this file defines (name -> address),
        with the programs of the given flavour where a unit has some; the functions of plan
        ({function: planner.Plan}, compiled in) get their planned sites instead, each checked
        against the file's bytes first. Returns how many were attached; a failure detaches what
        this call attached."""
        if path in self.files:
            return 0
        plan = plan or {}
        todo: list = []  # (address, program name, is_return)
        held = _Held(path)
        try:
            for function, p in plan.items():
                _check_bytes(held.path, p)
                for site, name in self.sites[(p.build_id, function)]:
                    self._guard(path, site.address, held.path)
                    todo.append((site.address, name, False))
            for unit in self.units:
                swap = unit.variants.get(flavour, {})
                for func, names in unit.uprobes.items():
                    entry, ret = (swap.get(n, n) if n else n for n in names)
                    if func not in addresses or func in plan:
                        continue
                    addr = self.entry_site(path, addresses[func], func, held.path)
                    todo.append((addr, entry, False))
                    if ret:
                        todo.append((addr, ret, True))
            self._put(path, held, todo)
        finally:
            held.close()
        return len(todo)

    def entry_site(self, path: str, address: int, function: str, held: str = "") -> int:
        """Where an entry (and return) probe of a function goes: its entry, or the first later
        instruction that is safe to probe and sees the same arguments (planner.entry_site).
        KeytraceError when there is none."""
        try:
            site = planner.entry_site(held or path, address, function, self.policy)
        except planner.Refused as e:
            raise UnsafeSite(f"cannot probe {function} in {path}: {e}") from None
        if site.address != address:
            self.moved[(path, function)] = (address, site.address)
        return site.address

    def argument_site(self, path: str, address: int, function: str, args: tuple) -> int:
        """Where a probe that reads only these arguments goes: an emulated instruction before
        which none of them changed (planner.argument_site), else the entry site."""
        try:
            return planner.argument_site(path, address, function, self.policy, args).address
        except planner.Refused:
            return self.entry_site(path, address, function)

    def attach_programs(self, path: str, probes: Iterable[tuple]) -> int:
        """Attach generated programs to one file: (address, program name, is_return) each; a
        file may be given more probes by later calls. Returns how many; a failure detaches what
        this call attached."""
        probes = list(probes)
        held = _Held(path)
        try:
            taken = set(self.files.get(path, []))
            for addr, name, is_return in probes:
                self._guard(path, addr, held.path)
                # a second probe on a site would count its calls twice
                if (addr, is_return) in taken:
                    raise KeytraceError(f"{path} +{addr:#x} has a probe already")
                taken.add((addr, is_return))
            self._put(path, held, probes)
        finally:
            held.close()
        return len(probes)

    def _put(self, path: str, held: _Held, probes: list) -> None:
        """Put programs on sites of a file: (address, program name, is_return) each, as one
        uprobe_multi link per program and kind where the kernel has them (one fast detach), else
        as a perf-event uprobe per site. Through the held file: the bytes checked are the bytes
        probed. All or nothing: a failure detaches what this call put."""
        fds: list = []
        try:
            addrs = sorted({addr for addr, _, _ in probes})
            offset = dict(zip(addrs, file_offsets(held.path, addrs)))  # one read of the file
            if self.use_links:
                groups: dict = {}
                for addr, name, is_return in probes:
                    groups.setdefault((name, is_return), []).append(offset[addr])
                for (name, is_return), offsets in groups.items():
                    fd = self.bpf.program(name, kernel.BPF_PROG_TYPE_KPROBE,
                                          kernel.BPF_TRACE_UPROBE_MULTI)
                    fds.append(multi.link(fd, held.path, offsets, is_return))
            else:
                for addr, name, is_return in probes:
                    fd = self.bpf.program(name, kernel.BPF_PROG_TYPE_KPROBE)
                    fds.append(kernel.uprobe(fd, held.path, offset[addr], is_return))
            held.still()
        except BaseException as e:  # (a Ctrl-C too: what this call put goes)
            for fd in fds:
                os.close(fd)
            if isinstance(e, KeytraceError) or not isinstance(e, Exception):
                raise
            raise KeytraceError(f"attaching to {path} failed: {e}") from None
        self.files.setdefault(path, []).extend((addr, is_return) for addr, _, is_return in probes)
        self._links.setdefault(path, []).extend(fds)
        self.attached += len(probes)

    def reader(self, map_name: str, record: np.dtype, pages: int) -> RingReader:
        """A batch reader of another ring buffer of the program, of records of one dtype."""
        r = RingReader(self.bpf[map_name.encode()].map_fd, pages * os.sysconf("SC_PAGE_SIZE"),
                       record)
        self._readers.append(r)
        return r

    def detach(self, path: str) -> None:
        done = self.files.pop(path, [])
        for fd in self._links.pop(path, []):
            os.close(fd)
        self.attached -= len(done)

    def add_pid(self, pid: int, after_execs: int = 0) -> None:
        """Trace one more process (and its future children); filtered programs only.
        after_execs: only once it has made that many more execs."""
        self.bpf[b"traced"][ct.c_uint(pid)] = ct.c_ubyte(1 + after_execs)

    def launch(self, pid: int) -> None:
        """pid is a launched command: the kernel follows its tree (launched_pids)."""
        self.bpf[b"launched"][ct.c_uint(pid)] = ct.c_ubyte(1)

    def traced_pids(self) -> list:
        """The processes traced now (filtered programs): those given, and their descendants."""
        return sorted(int(k.value) for k in self.bpf[b"traced"].keys())

    def launched_pids(self) -> list:
        """The launched commands' processes still running, the double-forked included."""
        return sorted(int(k.value) for k in self.bpf[b"launched"].keys())

    def drain(self) -> np.ndarray:
        return self.ring.drain()

    def stack(self, stack_id: int) -> list:
        """A user stack's addresses, innermost first; the entry is then freed for reuse."""
        table = self.bpf[b"stacks"]
        try:
            addrs = list(table.walk(stack_id))
        except KeyError:
            return []
        try:
            del table[ct.c_int(stack_id)]
        except KeyError:
            pass
        return addrs

    @staticmethod
    def _detach_in_parallel(fds: list) -> None:
        """Each uprobe or tracepoint the kernel unregisters waits out a grace period (about
        0.05-0.1 s here), and so does each uprobe_multi link it releases: one after the other
        that was most of a short run's time. In parallel threads (os.close releases the GIL)
        the waits overlap: fully for links, while perf events still queue on the kernel's
        event_mutex."""
        jobs = list(fds)

        def run(share):
            for fd in share:
                try:
                    os.close(fd)
                except OSError:
                    pass
        # plain threads, not an executor: this may run while the interpreter exits, when
        # concurrent.futures takes no more work
        n = min(len(jobs), 64)
        workers = [threading.Thread(target=run, args=(jobs[i::n],)) for i in range(n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    def lost(self) -> int:
        """Records the kernel could not queue, since open()."""
        return int(sum(self.bpf[b"lost"][ct.c_int(0)]))

    def close(self, wait: bool = True) -> None:
        """Detach everything; safe to call twice and after a failed open() or attach().
        wait=False: the detach (the kernel's grace periods) runs on in a thread, so that a
        summary can be shown meanwhile; a later close() waits for it, and so does the
        interpreter's exit (the thread is no daemon): no probe outlives keytrace."""
        for r in self._readers + ([self.ring] if self.ring is not None else []):
            r.close()
        self.ring, self._readers = None, []
        if self.bpf is not None:
            bpf, self.bpf = self.bpf, None
            links = [fd for fds in self._links.values() for fd in fds]
            self._links.clear()
            self.files.clear()
            self.attached = 0
            self._closer = threading.Thread(target=self._release, args=(bpf, links),
                                            name="keytrace-detach")
            self._closer.start()
        if wait and self._closer is not None:
            self._closer.join()
            self._closer = None
            failed, self._close_error = self._close_error, None
            if failed is not None:
                raise failed

    def _release(self, bpf: Loaded, links: list) -> None:
        try:
            self._detach_in_parallel(links + bpf.attachments())
        finally:
            try:
                bpf.close()  # the programs and maps
            except BaseException as e:  # told by the close() that waits
                self._close_error = e
