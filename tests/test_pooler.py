"""Behind a transaction pooler (``CREDITS_DATABASE_POOLER = "transaction"``): no server-side prepared
statement on any engine of the app, a clear refusal at startup where that cannot be done, and the app's
own queries through PgBouncer as safe as the ledger's (the races are in test_concurrency.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from helpers import make_app

from flask_credits import FlaskCredits


def on(*backends: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("database_url", backends, indirect=True, scope="session")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("session", 'CREDITS_DATABASE_POOLER must be "transaction" or None'),
        (True, 'CREDITS_DATABASE_POOLER must be "transaction" or None'),
        ("transaction", "is for PostgreSQL, not sqlite"),
    ],
)
def test_a_pooler_setting_that_cannot_work_is_refused_at_startup(tmp_path, value, message):
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'app.sqlite3'}", CREDITS_DATABASE_POOLER=value
    )
    SQLAlchemy(app)
    with pytest.raises(RuntimeError, match=message):
        FlaskCredits(app)


def prepare_thresholds(app: Flask, db: SQLAlchemy) -> list[int | None]:
    with app.app_context():
        out = []
        for engine in db.engines.values():
            with engine.connect() as conn:
                out.append(conn.connection.driver_connection.prepare_threshold)
        return out


@on("postgresql")
def test_the_setting_turns_server_side_prepares_off_on_every_engine_of_the_app(database_url):
    binds = {"SQLALCHEMY_BINDS": {"reports": database_url}}
    app, db, _ = make_app(database_url, CREDITS_DATABASE_POOLER="transaction", **binds)
    direct_app, direct_db, _ = make_app(database_url, **binds)
    try:
        assert prepare_thresholds(app, db) == [None, None]
        assert prepare_thresholds(direct_app, direct_db) == [5, 5]  # psycopg's default
    finally:
        for a, d in ((app, db), (direct_app, direct_db)):
            with a.app_context():
                for engine in d.engines.values():
                    engine.dispose()


@on("pgbouncer")
def test_through_pgbouncer_the_apps_own_repeated_queries_work_from_many_threads(app, db, credits):
    """More threads than PgBouncer's server connections, each running the same query in many
    transactions: each transaction may land on another server connection."""
    credits.grant("alice", 5, reason="welcome")
    wallets = credits.tables.wallets
    query = sa.select(wallets.c.balance).where(wallets.c.user_id == "alice")

    def reader(_: int) -> list[int]:
        found = []
        with app.app_context():
            for _ in range(20):
                found.append(db.session.execute(query).scalar_one())
                db.session.commit()  # the next transaction may run on another server connection
        return found

    with ThreadPoolExecutor(max_workers=8) as pool:
        balances = [b for found in pool.map(reader, range(8)) for b in found]
    assert balances == [5] * 160
