"""Benchmark helper: one PNG bar chart per table of a benchmark's section, Pagoda beside its peers.

`report.write_section` calls `plot_section` for the section it writes: each
markdown table becomes a horizontal bar chart of its headline column (the
first whose header names tok/s, then TTFT or latency, then a ratio, else the
first numeric one), one bar per row, labelled by the row's first cells and
annotated with the table's own text. The PNGs go to docs/plots/ and the
section links them. Run alone, it redraws every section of
docs/benchmarks.md from the tables already there:

    python benchmarks/plots.py
"""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
PLOT_DIR_NAME = "plots"
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
# Which column a chart shows, by the first of these its header contains.
_HEADLINE_HINTS = ("output tok/s", "tok/s", "ttft", "latency", "÷", "ratio", "share")
_LINK = re.compile(r"(?m)^!\[[^\]]*\]\(plots/[^)]*\)[ \t]*$\n?")


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def markdown_tables(body: str) -> list[tuple[list[str], list[list[str]]]]:
    """Each table in `body`: its header cells and its rows' cells."""
    tables = []
    lines = body.splitlines()
    index = 0
    while index < len(lines):
        if lines[index].startswith("|") and index + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[index + 1]):
            header = _cells(lines[index])
            rows = []
            index += 2
            while index < len(lines) and lines[index].startswith("|"):
                rows.append(_cells(lines[index]))
                index += 1
            tables.append((header, rows))
        else:
            index += 1
    return tables


def _cells(line: str) -> list[str]:
    return [cell.strip().replace("**", "") for cell in line.strip().strip("|").split("|")]


def _number(cell: str) -> float | None:
    match = _NUMBER.search(cell.replace(",", ""))
    return float(match.group()) if match else None


def headline_column(header: list[str], rows: list[list[str]]) -> int | None:
    numeric = [i for i in range(1, len(header))
               if sum(_number(row[i]) is not None for row in rows if i < len(row)) >= max(1, len(rows) // 2)]
    for hint in _HEADLINE_HINTS:
        for i in numeric:
            if hint in header[i].lower():
                return i
    return numeric[0] if numeric else None


def _labels(header: list[str], rows: list[list[str]], column: int) -> list[str]:
    """The first cell, with the second too when first cells repeat (an engine at several client counts)."""
    firsts = [row[0] for row in rows]
    if len(set(firsts)) < len(firsts) and column > 1:
        return [f"{row[0]}, {header[1]} {row[1]}" for row in rows]
    return firsts


def plot_table(title: str, header: list[str], rows: list[list[str]], path: Path) -> bool:
    """Draws one table's headline column to `path`; False when the table has none."""
    column = headline_column(header, rows)
    if column is None:
        return False
    kept = [(label, _number(row[column]), row[column]) for label, row in zip(_labels(header, rows, column), rows)
            if column < len(row) and _number(row[column]) is not None]
    if not kept:
        return False
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    labels, values, texts = zip(*kept)
    figure, axes = pyplot.subplots(figsize=(8, 0.9 + 0.45 * len(kept)))
    colours = ["#c0392b" if label.lower().startswith("pagoda") else "#7f8c8d" for label in labels]
    bars = axes.barh(range(len(kept)), values, color=colours)
    axes.set_yticks(range(len(kept)), labels=[label[:48] for label in labels])
    axes.invert_yaxis()
    axes.set_xlabel(header[column])
    axes.set_title(title, fontsize=10)
    axes.bar_label(bars, labels=[text[:28] for text in texts], padding=3, fontsize=8)
    axes.margins(x=0.25)
    axes.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return True


def plot_section(title: str, body: str, docs: Path = DOCS) -> str:
    """`body` with a link to each of its tables' charts (drawn under docs/plots/) appended."""
    body = _LINK.sub("", body).rstrip()
    links = []
    for index, (header, rows) in enumerate(markdown_tables(body)):
        name = f"{slug(title)}-{index + 1}.png"
        if plot_table(title, header, rows, docs / PLOT_DIR_NAME / name):
            links.append(f"![{title}, table {index + 1}]({PLOT_DIR_NAME}/{name})")
    return body + ("\n\n" + "\n".join(links) if links else "")


def replot(doc: Path) -> None:
    """Redraws and relinks every section of `doc` from the tables it holds."""
    text = doc.read_text()
    parts = re.split(r"(?m)^(## .*)$", text)
    out = [parts[0]]
    for heading, section in zip(parts[1::2], parts[2::2]):
        out.append(heading + "\n\n" + plot_section(heading[3:], section.strip(), doc.parent) + "\n\n")
    doc.write_text("".join(out).rstrip() + "\n")


if __name__ == "__main__":
    replot(DOCS / "benchmarks.md")
