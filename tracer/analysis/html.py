"""The summary as highlighted HTML (pandas' Styler): what a Ledger or a KeyTracer shows in
Jupyter, critical rows red, leaking rows amber."""
from __future__ import annotations

import html
import os

import pandas as pd

from . import forecast as fc
from .verdicts import BRIEF_COLUMNS


def _row_style(row: pd.Series) -> list:
    color = "#f8d7da" if row["critical"] else "#fff3cd" if row["leaking"] else ""
    return [f"background-color: {color}" if color else ""] * len(row)


def summary_html(summary: pd.DataFrame) -> str:
    shown = summary[BRIEF_COLUMNS].copy()
    shown["library"] = shown["library"].map(lambda p: os.path.basename(p) if p else "")
    return (shown.style.apply(_row_style, axis=1).hide(axis="index")
            .format({"days_left": lambda d: fc.describe(d) if d == d and d is not None else ""})
            .to_html())


def ledger_html(ledger, heading: str = "keytrace ledger") -> str:
    s = ledger.summary()
    lost = f", <b>{ledger.lost} lost</b>" if ledger.lost else ""
    return (f"<p><b>{html.escape(heading)}</b>: {ledger.event_count} events{lost}, "
            f"{len(s)} processes, {int(s['leaking'].sum())} flagged</p>" + summary_html(s))
