"""An example app for flask_credits: sign up, buy credits, spend them generating personas.

    flask --app example_app db upgrade      # create the tables (SQLite in instance/ by default)
    flask --app example_app run --debug

Environment: ``DATABASE_URL`` (e.g. ``postgresql+psycopg://user@host/db``; SQLite in the instance folder
when unset), ``SECRET_KEY`` (set it anywhere but on your own machine), ``CREDITS_STRIPE_MODE``
("simulated" by default in debug and testing: an offline checkout, no Stripe account needed; "live"
otherwise, with the ``STRIPE_*`` keys). Config keys of its own: ``PERSONA_COST`` (credits per
persona, default 5) and ``LOW_BALANCE_THRESHOLD`` (warn below this balance, default 10); Flask's
``MAX_CONTENT_LENGTH`` is 1 MiB (a larger body gets 413, chunked or not).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from flask import Flask, abort, request
from flask.typing import ResponseReturnValue

from flask_credits import CreditsUnavailable, SafeJSONProvider, read_body

from . import auth, keys, notifications, views
from .extensions import credits, csrf, login_manager, migrate
from .models import db

#: The top-level ``migrations/`` folder of this repository, whatever the working directory.
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
#: The database cannot be reached or gave up (connection refused or dropped, lock wait timeout, pool
#: exhausted): the request may succeed if tried again.
DATABASE_UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app; ``config`` overrides the defaults and the environment (tests use it)."""
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_mapping(
        SECRET_KEY=os.environ.get("SECRET_KEY", "dev-only-secret-key-change-me"),
        SQLALCHEMY_DATABASE_URI=database_url(os.environ.get("DATABASE_URL")),
        SESSION_COOKIE_SAMESITE="Lax",
        PERSONA_COST=5,
        LOW_BALANCE_THRESHOLD=10,
        # The largest legitimate body here is a small form or a JSON seed; see bound_the_body.
        MAX_CONTENT_LENGTH=1024 * 1024,
    )
    app.config.update(config or {})
    # flask_credits refuses the simulated Stripe outside debug and testing, so that a deployed app
    # cannot fake payments: simulated under `flask run --debug` and in tests, live otherwise (which
    # also lets `flask db upgrade` and `flask credits ...` run without --debug).
    app.config.setdefault(
        "CREDITS_STRIPE_MODE",
        os.environ.get("CREDITS_STRIPE_MODE") or ("simulated" if app.debug or app.testing else "live"),
    )
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
    return app


def database_url(url: str | None) -> str | None:
    """``DATABASE_URL`` with the drivers this project installs (psycopg 3, PyMySQL) made explicit, since
    hosting services hand out ``postgres://`` and ``mysql://`` URLs."""
    if not url:
        return None
    scheme, sep, rest = url.partition("://")
    drivers = {"postgres": "postgresql+psycopg", "postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql"}
    return f"{drivers.get(scheme, scheme)}{sep}{rest}"
