"""Which library made each key, which keys are orphaned, and what each reload leaves behind.

Addresses are named against the module instances of the process as they were when the key was
made: a create inside a dlopen is matched to the instances that dlopen reported (link_map
records, which arrive just after the create), any other create to the instances mapped at that
moment. A key is *orphaned* when the instance of the module that made it has been unmapped
(munmap of its base, seen in the kernel), whatever is mapped at that address later: glibc often
maps a reloaded library exactly where the unloaded copy was.
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Optional

from ..host import libc
from ..host.elf import ElfInfo, elf_info
from ..state.keys import Site
from ..state.modules import Module
from ..state.processes import Process

UNKNOWN = "?"


@dataclass(frozen=True)
class Frame:
    address: int
    module: Optional[Module]
    symbol: Optional[str]
    offset: int            # from the symbol, or from the module's base when no symbol

    def __str__(self) -> str:
        if self.module is None:
            return f"{self.address:#x}"
        name = os.path.basename(self.module.path)
        if self.symbol:
            return f"{name}!{self.symbol}+{self.offset:#x}"
        return f"{name}+{self.offset:#x}"  # stripped: module + offset


class Resolver:
    """Names addresses against module instances (one process's history, or a scan's mappings).

    pid: a live process whose files are then read as it sees them (its mount namespace)."""

    def __init__(self, modules: list, pid: Optional[int] = None):
        root = f"/proc/{pid}/root"
        self.root = root if pid is not None and os.path.exists(root) else ""
        self._infos: dict = {}
        self._by_load: dict = defaultdict(list)
        # Reloads make many instances of few (path, base) pairs: ranges are checked per pair.
        self._groups: dict = defaultdict(list)
        for m in modules:
            self._by_load[m.load].append(m)
            self._groups[(m.path, m.base)].append(m)

    def info(self, m: Module) -> Optional[ElfInfo]:
        key = m.file or m.path
        if key not in self._infos:
            self._infos[key] = ((m.file and elf_info(m.file))
                                or (self.root and elf_info(self.root + m.path)) or elf_info(m.path))
        return self._infos[key]

    def _contains(self, m: Module, addr: int) -> bool:
        info = self.info(m)
        return info is not None and m.base + info.lo <= addr < m.base + info.hi

    def module_at(self, addr: int, ts: int, load: int) -> Optional[Module]:
        if load:
            for m in self._by_load.get(load, ()):
                if self._contains(m, addr):
                    return m  # reported by the very dlopen the create ran inside
        best = None
        for group in self._groups.values():
            if not self._contains(group[0], addr):
                continue
            for m in group:
                if m.mapped <= ts and (m.unmapped is None or m.unmapped > ts):
                    if best is None or m.mapped > best.mapped:
                        best = m
        return best

    def frame(self, addr: int, ts: int, load: int) -> Frame:
        m = self.module_at(addr, ts, load)
        if m is None:
            return Frame(addr, None, None, 0)
        sym = self.info(m).symbol(addr - m.base)
        return Frame(addr, m, sym[0], sym[1]) if sym else Frame(addr, m, None, addr - m.base)

    def stack(self, site: Site) -> list:
        addrs = [int(a, 16) for a in site.stack.split()] if site.stack else [site.caller]
        return [self.frame(a, site.first, site.load) for a in addrs]

    def creator(self, site: Site) -> Optional[Module]:
        """The module that made the site's keys: the innermost frame outside libc and ld.so,
        else the destructor's module."""
        for f in self.stack(site):
            if f.module is not None and not libc.is_plumbing(f.module.path):
                return f.module
        if site.destructor:
            return self.module_at(site.destructor, site.first, site.load)
        return None


