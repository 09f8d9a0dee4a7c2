"""Which library made each key, which keys are orphaned, and what each reload leaves behind.

Addresses are named against the module instances of the process as they were when the key was
made: a create inside a dlopen is matched to the instances that dlopen reported (link_map
records, which arrive just after the create), any other create to the instances mapped at that
moment. A key is *orphaned* when the instance of the module that made it has been unmapped
(munmap of its base, seen in the kernel), whatever is mapped at that address later: glibc often
maps a reloaded library exactly where the unloaded copy was.

A code path is the create's caller and the frames above it up to the first that cannot be one
(code without frame pointers makes the walk read garbage). A path keeps making keys when the
keys of it that are live came on separate *occasions*: one dlopen is one occasion, and so are
keys made outside dlopens in one short burst (OCCASION_NS), as start-up code makes its fixed set.
A forked process is judged on the keys it made itself: those it inherited are its parent's.
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Optional

from .. import resource as resources
from ..host import libc
from ..host.elf import ElfInfo, FileCache, elf_info, read_vaddr
from ..state.tables import Site, Table
from ..state.modules import Module
from ..state.processes import Process

# The library column's words for keys whose maker has no module path:
UNKNOWN = "?"                          # creates whose records the kernel could not queue
NO_MODULE = "(in no known module)"     # a traced create whose caller lies in no known module
BEFORE_TRACING = "(made before tracing)"  # a key live when met, without a destructor to go by
LOST_NOTE = "records the kernel could not queue: counted, but who made these keys is unknown"

SAME_PATH_KEYS = 2  # occasions (or held keys sharing a destructor) of one path that make a leak
# Keys one path makes outside dlopens within this time of an occasion's first key are that
# occasion. Start-up code makes its fixed set in one go (OpenSSL's two per-thread keys come
# 0.1 ms apart); a leak keeps making keys as long as the process runs, so over any time much
# longer than this it shows as many occasions (a key every 50 ms: one occasion per 100 ms).
OCCASION_NS = 100_000_000


def ends_in_call(code: bytes) -> bool:
    """Do these bytes end with an x86-64 call: e8 rel32, or ff /2 (call r/m64, 2 to 7 bytes with
    an optional REX prefix)? A return address is the byte after one."""
    if len(code) >= 5 and code[-5] == 0xE8:
        return True
    for n in range(2, min(len(code), 7) + 1):
        insn = code[-n:]
        op = insn[1:] if 0x40 <= insn[0] <= 0x4F else insn  # REX
        if len(op) >= 2 and op[0] == 0xFF and (op[1] >> 3) & 7 == 2 \
                and _modrm_size(op[1:]) == len(op) - 1:
            return True
    return False


def _modrm_size(b: bytes) -> int:
    """Bytes of a ModRM byte (b[0]) with the SIB byte and displacement it implies."""
    mod, rm = b[0] >> 6, b[0] & 7
    if mod == 3:
        return 1
    if rm == 4:  # a SIB byte follows; with mod 0 and base 5, a disp32
        return -1 if len(b) < 2 else 2 + (4 if mod == 0 and b[1] & 7 == 5 else (0, 1, 4)[mod])
    return 1 + (4 if mod == 0 and rm == 5 else (0, 1, 4)[mod])  # mod 0, rm 5: rip + disp32


_RETURN_SITES = FileCache(lambda path: {})  # per file identity: vaddr -> is it a return site


def is_return_site(path: str, vaddr: int, answers: Optional[dict] = None) -> bool:
    """Is vaddr, in the ELF file at path, just after a call instruction? answers: the file's
    answers so far (from return_sites(path)), when the caller keeps them."""
    answers = return_sites(path) if answers is None else answers
    if answers is None:
        return False
    if vaddr not in answers:
        answers[vaddr] = ends_in_call(read_vaddr(path, vaddr - 7, 7))
    return answers[vaddr]


def return_sites(path: str) -> Optional[dict]:
    """The answers kept for a file (one dict per file identity; None: unreadable)."""
    return _RETURN_SITES.get(path)[1]


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

    pid: a live process whose files are then read as it sees them (its mount namespace).
    symbols: name a frame by its function (else by its module and offset, which tells code
    paths apart as well, and reads no symbol table: the agent's choice)."""

    def __init__(self, modules: list, pid: Optional[int] = None, symbols: bool = True):
        self.symbols = symbols
        root = f"/proc/{pid}/root"
        self.root = root if pid is not None and os.path.exists(root) else ""
        self._infos: dict = {}   # file or path -> (ElfInfo, the path it was read from)
        self._stacks: dict = {}  # id(site) -> its frames
        self._returns: dict = {}  # path -> {vaddr: is it a return site}
        self._by_load: dict = defaultdict(list)
        # Reloads make many instances of few (path, base) pairs: ranges are checked per pair.
        self._groups: dict = defaultdict(list)
        for m in modules:
            self._by_load[m.load].append(m)
            self._groups[(m.path, m.base)].append(m)

    def _open(self, m: Module) -> tuple:
        key = m.file or m.path
        if key not in self._infos:
            self._infos[key] = (None, None)
            for path in (m.file, self.root and self.root + m.path, m.path):
                info = elf_info(path) if path else None
                if info is not None:
                    self._infos[key] = (info, path)
                    break
        return self._infos[key]

    def info(self, m: Module) -> Optional[ElfInfo]:
        return self._open(m)[0]

    def _contains(self, m: Module, addr: int) -> bool:
        info = self.info(m)
        return info is not None and m.base + info.lo <= addr < m.base + info.hi

    def module_at(self, addr: int, ts: int, load: int) -> Optional[Module]:
        if load:
            for m in self._by_load.get(load, ()):
                if self._contains(m, addr):
                    return m  # reported by the very dlopen the create ran inside
        best = later = None
        for group in self._groups.values():
            if not self._contains(group[0], addr):
                continue
            for m in group:
                if m.mapped <= ts and (m.unmapped is None or m.unmapped > ts):
                    if best is None or m.mapped > best.mapped:
                        best = m
                elif m.mapped > ts and (later is None or m.mapped < later.mapped):
                    later = m
        # Code ran at addr at ts, so a module was mapped there: when none is known then, it is
        # the one first reported after (a dlopen's link_map walk reports the modules loaded
        # before it, at the dlopen's time, when the maps were not read in time).
        return best or later

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
        sym = self.info(m).symbol(addr - m.base) if self.symbols else None
        return Frame(addr, m, sym[0], sym[1]) if sym else Frame(addr, m, None, addr - m.base)

    def stack(self, site: Site) -> list:
        """A create's frames, caller first, up to the first that cannot be a frame: an address
        in no known module, or not just after a call in its file. The caller (read at the stack
        pointer) is always kept; past a caller without frame pointers the walk reads garbage."""
        got = self._stacks.get(id(site))
        if got is None:
            addrs = [int(a, 16) for a in site.stack.split()] if site.stack else [site.caller]
            got = [self.frame(addrs[0], site.first, site.load)]
            for a in addrs[1:]:
                f = self.frame(a, site.first, site.load)
                if f.module is None or not self.returns_to(f.module, a):
                    break
                got.append(f)
            self._stacks[id(site)] = got
        return got

    def returns_to(self, m: Module, addr: int) -> bool:
        """Is addr a plausible return address in m: just after a call in its file?"""
        path = self._open(m)[1]
        if path is None:
            return False
        if path not in self._returns:  # the file's answers, found once per resolver (no stat
            self._returns[path] = return_sites(path)  # per frame)
        answers = self._returns[path]
        return answers is not None and is_return_site(path, addr - m.base, answers)

    def creator(self, site: Site) -> Optional[Module]:
        """The module that made the site's keys: the innermost frame outside libc and ld.so,
        else the destructor's module. A held key (live when tracing began) is known by its
        destructor only."""
        if site.held:
            if site.unmapped:  # orphaned whatever we find: still, name the library if we can
                return self.module_ever_at(site.owner)
            return self.module_at(site.owner, site.first, 0)
        for f in self.stack(site):
            if f.module is not None and not libc.is_plumbing(f.module.path):
                return f.module
        if site.owner:
            return self.module_at(site.owner, site.first, site.load)
        return None


