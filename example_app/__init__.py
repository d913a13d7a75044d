"""An example app for flask_credits: sign up, buy credits, spend them generating personas.

    flask --app example_app db upgrade      # create the tables (SQLite in instance/ by default)
    flask --app example_app run --debug

Environment: ``DATABASE_URL`` (e.g. ``postgresql+psycopg://user@host/db``; SQLite in the instance folder
when unset), ``SECRET_KEY``, ``CREDITS_STRIPE_MODE`` ("simulated" by default in debug and testing: an
offline checkout, no Stripe account needed, and two plans, Starter and Pro; "live" otherwise, with the
``STRIPE_*`` keys), ``RATELIMIT_STORAGE_URI`` (the login throttle's counts, e.g.
``redis://127.0.0.1:6379``; in memory in debug and testing), ``SESSION_COOKIE_SECURE`` (on outside
debug and testing: "0" for plain HTTP), and ``PROXY_FIX_X_FOR`` and friends (see
:mod:`example_app.deployment`).

Outside debug and testing the app refuses to serve requests (under gunicorn or ``flask run``) without a
real ``SECRET_KEY``, Stripe keys in live mode and a shared ``RATELIMIT_STORAGE_URI``; other ``flask``
commands (``db upgrade``, ``credits expire``) run without them.

Config keys of its own: ``PERSONA_COST`` (credits per persona, default 5), ``STORY_HOLD`` (credits
reserved before a story starts streaming, default 10; the hold grows while the story runs past it),
``STORY_WORDS_PER_CREDIT`` (a story is charged one credit per this many words streamed, a shorter last
chunk counting whole, default 10), ``STORY_CHUNK_DELAY`` (seconds between two chunks of a story, the
pace of a language model, default 0.05; 0 in testing), ``LOW_BALANCE_THRESHOLD`` (warn when a debit
takes the balance below this, default 10; it sets ``CREDITS_LOW_BALANCE``), ``LOGIN_LIMIT_PER_IP`` and
``LOGIN_LIMIT_PER_USERNAME`` (posts of the login or sign-up form, flask-limiter notation, default "10 per
minute" and "5 per minute"), ``ADMIN_USERNAMES`` (the users, comma-separated, who may use the credits
admin console at ``/credits/admin``; nobody by default); Flask's ``MAX_CONTENT_LENGTH`` is 1 MiB (a
larger body gets 413, chunked or not). The packs on the credits page are :data:`PACKS` unless
``CREDITS_PACKS`` is set.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask, abort, request
from flask.typing import ResponseReturnValue

from flask_credits import CreditsUnavailable, SafeJSONProvider, read_body

from . import auth, deployment, errors, keys, notifications, views
from .deployment import DATABASE_UNAVAILABLE
from .extensions import credits, csrf, limiter, login_manager, migrate
from .models import db

#: The top-level ``migrations/`` folder of this repository, whatever the working directory.
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
#: Read from the environment variable of the same name when set (``config`` still overrides them).
FROM_ENVIRONMENT = (
    "SECRET_KEY",
    "RATELIMIT_STORAGE_URI",
    "LOGIN_LIMIT_PER_IP",
    "LOGIN_LIMIT_PER_USERNAME",
    "CONTENT_SECURITY_POLICY",
    "ADMIN_USERNAMES",
    *(f"PROXY_FIX_{name.upper()}" for name in deployment.PROXY_FIX_KEYS),
)
#: The packs on the credits page, priced in CREDITS_CURRENCY (cents): an ``amount`` rather than a Stripe
#: Price, so they sell in either mode without setting up Prices, and auto top-up can buy them.
PACKS = {
    "small": {"credits": 500, "amount": 500, "name": "Small"},
    "large": {"credits": 2000, "amount": 1800, "name": "Large"},
}
#: The plans offered with the simulated Stripe (its made-up Price ids).
SIMULATED_PLANS = {
    "starter": {"price": "price_sim_starter", "credits": 500, "name": "Starter"},
    "pro": {"price": "price_sim_pro", "credits": 2000, "name": "Pro"},
}


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app; ``config`` overrides the defaults and the environment (tests use it)."""
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_mapping(
        SQLALCHEMY_DATABASE_URI=database_url(os.environ.get("DATABASE_URL")),
        SESSION_COOKIE_SAMESITE="Lax",
        PERSONA_COST=5,
        STORY_HOLD=10,
        STORY_WORDS_PER_CREDIT=10,
        STORY_CHUNK_DELAY=0.05,
        LOW_BALANCE_THRESHOLD=10,
        # The largest legitimate body here is a small form or a JSON seed; see bound_the_body.
        MAX_CONTENT_LENGTH=1024 * 1024,
        LOGIN_LIMIT_PER_IP="10 per minute",
        LOGIN_LIMIT_PER_USERNAME="5 per minute",
        # Who may use the credits admin console at /credits/admin (auth.credits_admin): user names,
        # a list or comma-separated (the environment variable). Nobody by default.
        ADMIN_USERNAMES=(),
        CREDITS_ADMIN=True,
    )
    app.config.from_mapping({name: os.environ[name] for name in FROM_ENVIRONMENT if os.environ.get(name)})
    app.config.update(config or {})
    app.config.setdefault("CREDITS_PACKS", PACKS)
    # The low-balance warning (notifications.warn_when_low) is flask_credits' credits_low signal.
    app.config.setdefault("CREDITS_LOW_BALANCE", app.config["LOW_BALANCE_THRESHOLD"])
    development = app.debug or app.testing
    if app.testing and "STORY_CHUNK_DELAY" not in (config or {}):
        app.config["STORY_CHUNK_DELAY"] = 0  # tests wait for nothing
    secure = os.environ.get("SESSION_COOKIE_SECURE")
    if "SESSION_COOKIE_SECURE" not in (config or {}):
        # Production is served over HTTPS: the session cookie never travels in clear text.
        app.config["SESSION_COOKIE_SECURE"] = secure.lower() in ("1", "true") if secure else not development
    # flask_credits refuses the simulated Stripe outside debug and testing, so that a deployed app
    # cannot fake payments: simulated under `flask run --debug` and in tests, live otherwise (which
    # also lets `flask db upgrade` and `flask credits ...` run without --debug).
    app.config.setdefault(
        "CREDITS_STRIPE_MODE",
        os.environ.get("CREDITS_STRIPE_MODE") or ("simulated" if app.debug or app.testing else "live"),
    )
    if app.config["CREDITS_STRIPE_MODE"] == "simulated":
        # A plan needs a recurring Price in a Stripe account; the simulated Stripe makes these up
        # (charging what the credits cost one-off). A live deployment configures its own plans.
        app.config.setdefault("CREDITS_PLANS", SIMULATED_PLANS)
    serving = not development and deployment.serving()
    if not serving:
        # Debug and testing; or a CLI command (flask db upgrade, flask credits ...), where no cookie it
        # signs reaches a browser and no request is throttled.
        app.config["SECRET_KEY"] = app.config["SECRET_KEY"] or (
            deployment.DEVELOPMENT_SECRET_KEY if development else secrets.token_hex(32)
        )
        app.config.setdefault("RATELIMIT_STORAGE_URI", "memory://")
    deployment.proxy_fix(app)
    if not app.config["SQLALCHEMY_DATABASE_URI"]:
        os.makedirs(app.instance_path, exist_ok=True)
        app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{Path(app.instance_path) / 'example.sqlite3'}"

    # A document nested too deep is a 400 from request.get_json, not a RecursionError (a 500).
    app.json = SafeJSONProvider(app)

    # Registered before any extension's hook (Flask-WTF's CSRFProtect reads request.form in its own),
    # so that no body is read past MAX_CONTENT_LENGTH, chunked or not: Werkzeug alone would cut a
    # chunked body at the limit and carry on with what it read.
    @app.before_request
    def bound_the_body() -> None:
        """Every body read whole before anything looks at it: 413 past ``MAX_CONTENT_LENGTH``."""
        read_body(app.config["MAX_CONTENT_LENGTH"])

    db.init_app(app)
    # The schema comes from migrations/ (flask db upgrade), never from db.create_all().
    migrate.init_app(app, db, directory=str(MIGRATIONS))
    login_manager.init_app(app)
    csrf.init_app(app)
    credits.init_app(app)  # after db.init_app: the credits tables live in this app's database
    if serving:  # after credits.init_app, which reads the Stripe keys from the environment too
        deployment.check_serving_config(app)
    limiter.init_app(app)
    notifications.connect(app)

    def database_unavailable(exc: Exception) -> ResponseReturnValue:
        """The database cannot answer this app's own queries (the API key or user lookup comes first in
        most requests): the same 503 with Retry-After as flask_credits gives, not a bare 500."""
        app.logger.warning(
            "database unavailable: %s", type(exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc).__name__
        )
        return CreditsUnavailable().get_response()

    for error in DATABASE_UNAVAILABLE:
        app.register_error_handler(error, database_unavailable)

    @app.teardown_appcontext
    def release_session(exc: BaseException | None) -> None:
        """Runs before Flask-SQLAlchemy's own teardown. Rolling back a connection the database already
        dropped raises, and raised there it would replace the finished response with a bare 500:
        discard such a connection instead (the server rolled its transaction back when it went)."""
        try:
            db.session.remove()
        except DATABASE_UNAVAILABLE:
            db.session().invalidate()
            db.session.remove()

    @app.before_request
    def refuse_nul_bytes() -> None:
        """No text field of this app may hold a NUL byte (PostgreSQL cannot store one): 400."""
        values = [request.path, *request.args.values(), *request.form.values()]
        if any("\x00" in value for value in values):
            abort(400, "NUL bytes are not allowed in input")

    app.register_blueprint(auth.bp)
    app.register_blueprint(views.main)
    app.register_blueprint(views.api)
    app.register_blueprint(keys.bp)
    deployment.install(app)
    errors.install(app)
    return app


def database_url(url: str | None) -> str | None:
    """``DATABASE_URL`` with the drivers this project installs (psycopg 3, PyMySQL) made explicit, since
    hosting services hand out ``postgres://`` and ``mysql://`` URLs."""
    if not url:
        return None
    scheme, sep, rest = url.partition("://")
    drivers = {"postgres": "postgresql+psycopg", "postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql"}
    return f"{drivers.get(scheme, scheme)}{sep}{rest}"
