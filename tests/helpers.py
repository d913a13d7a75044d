"""Helpers shared by the test modules; their fixtures are in conftest.py.

* Test apps: ``make_app`` builds a Flask app with Flask-SQLAlchemy, Flask-Login and FlaskCredits (and a
  ``POST /_login/<user>`` route), ``logged_in`` gives a client logged in on one, ``clear`` empties the
  tables.
* The example app: building it, signing up, CSRF tokens, API keys, grants and balances.
* Fuzzing: hypothesis settings sized per backend (``fuzz_cases``).
* The shop the hostile-input tests attack (its fixture is ``shop``), and request bodies handed to the
  app piece by piece, as a WSGI server hands over a chunked body.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
import responses
import sqlalchemy as sa
from flask import Flask, g
from flask.testing import FlaskClient
from flask_login import LoginManager, UserMixin, login_user
from flask_sqlalchemy import SQLAlchemy
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from flask_credits import FlaskCredits, testing

# -- test apps -----------------------------------------------------------------------------------------

#: The targets every database test runs on (conftest's ``database_url``).
DIRECT_BACKENDS = ["sqlite", "postgresql", "mariadb"]
#: ``pytestmark`` of a module that must also hold through PgBouncer in transaction mode.
also_through_pgbouncer = pytest.mark.parametrize(
    "database_url", [*DIRECT_BACKENDS, "pgbouncer"], indirect=True, scope="session"
)


def pooler_config(database_url: str) -> dict[str, object]:
    """``CREDITS_DATABASE_POOLER`` for a URL through the test PgBouncer (CREDITS_TEST_PGBOUNCER_URL)."""
    pooled = os.environ.get("CREDITS_TEST_PGBOUNCER_URL")
    url = sa.make_url(database_url)
    if pooled and (url.host, url.port) == (sa.make_url(pooled).host, sa.make_url(pooled).port):
        return {"CREDITS_DATABASE_POOLER": "transaction"}
    return {}


@dataclass
class User(UserMixin):  # type: ignore[misc]
    id: str


USERS = {"alice": User("alice"), "bob": User("bob"), "42": User("42")}


def make_app(database_url: str, **config: object) -> tuple[Flask, SQLAlchemy, FlaskCredits]:
    """A testing app on ``database_url`` with ``config`` (``init_app`` reads it once), the users of
    ``USERS``, and ``POST /_login/<user>`` to log one in. Its tables are not created."""
    app = Flask(__name__)
    app.config.update(
        TESTING=True,
        SECRET_KEY="test-secret",
        SQLALCHEMY_DATABASE_URI=database_url,
        SQLALCHEMY_ENGINE_OPTIONS=engine_options(database_url),
        **{**pooler_config(database_url), **config},
    )
    db = SQLAlchemy(app)
    manager = LoginManager(app)
    manager.user_loader(USERS.get)
    credits = FlaskCredits(app)

    @app.post("/_login/<user_id>")
    def _login(user_id: str) -> str:
        login_user(USERS[user_id])
        return "ok"

    return app, db, credits


def engine_options(database_url: str) -> dict[str, object]:
    if database_url.startswith("sqlite"):
        return {"connect_args": {"timeout": 30}}
    return {"pool_size": 10, "max_overflow": 20, "pool_pre_ping": True}


def clear(db: SQLAlchemy) -> None:
    with db.engine.begin() as conn:
        if "credits_entries" in db.metadata.tables:  # MariaDB checks the self-reference row by row
            entries = db.metadata.tables["credits_entries"]
            conn.execute(entries.update().values(reverses_id=None))
        for table in reversed(db.metadata.sorted_tables):
            conn.execute(table.delete())


def drop_all_tables(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            found = sa.MetaData()
            found.reflect(conn)
            found.drop_all(conn)
    finally:
        engine.dispose()


#: A port nothing listens on (the "discard" service is never enabled here): connections are refused.
CLOSED = "127.0.0.1:9"
#: A database URL per backend that refuses connections (a closed port; a folder that does not exist).
UNREACHABLE = {
    "sqlite": "sqlite:////nonexistent-folder-of-flask-credits/credits.db",
    "postgresql": f"postgresql+psycopg://root@{CLOSED}/test?connect_timeout=5",
    "mariadb": f"mysql+pymysql://root@{CLOSED}/test?connect_timeout=5",
}


def logged_in(app: Flask, user: str = "alice") -> FlaskClient:
    """A new test client of ``app`` (one built by ``make_app``), logged in as ``user``."""
    client = app.test_client()
    assert client.post(f"/_login/{user}").status_code == 200
    return client


# -- the example app -----------------------------------------------------------------------------------

PASSWORD = "correct horse battery staple"


def build_example_app(database_url: str, **config: object) -> Flask:
    """The example app on ``database_url``, in testing, CSRF protection off unless ``config`` says so."""
    from example_app import create_app

    return create_app(
        {"TESTING": True, "WTF_CSRF_ENABLED": False, "SQLALCHEMY_DATABASE_URI": database_url, **config}
    )


def sign_up(client: FlaskClient, username: str = "ada") -> Any:
    """Post the sign-up form (with its CSRF token when the app checks them); the response."""
    form = {"username": username, "password": PASSWORD, "confirm": PASSWORD}
    if client.application.config["WTF_CSRF_ENABLED"]:
        form["csrf_token"] = csrf_token(client, "/signup")
    return client.post("/signup", data=form)


def signed_up(client: FlaskClient, username: str = "ada") -> str:
    """Sign up (and stay logged in); the new user's id."""
    assert sign_up(client, username).status_code == 302
    return str(client.get("/credits/balance", headers=JSON_HEADERS).json["user_id"])


