"""POST /credits/checkout: what is sent to Stripe, the pending purchase, and every error path."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses
import sqlalchemy as sa
from helpers import logged_in, make_app

from flask_credits import testing

SECRET = "sk_test_51SecretKeyThatMustNeverBeLogged"
PACKS = {
    "starter": {"credits": 500, "amount": 400, "name": "Starter"},
    "pro": {"credits": 5000, "price": "price_pro_123", "amount": 3000, "currency": "usd"},
    "mystery": {"credits": 70, "price": "price_mystery"},
}


@pytest.fixture
def credits_config():
    return {
        "STRIPE_SECRET_KEY": SECRET,
        "STRIPE_WEBHOOK_SECRET": "whsec_test_1",
        "CREDITS_PACKS": PACKS,
        "CREDITS_STRIPE_MAX_RETRIES": 0,
        "SERVER_NAME": "shop.test",
    }


def sent_form(rsps):
    """The one Checkout Session created: its form and headers."""
    (call,) = [c for c in rsps.calls if c.request.method == "POST" and "/checkout/sessions" in c.request.url]
    return parse_qs(call.request.body), call.request.headers


def purchases(credits):
    p = credits.tables.purchases
    with credits.db.engine.connect() as conn:
        return conn.execute(sa.select(p).order_by(p.c.id)).all()


def test_quantity_checkout_redirects_to_stripe_and_stores_a_pending_purchase(client, login, credits, stripe):
    testing.mock_create_session(stripe, "cs_test_q1")
    login("alice")
    response = client.post("/credits/checkout", data={"quantity": "3", "credits": "999999"})
    assert response.status_code == 303
    assert response.headers["Location"] == "https://checkout.stripe.com/c/pay/cs_test_q1"
    form, headers = sent_form(stripe)
    (row,) = purchases(credits)
    assert form == {
        "mode": ["payment"],
        "customer": [credits.customer_id("alice")],
        "line_items[0][price_data][currency]": ["usd"],
        "line_items[0][price_data][product_data][name]": ["Credits"],
        "line_items[0][price_data][product_data][description]": ["100 credits"],
        "line_items[0][price_data][unit_amount]": ["100"],
        "line_items[0][quantity]": ["3"],
        "client_reference_id": [row.attempt_key],
        "metadata[userId]": ["alice"],
        "metadata[credits]": ["300"],
        "metadata[purchaseId]": [str(row.id)],
        "payment_intent_data[metadata][userId]": ["alice"],
        "payment_intent_data[metadata][credits]": ["300"],
        "payment_intent_data[metadata][purchaseId]": [str(row.id)],
        "success_url": ["http://shop.test/credits/success?session_id={CHECKOUT_SESSION_ID}"],
        "cancel_url": [f"http://shop.test/credits/cancel?attempt={row.attempt_key}"],
    }
    assert headers["Idempotency-Key"] == row.attempt_key
    assert headers["Authorization"] == f"Bearer {SECRET}"
    assert (row.session_id, row.status, row.credits, row.amount, row.currency, row.quantity) == (
        "cs_test_q1",
        "open",
        300,
        300,
        "usd",
        3,
    )
    assert credits.balance("alice") == 0


def test_each_checkout_attempt_has_its_own_idempotency_key(client, login, credits, stripe):
    testing.mock_create_session(stripe)
    login("alice")
    client.post("/credits/checkout", data={"quantity": "1"})
    client.post("/credits/checkout", data={"quantity": "1"})
    keys = [c.request.headers["Idempotency-Key"] for c in stripe.calls if "/checkout/" in c.request.url]
    assert len(set(keys)) == 2


def test_pack_with_an_amount_uses_price_data(client, login, credits, stripe):
    testing.mock_create_session(stripe, "cs_test_p1")
    login("alice")
    assert client.post("/credits/checkout", data={"pack": "starter"}).status_code == 303
    form, _ = sent_form(stripe)
    assert form["line_items[0][price_data][unit_amount]"] == ["400"]
    assert form["line_items[0][price_data][product_data][name]"] == ["Starter"]
    assert form["line_items[0][quantity]"] == ["1"]
    assert form["metadata[credits]"] == ["500"]
    assert purchases(credits)[0].pack == "starter"


def test_pack_with_a_stripe_price_sends_the_price_id(client, login, credits, stripe):
    testing.mock_create_session(stripe, "cs_test_p2", amount_total=3000)
    login("alice")
    response = client.post("/credits/checkout", json={"pack": "pro"})
    assert response.json == {"id": "cs_test_p2", "url": "https://checkout.stripe.com/c/pay/cs_test_p2"}
    form, _ = sent_form(stripe)
    assert form["line_items[0][price]"] == ["price_pro_123"]
    assert "line_items[0][price_data][unit_amount]" not in form
    assert (purchases(credits)[0].credits, purchases(credits)[0].amount) == (5000, 3000)


def test_pack_price_without_amount_takes_the_amount_stripe_reports(client, login, credits, stripe):
    testing.mock_create_session(stripe, "cs_test_p3", amount_total=999)
    login("alice")
    assert client.post("/credits/checkout", json={"pack": "mystery"}).status_code == 200
    assert purchases(credits)[0].amount == 999


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"pack": "gold"}, "unknown pack 'gold'"),
        ({"quantity": "0"}, "quantity must be between 1 and 100"),
        ({"quantity": "101"}, "quantity must be between 1 and 100"),
        ({"quantity": "-2"}, "quantity must be a whole number"),
        ({"quantity": "1.5"}, "quantity must be a whole number"),
        ({"quantity": "ten"}, "quantity must be a whole number"),
        ({"quantity": "99999999999999999999"}, "quantity must be a whole number"),
        ({}, "choose a pack or a quantity"),
        ({"pack": "starter", "quantity": "2"}, "not both"),
    ],
)
def test_bad_form_input_is_400_and_nothing_reaches_stripe(client, login, credits, stripe, data, message):
    login("alice")
    response = client.post("/credits/checkout", data=data, headers={"Accept": "application/json"})
    assert response.status_code == 400
    assert message in response.json["message"]
    assert len(stripe.calls) == 0
    assert purchases(credits) == []


@pytest.mark.parametrize(
    "body", [{"quantity": 2.5}, {"quantity": True}, {"quantity": [1]}, {"pack": ["starter"]}, [1, 2], "3"]
)
def test_bad_json_input_is_400(client, login, credits, stripe, body):
    login("alice")
    response = client.post("/credits/checkout", json=body)
    assert response.status_code == 400
    assert len(stripe.calls) == 0
    assert purchases(credits) == []


def test_browser_gets_the_credits_page_with_the_message_on_bad_input(client, login, stripe):
    login("alice")
    response = client.post("/credits/checkout", data={"quantity": "0"}, headers={"Accept": "text/html"})
    assert response.status_code == 400
    assert "quantity must be between 1 and 100" in response.get_data(as_text=True)


def test_anonymous_checkout_is_refused(client, credits, stripe):
    assert client.post("/credits/checkout", data={"quantity": "1"}).status_code == 401
    assert len(stripe.calls) == 0


@pytest.mark.parametrize(
    ("status", "error", "kind_text"),
    [
        (
            402,
            {"type": "card_error", "code": "card_declined", "message": "Your card was declined."},
            "declined",
        ),
        # Stripe masks the key in this message, as here; the full key must not appear anywhere.
        (
            401,
            {"type": "invalid_request_error", "message": "Invalid API Key provided: sk_test_****ged"},
            "not configured",
        ),
        (429, {"type": "invalid_request_error", "code": "rate_limit", "message": "Too many"}, "busy"),
        (400, {"type": "invalid_request_error", "message": "bad param"}, "refused"),
        (500, {"type": "api_error", "message": "boom"}, "problem"),
    ],
)
def test_stripe_errors_give_a_clear_502_and_leave_no_creditable_purchase(
    client, login, credits, stripe, caplog, status, error, kind_text
):
    testing.mock_create_session(stripe, status=status, error=error)
    login("alice")
    with caplog.at_level(logging.DEBUG):
        response = client.post("/credits/checkout", json={"quantity": 1})
    assert response.status_code == 502
    assert response.json["error"] == "payment_provider_error"
    assert kind_text in response.json["message"]
    (row,) = purchases(credits)
    assert (row.status, row.session_id) == ("error", None)
    assert SECRET not in caplog.text
    assert SECRET not in response.get_data(as_text=True)


@pytest.mark.parametrize(
    "failure", [requests.exceptions.ConnectionError("down"), requests.exceptions.Timeout("slow")]
)
def test_unreachable_or_slow_stripe_is_a_clear_502(client, login, credits, stripe, failure):
    testing.mock_create_customer(stripe)
    stripe.add(responses.POST, f"{testing.STRIPE_API}/v1/checkout/sessions", body=failure)
    login("alice")
    response = client.post("/credits/checkout", json={"quantity": 1})
    assert response.status_code == 502
    assert "could not be reached" in response.json["message"]
    assert purchases(credits)[0].status == "error"


@pytest.mark.config(CREDITS_STRIPE_API_BASE="http://127.0.0.1:12111")
def test_the_stripe_api_address_can_be_set(app, client, login, credits, stripe):
    """CREDITS_STRIPE_API_BASE points stripe-python at a stand-in (stripe-mock, a test server)."""
    session = testing.checkout_session("cs_test_elsewhere", amount_total=100)
    stripe.add(responses.POST, "http://127.0.0.1:12111/v1/customers", json={"id": "cus_test_elsewhere"})
    stripe.add(responses.POST, "http://127.0.0.1:12111/v1/checkout/sessions", json=session)
    login("alice")
    response = client.post("/credits/checkout", json={"quantity": 1})
    assert response.status_code in (200, 303), response.get_data(as_text=True)
    assert [call.request.url for call in stripe.calls] == [
        "http://127.0.0.1:12111/v1/customers",
        "http://127.0.0.1:12111/v1/checkout/sessions",
    ]


@pytest.mark.config(STRIPE_SECRET_KEY=None)
def test_missing_secret_key_is_a_clear_502_without_calling_stripe(app, client, login, credits, stripe):
    login("alice")
    response = client.post("/credits/checkout", json={"quantity": 1})
    assert (response.status_code, response.json["message"]) == (
        502,
        "Payments are not configured on this site yet.",
    )
    assert len(stripe.calls) == 0


def test_buying_for_an_api_key_needs_the_apps_say_so(client, login, credits, stripe):
    testing.mock_create_session(stripe, "cs_test_k1")
    login("alice")
    refused = client.post("/credits/checkout", json={"quantity": 1, "key_id": "key-1"})
    assert (refused.status_code, refused.json["message"]) == (400, "unknown API key")

    @credits.wallet_checker
    def owns(user_id, key_id):
        return (user_id, key_id) in {("alice", None), ("alice", "key-1")}

    assert client.post("/credits/checkout", json={"quantity": 1, "key_id": "key-2"}).status_code == 400
    assert client.post("/credits/checkout", json={"quantity": 1, "key_id": "key-1"}).status_code == 200
    form, _ = sent_form(stripe)
    assert form["metadata[keyId]"] == ["key-1"]
    assert form["payment_intent_data[metadata][keyId]"] == ["key-1"]
    row = purchases(credits)[-1]
    t = credits.tables.wallets
    with credits.db.engine.connect() as conn:
        owner = conn.execute(sa.select(t.c.user_id, t.c.key_id).where(t.c.id == row.wallet_id)).one()
    assert tuple(owner) == ("alice", "key-1")


def test_the_credits_page_shows_packs_and_prices(client, login):
    login("alice")
    page = client.get("/credits/").get_data(as_text=True)
    assert "Starter: 500 credits for 4.00 USD" in page
    assert "5000 credits for 30.00 USD" in page
    assert "Units of 100 credits at 1.00 USD each" in page


def test_a_misconfigured_pack_is_named_when_the_app_starts(database_url):
    packs = {**PACKS, "broken": {"credits": 0, "amount": 100}}
    with pytest.raises(RuntimeError, match=r"CREDITS_PACKS\['broken'\]\['credits'\]"):
        make_app(database_url, STRIPE_SECRET_KEY=SECRET, CREDITS_PACKS=packs)


# -- the cap on unfinished checkouts ----------------------------------------------------------------

CAP = 5  # CREDITS_MAX_OPEN_PURCHASES's default


def checkout_codes(client, times, **kwargs):
    return [
        client.post("/credits/checkout", json={"quantity": 1}, **kwargs).status_code for _ in range(times)
    ]


def test_one_checkout_past_the_cap_is_429_and_neither_writes_nor_calls_stripe(client, login, credits, stripe):
    testing.mock_create_session(stripe)
    login("alice")
    assert checkout_codes(client, CAP) == [200] * CAP
    response = client.post("/credits/checkout", json={"quantity": 1})
    assert response.status_code == 429
    assert response.json == {
        "error": "too_many_open_checkouts",
        "message": "You already have 5 unfinished checkouts. Complete or cancel one of them,"
        " or try again later.",
    }
    assert 0 < int(response.headers["Retry-After"]) <= 24 * 3600
    assert len(stripe.calls) == CAP + 1  # the user's customer, created by the first checkout
    assert len(purchases(credits)) == CAP


def test_a_browser_past_the_cap_gets_the_credits_page_with_the_message(client, login, credits, stripe):
    testing.mock_create_session(stripe)
    login("alice")
    assert checkout_codes(client, CAP) == [200] * CAP
    page = client.post("/credits/checkout", data={"quantity": "2"}, headers={"Accept": "text/html"})
    assert page.status_code == 429
    assert "Retry-After" in page.headers
    assert "You already have 5 unfinished checkouts" in page.get_data(as_text=True)
    assert len(purchases(credits)) == CAP


def test_retry_after_says_when_the_oldest_unfinished_checkout_stops_counting(client, login, stripe, clock):
    """Stripe ends a Checkout Session after 24 hours at the latest: an older unfinished purchase (its
    expiry event lost) no longer counts."""
    testing.mock_create_session(stripe)
    login("alice")
    for _ in range(CAP):
        assert checkout_codes(client, 1) == [200]
        clock.advance(minutes=10)
    refused = client.post("/credits/checkout", json={"quantity": 1})
    assert (refused.status_code, refused.headers["Retry-After"]) == (429, str(24 * 3600 - 50 * 60))
    clock.advance(seconds=24 * 3600 - 50 * 60 - 1)
    assert checkout_codes(client, 1) == [429]
    clock.advance(seconds=1)
    assert checkout_codes(client, 2) == [200, 429]  # the oldest stopped counting, the new one counts


@pytest.mark.config(CREDITS_MAX_OPEN_PURCHASES=2)
def test_only_unfinished_checkouts_count_against_the_cap(app, client, login, credits, stripe, build_app):
    testing.mock_create_session(stripe)
    login("alice")
    assert checkout_codes(client, 3) == [200, 200, 429]
    first, second = (row.session_id for row in purchases(credits))
    with app.app_context():
        paid = testing.session_for(first)
        expired = testing.session_for(second, payment_status="unpaid", status="expired")
    assert testing.post_event(client, testing.event("checkout.session.completed", paid)).status_code == 200
    assert checkout_codes(client, 2) == [200, 429]
    assert testing.post_event(client, testing.event("checkout.session.expired", expired)).status_code == 200
    # A checkout Stripe never created ends as "error": the same shop, its Stripe key missing, makes one.
    unconfigured, _, _ = build_app(STRIPE_SECRET_KEY=None)
    assert logged_in(unconfigured).post("/credits/checkout", json={"quantity": 1}).status_code == 502
    assert checkout_codes(client, 2) == [200, 429]
    statuses = sorted(row.status for row in purchases(credits))
    assert statuses == ["error", "expired", "fulfilled", "open", "open"]


def test_the_cap_is_per_wallet(client, login, credits, stripe):
    @credits.wallet_checker
    def owns(user_id, key_id):
        return (user_id, key_id) == ("alice", "key-1")

    testing.mock_create_session(stripe)
    login("alice")
    assert checkout_codes(client, CAP + 1) == [200] * CAP + [429]
    assert client.post("/credits/checkout", json={"quantity": 1, "key_id": "key-1"}).status_code == 200
    login("bob")
    assert checkout_codes(client, 1) == [200]


def test_checkouts_racing_on_one_wallet_stop_exactly_at_the_cap(app, credits, stripe, backend):
    """Twenty checkouts of one wallet at once, released by a barrier: the wallet row lock taken before
    counting lets exactly CAP through, on every backend."""
    testing.mock_create_session(stripe)
    racers = 20
    clients = [logged_in(app) for _ in range(racers)]
    barrier = threading.Barrier(racers, timeout=60)

    def checkout(racer):
        barrier.wait()
        return racer.post("/credits/checkout", json={"quantity": 1}).status_code

    with ThreadPoolExecutor(max_workers=racers) as pool:
        codes = list(pool.map(checkout, clients, timeout=120))
    assert sorted(codes) == [200] * CAP + [429] * (racers - CAP)
    assert [row.status for row in purchases(credits)] == ["open"] * CAP
    assert len([c for c in stripe.calls if "/checkout/sessions" in c.request.url]) == CAP


# -- the cancel page -----------------------------------------------------------------------------------


def expire_calls(rsps):
    return [c for c in rsps.calls if c.request.url.endswith("/expire")]


def started(client, stripe, session_id):
    """Start a checkout answered with ``session_id``; returns the cancel URL Stripe was given."""
    testing.mock_create_session(stripe, session_id)
    assert client.post("/credits/checkout", json={"quantity": 1}).status_code == 200
    (cancel_url,) = parse_qs(stripe.calls[-1].request.body)["cancel_url"]
    return cancel_url


@pytest.mark.config(CREDITS_MAX_OPEN_PURCHASES=1)
def test_cancelling_expires_the_checkout_at_stripe_and_frees_its_place(app, client, login, credits, stripe):
    login("alice")
    cancel_url = started(client, stripe, "cs_test_cancel_1")
    assert checkout_codes(client, 1) == [429]
    testing.mock_expire_session(stripe, testing.checkout_session("cs_test_cancel_1", amount_total=100))
    page = client.get(cancel_url, headers={"Accept": "text/html"})
    assert "Nothing was charged" in page.get_data(as_text=True)
    assert len(expire_calls(stripe)) == 1
    assert purchases(credits)[0].status == "expired"
    assert client.get(cancel_url).json["purchase"]["status"] == "expired"  # again: Stripe is not asked
    assert len(expire_calls(stripe)) == 1
    testing.mock_create_session(stripe, "cs_test_cancel_2")
    assert checkout_codes(client, 1) == [200]


def test_a_checkout_completed_before_the_cancel_page_loads_is_left_for_its_webhook(
    app, client, login, credits, stripe
):
    login("alice")
    cancel_url = started(client, stripe, "cs_test_done")
    error = {
        "type": "invalid_request_error",
        "message": "This Checkout Session is not in an expireable state.",
    }
    testing.mock_expire_session(stripe, {"id": "cs_test_done"}, status=400, error=error)
    assert client.get(cancel_url).json["purchase"]["status"] == "open"
    assert client.get(cancel_url).status_code == 200  # within CREDITS_SUCCESS_CHECK_INTERVAL: not asked
    assert len(expire_calls(stripe)) == 1
    with app.app_context():
        paid = testing.session_for("cs_test_done")
    delivered = testing.post_event(client, testing.event("checkout.session.completed", paid))
    assert delivered.json["outcome"] == "fulfilled"
    assert credits.balance("alice") == 100


@pytest.mark.parametrize(
    "attempt",
    [
        pytest.param(None, id="someone else's checkout"),
        pytest.param("chk_" + "0" * 32, id="an unknown attempt"),
        pytest.param("chk_%00", id="a NUL byte"),
        pytest.param("x" * 5000, id="five thousand characters"),
        pytest.param("' OR 1=1 --", id="SQL"),
    ],
)
def test_a_cancel_url_not_naming_the_users_own_checkout_changes_nothing(
    client, login, credits, stripe, attempt
):
    login("alice")
    cancel_url = started(client, stripe, "cs_test_alices")
    login("bob")
    url = cancel_url if attempt is None else f"/credits/cancel?attempt={attempt}"
    response = client.get(url)
    assert response.json == {"status": "cancelled", "purchase": None}
    assert expire_calls(stripe) == []
    assert purchases(credits)[0].status == "open"


# -- external URLs --------------------------------------------------------------------------------------


def sent_urls(rsps):
    form = parse_qs(rsps.calls[-1].request.body)
    return form["success_url"][0], form["cancel_url"][0]


@pytest.mark.parametrize(
    "origin",
    [
        pytest.param(
            "https://shop.example.com",
            marks=pytest.mark.config(SERVER_NAME=None, CREDITS_SITE_URL="https://shop.example.com/"),
            id="CREDITS_SITE_URL",
        ),
        pytest.param(
            "https://shop.example.com:8443",
            marks=pytest.mark.config(SERVER_NAME="shop.example.com:8443", PREFERRED_URL_SCHEME="https"),
            id="SERVER_NAME",
        ),
        # The control: in testing, with neither, the forged header does reach the URLs.
        pytest.param(
            "http://evil.example", marks=pytest.mark.config(SERVER_NAME=None), id="neither (testing)"
        ),
    ],
)
def test_a_forged_host_header_never_reaches_the_urls_sent_to_stripe(
    app, client, login, credits, stripe, origin
):
    testing.mock_create_session(stripe)
    login("alice")
    response = client.post("/credits/checkout", json={"quantity": 1}, headers={"Host": "evil.example"})
    assert response.status_code == 200
    success, cancel = sent_urls(stripe)
    assert success == f"{origin}/credits/success?session_id={{CHECKOUT_SESSION_ID}}"
    assert cancel == f"{origin}/credits/cancel?attempt={purchases(credits)[0].attempt_key}"


@pytest.mark.config(CREDITS_SITE_URL="https://shop.example.com")
def test_an_app_mounted_under_a_prefix_keeps_it_in_the_urls(app, client, login, credits, stripe):
    testing.mock_create_session(stripe)
    client.post("/_login/alice", base_url="http://shop.test/shop")
    response = client.post("/credits/checkout", json={"quantity": 1}, base_url="http://shop.test/shop")
    assert response.status_code == 200
    success, cancel = sent_urls(stripe)
    assert success.startswith("https://shop.example.com/shop/credits/success?")
    assert urlsplit(cancel).path == "/shop/credits/cancel"


@pytest.mark.config(SERVER_NAME=None, TRUSTED_HOSTS=["shop.example.com"])
def test_with_trusted_hosts_the_request_host_is_used_and_any_other_is_refused(client, credits, stripe):
    assert client.post("/_login/alice", headers={"Host": "shop.example.com"}).status_code == 200
    testing.mock_create_session(stripe)
    forged = client.post("/credits/checkout", json={"quantity": 1}, headers={"Host": "evil.example"})
    assert forged.status_code == 400
    assert len(stripe.calls) == 0
    trusted = client.post("/credits/checkout", json={"quantity": 1}, headers={"Host": "shop.example.com"})
    assert trusted.status_code == 200
    assert sent_urls(stripe)[0].startswith("http://shop.example.com/credits/success?")