class Attribution:
    """Every site of one process tied to the module instance that made it (computed once)."""

    def __init__(self, proc: Process):
        self.proc = proc
        self.resolver = Resolver(proc.modules.instances, proc.pid if proc.exited is None else None)
        self.live = Counter(id(s) for s in proc.keys.live.values())
        self.maker = {id(s): self.resolver.creator(s) for s in proc.keys.sites.values()}

    def library_of(self, site: Site) -> str:
        m = self.maker[id(site)]
        return m.path if m else UNKNOWN

    def chain(self, site: Site) -> str:
        """How the keys came to be made, outermost first:
        exe -> dlopen(libA.so) -> ... -> libB.so!init+0x14 -> pthread_key_create."""
        frames = self.resolver.stack(site)
        parts = [os.path.basename(self.proc.exe or self.proc.comm)]
        loads = self.proc.modules.loads
        if site.load in loads:
            parts.append(f"dlopen({os.path.basename(loads[site.load][0])})")
        parts += [str(f) for f in reversed(frames)] + ["pthread_key_create"]
        return " -> ".join(parts)

    def stack_note(self, site: Site) -> str:
        """Said when the user stack walk stopped early (frame pointers missing on the way)."""
        n = len(site.stack.split()) if site.stack else 1
        return "" if n >= 3 else "stack cut short: a caller without frame pointers"

    def libraries(self) -> list[dict]:
        """Per creating library: keys created, deleted, live and orphaned, and the chain of
        its busiest call site."""
        acc: dict = defaultdict(lambda: {"created": 0, "deleted": 0, "live_keys": 0,
                                         "orphaned_keys": 0, "_top": None})
        for site in self.proc.keys.sites.values():
            row = acc[self.library_of(site)]
            n = self.live.get(id(site), 0)
            row["created"] += site.created
            row["deleted"] += site.deleted
            row["live_keys"] += n
            m = self.maker[id(site)]
            if m is not None and m.unmapped is not None:
                row["orphaned_keys"] += n
            if row["_top"] is None or (n, site.created) > row["_top"][0]:
                row["_top"] = ((n, site.created), site)
        return [{"library": lib, **{k: v for k, v in row.items() if k != "_top"},
                 "stack": self.chain(row["_top"][1]), "stack_note": self.stack_note(row["_top"][1])}
                for lib, row in acc.items()]

    def reloads(self) -> list[dict]:
        """Per dlopen'd path: load cycles and the keys each cycle leaves live, by maker.

        Cycles after the first failed create do not count towards the rate: the table was full.
        """
        left: Counter = Counter()            # load id -> live keys made inside it
        makers: dict = defaultdict(Counter)  # load id -> creating library -> live keys
        for site in self.proc.keys.sites.values():
            n = self.live.get(id(site), 0)
            if site.load and n:
                left[site.load] += n
                makers[site.load][self.library_of(site)] += n
        by_path: dict = defaultdict(list)
        for load, (path, _handle, ts) in self.proc.modules.loads.items():
            by_path[path].append((ts, load))
        first_failure = self.proc.keys.first_failure
        rows = []
        for path, loads in by_path.items():
            loads.sort()
            counted = [load for ts, load in loads if first_failure is None or ts < first_failure]
            made = sum((makers[load] for load in counted), Counter())
            per = sum(left[load] for load in counted) / len(counted) if counted else 0.0
            maker = made.most_common(1)[0][0] if made else ""
            rows.append({
                "loaded": path, "cycles": len(loads),
                "keys_left": sum(left[load] for _, load in loads),
                "keys_per_cycle": per, "made_by": maker,
                "finding": (f"each load of {os.path.basename(path)} leaves {per:g} key"
                            f"{'' if per == 1 else 's'}, made by {os.path.basename(maker)}"
                            if per > 0 else f"loads of {os.path.basename(path)} leave no key"),
                "first_load": loads[0][0], "last_load": loads[-1][0],
            })
        return rows

    def summary(self) -> dict:
        """The attribution fields of the process's summary row."""
        libs = self.libraries()
        live = {row["library"]: row["live_keys"] for row in libs if row["live_keys"]}
        reloads = self.reloads()
        return {
            "library": max(live, key=live.get) if live else "",
            "libraries": dict(sorted(live.items(), key=lambda kv: -kv[1])),
            "orphaned_keys": sum(row["orphaned_keys"] for row in libs),
            "leak_per_reload": sum(row["keys_per_cycle"] for row in reloads),
            "reload_cycles": max((row["cycles"] for row in reloads), default=0),
            "reload_span_ns": max((row["last_load"] - row["first_load"] for row in reloads), default=0),
        }
