"""What the agent keeps across restarts, in SQLite under --state-dir: what a process's live table
cannot tell after a restart, its measured leak (keys per completed reload cycle, cycles per
day) and the library that made its keys, keyed by (pid, start) so a recycled pid is never
mistaken for the process that had it. Written every refresh and at SIGTERM."""
from __future__ import annotations

import errno
import json
import os
import sqlite3
from pathlib import Path
from typing import Callable


SCHEMA = """CREATE TABLE IF NOT EXISTS process (
    pid INTEGER NOT NULL, start INTEGER NOT NULL, exe TEXT NOT NULL,
    leak_per_reload REAL NOT NULL, reloads_per_day REAL NOT NULL, library TEXT NOT NULL,
    libraries TEXT NOT NULL, saved INTEGER NOT NULL, PRIMARY KEY (pid, start))"""


class State:
    """The saved facts. A state directory that cannot be written (read-only, not a directory,
    a full disk) costs the agent its memory across restarts, never its service: one warning
    line, and the facts are kept in memory."""

    def __init__(self, directory: Path, log: Callable[[str], None] = lambda s: None):
        self.path = Path(directory) / "agent.sqlite"
        self.log, self.lasting = log, True
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
            if not os.access(directory, os.W_OK):
                raise PermissionError(errno.EACCES, "not writable")
        except OSError as e:
            self.db = self._in_memory(f"the state directory {directory} cannot be written "
                                      f"({e.strerror or e})")
            return
        try:
            self.db = self._open()
        except sqlite3.DatabaseError as e:
            # A corrupt file must not crash-loop a unit: keep it aside, start afresh.
            aside = self.path.with_suffix(".corrupt")
            try:
                os.replace(self.path, aside)
            except OSError as moved:
                self.db = self._in_memory(f"{self.path} is unreadable ({e}) and cannot be "
                                          f"moved aside ({moved.strerror or moved})")
                return
            log(f"warning: {self.path} was unreadable ({e}); kept as {aside.name}, starting afresh")
            self.db = self._open()

    def _in_memory(self, why: str) -> sqlite3.Connection:
        self.log(f"warning: {why}: measured leaks are kept in memory only, and a restart "
                 "forgets them")
        self.lasting = False
        db = sqlite3.connect(":memory:", check_same_thread=False)
        db.execute(SCHEMA)
        return db

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False)
        db.execute(SCHEMA)
        db.execute("SELECT count(*) FROM process").fetchone()
        return db

    def load(self) -> dict:
        """(pid, start) -> the saved facts."""
        rows = self.db.execute("SELECT pid, start, exe, leak_per_reload, reloads_per_day, library, "
                               "libraries FROM process").fetchall()
        return {(pid, start): {"exe": exe, "leak_per_reload": leak, "reloads_per_day": rate,
                               "library": lib, "libraries": json.loads(libs)}
                for pid, start, exe, leak, rate, lib, libs in rows}

    def save(self, rows: list, now: int) -> None:
        """Replace the saved set with these processes' facts (those alive now). A write that
        fails (the disk filled up, the directory went read-only) is told once; serving goes
        on."""
        try:
            with self.db:
                self.db.execute("DELETE FROM process")
                self.db.executemany(
                    "INSERT OR REPLACE INTO process VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(r["pid"], r["start"], r["exe"], r["leak_per_reload"], r["reloads_per_day"],
                      r["library"], json.dumps(r["libraries"]), now) for r in rows])
        except sqlite3.Error as e:
            if self.lasting:
                self.log(f"warning: cannot write {self.path} ({e}): what is measured now will "
                         "not survive a restart")
                self.lasting = False

    def close(self) -> None:
        self.db.close()
