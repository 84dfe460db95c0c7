"""Writes one benchmark's table into docs/benchmarks.md (or another doc), replacing its previous section."""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEach section is rewritten by the benchmark named in it. Compare ratios within one run only.\n"


def machine_description() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{model}, {os.cpu_count()} cores{memory}"


def write_section(title: str, body: str, command: str, doc: Path = DOC, header: str = HEADER) -> None:
    """Replaces (or appends) section `title` of `doc`; a new doc starts with `header`."""
    date = datetime.date.today().isoformat()
    section = (f"## {title}\n\nMachine: {machine_description()}. Date: {date}. Command: `{command}`\n\n"
               f"{body}\n")
    text = doc.read_text() if doc.exists() else header
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    doc.parent.mkdir(exist_ok=True)
    doc.write_text(text)
