"""Code paths and libraries on synthetic events over real ELF files: a frame past the first that
is no return address is no part of a path; a key is named by its caller's module even when the
walk failed and the module was reported late; the incident's Apache flags nothing."""
import subprocess

import pandas as pd
import pytest

from conftest import events
from tracer import Ledger
from tracer.analysis.attribution import NO_MODULE, ends_in_call
from tracer.host.elf import elf_info

LIBB, LIBA = 0x7F0000000000, 0x7E0000000000  # load bases
JUNK = 0x2536B0058948FF  # the Apache case's second frame: a word of a stack without frame pointers
IP = 0x7B0000001000     # where the walk starts (in pthread_key_create): the caller replaces it


@pytest.mark.parametrize("code, call", [
    ("e8 10 20 30 40", True),           # call rel32
    ("ff d0", True),                    # call *%rax
    ("41 ff d3", True),                 # call *%r11
    ("ff 50 08", True),                 # call *0x8(%rax)
    ("ff 54 24 08", True),              # call *0x8(%rsp)
    ("41 ff 54 24 08", True),           # call *0x8(%r12)
    ("ff 15 00 10 00 00", True),        # call *0x1000(%rip)
    ("ff 94 24 00 01 00 00", True),     # call *0x100(%rsp)
    ("ff 14 25 00 10 00 00", True),     # call *0x1000
    ("ff e0", False),                   # jmp *%rax
    ("c3", False),                      # ret
    ("ff 50", False),                   # a call that would need one byte more
    ("48 89 c7 90 90", False),          # mov, nops
])
def test_what_ends_in_a_call(code, call):
    assert ends_in_call(bytes.fromhex("90 90 90 90 90 90 90 " + code)) is call


def return_after(lib: str, callee: str) -> int:
    """The address just after the first call of callee in lib (objdump's reading)."""
    lines = [ln.split(":", 1) for ln in subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", lib], capture_output=True, text=True,
        check=True).stdout.splitlines() if ln.startswith("  ") and ":" in ln]
    for (_, text), (addr, _) in zip(lines, lines[1:]):
        if "call" in text and f"<{callee}@plt>" in text:
            return int(addr, 16)
    raise AssertionError(f"no call of {callee} in {lib}")


@pytest.fixture
def sites(bins):
    """Addresses in libb (maker) and liba (its caller), as mapped at LIBB and LIBA."""
    return {"caller": LIBB + return_after(bins["libb"], "pthread_key_create"),
            "in_liba": LIBA + return_after(bins["liba"], "libb_work"),
            "liba_entry": LIBA + elf_info(bins["liba"]).address_of("liba_work")}


def mapped(bins, pid=10):
    return [dict(op="mapped", pid=pid, path=bins["libb"], aux=LIBB),
            dict(op="mapped", pid=pid, path=bins["liba"], aux=LIBA)]


def test_frames_past_the_first_that_is_no_return_address_are_not_the_path(bins, sites):
    c, ret = sites["caller"], sites["in_liba"]
    stacks = {1: [IP, ret, JUNK],                            # in no mapping
              2: [IP, ret, sites["liba_entry"], ret],         # mapped, but after no call
              3: [IP, ret, 0x1234]}
    led = Ledger()
    led.ingest(events(*mapped(bins), *[
        dict(op="acquire", pid=10, handle=k, caller=c, stack=k, ts=(k + 2) * 10**9) for k in stacks],
        stacks=stacks))
    (r,) = led.summary().itertuples()
    assert r.busiest_path.startswith("libb.so!init+0x") and " <- liba.so!liba_work+0x" in r.busiest_path
    assert r.busiest_path.count(" <- ") == 1 and "0x2536" not in r.busiest_path
    assert (r.same_path_keys, bool(r.leaking), r.library) == (3, True, bins["libb"])
    (lib,) = led.by_library().itertuples()
    assert lib.stack.startswith("proc -> liba.so!liba_work+0x") and "frame pointers" in lib.stack_note


