"""Which C libraries carry a tracer's probes: those found at the start (the system's, those the
traced processes map, a launched static executable), and those found while tracing (a
container's or a chroot's copy, a static glibc executable), probed as soon as an exec maps them.

    found = Discovery(functions, note)
    targets = found.initial(pids, command, launched)   # before the program is compiled
    found.program = program                            # then every attach goes through it
    found.exec_seen([(pid, path), ...])                # from the ring's exec records
    for pid in found.discover(time.monotonic()):       # probed late: read its table again
        ...
"""
from __future__ import annotations

import shutil
from typing import Callable, Iterable, Optional, Sequence

from .errors import KeytraceError
from .host import keytable, libc, proc
from .host.elf import elf_info

WAIT = 0.5       # seconds an exec'd process has to map its C library before it is given up
SETTLED = 4096   # program images remembered as mapping probed files only


class Discovery:
    def __init__(self, functions: Sequence[str], note: Callable[[str], None]):
        self.functions = list(functions)
        self.note = note
        self.program = None            # the tracer's loader.Program, once open
        self.probed: set = set()       # (dev, inode) of every file probed
        self.pending: dict = {}        # exec'd pid -> (deadline, exec path, [recheck])
        self.settled: set = set()      # images (exe, mount ns) known to map probed files only

    def initial(self, pids: Optional[Iterable[int]], command: Optional[Sequence[str]],
                launched: bool) -> list:
        """Every C library the traced processes (or the host) may use, and a launched command
        that is itself one (a static executable)."""
        targets = libc.find_targets(self.functions, pids)
        if command and launched:
            exe = shutil.which(command[0])
            static = exe and self.static_target(exe)
            if static:
                targets.append(static)
        if not targets:
            raise KeytraceError("no C library defining pthread_key_create was found to probe")
        return targets

    def attach(self, t: libc.Target, plan: Optional[dict] = None) -> bool:
        """Probe a file once (plan: its planned sites, else entry and return probes)."""
        if t.ident in self.probed:
            return False
        self.program.attach(t.path, t.functions, t.flavour, plan)
        self.probed.add(t.ident)
        return True

    def reattach(self, t: libc.Target) -> None:
        """A file's probes again, on entry and return probes (its plan failed its self-test)."""
        self.program.detach(t.path)
        self.probed.discard(t.ident)
        self.attach(t, None)

    def static_target(self, path: str) -> Optional[libc.Target]:
        """A statically linked glibc executable with symbols defines the functions itself."""
        info = elf_info(path)
        if info is None or not info.static:
            return None
        t = libc.target(path, self.functions)
        return t if t is not None and keytable.layout(path)[1] != "no __pthread_keys" else None

    def exec_seen(self, execs: Iterable[tuple], now: float) -> None:
        """(pid, exec path) of execs the ring reported: each is looked at until its C library
        is mapped, or WAIT has passed."""
        self.pending.update((pid, (now + WAIT, path)) for pid, path in execs)

    def recheck(self, pid: int) -> None:
        """Look at a running process's libraries again (a rescan), even if its image is settled:
        a copy an image maps only under some environment (LD_LIBRARY_PATH) is found here."""
        self.pending.setdefault(pid, (0.0, "", True))

    def discover(self, now: float) -> list:
        """Probe the C libraries of the pending processes that no probe covers yet; returns the
        pids that got new probes (their tables are to be read again: keys made before the
        probes arrived count too)."""
        fresh = []
        for pid, (deadline, exec_path, *recheck) in list(self.pending.items()):
            done, probed = self._discover_pid(pid, exec_path, now > deadline, bool(recheck))
            if done:
                del self.pending[pid]
            if probed:
                fresh.append(pid)
        return fresh

    def _discover_pid(self, pid: int, exec_path: str, last_try: bool, recheck: bool) -> tuple:
        """(done, probed): done False means its libraries are not mapped yet, try again. An
        image (executable file, mount namespace) once found on probed files is not read again
        (reading maps at every exec of a fork/exec-heavy host cost more than the rest of the
        agent): recheck reads it all the same."""
        image = proc.image(pid)
        if image is not None and image in self.settled and not recheck:
            return True, False
        exec_path = exec_path or proc.exe(pid) or ""
        alive = image is not None
        exe = f"/proc/{pid}/exe" if alive else exec_path  # gone already: the file it ran
        info = elf_info(exe)
        if info is not None and info.static:
            if recheck:
                return True, False  # a static image is decided once, at its exec
            found = self.static_target(exe)
            if found is None:
                self._untraceable(pid, exec_path, exe)
                return True, False
            fresh, done = [found], True
        else:
            paths = libc.mapped_libraries(pid) if alive else []
            done = bool(paths) or last_try or not alive  # mapped, or never will be
            fresh = [t for t in (libc.target(p, self.functions, name) for p, name in paths) if t]
        if done and alive:
            if len(self.settled) > SETTLED:
                self.settled.clear()
            self.settled.add(image)
        fresh = list({t.ident: t for t in fresh if t.ident not in self.probed}.values())
        for t in fresh:
            self.attach(t)
        if fresh:
            self.note(f"probing {', '.join(t.path for t in fresh)} from now on: first mapped by "
                      f"pid {pid} ({exec_path})")
        return done, bool(fresh)

    def _untraceable(self, pid: int, exec_path: str, exe: str) -> None:
        """Say so when an exec'd program is one no probe can cover."""
        why = ("statically linked without symbols" if libc.target(exe, self.functions) is None
               else "statically linked with a C library other than glibc")
        self.note(f"cannot trace pid {pid} ({exec_path}): {why}; its pthread keys are not counted")
