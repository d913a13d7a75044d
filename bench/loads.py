"""Sections 1 and 2: the hand-written limit and ``credits.spend()`` under the same three loads."""

# The raw SQL here is assembled from constant fragments and driver placeholders only, never from input.
# ruff: noqa: S608

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from flask import Flask

from flask_credits import FlaskCredits
from flask_credits.core.inputs import make_wallet
from flask_credits.storage.statements import SPEND

from .app import BIG
from .env import Target
from .peers import Peer
from .settings import Settings
from .timing import Measurement, Worker, compare, run_threads


@dataclass(frozen=True)
class Load:
    name: str
    threads: int
    kind: str  # "one", "hot" or "many"

    def wallets(self, prefix: str) -> list[str]:
        if self.kind == "one":
            return [f"{prefix}-one"]
        if self.kind == "hot":
            return [f"{prefix}-hot"] * self.threads
        return [f"{prefix}-{i}" for i in range(self.threads)]


def loads(settings: Settings) -> list[Load]:
    n = settings.threads
    return [
        Load("one connection", 1, "one"),
        Load(f"{n} threads, one hot wallet", n, "hot"),
        Load(f"{n} threads, {n} wallets", n, "many"),
    ]


def sql_now(target: Target) -> Any:
    """``created_at`` as the extension stores it: naive UTC (SQLite: SQLAlchemy's text format)."""
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    return now.strftime("%Y-%m-%d %H:%M:%S.%f") if target.backend == "sqlite" else now


def limit_statements(target: Target) -> tuple[str, str]:
    """The cheapest correct debit: a conditional UPDATE (a row back = it matched) and one INSERT."""
    p = "?" if target.backend == "sqlite" else "%s"
    return (
        f"UPDATE credits_wallets SET balance = balance - 1 WHERE id = {p} AND balance >= 1 RETURNING balance",
        "INSERT INTO credits_entries (wallet_id, amount, balance_after, kind, reason, created_at)"
        f" VALUES ({p}, -1, {p}, 'spend', 'bench', {p})",
    )


#: The one-statement floor's own tables (PostgreSQL): a wallet and an entry, nothing else, so it is
#: the cheapest debit one statement in autocommit can make: the floor for the ledger's one statements.
FLOOR_TABLES = (
    "CREATE TABLE bench_floor_wallets (id bigint PRIMARY KEY, balance bigint NOT NULL)",
    "CREATE TABLE bench_floor_entries (id bigserial PRIMARY KEY, wallet_id bigint NOT NULL,"
    " amount bigint NOT NULL, balance_after bigint NOT NULL)",
)
FLOOR = (
    "WITH w AS (UPDATE bench_floor_wallets SET balance = balance - 1 WHERE id = %(id)s AND balance >= 1"
    " RETURNING balance) INSERT INTO bench_floor_entries (wallet_id, amount, balance_after)"
    " SELECT %(id)s, -1, balance FROM w"
)


def prepare_floor(target: Target, settings: Settings) -> dict[str, int]:
    """The floor's tables and one wallet per name of the loads (``BIG`` credits); name -> id."""
    names = sorted({name for load in loads(settings) for name in load.wallets("floor")})
    ids = {name: i for i, name in enumerate(names, start=1)}
    conn = target.raw_connect()
    try:
        cur = conn.cursor()
        for ddl in FLOOR_TABLES:
            cur.execute(ddl)
        cur.executemany(
            "INSERT INTO bench_floor_wallets (id, balance) VALUES (%s, %s)", [(i, BIG) for i in ids.values()]
        )
        conn.commit()
    finally:
        conn.close()
    return ids


def floor_worker(target: Target, wallet_id: int) -> Worker:
    """The one-statement floor: ``FLOOR`` on a raw psycopg connection in autocommit (one round trip,
    its own transaction)."""
    import psycopg

    conn = psycopg.connect(target.conninfo, autocommit=True)
    cur = conn.cursor()
    params = {"id": wallet_id}

    def debit() -> None:
        cur.execute(FLOOR, params)
        if cur.rowcount != 1:
            raise RuntimeError("the floor's wallet ran out of credits")

    return debit, conn.close


