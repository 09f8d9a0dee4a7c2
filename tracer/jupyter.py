"""Jupyter presentation: the summary as highlighted HTML, and the two pictures of a leak.

matplotlib is imported here only, so the command line does not pay for it.
"""
from __future__ import annotations

import html
import os
from typing import Optional

import pandas as pd

from . import forecast as fc

SHOWN = ["pid", "comm", "creates", "deletes", "failed_creates", "live_keys", "limit",
         "orphaned_keys", "library", "days_left", "leaking", "critical", "reason"]


def _row_style(row: pd.Series) -> list:
    color = "#f8d7da" if row["critical"] else "#fff3cd" if row["leaking"] else ""
    return [f"background-color: {color}" if color else ""] * len(row)


def summary_html(summary: pd.DataFrame) -> str:
    """The summary as an HTML table: critical rows red, leaking rows amber."""
    shown = summary[SHOWN].copy()
    shown["library"] = shown["library"].map(lambda p: os.path.basename(p) if p else "")
    return (shown.style.apply(_row_style, axis=1).hide(axis="index")
            .format({"days_left": lambda d: fc.describe(d) if d == d and d is not None else ""})
            .to_html())


def ledger_html(ledger, heading: str = "keytrace ledger") -> str:
    s = ledger.summary()
    lost = f", <b>{ledger.lost} lost</b>" if ledger.lost else ""
    return (f"<p><b>{html.escape(heading)}</b>: {ledger.event_count} events{lost}, "
            f"{len(s)} processes, {int(s['leaking'].sum())} flagged</p>" + summary_html(s))


def plot_keys(ledger, reloads_per_day: Optional[float] = None, top: int = 5):
    """Two panels: keys in use over the traced time per process, with the limit drawn; and the
    forecast, from now to the day each leaking process reaches its limit."""
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    summary = ledger.summary(reloads_per_day=reloads_per_day)
    series = ledger.keys_over_time()
    fig, (now_ax, ahead_ax) = plt.subplots(1, 2, figsize=(13, 4.2))
    pids = summary.sort_values("live_keys", ascending=False)["pid"].head(top).tolist()
    for pid in pids:
        s = series[series["pid"] == pid]
        if not s.empty:
            now_ax.step(s["ts"], s["live_keys"], where="post", label=f"{s['comm'].iloc[0]} ({pid})")
    limit = int(summary["limit"].max()) if len(summary) else fc.GLIBC_KEYS_MAX
    now_ax.axhline(limit, color="crimson", linestyle="--", label=f"limit ({limit})")
    now_ax.set(title="keys in use, traced", ylabel="pthread keys", ylim=(0, limit * 1.08))
    now_ax.legend(loc="lower right", fontsize="small")
    locator = mdates.AutoDateLocator()
    now_ax.xaxis.set_major_locator(locator)
    now_ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))

    ahead = summary[summary["days_left"].notna() & (summary["days_left"] > 0)]
    for r in ahead.head(top).itertuples():
        ahead_ax.plot([0, r.days_left], [r.live_keys, r.limit], marker="o",
                      label=f"{r.comm} ({r.pid}): {fc.describe(r.days_left)}")
        if r.exhaustion_eta is not None and r.exhaustion_eta == r.exhaustion_eta:
            ahead_ax.annotate(f"{r.exhaustion_eta:%Y-%m-%d}", (r.days_left, r.limit),
                              textcoords="offset points", xytext=(-60, -15), fontsize="small")
    ahead_ax.axhline(limit, color="crimson", linestyle="--")
    rate = f"{reloads_per_day:g} reload(s)/day" if reloads_per_day else "measured reload rate"
    ahead_ax.set(title=f"forecast at {rate}", xlabel="days from now", ylabel="pthread keys",
                 ylim=(0, limit * 1.08))
    if len(ahead):
        ahead_ax.legend(loc="lower right", fontsize="small")
    else:
        out = summary[summary["days_left"] == 0]
        ahead_ax.text(0.5, 0.5, "out of keys already: " + ", ".join(
            f"{c} ({p})" for c, p in zip(out["comm"], out["pid"])) if len(out) else "no leak measured",
            ha="center", transform=ahead_ax.transAxes)
    fig.tight_layout()
    return fig


def plot_reloads(ledger):
    """Keys each load/unload cycle leaves behind, per reloaded library (and who made them)."""
    import matplotlib.pyplot as plt

    r = ledger.reloads()
    fig, ax = plt.subplots(figsize=(8, 1.6 + 0.5 * max(len(r), 1)))
    labels = [f"{os.path.basename(a)} (pid {p})" + (f" -> {os.path.basename(m)}" if m else "")
              for a, p, m in zip(r["loaded"], r["pid"], r["made_by"])]
    ax.barh(labels, r["keys_per_cycle"], color=["crimson" if v > 0 else "seagreen"
                                                 for v in r["keys_per_cycle"]])
    ax.set(xlabel="keys left behind per load/unload cycle", title="what each reload leaks")
    ax.invert_yaxis()
    fig.tight_layout()
    return fig
