"""CREDITS_ALLOW_PROMOTION_CODES: Checkout lets customers enter Stripe promotion codes; a discounted
session grants the full credits, its row keeps what was paid so refunds claw back in proportion, and
amounts that do not add up are still never credited."""

from __future__ import annotations

from urllib.parse import parse_qs

import pytest
import sqlalchemy as sa

from flask_credits import testing

PLANS = {"pro": {"price": "price_pro", "credits": 2000, "name": "Pro"}}


@pytest.fixture
def credits_config():
    return {
        "STRIPE_SECRET_KEY": "sk_test_promotions",
        "STRIPE_WEBHOOK_SECRET": "whsec_test_promotions",
        "CREDITS_STRIPE_MAX_RETRIES": 0,
        "CREDITS_PACKS": {"starter": {"credits": 500, "amount": 400}},
        "CREDITS_PLANS": PLANS,
        "CREDITS_ALLOW_PROMOTION_CODES": True,
    }


def buy(client, login, stripe, session_id="cs_test_promo"):
    testing.mock_create_session(stripe, session_id)
    login("alice")
    assert client.post("/credits/checkout", json={"pack": "starter"}).status_code == 200
    return session_id


def created(stripe, path="/v1/checkout/sessions"):
    return [parse_qs(c.request.body) for c in stripe.calls if c.request.url.endswith(path)]


def discounted(app, session_id, *, subtotal=400, discount=100, total=None):
    with app.app_context():
        found = testing.session_for(session_id)
    found.update(
        amount_subtotal=subtotal,
        amount_total=subtotal - discount if total is None else total,
        total_details={"amount_discount": discount, "amount_shipping": 0, "amount_tax": 0},
    )
    return found


def row(credits):
    p = credits.tables.purchases
    with credits.db.engine.connect() as conn:
        return conn.execute(sa.select(p)).one()


def deliver(client, event_type, obj):
    return testing.post_event(client, testing.event(event_type, obj)).json["outcome"]


def test_checkout_and_subscribe_allow_promotion_codes(app, client, login, stripe):
    buy(client, login, stripe)
    testing.mock_create_session(stripe, "cs_test_plan")
    assert client.post("/credits/subscribe", json={"plan": "pro"}).status_code == 200
    assert [form.get("allow_promotion_codes") for form in created(stripe)] == [["true"], ["true"]]


def test_a_discounted_purchase_grants_its_credits_and_refunds_follow_what_was_paid(
    app, client, login, stripe, credits
):
    session_id = buy(client, login, stripe)
    session = discounted(app, session_id)
    assert deliver(client, "checkout.session.completed", session) == "fulfilled"
    assert credits.balance("alice") == 500
    assert row(credits).amount == 300  # what was paid
    refund = testing.charge(session["payment_intent"], amount=300, amount_refunded=150)
    assert deliver(client, "charge.refunded", refund) == "revoked"
    assert credits.balance("alice") == 250
    refund = testing.charge(session["payment_intent"], amount=300, amount_refunded=300)
    deliver(client, "charge.refunded", refund)
    assert credits.balance("alice") == 0
    assert credits.audit() == []


@pytest.mark.parametrize(
    "amounts",
    [
        {"subtotal": 1, "discount": 0, "total": 1},  # not the price, no discount
        {"subtotal": 399, "discount": 99},  # a subtotal that is not the price
        {"subtotal": 400, "discount": 100, "total": 200},  # a total the discount does not explain
        {"subtotal": 400, "discount": 0, "total": 300},  # cheaper with no discount
    ],
)
def test_amounts_that_do_not_add_up_are_never_credited(app, client, login, stripe, credits, amounts):
    session_id = buy(client, login, stripe)
    assert deliver(client, "checkout.session.completed", discounted(app, session_id, **amounts)) == (
        "amount_mismatch"
    )
    assert credits.balance("alice") == 0
    assert row(credits).status == "mismatch"


@pytest.mark.config(CREDITS_ALLOW_PROMOTION_CODES=False)
def test_without_the_setting_a_discount_is_a_mismatch(app, client, login, stripe, credits):
    session_id = buy(client, login, stripe)
    assert "allow_promotion_codes" not in created(stripe)[0]
    assert deliver(client, "checkout.session.completed", discounted(app, session_id)) == "amount_mismatch"
    assert credits.balance("alice") == 0
