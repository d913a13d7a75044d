"""``--profile``: where the time of ``spend()`` and of a decorated request goes.

Two views of the same calls: a cProfile breakdown of self time by layer (a table for the report), and
pyinstrument's call tree (printed). Both profilers slow Python code down more than time spent waiting
for the database, so read the shares as indicative; "spend's SQL by hand" (the same statements with the
raw driver) is profiled alongside as the baseline, and measured without a profiler in the load tables.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
from collections.abc import Callable

from flask import Flask

from flask_credits import FlaskCredits

from .env import Target
from .loads import spend_sql_worker
from .report import Table, pct

LAYERS = (
    ("psycopg", "psycopg driver (incl. waiting for the server)"),
    ("sqlite3", "sqlite3 driver (incl. SQLite itself and fsync)"),
    ("/sqlalchemy/sql/", "SQLAlchemy: building statements, cache keys, compiling"),
    ("/sqlalchemy/engine/", "SQLAlchemy: executing, results"),
    ("/sqlalchemy/pool/", "SQLAlchemy: connection pool"),
    ("/sqlalchemy/", "SQLAlchemy: other"),
    ("/flask_credits/", "flask_credits itself"),
    ("/flask/", "Flask / Werkzeug"),
    ("/werkzeug/", "Flask / Werkzeug"),
    ("/json/", "json"),
)


def _layer(key: tuple[str, int, str]) -> str:
    filename, _, name = key
    where = filename if filename != "~" else name
    for needle, layer in LAYERS:
        if needle in where:
            return layer
    return "other (Python built-ins, stdlib)"


def breakdown(op: Callable[[], object], calls: int) -> tuple[dict[str, float], float]:
    """Self time per layer (seconds) of ``calls`` calls under cProfile, and the total."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        op()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    layers: dict[str, float] = {}
    for key, (_, _, self_time, _, _) in stats.items():
        layer = _layer(key)
        layers[layer] = layers.get(layer, 0.0) + self_time
    return layers, sum(layers.values())


def run(app: Flask, credits: FlaskCredits, target: Target, calls: int = 400) -> Table:
    client = app.test_client()
    by_hand, close = spend_sql_worker(target, "sql-one")
    try:
        with app.app_context():
            cases: dict[str, Callable[[], object]] = {
                "credits.spend()": lambda: credits.spend("spend-one", 1, reason="bench"),
                "POST /paid": lambda: client.post("/paid", headers={"X-Wallet": "web-0"}),
                "spend's SQL by hand": by_hand,
            }
            results = {}
            for title, op in cases.items():
                for _ in range(30):
                    op()
                results[title] = breakdown(op, calls)
            _pyinstrument(cases, calls)
    finally:
        close()
    backend = target.backend
    names = list(cases)
    table = Table(
        f"Profile: self time by layer, {calls} calls each under cProfile ({backend})",
        ["layer"] + [f"{name} share" for name in names] + [f"{name} ms/call" for name in names],
    )
    layers = sorted(
        {layer for found, _ in results.values() for layer in found},
        key=lambda layer: -results[names[0]][0].get(layer, 0.0),
    )
    for layer in layers:
        row = [layer]
        row += [pct(results[n][0].get(layer, 0.0) / results[n][1]) for n in names]
        row += [f"{results[n][0].get(layer, 0.0) / calls * 1000:.2f}" for n in names]
        table.rows.append(row)
    table.rows.append(
        ["total"] + ["100%"] * len(names) + [f"{results[n][1] / calls * 1000:.2f}" for n in names]
    )
    table.notes.append(
        "Self time: the time spent in a function's own code, summed by the package it belongs to."
        " cProfile slows Python code more than waits on the database: read the shares, not the ms."
    )
    return table


def _pyinstrument(cases: dict[str, Callable[[], object]], calls: int) -> None:
    try:
        import pyinstrument  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        print("(pyinstrument is not installed: no call trees)", file=sys.stderr)
        return
    for title, op in cases.items():
        profiler = pyinstrument.Profiler()
        profiler.start()
        for _ in range(calls):
            op()
        profiler.stop()
        print(f"== pyinstrument: {title}, {calls} calls")
        print(profiler.output_text(unicode=False, color=False, time="percent_of_total"))
