"""The peers (issue 18): other Python credit libraries' debits, beside ``credits.spend()`` on the same
database server and loads, each on tables of its own (a PostgreSQL schema, or a SQLite file).

- credit-ledger 0.3 (``credit_ledger.metering.decrement``): its tables as its README and schema.sql
  describe them (``tenants``, ``credit_balance``, ``credit_ledger`` with its unique key and row-level
  security policy); PostgreSQL only (``set_config``, ``ON CONFLICT``, ``uuid``).
- gringotts-api 0.4 (``gringotts.crud.charge_user``): its SQLAlchemy models (``Base.metadata``), one
  ORM ``Session`` per thread, as its FastAPI dependency holds one per request.

Both are imported lazily: a peer that cannot be imported is skipped with the reason printed.
"""

# The raw SQL here is assembled from constant fragments only, never from input.

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from .env import Target
from .timing import Worker

#: Credits granted to every peer wallet. gringotts keeps balances in an ``int`` column (int4 on
#: PostgreSQL), so less than ``BIG``; still more than any run spends.
PEER_CREDITS = 2_000_000_000

#: credit-ledger's schema.sql (tables, index, unique key, row-level security), without its role and
#: grants: the bench connects as the database owner, as its own tests do.
CREDIT_LEDGER_DDL = (
    "CREATE TABLE tenants (id uuid PRIMARY KEY, slug text, name text)",
    "CREATE TABLE credit_balance (tenant_id uuid PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,"
    " credits numeric(18, 4) NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE credit_ledger (id uuid PRIMARY KEY,"
    " tenant_id uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE, delta numeric(18, 4) NOT NULL,"
    " reason varchar(120) NOT NULL DEFAULT 'usage', idempotency_key varchar(200),"
    " balance_after numeric(18, 4), created_at timestamptz NOT NULL DEFAULT now())",
    "CREATE INDEX ix_credit_ledger_tenant ON credit_ledger (tenant_id)",
    "ALTER TABLE credit_ledger ADD CONSTRAINT uq_credit_ledger_idem UNIQUE (tenant_id, idempotency_key)",
    *(
        statement
        for table in ("credit_balance", "credit_ledger")
        for statement in (
            f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
            f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY",
            f"CREATE POLICY {table}_tenant_isolation ON {table}"
            " USING (tenant_id = NULLIF(current_setting('app.current_tenant', true), '')::uuid)"
            " WITH CHECK (tenant_id = NULLIF(current_setting('app.current_tenant', true), '')::uuid)",
        )
    ),
)


@dataclass
class Peer:
    """One peer library set up on its own tables: ``make(wallet name)`` builds a worker."""

    name: str
    make: Callable[[str], Worker]
    engine: sa.Engine
    note: str
    wallets: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        self.engine.dispose()


def _schema_engine(target: Target, schema: str, pool_size: int) -> sa.Engine:
    """An engine on ``target`` whose connections see only ``schema`` (PostgreSQL), made with the
    schema."""
    admin = sa.create_engine(target.url, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    admin.dispose()
    return sa.create_engine(
        target.url,
        pool_size=pool_size,
        max_overflow=4,
        connect_args={"options": f"-c search_path={schema}"},
    )


def credit_ledger(target: Target, names: list[str], pool_size: int) -> Peer:
    from credit_ledger import metering  # type: ignore[import-untyped,unused-ignore]

    engine = _schema_engine(target, "peer_credit_ledger", pool_size)
    tenants = {name: str(uuid.uuid5(uuid.NAMESPACE_URL, name)) for name in names}
    with engine.begin() as conn:
        for ddl in CREDIT_LEDGER_DDL:
            conn.execute(sa.text(ddl))
        conn.execute(
            sa.text("INSERT INTO tenants (id, slug) VALUES (:id, :slug)"),
            [{"id": t, "slug": name} for name, t in tenants.items()],
        )
    for tenant in tenants.values():
        if not metering.grant(tenant, PEER_CREDITS, reason="bench", engine=engine).ok:
            raise RuntimeError("credit-ledger refused the bench's grant")

    def make(name: str) -> Worker:
        tenant = tenants[name]

        def debit() -> None:
            if not metering.decrement(tenant, 1, reason="bench", engine=engine).ok:
                raise RuntimeError("credit-ledger's wallet ran out of credits")

        return debit, lambda: None

    return Peer(
        "credit-ledger 0.3",
        make,
        engine,
        "credit_ledger.metering.decrement(tenant, 1, engine=engine): BEGIN; set_config (the RLS tenant);"
        " UPDATE credit_balance ... WHERE credits >= 1 RETURNING; INSERT INTO credit_ledger; COMMIT"
        " (SQLAlchemy text(), its own engine, schema peer_credit_ledger).",
    )


def gringotts(target: Target, names: list[str], pool_size: int) -> Peer:
    from gringotts import crud, models
    from gringotts.db import Base, make_engine
    from sqlalchemy.orm import Session

    if target.backend == "postgresql":
        engine = _schema_engine(target, "peer_gringotts", pool_size)
        where = "schema peer_gringotts"
    else:
        # Its own SQLite file beside the run's database, with gringotts' shipped settings (WAL, busy
        # timeout).
        engine = make_engine(
            f"sqlite:///{os.path.join(os.path.dirname(target.sqlite_path), 'gringotts.sqlite3')}"
        )
        where = "its own SQLite file, gringotts' make_engine (WAL)"
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        for name in names:
            crud.create_user(session, name, api_key_hash=f"bench-{name}", credits=PEER_CREDITS)

    def make(name: str) -> Worker:
        session = Session(engine, autoflush=False)
        user = session.query(models.User).filter(models.User.username == name).one()

        def debit() -> None:
            if not crud.charge_user(session, user, 1, endpoint="/bench"):
                raise RuntimeError("gringotts' wallet ran out of credits")

        return debit, session.close

    return Peer(
        "gringotts-api 0.4",
        make,
        engine,
        "gringotts.crud.charge_user(session, user, 1): ORM UPDATE ... WHERE credits >= 1; refresh (SELECT);"
        " INSERT credit_transactions; COMMIT; refresh (SELECT), one Session per thread, " + where + ".",
    )


def prepare(target: Target, names: list[str], pool_size: int) -> tuple[list[Peer], list[str]]:
    """The peers that run on ``target`` (wallets ``names``), and why any other does not."""
    peers, skipped = [], []
    makers: list[tuple[str, Callable[[Target, list[str], int], Peer]]] = [
        ("gringotts-api 0.4", gringotts),
    ]
    if target.backend == "postgresql":
        makers.insert(0, ("credit-ledger 0.3", credit_ledger))
    else:
        skipped.append("credit-ledger 0.3: PostgreSQL only (set_config, uuid, ON CONFLICT)")
    for name, maker in makers:
        try:
            peers.append(maker(target, names, pool_size))
        except ImportError as exc:
            skipped.append(f"{name}: not installed ({exc}); pip install -e '.[bench]'")
    return peers, skipped
