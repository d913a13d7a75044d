"""A database that cannot be reached: every path answers 503 with ``Retry-After`` and writes nothing.

Each case points the app at a real database address that refuses connections (a closed port on
127.0.0.1, a SQLite file in a folder that does not exist), so the errors are the drivers' own. The
load and fault tests (tests/test_faults.py) cut a working database mid-run; this file pins down the
answer of each route.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient
from helpers import UNREACHABLE, logged_in, make_app

from flask_credits import CreditsUnavailable, requires_credits, testing


@pytest.fixture(params=sorted(UNREACHABLE))
def app(request: pytest.FixtureRequest) -> Iterator[Flask]:
    app, db, _ = make_app(
        UNREACHABLE[request.param],
        STRIPE_SECRET_KEY="sk_test_unavailable",
        STRIPE_WEBHOOK_SECRET="whsec_test_unavailable",
        CREDITS_PACKS={"starter": {"credits": 500, "amount": 400}},
        CREDITS_STRIPE_MAX_RETRIES=0,
    )

    @app.post("/paid")
    @requires_credits(1)
    def paid() -> str:
        raise AssertionError("the view must not run without a debit")

    yield app
    with app.app_context():
        db.engine.dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return logged_in(app)


def assert_503(response, *, json: bool = True) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == 503, response.get_data(as_text=True)
    assert response.headers["Retry-After"] == "5"
    assert response.headers["Cache-Control"] == "no-store"
    if json:
        assert response.json["error"] == "temporarily_unavailable"
    else:
        assert "temporarily unavailable" in response.get_data(as_text=True)


def test_ledger_calls_raise_credits_unavailable_with_the_driver_error_chained(app):
    credits = app.extensions["credits"]
    with app.app_context():
        for call in (
            lambda: credits.balance("alice"),
            lambda: credits.spend("alice", 1, reason="test"),
            lambda: credits.grant("alice", 1, reason="test"),
            lambda: credits.history("alice"),
        ):
            with pytest.raises(CreditsUnavailable) as caught:
                call()
            assert caught.value.__cause__ is not None


def test_a_decorated_view_answers_503_and_does_not_run(client):
    assert_503(client.post("/paid", headers={"Accept": "application/json"}))
    assert_503(client.post("/paid", headers={"Accept": "text/html"}), json=False)


def test_the_blueprints_routes_answer_503(client):
    assert_503(client.get("/credits/balance"))
    assert_503(client.get("/credits/transactions"))
    assert_503(client.get("/credits/", headers={"Accept": "text/html"}), json=False)
    checkout = client.post("/credits/checkout", json={"pack": "starter"})
    assert_503(checkout)


def test_a_signed_webhook_answers_503_so_stripe_retries_it(client):
    event = testing.event("checkout.session.completed", testing.checkout_session(amount_total=400))
    response = testing.post_event(client, event)
    assert response.status_code == 503
    assert response.json["error"] == "temporarily_unavailable"
