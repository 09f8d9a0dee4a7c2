"""Ledger and table files: Parquet, CSV or JSON lines, chosen by the file's extension.

A saved ledger is its events (tracer.wire.COLUMNS) behind one "meta" row whose path holds JSON:
the schema version and what is not an event (records the kernel lost). Loading checks the shape
and the version and restores the dtypes of tracer.wire.decode, so a saved ledger replays exactly
like the live one. Ledgers of schemas 1 and 2 (one resource, with its own column names) are read
as the first registered resource's.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .. import resource
from ..errors import KeytraceError, UsageError
from ..wire import COLUMNS, decode, op_type, records

# pandas (and pyarrow, which pandas imports, and which Parquet needs) is imported by the
# functions that handle frames: check_writable and format_of run before the probes compile, and
# pandas must not be resident then.
if TYPE_CHECKING:
    import pandas as pd

SCHEMA = 3        # 3: resources (acquire, release, handle, owner); 2: a meta row, host facts
READABLE = (1, 2, 3)
_OF_RESOURCE = {"acquire", "acquire_failed", "release", "held", "table", "counted"}
META = "meta"
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv",
           ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


def format_of(path, default: Optional[str] = None) -> str:
    """The format a path's extension asks for, else default (`calls -o` writes text, as ltrace
    does); a UsageError names the ones known when there is no default."""
    fmt = FORMATS.get(Path(path).suffix.lower(), default)
    if fmt is None:
        known = ", ".join(sorted(FORMATS))
        raise UsageError(f"cannot tell the format of {str(path)!r} from its extension "
                            f"(use one of {known})")
    return fmt


def check_writable(path, default: Optional[str] = None) -> str:
    """Before any work: the format is known (format_of) and the file can be created. Returns
    the format."""
    fmt = format_of(path, default)
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise KeytraceError(f"cannot write {path}: no such directory {parent}")
    if p.is_dir():
        raise KeytraceError(f"cannot write {path}: it is a directory")
    if not os.access(p if p.exists() else parent, os.W_OK):
        raise KeytraceError(f"cannot write {path}: permission denied")
    return fmt


def _plain(v):
    import pandas as pd
    if isinstance(v, pd.Timestamp):
        return v.isoformat()
    if v is None or v is pd.NaT or v is pd.NA or (isinstance(v, float) and v != v):
        return None
    return v.item() if hasattr(v, "item") else v


def json_lines(df: pd.DataFrame) -> str:
    """One JSON object per row: the one JSON writer (stdout and .jsonl files alike)."""
    return "".join(json.dumps({k: _plain(v) for k, v in rec.items()}, ensure_ascii=False) + "\n"
                   for rec in df.to_dict(orient="records"))


def _why(e: OSError) -> str:
    """An OSError's reason, the same from Python's writes and pyarrow's ("... [errno 28] ...")."""
    m = re.search(r"\[errno (\d+)\]", str(e))
    if m:
        return os.strerror(int(m.group(1)))
    return e.strerror or str(e)


def _write(out: pd.DataFrame, path, fmt: str) -> None:
    """Write beside the final name, then rename: a full disk or a crash never leaves a partial
    file under the name asked for."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        if fmt == "parquet":
            out.to_parquet(tmp, index=False)
        elif fmt == "csv":
            out.to_csv(tmp, index=False)
        else:
            tmp.write_text(json_lines(out))
        os.replace(tmp, final)
    except OSError as e:  # (pyarrow's IO errors are OSErrors too, its errno in the text)
        tmp.unlink(missing_ok=True)
        raise KeytraceError(f"cannot write {path}: {_why(e)}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_events(events: pd.DataFrame, path, lost: int = 0, end: int = 0,
                resources: Optional[dict] = None) -> None:
    """Write events behind the meta row: the schema, the records the kernel lost, end, the
    time up to which the ledger had seen everything (quiet time after the last event counts),
    and resources, plain facts of each resource's declaration by name (its functions, limit)."""
    import pandas as pd
    fmt = format_of(path)
    first = int(events["ts"].array.asi8.min()) if len(events) else 0
    # The meta row is built like any event, so every column keeps its dtype (a float detour
    # would round 64-bit addresses and nanosecond times).
    head = decode(records([{"op": "seen", "ts": first}]), 0).astype({"op": str, "comm": str})
    head.loc[0, "op"] = META
    head.loc[0, "path"] = json.dumps({"schema": SCHEMA, "lost": int(lost), "end": int(end),
                                       "resources": resources or {}})
    out = pd.concat([head, events[COLUMNS].astype({"op": str, "comm": str})], ignore_index=True)
    _write(out, path, fmt)


