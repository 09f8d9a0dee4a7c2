"""The ledger's rules on synthetic records (decoded exactly as live ones are)."""
import pandas as pd

from conftest import events
from tracer import Ledger


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


def test_keys_from_one_code_path_are_leaking():
    # A per-request leak: the same call site keeps making keys that stay live.
    _, s = summary_of(*[dict(op="create", pid=10, key=k, caller=0x4000) for k in range(3)])
    r = one(s, pid=10)
    assert (r.creates, r.deletes, r.live_keys, r.same_path_keys) == (3, 0, 3, 3)
    assert bool(r.leaking) and not bool(r.critical) and bool(r.never_deleted)
    assert r.reason == "3 keys live from one code path (0x4000)"


def test_a_fixed_set_of_keys_is_not_a_leak_even_never_deleted():
    # Start-up keys, one per call site, held to the end (and the process exits holding them).
    _, s = summary_of(*[dict(op="create", pid=10, key=k, caller=0x4000 + 16 * k) for k in range(3)],
                      dict(op="exit", pid=10))
    r = one(s, pid=10)
    assert (r.live_keys, r.same_path_keys, bool(r.never_deleted)) == (3, 1, True)
    assert not bool(r.leaking) and r.days_left is None and pd.isna(r.exhaustion_eta)


def test_balanced_is_not_flagged_and_reused_key_values_are_tracked():
    # glibc hands a deleted key's slot to the next create: order decides what is live.
    _, s = summary_of(dict(op="create", pid=10, key=0), dict(op="delete", pid=10, key=0),
                      dict(op="create", pid=10, key=0), dict(op="delete", pid=10, key=0))
    r = one(s, pid=10)
    assert (r.creates, r.deletes, r.live_keys, bool(r.leaking)) == (2, 2, 0, False)
    assert r.reason == ""


def test_failed_delete_keeps_the_key():
    _, s = summary_of(dict(op="create", pid=10, key=4), dict(op="delete", pid=10, key=9, ret=22))
    r = one(s, pid=10)
    assert (r.deletes, r.failed_deletes, r.live_keys) == (0, 1, 1)


def test_failed_create_is_critical_not_a_key():
    _, s = summary_of(dict(op="create", pid=10, key=0), dict(op="delete", pid=10, key=0),
                      dict(op="create_failed", pid=10, ret=11))
    r = one(s, pid=10)
    assert (r.creates, r.failed_creates, r.live_keys) == (2, 1, 0)
    assert bool(r.critical) and bool(r.leaking)
    assert "EAGAIN: key table full" in r.reason


def cycle(load, keys, deletes=(), unmap=True, base=0x7F0000000000):
    """One load/unload cycle of /x/lib.so: creates inside the dlopen, deletes at dlclose."""
    rows = [dict(op="create", pid=10, key=k, caller=0x7F0000001000, load=load) for k in keys]
    rows += [dict(op="dlopen", pid=10, load=load, handle=0xAB, path="/x/lib.so"),
             dict(op="map", pid=10, load=load, handle=base, path="/x/lib.so")]
    rows += [dict(op="delete", pid=10, key=k) for k in deletes] + [dict(op="dlclose", pid=10, handle=0xAB)]
    return rows + ([dict(op="unmap", pid=10, handle=base)] if unmap else [])


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
    rows += [dict(op="dlopen", pid=10, load=2, handle=0xAB, path="/x/lib.so"),
             dict(op="dlclose", pid=10, handle=0xAB)]
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
    led.observe(10, 10**9, "daemon", exe="/usr/sbin/daemon", start=10**8, table="read", keys=held)
    rows = []
    for load in range(1, 6):
        rows += cycle(load, keys=[16 + load])
    led.ingest(events(*rows, start_ns=2 * 10**9))
    # Reading the table again (a late probe) changes nothing: holding is idempotent.
    led.observe(10, 3 * 10**9, "daemon", table="read", keys=held + [(17, 0x7F00BEEF, False)])
    r = one(led.summary(reloads_per_day=1), pid=10)
    assert (r.live_keys, r.held_keys, r.headroom) == (22, 17, 1002)
    assert (r.exe, r.start.value, r.table) == ("/usr/sbin/daemon", 10**8, "read")
    # The held keys share a destructor that is gone; the traced ones' library file does not
    # exist here, so only the held ones can be called orphaned.
    assert (r.orphaned_keys, r.same_path_keys) == (15, 15) and bool(r.leaking)
    assert r.days_left == 1002  # one key a reload, one reload a day


