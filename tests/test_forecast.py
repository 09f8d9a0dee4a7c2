"""Forecast arithmetic, and the orphan rule on synthetic events over a real ELF file."""
import pandas as pd
import pytest

from conftest import events
from tracer.analysis import forecast as fc
from tracer.host.elf import elf_info
from tracer.host.libc import key_limit
from tracer import Ledger

NOW = pd.Timestamp("2026-01-01", tz="UTC")


def test_one_key_per_daily_reload_is_the_incident():
    f = fc.forecast(in_use=5, limit=1024, now=NOW, leak_per_reload=1, reloads_per_day=1)
    assert (f.headroom, f.keys_per_day, f.days_left) == (1019, 1.0, 1019)
    assert f.exhaustion_eta == NOW + pd.Timedelta(days=1019)
    assert fc.describe(f.days_left) == "2.8 years"


def test_rate_is_measured_over_the_time_observed():
    # 10 completed cycles spread over 4 of the 5 days observed: 2 per day.
    day = fc.NS_PER_DAY
    rate = fc.reload_rate(None, cycles=10, first_ns=day, last_ns=5 * day, observed_ns=5 * day)
    assert rate.per_day == pytest.approx(2.0)
    assert rate.basis == "measured: 10 completed cycles in 5 days observed"
    f = fc.forecast(0, 1024, NOW, leak_per_reload=1, reloads_per_day=rate.per_day)
    assert f.days_left == pytest.approx(512)


