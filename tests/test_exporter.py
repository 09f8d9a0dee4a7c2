"""The agent's snapshot on synthetic events (no probes): a measured rate replaces the fleet's
--reloads-per-day once it is trusted, a failed create exports the time of the failure, a process
that is gone drops its series, and a forked worker's inherited keys are counted once."""
import os

import pytest

from conftest import events
from tracer import Ledger
from tracer.agent.exporter import Agent, Collector
from tracer.analysis import verdicts
from tracer.host import proc

S, MS = 10**9, 10**6
PID = os.getpid()  # a process that surely runs: the agent exports only those


class Tracer:
    """What the agent needs of a KeyTracer: a ledger, the probed files, a health check."""

    def __init__(self):
        self.ledger = Ledger(keep_events=False)
        self.files = []

    def check(self):
        pass


def agent_with(*rows, start=None, given=1.0):
    t = Tracer()
    met = rows[0]["ts"] - 1
    t.ledger.observe(PID, met, "server", exe="/usr/sbin/server",
                     start=start or proc.stat(PID).start_ns, tables={"keys": ("read", [])})
    t.ledger.ingest(events(*rows))
    a = Agent(t, reloads_per_day=given)
    a.refresh()
    return a


def reloads(n, every_ns, t0):
    """n load/unload cycles of a library that leaves a key each time."""
    rows = []
    for i in range(n):
        t = t0 + i * every_ns
        rows += [dict(op="acquire", pid=PID, handle=i, caller=0x7F0000001000, load=i + 1, ts=t),
                 dict(op="dlopen", pid=PID, load=i + 1, aux=0xAB, path="/x/leaky.so", ts=t + 1),
                 dict(op="map", pid=PID, load=i + 1, aux=0x7F0000000000, path="/x/leaky.so",
                      ts=t + 2),
                 dict(op="unmap", pid=PID, aux=0x7F0000000000, ts=t + 3)]
    return rows


def test_a_fast_reload_leak_beats_the_fleet_wide_guess_in_the_agent_only():
    # A cycle every 30 ms, each leaving a key: glibc refuses the 1025th at 1024 x 30 ms.
    t0 = 1000 * S
    rows = reloads(300, 30 * MS, t0)
    a = agent_with(*rows)
    (row,) = a.snapshot.rows
    truth = t0 + 1024 * 30 * MS
    assert row["leaking"] and row["rate_basis"].startswith("measured: 300 completed cycles")
    assert row["exhaustion_eta"].timestamp() == pytest.approx(truth / S, abs=1.0)
    # watch and report: --reloads-per-day is the user's what-if, and wins.
    (watched,) = verdicts.rows(*a.ledger.snapshot(), reloads_per_day=1.0)
    assert watched["rate_basis"] == "given: 1 reloads/day" and watched["days_left"] == 724
    # A few cycles are no measure to trust yet: the fleet's guess stands.
    (few,) = agent_with(*reloads(5, 30 * MS, t0)).snapshot.rows
    assert few["rate_basis"] == "given: 1 reloads/day" and few["days_left"] == 1019


def test_a_failed_create_exports_the_time_of_the_failure():
    failed_at = 668_080 * MS
    a = agent_with(*reloads(3, S, 660 * S), dict(op="acquire_failed", pid=PID, ret=11, ts=failed_at),
                   dict(op="release", pid=PID, handle=0, ts=685_100 * MS))
    (row,) = a.snapshot.rows
    assert row["critical"] and row["exhaustion_eta"].timestamp() == failed_at / S
    samples = {m.name: m.samples for m in Collector(a).collect()}
    (eta,) = samples["keytrace_process_pthread_keys_exhaustion_timestamp_seconds"]
    assert eta.value == failed_at / S


def test_a_process_that_is_gone_drops_its_series_though_its_exit_was_lost():
    # Another process had this pid (its start is a second off): ours is gone.
    a = agent_with(*reloads(3, S, 660 * S), start=proc.stat(PID).start_ns - S)
    assert a.snapshot.rows == []
    assert a.snapshot.creates  # its counts stay in the totals


def test_a_forked_workers_inherited_keys_are_counted_once():
    a = agent_with(*[dict(op="acquire", pid=PID, handle=k, caller=0x4000, ts=(10 + k) * S) for k in range(3)])
    a.ledger.ingest(events(*[dict(op="fork", pid=PID, child=c, ts=20 * S + c) for c in (7, 8)]))
    a.refresh()
    assert sum(a.snapshot.creates.values()) == 3


def test_gauges_and_counters_label_an_unknown_exe_alike():
    # A process whose executable is not known: every series says its command name as exe,
    # so that a PromQL join of the gauges and the counters on exe finds it.
    t = Tracer()
    t.ledger.observe(PID, 10 * S - 1, "server", start=proc.stat(PID).start_ns,
                     tables={"keys": ("read", [])})
    t.ledger.ingest(events(*reloads(3, S, 10 * S)))
    a = Agent(t, reloads_per_day=1.0)
    a.refresh()
    fams = {m.name: m.samples for m in Collector(a).collect()}
    (gauge,) = fams["keytrace_process_pthread_keys"]
    creates = [x for x in fams["keytrace_pthread_key_creates"] if x.name.endswith("_total")]
    comm = gauge.labels["comm"]
    assert comm and gauge.labels["exe"] == comm
    assert {x.labels["exe"] for x in creates} == {comm}
    (res,) = [x for x in fams["keytrace_process_resource_in_use"] if x.labels["resource"] == "keys"]
    assert res.labels["exe"] == comm and res.value == gauge.value == 3


def test_a_healthy_process_has_no_series_of_its_own_but_counts_in_its_group():
    # Two keys made in one go at start-up: a fixed set, no leak.
    a = agent_with(*[dict(op="acquire", pid=PID, handle=k, caller=0x4000, ts=10 * S + k)
                     for k in range(2)])
    assert a.snapshot.rows == []
    (g,) = [g for g in a.snapshot.groups if g["resource"] == "keys"]
    assert (g["processes"], g["in_use_max"]) == (1, 2)
    assert g["used_ratio_max"] == pytest.approx(2 / 1024)
    fams = {m.name: m.samples for m in Collector(a).collect()}
    assert fams["keytrace_process_pthread_keys"] == []
    (n,) = [x for x in fams["keytrace_processes"] if x.labels["resource"] == "keys"]
    assert n.value == 1 and n.labels["exe"] == g["exe"]