def test_an_unread_table_never_reads_as_zero():
    led = Ledger()
    led.observe(10, 10**9, "app", exe="/app", start=10**8, table="not read: permission denied")
    led.ingest(events(dict(op="create", pid=10, key=3), start_ns=2 * 10**9))
    r = one(led.summary(), pid=10)
    assert r.live_keys == 1 and pd.isna(r.headroom)
    assert "keys made before tracing are not counted" in r.reason


def test_pid_reuse_starts_a_new_history():
    _, s = summary_of(dict(op="create", pid=10, key=0, comm="old"), dict(op="exit", pid=10),
                      dict(op="create", pid=10, key=0, comm="new"),
                      dict(op="delete", pid=10, key=0, comm="new"))
    assert len(s) == 2
    old, new = one(s, comm="old"), one(s, comm="new")
    assert (old.live_keys, bool(old.alive), new.live_keys, bool(new.alive)) == (1, False, 0, True)
    assert new.start > old.start


def test_fork_inherits_keys_and_exec_empties_them():
    _, s = summary_of(
        dict(op="create", pid=10, key=0), dict(op="create", pid=10, key=1),
        dict(op="fork", pid=10, child=11),
        dict(op="delete", pid=11, key=0),                          # an inherited key
        dict(op="fork", pid=10, child=12),
        dict(op="exec", pid=12, path="/bin/other", comm="other"),
        dict(op="create", pid=12, key=0, comm="other"))
    parent, child, execd = one(s, pid=10), one(s, pid=11), one(s, pid=12)
    assert parent.live_keys == 2
    assert (child.live_keys, child.deletes, child.parent_pid) == (1, 1, 10)
    assert (execd.live_keys, execd.creates, execd.exe, execd.comm) == (1, 1, "/bin/other", "other")


def test_a_fork_over_a_pid_whose_exit_was_lost_closes_the_old_history():
    _, s = summary_of(dict(op="create", pid=11, key=0, comm="stale"),
                      dict(op="fork", pid=10, child=11),
                      dict(op="create", pid=11, key=3))
    assert not bool(one(s, comm="stale").alive)
    assert one(s, pid=11, alive=True).live_keys == 1


def test_state_only_ledger_stays_flat():
    led = Ledger(keep_events=False, max_exited=5)
    for i in range(50):
        pid = 1000 + i
        led.ingest(events(dict(op="fork", pid=1, child=pid), dict(op="exit", pid=pid),
                          dict(op="create", pid=pid + 5000, key=0), dict(op="exit", pid=pid + 5000),
                          start_ns=10**9 + i * 10**6))
    assert led.events.empty
    # pid 1 (alive, no keys) and the 5 newest exited processes that touched keys.
    assert len(led.processes()) == 6
    assert led.event_count == 200


def test_events_keep_arrival_order_across_batches():
    led = Ledger()
    led.ingest(events(dict(op="create", pid=10, key=0)))
    led.ingest(events(dict(op="delete", pid=10, key=0), start_ns=2 * 10**9))
    assert list(led.events["op"]) == ["create", "delete"]
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
    _, s = summary_of(dict(op="create", pid=10, key=0, seq=1, caller=0x10),
                      dict(op="create", pid=10, key=0, seq=3, caller=0x20),
                      dict(op="delete", pid=10, key=0, seq=2),
                      dict(op="delete", pid=10, key=7, seq=6),
                      dict(op="create", pid=10, key=7, seq=5, caller=0x30))
    r = one(s, pid=10)
    assert (r.creates, r.deletes, r.live_keys) == (3, 2, 1)
