"""Attribution and forecast against real probes: which library made the keys, which keys are
orphaned, what each reload leaves behind, and when the process runs out."""
import subprocess
import time

import pandas as pd
import pytest

from conftest import json_rows, keytrace
from tracer.session import KeyTracer

pytestmark = pytest.mark.usefixtures("bpf")


def watch(*args):
    res = keytrace("watch", "--json", *args)
    assert res.returncode == 0, res.stderr
    return res


def test_nested_leak_names_libb_and_forecasts_the_incident(bins, tmp_path):
    ledger = tmp_path / "nested.parquet"
    # One reload every 20 ms: spread over the time observed, so the rate can be measured.
    res = watch("--reloads-per-day", "1", "-o", str(ledger), "--", bins["reload_host"], bins["liba"],
                "5", "20000")
    (row,) = json_rows(res.stdout)
    assert row["library"] == bins["libb"]
    assert row["libraries"] == {bins["libb"]: 5}
    assert (row["live_keys"], row["orphaned_keys"], row["leak_per_reload"]) == (5, 5, 1.0)
    assert row["limit"] == 1024 and row["headroom"] == 1019
    # The incident's arithmetic: one key per daily reload leaves ~2.8 years.
    assert row["days_left"] == pytest.approx(1019)
    eta = pd.Timestamp(row["exhaustion_eta"])
    assert 2.7 < (eta - pd.Timestamp(row["start"])).days / 365.25 < 2.9
    assert "out of keys in 2.8 years" in row["reason"]

    # Every reload mapped libB at the same address, and still each old key is orphaned.
    events = pd.read_parquet(ledger)
    bases = events[(events.op == "map") & (events.path == bins["libb"])]["aux"]
    assert len(bases) == 5 and bases.nunique() == 1

    # Without a given rate, the rate measured from the dlopen timestamps still gives a date.
    (measured,) = json_rows(keytrace("report", str(ledger), "--json").stdout)
    assert measured["leak_per_reload"] == 1.0 and measured["reloads_per_day"] > 1
    assert pd.Timestamp(measured["exhaustion_eta"]) > pd.Timestamp(measured["start"])

    by_reload = json_rows(keytrace("report", str(ledger), "--json", "--by", "reload").stdout)
    (cycle,) = [r for r in by_reload if r["loaded"] == bins["liba"]]
    assert (cycle["cycles"], cycle["keys_per_cycle"], cycle["made_by"]) == (5, 1.0, bins["libb"])
    assert cycle["finding"] == "each load of liba.so leaves 1 key, made by libb.so"

    (lib,) = json_rows(keytrace("report", str(ledger), "--json", "--by", "library").stdout)
    assert lib["library"] == bins["libb"] and lib["orphaned_keys"] == 5
    # host -> dlopen(libA) -> ... -> libB's constructor -> pthread_key_create
    assert lib["stack"].startswith("reload_host -> dlopen(liba.so) -> ")
    assert "libb.so!init+0x" in lib["stack"] and lib["stack"].endswith("pthread_key_create")
    # ld.so has no frame pointers: the walk stops there, and the output says so.
    assert "frame pointers" in lib["stack_note"]


def test_tidy_library_deleting_through_a_tail_call_is_balanced(bins):
    disasm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", bins["libtail"]],
                            capture_output=True, text=True).stdout
    fini = disasm.split("<fini>:", 1)[1].split("\n\n", 1)[0]
    assert "jmp" in fini and "pthread_key_delete" in fini, "the fixture must tail-call"
    (row,) = json_rows(watch("--", bins["reload_host"], bins["libtail"], "6").stdout)
    assert (row["creates"], row["deletes"], row["live_keys"], row["orphaned_keys"]) == (6, 6, 0, 0)
    assert row["leaking"] is False and row["exhaustion_eta"] is None and row["leak_per_reload"] == 0


def test_stripped_library_resolves_to_module_and_offset(bins, tmp_path):
    ledger = tmp_path / "s.jsonl"
    (row,) = json_rows(watch("-o", str(ledger), "--", bins["reload_host"], bins["liba_on_stripped"], "3").stdout)
    assert row["library"] == bins["libb_stripped"] and row["orphaned_keys"] == 3
    (lib,) = json_rows(keytrace("report", str(ledger), "--json", "--by", "library").stdout)
    assert "libb_stripped.so+0x" in lib["stack"] and "!init" not in lib["stack"]


def test_two_libraries_leaking_at_different_rates(bins):
    with KeyTracer(command=[bins["reload_host"], f'{bins["liba"]}:{bins["libfast"]}', "4",
                            "20000"]) as t:
        t.wait()
    libs = t.ledger.by_library().set_index("library")
    assert libs.loc[bins["libb"], "live_keys"] == 4
    assert libs.loc[bins["libfast"], "live_keys"] == 8
    reloads = t.ledger.reloads().set_index("loaded")
    assert reloads.loc[bins["liba"], "keys_per_cycle"] == 1.0
    assert reloads.loc[bins["libfast"], "keys_per_cycle"] == 2.0
    assert reloads.loc[bins["libfast"], "made_by"] == bins["libfast"]
    (row,) = t.ledger.summary().itertuples()
    assert row.library == bins["libfast"] and row.leak_per_reload == 3.0
    assert row.orphaned_keys == 12
    # Measured from the dlopen timestamps (4 reloads 20 ms apart: some 4 million a day, 3
    # keys each): the 1012 keys left go in well under a minute, dated from now.
    assert 2e6 < row.reloads_per_day < 5e6, row.reloads_per_day
    now = pd.Timestamp.now(tz="UTC")
    assert now < row.exhaustion_eta < now + pd.Timedelta(minutes=1), row.exhaustion_eta


def test_keys_of_the_main_program_resolve_through_its_maps(bins):
    proc = subprocess.Popen([bins["keymaker"]], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with KeyTracer(pids=[proc.pid]) as t:
            proc.stdin.write("c 3\n")
            proc.stdin.flush()
            assert proc.stdout.readline().split() == ["ok", "3"]
            time.sleep(0.05)
        (row,) = t.ledger.summary().itertuples()
        assert row.library == bins["keymaker"] and row.orphaned_keys == 0
        (lib,) = t.ledger.by_library().itertuples()
        assert "keymaker!main+0x" in lib.stack
    finally:
        proc.kill()
        proc.wait()
