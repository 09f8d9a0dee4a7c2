"""The Ledger: a tracker's state with the questions asked of it (summary, per library, per
reload, forecast, keys over time), and saving and loading it. Every answer is computed from a
snapshot taken under the ingest lock and analysed outside it.
"""
from __future__ import annotations

from typing import Optional

import pandas as pd

from ..state.tracker import Tracker
from ..store import files
from . import verdicts


class Ledger(Tracker):
    """Per-process pthread key state built from events, and the verdicts on it."""

    @classmethod
    def from_file(cls, path, **kwargs) -> "Ledger":
        """A ledger replayed from a file written by ``save`` (Parquet, CSV or JSON lines)."""
        events, meta = files.load_events(path)
        ledger = cls(**kwargs)
        ledger.ingest(events, lost=meta.get("lost", 0), now=meta.get("end"))
        return ledger

    def save(self, path) -> None:
        """Write the kept events, and the count of lost records, to path (by its extension)."""
        files.save_events(self.events, path, lost=self.lost, end=self.last_ts)

    def summary(self, all_processes: bool = False, reloads_per_day: Optional[float] = None,
                attribute: bool = True) -> pd.DataFrame:
        """One row per process: counters, live keys, the library behind them, the forecast and
        the verdict (see tracer.analysis.verdicts). Only processes that touched keys or
        libraries are listed unless all_processes. attribute=False skips naming libraries."""
        procs, now = self.snapshot(None if all_processes else (lambda p: p.active))
        return verdicts.summarize(procs, now, reloads_per_day, attribute)

    def forecast(self, reloads_per_day: Optional[float] = None) -> pd.DataFrame:
        """Per process: keys in use, the limit, the leak rate and when it runs out."""
        return self.summary(reloads_per_day=reloads_per_day)[verdicts.FORECAST_COLUMNS]

    def by_library(self) -> pd.DataFrame:
        """One row per (process, creating library): keys created, deleted, live, orphaned."""
        return verdicts.by_library(self.snapshot(lambda p: p.keys.sites)[0])

    def reloads(self) -> pd.DataFrame:
        """One row per (process, dlopen'd path): cycles and the keys each one leaves behind."""
        return verdicts.reloads(self.snapshot(lambda p: p.modules.loads)[0])

    def keys_over_time(self) -> pd.DataFrame:
        """Keys in use per process after each create and delete (ts, pid, comm, live_keys),
        from the kept events. Counts restart at exec; keys inherited through fork are not
        included (the child's line starts at 0)."""
        return verdicts.keys_over_time(self.events)

    def _repr_html_(self) -> str:
        from .html import ledger_html
        return ledger_html(self)
