"""The simulated (offline) Stripe: the whole purchase flow through the real webhook code, no network."""

from __future__ import annotations

import re

import pytest
import responses
import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from helpers import logged_in

from flask_credits import FlaskCredits

HTML = {"Accept": "text/html"}


@pytest.fixture
def credits_config():
    return {"CREDITS_STRIPE_MODE": "simulated", "STRIPE_WEBHOOK_SECRET": None, "STRIPE_SECRET_KEY": None}


@pytest.fixture(autouse=True)
def no_network():
    # Any HTTP call would fail the test: the simulated mode must not reach Stripe.
    with responses.RequestsMock() as rsps:
        yield rsps


def start(client, **data):
    response = client.post("/credits/checkout", data=data or {"quantity": "2"}, headers=HTML)
    assert response.status_code == 303
    location = response.headers["Location"]
    assert "/credits/simulated-checkout/cs_sim_" in location
    return location.split("://", 1)[-1].split("/", 1)[-1]


def choose(client, page, action):
    return client.post("/" + page, data={"action": action}, headers=HTML)


def test_pay_credits_the_wallet_through_the_signed_webhook(client, login, credits, received):
    login("alice")
    page = start(client)
    shown = client.get("/" + page, headers=HTML).get_data(as_text=True)
    assert "200 credits for <strong>2.00 USD</strong>" in shown
    done = choose(client, page, "pay")
    assert done.status_code == 303
    result = client.get(done.headers["Location"], headers=HTML).get_data(as_text=True)
    assert "200 credits were added" in result
    assert credits.balance("alice") == 200
    t = credits.tables.stripe_events
    with credits.db.engine.connect() as conn:
        assert conn.execute(sa.select(t.c.type, t.c.outcome)).all() == [
            ("checkout.session.completed", "processed")
        ]
    assert [n for n, _, _ in received].count("credits_purchased") == 1
    assert choose(client, page, "pay").status_code == 400  # paying twice is refused
    assert credits.balance("alice") == 200


def test_pay_later_is_pending_until_the_delayed_payment_settles(client, login, credits):
    login("alice")
    page = start(client)
    done = choose(client, page, "pay_later")
    pending = client.get(done.headers["Location"], headers=HTML).get_data(as_text=True)
    assert "Payment pending" in pending
    assert credits.balance("alice") == 0
    choose(client, page, "settle")
    assert credits.balance("alice") == 200


def test_the_credits_page_lists_a_pay_later_purchase_and_resumes_an_open_one(client, login, credits):
    login("alice")
    later = start(client)
    choose(client, later, "pay_later")
    open_page = start(client, quantity="1")
    shown = client.get("/credits/", headers=HTML).get_data(as_text=True)
    assert "Waiting for the payment" in shown
    (resume,) = re.findall(r'href="([^"]*/credits/resume[^"]*)"', shown)
    response = client.get(resume, headers=HTML)
    assert response.status_code == 303
    assert response.headers["Location"].endswith("/" + open_page)
    choose(client, later, "settle")
    choose(client, open_page, "pay")
    assert credits.balance("alice") == 300
    shown = client.get("/credits/", headers=HTML).get_data(as_text=True)
    assert "Unfinished purchases" not in shown
    assert client.get(resume).status_code == 409


@pytest.mark.parametrize("first", [None, "pay_later"])
def test_fail_credits_nothing_and_says_so(client, login, credits, first):
    login("alice")
    page = start(client)
    if first:
        choose(client, page, first)
    done = choose(client, page, "fail")
    assert "Payment failed" in client.get(done.headers["Location"], headers=HTML).get_data(as_text=True)
    assert credits.balance("alice") == 0


def test_cancel_goes_to_the_cancel_page_which_expires_the_checkout(client, login, credits):
    login("alice")
    page = start(client)
    done = choose(client, page, "cancel")
    assert "/credits/cancel?attempt=chk_" in done.headers["Location"]
    cancelled = client.get(done.headers["Location"], headers=HTML)
    assert "Nothing was charged" in cancelled.get_data(as_text=True)
    # As Stripe would, the simulated Stripe expired the session and sent checkout.session.expired.
    t = credits.tables
    with credits.db.engine.connect() as conn:
        assert conn.execute(sa.select(t.purchases.c.status)).scalar_one() == "expired"
        assert conn.execute(sa.select(t.stripe_events.c.type, t.stripe_events.c.outcome)).all() == [
            ("checkout.session.expired", "processed")
        ]
    assert "This checkout expired." in client.get("/" + page, headers=HTML).get_data(as_text=True)
    assert credits.balance("alice") == 0


@pytest.mark.config(CREDITS_SITE_URL="https://shop.example.com")
def test_the_simulated_checkout_url_is_on_the_configured_origin(client, login):
    login("alice")
    response = client.post(
        "/credits/checkout", data={"quantity": "1"}, headers={**HTML, "Host": "evil.example"}
    )
    assert response.headers["Location"].startswith("https://shop.example.com/credits/simulated-checkout/")


def test_another_user_cannot_see_or_pay_someone_elses_checkout(client, login, credits):
    login("alice")
    page = start(client)
    login("bob")
    assert client.get("/" + page).status_code == 404
    assert choose(client, page, "pay").status_code == 404
    assert credits.balance("alice") == 0


def test_success_page_rechecks_the_simulated_session(client, login, credits):
    login("alice")
    page = start(client)
    session_id = page.rsplit("/", 1)[-1]
    assert client.get(f"/credits/success?session_id={session_id}").json["purchase"]["status"] == "open"
    assert credits.balance("alice") == 0


def test_simulated_pages_do_not_exist_in_live_mode(client, login, build_app):
    login("alice")
    page = start(client)
    assert client.get("/" + page).status_code == 200
    # The same shop and database in live mode: alice's checkout page is not there, nor its buttons.
    live, _, _ = build_app(CREDITS_STRIPE_MODE="live")
    alice_live = logged_in(live)
    assert alice_live.get("/" + page).status_code == 404
    assert choose(alice_live, page, "pay").status_code == 404


def test_simulated_mode_is_refused_outside_debug_and_testing(tmp_path):
    app = Flask("production")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/p.sqlite3", CREDITS_STRIPE_MODE="simulated"
    )
    SQLAlchemy(app)
    with pytest.raises(RuntimeError, match="only when the app runs in debug or testing mode"):
        FlaskCredits(app)


def test_unknown_stripe_mode_is_refused(tmp_path):
    app = Flask("typo")
    app.config.update(SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/p.sqlite3", CREDITS_STRIPE_MODE="test")
    SQLAlchemy(app)
    with pytest.raises(RuntimeError, match="CREDITS_STRIPE_MODE"):
        FlaskCredits(app)


def test_reconcile_finds_the_simulated_stripe_in_step_with_its_rows(app, client, login, credits, received):
    login("alice")
    choose(client, start(client), "pay")
    start(client, quantity="3")  # left open
    result = app.test_cli_runner().invoke(args=["credits", "reconcile", "--since", "1h"])
    assert result.exit_code == 0, result.output
    assert "checked 2 checkout sessions" in result.output
    assert "fixed 0; 1 in step, 1 still open" in result.output
    assert credits.balance("alice") == 200
    assert "purchase_reconciled" not in [n for n, _, _ in received]
