"""The ledger's rules on synthetic records (decoded exactly as live ones are)."""
import json

import pandas as pd
import pytest

from conftest import events
from tracer import Ledger
from tracer.analysis import verdicts
from tracer.state.tracker import Tracker
from tracer.store.files import json_lines


def summary_of(*rows, reloads_per_day=None, **kw):
    led = Ledger(**kw)
    led.ingest(events(*rows))
    return led, led.summary(reloads_per_day=reloads_per_day)


def one(summary, **match):
    rows = summary
    for k, v in match.items():
        rows = rows[rows[k] == v]
    assert len(rows) == 1, f"expected one row for {match}, got\n{summary}"
    return rows.iloc[0]


MS = 10**6


def test_keys_from_one_code_path_are_leaking():
    # A per-request leak: the same call site keeps making keys that stay live, a second apart.
    _, s = summary_of(*[dict(op="acquire", pid=10, handle=k, caller=0x4000, ts=10**9 * (k + 1))
                        for k in range(3)])
    r = one(s, pid=10)
    assert (r.creates, r.deletes, r.live_keys, r.same_path_keys) == (3, 0, 3, 3)
    assert bool(r.leaking) and not bool(r.critical) and bool(r.never_deleted)
    assert r.reason.startswith("3 keys live from one code path, made on 3 separate occasions (0x4000)")