def hold_settle_worker(app: Flask, credits: FlaskCredits, user_id: str) -> Worker:
    """``credits.hold(user_id, 2)`` then ``credits.settle(hold.id, 1)``: one operation, charged below
    what it held (the rest goes back), in an app context pushed once for the thread."""
    ctx = app.app_context()
    ctx.push()

    def hold_then_settle() -> None:
        hold = credits.hold(user_id, 2, reason="bench")
        credits.settle(hold.id, 1)

    return hold_then_settle, ctx.pop


def limit_worker(target: Target, wallet_id: int) -> Worker:
    """One raw connection debiting ``wallet_id``: UPDATE, INSERT, COMMIT."""
    return ladder_worker(target, wallet_id, 2)


def spend_worker(app: Flask, credits: FlaskCredits, user_id: str) -> Worker:
    """``credits.spend(user_id, 1)`` in an app context pushed once for the thread."""
    ctx = app.app_context()
    ctx.push()

    def spend() -> None:
        credits.spend(user_id, 1, reason="bench")

    return spend, ctx.pop


def spend_sql_worker(target: Target, user_id: str) -> Worker:
    """The statements ``credits.spend()`` sends when the wallet's soonest lot covers the debit, with
    the raw driver: what the extension's SQL costs without its Python layer. PostgreSQL: the ledger's
    own one-statement debit (``SPEND``) on a connection in autocommit, as ``spend()`` sends it.
    SQLite: UPDATE wallet RETURNING, the first lot drawn by one UPDATE RETURNING, INSERT entry,
    INSERT draw, COMMIT."""
    if target.backend == "postgresql":
        import psycopg

        conn = psycopg.connect(target.conninfo, autocommit=True)
        cur = conn.cursor()
        params = {"user_id": user_id, "key_id": "", "amount": 1, "reason": "bench", "key": None, "meta": None}

        def one_statement() -> None:
            cur.execute(SPEND, {**params, "now": sql_now(target)})
            if cur.fetchone() is None:
                raise RuntimeError("the wallet ran out of credits")

        return one_statement, conn.close
    update_wallet = (
        "UPDATE credits_wallets SET balance = balance - 1, updated_at = ?"
        " WHERE user_id = ? AND key_id = '' AND balance >= 1"
        " AND (next_expiry IS NULL OR next_expiry > ?) RETURNING id, balance"
    )
    draw_first = (
        "UPDATE credits_lots SET remaining = remaining - 1 WHERE id = (SELECT id FROM credits_lots"
        " WHERE wallet_id = ? AND remaining > 0"
        " ORDER BY CASE WHEN expires_at IS NULL THEN 1 ELSE 0 END, expires_at, id LIMIT 1)"
        " AND remaining >= 1 RETURNING id"
    )
    insert_entry = (
        "INSERT INTO credits_entries (wallet_id, amount, balance_after, kind, reason, idempotency_key,"
        " reverses_id, meta, created_at) VALUES (?, -1, ?, 'spend', 'bench', NULL, NULL, NULL, ?)"
    )
    conn = target.raw_connect()
    cur = conn.cursor()

    def four_statements() -> None:
        now = sql_now(target)
        found = cur.execute(update_wallet, (now, user_id, now)).fetchone()
        if found is None:
            conn.rollback()
            raise RuntimeError("the wallet ran out of credits")
        lot_id = cur.execute(draw_first, (found[0],)).fetchone()[0]
        cur.execute(insert_entry, (found[0], found[1], now))
        cur.execute(
            "INSERT INTO credits_draws (entry_id, lot_id, amount) VALUES (?, ?, -1)", (cur.lastrowid, lot_id)
        )
        conn.commit()

    return four_statements, conn.close


