"""Jupyter presentation: the two pictures of a leak, and the highlighted summary
(tracer.analysis.html, which a Ledger also shows by itself).

matplotlib is imported here only, so the command line does not pay for it.
"""
from __future__ import annotations

import os
from typing import Optional

from .analysis import forecast as fc
from .analysis.html import ledger_html, summary_html
from .host.libc import GLIBC_KEYS_MAX

__all__ = ["plot_keys", "plot_reloads", "summary_html", "ledger_html"]


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
    limit = int(summary["limit"].max()) if len(summary) else GLIBC_KEYS_MAX
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
