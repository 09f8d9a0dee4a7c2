"""Saving and loading event ledgers: Parquet, CSV or JSON lines, chosen by the file's extension.

Loading checks the file's shape and restores the dtypes of tracer.records.decode, so a saved
ledger replays exactly like a live one.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import KeytraceError
from .records import COLUMNS, OP_TYPE

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv",
           ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


def format_of(path) -> str:
    """The format a path's extension asks for; a KeytraceError names the ones known."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        known = ", ".join(sorted(FORMATS))
        raise KeytraceError(f"cannot tell the format of {str(path)!r} from its extension "
                            f"(use one of {known})")
    return fmt


def _write(out: pd.DataFrame, path, fmt: str) -> None:
    try:
        if fmt == "parquet":
            out.to_parquet(path, index=False)
        elif fmt == "csv":
            out.to_csv(path, index=False)
        else:
            out.to_json(path, orient="records", lines=True, date_format="iso")
    except OSError as e:
        raise KeytraceError(f"cannot write {path}: {e.strerror or e}") from None


def save_events(events: pd.DataFrame, path) -> None:
    fmt = format_of(path)
    out = events[COLUMNS]
    if fmt == "jsonl":
        # pandas' own ISO writer drops the nanoseconds; numpy's keeps them.
        ts = np.datetime_as_string(out["ts"].dt.tz_convert(None).to_numpy(), unit="ns")
        out = out.assign(ts=np.char.add(ts, "Z"))
    _write(out, path, fmt)


def load_events(path) -> pd.DataFrame:
    fmt = format_of(path)
    p = Path(path)
    if not p.exists():
        raise KeytraceError(f"no such file: {path}")
    try:
        if fmt == "parquet":
            raw = pd.read_parquet(p)
        elif fmt == "csv":
            raw = pd.read_csv(p, dtype={"path": object, "comm": object},
                              keep_default_na=False, na_values={"key": [""]})
        else:
            raw = pd.read_json(p, lines=True, dtype=False)
    except PermissionError:
        raise KeytraceError(f"cannot read {path}: permission denied") from None
    except Exception as e:  # pyarrow, the CSV and the JSON parser each raise their own kinds
        raise KeytraceError(f"{path} is not a readable {fmt} ledger: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return coerce(raw, source=str(path))


def _optional_text(col: pd.Series) -> pd.Series:
    """Text or None (CSV has no None: empty strings and NaN stand for it)."""
    col = col.astype(object)
    return col.where(col.notna() & (col != ""), None)


def coerce(raw: pd.DataFrame, source: str = "input") -> pd.DataFrame:
    """Check the columns and restore the dtypes of an events frame read from anywhere."""
    missing = [c for c in COLUMNS if c not in raw.columns and c != "stack"]  # stack: optional
    if missing:
        raise KeytraceError(f"{source} is not a keytrace ledger: missing column(s) "
                            f"{', '.join(missing)}")
    try:
        ops = raw["op"].astype(str)
        unknown = sorted(set(ops) - set(OP_TYPE.categories))
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
            "op": pd.Categorical(ops, dtype=OP_TYPE),
            "key": pd.to_numeric(raw["key"], errors="raise").astype("Int64"),
            "ret": raw["ret"].astype("int64"),
            "destructor": raw["destructor"].astype("uint64"),
            "caller": raw["caller"].astype("uint64"),
            "path": _optional_text(raw["path"]),
            "handle": raw["handle"].astype("uint64"),
            "load": raw["load"].astype("uint64"),
            "child": raw["child"].astype("int64"),
            "stack": _optional_text(raw["stack"] if "stack" in raw.columns
                                    else pd.Series(None, index=raw.index)),
        })
    except (ValueError, TypeError, OverflowError) as e:
        raise KeytraceError(f"{source} is not a valid keytrace ledger: {e}") from None
    return frame  # in saved (arrival) order: the ring buffer's order is the order of operations


def save_table(df: pd.DataFrame, path) -> None:
    """Save an analysis frame (a scan, a summary) by extension; dict columns become JSON text
    in CSV and Parquet."""
    fmt = format_of(path)
    out = df.copy()
    if fmt != "jsonl":
        for col in out.columns:
            if out[col].map(lambda v: isinstance(v, dict)).any():
                out[col] = out[col].map(json.dumps)
    _write(out, path, fmt)
