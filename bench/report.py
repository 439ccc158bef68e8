"""Shared by the benchmarks: the machine's description and writing one section of bench/RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys
from pathlib import Path

__all__ = ["RESULTS", "ROOT", "added_table", "command", "interpreter", "machine", "read_section", "stamp",
           "write_section"]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    cpu = model[1].strip() if model else platform.processor() or "unknown CPU"
    return f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, {interpreter()}"


def interpreter() -> str:
    """The Python that ran the benchmark, by version and executable: Debian's python3.11 and a default pyenv
    build of 3.11 differ by 15-33% on plain Python here (bench/RESULTS.md)."""
    return f"CPython {platform.python_version()} ({Path(sys.executable).resolve()})"


def command() -> str:
    exe = Path(sys.executable)
    python = str(exe.relative_to(ROOT)) if exe.is_relative_to(ROOT) else sys.executable
    script = Path(sys.argv[0])
    if script.name == "__main__.py" and script.resolve().is_relative_to(ROOT):  # run with -m: name the package
        package = ".".join(script.resolve().parent.relative_to(ROOT).parts)
        return shlex.join([python, "-m", package, *sys.argv[1:]])
    return shlex.join([python, *sys.argv])


def added_table(what: str, unit: str, figures: dict[str, float], fmt: str = ",.0f") -> list[str]:
    """A Markdown table of each variant's figure (`unit`) and what it adds to the first variant's."""
    base = next(iter(figures.values()))
    return [f"| {what} | {unit} | added |", "|---|---:|---:|",
            *(f"| {label} | {value:{fmt}} | {value - base:+{fmt}} |" for label, value in figures.items())]


def stamp() -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"Measured {now} on {machine()} with `{command()}`."


def _split(text: str, title: str) -> tuple[str, str, str]:
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == title), None)
    if start is None:
        return text, "", ""
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "".join(lines[:start]), "".join(lines[start:end]), "".join(lines[end:])


def read_section(title: str) -> str:
    return _split(RESULTS.read_text(), title)[1] if RESULTS.exists() else ""


def write_section(title: str, body: list[str]) -> None:
    """Replace the `## title` section of RESULTS.md (or append it), leaving the other sections as they are."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    before, old, after = _split(text, title)
    section = "\n".join([title, "", *body]) + "\n" + ("\n" if after else "")
    if not old:
        before = before.rstrip("\n") + "\n\n"
    RESULTS.write_text(before + section + after)