@dataclass
class Occasion:
    """Handles one code path made at one time: in one dlopen (load), in one short burst, or
    held."""
    first: int   # ts of its first handle
    handles: int
    load: int = 0
    held: bool = False

    @property
    def steady(self) -> bool:
        """Made outside any dlopen, and traced: its time is known."""
        return not self.load and not self.held


class Attribution:
    """Every site of one process tied to the module instance that made it (computed once).

    without_elf: name nothing (no ELF file is read); code paths are then raw addresses.
    symbols: False names frames by module and offset (no symbol table read)."""

    def __init__(self, proc: Process, resource=None, without_elf: bool = False,
                 symbols: bool = True):
        self.proc = proc
        r = resource or resources.default()
        self.table = proc.tables.get(r.name) or Table()
        self.unit, self.units, self.owner_word = r.word("unit"), r.word("units"), r.word("owner")
        self.acquire_call = r.word("acquire_call")
        self.resolver = Resolver(proc.modules.instances, proc.pid if proc.exited is None else None,
                                 symbols=symbols)
        self.without_elf = without_elf
        t = self.table
        sites = t.sites.values()
        self.live = Counter(id(s) for s in t.live.values())
        # Its own handles: made since tracing of this image began. A forked child's inherited
        # ones are its parent's, judged (and counted) in the parent's row.
        self.since = proc.traced_since or 0
        self.own = {k: s for k, s in t.live.items() if t.born.get(k, self.since) >= self.since}
        self.maker = {id(s): None if without_elf else self.resolver.creator(s) for s in sites}
        self._paths: dict = {}

    def library_of(self, site: Site) -> str:
        m = self.maker[id(site)]
        return m.path if m else BEFORE_TRACING if site.held else NO_MODULE

    def orphaned(self, site: Site) -> bool:
        """Its keys' maker is gone: glibc holds destructors into an unmapped instance."""
        m = self.maker[id(site)]
        return (site.held and site.unmapped) or (m is not None and m.unmapped is not None)

    def code_path(self, site: Site) -> Optional[str]:
        """What keeps making a site's keys, the same across reloads of one library: the
        resolved user stack of a traced create; a held key's destructor (keys made by one
        code path share it). None for a held key without destructor: nothing tells those apart."""
        if id(site) not in self._paths:
            self._paths[id(site)] = self._code_path(site)
        return self._paths[id(site)]

    def _code_path(self, site: Site) -> Optional[str]:
        if site.held:
            if not site.owner:
                return None
            if site.unmapped or self.without_elf:
                return f"{self.owner_word} {site.owner:#x}"
            return f"{self.owner_word} {self.resolver.frame(site.owner, site.first, 0)}"
        if self.without_elf:
            return site.stack or f"{site.caller:#x}"
        path = " <- ".join(str(f) for f in self.resolver.stack(site))
        # Code without frame pointers cuts the path at its caller: a wrapper that makes keys
        # for many callers (GLib's g_private, OpenSSL's CRYPTO_THREAD_init_local) would read as
        # one path; their keys' destructors tell them apart.
        if site.owner:
            path += f" ({self.owner_word} {self.resolver.frame(site.owner, site.first, site.load)})"
        return path

    def occasions(self) -> dict:
        """Per code path, the occasions on which it made its own keys that are live now, in
        time order: the keys of one dlopen are one occasion; keys made outside dlopens within
        OCCASION_NS of an occasion's first key are that occasion; a held key is one of its own
        (when it was made is not known), as scan counts them."""
        born = self.table.born
        out: dict = defaultdict(list)
        in_load: dict = {}  # (path, load id) -> its occasion
        for key, site in sorted(self.own.items(), key=lambda kv: born.get(kv[0], 0)):
            path = self.code_path(site)
            if path is None:
                continue
            ts = born.get(key, site.first)
            last = out[path][-1] if out[path] else None
            if site.load and (path, site.load) in in_load:
                in_load[(path, site.load)].handles += 1
            elif (not site.held and not site.load and last is not None and last.steady
                    and ts - last.first < OCCASION_NS):
                last.handles += 1
            else:
                out[path].append(Occasion(ts, 1, site.load, site.held))
                if site.load:
                    in_load[(path, site.load)] = out[path][-1]
        return out

    @staticmethod
    def steady(occasions: dict) -> dict:
        """The leak not tied to reloads: the occasions outside dlopens of the code paths that
        keep making keys, and the keys of all but each path's first (which may be a start-up
        set): what a rate over the observed time is measured from."""
        times, keys = [], 0
        for occ in occasions.values():
            if len(occ) >= SAME_PATH_KEYS:
                timed = [o for o in occ if o.steady]
                times += [o.first for o in timed]
                keys += sum(o.handles for o in timed[1:])
        return {"steady_keys": keys, "steady_occasions": len(times),
                "steady_first": min(times, default=None), "steady_last": max(times, default=None)}

    def chain(self, site: Site) -> str:
        """How the keys came to be made, outermost first:
        exe -> dlopen(libA.so) -> ... -> libB.so!init+0x14 -> pthread_key_create."""
        exe = os.path.basename(self.proc.exe or self.proc.comm)
        if site.held:
            return (f"{exe} -> (in use when tracing began) -> "
                    f"{self.code_path(site) or 'no ' + self.owner_word}")
        frames = self.resolver.stack(site)
        parts = [exe]
        loads = self.proc.modules.loads
        if site.load in loads:
            parts.append(f"dlopen({os.path.basename(loads[site.load][0])})")
        parts += [str(f) for f in reversed(frames)] + [self.acquire_call]
        return " -> ".join(parts)

    def stack_note(self, site: Site) -> str:
        """Said when the user stack walk stopped early (frame pointers missing on the way)."""
        if site.held:
            return f"made before tracing began: known by its {self.owner_word}"
        n = len(self.resolver.stack(site))
        return "" if n >= 3 else "stack cut short: a caller without frame pointers"

    def lost_live(self) -> int:
        """Live handles whose acquires' records were lost (the kernel's counts say they exist)."""
        return max(0, self.table.live_count - len(self.table.live))

    def counts_by_library(self) -> dict:
        """{acquiring library: [acquired, released]}: traced acquires (not the handles held when
        met) and releases, "?" for the calls whose records were lost. No stack is resolved."""
        acc: dict = defaultdict(lambda: [0, 0])
        for site in self.table.sites.values():
            row = acc[self.library_of(site)]
            row[0] += 0 if site.held else site.acquired
            row[1] += site.released
        missed = self.table.missed
        if missed[0] or missed[2]:
            acc[UNKNOWN][0] += missed[0]
            acc[UNKNOWN][1] += missed[2]
        return dict(acc)

    def libraries(self) -> list[dict]:
        """Per acquiring library: handles acquired, released, in use and orphaned, and the chain
        of its busiest call site; "?" for the calls whose records were lost."""
        counts = self.counts_by_library()
        acc: dict = defaultdict(lambda: {"in_use": 0, "orphaned": 0, "_top": None})
        own = Counter(id(s) for s in self.own.values())
        for site in self.table.sites.values():
            row = acc[self.library_of(site)]
            n = self.live.get(id(site), 0)
            row["in_use"] += n
            if self.orphaned(site):
                row["orphaned"] += own.get(id(site), 0)
            if row["_top"] is None or (n, site.acquired) > row["_top"][0]:
                row["_top"] = ((n, site.acquired), site)
        out = [{"library": lib, "acquired": counts[lib][0], "released": counts[lib][1],
                "in_use": row["in_use"], "orphaned": row["orphaned"],
                "stack": self.chain(row["_top"][1]), "stack_note": self.stack_note(row["_top"][1])}
               for lib, row in acc.items()]
        if UNKNOWN in counts:
            out.append({"library": UNKNOWN, "acquired": counts[UNKNOWN][0],
                        "released": counts[UNKNOWN][1], "in_use": self.lost_live(),
                        "orphaned": 0, "stack": "", "stack_note": LOST_NOTE})
        return out

    def reloads(self) -> list[dict]:
        """Per dlopen'd path: load cycles, and the keys each *completed* cycle (its instance
        unmapped since) leaves live, by maker. Keys of the instance loaded now are not left
        behind. Cycles after the first failed create do not count: the table was full. A forked
        process counts its own cycles only."""
        left: Counter = Counter()            # load id -> live keys made inside it
        makers: dict = defaultdict(Counter)  # load id -> creating library -> live keys
        for site in self.own.values():
            if site.load:
                left[site.load] += 1
                makers[site.load][self.library_of(site)] += 1
        by_path: dict = defaultdict(list)
        for load, (path, _handle, ts) in self.proc.modules.loads.items():
            if ts >= self.since:
                by_path[path].append((ts, load))
        done = self.proc.modules.completed_loads()
        first_failure = self.table.first_failure
        rows = []
        for path, loads in by_path.items():
            loads.sort()
            counted = [(ts, load) for ts, load in loads
                       if load in done and (first_failure is None or ts < first_failure)]
            # The first cycle may make keys once for good (a library it loads for the first
            # time and never unloads makes its key then): when later cycles were seen, what a
            # cycle leaves is what they leave.
            sample = counted[1:] if len(counted) > 1 else counted
            made = sum((makers[load] for _, load in sample), Counter())
            per = sum(left[load] for _, load in sample) / len(sample) if sample else 0.0
            maker = made.most_common(1)[0][0] if made else ""
            name = os.path.basename(path)
            rows.append({
                "loaded": path, "cycles": len(loads), "completed": len(counted),
                "left": sum(left[load] for _, load in counted),
                "left_per_cycle": per, "made_by": maker,
                "finding": (f"each load of {name} leaves {per:g} "
                            f"{self.unit if per == 1 else self.units}, "
                            f"made by {os.path.basename(maker)}" if per > 0 else
                            f"loads of {name} leave no {self.unit}" if counted else
                            f"{name} was never unloaded"),
                "first_cycle": counted[0][0] if counted else None,
                "last_cycle": counted[-1][0] if counted else None,
            })
        return rows

    def summary(self) -> dict:
        """The attribution fields of the process's summary row."""
        libs = [] if self.without_elf else self.libraries()
        live = {row["library"]: row["in_use"] for row in libs if row["in_use"]}
        reloads = self.reloads()
        occasions = self.occasions()
        top = max(occasions.items(), key=lambda kv: len(kv[1]), default=("", []))
        timed = [r for r in reloads if r["completed"]]
        return {
            "library": max(live, key=live.get) if live else "",
            "libraries": dict(sorted(live.items(), key=lambda kv: -kv[1])),
            "orphaned": sum(1 for s in self.own.values() if self.orphaned(s)),
            "same_path": len(top[1]), "busiest_path": top[0],
            "busiest": sum(o.handles for o in top[1]),
            "per_cycle": sum(row["left_per_cycle"] for row in reloads),
            "reload_cycles": max((row["completed"] for row in reloads), default=0),
            "cycles_first": min((r["first_cycle"] for r in timed), default=None),
            "cycles_last": max((r["last_cycle"] for r in timed), default=None),
            **self.steady(occasions),
        }
