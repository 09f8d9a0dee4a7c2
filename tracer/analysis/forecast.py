"""How long until a process runs out of pthread keys. Pure arithmetic, shared by every front-end.

    keys per day  = keys left per reload cycle x reload cycles per day
    days left     = (limit - keys in use) / keys per day

Reload cycles per day are given (--reloads-per-day: Apache reloads once a day at logrotate) or
measured from the timestamps of the traced dlopens. No leak, no date.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pandas as pd

NS_PER_DAY = 86_400 * 10**9


def measured_reloads_per_day(cycles: int, span_ns: int) -> Optional[float]:
    """Reload cycles per day over the traced span (needs two cycles and some time between)."""
    if cycles < 2 or span_ns <= 0:
        return None
    return (cycles - 1) * NS_PER_DAY / span_ns


@dataclass
class Forecast:
    limit: int
    headroom: int
    keys_per_day: float
    days_left: Optional[float]
    exhaustion_eta: Optional[pd.Timestamp]


def forecast(live_keys: int, limit: int, now: pd.Timestamp, leak_per_reload: float,
             reloads_per_day: Optional[float]) -> Forecast:
    headroom = max(limit - live_keys, 0)
    per_day = leak_per_reload * reloads_per_day if (leak_per_reload > 0 and reloads_per_day) else 0.0
    if headroom == 0:
        return Forecast(limit, 0, per_day, 0.0, now)  # already out of keys
    if per_day <= 0:
        return Forecast(limit, headroom, 0.0, None, None)
    days = headroom / per_day
    try:
        eta = now + pd.Timedelta(days=days)
    except (OverflowError, ValueError):  # beyond pandas' calendar (year 2262): never, in effect
        eta = None
    return Forecast(limit, headroom, per_day, days, eta)


def describe(days: Optional[float]) -> str:
    """A duration in the unit an SRE would say it in."""
    if days is None:
        return "no leak measured"
    if days <= 0:
        return "exhausted"
    if days >= 365:
        return f"{days / 365.25:.1f} years"
    if days >= 1:
        return f"{days:.0f} days"
    secs = days * 86_400
    return f"{secs / 3600:.1f} hours" if secs >= 3600 else f"{secs:.1f} seconds"
