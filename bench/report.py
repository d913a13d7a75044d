"""Tables for the terminal and for ``docs/benchmarks.md``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Check:
    """One of the issue's targets, as measured in this run."""

    target: str
    measured: str
    met: bool | None  # None: not measured in this run


@dataclass
class BackendReport:
    backend: str
    version: str
    tables: list[Table] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # peers that did not run, and why


def num(value: float, digits: int = 0) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


def ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def pct_range(ratios: list[float]) -> str:
    """The spread of per-round ratios, "min-max" (one round: its ratio)."""
    return f"{pct(min(ratios))}-{pct(max(ratios))}" if len(ratios) > 1 else pct(ratios[0])


def pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 100:.0f}%"


def text_table(table: Table) -> str:
    widths = [len(h) for h in table.headers]
    for row in table.rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    line = "  ".join(h.ljust(w) for h, w in zip(table.headers, widths, strict=True))
    out = [f"== {table.title}", line, "  ".join("-" * w for w in widths)]
    for row in table.rows:
        out.append(
            "  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(row, widths, strict=True))
        )
    out.extend(f"   * {note}" for note in table.notes)
    return "\n".join(out)


def _numeric(cell: str) -> bool:
    return bool(cell) and (cell[0].isdigit() or cell[0] in "+-") and " " not in cell.strip()


def markdown_table(table: Table, level: str = "###") -> str:
    out = [f"{level} {table.title}", ""]
    out.append("| " + " | ".join(table.headers) + " |")
    numeric = [
        i > 0 and all(_numeric(row[i]) or row[i] in ("", "-") for row in table.rows)
        for i in range(len(table.headers))
    ]
    out.append("| " + " | ".join("---:" if n else "---" for n in numeric) + " |")
    out.extend("| " + " | ".join(row) + " |" for row in table.rows)
    if table.notes:
        out.append("")
        out.extend(f"- {note}" for note in table.notes)
    return "\n".join(out)


def checks_table(reports: list[BackendReport]) -> Table:
    table = Table("Targets of issues 6, 13 and 18", ["database", "target", "measured", "met"])
    for report in reports:
        for check in report.checks:
            met = "n/a" if check.met is None else "yes" if check.met else "NO"
            table.rows.append([report.backend, check.target, check.measured, met])
    if any(check.met is None for report in reports for check in report.checks):
        table.notes.append(
            "n/a: the issues set the spend(), hold + settle and webhook targets on PostgreSQL only; other"
            " ratios are for reference."
        )
    return table
