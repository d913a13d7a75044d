"""Section 6: what each operation sends to the database.

Statements are counted with SQLAlchemy's ``before_cursor_execute`` event on the engine, commits and
rollbacks with its ``commit``/``rollback`` events. Neither sees the ``BEGIN`` a driver sends by itself:
psycopg sends one before the first statement of every transaction (a round trip of its own), and
Python's sqlite3 issues one (in process) before the first INSERT/UPDATE/DELETE. On PostgreSQL the real
number of round trips is also measured, by tracing the libpq protocol (``PGconn.trace``) and counting
the frontend messages that wait for an answer (``Query`` and ``Sync``).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask
from sqlalchemy import event
from sqlalchemy.engine import Engine

from flask_credits import FlaskCredits, InsufficientCredits
from flask_credits.core.inputs import make_wallet

from . import webhooks
from .app import BIG, build_app
from .env import Target
from .loads import limit_statements, sql_now


@dataclass
class Counts:
    statements: float = 0
    commits: float = 0
    rollbacks: float = 0
    round_trips: float | None = None
    sql: list[str] = field(default_factory=list)  # the first call's statements, abbreviated


def _first_words(statement: str) -> str:
    words = statement.split()
    if words and words[0] == "WITH":  # a data-modifying WITH: name the writes it makes
        writes = re.findall(r"\b(UPDATE \w+|INSERT INTO \w+|DELETE FROM \w+)", statement)
        return "WITH (" + ", ".join(writes) + ") SELECT"
    head = " ".join(words[:2])
    if words and words[0] in ("UPDATE", "INSERT", "DELETE"):
        return head + (" … RETURNING" if "RETURNING" in words else "")
    return " ".join(words[:1]) + (" … FOR UPDATE" if "FOR UPDATE" in statement else "")


#: Calls of each operation before counting (psycopg prepares a statement on its 6th execution).
WARMUP = 6


class Tracer:
    """Round trips of psycopg connections: libpq's protocol trace, one file per connection."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="fc_bench_trace_")
        self.files: list[str] = []

    def attach(self, dbapi_connection: Any) -> None:
        from psycopg import pq

        path = os.path.join(self.folder, f"{len(self.files)}.trace")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        dbapi_connection.pgconn.trace(fd)  # libpq owns fd from now on
        dbapi_connection.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        self.files.append(path)

    def count(self) -> int:
        """Messages sent so far that wait for the server: ``Query`` (simple) and ``Sync`` (extended)."""
        total = 0
        for path in self.files:
            with open(path, errors="replace") as f:
                for line in f:
                    parts = line.split("\t", 3)
                    if parts[0] == "F" and len(parts) > 2 and parts[2].strip() in ("Query", "Sync"):
                        total += 1
        return total

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class Counter:
    """Counts what ``engine`` sends while an operation runs."""

    def __init__(self, engine: Engine, tracer: Tracer | None) -> None:
        self.statements: list[str] = []
        self.commits = self.rollbacks = 0
        self.tracer = tracer
        event.listen(engine, "before_cursor_execute", self._statement)
        event.listen(engine, "commit", self._commit)
        event.listen(engine, "rollback", self._rollback)
        if tracer is not None:
            event.listen(engine, "connect", lambda dbapi_connection, record: tracer.attach(dbapi_connection))

    def _statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(statement)

    def _commit(self, conn: Any) -> None:
        self.commits += 1

    def _rollback(self, conn: Any) -> None:
        self.rollbacks += 1

    def measure(self, op: Callable[[], object], repeat: int) -> Counts:
        """The average per call over ``repeat`` calls, after ``WARMUP`` calls: past psycopg's prepare
        threshold, so that round trips are those of the steady state."""
        for _ in range(WARMUP):
            op()
        start = (len(self.statements), self.commits, self.rollbacks)
        trips = self.tracer.count() if self.tracer else 0
        first_sql: list[str] = []
        for i in range(repeat):
            before = len(self.statements)
            op()
            if i == 0:
                first_sql = [_first_words(s) for s in self.statements[before:]]
        return Counts(
            (len(self.statements) - start[0]) / repeat,
            (self.commits - start[1]) / repeat,
            (self.rollbacks - start[2]) / repeat,
            (self.tracer.count() - trips) / repeat if self.tracer else None,
            first_sql,
        )


def limit_counts(target: Target, repeat: int, wallet_id: int) -> Counts:
    """The hand-written debit, by construction 2 statements and a COMMIT; traced on PostgreSQL."""
    update, insert = limit_statements(target)
    conn = target.raw_connect()
    tracer = Tracer() if target.backend == "postgresql" else None
    try:
        if tracer is not None:
            tracer.attach(conn)
        cur = conn.cursor()

        def debit() -> None:
            cur.execute(update, (wallet_id,))
            row = cur.fetchone()
            cur.execute(insert, (wallet_id, row[0], sql_now(target)))
            conn.commit()

        for _ in range(6):  # past psycopg's prepare threshold, as in the load test
            debit()
        trips = tracer.count() if tracer else 0
        for _ in range(repeat):
            debit()
        round_trips = (tracer.count() - trips) / repeat if tracer else None
        return Counts(
            2, 1, 0, round_trips, ["UPDATE credits_wallets … RETURNING", "INSERT INTO credits_entries"]
        )
    finally:
        conn.close()
        if tracer is not None:
            tracer.close()


