"""Writes one benchmark's table into docs/benchmarks.md (or another doc), replacing its previous section, and
draws its tables (plots.py)."""

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
    return f"{model}{vector_units()}, {os.cpu_count()} cores{memory}"


def vector_units() -> str:
    """The CPU's widest matrix/vector units, because machines sold under one model name differ here (the
    project's AMD EPYC machines have been AVX-512 with BF16 and AVX2 only)."""
    from pagoda.engine.auto_dtype import cpu_flags

    flags = cpu_flags() or frozenset()
    names = [name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512_BF16"), ("avx512f", "AVX-512"),
                                     ("avx2", "AVX2")) if flag in flags]
    return f" ({names[0]})" if names else ""


def write_section(title: str, body: str, command: str, doc: Path = DOC, header: str = HEADER,
                  plot: bool = True) -> None:
    """Replaces (or appends) section `title` of `doc`; a new doc starts with `header`. With `plot`, each
    table is also drawn as a PNG under the doc's plots/ folder and linked (plots.py)."""
    from plots import plot_section

    date = datetime.date.today().isoformat()
    if plot:
        body = plot_section(title, body, doc.parent)
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
