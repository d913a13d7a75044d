"""Fixtures shared by every test module.

Database tests run on SQLite always, and on PostgreSQL and MariaDB/MySQL when these are set:

    CREDITS_TEST_POSTGRES_URL=postgresql+psycopg://root@127.0.0.1:5432/test
    CREDITS_TEST_MARIADB_URL=mysql+pymysql://root@127.0.0.1:3306/test

Each run creates a fresh database of its own on those servers and drops it afterwards. Without a URL
those cases skip with a reason; with CREDITS_TEST_REQUIRE_DATABASES=1 (as in CI) they fail instead.

A module that must also hold behind a transaction pooler adds a fourth target with
``pytestmark = helpers.also_through_pgbouncer`` (the concurrency tests):

    CREDITS_TEST_PGBOUNCER_URL=postgresql+psycopg://root@127.0.0.1:6432/test

PgBouncer in ``pool_mode = transaction`` in front of the PostgreSQL of CREDITS_TEST_POSTGRES_URL, with
``[databases] * = host=... port=...`` so that it serves any database name: the run's database is made
on PostgreSQL directly and reached through PgBouncer, and ``make_app`` sets
``CREDITS_DATABASE_POOLER = "transaction"`` for it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone

import pytest
import responses
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from helpers import (
    DIRECT_BACKENDS,
    MAX_QUANTITY,
    PACKS,
    SECRET_KEY,
    WHSEC,
    Shop,
    build_example_app,
    clear,
    drop_all_tables,
    fresh_user_per_request,
    make_app,
)

from flask_credits import FlaskCredits, testing

BACKENDS = {
    "sqlite": None,
    "postgresql": "CREDITS_TEST_POSTGRES_URL",
    "mariadb": "CREDITS_TEST_MARIADB_URL",
    "pgbouncer": "CREDITS_TEST_PGBOUNCER_URL",
}
REQUIRE_ALL = os.environ.get("CREDITS_TEST_REQUIRE_DATABASES") == "1"


def server_url(backend: str) -> str:
    """The admin URL for a server backend, or skip (fail in CI) when it is not configured."""
    env = BACKENDS[backend]
    assert env is not None
    url = os.environ.get(env)
    if not url:
        message = f"{backend} not configured: set {env} to run these cases against it"
        if REQUIRE_ALL:
            pytest.fail(message + " (CREDITS_TEST_REQUIRE_DATABASES=1)")
        pytest.skip(message)
    return url


@pytest.fixture(scope="session", params=DIRECT_BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh, empty database on each backend, for the whole test session."""
    backend = request.param
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'credits.sqlite3'}"
        return
    url = sa.make_url(server_url(backend))
    reached = url
    if backend == "pgbouncer":  # made on PostgreSQL itself, reached through PgBouncer
        url = sa.make_url(server_url("postgresql"))
    name = f"fc_test_{secrets.token_hex(4)}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    create = f"CREATE DATABASE {name}"
    if backend == "mariadb":
        create += " CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
    with admin.connect() as conn:
        conn.execute(sa.text(create))
    try:
        yield reached.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            if backend != "mariadb":
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            else:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


@pytest.fixture
def through_pgbouncer(database_url: str) -> str:
    """The session's PostgreSQL database reached through the test PgBouncer (transaction mode)."""
    pooled = sa.make_url(server_url("pgbouncer"))
    url = sa.make_url(database_url).set(host=pooled.host, port=pooled.port)
    return url.render_as_string(hide_password=False)


@pytest.fixture
def empty_database(database_url: str) -> Iterator[str]:
    """The session's database with no table at all, before and after the test (other modules leave
    their create_all() tables behind; a migration must start from nothing)."""
    drop_all_tables(database_url)
    try:
        yield database_url
    finally:
        drop_all_tables(database_url)


@pytest.fixture
def example(empty_database: str) -> Iterator[Flask]:
    """The example app on an empty database, migrated to head. No app context is held: each request
    gets its own ``g`` and session."""
    import flask_migrate

    from example_app.models import db

    app = build_example_app(empty_database)
    with app.app_context():
        flask_migrate.upgrade()
    yield app
    with app.app_context():
        db.engine.dispose()


@pytest.fixture
def backend(database_url: str) -> str:
    return sa.make_url(database_url).get_backend_name()


@pytest.fixture
def credits_config() -> dict[str, object]:
    """Config the ``app`` fixture is built with, since ``FlaskCredits.init_app`` reads it once (setting
    ``app.config`` afterwards changes nothing): a module overrides this fixture, and one test adds to it
    with ``@pytest.mark.config(KEY=value, ...)``."""
    return {}


@pytest.fixture
def app_config(request: pytest.FixtureRequest, credits_config: dict[str, object]) -> dict[str, object]:
    """The config of this test's app: the module's ``credits_config``, then the test's
    ``@pytest.mark.config`` keys (the closest marker wins)."""
    config = dict(credits_config)
    for marker in reversed(list(request.node.iter_markers("config"))):
        config.update(marker.kwargs)
    return config


@pytest.fixture
def app_db_credits(
    database_url: str, app_config: dict[str, object]
) -> Iterator[tuple[Flask, SQLAlchemy, FlaskCredits]]:
    app, db, credits = make_app(database_url, **app_config)
    with app.app_context():
        db.create_all()
        clear(db)
        try:
            yield app, db, credits
        finally:
            clear(db)
            db.engine.dispose()