def csrf_token(client: FlaskClient, path: str) -> str:
    """The CSRF token of the form on the page at ``path``."""
    page = client.get(path).get_data(as_text=True)
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page)
    assert token is not None
    return token.group(1)


def new_key(response: Any) -> tuple[str, str]:
    """The id and the secret on the "key created" page, the only place the secret is shown."""
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    page = response.get_data(as_text=True)
    key_id = re.search(r'data-testid="key-id">([^<]+)<', page)
    secret = re.search(r'data-testid="secret">([^<]+)<', page)
    assert key_id is not None
    assert secret is not None
    return key_id.group(1), secret.group(1)


def create_key(client: FlaskClient, name: str = "laptop") -> tuple[str, str]:
    """Create an API key for the logged-in user (CSRF protection off); its id and secret."""
    return new_key(client.post("/keys/", data={"name": name}))


def grant(app: Flask, user: str, amount: int, key_id: str | None = None) -> Any:
    """``flask credits grant`` on the example app; the CLI's result."""
    args = ["credits", "grant", user, str(amount), "--reason", "test"]
    return app.test_cli_runner().invoke(args=[*args, "--key", key_id] if key_id else args)


def balance(app: Flask, user: str, key_id: str | None = None) -> int:
    from example_app.extensions import credits

    with app.app_context():
        return int(credits.balance(user, key_id))


# -- fuzzing -------------------------------------------------------------------------------------------


