"""The app every benchmark uses: Flask-SQLAlchemy, FlaskCredits, and two trivial views.

``POST /free`` and ``POST /paid`` have the same body; ``/paid`` is decorated with
``@requires_credits(1)``. The wallet is the ``X-Wallet`` header (a ``wallet_loader``), so no session
cookie or Flask-Login user lookup is part of either request.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy

from flask_credits import FlaskCredits, requires_credits

WEBHOOK_SECRET = "whsec_bench_not_a_real_secret"  # noqa: S105 - a fixture, not a secret
STRIPE_KEY = "sk_test_bench_not_a_real_key"
BIG = 10**12  # credits granted to every benchmark wallet: never runs out


def engine_options(url: str, pool_size: int) -> dict[str, Any]:
    """No ``pool_pre_ping`` (it would add a round trip per checkout); a pool big enough for the load."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 30}, "pool_size": pool_size, "max_overflow": 4}
    return {"pool_size": pool_size, "max_overflow": 4}


def build_app(url: str, *, pool_size: int = 10, **config: Any) -> tuple[Flask, SQLAlchemy, FlaskCredits]:
    app = Flask("bench")
    app.config.update(
        SECRET_KEY="bench",  # noqa: S106 - no sessions are used
        SQLALCHEMY_DATABASE_URI=url,
        SQLALCHEMY_ENGINE_OPTIONS=engine_options(url, pool_size),
        STRIPE_SECRET_KEY=STRIPE_KEY,
        STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET,
        CREDITS_STRIPE_MAX_RETRIES=0,
        # The webhook section starts 1000 checkouts for 50 buyers, none finished: above the default cap
        # on unfinished checkouts per wallet (5), which would answer 429.
        CREDITS_MAX_OPEN_PURCHASES=1000,
        **config,
    )
    db = SQLAlchemy(app)
    credits = FlaskCredits(app)

    @credits.wallet_loader
    def wallet_from_header() -> tuple[str, None] | None:
        user = request.headers.get("X-Wallet")
        return None if user is None else (user, None)

    def ok() -> str:
        return "ok"

    app.add_url_rule("/free", "free", ok, methods=["POST"])
    app.add_url_rule("/paid", "paid", requires_credits(1)(ok), methods=["POST"])
    return app, db, credits
