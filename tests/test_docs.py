"""Docs that cannot drift (issue #22): every figure the README and docs/ measure comes from a
results file of bench/results and names it.

A measured figure is a number with ns, us, ms, s, MB, x or % (either end of a range:
"4-13 %"), or a bare number in a table column whose header gives the unit ("ms/process"). It
must sit in a paragraph, list item or table that names a results file (RESULTS.md, AGENT.md,
...), and that file must hold it to the precision written (ns and us, us and ms, are the same
figure). A list item or table that names no file takes the files named by the text just above
it: the README's Cost section names RESULTS.md once for its bullets, OVERHEAD.md's captions
name the file of the table below.

Rules, bounds and settings are not measures and are not checked: a figure right after target,
within, every, above, below, less than, more than, at most, at least, default, after, <=, >=,
< or > ("within 100 ms", "every 50 ms", "target 0.25x", "<= 2 %"); a cell of a table column
headed "target"; fenced code (commands, configuration). Nothing else is exempt."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = {p.name: p.read_text() for p in (ROOT / "bench" / "results").glob("*.md")}
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a range's upper end counts ("4-13 %"), a token like x86-64 or a sign ("-0.9") does not
FIGURE = re.compile(r"(?<![\w.@/])(?<!\D-)(\d+(?:\.\d+)?)\s?(us|ns|ms|s|MB|x|%)(?!\w)")
NUMBER = re.compile(r"(?<![\w.@/])(?<!\D-)\d+(?:\.\d+)?(?![\w.])")
UNIT_HEADER = re.compile(r"(?<![\w'/])(?:us|ns|ms|s|MB|x|%)(?!\w)")
RULE = re.compile(r"(?:\b(?:targets?|within|every|above|below|less than|more than|at most|at least"
                  r"|default|after)|<=?|>=?)[\s(:~+]*$", re.I)
FENCE = re.compile(r"^[ \t]*```.*?^[ \t]*```[^\n]*$", re.S | re.M)


def _numbers(text: str) -> list:
    return [float(x.replace(",", "")) for x in re.findall(r"(?<![\w.@])(\d[\d,]*\.?\d*)", text)]


def _named(text: str) -> list:
    return [name for name in RESULTS if name in text]


def _units(text: str):
    """(unit, results files it cites): a paragraph, a list item or a table. A list item or a
    table naming no file cites those of the paragraph just above it (its lead-in or caption)."""
    above = ""
    for block in re.split(r"\n\s*\n", FENCE.sub("", text)):
        lines = block.split("\n")
        row = next((i for i, line in enumerate(lines) if line.lstrip().startswith("|")), None)
        if row is not None:
            head, table = "\n".join(lines[:row]), "\n".join(lines[row:])
            if head.strip():
                yield head, _named(head)
            yield table, _named(table) or _named(head if head.strip() else above)
            above = ""
            continue
        head, *items = re.split(r"(?:^|\n)- ", block)
        if head.strip():
            yield head, _named(head)
        lead = head if head.strip() else above
        for item in items:
            yield item, _named(item) or _named(lead)
        above = "" if items else block


def _cells(offset: int, line: str) -> list:
    """(start, end, text) of a table row's cells, an escaped \\| kept inside its cell."""
    return [(offset + m.start(1), offset + m.end(1), m.group(1))
            for m in re.finditer(r"\|((?:[^|\\]|\\.)*)(?=\|)", line)]


def _figures(unit: str):
    """(figure, as written) of each measured figure in a unit, rules and targets left out."""
    found = {m.start(): (m.group(1), m.group(0)) for m in FIGURE.finditer(unit)}
    exempt = []
    rows = [(m.start(), m.group(0)) for m in re.finditer(r"^\s*\|.*$", unit, re.M)]
    if rows:
        header = [cell for _, _, cell in _cells(*rows[0])]
        for offset, line in rows[2:]:
            for col, (start, end, cell) in enumerate(_cells(offset, line)):
                title = header[col] if col < len(header) else ""
                if "target" in title.lower():
                    exempt.append((start, end))
                elif UNIT_HEADER.search(title):
                    for m in NUMBER.finditer(cell):
                        written = f"{m.group(0)} ({title.strip()})"
                        found.setdefault(start + m.start(), (m.group(0), written))
    for start, (figure, written) in sorted(found.items()):
        if any(a <= start < b for a, b in exempt) or RULE.search(unit[max(0, start - 24):start]):
            continue
        yield start, figure, written


def _held(figure: str, pool: list) -> bool:
    value = float(figure)
    places = len(figure.split(".")[1]) if "." in figure else 0
    return any(round(n * scale, places) == value for n in pool for scale in (1, 1e-3, 1e3))


def _faults(text: str) -> list:
    wrong = []
    for unit, cited in _units(text):
        pool = [n for name in cited for n in _numbers(RESULTS[name])]
        for start, figure, written in _figures(unit):
            where = " ".join(unit[max(0, start - 50):start + len(written) + 10].split())
            if not cited:
                wrong.append(f"{written!r} names no results file: {where}")
            elif not _held(figure, pool):
                wrong.append(f"{written!r} not in {', '.join(cited)}: {where}")
    return wrong


def test_every_measured_figure_names_its_results_file_and_is_in_it():
    wrong = [f"{doc.name}: {fault}" for doc in DOCS for fault in _faults(doc.read_text())]
    assert not wrong, "\n".join(wrong)


def test_the_check_finds_a_drifted_and_an_uncited_figure():
    assert _faults("scan: 0.35 ms a process (bench/results/RESULTS.md)")[0].startswith(
        "'0.35 ms' not in RESULTS.md")
    assert _faults("scan: 0.25 ms a process warm")[0].startswith("'0.25 ms' names no results file")
    assert not _faults("scan: 0.25 ms a process warm, 0.34 ms cold (bench/results/RESULTS.md)")
    # a list's lead-in and a table's caption cite for it; a "target" column and rules are exempt
    faults = _faults("Cost (RESULTS.md):\n- untraced: 17 ns\n- bpftrace: 33.3 us\n")
    assert len(faults) == 1 and faults[0].startswith("'33.3 us' not in RESULTS.md")
    table = ("Scan (bench/results/RESULTS.md):\n\n| table | ms/process | target |\n|---|---|---|\n"
             "| keys | 0.20 | 0.1 ms |\n| timers | 0.13 | |\n")
    faults = _faults(table)  # 0.13 drifted (0.057 in RESULTS.md); 0.1 ms is a target
    assert len(faults) == 1 and faults[0].startswith("'0.13 (ms/process)' not in RESULTS.md")
    assert _faults(table.replace("Scan (bench/results/RESULTS.md)", "Scan"))[0].startswith(
        "'0.20 (ms/process)' names no results file")
    assert not _faults("A read at most every 50 ms; critical within 10 % of the limit; above 80 %; "
                       "target 0.25x; (default 60 s); SIGKILL after 5 s; < 100 ms; <= 2 %.")
    assert not _faults("```yaml\nscrape_interval: 30s\n```\n")
    # the exemption is narrow: the rule's word must come right before the figure
    assert len(_faults("within budget, the scan takes 0.25 ms; target met at 0.34 ms")) == 2
    assert not _held("0.35", _numbers("| 368 | 305 | 0.34 | 0.25 (0.24-0.26) |"))
    assert _held("0.25", _numbers("| 368 | 305 | 0.34 | 0.25 (0.24-0.26) |"))
    assert _held("1.7", _numbers("| 1696.90 |"))  # ns written as us
