"""Saved ledgers: every format round-trips to the same analysis; bad files are clear errors."""
import re

import pandas as pd
import pytest

from conftest import events, keytrace
from tracer.errors import KeytraceError
from tracer.store.files import load_events, save_events
from tracer import Ledger

SAMPLE = events(
    dict(op="fork", pid=1, child=10),
    dict(op="acquire", pid=10, handle=0, owner=0x7F00DEAD, caller=0x55AA, load=5),
    dict(op="dlopen", pid=10, load=5, aux=0xAB, path="/x/libleaky.so"),
    dict(op="dlclose", pid=10, aux=0xAB),
    # dlopen(NULL) (ctypes.CDLL(None)): the program's own handle, no file, no load
    dict(op="dlopen", pid=10, load=6, aux=0xCD, path=""),
    dict(op="exec", pid=1, path="/bin/ünïcode", comm="sh"),
    dict(op="acquire_failed", pid=10, ret=11),
)


@pytest.mark.parametrize("ext", [".parquet", ".csv", ".jsonl"])
def test_round_trip(tmp_path, ext):
    path = tmp_path / f"ledger{ext}"
    save_events(SAMPLE, path, lost=3)
    back, meta = load_events(path)
    assert back.dtypes.to_dict() == SAMPLE.dtypes.to_dict()
    assert back.astype(str).equals(SAMPLE.astype(str))
    assert meta == {"schema": 3, "lost": 3, "end": 0, "resources": {}}
    live, replayed = Ledger(), Ledger.from_file(path)
    live.ingest(SAMPLE, lost=3)
    assert replayed.summary().equals(live.summary())
    assert replayed.lost == 3


def test_report_cli_reads_a_saved_ledger(tmp_path):
    path = tmp_path / "l.jsonl"
    save_events(SAMPLE, path)
    res = keytrace("report", str(path), "--json", "--fail-on-leak")
    assert res.returncode == 3, res.stderr
    assert '"failed_creates": 1' in res.stdout and '"critical": true' in res.stdout


@pytest.mark.parametrize("name,content,message,code", [
    ("bad.parquet", b"not parquet at all", "is not a readable parquet ledger", 1),
    ("bad.csv", b"a,b\n1,2\n", "missing column(s)", 1),
    ("bad.parquet", None, "no such file", 1),
    ("bad.jsonl", b'{"ts": "x"\n', "is not a readable jsonl ledger", 1),
    ("missing.csv", None, "no such file", 1),
    ("ledger.txt", b"", "cannot tell the format", 2),  # what was asked for: a usage error
])
def test_bad_files_are_one_clear_line(tmp_path, name, content, message, code):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(KeytraceError, match=None) as e:
        load_events(path)
    assert message in str(e.value)
    res = keytrace("report", str(path))
    assert res.returncode == code
    assert res.stderr.startswith("keytrace: error: ") and message in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("ext", [".parquet", ".csv", ".jsonl"])
def test_an_unknown_schema_is_one_line(tmp_path, ext):
    path = tmp_path / f"future{ext}"
    save_events(SAMPLE, path)
    back = pd.read_parquet(path) if ext == ".parquet" else None
    if ext == ".parquet":
        back.loc[0, "path"] = '{"schema": 99, "lost": 0}'
        back.to_parquet(path)
    else:
        path.write_text(re.sub(r"(schema\W+)3", r"\g<1>99", path.read_text(), count=1))
    res = keytrace("report", str(path))
    assert res.returncode == 1 and "schema 99" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_bad_values_are_reported(tmp_path):
    path = tmp_path / "l.csv"
    save_events(SAMPLE, path)
    path.write_text(path.read_text().replace("dlclose", "dlexplode"))
    res = keytrace("report", str(path))
    assert res.returncode == 1 and "unknown op 'dlexplode'" in res.stderr


@pytest.mark.parametrize("field, value, says", [
    ("end", "soon", "'end' is 'soon', not a time in ns"),
    ("lost", "many", "'lost' is 'many', not a count of records"),
    ("lost", -1, "'lost' is -1, not a count of records"),
    ("resources", [], "'resources' is [], not a mapping"),
])
def test_a_saved_ledger_whose_meta_row_is_wrong_is_one_line_naming_the_field(
        tmp_path, field, value, says):
    import json
    path = tmp_path / "l.jsonl"
    save_events(SAMPLE, path)
    lines = path.read_text().splitlines()
    head = json.loads(lines[0])
    meta = json.loads(head["path"])
    meta[field] = value
    head["path"] = json.dumps(meta)
    path.write_text("\n".join([json.dumps(head)] + lines[1:]) + "\n")
    with pytest.raises(KeytraceError, match=re.escape(says)):
        load_events(path)
    res = keytrace("report", str(path))
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert says in res.stderr and "Traceback" not in res.stderr


@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KiB tmpfs (mounting one takes root)."""
    import os
    import subprocess
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tmp_path / "tiny"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tiny", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


@pytest.mark.parametrize("ext", [".parquet", ".csv", ".jsonl"])
def test_a_full_disk_leaves_no_partial_file_under_the_final_name(tiny_fs, ext):
    import numpy as np
    big = pd.concat([SAMPLE] * 3000, ignore_index=True)
    big["path"] = [f"/lib/{n:x}.so" for n in np.random.default_rng(1).integers(0, 2**62, len(big))]
    # (random names: well over 64 KiB in any format, compressed or not)
    path = tiny_fs / f"ledger{ext}"
    with pytest.raises(KeytraceError, match=r"cannot write .*No space left on device"):
        save_events(big, path)
    assert list(tiny_fs.iterdir()) == []  # neither the file nor its temporary
    save_events(SAMPLE, path)  # a small one fits, and is whole
    assert len(load_events(path)[0]) == len(SAMPLE)
    assert [p.name for p in tiny_fs.iterdir()] == [path.name]
