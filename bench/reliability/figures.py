"""One row of the reliability suite's table: what was measured, its value, and the bar it is held to."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Figure", "table"]


@dataclass(frozen=True)
class Figure:
    section: str  # "load", "faults", "bad input", "soak", "rolling restart"
    name: str  # what was measured, e.g. "non-streaming requests failed"
    value: str  # as printed, e.g. "0 of 41,230"
    target: str = ""  # the bar, e.g. "0"; empty for a figure that is only reported
    ok: bool | None = None  # None: reported only

    @property
    def verdict(self) -> str:
        return "" if self.ok is None else ("met" if self.ok else "MISSED")


def table(figures: list[Figure]) -> str:
    """The figures as a Markdown table, in the order given."""
    rows = ["| section | figure | value | target | verdict |", "|---|---|---:|---|---|"]
    rows += [f"| {f.section} | {f.name} | {f.value} | {f.target} | {f.verdict} |" for f in figures]
    return "\n".join(rows)