def ladder_worker(target: Target, wallet_id: int, statements: int) -> Worker:
    """The limit (2 statements: UPDATE wallet, INSERT entry) plus the writes a lot-keeping ledger
    adds, one at a time, raw driver: 3 statements (+ ``UPDATE credits_lots`` of the wallet's one lot)
    or 4 (+ ``INSERT INTO credits_draws``); COMMIT."""
    pg = target.backend == "postgresql"
    p = "%s" if pg else "?"
    update, insert = limit_statements(target)
    if statements >= 4 and pg:
        insert += " RETURNING id"
    update_lot = f"UPDATE credits_lots SET remaining = remaining - 1 WHERE id = {p} AND remaining >= 1"
    insert_draw = f"INSERT INTO credits_draws (entry_id, lot_id, amount) VALUES ({p}, {p}, -1)"
    conn = target.raw_connect()
    cur = conn.cursor()
    lot_id = None
    if statements >= 3:
        cur.execute(f"SELECT id FROM credits_lots WHERE wallet_id = {p}", (wallet_id,))
        lot_id = cur.fetchone()[0]
        conn.commit()

    def debit() -> None:
        cur.execute(update, (wallet_id,))
        row = cur.fetchone()
        if row is None:
            conn.rollback()
            raise RuntimeError("the wallet ran out of credits")
        if statements >= 3:
            cur.execute(update_lot, (lot_id,))
        cur.execute(insert, (wallet_id, row[0], sql_now(target)))
        if statements >= 4:
            entry_id = cur.fetchone()[0] if pg else cur.lastrowid
            cur.execute(insert_draw, (entry_id, lot_id))
        conn.commit()

    return debit, conn.close


@dataclass
class LoadResult:
    load: Load
    limit: Measurement
    spend: Measurement
    spend_sql: Measurement
    ladder: dict[str, Measurement]  # one connection only: the limit plus the lot's writes
    hold_settle: Measurement
    floor: Measurement | None  # PostgreSQL only
    peers: dict[str, Measurement] = field(default_factory=dict)  # peer name -> its debit

    @property
    def reference(self) -> Measurement:
        """What every ratio is taken against: the one-statement floor (PostgreSQL), else the limit."""
        return self.floor or self.limit

    def against(self, m: Measurement) -> float:
        return m.throughput / self.reference.throughput

    def round_ratios_of(self, m: Measurement) -> list[float]:
        return [x / ref for x, ref in zip(m.rounds, self.reference.rounds, strict=True) if ref]

    @property
    def hold_ratio(self) -> float:
        """hold + settle against the one-statement floor (PostgreSQL) or the limit (elsewhere)."""
        return self.against(self.hold_settle)

    @property
    def hold_round_ratios(self) -> list[float]:
        return self.round_ratios_of(self.hold_settle)

    @property
    def sql_ratio(self) -> float:
        return self.against(self.spend_sql)

    @property
    def ratio(self) -> float:
        """spend() against the reference (the floor on PostgreSQL)."""
        return self.against(self.spend)

    @property
    def limit_ratio(self) -> float:
        """spend() against the three-round-trip hand-written debit."""
        return self.spend.throughput / self.limit.throughput

    @property
    def round_ratios(self) -> list[float]:
        return self.round_ratios_of(self.spend)

    @property
    def best_peer(self) -> tuple[str, Measurement] | None:
        if not self.peers:
            return None
        return max(self.peers.items(), key=lambda item: item[1].throughput)


def prepare_wallets(app: Flask, credits: FlaskCredits, settings: Settings) -> dict[str, int]:
    """Every wallet of the loads, with ``BIG`` credits in one lot; returns name -> row id."""
    names = {
        name
        for load in loads(settings)
        for prefix in ("limit", "spend", "sql", "ladder3", "ladder4", "hold")
        for name in load.wallets(prefix)
    }
    ids = {}
    with app.app_context():
        for name in sorted(names):
            credits.grant(name, BIG, reason="bench")
            wallet_id = credits.ledger.wallet_id(make_wallet(name))
            assert wallet_id is not None
            ids[name] = wallet_id
    return ids


