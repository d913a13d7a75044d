"""Plans: CREDITS_PLANS, POST /credits/subscribe (the Checkout Session Stripe is asked for, the
pending row, one live subscription per wallet) and FlaskCredits.subscription."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs

import pytest
import responses
import sqlalchemy as sa
from helpers import logged_in, make_app

from flask_credits import Subscription, Wallet, testing
from flask_credits.settings import DEFAULTS, Plan, parse

PLANS = {
    "pro": {"price": "price_pro", "credits": 2000, "name": "Pro"},
    "max": {"price": "price_max", "credits": 5000, "rollover": True},
}


@pytest.fixture
def credits_config():
    return {
        "STRIPE_SECRET_KEY": "sk_test_plans",
        "STRIPE_WEBHOOK_SECRET": "whsec_test_plans",
        "CREDITS_STRIPE_MAX_RETRIES": 0,
        "CREDITS_PLANS": PLANS,
    }


def session_requests(stripe):
    """The form bodies of every Checkout Session the app asked Stripe for, with their headers."""
    found = []
    for call in stripe.calls:
        if call.request.method == "POST" and call.request.url.endswith("/v1/checkout/sessions"):
            body = call.request.body
            found.append((parse_qs(body if isinstance(body, str) else body.decode()), call.request.headers))
    return found


def rows(credits):
    s = credits.tables.subscriptions
    with credits.db.engine.connect() as conn:
        return conn.execute(sa.select(s).order_by(s.c.id)).all()


# -- configuration -------------------------------------------------------------------------------------


def config(**changes):
    return {**DEFAULTS, **changes}


def test_plans_are_parsed_into_plan_records_in_order():
    parsed = parse(config(CREDITS_PLANS=PLANS))
    assert parsed.plans == (
        Plan(id="pro", name="Pro", price="price_pro", credits=2000, rollover=False),
        Plan(id="max", name="max", price="price_max", credits=5000, rollover=True),
    )
    assert parsed.plan("max") is parsed.plans[1]
    assert parsed.plan_for_price("price_pro") is parsed.plans[0]
    assert parsed.plan("nope") is None


@pytest.mark.parametrize(
    ("plans", "message"),
    [
        ([("pro", 1)], "must be a dict of plan id"),
        ({"pro": "price_1"}, "CREDITS_PLANS['pro'] must be a dict"),
        ({"pro": {"price": "price_1"}}, "CREDITS_PLANS['pro']['credits']"),
        ({"pro": {"price": "price_1", "credits": 0}}, "['credits'] must be a whole number"),
        ({"pro": {"price": "price_1", "credits": True}}, "['credits'] must be a whole number"),
        ({"pro": {"credits": 10}}, "CREDITS_PLANS['pro']['price']"),
        ({"pro": {"credits": 10, "price": "prod_1"}}, "recurring Stripe Price"),
        ({"pro": {"credits": 10, "price": "price_1", "rollover": "yes"}}, "['rollover'] must be True"),
        ({"pro": {"credits": 10, "price": "price_1", "amount": 5}}, "unknown keys ['amount']"),
        ({"a b": {"credits": 10, "price": "price_1"}}, "CREDITS_PLANS['a b']: a plan id"),
        (
            {"a": {"credits": 10, "price": "price_1"}, "b": {"credits": 20, "price": "price_1"}},
            "CREDITS_PLANS['b']['price'] is already the price of another plan",
        ),
    ],
)
def test_a_misconfigured_plan_stops_startup_naming_it(plans, message):
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(config(CREDITS_PLANS=plans))


def test_a_misconfigured_plan_stops_init_app(database_url):
    with pytest.raises(RuntimeError, match="CREDITS_PLANS"):
        make_app(database_url, CREDITS_PLANS={"pro": {"credits": 1}})


# -- subscribing ---------------------------------------------------------------------------------------


def test_subscribe_creates_a_subscription_mode_session_for_the_plan_and_stores_the_row_first(
    app, credits, client, login, stripe
):
    testing.mock_create_session(stripe, "cs_test_sub_1")
    login("alice")
    response = client.post("/credits/subscribe", json={"plan": "pro"})
    assert response.status_code == 200
    assert response.json == {"id": "cs_test_sub_1", "url": "https://checkout.stripe.com/c/pay/cs_test_sub_1"}
    [(form, headers)] = session_requests(stripe)
    [row] = rows(credits)
    assert form["mode"] == ["subscription"]
    assert form["line_items[0][price]"] == ["price_pro"]
    assert form["line_items[0][quantity]"] == ["1"]
    assert form["customer"][0].startswith("cus_")
    assert form["client_reference_id"] == [row.attempt_key]
    for prefix in ("metadata", "subscription_data[metadata]"):
        assert form[f"{prefix}[userId]"] == ["alice"]
        assert form[f"{prefix}[plan]"] == ["pro"]
        assert form[f"{prefix}[subscriptionRef]"] == [row.attempt_key]
        assert f"{prefix}[keyId]" not in form
    # Stripe's idempotency key is the row's attempt key: a retried request cannot make two sessions.
    assert headers["Idempotency-Key"] == row.attempt_key
    assert not any(key.startswith("payment_intent_data") for key in form)
    assert (row.plan, row.status, row.checkout_session_id) == ("pro", "open", "cs_test_sub_1")
    assert row.live_wallet_id == row.wallet_id
    assert row.stripe_subscription_id is None
    # A checkout under way is not a plan yet.
    assert credits.subscription("alice") is None


def test_a_browser_form_is_sent_to_stripe_with_a_303(app, credits, client, login, stripe):
    testing.mock_create_session(stripe, "cs_test_sub_form")
    login("alice")
    response = client.post("/credits/subscribe", data={"plan": "max"})
    assert response.status_code == 303
    assert response.headers["Location"] == "https://checkout.stripe.com/c/pay/cs_test_sub_form"


def test_subscribing_for_an_api_key_puts_the_key_in_the_metadata(app, credits, client, stripe):
    credits.keys_loader(lambda user_id: [("key-1", "Key one")] if user_id == "alice" else [])
    testing.mock_create_session(stripe, "cs_test_sub_key")
    alice = logged_in(app, "alice")
    assert alice.post("/credits/subscribe", json={"plan": "pro", "key_id": "key-1"}).status_code == 200
    [(form, _)] = session_requests(stripe)
    assert form["subscription_data[metadata][keyId]"] == ["key-1"]
    assert alice.post("/credits/subscribe", json={"plan": "pro", "key_id": "key-2"}).status_code == 400


@pytest.mark.parametrize("body", [{"plan": "gold"}, {}, {"plan": 3}, {"plan": ["pro"]}, {"pack": "pro"}])
def test_an_unknown_plan_is_400_and_asks_stripe_nothing(client, login, credits, stripe, body):
    login("alice")
    response = client.post("/credits/subscribe", json=body)
    assert response.status_code == 400
    assert response.json["error"] == "bad_request"
    assert session_requests(stripe) == []
    assert rows(credits) == []


def test_subscribe_needs_a_login(client, stripe):
    assert client.post("/credits/subscribe", json={"plan": "pro"}).status_code == 401


def test_stripe_refusing_the_session_ends_the_row_as_error_and_frees_the_wallet(
    app, credits, client, login, stripe
):
    testing.mock_create_session(stripe, status=400, error={"type": "invalid_request_error", "message": "x"})
    login("alice")
    response = client.post("/credits/subscribe", json={"plan": "pro"})
    assert response.status_code == 502
    [row] = rows(credits)
    assert (row.status, row.live_wallet_id) == ("error", None)


def live_subscription(credits, user="alice", plan="pro", status="active"):
    """Store a live subscription Stripe already has, as its webhooks leave it."""
    wallet_id = credits.ledger.wallet_id(Wallet(user), create=True)
    now = credits.database.now()
    s = credits.tables.subscriptions
    with credits.db.engine.begin() as conn:
        conn.execute(
            sa.insert(s).values(
                wallet_id=wallet_id,
                plan=plan,
                status=status,
                attempt_key=f"sub_{user}_live",
                stripe_subscription_id=f"sub_stripe_{user}",
                cancel_at_period_end=False,
                live_wallet_id=wallet_id,
                created_at=now,
                updated_at=now,
            )
        )


def test_a_wallet_with_a_live_subscription_gets_409_and_stripe_is_not_asked(
    app, credits, client, login, stripe
):
    live_subscription(credits)
    login("alice")
    response = client.post("/credits/subscribe", json={"plan": "max"})
    assert response.status_code == 409
    assert response.json["error"] == "already_subscribed"
    assert session_requests(stripe) == []
    assert len(rows(credits)) == 1


def test_a_browser_with_a_live_subscription_is_sent_on_to_the_billing_portal(
    app, credits, client, login, stripe
):
    live_subscription(credits)
    login("alice")
    response = client.post("/credits/subscribe", data={"plan": "max"})
    # 307: the browser repeats its POST at the portal route, which answers POST only.
    assert response.status_code == 307
    assert response.headers["Location"].endswith("/credits/portal")
    assert session_requests(stripe) == []


def test_another_wallet_of_the_same_user_may_subscribe(app, credits, client, stripe):
    credits.keys_loader(lambda user_id: [("key-1", "Key one")])
    live_subscription(credits)
    testing.mock_create_session(stripe, "cs_test_sub_other")
    alice = logged_in(app, "alice")
    assert alice.post("/credits/subscribe", json={"plan": "pro", "key_id": "key-1"}).status_code == 200


def test_a_checkout_left_open_is_expired_at_stripe_before_a_new_one_starts(
    app, credits, client, login, stripe
):
    testing.mock_create_session(stripe)
    login("alice")
    first = client.post("/credits/subscribe", json={"plan": "pro"}).json["id"]
    testing.mock_expire_session(
        stripe,
        testing.subscription_session(first, subscription=None, client_reference_id=None, amount_total=0),
    )
    second = client.post("/credits/subscribe", json={"plan": "max"})
    assert second.status_code == 200
    old, new = rows(credits)
    assert (old.status, old.live_wallet_id) == ("expired", None)
    assert (new.status, new.plan, new.live_wallet_id) == ("open", "max", new.wallet_id)
    assert any(c.request.url.endswith(f"/v1/checkout/sessions/{first}/expire") for c in stripe.calls)


def test_a_checkout_that_completed_meanwhile_is_not_replaced(app, credits, client, login, stripe):
    testing.mock_create_session(stripe)
    login("alice")
    first = client.post("/credits/subscribe", json={"plan": "pro"}).json["id"]
    testing.mock_expire_session(
        stripe,
        {"id": first},
        status=400,
        error={"type": "invalid_request_error", "message": "Only open sessions can be expired."},
    )
    response = client.post("/credits/subscribe", json={"plan": "max"})
    assert response.status_code == 409
    [row] = rows(credits)
    assert (row.status, row.plan) == ("open", "pro")


def test_concurrent_subscribes_of_one_wallet_leave_one_live_checkout(app, credits, stripe, backend):
    """The newest checkout replaces one left open (expired at Stripe first), so racing requests may
    each start one; but only one is ever live, and every other was expired at Stripe."""
    if backend == "sqlite":
        pytest.skip("SQLite runs one writer at a time: nothing to race")
    testing.mock_create_session(stripe)
    stripe.add(
        responses.POST,
        re.compile(r"https://api\.stripe\.com/v1/checkout/sessions/[^/]+/expire"),
        json={"object": "checkout.session", "status": "expired"},
    )
    clients = [logged_in(app, "alice") for _ in range(6)]
    barrier = threading.Barrier(len(clients))

    def subscribe(client):
        barrier.wait()
        return client.post("/credits/subscribe", json={"plan": "pro"}).status_code

    with ThreadPoolExecutor(len(clients)) as pool:
        codes = list(pool.map(subscribe, clients))
    assert set(codes) <= {200, 409}
    assert 200 in codes
    found = rows(credits)
    assert [row.status for row in found if row.live_wallet_id is not None] == ["open"]
    expired = {c.request.url.split("/")[-2] for c in stripe.calls if c.request.url.endswith("/expire")}
    assert {row.checkout_session_id for row in found if row.status == "expired"} == expired
    assert all(row.status in ("open", "expired") for row in found)
    assert len(found) == codes.count(200)


# -- FlaskCredits.subscription --------------------------------------------------------------------------


def test_subscription_returns_the_live_plan_of_the_wallet(app, credits):
    assert credits.subscription("alice") is None
    live_subscription(credits, plan="max", status="past_due")
    found = credits.subscription("alice")
    assert isinstance(found, Subscription)
    assert (found.plan, found.status, found.cancel_at_period_end, found.wallet) == (
        "max",
        "past_due",
        False,
        Wallet("alice"),
    )
    assert found.to_dict()["plan"] == "max"
    assert credits.subscription("alice", "key-1") is None
    assert credits.subscription("bob") is None


def test_stripe_failing_to_create_the_customer_ends_the_row_as_error(app, credits, client, login, stripe):
    testing.mock_create_customer(stripe, status=500, error={"type": "api_error", "message": "boom"})
    login("alice")
    assert client.post("/credits/subscribe", json={"plan": "pro"}).status_code == 502
    assert session_requests(stripe) == []
    [row] = rows(credits)
    assert (row.status, row.live_wallet_id) == ("error", None)


def test_a_huge_plan_name_is_a_short_400(client, login, stripe):
    login("alice")
    response = client.post("/credits/subscribe", json={"plan": "x" * 50_000})
    assert response.status_code == 400
    assert len(response.json["message"]) < 100