@dataclass
class QueryRow:
    name: str
    counts: Counts


def run(target: Target, repeat: int = 10) -> tuple[list[QueryRow], list[QueryRow]]:
    """(operations in steady state, a mixed sequence showing psycopg's rollback cost)."""
    app, db, credits = build_app(target.url, pool_size=1)
    tracer = Tracer() if target.backend == "postgresql" else None
    try:
        with app.app_context():
            counter = Counter(db.engine, tracer)
            rows = _operations(app, db.engine, credits, counter, repeat, target)
            mixed = _mixed(credits, counter, repeat)
            db.engine.dispose()
    finally:
        if tracer is not None:
            tracer.close()
    return rows, mixed


def _operations(
    app: Flask, engine: Engine, credits: FlaskCredits, counter: Counter, repeat: int, target: Target
) -> list[QueryRow]:
    credits.grant("q-spend", BIG, reason="bench")
    credits.grant("q-grant", 1, reason="bench")
    credits.grant("q-poor", 1, reason="bench")
    credits.spend("q-poor", 1, reason="bench")
    credits.grant("web-0", BIG, reason="bench")
    credits.grant("q-limit", BIG, reason="bench")
    limit_id = credits.ledger.wallet_id(make_wallet("q-limit"))
    assert limit_id is not None
    client = app.test_client()

    def refused() -> None:
        try:
            credits.spend("q-poor", 1, reason="bench")
        except InsufficientCredits:
            return
        raise AssertionError("spend of an empty wallet succeeded")

    def request(path: str) -> Callable[[], None]:
        def send() -> None:
            response = client.post(path, headers={"X-Wallet": "web-0"})
            assert response.status_code == 200, response.status_code

        return send

    spends: list[int] = []

    def refund() -> None:
        credits.refund("q-spend", spends.pop())

    # Purchases and signed events made before counting.
    events = webhooks.signed_events(app, webhooks.start_purchases(app, 2 * (repeat + WARMUP)))
    pending = list(events)

    def deliver(body_signature: tuple[bytes, str]) -> None:
        body, signature = body_signature
        response = client.post(
            webhooks.WEBHOOK,
            data=body,
            headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
        )
        assert response.status_code == 200, response.get_data(as_text=True)

    delivered: list[tuple[bytes, str]] = []

    def fulfil() -> None:
        event_ = pending.pop()
        deliver(event_)
        delivered.append(event_)

    rows = [QueryRow("limit: hand-written debit (raw driver)", limit_counts(target, repeat, limit_id))]
    operations: list[tuple[str, Callable[[], object]]] = [
        ("spend (fast path)", lambda: credits.spend("q-spend", 1, reason="bench")),
        (
            "spend, new idempotency key",
            lambda: credits.spend("q-spend", 1, reason="bench", idempotency_key=secrets.token_hex(8)),
        ),
        (
            "spend, replayed idempotency key",
            lambda: credits.spend("q-spend", 1, reason="bench", idempotency_key="replayed"),
        ),
        ("spend refused (balance 0)", refused),
        ("grant, existing wallet", lambda: credits.grant("q-grant", 1, reason="bench")),
        ("grant, new wallet", lambda: credits.grant(f"q-new-{secrets.token_hex(6)}", 1, reason="bench")),
        ("balance", lambda: credits.balance("q-spend")),
        ("history page (limit 50)", lambda: credits.history("q-spend", limit=50)),
    ]
    for name, op in operations:
        rows.append(QueryRow(name, counter.measure(op, repeat)))
    credits.grant("q-hold", BIG, reason="bench")
    holds: list[int] = []
    rows.append(QueryRow("hold", counter.measure(lambda: holds.append(credits.hold("q-hold", 2).id), repeat)))
    rows.append(
        QueryRow("settle below the hold", counter.measure(lambda: credits.settle(holds.pop(), 1), repeat))
    )
    credits.hold("q-spend", 1)
    rows.append(
        QueryRow(
            "spend next to a live hold",
            counter.measure(lambda: credits.spend("q-spend", 1, reason="bench"), repeat),
        )
    )
    for _ in range(repeat + WARMUP):
        spends.append(credits.spend("q-spend", 1, reason="bench").id)
    rows.append(QueryRow("refund of a spend", counter.measure(refund, repeat)))
    rows.append(QueryRow("request POST /free (undecorated)", counter.measure(request("/free"), repeat)))
    rows.append(
        QueryRow("request POST /paid (@requires_credits(1))", counter.measure(request("/paid"), repeat))
    )
    rows.append(QueryRow("webhook checkout.session.completed", counter.measure(fulfil, repeat)))
    rows.append(
        QueryRow("webhook, duplicate delivery", counter.measure(lambda: deliver(delivered[0]), repeat))
    )
    return rows


def _mixed(credits: FlaskCredits, counter: Counter, repeat: int) -> list[QueryRow]:
    """A spend after a balance read on the same pooled connection: on psycopg a read ending in ROLLBACK
    would drop every prepared statement (DEALLOCATE ALL); reads in autocommit leave them."""

    def balance_then_spend() -> None:
        credits.balance("q-spend")
        credits.spend("q-spend", 1, reason="bench")

    return [QueryRow("balance, then spend (alternating)", counter.measure(balance_then_spend, repeat))]