def run_load(
    load: Load, prefix: str, make: Callable[[str], Worker], settings: Settings
) -> Callable[[], Measurement]:
    """A contender for ``compare``: ``load.threads`` threads, each running ``make(its wallet)``."""
    names = load.wallets(prefix)
    return lambda: run_threads(lambda i: make(names[i]), load.threads, settings.duration, settings.warmup)


def limit_run(
    target: Target, load: Load, settings: Settings, wallet_ids: dict[str, int]
) -> Callable[[], Measurement]:
    """The hand-written limit under ``load``, as a contender for ``compare``."""
    return run_load(load, "limit", lambda name: limit_worker(target, wallet_ids[name]), settings)


def floor_run(
    target: Target, load: Load, settings: Settings, floor_ids: dict[str, int]
) -> Callable[[], Measurement]:
    """The one-statement floor under ``load`` (PostgreSQL), as a contender for ``compare``."""
    return run_load(load, "floor", lambda name: floor_worker(target, floor_ids[name]), settings)


def peer_names(settings: Settings) -> list[str]:
    """The wallets every peer gets: one per name the loads use."""
    return sorted({name for load in loads(settings) for name in load.wallets("peer")})


def run_loads(
    target: Target,
    app: Flask,
    credits: FlaskCredits,
    settings: Settings,
    wallet_ids: dict[str, int],
    floor_ids: dict[str, int],
    peers: Sequence[Peer] = (),
) -> list[LoadResult]:
    results = []
    for load in loads(settings):

        def contender(
            prefix: str, make: Callable[[str], Worker], load: Load = load
        ) -> Callable[[], Measurement]:
            return run_load(load, prefix, make, settings)

        contenders = [
            ("limit", limit_run(target, load, settings, wallet_ids)),
            ("spend", contender("spend", lambda name: spend_worker(app, credits, name))),
            ("sql", contender("sql", lambda name: spend_sql_worker(target, name))),
            ("hold", contender("hold", lambda name: hold_settle_worker(app, credits, name))),
        ]
        if floor_ids:
            contenders.append(("floor", floor_run(target, load, settings, floor_ids)))
        for peer in peers:
            contenders.append((f"peer:{peer.name}", contender("peer", peer.make)))
        if load.kind == "one":
            contenders += [
                ("ladder3", contender("ladder3", lambda name: ladder_worker(target, wallet_ids[name], 3))),
                ("ladder4", contender("ladder4", lambda name: ladder_worker(target, wallet_ids[name], 4))),
            ]
        pooled = compare(contenders, settings.rounds)
        results.append(
            LoadResult(
                load,
                pooled["limit"],
                pooled["spend"],
                pooled["sql"],
                {name: m for name, m in pooled.items() if name.startswith("ladder")},
                pooled["hold"],
                pooled.get("floor"),
                {name[5:]: m for name, m in pooled.items() if name.startswith("peer:")},
            )
        )
    return results


def audit_spend_wallets(app: Flask, credits: FlaskCredits, wallet_ids: dict[str, int]) -> list[str]:
    """``credits.audit()`` problems outside the wallets that raw SQL debits without (all) the ledger's
    rows: the limit's and the first rung of the ladder's."""
    unaudited = ("limit-", "ladder3-")
    limit_ids = {wid for name, wid in wallet_ids.items() if name.startswith(unaudited)}
    with app.app_context():
        problems = credits.audit()
    kept = []
    for line in problems:
        found = re.match(r"wallet id (\d+):", line)
        if any(f"user_id='{prefix}" in line for prefix in unaudited) or (
            found and int(found.group(1)) in limit_ids
        ):
            continue
        kept.append(line)
    return kept
