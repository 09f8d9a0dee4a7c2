"""The ledger's rules on synthetic records (decoded exactly as live ones are)."""
import pandas as pd

from conftest import events
from tracer import Ledger


def summary_of(*rows, **kw):
    led = Ledger(**kw)
    led.ingest(events(*rows))
    return led, led.summary()


def one(summary, **match):
    rows = summary
    for k, v in match.items():
        rows = rows[rows[k] == v]
    assert len(rows) == 1, f"expected one row for {match}, got\n{summary}"
    return rows.iloc[0]


def test_create_without_delete_is_leaking():
    _, s = summary_of(*[dict(op="create", pid=10, key=k) for k in range(3)])
    r = one(s, pid=10)
    assert (r.creates, r.deletes, r.live_keys, bool(r.leaking), bool(r.critical)) == (3, 0, 3, True, False)
    assert r.reason == "created 3 keys, deleted none"


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


def test_keys_outliving_dlclose_are_flagged_even_when_some_are_deleted():
    load = 777
    _, s = summary_of(
        dict(op="create", pid=10, key=5),                       # unrelated, deleted below
        dict(op="create", pid=10, key=6, load=load),           # made inside the dlopen
        dict(op="dlopen", pid=10, load=load, handle=0xAB, path="/x/libleaky.so"),
        dict(op="dlclose", pid=10, handle=0xAB),
        dict(op="delete", pid=10, key=5))
    r = one(s, pid=10)
    assert (r.live_keys, r.keys_after_dlclose, bool(r.leaking)) == (1, 1, True)
    assert r.reason == "1 key outlived dlclose of the library that created them"


def test_dlopen_refcount_keeps_library_loaded_until_last_dlclose():
    _, s = summary_of(
        dict(op="create", pid=10, key=1, load=1),
        dict(op="dlopen", pid=10, load=1, handle=0xAB, path="/x/lib.so"),
        dict(op="dlopen", pid=10, load=2, handle=0xAB, path="/x/lib.so"),
        dict(op="dlclose", pid=10, handle=0xAB))
    assert one(s, pid=10).keys_after_dlclose == 0


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