def load_events(path) -> tuple[pd.DataFrame, dict]:
    """(events, meta) of a saved ledger."""
    import pandas as pd
    fmt = format_of(path)
    p = Path(path)
    if not p.exists():
        raise KeytraceError(f"no such file: {path}")
    try:
        if fmt == "parquet":
            raw = pd.read_parquet(p)
        elif fmt == "csv":
            raw = pd.read_csv(p, dtype={"path": object, "comm": object, "resource": object},
                              keep_default_na=False, na_values={"key": [""], "handle": [""]})
        else:
            raw = pd.read_json(p, lines=True, dtype=False)
    except PermissionError:
        raise KeytraceError(f"cannot read {path}: permission denied") from None
    except Exception as e:  # pyarrow, the CSV and the JSON parser each raise their own kinds
        raise KeytraceError(f"{path} is not a readable {fmt} ledger: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    meta = {"schema": 1, "lost": 0}
    if len(raw) and "op" in raw.columns and str(raw["op"].iloc[0]) == META:
        try:
            meta.update(json.loads(raw["path"].iloc[0]))
        except (TypeError, ValueError):
            raise KeytraceError(f"{path} has an unreadable meta row") from None
        raw = raw.iloc[1:].reset_index(drop=True)
    _check_meta(meta, path)
    if meta["schema"] not in READABLE:
        raise KeytraceError(f"{path} is a keytrace ledger of schema {meta['schema']}; this "
                            f"keytrace reads schemas {', '.join(map(str, READABLE))}: upgrade it")
    if meta["schema"] < 3:
        raw = _upgrade(raw)
    return coerce(raw, source=str(path)), meta


# The meta row's fields, and what each must be: a bad one is named, never trusted.
_META_FIELDS = {"schema": (int, "a schema number"), "lost": (int, "a count of records, >= 0"),
                "end": (int, "a time in ns, >= 0"), "resources": (dict, "a mapping of resources")}


def _check_meta(meta: dict, path) -> None:
    for name, (kind, what) in _META_FIELDS.items():
        if name not in meta:
            continue
        v = meta[name]
        if not isinstance(v, kind) or isinstance(v, bool) or (kind is int and v < 0):
            raise KeytraceError(f"{path}: its meta row's {name!r} is {v!r}, not {what}")


def _upgrade(raw: pd.DataFrame) -> pd.DataFrame:
    """A schema 1 or 2 ledger in schema 3's words: its one resource is the first registered,
    whose declaration says the words it used then (extra["legacy"]: columns, ops)."""
    legacy = resource.default().extra.get("legacy", {})
    raw = raw.rename(columns=legacy.get("columns", {}))
    if "op" in raw.columns:
        raw["op"] = raw["op"].astype(str).replace(legacy.get("ops", {}))
        raw["resource"] = raw["op"].where(raw["op"].isin(_OF_RESOURCE), None).map(
            lambda op: resource.default().name if op else None)
    return raw


def _optional_text(col: pd.Series) -> pd.Series:
    """Text or None (CSV has no None: empty strings and NaN stand for it)."""
    col = col.astype(object)
    return col.where(col.notna() & (col != ""), None)


def coerce(raw: pd.DataFrame, source: str = "input") -> pd.DataFrame:
    """Check the columns and restore the dtypes of an events frame read from anywhere."""
    import pandas as pd
    missing = [c for c in COLUMNS if c not in raw.columns and c not in ("stack", "seq")]  # optional
    if missing:
        raise KeytraceError(f"{source} is not a keytrace ledger: missing column(s) "
                            f"{', '.join(missing)}")
    try:
        ops = raw["op"].astype(str)
        unknown = sorted(set(ops) - set(op_type().categories))
        if unknown:
            raise ValueError(f"unknown op {unknown[0]!r}")
        ts = raw["ts"]
        ts = (pd.to_datetime(ts, utc=True, format="ISO8601") if not pd.api.types.is_datetime64_any_dtype(ts)
              else ts.dt.tz_localize("UTC") if ts.dt.tz is None else ts)
        frame = pd.DataFrame({
            "ts": ts.astype("datetime64[ns, UTC]"),  # pandas 3 infers coarser units
            "pid": raw["pid"].astype("int64"),
            "tid": raw["tid"].astype("int64"),
            "comm": pd.Categorical(raw["comm"].fillna("").astype(str)),
            "op": pd.Categorical(ops, dtype=op_type()),
            "resource": _optional_text(raw["resource"]),
            "handle": pd.to_numeric(raw["handle"], errors="raise").astype("UInt64"),
            "ret": raw["ret"].astype("int64"),
            "owner": raw["owner"].astype("uint64"),
            "caller": raw["caller"].astype("uint64"),
            "path": _optional_text(raw["path"]),
            "aux": raw["aux"].astype("uint64"),
            "load": raw["load"].astype("uint64"),
            "child": raw["child"].astype("int64"),
            "stack": _optional_text(raw["stack"] if "stack" in raw.columns
                                    else pd.Series(None, index=raw.index)),
            "seq": (raw["seq"] if "seq" in raw.columns else pd.Series(0, index=raw.index)).astype("int64"),
        })
    except (ValueError, TypeError, OverflowError) as e:
        raise KeytraceError(f"{source} is not a valid keytrace ledger: {e}") from None
    return frame  # in saved (arrival) order: the ring buffer's order is the order of operations


def save_table(df: pd.DataFrame, path) -> None:
    """Save an analysis frame (a scan, a summary, calls) by extension; dict and list columns
    become JSON text in CSV and Parquet."""
    fmt = format_of(path)
    out = df.copy()
    if fmt != "jsonl":
        for col in out.columns:
            if out[col].map(lambda v: isinstance(v, (dict, list))).any():
                out[col] = out[col].map(json.dumps)
    _write(out, path, fmt)