def test_a_key_is_named_by_its_caller_when_the_walk_failed_and_the_maps_came_late(bins, sites):
    # A process born under tracing whose maps were not read in time: its modules are first
    # reported by a later dlopen's walk of the link_map (which names the modules loaded before
    # it too). The create's stack walk failed: only its caller is known.
    led = Ledger()
    led.ingest(events(
        dict(op="exec", pid=10, path="/usr/bin/curl", comm="curl", ts=10**9),
        dict(op="acquire", pid=10, handle=0, caller=sites["caller"], ts=2 * 10**9),
        dict(op="acquire", pid=10, handle=1, caller=0x1234, ts=2 * 10**9 + 1),  # in no module
        dict(op="dlopen", pid=10, load=1, aux=0xAB, path="/x/libnss.so", ts=3 * 10**9),
        dict(op="map", pid=10, load=1, aux=LIBB, path=bins["libb"], ts=3 * 10**9 + 1),
        dict(op="map", pid=10, load=1, aux=LIBA, path=bins["liba"], ts=3 * 10**9 + 2)))
    (r,) = led.summary().itertuples()
    assert r.libraries == {bins["libb"]: 1, NO_MODULE: 1}
    libs = set(led.by_library()["library"])
    assert libs == {bins["libb"], NO_MODULE} and "?" not in libs  # "?": lost records only


def test_stock_apache_with_graceful_restarts_flags_nothing(bins, sites):
    # The master: OpenSSL's 2 start-up keys (one maker, junk second frame, 0.1 ms apart); 6
    # graceful restarts, each unloading and reloading modules that make 3 keys and delete them,
    # the first also loading a library (glib) that makes a key once and stays; then 3 workers
    # forked that make no key of their own.
    c = sites["caller"]
    rows = [dict(op="exec", pid=10, path="/usr/sbin/apache2", comm="apache2", ts=10**9),
            *mapped(bins)]
    rows += [dict(op="acquire", pid=10, handle=k, caller=c, stack=1, ts=2 * 10**9 + k * 100_000)
             for k in (0, 1)]
    for load in range(1, 8):
        t = (2 + 10 * load) * 10**9
        rows += [dict(op="acquire", pid=10, handle=k, caller=0x7D0000001000 + k, load=load, ts=t + k)
                 for k in (2, 3, 4)]
        if load == 1:
            rows += [dict(op="acquire", pid=10, handle=5, caller=0x7C0000001000, load=1, ts=t + 5)]
        rows += [dict(op="dlopen", pid=10, load=load, aux=0xAB, path="/x/mod_php.so", ts=t + 10),
                 dict(op="map", pid=10, load=load, aux=0x7D0000000000, path="/x/mod_php.so",
                      ts=t + 11)]
        if load == 1:
            rows += [dict(op="map", pid=10, load=1, aux=0x7C0000000000, path="/x/libglib.so",
                          ts=t + 12)]
        if load < 7:  # the 7th stays loaded: the server runs on
            rows += [dict(op="release", pid=10, handle=k, ts=t + 10**9 + k) for k in (2, 3, 4)]
            rows += [dict(op="unmap", pid=10, aux=0x7D0000000000, ts=t + 2 * 10**9)]
    rows += [dict(op="fork", pid=10, child=child, ts=80 * 10**9 + child) for child in (11, 12, 13)]
    led = Ledger()
    led.ingest(events(*rows, stacks={1: [IP, JUNK]}), now=90 * 10**9)
    s = led.summary(reloads_per_day=1)
    assert len(s) == 4 and not s["leaking"].any(), s[["pid", "reason"]]
    assert s["days_left"].isna().all() and s["exhaustion_eta"].isna().all()
    master = s[s.pid == 10].iloc[0]
    assert (master.live_keys, master.same_path_keys, master.leak_per_reload) == (6, 1, 0.0)
    assert set(s[s.pid != 10]["live_keys"]) == {6}
    (php,) = led.reloads().itertuples()
    assert (php.completed, php.keys_per_cycle) == (6, 0.0)
    assert pd.isna(master.keys_per_day) or master.keys_per_day == 0
