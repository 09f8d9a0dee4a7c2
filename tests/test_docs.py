"""Docs that cannot drift: a figure the README or docs/ gives next to a results file of
bench/results (named in the same paragraph or bullet; the README's Cost section names
RESULTS.md for all its bullets) must be one that file holds, to the precision written (ns and
us, us and ms, are the same figure)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = {p.name: p.read_text() for p in (ROOT / "bench" / "results").glob("*.md")}
FIGURE = re.compile(r"(?<![\w.@/-])(\d+(?:\.\d+)?)\s?(us|ns|ms|MB|x|%)(?![\w])")


def _numbers(text: str) -> list:
    return [float(x.replace(",", "")) for x in re.findall(r"(?<![\w.@])(\d[\d,]*\.?\d*)", text)]


def _paragraphs(doc: Path):
    """(paragraph, results files it names) of a document; a README Cost bullet names
    RESULTS.md unless it names another."""
    text = doc.read_text()
    cost = ""
    if doc.name == "README.md":
        m = re.search(r"^## Cost\n(.*?)^## ", text, re.S | re.M)
        cost = m.group(1) if m else ""
    for para in re.split(r"\n\s*\n|\n- ", text):
        cited = [name for name in RESULTS if name in para]
        if not cited and para.strip() and para.strip() in cost and "target" in para:
            cited = ["RESULTS.md"]
        if cited:
            yield para, cited


def _held(figure: str, pool: list) -> bool:
    value = float(figure)
    places = len(figure.split(".")[1]) if "." in figure else 0
    return any(round(n * scale, places) == value for n in pool for scale in (1, 1e-3, 1e3))


def test_every_figure_next_to_a_results_file_is_in_it():
    wrong = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for para, cited in _paragraphs(doc):
            pool = [n for name in cited for n in _numbers(RESULTS[name])]
            for m in FIGURE.finditer(para):
                before = para[max(0, m.start() - 8):m.start()]
                if "target" in before:  # a goal, not a measure
                    continue
                if not _held(m.group(1), pool):
                    wrong.append(f"{doc.name}: {m.group(0)!r} not in {', '.join(cited)}: "
                                 + " ".join(para[max(0, m.start() - 50):m.end()].split()))
    assert not wrong, "\n".join(wrong)


def test_the_check_finds_a_figure_that_drifted():
    para = "scan: 0.35 ms a process (bench/results/RESULTS.md)"
    assert not _held("0.35", _numbers("| 368 | 305 | 0.34 | 0.25 (0.24-0.26) |"))
    assert _held("0.25", _numbers("| 368 | 305 | 0.34 | 0.25 (0.24-0.26) |"))
    assert _held("1.7", _numbers("| 1696.90 |"))  # ns written as us
    assert FIGURE.search(para)