# Runs are derandomized, so failures reproduce. CREDITS_FUZZ_SCALE=10 runs ten times as many cases;
# CREDITS_FUZZ_RANDOM=1 explores new ones on each run. Shrinking a failure to its smallest form can take
# minutes on the server databases (the hostile-input tests name the minimal inputs in tables anyway):
# CREDITS_FUZZ_SHRINK=1 turns it on.
SCALE = float(os.environ.get("CREDITS_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("CREDITS_FUZZ_RANDOM") == "1"
PHASES = tuple(Phase) if os.environ.get("CREDITS_FUZZ_SHRINK") == "1" else (Phase.reuse, Phase.generate)


def fuzz_cases(backend: str, sqlite: int, server: int) -> settings:
    """Hypothesis settings: ``sqlite`` examples there, ``server`` on PostgreSQL and MariaDB."""
    return settings(
        max_examples=max(1, int((sqlite if backend == "sqlite" else server) * SCALE)),
        deadline=None,
        derandomize=not RANDOM,
        database=None,
        print_blob=True,
        phases=PHASES,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=15,
)


# -- the shop: the app the hostile-input tests attack (conftest.py has its fixtures) --------------------

WHSEC = "whsec_hostile_3f9d2b7c1e5a4d6f8b0c"
SECRET_KEY = "sk_test_hostile_7Kq2Xw9Lm4Np8Rt3Vy6Zb1Cd"
PACKS = {"starter": {"credits": 500, "amount": 400}, "bulk": {"credits": 5000, "amount": 3000}}
MAX_QUANTITY = 100
LIMIT = 256 * 1024  # CREDITS_WEBHOOK_MAX_BYTES
BODY_LIMIT = 64 * 1024  # CREDITS_MAX_CONTENT_LENGTH
CHUNK = 64 * 1024  # the most a WSGI server hands the app in one read, in these tests
WEBHOOK = "/credits/stripe-webhook"
CHECKOUT = "/credits/checkout"
JSON_HEADERS = {"Accept": "application/json"}


def fresh_user_per_request(app: Any) -> None:
    """A fixture that holds an app context has every test request share it (and so one ``g``):
    Flask-Login would keep the first user it loaded for every client. Load it per request."""

    @app.before_request
    def load_the_user_of_this_request() -> None:
        g.pop("_login_user", None)


def stripe_signature(payload: str, secret: str = WHSEC, timestamp: int | None = None) -> str:
    return testing.sign(payload, secret, timestamp)


@dataclass
class Shop:
    app: Any
    db: Any
    credits: Any
    stripe: responses.RequestsMock
    paid_session: str = ""
    paid_intent: str = ""
    open_session: str = ""
    open_payload: str = ""  # a valid checkout.session.completed delivery for the open purchase
    paid_event: dict[str, Any] = field(default_factory=dict)  # the delivery that credited alice
    clients: dict[str | None, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)  # the state right after reset()

    def client(self, user: str | None = None) -> Any:
        """A test client logged in as ``user`` (anonymous for None), one per user."""
        if user not in self.clients:
            self.clients[user] = self.app.test_client() if user is None else logged_in(self.app, user)
        return self.clients[user]

    def reset(self) -> None:
        """Empty tables, then alice's paid purchase of 200 credits and bob's open one of 100."""
        clear(self.db)
        self.clients.clear()
        paid = self.checkout("alice", {"quantity": 2})
        self.paid_intent = "pi_hostile_paid"
        with self.app.app_context():
            session = testing.session_for(paid, payment_intent=self.paid_intent)
        self.paid_event = testing.event("checkout.session.completed", session)
        assert testing.post_event(self.client(), self.paid_event).json["outcome"] == "fulfilled"
        self.paid_session = paid
        self.open_session = self.checkout("bob", {"quantity": 1})
        with self.app.app_context():
            session = testing.session_for(self.open_session)
        self.open_payload = json.dumps(testing.event("checkout.session.completed", session))
        self.baseline = self.state()

    def checkout(self, user: str, body: dict[str, Any]) -> str:
        response = self.client(user).post("/credits/checkout", json=body)
        assert response.status_code == 200, response.json
        return str(response.json["id"])

    def state(self) -> dict[str, Any]:
        """Everything a delivery could change: wallets, and how many rows each table holds."""
        t = self.credits.tables
        with self.db.engine.connect() as conn:
            wallets = {
                (r.user_id, r.key_id): (r.balance, r.debt)
                for r in conn.execute(
                    sa.select(t.wallets.c.user_id, t.wallets.c.key_id, t.wallets.c.balance, t.wallets.c.debt)
                )
            }
            purchases = {
                r.session_id: (r.status, r.refund_revoked, r.dispute_revoked)
                for r in conn.execute(sa.select(t.purchases))
            }
            counts = {
                name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
                for name, table in (
                    ("events", t.stripe_events),
                    ("entries", t.entries),
                    ("lots", t.lots),
                    ("draws", t.draws),
                )
            }
        return {"wallets": wallets, "purchases": purchases, **counts}

    def post(self, body: bytes | str, headers: dict[str, str]) -> Any:
        return self.client().post(WEBHOOK, data=body, headers=headers)


def stripe_calls(shop: Shop, method: str = "POST") -> int:
    return len([c for c in shop.stripe.calls if c.request.method == method])


def open_delivery(shop: Shop, **sign: Any) -> tuple[str, dict[str, str]]:
    return shop.open_payload, {"Stripe-Signature": stripe_signature(shop.open_payload, **sign)}


def nothing_changed(shop: Shop, before: dict[str, Any]) -> None:
    assert shop.state() == before
    assert shop.credits.balance("bob") == 0


def signed_delivery(shop: Shop, stripe_event: dict[str, Any]) -> Any:
    return testing.post_event(shop.client(), stripe_event)


def newest_purchase(shop: Shop) -> tuple[Any, ...]:
    t = shop.credits.tables
    with shop.db.engine.connect() as conn:
        row = conn.execute(
            sa.select(t.purchases.c.credits, t.purchases.c.amount, t.wallets.c.user_id, t.wallets.c.key_id)
            .join(t.wallets, t.wallets.c.id == t.purchases.c.wallet_id)
            .order_by(t.purchases.c.id.desc())
            .limit(1)
        ).one()
    return row.credits, row.amount, row.user_id, row.key_id or None


# -- request bodies handed to the app piece by piece --------------------------------------------------


class Padded(io.RawIOBase):
    """A request body of ``size`` bytes, ``prefix`` then ``filler`` repeated, made up as it is read and
    handed out at most ``CHUNK`` bytes per read, as a WSGI server hands the app a chunked body."""

    def __init__(self, size: int, prefix: bytes = b"", filler: bytes = b" ") -> None:
        self.size, self.prefix, self.filler, self.position = size, prefix, filler, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), CHUNK, self.size - self.position)
        head = self.prefix[self.position : self.position + n]
        buffer[:n] = head + self.filler * (n - len(head))
        self.position += n
        return n


class Counted(io.RawIOBase):
    """A WSGI input that counts the bytes the app pulls from the stream it wraps."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.pulled = stream, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = int(self.stream.readinto(buffer) or 0)
        self.pulled += n
        return n


def send(client: Any, path: str, body: Counted, headers: dict[str, str], length: int | None = None) -> Any:
    """POST ``body`` chunked (as gunicorn and the dev server present it: no length, and
    ``wsgi.input_terminated``), or with the ``Content-Length`` given."""
    environ: dict[str, Any] = {"wsgi.input": body, "wsgi.input_terminated": True}
    if length is None:
        headers = {**headers, "Transfer-Encoding": "chunked"}
    else:
        environ["CONTENT_LENGTH"] = str(length)
    if "Content-Type" in headers:  # as given: the test client would make up its own multipart boundary
        environ["CONTENT_TYPE"] = headers["Content-Type"]
    return client.post(path, headers=headers, environ_overrides=environ)


TOO_LARGE = {"error": "bad_request", "message": "body too large"}
FORM = "application/x-www-form-urlencoded"
