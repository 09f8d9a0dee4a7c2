"""A bench's table, printed and kept in bench/results/NAME.md with what made it, so that a
figure quoted in the docs names the file that holds it (tests/test_docs.py checks)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def table(header: list, rows: list) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


def save(name: str, title: str, body: str) -> None:
    """Print body and write it to bench/results/NAME.md under a title, the date and the
    command line that made it."""
    command = " ".join(["bench/" + Path(sys.argv[0]).name, *sys.argv[1:]])
    text = f"# {title}\n\nMeasured {time.strftime('%Y-%m-%d')} by `{command}`.\n\n{body}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)