def test_a_burst_or_a_couple_of_cycles_gives_no_rate():
    day = fc.NS_PER_DAY
    burst = fc.reload_rate(None, cycles=300, first_ns=0, last_ns=day // 100, observed_ns=day)
    assert burst.per_day is None and "one burst" in burst.basis
    two = fc.reload_rate(None, cycles=2, first_ns=0, last_ns=day, observed_ns=day)
    assert two.per_day is None and two.basis.startswith("too little")
    none = fc.reload_rate(None, 0, None, None, day)
    assert (none.per_day, none.basis) == (None, "no completed reload cycle")
    given = fc.reload_rate(1.0, cycles=2, first_ns=0, last_ns=1, observed_ns=day)
    assert (given.per_day, given.basis) == (1.0, "given: 1 reloads/day")


def test_a_given_rate_is_a_what_if_or_an_assumption_until_a_measure_is_trusted():
    s = 10**9
    # A cycle every 30 ms for 9 s: 300 cycles, a trusted measure (TRUSTED_CYCLES).
    fast = dict(cycles=300, first_ns=0, last_ns=9 * s, observed_ns=9 * s)
    assert fc.reload_rate(1.0, **fast).per_day == 1.0  # watch, report: the user's what-if
    agent = fc.reload_rate(1.0, **fast, prefer_measured=True)
    assert agent.per_day == pytest.approx(300 * 86_400 / 9)
    assert agent.basis == "measured: 300 completed cycles in 9.0 seconds observed"
    # 5 cycles over 9 s: measurable, not trusted yet; the assumption stands.
    few = fc.reload_rate(1.0, 5, 0, 9 * s, 9 * s, prefer_measured=True)
    assert (few.per_day, few.basis) == (1.0, "given: 1 reloads/day")
    # ... until a day has been observed.
    week = fc.reload_rate(1.0, 14, 0, 7 * fc.NS_PER_DAY, 7 * fc.NS_PER_DAY, prefer_measured=True)
    assert week.per_day == pytest.approx(2.0)


def test_a_steady_leak_is_measured_in_keys_over_the_time_observed():
    s = 10**9
    rate = fc.steady_rate(keys=199, occasions=100, first_ns=0, last_ns=9 * s, observed_ns=10 * s)
    assert rate.per_day == pytest.approx(19.9 * 86_400)
    assert rate.basis == "measured per time: 199 keys on 100 occasions in 10.0 seconds observed"
    burst = fc.steady_rate(keys=50, occasions=5, first_ns=0, last_ns=s, observed_ns=10 * s)
    assert burst.per_day is None
    assert burst.basis == ("too little to measure per time: 50 keys on 5 occasions in 10.0 "
                           "seconds observed, all in one burst")


def test_a_failed_create_dates_the_exhaustion_at_the_failure():
    failed = NOW - pd.Timedelta(seconds=7)
    f = fc.exhaustion(1024, 1024, NOW, keys_per_day=None, failed_at=failed)
    assert (f.days_left, f.exhaustion_eta, f.keys_per_day) == (0.0, failed, None)


def test_zero_leak_gives_no_date():
    f = fc.forecast(10, 1024, NOW, leak_per_reload=0, reloads_per_day=24)
    assert f.days_left is None and f.exhaustion_eta is None and f.headroom == 1014
    unknown = fc.forecast(10, 1024, NOW, leak_per_reload=1, reloads_per_day=None)
    assert unknown.keys_per_day is None and unknown.days_left is None  # unknown, not 0
    assert fc.describe(None) == "no leak measured"


def test_full_table_is_exhausted_now():
    f = fc.forecast(1024, 1024, NOW, leak_per_reload=1, reloads_per_day=1)
    assert (f.headroom, f.days_left, f.exhaustion_eta) == (0, 0.0, NOW)


def test_musl_limit():
    assert key_limit(["/usr/bin/app", "/lib/ld-musl-x86_64.so.1"]) == 128
    assert key_limit(["/usr/bin/app", "/usr/lib/x86_64-linux-musl/libc.so"]) == 128  # Debian's
    assert key_limit(["/usr/bin/app", "/lib/x86_64-linux-gnu/libc.so.6"]) == 1024
    f = fc.forecast(100, key_limit(["/lib/libc.musl-x86_64.so.1"]), NOW, 2, 1)
    assert (f.limit, f.headroom, f.days_left) == (128, 28, 14)


def test_far_future_is_no_overflow():
    f = fc.forecast(0, 1024, NOW, leak_per_reload=1e-9, reloads_per_day=1e-9)
    assert f.exhaustion_eta is None and f.days_left > 1e15


def test_orphan_even_when_the_reload_maps_at_the_same_address(bins):
    lib = bins["libb"]
    init = elf_info(lib).address_of("init")
    base = 0x7F0000000000
    caller = base + init + 4
    rows = []
    for load in (1, 2):  # two load cycles, the second at the same base
        rows += [dict(op="acquire", pid=7, handle=load, caller=caller, load=load),
                 dict(op="dlopen", pid=7, load=load, aux=0xA0, path=lib),
                 dict(op="map", pid=7, load=load, aux=base, path=lib)]
        if load == 1:
            rows += [dict(op="dlclose", pid=7, aux=0xA0), dict(op="unmap", pid=7, aux=base)]
    led = Ledger()
    led.ingest(events(*rows))
    (row,) = led.summary().itertuples()
    # Key 1's instance is gone (orphaned); key 2's instance is the one mapped now.
    assert (row.live_keys, row.orphaned_keys, row.library) == (2, 1, lib)
    assert "1 key orphaned" in row.reason
    (cycle,) = led.reloads().itertuples()
    assert (cycle.cycles, cycle.keys_per_cycle) == (2, 1.0)


def test_held_orphaned_keys_are_named_by_what_maps_there_since(bins):
    # Met mid-reload: the table's keys point into a library unmapped at that moment; the next
    # traced load maps it back at the same base, which names them (still orphaned).
    lib = bins["libb"]
    base = 0x7F0000000000
    destroy = base + elf_info(lib).address_of("destroy")
    led = Ledger()
    led.observe(7, 10**9, "host", exe="/x/host", start=1,
                tables={"keys": ("read", [(k, destroy, True) for k in range(3)])})
    led.ingest(events(dict(op="dlopen", pid=7, load=1, aux=0xA0, path=lib),
                      dict(op="map", pid=7, load=1, aux=base, path=lib), start_ns=2 * 10**9))
    (row,) = led.summary().itertuples()
    assert (row.library, row.orphaned_keys, row.live_keys) == (lib, 3, 3)
