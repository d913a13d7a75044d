"""One Stripe Customer per wallet owner, passed to every Checkout Session, and POST /credits/portal:
the requests Stripe gets, one customer under concurrent first checkouts, failures, and the simulated
portal."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs

import pytest
import responses
import sqlalchemy as sa
from helpers import JSON_HEADERS, build_example_app, logged_in, signed_up

from flask_credits import testing
from flask_credits.services import customers

SECRET = "sk_test_51CustomersSecretKey"
CUSTOMERS = f"{testing.STRIPE_API}/v1/customers"
PORTAL = f"{testing.STRIPE_API}/v1/billing_portal/sessions"
HTML = {"Accept": "text/html"}


@pytest.fixture
def credits_config():
    return {
        "STRIPE_SECRET_KEY": SECRET,
        "STRIPE_WEBHOOK_SECRET": "whsec_test_1",
        "CREDITS_STRIPE_MAX_RETRIES": 0,
        "SERVER_NAME": "shop.test",
    }


def calls_to(stripe, url):
    return [c for c in stripe.calls if c.request.url == url]


def form_of(call):
    return parse_qs(call.request.body)


def session_customers(stripe):
    return [form_of(c)["customer"] for c in stripe.calls if "/checkout/sessions" in c.request.url]


def rows(credits):
    c = credits.tables.customers
    with credits.db.engine.connect() as conn:
        return conn.execute(sa.select(c).order_by(c.c.id)).all()


def purchase_count(credits):
    with credits.db.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(credits.tables.purchases)).scalar_one()


# -- the customer and the checkouts --------------------------------------------------------------------


def test_the_first_checkout_creates_the_users_customer_with_the_apps_details(client, login, credits, stripe):
    created = testing.mock_create_customer(stripe, "cus_test_alice")
    testing.mock_create_session(stripe)

    @credits.customer_details
    def details(user_id):
        return {"email": f" {user_id}@example.com ", "name": "Alice", "phone": "+1555"}

    login("alice")
    assert client.post("/credits/checkout", json={"quantity": 1}).status_code == 200
    (call,) = calls_to(stripe, CUSTOMERS)
    assert form_of(call) == {
        "email": ["alice@example.com"],
        "name": ["Alice"],
        "metadata[userId]": ["alice"],
    }
    (row,) = rows(credits)
    assert call.request.headers["Idempotency-Key"] == row.idempotency_key
    assert re.fullmatch(r"cus_[0-9a-f]{32}", row.idempotency_key)
    assert (row.user_id, row.stripe_customer_id) == ("alice", "cus_test_alice")
    assert session_customers(stripe) == [["cus_test_alice"]]
    assert [c["id"] for c in created] == ["cus_test_alice"]


@pytest.mark.parametrize("loader", [None, lambda user_id: None, lambda user_id: {"email": "", "name": 7}])
def test_without_details_the_customer_carries_only_the_user_id(client, login, credits, stripe, loader):
    testing.mock_create_session(stripe)
    if loader is not None:
        credits.customer_details(loader)
    login("alice")
    assert client.post("/credits/checkout", json={"quantity": 1}).status_code == 200
    (call,) = calls_to(stripe, CUSTOMERS)
    assert form_of(call) == {"metadata[userId]": ["alice"]}


def test_later_checkouts_and_the_users_api_keys_reuse_the_customer(client, login, credits, stripe):
    testing.mock_create_session(stripe)

    @credits.wallet_checker
    def owns(user_id, key_id):
        return (user_id, key_id) in {("alice", None), ("alice", "key-1")}

    login("alice")
    for body in ({"quantity": 1}, {"quantity": 2}, {"quantity": 1, "key_id": "key-1"}):
        assert client.post("/credits/checkout", json=body).status_code == 200
    assert len(calls_to(stripe, CUSTOMERS)) == 1
    (row,) = rows(credits)
    assert session_customers(stripe) == [[row.stripe_customer_id]] * 3


def test_each_user_has_a_customer_of_their_own(app, credits, stripe):
    testing.mock_create_session(stripe)
    for user in ("alice", "bob"):
        assert logged_in(app, user).post("/credits/checkout", json={"quantity": 1}).status_code == 200
    found = rows(credits)
    assert [r.user_id for r in found] == ["alice", "bob"]
    assert len({r.stripe_customer_id for r in found}) == len({r.idempotency_key for r in found}) == 2


@pytest.mark.config(CREDITS_MAX_OPEN_PURCHASES=20)
def test_concurrent_first_checkouts_create_one_customer(app, credits, stripe, backend):
    """Eight first checkouts of one user at once, released by a barrier: one row wins the unique key,
    every request sends its key, and Stripe (replaying the key) creates one customer."""
    created = testing.mock_create_customer(stripe)
    testing.mock_create_session(stripe)
    racers = 8
    clients = [logged_in(app) for _ in range(racers)]
    barrier = threading.Barrier(racers, timeout=60)

    def checkout(racer):
        barrier.wait()
        return racer.post("/credits/checkout", json={"quantity": 1}).status_code

    with ThreadPoolExecutor(max_workers=racers) as pool:
        codes = list(pool.map(checkout, clients, timeout=120))
    assert codes == [200] * racers
    (row,) = rows(credits)
    assert len(created) == 1
    assert row.stripe_customer_id == created[0]["id"]
    assert {c.request.headers["Idempotency-Key"] for c in calls_to(stripe, CUSTOMERS)} == {
        row.idempotency_key
    }
    assert session_customers(stripe) == [[row.stripe_customer_id]] * racers


def test_a_crash_between_stripes_answer_and_the_row_gets_the_same_customer_next_time(
    app, credits, stripe, monkeypatch
):
    created = testing.mock_create_customer(stripe)
    real_store = customers._store

    def crash(*args):
        raise RuntimeError("the worker died here")

    monkeypatch.setattr(customers, "_store", crash)
    with pytest.raises(RuntimeError):
        credits.customer_id("alice")
    assert rows(credits)[0].stripe_customer_id is None
    monkeypatch.setattr(customers, "_store", real_store)
    assert credits.customer_id("alice") == created[0]["id"]
    assert len(created) == 1
    first, second = (c.request.headers["Idempotency-Key"] for c in calls_to(stripe, CUSTOMERS))
    assert first == second == rows(credits)[0].idempotency_key


@pytest.mark.parametrize(
    ("status", "error", "text"),
    [
        (
            401,
            {"type": "invalid_request_error", "message": "Invalid API Key provided: sk_test_****Key"},
            "not configured",
        ),
        (429, {"type": "invalid_request_error", "code": "rate_limit", "message": "Too many"}, "busy"),
        (500, {"type": "api_error", "message": "boom"}, "problem"),
    ],
)
def test_stripe_failing_to_create_the_customer_is_a_502_and_no_purchase(
    client, login, credits, stripe, status, error, text
):
    testing.mock_create_customer(stripe, status=status, error=error)
    testing.mock_create_session(stripe)
    login("alice")
    response = client.post("/credits/checkout", json={"quantity": 1})
    assert (response.status_code, response.json["error"]) == (502, "payment_provider_error")
    assert text in response.json["message"]
    assert SECRET not in response.get_data(as_text=True)
    assert purchase_count(credits) == 0
    assert not [c for c in stripe.calls if "/checkout/sessions" in c.request.url]
    # Only the key the next attempt sends (a new one after a 500, which Stripe would replay).
    assert [r.stripe_customer_id for r in rows(credits)] == [None]


def test_after_a_server_error_the_next_attempt_sends_a_new_key(client, login, credits, stripe):
    testing.mock_create_customer(stripe, status=500, error={"type": "api_error", "message": "boom"})
    testing.mock_create_session(stripe)
    login("alice")
    assert client.post("/credits/checkout", json={"quantity": 1}).status_code == 502
    created = testing.mock_create_customer(stripe)
    assert client.post("/credits/checkout", json={"quantity": 1}).status_code == 200
    first, second = (c.request.headers["Idempotency-Key"] for c in calls_to(stripe, CUSTOMERS))
    assert first != second
    assert rows(credits)[0].stripe_customer_id == created[0]["id"]


def test_a_key_in_use_at_stripe_waits_for_the_request_holding_it(credits, stripe, monkeypatch):
    monkeypatch.setattr(customers, "CONFLICT_PAUSES", (0.0,))
    in_use = {"type": "idempotency_error", "code": "idempotency_key_in_use", "message": "in use"}
    stripe.add(responses.POST, CUSTOMERS, json={"error": in_use}, status=409)
    stripe.add(responses.POST, CUSTOMERS, json={"id": "cus_test_after", "object": "customer"})
    assert credits.customer_id("alice") == "cus_test_after"
    first, second = (c.request.headers["Idempotency-Key"] for c in calls_to(stripe, CUSTOMERS))
    assert first == second


def test_details_stripe_refuses_are_left_out_rather_than_blocking_payment(credits, stripe):
    credits.customer_details(lambda user_id: {"email": "not-an-email"})
    bad = {"type": "invalid_request_error", "param": "email", "message": "Invalid email address"}
    stripe.add(responses.POST, CUSTOMERS, json={"error": bad}, status=400)
    stripe.add(responses.POST, CUSTOMERS, json={"id": "cus_test_bare", "object": "customer"})
    assert credits.customer_id("alice") == "cus_test_bare"
    refused, bare = calls_to(stripe, CUSTOMERS)
    assert form_of(bare) == {"metadata[userId]": ["alice"]}
    assert bare.request.headers["Idempotency-Key"] == refused.request.headers["Idempotency-Key"] + "-bare"


def test_one_user_one_row_and_one_customer_one_user(credits, db):
    c = credits.tables.customers
    now = credits.now()
    row = {"stripe_customer_id": "cus_1", "created_at": now, "updated_at": now}
    with db.engine.begin() as conn:
        conn.execute(sa.insert(c).values(user_id="alice", idempotency_key="k1", **row))
    for other in ({"user_id": "alice", "stripe_customer_id": "cus_2"}, {"user_id": "bob"}):
        with pytest.raises(sa.exc.IntegrityError), db.engine.begin() as conn:
            conn.execute(sa.insert(c).values({**row, "idempotency_key": "k2", **other}))


# -- the portal ----------------------------------------------------------------------------------------


def test_the_portal_sends_the_user_to_a_session_returning_to_the_credits_page(client, login, credits, stripe):
    testing.mock_create_session(stripe)
    testing.mock_create_portal_session(stripe)
    login("alice")
    client.post("/credits/checkout", json={"quantity": 1})
    response = client.post("/credits/portal", headers=HTML)
    assert response.status_code == 303
    assert response.headers["Location"].startswith("https://billing.stripe.com/p/session/bps_test_")
    (call,) = calls_to(stripe, PORTAL)
    assert form_of(call) == {
        "customer": [rows(credits)[0].stripe_customer_id],
        "return_url": ["http://shop.test/credits/"],
    }
    as_json = client.post("/credits/portal", headers=JSON_HEADERS)
    assert as_json.status_code == 200
    assert list(as_json.json) == ["url"]
    assert as_json.json["url"].startswith("https://billing.stripe.com/p/session/")
    assert len(calls_to(stripe, CUSTOMERS)) == 1


def test_the_portal_creates_the_customer_of_a_user_who_has_none(client, login, credits, stripe):
    created = testing.mock_create_customer(stripe)
    testing.mock_create_portal_session(stripe)
    login("bob")
    assert client.post("/credits/portal", headers=JSON_HEADERS).status_code == 200
    (call,) = calls_to(stripe, PORTAL)
    assert form_of(call)["customer"] == [created[0]["id"]] == [rows(credits)[0].stripe_customer_id]


def test_the_portal_refuses_anonymous_users_and_api_keys(client, login, credits, stripe):
    assert client.post("/credits/portal", headers=JSON_HEADERS).status_code == 401

    @credits.wallet_loader
    def with_a_key():
        return ("alice", "key-1")

    response = client.post("/credits/portal", headers=JSON_HEADERS)
    assert (response.status_code, response.json["error"]) == (403, "forbidden")
    assert len(stripe.calls) == 0
    assert rows(credits) == []


def test_a_portal_not_set_up_in_the_dashboard_is_a_clear_502(client, login, stripe):
    testing.mock_create_customer(stripe)
    message = "No configuration provided and your test mode default configuration has not been created."
    testing.mock_create_portal_session(
        stripe, status=400, error={"type": "invalid_request_error", "message": message}
    )
    login("alice")
    response = client.post("/credits/portal", headers=JSON_HEADERS)
    assert response.status_code == 502
    assert response.json == {
        "error": "payment_provider_error",
        "message": "Billing management is not available on this site yet.",
    }


def test_the_credits_page_offers_manage_billing_once_the_user_has_a_customer(client, login, stripe):
    testing.mock_create_session(stripe)
    login("alice")
    assert "Manage billing" not in client.get("/credits/", headers=HTML).get_data(as_text=True)
    client.post("/credits/checkout", json={"quantity": 1})
    page = client.get("/credits/", headers=HTML).get_data(as_text=True)
    assert 'action="/credits/portal"' in page
    assert "Manage billing" in page


# -- the simulated portal, the example app and CSRF ---------------------------------------------------


@pytest.fixture
def example(empty_database):
    from example_app.models import db

    app = build_example_app(empty_database, WTF_CSRF_ENABLED=True)
    with app.app_context():
        db.create_all()
    yield app
    with app.app_context():
        db.engine.dispose()


def page_token(client, path="/credits/"):
    """The CSRF token of the credits page's forms (rendered by credits/_csrf.html)."""
    found = re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).get_data(as_text=True))
    assert found is not None
    return found.group(1)


