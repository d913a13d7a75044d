"""Behind a transaction pooler (``CREDITS_DATABASE_POOLER = "transaction"``): no server-side prepared
statement on any engine of the app, a clear refusal at startup where that cannot be done, and the app's
own queries through PgBouncer as safe as the ledger's (the races are in test_concurrency.py)."""

from __future__ import annotations

import logging
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
        ("statement", 'CREDITS_DATABASE_POOLER must be "transaction", "session" or None'),
        (True, 'CREDITS_DATABASE_POOLER must be "transaction", "session" or None'),
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


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://app@db.internal:6432/shop",
        "postgresql+psycopg://app@aws-0-eu-west-1.pooler.supabase.com:6543/postgres",
        "postgresql+psycopg://app@ep-cool-name-123-pooler.eu-central-1.aws.neon.tech/shop",
    ],
)
def test_a_url_that_looks_like_a_poolers_gets_a_warning_at_startup_naming_the_setting(url, caplog):
    with caplog.at_level(logging.WARNING, logger="flask_credits"):
        make_app(url)
    assert any(
        "looks like a connection pooler" in r.message
        and 'CREDITS_DATABASE_POOLER = "transaction"' in r.message
        for r in caplog.records
    )
    caplog.clear()
    for value in ("session", "transaction"):
        make_app(url, CREDITS_DATABASE_POOLER=value)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@on("postgresql")
def test_a_lost_prepared_statement_is_logged_with_the_setting_to_use(app, db, caplog):
    """What a transaction pooler does to psycopg's prepared statements, done on a direct connection:
    the statement is prepared (6th use), then the server forgets it behind psycopg's back."""
    query = sa.text("SELECT 1 WHERE CAST(:x AS integer) = 1")
    with db.engine.connect() as conn:
        for _ in range(6):
            conn.execute(query, {"x": 1})
        conn.execute(sa.text("DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$"))
        with pytest.raises(sa.exc.ProgrammingError, match="does not exist"):
            conn.execute(query, {"x": 1})
    assert any(
        'CREDITS_DATABASE_POOLER = "transaction"' in r.message
        for r in caplog.records
        if r.levelno == logging.ERROR
    )


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