def test_a_start_up_set_from_one_maker_is_not_a_leak():
    # OpenSSL's two per-thread keys: one maker, 0.1 ms apart, at start-up, held for good.
    _, s = summary_of(dict(op="acquire", pid=10, handle=0, caller=0x4000, ts=10**9),
                      dict(op="acquire", pid=10, handle=1, caller=0x4000, ts=10**9 + MS // 10),
                      dict(op="exit", pid=10, ts=5 * 10**9), reloads_per_day=1)
    r = one(s, pid=10)
    assert (r.live_keys, r.same_path_keys, bool(r.leaking)) == (2, 1, False)
    assert r.days_left is None and pd.isna(r.exhaustion_eta)


def request_leak(n, every_ns, pid=10, start=10**9, **kw):
    """A key every every_ns, never deleted, by one call site; the process exits after the last."""
    rows = [dict(op="acquire", pid=pid, handle=k, caller=0x4000, ts=start + k * every_ns, **kw)
            for k in range(n)]
    return rows + [dict(op="exit", pid=pid, ts=start + n * every_ns)]


def test_a_key_every_50_ms_is_leaking_with_a_date_from_its_rate():
    _, s = summary_of(*request_leak(200, 50 * MS))
    r = one(s, pid=10)
    assert bool(r.leaking) and r.same_path_keys == 100  # 100 ms occasions: 2 keys each
    truth = 1 / 0.05  # keys a second
    assert r.keys_per_second == pytest.approx(truth, rel=0.1)
    assert r.keys_per_day == pytest.approx(truth * 86_400, rel=0.1)
    assert r.days_left * 86_400 == pytest.approx((1024 - 200) / truth, rel=0.1)
    assert r.rate_basis.startswith("measured per time: 198 keys on 100 occasions in 10.0 seconds")
    assert "out of keys in 41" in r.reason  # 824 keys at 20 a second


def test_a_given_reload_rate_keeps_a_per_request_date():
    _, s = summary_of(*request_leak(200, 50 * MS), reloads_per_day=1)
    r = one(s, pid=10)
    assert r.reloads_per_day == 1 and r.keys_per_day == pytest.approx(20 * 86_400, rel=0.1)
    assert r.rate_basis.startswith("given: 1 reloads/day; measured per time: ")


def test_an_unknown_rate_is_null_and_says_why():
    # Leaking (3 occasions from one path), all in the first 0.4 s of the 9 s observed.
    led, s = summary_of(*request_leak(3, 200 * MS)[:-1], dict(op="acquire", pid=11, handle=0, ts=10**10))
    r = one(s, pid=10)
    assert bool(r.leaking) and pd.isna(r.keys_per_day) and pd.isna(r.keys_per_second)
    assert pd.isna(r.reloads_per_day) and r.days_left is None
    assert r.rate_basis == ("too little to measure per time: 2 keys on 3 occasions in 9.0 "
                            "seconds observed, all in one burst")
    assert r.reason.endswith("no date: " + r.rate_basis)
    healthy = one(s, pid=11)
    assert healthy.rate_basis.startswith("nothing to measure") and pd.isna(healthy.keys_per_day)
    row = verdicts.rows(*led.snapshot(), reloads_per_day=None)[0]
    assert (row["keys_per_day"], row["reloads_per_day"], row["keys_per_second"]) == (None, None, None)
    assert json.loads(json_lines(s).splitlines()[0])["keys_per_day"] is None


def test_a_fixed_set_of_keys_is_not_a_leak_even_never_deleted():
    # Start-up keys, one per call site, held to the end (and the process exits holding them).
    _, s = summary_of(*[dict(op="acquire", pid=10, handle=k, caller=0x4000 + 16 * k) for k in range(3)],
                      dict(op="exit", pid=10))
    r = one(s, pid=10)
    assert (r.live_keys, r.same_path_keys, bool(r.never_deleted)) == (3, 1, True)
    assert not bool(r.leaking) and r.days_left is None and pd.isna(r.exhaustion_eta)


def test_balanced_is_not_flagged_and_reused_key_values_are_tracked():
    # glibc hands a deleted key's slot to the next create: order decides what is live.
    _, s = summary_of(dict(op="acquire", pid=10, handle=0), dict(op="release", pid=10, handle=0),
                      dict(op="acquire", pid=10, handle=0), dict(op="release", pid=10, handle=0))
    r = one(s, pid=10)
    assert (r.creates, r.deletes, r.live_keys, bool(r.leaking)) == (2, 2, 0, False)
    assert r.reason == ""


def test_failed_delete_keeps_the_key():
    _, s = summary_of(dict(op="acquire", pid=10, handle=4), dict(op="release", pid=10, handle=9, ret=22))
    r = one(s, pid=10)
    assert (r.deletes, r.failed_deletes, r.live_keys) == (0, 1, 1)


def test_failed_create_is_critical_not_a_key():
    _, s = summary_of(dict(op="acquire", pid=10, handle=0), dict(op="release", pid=10, handle=0),
                      dict(op="acquire_failed", pid=10, ret=11))
    r = one(s, pid=10)
    assert (r.creates, r.failed_creates, r.live_keys) == (2, 1, 0)
    assert bool(r.critical) and bool(r.leaking)
    assert "EAGAIN: key table full" in r.reason


def cycle(load, keys, deletes=(), unmap=True, base=0x7F0000000000):
    """One load/unload cycle of /x/lib.so: creates inside the dlopen, deletes at dlclose."""
    rows = [dict(op="acquire", pid=10, handle=k, caller=0x7F0000001000, load=load) for k in keys]
    rows += [dict(op="dlopen", pid=10, load=load, aux=0xAB, path="/x/lib.so"),
             dict(op="map", pid=10, load=load, aux=base, path="/x/lib.so")]
    rows += [dict(op="release", pid=10, handle=k) for k in deletes] + [dict(op="dlclose", pid=10, aux=0xAB)]
    return rows + ([dict(op="unmap", pid=10, aux=base)] if unmap else [])


def test_a_balanced_reloader_leaves_nothing_and_gets_no_date():
    # Each cycle makes 3 keys and deletes them; the instance loaded now holds its 3.
    rows = []
    for load in range(1, 6):
        rows += cycle(load, keys=[0, 1, 2], deletes=[0, 1, 2])
    rows += cycle(6, keys=[0, 1, 2], unmap=False)[:-1]  # loaded now, not closed
    _, s = summary_of(*rows, reloads_per_day=1)
    r = one(s, pid=10)
    assert (r.live_keys, r.leak_per_reload, r.reload_cycles) == (3, 0.0, 5)
    assert not bool(r.leaking) and r.days_left is None and pd.isna(r.exhaustion_eta)


def test_a_never_unloaded_library_is_not_a_leak():
    # NODELETE: dlclose does not unmap it, and dlopen again makes no new key.
    rows = cycle(1, keys=[0], unmap=False)
    rows += [dict(op="dlopen", pid=10, load=2, aux=0xAB, path="/x/lib.so"),
             dict(op="dlclose", pid=10, aux=0xAB)]
    _, s = summary_of(*rows, reloads_per_day=1)
    r = one(s, pid=10)
    assert (r.live_keys, r.orphaned_keys, r.leak_per_reload) == (1, 0, 0.0)
    assert not bool(r.leaking) and r.reason == ""


def test_keys_left_by_completed_cycles_are_the_leak():
    rows = []
    for load in range(1, 5):
        rows += cycle(load, keys=[load])
    led, s = summary_of(*rows, reloads_per_day=1)
    r = one(s, pid=10)
    assert (r.live_keys, r.leak_per_reload, r.reload_cycles, r.same_path_keys) == (4, 1.0, 4, 4)
    assert bool(r.leaking) and r.days_left == 1020 and r.rate_basis == "given: 1 reloads/day"
    (c,) = led.reloads().itertuples()
    assert (c.cycles, c.completed, c.keys_per_cycle) == (4, 4, 1.0)


def test_the_live_table_is_the_state_tracing_starts_from():
    led = Ledger()
    # Met while running: 15 keys of an unloaded library (one destructor, now unmapped) and 2
    # of its own (no destructor), then 5 more reloads traced.
    held = [(k, 0x7F00DEAD, True) for k in range(15)] + [(15, 0, False), (16, 0, False)]
    led.observe(10, 10**9, "daemon", exe="/usr/sbin/daemon", start=10**8,
                tables={"keys": ("read", held)})
    rows = []
    for load in range(1, 6):
        rows += cycle(load, keys=[16 + load])
    led.ingest(events(*rows, start_ns=2 * 10**9))
    # Reading the table again (a late probe) changes nothing: holding is idempotent.
    led.observe(10, 3 * 10**9, "daemon", tables={"keys": ("read", held + [(17, 0x7F00BEEF, False)])})
    r = one(led.summary(reloads_per_day=1), pid=10)
    assert (r.live_keys, r.held_keys, r.headroom) == (22, 17, 1002)
    assert (r.exe, r.start.value, r.table) == ("/usr/sbin/daemon", 10**8, "read")
    # The held keys share a destructor that is gone; the traced ones' library file does not
    # exist here, so only the held ones can be called orphaned.
    assert (r.orphaned_keys, r.same_path_keys) == (15, 15) and bool(r.leaking)
    assert r.days_left == 1002  # one key a reload, one reload a day


def test_an_unread_table_never_reads_as_zero():
    led = Ledger()
    led.observe(10, 10**9, "app", exe="/app", start=10**8,
                tables={"keys": ("not read: permission denied", [])})
    led.ingest(events(dict(op="acquire", pid=10, handle=3), start_ns=2 * 10**9))
    r = one(led.summary(), pid=10)
    assert r.live_keys == 1 and pd.isna(r.headroom)
    assert "keys made before tracing are not counted" in r.reason


def test_pid_reuse_starts_a_new_history():
    _, s = summary_of(dict(op="acquire", pid=10, handle=0, comm="old"), dict(op="exit", pid=10),
                      dict(op="acquire", pid=10, handle=0, comm="new"),
                      dict(op="release", pid=10, handle=0, comm="new"))
    assert len(s) == 2
    old, new = one(s, comm="old"), one(s, comm="new")
    assert (old.live_keys, bool(old.alive), new.live_keys, bool(new.alive)) == (1, False, 0, True)
    assert new.start > old.start


def test_fork_inherits_keys_and_exec_empties_them():
    _, s = summary_of(
        dict(op="acquire", pid=10, handle=0), dict(op="acquire", pid=10, handle=1),
        dict(op="fork", pid=10, child=11),
        dict(op="release", pid=11, handle=0),                          # an inherited key
        dict(op="fork", pid=10, child=12),
        dict(op="exec", pid=12, path="/bin/other", comm="other"),
        dict(op="acquire", pid=12, handle=0, comm="other"))
    parent, child, execd = one(s, pid=10), one(s, pid=11), one(s, pid=12)
    assert parent.live_keys == 2
    assert (child.live_keys, child.deletes, child.parent_pid) == (1, 1, 10)
    assert (execd.live_keys, execd.creates, execd.exe, execd.comm) == (1, 1, "/bin/other", "other")


def test_a_fork_over_a_pid_whose_exit_was_lost_closes_the_old_history():
    _, s = summary_of(dict(op="acquire", pid=11, handle=0, comm="stale"),
                      dict(op="fork", pid=10, child=11),
                      dict(op="acquire", pid=11, handle=3))
    assert not bool(one(s, comm="stale").alive)
    assert one(s, pid=11, alive=True).live_keys == 1


def test_state_only_ledger_stays_flat():
    led = Ledger(keep_events=False, max_exited=5)
    for i in range(50):
        pid = 1000 + i
        led.ingest(events(dict(op="fork", pid=1, child=pid), dict(op="exit", pid=pid),
                          dict(op="acquire", pid=pid + 5000, handle=0), dict(op="exit", pid=pid + 5000),
                          start_ns=10**9 + i * 10**6))
    assert led.events.empty
    # pid 1 (alive, no keys) and the 5 newest exited processes that touched keys.
    assert len(led.processes()) == 6
    assert led.event_count == 200


def test_events_keep_arrival_order_across_batches():
    led = Ledger()
    led.ingest(events(dict(op="acquire", pid=10, handle=0)))
    led.ingest(events(dict(op="release", pid=10, handle=0), start_ns=2 * 10**9))
    assert list(led.events["op"]) == ["acquire", "release"]
    assert isinstance(led.events["ts"].dtype, pd.DatetimeTZDtype)


def test_comm_decoding_keeps_every_distinct_name():
    from tracer.wire import _decode_strings
    import numpy as np
    raw = np.array([b"a", b"bb", b"a", b"\xff\xfe", b"\xff\xfd", b""], dtype="S16")
    assert list(_decode_strings(raw)) == ["a", "bb", "a", "\ufffd\ufffd", "\ufffd\ufffd", ""]
    assert list(_decode_strings(raw[:0])) == []


def test_generations_pair_a_key_reused_by_two_threads_out_of_order():
    # Thread A deletes key 0 (its slot goes from sequence 1 to 2) and thread B creates it again
    # (3): B's record reaches the ring first. Then a create whose delete came first.
    _, s = summary_of(dict(op="acquire", pid=10, handle=0, seq=1, caller=0x10),
                      dict(op="acquire", pid=10, handle=0, seq=3, caller=0x20),
                      dict(op="release", pid=10, handle=0, seq=2),
                      dict(op="release", pid=10, handle=7, seq=6),
                      dict(op="acquire", pid=10, handle=7, seq=5, caller=0x30))
    r = one(s, pid=10)
    assert (r.creates, r.deletes, r.live_keys) == (3, 2, 1)


def test_a_library_making_two_keys_per_load_is_leaking():
    rows = []
    for load in range(1, 5):
        rows += cycle(load, keys=[2 * load, 2 * load + 1])
    led, s = summary_of(*rows, reloads_per_day=1)
    r = one(s, pid=10)
    assert (r.live_keys, r.same_path_keys, r.leak_per_reload) == (8, 4, 2.0)
    assert bool(r.leaking) and r.days_left == (1024 - 8) / 2
    (c,) = led.reloads().itertuples()
    assert (c.completed, c.keys_left, c.keys_per_cycle) == (4, 8, 2.0)


def test_a_key_made_once_at_the_first_cycle_is_not_spread_over_the_cycles():
    # imagick.so's first load pulls in glib, which makes its key once and stays loaded (never
    # unmapped); the next five cycles leave nothing.
    rows = [dict(op="acquire", pid=10, handle=0, caller=0x7E0000001000, load=1),
            dict(op="dlopen", pid=10, load=1, aux=0xAB, path="/x/imagick.so"),
            dict(op="map", pid=10, load=1, aux=0x7F0000000000, path="/x/imagick.so"),
            dict(op="map", pid=10, load=1, aux=0x7E0000000000, path="/x/libglib.so"),
            dict(op="unmap", pid=10, aux=0x7F0000000000)]
    for load in range(2, 7):
        rows += [dict(op="dlopen", pid=10, load=load, aux=0xAB, path="/x/imagick.so"),
                 dict(op="map", pid=10, load=load, aux=0x7F0000000000, path="/x/imagick.so"),
                 dict(op="unmap", pid=10, aux=0x7F0000000000)]
    led, s = summary_of(*rows, reloads_per_day=1)
    (c,) = led.reloads().itertuples()
    assert (c.cycles, c.completed, c.keys_left, c.keys_per_cycle) == (6, 6, 1, 0.0)
    assert c.finding == "loads of imagick.so leave no key"
    r = one(s, pid=10)
    assert (r.live_keys, r.leak_per_reload, bool(r.leaking), r.days_left) == (1, 0.0, False, None)


def test_a_forked_worker_inherits_no_verdict_and_no_date():
    # The master leaks a key per reload (orphaned) and holds 2 start-up keys; its workers fork
    # after 4 reloads and make no key of their own; a third worker leaks on its own.
    rows = [dict(op="acquire", pid=10, handle=100, caller=0x4000),
            dict(op="acquire", pid=10, handle=101, caller=0x4000)]
    for load in range(1, 5):
        rows += cycle(load, keys=[load])
    rows += [dict(op="fork", pid=10, child=c) for c in (11, 12, 13)]
    rows += [dict(op="acquire", pid=13, handle=200 + k, caller=0x4000, ts=(10 + k) * 10**9)
             for k in range(4)]
    led, s = summary_of(*rows, dict(op="exit", pid=13, ts=20 * 10**9), reloads_per_day=1)
    master = one(s, pid=10)
    assert bool(master.leaking) and master.days_left == 1024 - 6
    for pid in (11, 12):
        w = one(s, pid=pid)
        assert (w.live_keys, w.creates, w.orphaned_keys, w.same_path_keys) == (6, 0, 0, 0)
        assert (bool(w.leaking), w.leak_per_reload, w.reload_cycles) == (False, 0, 0)
        assert pd.isna(w.days_left) and pd.isna(w.exhaustion_eta) and w.reason == ""
    own = one(s, pid=13)
    assert (own.live_keys, own.same_path_keys, bool(own.leaking)) == (10, 4, True)
    # The master's calls are counted once, in the master: a worker's sites start at zero.
    worker = next(p for p in led.processes() if p.pid == 11)
    assert sum(site.acquired for site in worker.tables["keys"].sites.values()) == 0
    assert {r.pid: r.created for r in led.by_library().itertuples()}[11] == 0


def test_a_failed_create_carries_the_time_of_the_failure():
    failed_at = 668_080_000_000
    _, s = summary_of(*[dict(op="acquire", pid=10, handle=k, load=k + 1) for k in range(3)],
                      dict(op="acquire_failed", pid=10, ret=11, ts=failed_at),
                      dict(op="release", pid=10, handle=0, ts=675 * 10**9))
    r = one(s, pid=10)
    assert bool(r.critical) and r.days_left == 0
    assert r.exhaustion_eta.value == failed_at


def test_lost_records_are_the_only_unknown_library_and_say_so():
    led = Ledger()
    led.ingest(events(dict(op="acquire", pid=10, handle=0, caller=0x4000)))
    led.ingest_records(Tracker.counted({(10, "keys"): (3, 0, 0, 0)}, 2 * 10**9), 0)  # 2 creates lost
    r = one(led.summary(), pid=10)
    assert r.live_keys == 3 and r.libraries == {"(in no known module)": 1, "?": 2}
    assert "2 creates not recorded (the kernel could not queue the records)" in r.reason
    libs = led.by_library().set_index("library")
    assert libs.loc["?", "created"] == 2 and "could not queue" in libs.loc["?", "stack_note"]
    assert libs.loc["(in no known module)", "created"] == 1


def test_a_process_met_mid_life_has_the_parent_the_host_showed():
    """parent_pid of a process whose fork was not seen: its ppid when it was met (1, a daemon),
    not 0; a fork seen names its parent."""
    met = Tracker.facts(10, 10**9, "httpd", exe="/usr/sbin/httpd", start=5 * 10**8, ppid=1)
    led = Ledger()
    led.ingest(met)
    led.ingest(events(dict(op="acquire", pid=10, handle=2, ts=15 * 10**8),
                      dict(op="fork", pid=10, child=11, ts=2 * 10**9),
                      dict(op="acquire", pid=11, handle=3, ts=3 * 10**9)))
    s = led.summary()
    assert one(s, pid=10).parent_pid == 1 and one(s, pid=11).parent_pid == 10
