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

    def module_ever_at(self, addr: int) -> Optional[Module]:
        """The newest instance ever mapped over addr, unmapped or not: what a destructor that
        lies in no mapping now pointed into (a library reloaded since maps there again)."""
        best = None
        for group in self._groups.values():
            if self._contains(group[0], addr):
                newest = max(group, key=lambda m: m.mapped)
                if best is None or newest.mapped > best.mapped:
                    best = newest
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
        else the destructor's module. A held key (live when tracing began) is known by its
        destructor only."""
        if site.held:
            if site.unmapped:  # orphaned whatever we find: still, name the library if we can
                return self.module_ever_at(site.destructor)
            return self.module_at(site.destructor, site.first, 0)
        for f in self.stack(site):
            if f.module is not None and not libc.is_plumbing(f.module.path):
                return f.module
        if site.destructor:
            return self.module_at(site.destructor, site.first, site.load)
        return None


class Attribution:
    """Every site of one process tied to the module instance that made it (computed once).

    without_elf: name nothing (no ELF file is read); code paths are then raw addresses."""

    def __init__(self, proc: Process, without_elf: bool = False):
        self.proc = proc
        self.resolver = Resolver(proc.modules.instances, proc.pid if proc.exited is None else None)
        self.without_elf = without_elf
        sites = proc.keys.sites.values()
        self.live = Counter(id(s) for s in proc.keys.live.values())
        self.maker = {id(s): None if without_elf else self.resolver.creator(s) for s in sites}

    def library_of(self, site: Site) -> str:
        m = self.maker[id(site)]
        return m.path if m else UNKNOWN

    def orphaned(self, site: Site) -> bool:
        """Its keys' maker is gone: glibc holds destructors into an unmapped instance."""
        m = self.maker[id(site)]
        return (site.held and site.unmapped) or (m is not None and m.unmapped is not None)

    def code_path(self, site: Site) -> Optional[str]:
        """What keeps making a site's keys, the same across reloads of one library: the
        resolved user stack of a traced create; a held key's destructor (keys made by one
        code path share it). None for a held key without destructor: nothing tells those apart."""
        if site.held:
            if not site.destructor:
                return None
            if site.unmapped or self.without_elf:
                return f"destructor {site.destructor:#x}"
            return f"destructor {self.resolver.frame(site.destructor, site.first, 0)}"
        if self.without_elf:
            return site.stack or f"{site.caller:#x}"
        return " <- ".join(str(f) for f in self.resolver.stack(site))

    def paths(self) -> Counter:
        """How often each code path made keys that are live now. The keys one dlopen made
        count once: a library's constructor making its fixed set is one occasion; each reload
        that leaves its keys behind is another."""
        keys: Counter = Counter()
        loads: dict = defaultdict(set)
        for site in self.proc.keys.sites.values():
            n = self.live.get(id(site), 0)
            path = self.code_path(site) if n else None
            if path is None:
                continue
            if site.load:
                loads[path].add(site.load)
            else:
                keys[path] += n
        for path, ids in loads.items():
            keys[path] += len(ids)
        return keys

    def chain(self, site: Site) -> str:
        """How the keys came to be made, outermost first:
        exe -> dlopen(libA.so) -> ... -> libB.so!init+0x14 -> pthread_key_create."""
        exe = os.path.basename(self.proc.exe or self.proc.comm)
        if site.held:
            return f"{exe} -> (in use when tracing began) -> {self.code_path(site) or 'no destructor'}"
        frames = self.resolver.stack(site)
        parts = [exe]
        loads = self.proc.modules.loads
        if site.load in loads:
            parts.append(f"dlopen({os.path.basename(loads[site.load][0])})")
        parts += [str(f) for f in reversed(frames)] + ["pthread_key_create"]
        return " -> ".join(parts)

    def stack_note(self, site: Site) -> str:
        """Said when the user stack walk stopped early (frame pointers missing on the way)."""
        if site.held:
            return "made before tracing began: known by its destructor"
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
            row["created"] += 0 if site.held else site.created
            row["deleted"] += site.deleted
            row["live_keys"] += n
            if self.orphaned(site):
                row["orphaned_keys"] += n
            if row["_top"] is None or (n, site.created) > row["_top"][0]:
                row["_top"] = ((n, site.created), site)
        return [{"library": lib, **{k: v for k, v in row.items() if k != "_top"},
                 "stack": self.chain(row["_top"][1]), "stack_note": self.stack_note(row["_top"][1])}
                for lib, row in acc.items()]

    def reloads(self) -> list[dict]:
        """Per dlopen'd path: load cycles, and the keys each *completed* cycle (its instance
        unmapped since) leaves live, by maker. Keys of the instance loaded now are not left
        behind. Cycles after the first failed create do not count: the table was full."""
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
        done = self.proc.modules.completed_loads()
        first_failure = self.proc.keys.first_failure
        rows = []
        for path, loads in by_path.items():
            loads.sort()
            counted = [(ts, load) for ts, load in loads
                       if load in done and (first_failure is None or ts < first_failure)]
            made = sum((makers[load] for _, load in counted), Counter())
            per = sum(left[load] for _, load in counted) / len(counted) if counted else 0.0
            maker = made.most_common(1)[0][0] if made else ""
            name = os.path.basename(path)
            rows.append({
                "loaded": path, "cycles": len(loads), "completed": len(counted),
                "keys_left": sum(left[load] for _, load in counted),
                "keys_per_cycle": per, "made_by": maker,
                "finding": (f"each load of {name} leaves {per:g} key{'' if per == 1 else 's'}, "
                            f"made by {os.path.basename(maker)}" if per > 0 else
                            f"loads of {name} leave no key" if counted else
                            f"{name} was never unloaded"),
                "first_cycle": counted[0][0] if counted else None,
                "last_cycle": counted[-1][0] if counted else None,
            })
        return rows

    def summary(self) -> dict:
        """The attribution fields of the process's summary row."""
        libs = [] if self.without_elf else self.libraries()
        live = {row["library"]: row["live_keys"] for row in libs if row["live_keys"]}
        reloads = self.reloads()
        paths = self.paths()
        top = paths.most_common(1)[0] if paths else ("", 0)
        timed = [r for r in reloads if r["completed"]]
        return {
            "library": max(live, key=live.get) if live else "",
            "libraries": dict(sorted(live.items(), key=lambda kv: -kv[1])),
            "orphaned_keys": sum(self.live.get(id(s), 0) for s in self.proc.keys.sites.values()
                                 if self.orphaned(s)),
            "same_path_keys": top[1], "busiest_path": top[0],
            "leak_per_reload": sum(row["keys_per_cycle"] for row in reloads),
            "reload_cycles": max((row["completed"] for row in reloads), default=0),
            "cycles_first": min((r["first_cycle"] for r in timed), default=None),
            "cycles_last": max((r["last_cycle"] for r in timed), default=None),
        }
