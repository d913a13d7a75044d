"""Section 5: balance and a history page for wallets of 10k, 100k and 1M entries, in a database that
grows to 100k wallets.

Rows are bulk-loaded with raw SQL, keeping every invariant ``credits.audit()`` checks: a wallet's
balance = the sum of its entries = the credits left in its lots, its last entry's ``balance_after`` is
its balance, and each spend's draws add up to it. The wallets of different sizes live in the same
database and are timed interleaved, round by round, so that the machine's noise falls on all sizes
alike; the wallet-count dimension is necessarily timed step by step as the database grows.
"""

# The raw SQL here is assembled from constant fragments and driver placeholders only, never from input.
# ruff: noqa: S608

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from flask import Flask

from flask_credits import FlaskCredits
from flask_credits.core.inputs import make_wallet

from .app import BIG
from .env import Target
from .loads import sql_now
from .settings import Settings
from .timing import Measurement

CHUNK = 50_000
ROUNDS = 10


@dataclass
class Step:
    wallets: int  # wallets in the database
    big: str  # the wallet added at this step
    entries: int  # its entries
    load_seconds: float
    small: dict[str, Measurement] = field(default_factory=dict)  # small-wallet operations


@dataclass
class ScaleResult:
    steps: list[Step]
    big: dict[str, dict[int, Measurement]]  # operation -> entries -> timing, all sizes interleaved
    audit: list[str]
    analyze: bool
    repeat: int
    lots: dict[str, Measurement]  # LOT_OPS -> timing: spend() and the wallet's emptied lots
    emptied: int  # emptied lots in the second wallet of LOT_OPS
    audit_error: str | None = None  # why credits.audit() could not run, if it could not