def test_simulated_mode_from_checkout_to_the_portal_and_back(example):
    with responses.RequestsMock():  # any request to Stripe would fail the test
        client = example.test_client()
        signed_up(client, "ada")
        token = page_token(client)
        assert "Manage billing" not in client.get("/credits/").get_data(as_text=True)
        start = client.post("/credits/checkout", data={"quantity": "1", "csrf_token": token})
        assert start.status_code == 303
        page = client.get("/credits/").get_data(as_text=True)
        assert "Manage billing" in page
        portal = client.post("/credits/portal", data={"csrf_token": page_token(client)})
        assert portal.status_code == 303
        assert portal.headers["Location"].endswith("/credits/simulated-portal")
        shown = client.get(portal.headers["Location"]).get_data(as_text=True)
        customer = re.search(r'data-testid="customer">(cus_sim_[0-9a-f]+)<', shown)
        assert customer is not None
        assert 'href="/credits/"' in shown
        with example.app_context():
            from example_app.extensions import credits

            user_id = client.get("/credits/balance", headers=JSON_HEADERS).json["user_id"]
            assert credits.customer_id(user_id) == customer.group(1)


def test_the_portal_needs_the_csrf_token(example):
    with responses.RequestsMock():
        client = example.test_client()
        signed_up(client, "ada")
        assert client.post("/credits/portal", data={}).status_code == 400
        assert client.post("/credits/portal", data={"csrf_token": "forged"}).status_code == 400


def test_the_simulated_portal_shows_only_the_users_own_customer(example):
    with responses.RequestsMock():
        client = example.test_client()
        signed_up(client, "ada")
        assert client.get("/credits/simulated-portal").status_code == 404  # no customer yet
        anonymous = example.test_client().get("/credits/simulated-portal")
        assert anonymous.status_code == 302  # the example app sends anonymous users to log in
        assert anonymous.headers["Location"].startswith("/login")


def test_there_is_no_simulated_portal_in_live_mode(client, login):
    login("alice")
    assert client.get("/credits/simulated-portal").status_code == 404
