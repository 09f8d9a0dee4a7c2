"""How long until a process runs out of pthread keys. Pure arithmetic, shared by every front-end.

    keys per day  = keys left per reload cycle x reload cycles per day
                  + keys per day a code path keeps making outside reloads
    days left     = (limit - keys in use) / keys per day

Reload cycles per day are given (--reloads-per-day: Apache reloads once a day at logrotate) or
measured: completed cycles over the time the process was observed (from when tracing of it
began to now, or to its exit). A leak not tied to reloads (one code path that keeps making keys
that stay live) is measured the same way, in keys per second, from the separate occasions on
which the path made them. A measure that rests on too little (fewer than MIN_CYCLES cycles or
occasions, or all of them bunched into one burst of the observed time) gives no date: it says so.
Which of a given and a measured reload rate wins is the caller's choice (prefer_measured): the
user's what-if in watch and report, the agent's fleet-wide assumption until a measure is trusted.
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
# A measured reload rate beats a given one (prefer_measured) once it rests on this many
# cycles or this much observed time: hundreds of cycles a minute are no once-a-day guess.
TRUSTED_CYCLES = 100
TRUSTED_NS = NS_PER_DAY


@dataclass
class Rate:
    per_day: Optional[float]  # reloads (reload_rate) or keys (steady_rate) a day; None: unknown
    basis: str                # how it was had, or why there is none, in words


def _too_little(count: int, first_ns: Optional[int], last_ns: Optional[int], observed_ns: int,
                seen: str) -> Optional[str]:
    """Why count events over the observed time are no measure of a rate (None: they are)."""
    if count < MIN_CYCLES:
        return f"too little to measure: {seen}"
    if first_ns is None or observed_ns <= 0 or (last_ns - first_ns) < MIN_SPREAD * observed_ns:
        return f"too little to measure: {seen}, all in one burst"
    return None


def reload_rate(given: Optional[float], cycles: int, first_ns: Optional[int],
                last_ns: Optional[int], observed_ns: int, prefer_measured: bool = False) -> Rate:
    """The reload rate to forecast with: completed cycles per day over the observed time when
    they are enough and spread out, or the given one, else none (and why). The given rate wins
    unless prefer_measured, and then only until the measure rests on TRUSTED_CYCLES cycles or
    TRUSTED_NS of observed time."""
    seen = f"{cycles} completed cycle{'' if cycles == 1 else 's'} in {_span(observed_ns)} observed"
    why_not = _too_little(cycles, first_ns, last_ns, observed_ns, seen) if cycles else \
        "no completed reload cycle"
    trusted = why_not is None and (cycles >= TRUSTED_CYCLES or observed_ns >= TRUSTED_NS)
    if given and not (prefer_measured and trusted):
        return Rate(given, f"given: {given:g} reloads/day")
    if why_not:
        return Rate(None, why_not)
    return Rate(cycles * NS_PER_DAY / observed_ns, f"measured: {seen}")


def steady_rate(keys: int, occasions: int, first_ns: Optional[int], last_ns: Optional[int],
                observed_ns: int, units: tuple = ("key", "keys")) -> Rate:
    """Handles (keys) a day made by code paths that keep making them outside reloads: over the
    observed time, when the occasions they were made on are enough and spread out. units: the
    resource's words for one and for several."""
    seen = (f"{keys} {units[0] if keys == 1 else units[1]} on {occasions} occasion"
            f"{'' if occasions == 1 else 's'} in {_span(observed_ns)} observed")
    why_not = _too_little(occasions, first_ns, last_ns, observed_ns, seen)
    if why_not:
        return Rate(None, why_not.replace("measure:", "measure per time:", 1))
    return Rate(keys * NS_PER_DAY / observed_ns, f"measured per time: {seen}")


def _span(ns: int) -> str:
    return describe(ns / NS_PER_DAY) if ns > 0 else "no time"


@dataclass
class Forecast:
    limit: int
    headroom: int
    keys_per_day: Optional[float]   # None: unknown
    days_left: Optional[float]
    exhaustion_eta: Optional[datetime]


def exhaustion(in_use: int, limit: int, now: datetime, keys_per_day: Optional[float],
               failed_at: Optional[datetime] = None) -> Forecast:
    """When the table is full at keys_per_day. failed_at: when a create already failed (the
    table was full then: that is the date, whatever the rate)."""
    headroom = max(limit - in_use, 0)
    if failed_at is not None or headroom == 0:
        return Forecast(limit, headroom, keys_per_day, 0.0, failed_at or now)  # out of keys
    if not keys_per_day or keys_per_day <= 0:
        return Forecast(limit, headroom, keys_per_day, None, None)
    days = headroom / keys_per_day
    try:
        eta = now + timedelta(days=days)
    except (OverflowError, ValueError):  # beyond the calendar: never, in effect
        eta = None
    if eta is not None and eta >= NEVER:
        eta = None
    return Forecast(limit, headroom, keys_per_day, days, eta)


def forecast(in_use: int, limit: int, now: datetime, leak_per_reload: float,
             reloads_per_day: Optional[float]) -> Forecast:
    """exhaustion() for a leak of leak_per_reload keys a reload at reloads_per_day."""
    per_day = leak_per_reload * reloads_per_day if reloads_per_day else None
    return exhaustion(in_use, limit, now, per_day)


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
