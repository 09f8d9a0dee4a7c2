"""How long until a process runs out of pthread keys. Pure arithmetic, shared by every front-end.

    keys per day  = keys left per reload cycle x reload cycles per day
    days left     = (limit - keys in use) / keys per day

Reload cycles per day are given (--reloads-per-day: Apache reloads once a day at logrotate) or
measured: completed cycles over the time the process was observed (from when tracing of it
began to now, or to its exit). A measure that rests on too little (fewer than MIN_CYCLES
cycles, or cycles bunched into one burst of the observed time) gives no date: it says so.
No leak, no date.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Optional

NS_PER_DAY = 86_400 * 10**9
# pandas' calendar ends in 2262: a date beyond it is "never", in effect (and a frame could not
# hold it)
NEVER = datetime(2262, 1, 1, tzinfo=timezone.utc)


MIN_CYCLES = 3
MIN_SPREAD = 0.25  # the cycles must cover this share of the observed time: not one burst


@dataclass
class Rate:
    reloads_per_day: Optional[float]  # None: no rate to forecast with
    basis: str                        # how it was had, in words


def reload_rate(given: Optional[float], cycles: int, first_ns: Optional[int],
                last_ns: Optional[int], observed_ns: int) -> Rate:
    """The reload rate to forecast with: the given one, or completed cycles per day over the
    observed time when they are enough and spread out, else none (and why)."""
    if given:
        return Rate(given, f"given: {given:g} reloads/day")
    if cycles == 0:
        return Rate(None, "")
    seen = f"{cycles} completed cycle{'' if cycles == 1 else 's'} in {_span(observed_ns)} observed"
    if cycles < MIN_CYCLES:
        return Rate(None, f"too little to measure: {seen}")
    if first_ns is None or observed_ns <= 0 or (last_ns - first_ns) < MIN_SPREAD * observed_ns:
        return Rate(None, f"too little to measure: {seen}, all in one burst")
    return Rate(cycles * NS_PER_DAY / observed_ns, f"measured: {seen}")


def _span(ns: int) -> str:
    return describe(ns / NS_PER_DAY) if ns > 0 else "no time"


@dataclass
class Forecast:
    limit: int
    headroom: int
    keys_per_day: float
    days_left: Optional[float]
    exhaustion_eta: Optional[datetime]


def forecast(live_keys: int, limit: int, now: datetime, leak_per_reload: float,
             reloads_per_day: Optional[float]) -> Forecast:
    headroom = max(limit - live_keys, 0)
    per_day = leak_per_reload * reloads_per_day if (leak_per_reload > 0 and reloads_per_day) else 0.0
    if headroom == 0:
        return Forecast(limit, 0, per_day, 0.0, now)  # already out of keys
    if per_day <= 0:
        return Forecast(limit, headroom, 0.0, None, None)
    days = headroom / per_day
    try:
        eta = now + timedelta(days=days)
    except (OverflowError, ValueError):  # beyond the calendar: never, in effect
        eta = None
    if eta is not None and eta >= NEVER:
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
