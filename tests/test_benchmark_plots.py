"""Benchmarks draw what they measure: `write_section` turns each table of a section into a PNG bar chart
under the doc's plots/ folder and links it; redrawing replaces the links rather than adding more."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from plots import headline_column, markdown_tables, replot  # noqa: E402
from report import write_section  # noqa: E402

TABLE = """Some words first.

| engine | clients | output tok/s | TTFT p50 / p99 |
|---|---|---|---|
| pagoda | 1 | 31 | 0.22 / 0.26 s |
| pagoda | 8 | 161 | 1.42 / 1.59 s |
| vllm | 1 | 32 | 0.19 / 0.20 s |
"""


def test_a_written_section_links_a_chart_of_each_table(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    write_section("Serving (reference workload)", TABLE, "python benchmarks/serving.py", doc)
    chart = tmp_path / "plots" / "serving-reference-workload-1.png"
    assert chart.read_bytes().startswith(b"\x89PNG")
    assert "![Serving (reference workload), table 1](plots/serving-reference-workload-1.png)" in doc.read_text()


def test_the_chart_shows_the_throughput_column() -> None:
    ((header, rows),) = markdown_tables(TABLE)
    assert header[headline_column(header, rows)] == "output tok/s"
    assert headline_column(["what", "TTFT", "÷ cold"], [["cold", "18.9 s", "1.000"]]) == 1


def test_redrawing_keeps_one_link_per_chart(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    write_section("Serving (reference workload)", TABLE, "cmd", doc)
    replot(doc)
    replot(doc)
    assert doc.read_text().count("](plots/serving-reference-workload-1.png)") == 1
    assert doc.read_text().count("| pagoda | 8 | 161 |") == 1
