"""The Ledger: a tracker's state with the questions asked of it (summary, per library, per
reload, forecast, in use over time), for each resource, and saving and loading it. Every answer is
computed from a snapshot taken under the ingest lock and analysed outside it. A question not told
which resource is about the first registered (pthread keys).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

from .. import resource as resources
from ..state.tracker import Tracker
from ..store import files
from . import verdicts

if TYPE_CHECKING:  # frames come from verdicts and files: a Ledger fed records loads no pandas
    import pandas as pd


class Ledger(Tracker):
    """Per-process state of every resource traced, built from events, and the verdicts on it.
    resource= (a name or a declaration) picks the resource a question is about."""

    def __init__(self, *args, declared: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        # Declarations this ledger was read with (a saved --pair's functions and limit), ahead
        # of the registry's: two files read in one notebook keep their own.
        self.declared = dict(declared or {})

    def declaration(self, name=None) -> "resources.Resource":
        """The declaration a resource name stands for in this ledger (the first registered
        when None): as saved with it, else as registered."""
        if name is None:
            return resources.default()
        if isinstance(name, str):
            return self.declared.get(name) or resources.get(name)
        return name

    @classmethod
    def from_file(cls, path, limit: Optional[int] = None, **kwargs) -> "Ledger":
        """A ledger replayed from a file written by ``save`` (Parquet, CSV or JSON lines). Its
        resources are declared as saved (functions, fixed limit); limit= replaces the fixed
        limit of those that have no per-process one (a --pair's: what --limit said)."""
        events, meta = files.load_events(path)
        ledger = cls(**kwargs)
        registered = {k.name for k in resources.known()}
        for name, saved in meta.get("resources", {}).items():
            if name in registered:
                r = resources.get(name)
            else:  # a --pair of the run that saved it
                r = resources.Resource(name, acquire=tuple(saved.get("acquire", ())),
                                       release=tuple(saved.get("release", ())))
            if r.limit_of is None:  # the limit it was traced with, whatever this run declared
                r = dataclasses.replace(r, limit=saved.get("limit"))
            ledger.declared[name] = r
        ledger.ingest(events, lost=meta.get("lost", 0), now=meta.get("end"))
        if limit is not None:
            for name in ledger.resources():
                r = ledger.declaration(name)
                if r.limit_of is None:
                    ledger.declared[name] = dataclasses.replace(r, limit=limit)
        return ledger

    def save(self, path) -> None:
        """Write the kept events, the count of lost records and the declarations of the
        resources seen (functions, fixed limit) to path (by its extension)."""
        described = {}
        for name in self.resources():
            r = self.declaration(name)
            described[name] = {"acquire": list(r.acquire), "release": list(r.release),
                               "limit": r.limit}
        files.save_events(self.events, path, lost=self.lost, end=self.last_ts,
                          resources=described)

    def resources(self) -> list:
        """The names of the resources the ledger has seen, the first registered first."""
        procs, _ = self.snapshot()
        seen = {n for p in procs for n in [*p.tables, *p.samples]}
        order = [r.name for r in resources.known()]
        return sorted(seen, key=lambda n: (order.index(n) if n in order else len(order), n))

    def summary(self, all_processes: bool = False, reloads_per_day: Optional[float] = None,
                attribute: bool = True, resource=None) -> pd.DataFrame:
        """One row per process: counters, handles in use, the library behind them, the
        forecast and the verdict (see tracer.analysis.verdicts). Only processes that touched a
        resource or a library are listed unless all_processes. attribute=False skips naming
        libraries."""
        r = self.declaration(resource)

        def touched(p) -> bool:  # this resource, or a library; a table read more than once
            t, sampled = p.tables.get(r.name), p.samples.get(r.name)
            return ((t is not None and t.touched) or bool(p.modules.loads)
                    or (sampled is not None and sampled.reads > 1))
        procs, now = self.snapshot(None if all_processes else touched)
        return verdicts.summarize(procs, now, reloads_per_day, attribute, r)

    def forecast(self, reloads_per_day: Optional[float] = None, resource=None) -> pd.DataFrame:
        """Per process: handles in use, the limit, the leak rate and when it runs out."""
        r = self.declaration(resource)
        return self.summary(reloads_per_day=reloads_per_day, resource=r)[verdicts.forecast_columns(r)]

    def by_library(self, resource=None) -> pd.DataFrame:
        """One row per (process, acquiring library): handles acquired, released, in use,
        orphaned (keys: created, deleted, live_keys, orphaned_keys)."""
        r = self.declaration(resource)
        procs = self.snapshot(lambda p: p.tables.get(r.name) is not None
                              and bool(p.tables[r.name].sites))[0]
        return verdicts.by_library(procs, r)

    def reloads(self, resource=None) -> pd.DataFrame:
        """One row per (process, dlopen'd path): cycles and what each one leaves behind."""
        return verdicts.reloads(self.snapshot(lambda p: p.modules.loads)[0], self.declaration(resource))

    def in_use_over_time(self, resource=None) -> pd.DataFrame:
        """Handles in use per process after each acquire and release (ts, pid, comm, in use in
        the resource's words: live_keys), from the kept events. Counts restart at exec; handles
        inherited through fork are not included (the child's line starts at 0)."""
        return verdicts.in_use_over_time(self.events, self.declaration(resource))

    def keys_over_time(self) -> pd.DataFrame:
        """pthread keys in use over time: in_use_over_time() of the first resource."""
        return self.in_use_over_time()

    def _repr_html_(self) -> str:
        from .html import ledger_html
        return ledger_html(self)