class Loader:
    """Raw-SQL bulk loads on one raw connection."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.sqlite = target.backend == "sqlite"
        self.conn = target.raw_connect()
        self.wallets = 0

    def _p(self, sql: str) -> str:
        return sql.replace("%s", "?") if self.sqlite else sql

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        cur = self.conn.cursor()
        cur.execute(self._p(sql), params)
        return cur.fetchone()[0]

    def _run(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        self.conn.cursor().execute(self._p(sql), params)

    def _insert_many(self, sql: str, rows: Iterator[tuple[Any, ...]]) -> None:
        """SQLite's bulk insert: ``executemany`` in chunks (it has no ``generate_series``)."""
        cur = self.conn.cursor()
        while chunk := list(itertools.islice(rows, CHUNK)):
            cur.executemany(sql, chunk)

    def spends(self, wallet_id: int, lot_id: int, count: int) -> None:
        """``count`` spends of 1 credit by the wallet, each drawn from its lot ``lot_id``."""
        now = sql_now(self.target)
        last_id = self._one("SELECT coalesce(max(id), 0) FROM credits_entries")
        balance = self._one("SELECT balance FROM credits_wallets WHERE id = %s", (wallet_id,))
        if self.sqlite:
            self._insert_many(
                "INSERT INTO credits_entries (wallet_id, amount, balance_after, kind, reason, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                ((wallet_id, -1, balance - g, "spend", "bench bulk", now) for g in range(1, count + 1)),
            )
        else:
            self._run(
                "INSERT INTO credits_entries (wallet_id, amount, balance_after, kind, reason, created_at)"
                " SELECT %s, -1, %s - g, 'spend', 'bench bulk', %s"
                " FROM generate_series(1, %s::bigint) AS g ORDER BY g",
                (wallet_id, balance, now, count),
            )
        self._run(
            "INSERT INTO credits_draws (entry_id, lot_id, amount)"
            " SELECT id, %s, -1 FROM credits_entries WHERE wallet_id = %s AND id > %s",
            (lot_id, wallet_id, last_id),
        )
        self._run("UPDATE credits_lots SET remaining = remaining - %s WHERE id = %s", (count, lot_id))
        self._run("UPDATE credits_wallets SET balance = balance - %s WHERE id = %s", (count, wallet_id))
        self.conn.commit()

    def emptied(self, wallet_id: int, count: int) -> None:
        """``count`` grants of 1 credit to the (empty) wallet, each with its lot, then one spend of
        them all drawing from every lot: ``count`` emptied lots, balance unchanged."""
        now = sql_now(self.target)
        last_entry = self._one("SELECT coalesce(max(id), 0) FROM credits_entries")
        balance = self._one("SELECT balance FROM credits_wallets WHERE id = %s", (wallet_id,))
        insert = "INSERT INTO credits_entries (wallet_id, amount, balance_after, kind, reason, created_at)"
        if self.sqlite:
            self._insert_many(
                insert + " VALUES (?, ?, ?, ?, ?, ?)",
                ((wallet_id, 1, balance + g, "grant", "bench bulk", now) for g in range(1, count + 1)),
            )
        else:
            self._run(
                insert + " SELECT %s, 1, %s + g, 'grant', 'bench bulk', %s"
                " FROM generate_series(1, %s::bigint) AS g ORDER BY g",
                (wallet_id, balance, now, count),
            )
        self._run(
            "INSERT INTO credits_lots (wallet_id, entry_id, amount, remaining, created_at)"
            " SELECT wallet_id, id, 1, 0, %s FROM credits_entries"
            " WHERE wallet_id = %s AND id > %s ORDER BY id",
            (now, wallet_id, last_entry),
        )
        self._run(
            insert + " VALUES (%s, %s, %s, 'spend', 'bench bulk', %s)", (wallet_id, -count, balance, now)
        )
        self._run(
            "INSERT INTO credits_draws (entry_id, lot_id, amount)"
            " SELECT (SELECT max(id) FROM credits_entries WHERE wallet_id = %s), id, -1"
            " FROM credits_lots WHERE wallet_id = %s AND entry_id > %s",
            (wallet_id, wallet_id, last_entry),
        )
        self.conn.commit()

    def add_wallets(self, total: int) -> None:
        """Wallets ``w<n>`` until there are ``total`` of them, 10 credits each: a grant entry and its lot."""
        first, last = self.wallets, total - 1
        if last < first:
            return
        now = sql_now(self.target)
        last_wallet = self._one("SELECT coalesce(max(id), 0) FROM credits_wallets")
        last_entry = self._one("SELECT coalesce(max(id), 0) FROM credits_entries")
        if self.sqlite:
            self._insert_many(
                "INSERT INTO credits_wallets (user_id, key_id, balance, debt, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                ((f"w{n}", "", 10, 0, now, now) for n in range(first, last + 1)),
            )
        else:
            self._run(
                "INSERT INTO credits_wallets (user_id, key_id, balance, debt, created_at, updated_at)"
                " SELECT 'w' || g, '', 10, 0, %s, %s"
                " FROM generate_series(%s::bigint, %s::bigint) AS g ORDER BY g",
                (now, now, first, last),
            )
        self._run(
            "INSERT INTO credits_entries (wallet_id, amount, balance_after, kind, reason, created_at)"
            " SELECT id, 10, 10, 'grant', 'bench bulk', %s FROM credits_wallets WHERE id > %s ORDER BY id",
            (now, last_wallet),
        )
        self._run(
            "INSERT INTO credits_lots (wallet_id, entry_id, amount, remaining, created_at)"
            " SELECT wallet_id, id, 10, 10, %s FROM credits_entries WHERE id > %s ORDER BY id",
            (now, last_entry),
        )
        self.conn.commit()
        self.wallets = total

    def analyze(self) -> None:
        """PostgreSQL: refresh planner statistics, as autovacuum would after a load like this."""
        if not self.sqlite:
            self.conn.autocommit = True
            self._run("ANALYZE")
            self.conn.autocommit = False

    def middle_entry(self, wallet_id: int, entries: int) -> int:
        found = self._one(
            "SELECT id FROM credits_entries WHERE wallet_id = %s ORDER BY id LIMIT 1 OFFSET %s",
            (wallet_id, entries // 2),
        )
        self.conn.rollback()
        return int(found)

    def close(self) -> None:
        self.conn.rollback()
        self.conn.close()

    def audit(self) -> list[str]:
        """The invariants of ``credits.audit()``, checked with set-based SQL."""
        problems = []
        for what, sql in AUDIT.items():
            found = int(self._one(sql))
            if found:
                problems.append(f"{found} {what}")
        self.conn.rollback()
        return problems


AUDIT = {
    "wallets whose balance is not the sum of their entries": (
        "SELECT count(*) FROM credits_wallets w LEFT JOIN (SELECT wallet_id, sum(amount) AS total"
        " FROM credits_entries GROUP BY wallet_id) e ON e.wallet_id = w.id"
        " WHERE w.balance <> coalesce(e.total, 0)"
    ),
    "wallets whose balance is not the credits left in their lots": (
        "SELECT count(*) FROM credits_wallets w LEFT JOIN (SELECT wallet_id, sum(remaining) AS total"
        " FROM credits_lots GROUP BY wallet_id) l ON l.wallet_id = w.id"
        " WHERE w.balance <> coalesce(l.total, 0)"
    ),
    "wallets whose last entry's balance_after is not their balance": (
        "SELECT count(*) FROM credits_wallets w JOIN (SELECT wallet_id, max(id) AS last_id"
        " FROM credits_entries GROUP BY wallet_id) m ON m.wallet_id = w.id"
        " JOIN credits_entries e ON e.id = m.last_id WHERE e.balance_after <> w.balance"
    ),
    "entries whose draws do not add up to them": (
        "SELECT count(*) FROM credits_entries e LEFT JOIN (SELECT entry_id, sum(amount) AS total"
        " FROM credits_draws GROUP BY entry_id) d ON d.entry_id = e.id"
        " WHERE (e.kind IN ('spend', 'refund', 'expire', 'revoke', 'reinstate', 'debt')"
        " OR (e.kind = 'transfer' AND e.amount < 0)) AND coalesce(d.total, 0) <> e.amount"
    ),
}


def interleaved(ops: dict[str, Callable[[], object]], repeat: int, budget: float) -> dict[str, Measurement]:
    """Time each operation ``repeat`` times in ``ROUNDS`` rounds, the operations taking turns; an
    operation slower than ``budget`` seconds for all its calls is called less (at least once a round)."""
    out = {name: Measurement() for name in ops}
    clock = time.perf_counter
    calls = {}
    for name, op in ops.items():
        t0 = clock()
        op()
        first = clock() - t0
        calls[name] = max(1, min(repeat // ROUNDS, int(budget / ROUNDS / max(first, 1e-6))))
    for r in range(ROUNDS):
        names = list(ops)
        names = names[r % len(names) :] + names[: r % len(names)]
        for name in names:
            op, result = ops[name], out[name]
            for _ in range(calls[name]):
                t0 = clock()
                op()
                result.latencies.append(clock() - t0)
                result.ops += 1
                result.seconds += result.latencies[-1]
    return out


def run(target: Target, app: Flask, credits: FlaskCredits, settings: Settings) -> ScaleResult:
    loader = Loader(target)
    steps: list[Step] = []
    big: dict[str, int] = {}  # name -> entries
    middles: dict[str, int] = {}
    try:
        for entries, wallets in zip(settings.entry_steps, settings.wallet_steps, strict=True):
            name = f"big-{entries}"
            begin = time.perf_counter()
            with app.app_context():
                credits.grant(name, BIG, reason="bench")  # the wallet, its lot and its first entry
                wallet_id = credits.ledger.wallet_id(make_wallet(name))
                assert wallet_id is not None
                lots = credits.tables.lots
                with credits.db.engine.connect() as conn:
                    lot_id = conn.execute(
                        lots.select().with_only_columns(lots.c.id).where(lots.c.wallet_id == wallet_id)
                    ).scalar_one()
            loader.spends(wallet_id, lot_id, entries - 1)
            loader.add_wallets(wallets - len(big) - 1)
            loader.analyze()
            big[name] = entries
            middles[name] = loader.middle_entry(wallet_id, entries)
            step = Step(wallets, name, entries, time.perf_counter() - begin)
            sample = [f"w{n}" for n in range(0, loader.wallets, max(1, loader.wallets // 97))]
            with app.app_context():
                step.small = interleaved(
                    _small_ops(credits, sample),
                    settings.scale_repeat,
                    settings.scale_budget,
                )
            steps.append(step)
        with app.app_context():
            ops = _lot_ops(credits, loader, settings.emptied_lots)
        keys: dict[str, tuple[str, int]] = {}
        for name, entries in big.items():
            for label, op in _big_ops(credits, name, middles[name]).items():
                ops[f"{label} @{entries}"] = op
                keys[f"{label} @{entries}"] = (label, entries)
        with app.app_context():
            timed = interleaved(ops, settings.scale_repeat, settings.scale_budget)
            audit_error = None
            try:
                audit = credits.audit()
            except sa.exc.DBAPIError as exc:
                # Recorded in the report; the same invariants are then checked with set-based SQL.
                audit_error = str(exc.orig).splitlines()[0]
                audit = loader.audit()
        by_op: dict[str, dict[int, Measurement]] = {}
        lot_timings = {name: timed.pop(name) for name in LOT_OPS}
        for key, measurement in timed.items():
            label, entries = keys[key]
            by_op.setdefault(label, {})[entries] = measurement
    finally:
        loader.close()
    return ScaleResult(
        steps,
        by_op,
        audit,
        target.backend != "sqlite",
        settings.scale_repeat,
        lot_timings,
        settings.emptied_lots,
        audit_error,
    )


#: spend() on a wallet holding one lot, and on one whose older lots are all emptied (``Loader.emptied``).
LOT_OPS = ("spend 1, wallet of 1 lot", "spend 1, wallet of emptied lots + 1")


def _lot_ops(credits: FlaskCredits, loader: Loader, emptied: int) -> dict[str, Callable[[], object]]:
    credits.grant("lots-1", BIG, reason="bench")
    wallet_id = credits.ledger.wallet_id(make_wallet("lots-many"), create=True)
    assert wallet_id is not None
    loader.emptied(wallet_id, emptied)
    credits.grant("lots-many", BIG, reason="bench")  # the one live lot, the newest
    loader.analyze()
    one, many = LOT_OPS
    return {
        one: lambda: credits.spend("lots-1", 1, reason="bench"),
        many: lambda: credits.spend("lots-many", 1, reason="bench"),
    }


def _small_ops(credits: FlaskCredits, sample: list[str]) -> dict[str, Callable[[], object]]:
    small = itertools.cycle(sample)
    return {
        "balance, a small wallet": lambda: credits.balance(next(small)),
        "history page, a small wallet": lambda: credits.history(next(small), limit=50),
    }


def _big_ops(credits: FlaskCredits, name: str, middle: int) -> dict[str, Callable[[], object]]:
    return {
        "balance": lambda: credits.balance(name),
        "history page (50 newest)": lambda: credits.history(name, limit=50),
        "history page (50 before the middle entry)": lambda: credits.history(name, limit=50, before=middle),
        "spend 1": lambda: credits.spend(name, 1, reason="bench"),
    }
