"""Unfinished purchases on the credits page: listed with their state, resumed (``/credits/resume``,
which asks Stripe for the session's url only when clicked) or cancelled, by their buyer alone."""

from __future__ import annotations

import re
from html import unescape

import pytest
import sqlalchemy as sa

from flask_credits import testing

HTML = {"Accept": "text/html"}


@pytest.fixture
def credits_config():
    return {
        "STRIPE_SECRET_KEY": "sk_test_pending",
        "STRIPE_WEBHOOK_SECRET": "whsec_test_pending",
        "CREDITS_STRIPE_MAX_RETRIES": 0,
        "SERVER_NAME": "shop.test",
    }


def start(client, stripe, session_id, **data):
    testing.mock_create_session(stripe, session_id)
    assert client.post("/credits/checkout", json=data or {"quantity": 2}).status_code == 200


def page(client):
    response = client.get("/credits/", headers=HTML)
    assert response.status_code == 200
    return response.get_data(as_text=True)


def pending_rows(client):
    """Each listed unfinished purchase: (its row's text, its resume link, its cancel form's attempt)."""
    rows = []
    for row in re.findall(r'<tr data-testid="pending-\d+">(.*?)</tr>', page(client), re.S):
        resume = re.search(r'href="([^"]*/credits/resume[^"]*)"', row)
        attempt = re.search(r'name="attempt" value="([^"]+)"', row)
        text = " ".join(re.sub(r"<[^>]+>", " ", row).split())
        rows.append(
            (text, unescape(resume.group(1)) if resume else None, attempt.group(1) if attempt else None)
        )
    return rows


def stripe_calls(stripe, method, suffix=""):
    return [
        c
        for c in stripe.calls
        if c.request.method == method
        and "/checkout/sessions/" in c.request.url
        and c.request.url.endswith(suffix)
    ]


def attempt_of(credits, session_id):
    p = credits.tables.purchases
    with credits.db.engine.connect() as conn:
        return conn.execute(sa.select(p.c.attempt_key).where(p.c.session_id == session_id)).scalar_one()


def test_open_and_pay_later_purchases_are_listed_with_their_state(app, client, login, credits, stripe, clock):
    login("alice")
    assert "Unfinished purchases" not in page(client)
    start(client, stripe, "cs_test_open")
    clock.advance(minutes=5)
    start(client, stripe, "cs_test_later", quantity=3)
    with app.app_context():
        later = testing.session_for("cs_test_later", payment_status="unpaid")
    assert testing.post_event(client, testing.event("checkout.session.completed", later)).json["outcome"] == (
        "awaiting_payment"
    )
    (waiting, waiting_resume, waiting_attempt), (shown, resume, attempt) = pending_rows(client)
    assert waiting == (
        "2030-01-01 12:05 your account 300 3.00 USD Waiting for the payment:"
        " the credits are added once it goes through."
    )
    assert (waiting_resume, waiting_attempt) == (None, None)
    assert shown == "2030-01-01 12:00 your account 200 2.00 USD Not paid yet: Resume Cancel"
    assert attempt == attempt_of(credits, "cs_test_open")
    assert resume == f"/credits/resume?attempt={attempt}"
    # Listing them asks Stripe nothing.
    assert stripe_calls(stripe, "GET") == []


def test_resume_sends_the_buyer_back_to_the_open_checkout_asking_stripe_once(client, login, credits, stripe):
    login("alice")
    start(client, stripe, "cs_test_resume")
    testing.mock_retrieve_session(
        stripe,
        testing.checkout_session("cs_test_resume", amount_total=200, payment_status="unpaid", status="open"),
    )
    ((_, resume, _),) = pending_rows(client)
    response = client.get(resume, headers=HTML)
    assert response.status_code == 303
    assert response.headers["Location"] == "https://checkout.stripe.com/c/pay/cs_test_resume"
    assert client.get(resume).json == {"url": "https://checkout.stripe.com/c/pay/cs_test_resume"}
    assert len(stripe_calls(stripe, "GET")) == 2  # once per click, never for the page


def test_resuming_a_checkout_stripe_no_longer_has_open_says_so(client, login, credits, stripe):
    login("alice")
    start(client, stripe, "cs_test_gone")
    testing.mock_retrieve_session(
        stripe, testing.checkout_session("cs_test_gone", amount_total=200, status="expired")
    )
    ((_, resume, _),) = pending_rows(client)
    response = client.get(resume, headers=HTML)
    assert response.status_code == 409
    assert "That checkout is no longer open" in response.get_data(as_text=True)
    assert client.get(resume).json["error"] == "checkout_not_open"


