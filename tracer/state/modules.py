"""The module machine: which ELF module instances a process has mapped, from dlopen's link_map
reports, /proc/PID/maps at first sight, and the munmap of their load bases.

Reloading a library makes a new instance even at the same address: an instance ends when its
base is unmapped, whatever is mapped there later.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


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

    def map(self, path: str, base: int, load: int, ts: int, file: Optional[str] = None) -> None:
        now = self.mapped.get(base)
        if now is not None and now.path == path:
            return  # reported again while still mapped (a backward walk, a rescan): one instance
        if path.startswith("/"):
            self.mapped[base] = Module(path, base, load, ts, file=file)
            self.instances.append(self.mapped[base])

    def unmap(self, base: int, ts: int) -> None:
        m = self.mapped.pop(base, None)
        if m is not None:
            m.unmapped = ts

    def dlopen(self, load: int, path: str, handle: int, ts: int) -> None:
        if handle:  # not a failed dlopen
            self.loads[load] = (path, handle, ts)

    def completed_loads(self) -> set:
        """The dlopens whose instances have been unmapped: finished load cycles."""
        return {m.load for m in self.instances if m.load and m.unmapped is not None}

    @property
    def paths(self) -> list:
        return [m.path for m in self.instances]

    def copy(self) -> "Modules":
        copies = {id(m): Module(m.path, m.base, m.load, m.mapped, m.unmapped, m.file)
                  for m in self.instances}  # (dataclasses.replace: 4x slower, per fork)
        return Modules(instances=list(copies.values()), loads=dict(self.loads),
                       mapped={b: copies[id(m)] for b, m in self.mapped.items()})
