"""The investigation notebook runs top to bottom against real probes, and says what it should."""
import base64
import json
import os
import time
from pathlib import Path

import nbclient
import nbformat
import pytest

from conftest import uprobes_attached_by
from tracer.session import KeyTracer

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "investigate-key-leak.ipynb"
pytestmark = pytest.mark.usefixtures("bpf")


def test_notebook_finds_the_leak_and_names_the_library():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    (line,) = [ln for o in outputs if o.get("name") == "stdout"
               for ln in o["text"].splitlines() if ln.startswith("FINDING ")]
    found = json.loads(line[len("FINDING "):])
    assert found["leaking"] and found["library"].endswith("/libgomp_demo.so")
    assert (found["orphaned_keys"], found["leak_per_reload"]) == (50, 1.0)
    assert found["days_left"] == pytest.approx(974)  # (1024 - 50) keys at one a day
    assert found["scan_keys_in_use"] == 50 and found["scan_orphaned_keys"] == 50
    assert found["tables"] == dict.fromkeys(["keys", "timers", "fds", "threads", "maps",
                                             "handlers", "tls"], "ok")
    assert found["keys_table"] == 50
    pngs = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 2 and all(base64.b64decode(p)[:4] == b"\x89PNG" for p in pngs)
    htmls = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("background-color: #fff3cd" in h for h in htmls)  # the flagged row, highlighted


def test_start_returns_at_once_and_the_summary_grows(bins):
    t = KeyTracer()
    started = time.monotonic()
    t.start()
    try:
        assert time.monotonic() - started < 10 and t._thread.is_alive()
        before = len(t.ledger.summary())
        os.system(f"{bins['reload_host']} {bins['libleaky']} 3")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            s = t.ledger.summary()
            mine = s[s["exe"] == bins["reload_host"]]
            if len(mine) and mine["creates"].iloc[0] == 3:
                break
            time.sleep(0.05)
        assert len(s) > before and mine["creates"].iloc[0] == 3  # grew while we waited
    finally:
        t.stop()
    assert uprobes_attached_by(os.getpid()) == []


def test_html_view_highlights_flagged_rows(bins):
    with KeyTracer(command=[bins["reload_host"], bins["libleaky"], "2"]) as t:
        t.wait()
    html = t._repr_html_()
    assert "KeyTracer: stopped" in html and "1 flagged" in html
    assert "background-color: #fff3cd" in html and "reload_host" in html
