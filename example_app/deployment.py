"""What the example app needs to be served on the internet: the config it refuses to serve without,
security headers, ``ProxyFix`` behind a reverse proxy, the 429 page of the login throttle, and a health
check for load balancers.

Config keys (each also read from the environment variable of the same name by :func:`example_app.create_app`):

* ``SECRET_KEY``: required when serving outside debug and testing (it signs the session cookie: with a
  known key anyone could log in as anyone and spend their credits);
* ``STRIPE_SECRET_KEY`` and ``STRIPE_WEBHOOK_SECRET``: required when serving in live Stripe mode;
* ``RATELIMIT_STORAGE_URI``: required when serving outside debug and testing, e.g. ``redis://127.0.0.1:6379``
  (in-memory counts are per process, so N workers would allow N times the limit);
* ``PROXY_FIX_X_FOR``, ``PROXY_FIX_X_PROTO``, ``PROXY_FIX_X_HOST``, ``PROXY_FIX_X_PORT``,
  ``PROXY_FIX_X_PREFIX``: how many proxies in front of the app set each ``X-Forwarded-*`` header (0, the
  default, trusts none);
* ``CONTENT_SECURITY_POLICY``: the ``Content-Security-Policy`` header (:data:`CONTENT_SECURITY_POLICY`).
"""

from __future__ import annotations

import base64
import hashlib

import click
import sqlalchemy as sa
from flask import Blueprint, Flask, jsonify, render_template, request
from flask.typing import ResponseReturnValue
from flask_limiter import RateLimitExceeded
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.wrappers import Response

from .extensions import limiter
from .models import db

#: The database cannot be reached or gave up (connection refused or dropped, lock wait timeout, pool
#: exhausted): the request may succeed if tried again.
DATABASE_UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)
#: The key of ``flask run`` on a developer's machine; never accepted when serving outside debug and testing.
DEVELOPMENT_SECRET_KEY = "dev-only-secret-key-change-me"
#: The inline event handlers of the templates, allowed by hash: flask_credits' purchase button disables
#: itself while the checkout request is in flight (credits/macros.html).
INLINE_HANDLERS = ("var b=this.querySelector('button');b.disabled=true;b.textContent=b.dataset.busy;",)
#: Only this site's own files; forms post here, or to Stripe's hosted checkout (browsers apply
#: form-action to the redirect after the POST); no framing, no plugins, no <base>.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' 'unsafe-hashes' "
        + " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(handler.encode()).digest()).decode()}'"
            for handler in INLINE_HANDLERS
        ),
        "style-src 'self'",
        "img-src 'self' data:",
        "form-action 'self' https://checkout.stripe.com",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "object-src 'none'",
    ]
)
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate CSP 2
    "X-Content-Type-Options": "nosniff",
    # Checkout return URLs carry Stripe session ids: never send them to another site.
    "Referrer-Policy": "same-origin",
}
HSTS = "max-age=31536000"
PROXY_FIX_KEYS = ("x_for", "x_proto", "x_host", "x_port", "x_prefix")

bp = Blueprint("deployment", __name__)


def serving() -> bool:
    """Whether this process is about to answer requests: under a WSGI server (gunicorn imports the app
    with no click command running) or ``flask run``. Other ``flask`` commands (``db upgrade``,
    ``credits expire``, ``shell``) sign no cookie and take no payment, so they run without the keys."""
    command = click.get_current_context(silent=True)
    return command is None or command.info_name == "run"


def check_serving_config(app: Flask) -> None:
    """Refuse to serve outside debug and testing with a guessable ``SECRET_KEY``, without Stripe keys in
    live mode, or with per-process rate-limit counts: a ``RuntimeError`` that says what to set."""
    config = app.config
    key = config.get("SECRET_KEY")
    if not key or key == DEVELOPMENT_SECRET_KEY or len(str(key)) < 16:
        raise RuntimeError(
            "Set SECRET_KEY to a random value (python -c 'import secrets; print(secrets.token_hex(32))'):"
            " outside debug and testing the app serves no request with a missing or development key, since"
            " anyone who knows the key can forge a session and spend another user's credits."
        )
    if config["CREDITS_STRIPE_MODE"] == "live":
        missing = [name for name in ("STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET") if not config.get(name)]
        if missing:
            raise RuntimeError(
                f"Set {' and '.join(missing)} (from the Stripe dashboard: API keys, and the webhook endpoint "
                "for /credits/webhook): the app serves the live Stripe checkout outside debug and testing. "
                'CREDITS_STRIPE_MODE="simulated" (no keys) is allowed only with --debug or in tests.'
            )
    storage = str(config.get("RATELIMIT_STORAGE_URI") or "")
    if not storage or storage.startswith("memory://"):
        raise RuntimeError(
            "Set RATELIMIT_STORAGE_URI to a shared store for the login throttle, "
            "e.g. redis://127.0.0.1:6379: in-memory counts are per worker process, "
            "so each worker would allow the whole limit again."
        )


def proxy_fix(app: Flask) -> None:
    """Trust ``X-Forwarded-*`` from as many proxies as ``PROXY_FIX_X_*`` say (none by default: a client
    talking to the app directly could otherwise pick its own IP address, and with it a fresh login
    throttle, or claim HTTPS)."""
    counts = {}
    for name in PROXY_FIX_KEYS:
        key = f"PROXY_FIX_{name.upper()}"
        value = str(app.config.get(key) or 0).strip()
        if not value.isdigit():
            raise RuntimeError(f"{key} must be how many proxies set the header (0 or more), not {value!r}")
        counts[name] = int(value)
    if any(counts.values()):
        app.wsgi_app = ProxyFix(app.wsgi_app, **counts)  # type: ignore[method-assign]


def install(app: Flask) -> None:
    """Security headers on every response, the 429 page and the health check."""
    policy = app.config.get("CONTENT_SECURITY_POLICY") or CONTENT_SECURITY_POLICY

    @app.after_request
    def security_headers(response: Response) -> Response:
        response.headers.setdefault("Content-Security-Policy", policy)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.is_secure:
            response.headers.setdefault("Strict-Transport-Security", HSTS)
        return response

    @app.errorhandler(RateLimitExceeded)
    def too_many_requests(error: RateLimitExceeded) -> ResponseReturnValue:
        """The login and sign-up throttle (flask-limiter): a page that says when to try again."""
        return render_template("too_many_requests.html"), 429

    app.register_blueprint(bp)


@bp.get("/healthz")
@limiter.exempt
def healthz() -> ResponseReturnValue:
    """For load balancers: 200 once the database answers ``SELECT 1``, 503 when it cannot. No login, no
    session (nothing here reads or writes one), no throttle."""
    try:
        db.session.execute(sa.text("SELECT 1"))
    except DATABASE_UNAVAILABLE:
        response = jsonify(status="unavailable")
        response.status_code = 503
    else:
        response = jsonify(status="ok")
    response.headers["Cache-Control"] = "no-store"
    return response
