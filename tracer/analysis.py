"""The rules: what makes a process leaking or critical. Written once, used by the CLI, the
Python API and the agent alike; they all read the frame that judge() returns.
"""
from __future__ import annotations

import errno

import pandas as pd

# Columns of per-process state, as tracer.ledger fills them.
STATE_COLUMNS = ["pid", "start", "comm", "exe", "creates", "deletes", "failed_creates",
                 "failed_deletes", "last_failure_ret", "live_keys", "keys_after_dlclose",
                 "alive", "parent_pid"]
# ... and what judge() adds.
VERDICT_COLUMNS = ["leaking", "critical", "reason"]


def _errname(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def judge(state: pd.DataFrame) -> pd.DataFrame:
    """Add the verdict columns to per-process state, and sort: critical, leaking, most keys.

    - critical: a pthread_key_create failed (EAGAIN: the key table is full). A failure is
      never counted as a leak of its own (no key was made), but it is the outage itself.
    - leaking: keys were created and none deleted, or keys are still live although the
      library whose load created them was dlclose'd, or the process is critical.
    """
    df = state.copy()
    made = df["creates"] - df["failed_creates"]
    never_deleted = (made > 0) & (df["deletes"] == 0)
    after_dlclose = df["keys_after_dlclose"] > 0
    df["critical"] = df["failed_creates"] > 0
    df["leaking"] = never_deleted | after_dlclose | df["critical"]

    reasons = []
    for crit, failed, ret, nd, n_made, adl in zip(
            df["critical"], df["failed_creates"], df["last_failure_ret"], never_deleted,
            made, df["keys_after_dlclose"]):
        parts = []
        if crit:
            parts.append(f"pthread_key_create failed {failed}x ({_errname(ret)}"
                         + (": key table full" if ret == errno.EAGAIN else "") + ")")
        if nd:
            parts.append(f"created {n_made} key{'s' if n_made != 1 else ''}, deleted none")
        if adl:
            parts.append(f"{adl} key{'s' if adl != 1 else ''} outlived dlclose of the library "
                         "that created them")
        reasons.append("; ".join(parts))
    df["reason"] = pd.Series(reasons, index=df.index, dtype=object)
    df = df.astype({"leaking": bool, "critical": bool, "alive": bool})
    return df.sort_values(["critical", "leaking", "live_keys", "pid"],
                          ascending=[False, False, False, True], ignore_index=True)


def flagged(summary: pd.DataFrame) -> pd.DataFrame:
    """The processes a --fail-on-leak gate fails on."""
    return summary[summary["leaking"]]


__all__ = ["judge", "flagged", "STATE_COLUMNS", "VERDICT_COLUMNS"]