def test_cancel_from_the_list_expires_the_checkout_at_stripe_and_unlists_it(client, login, credits, stripe):
    login("alice")
    start(client, stripe, "cs_test_cancel")
    ((_, _, attempt),) = pending_rows(client)
    testing.mock_expire_session(stripe, testing.checkout_session("cs_test_cancel", amount_total=200))
    response = client.get("/credits/cancel", query_string={"attempt": attempt}, headers=HTML)
    assert "Nothing was charged" in response.get_data(as_text=True)
    assert len(stripe_calls(stripe, "POST", "/expire")) == 1
    assert pending_rows(client) == []
    # Resuming it now is refused without asking Stripe: the purchase is expired.
    assert client.get(f"/credits/resume?attempt={attempt}").status_code == 409
    assert stripe_calls(stripe, "GET") == []


@pytest.mark.parametrize(
    "attempt",
    [
        pytest.param(None, id="someone else's checkout"),
        pytest.param("chk_" + "0" * 32, id="an unknown attempt"),
        pytest.param("chk_%00", id="a NUL byte"),
        pytest.param("x" * 5000, id="five thousand characters"),
        pytest.param("", id="none at all"),
    ],
)
def test_resume_refuses_anything_but_the_users_own_attempt(client, login, credits, stripe, attempt):
    login("alice")
    start(client, stripe, "cs_test_alices")
    alices = attempt_of(credits, "cs_test_alices")
    login("bob")
    assert pending_rows(client) == []  # nor is it on bob's page
    response = client.get("/credits/resume", query_string={"attempt": alices if attempt is None else attempt})
    assert response.status_code == 404
    assert stripe_calls(stripe, "GET") == []


def test_fulfilled_failed_and_old_purchases_are_not_listed(app, client, login, credits, stripe, clock):
    login("alice")
    for session_id in ("cs_test_paid", "cs_test_settled", "cs_test_failed", "cs_test_expired", "cs_test_old"):
        start(client, stripe, session_id)
    with app.app_context():
        paid = testing.session_for("cs_test_paid")
        settled = testing.session_for("cs_test_settled")
        failed = testing.session_for("cs_test_failed", payment_status="unpaid")
        expired = testing.session_for("cs_test_expired", payment_status="unpaid", status="expired")
    events = [
        ("checkout.session.completed", paid),
        ("checkout.session.completed", {**settled, "payment_status": "unpaid"}),
        ("checkout.session.async_payment_succeeded", settled),
        ("checkout.session.completed", failed),
        ("checkout.session.async_payment_failed", failed),
        ("checkout.session.expired", expired),
    ]
    for kind, session in events:
        assert testing.post_event(client, testing.event(kind, session)).status_code == 200
    assert credits.balance("alice") == 400
    ((_, _, attempt),) = pending_rows(client)
    assert attempt == attempt_of(credits, "cs_test_old")
    # Past Stripe's 24 hours an open session has expired, even before its event arrives.
    clock.advance(hours=24)
    assert pending_rows(client) == []


def test_a_pay_later_purchase_stays_listed_for_days_while_its_payment_settles(
    client, login, credits, stripe, clock
):
    testing.mock_create_session(stripe, "cs_test_later")
    login("alice")
    assert client.post("/credits/checkout", json={"quantity": 2}).status_code == 200
    with client.application.app_context():
        later = testing.session_for("cs_test_later", payment_status="unpaid")
    assert testing.post_event(client, testing.event("checkout.session.completed", later)).status_code == 200
    clock.advance(days=10)  # a bank debit takes days
    ((text, resume, cancel),) = pending_rows(client)
    assert "Waiting for the payment" in text
    assert (resume, cancel) == (None, None)
    clock.advance(days=12)
    assert pending_rows(client) == []


def test_the_account_page_lists_its_keys_purchases_and_a_keys_page_only_its_own(
    client, login, credits, stripe
):
    @credits.keys_loader
    def keys(user_id):
        return [("key-1", "laptop")] if user_id == "alice" else []

    login("alice")
    start(client, stripe, "cs_test_account")
    start(client, stripe, "cs_test_key", quantity=1, key_id="key-1")
    listed = [
        (text.split(" 100 ")[0].split(" 200 ")[0][17:], attempt) for text, _, attempt in pending_rows(client)
    ]
    assert listed == [
        ("API key laptop", attempt_of(credits, "cs_test_key")),
        ("your account", attempt_of(credits, "cs_test_account")),
    ]
    credits.wallet_loader(lambda: ("alice", "key-1"))
    ((shown, _, attempt),) = pending_rows(client)
    assert "API key laptop" in shown
    assert attempt == attempt_of(credits, "cs_test_key")