@pytest.fixture
def build_app(
    database_url: str, app_config: dict[str, object]
) -> Iterator[Callable[..., tuple[Flask, SQLAlchemy, FlaskCredits]]]:
    """Build another app on this test's database, with this test's config and ``changes`` on top: for a
    test that shows what a setting does by comparing two apps (init_app reads config once). Its
    requests push its own app context; reads through the ``credits`` fixture see the same tables."""
    built: list[tuple[Flask, SQLAlchemy]] = []

    def build(**changes: object) -> tuple[Flask, SQLAlchemy, FlaskCredits]:
        app, db, credits = make_app(database_url, **{**app_config, **changes})
        built.append((app, db))
        return app, db, credits

    yield build
    for app, db in built:
        with app.app_context():
            db.engine.dispose()


@pytest.fixture
def app(app_db_credits: tuple[Flask, SQLAlchemy, FlaskCredits]) -> Flask:
    return app_db_credits[0]


@pytest.fixture
def db(app_db_credits: tuple[Flask, SQLAlchemy, FlaskCredits]) -> SQLAlchemy:
    return app_db_credits[1]


@pytest.fixture
def credits(app_db_credits: tuple[Flask, SQLAlchemy, FlaskCredits]) -> FlaskCredits:
    return app_db_credits[2]


@pytest.fixture
def client(app: Flask):  # type: ignore[no-untyped-def]
    return app.test_client()


@pytest.fixture
def login(client):  # type: ignore[no-untyped-def]
    def log_in(user_id: str = "alice") -> None:
        assert client.post(f"/_login/{user_id}").status_code == 200

    return log_in


class Clock:
    """A clock for ``FlaskCredits.clock``, so expiry can be tested without sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


@pytest.fixture
def clock(credits: FlaskCredits) -> Clock:
    """The extension's clock, replaced: every write records this time."""
    fake = Clock()
    credits.clock = fake
    return fake


@pytest.fixture
def received():  # type: ignore[no-untyped-def]
    """Record every flask_credits signal sent: a list of (signal name, sender, kwargs)."""
    from flask_credits import signals

    log: list[tuple[str, object, dict[str, object]]] = []
    receivers = []
    for name in signals.__all__:
        signal = getattr(signals, name)

        def receiver(sender: object, _name: str = name, **kwargs: object) -> None:
            log.append((_name, sender, kwargs))

        signal.connect(receiver)
        receivers.append((signal, receiver))
    yield log
    for signal, receiver in receivers:
        signal.disconnect(receiver)


@pytest.fixture
def stripe() -> Iterator[responses.RequestsMock]:
    """Stripe's API answered by ``responses``: a test registers the answers it expects
    (``flask_credits.testing.mock_create_session`` and the like); any other call fails."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


# -- the shop that the hostile-input tests attack (test_hostile_*.py) ----------------------------------


@pytest.fixture(scope="module")
def shop_per_backend(database_url) -> Iterator[Shop]:
    """One app per backend for the whole module (building one per test would take most of its time)."""
    app, db, credits = make_app(
        database_url,
        STRIPE_SECRET_KEY=SECRET_KEY,
        STRIPE_WEBHOOK_SECRET=WHSEC,
        CREDITS_STRIPE_MAX_RETRIES=0,
        CREDITS_PACKS=PACKS,
        CREDITS_MAX_QUANTITY=MAX_QUANTITY,
    )
    fresh_user_per_request(app)

    @credits.wallet_checker
    def owns(user_id: str, key_id: str | None) -> bool:
        return (user_id, key_id) in {("alice", None), ("bob", None), ("alice", "key-1")}

    @app.get("/_boom")
    def boom() -> str:
        return str({}["missing"])  # a view that fails

    with app.app_context(), responses.RequestsMock(assert_all_requests_are_fired=False) as stripe:
        db.create_all()
        testing.mock_create_session(stripe)  # a new open session for each checkout
        # A payment intent Stripe knows nothing about (refunds and disputes look it up).
        stripe.add(
            responses.GET,
            f"{testing.STRIPE_API}/v1/checkout/sessions",
            json={"object": "list", "data": [], "has_more": False},
        )
        stripe.add(
            responses.GET,
            f"{testing.STRIPE_API}/v1/invoice_payments",
            json={"object": "list", "data": [], "has_more": False},
        )
        found = Shop(app, db, credits, stripe)
        try:
            yield found
        finally:
            clear(db)
            db.engine.dispose()


@pytest.fixture
def shop(shop_per_backend) -> Iterator[Shop]:
    """The shop as ``Shop.reset`` leaves it (reset again only if the last test changed it), with
    Stripe's call log empty, no purchase checked at Stripe lately, and the app's config restored
    afterwards."""
    found = shop_per_backend
    if not found.baseline or found.state() != found.baseline:
        found.reset()
    with found.db.engine.begin() as conn:  # so that the success page may ask Stripe in every test
        conn.execute(sa.update(found.credits.tables.purchases).values(checked_at=None))
    found.stripe.calls.reset()
    config = dict(found.app.config)
    yield found
    found.app.config.clear()
    found.app.config.update(config)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line per skip reason, with how many tests it skipped (``-ra`` would print one line per test:
    hundreds when a database is not configured)."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        terminalreporter.section("skipped, by reason")
        for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
            terminalreporter.line(f"SKIPPED {count}: {reason}")
