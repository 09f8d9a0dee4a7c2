"""The module machine: which ELF module instances a process has mapped, from dlopen's link_map
reports, /proc/PID/maps at first sight, and the munmap of their load bases.

Reloading a library makes a new instance even at the same address: an instance ends when its
base is unmapped, whatever is mapped there later.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

# A dlopen begun longer ago than this whose return was not seen (its record lost) no longer
# holds the process "mid-load".
LOADING_NS = 10 * 10**9


@dataclass(slots=True)
class Module:
    """One mapped instance of an ELF module."""
    path: str
    base: int             # load bias (link_map l_addr)
    load: int             # the dlopen that reported it (0: found already mapped)
    mapped: int           # ts
    unmapped: Optional[int] = None
    file: Optional[str] = None  # where to open it now, when known (a map_files link)


@dataclass
class Modules:
    instances: list = field(default_factory=list)  # Module, in mapping order
    loads: dict = field(default_factory=dict)      # dlopen id -> (path, handle, ts)
    mapped: dict = field(default_factory=dict)     # base -> the instance mapped there now
    loading: dict = field(default_factory=dict)    # dlopens begun, not returned: id -> ts
    # dlopen id -> the base of what it opened; None when that was mapped already (a dlopen of
    # a library loaded before, which its dlclose does not unload)
    opened: dict = field(default_factory=dict)
    changed: int = 0  # ts of the last dlopen begun or returned, map or unmap

    def map(self, path: str, base: int, load: int, ts: int, file: Optional[str] = None) -> None:
        self.changed = max(self.changed, ts)
        now = self.mapped.get(base)
        if load and load not in self.opened:  # a dlopen reports what it opened first
            self.opened[load] = None if now is not None and now.path == path else base
        if now is not None and now.path == path:
            return  # reported again while still mapped (a backward walk, a rescan): one instance
        if path.startswith("/"):
            self.mapped[base] = Module(path, base, load, ts, file=file)
            self.instances.append(self.mapped[base])

    def unmap(self, base: int, ts: int) -> None:
        self.changed = max(self.changed, ts)
        m = self.mapped.pop(base, None)
        if m is not None:
            m.unmapped = ts

    def begin(self, load: int, ts: int) -> None:
        """A dlopen has begun: until it returns, the process is mid-load."""
        self.loading[load] = ts
        self.changed = max(self.changed, ts)

    def dlopen(self, load: int, path: str, handle: int, ts: int) -> None:
        self.loading.pop(load, None)
        self.changed = max(self.changed, ts)
        if handle and path:  # not a failed dlopen, nor dlopen(NULL) (the program's own handle)
            self.loads[load] = (path, handle, ts)

    def completed_loads(self) -> set:
        """The dlopens whose instances have been unmapped: finished load cycles."""
        return {m.load for m in self.instances if m.load and m.unmapped is not None}

    def cycles_by_path(self) -> Counter:
        """Completed load/unload cycles per dlopen'd path."""
        return Counter(self.loads[i][0] for i in self.completed_loads() if i in self.loads)

    def cycles(self) -> int:
        """The most load/unload cycles any one dlopen'd path has completed (a graceful restart
        that reloads every module is one cycle)."""
        return max(self.cycles_by_path().values(), default=0)

    def phase(self, now: int) -> Optional[str]:
        """Where the process is in its reload cycles at now (ns): "loaded" (every library it
        dlopened while traced has what it opened mapped), "unloaded" (none has), or None in
        between (a server mid-restart: some of its modules unloaded, some not; or a dlopen in
        flight). A library dlopened for good beside one that cycles leaves only "loaded"
        moments to be read in."""
        if any(now - begun < LOADING_NS for begun in self.loading.values()):
            return None  # a dlopen in flight: its constructors may be running
        loaded: dict = {}
        for load, (path, _, _) in self.loads.items():
            base = self.opened.get(load, 0)
            if base is not None:  # (a library it found loaded already is not its to cycle)
                loaded[path] = loaded.get(path, False) or base in self.mapped
        if all(loaded.values()):
            return "loaded"
        return "unloaded" if not any(loaded.values()) else None

    @property
    def paths(self) -> list:
        return [m.path for m in self.instances]

    def copy(self) -> "Modules":
        copies = {id(m): Module(m.path, m.base, m.load, m.mapped, m.unmapped, m.file)
                  for m in self.instances}  # (dataclasses.replace: 4x slower, per fork)
        return Modules(instances=list(copies.values()), loads=dict(self.loads),
                       mapped={b: copies[id(m)] for b, m in self.mapped.items()},
                       loading=dict(self.loading), opened=dict(self.opened),
                       changed=self.changed)
