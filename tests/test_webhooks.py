"""The Stripe webhook: signatures, exactly-once fulfilment, every event type, refunds and disputes."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import responses
import sqlalchemy as sa
from flask_wtf.csrf import CSRFProtect
from helpers import logged_in

from flask_credits import testing
from flask_credits.services import purchases

WHSEC = "whsec_test_current"


@pytest.fixture
def credits_config():
    return {
        "STRIPE_SECRET_KEY": "sk_test_webhooks",
        "STRIPE_WEBHOOK_SECRET": WHSEC,
        "CREDITS_STRIPE_MAX_RETRIES": 0,
        "CREDITS_PACKS": {"starter": {"credits": 500, "amount": 400}},
    }


@pytest.fixture
def buy(app, client, login, stripe):
    """Start a checkout for ``user`` and return its session id (the purchase row is pending)."""
    counter = iter(range(1, 1000))

    def start(user="alice", **data):
        session_id = f"cs_test_{user}_{next(counter)}"
        testing.mock_create_session(stripe, session_id)
        login(user)
        response = client.post("/credits/checkout", json=data or {"quantity": 2})
        assert response.status_code == 200, response.json
        return session_id

    return start


def session(app, session_id, **kwargs):
    with app.app_context():
        return testing.session_for(session_id, **kwargs)


def deliver(client, event_type, obj, **kwargs):
    return testing.post_event(client, testing.event(event_type, obj, **kwargs))


def purchase(credits, session_id):
    p = credits.tables.purchases
    with credits.db.engine.connect() as conn:
        return conn.execute(sa.select(p).where(p.c.session_id == session_id)).one()


def events(credits):
    t = credits.tables.stripe_events
    with credits.db.engine.connect() as conn:
        return {r.id: r.outcome for r in conn.execute(sa.select(t))}


def names(received):
    return [n for n, _, _ in received]


# -- signatures and bad bodies ------------------------------------------------------------------


def signed(payload, secret=WHSEC, timestamp=None):
    return {"Stripe-Signature": testing.sign(payload, secret, timestamp), "Content-Type": "application/json"}


@pytest.fixture
def paid_payload(app, buy):
    sid = buy()
    return json.dumps(testing.event("checkout.session.completed", session(app, sid))), sid


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (lambda p: {}, "missing Stripe-Signature"),
        (lambda p: {"Stripe-Signature": "garbage"}, "no valid signature"),
        (lambda p: {"Stripe-Signature": "t=abc,v1=def"}, "no valid signature"),
        (lambda p: signed(p, "whsec_wrong"), "no valid signature"),
        (lambda p: signed(p, timestamp=int(time.time()) - 301), "too old"),
        (lambda p: signed(p, timestamp=int(time.time()) + 3600), "in the future"),
        (lambda p: {"Stripe-Signature": testing.sign(p, WHSEC).replace("v1=", "v0=")}, "no valid signature"),
    ],
)
def test_bad_signatures_are_400_and_write_nothing(client, credits, paid_payload, headers, message):
    payload, sid = paid_payload
    response = client.post("/credits/stripe-webhook", data=payload, headers=headers(payload))
    assert response.status_code == 400
    assert message in response.json["message"]
    assert events(credits) == {}
    assert purchase(credits, sid).status == "open"
    assert credits.balance("alice") == 0


def test_a_reserialised_body_fails_the_signature(client, credits, paid_payload):
    payload, _ = paid_payload
    reserialised = json.dumps(json.loads(payload), indent=2)
    response = client.post("/credits/stripe-webhook", data=reserialised, headers=signed(payload))
    assert response.status_code == 400
    assert credits.balance("alice") == 0


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[1, 2]",
        '{"object": "event"}',
        '{"id": "evt_1", "object": "event", "type": "x", "data": 5}',
    ],
)
def test_signed_bodies_that_are_not_stripe_events_are_400(client, credits, body):
    response = client.post("/credits/stripe-webhook", data=body, headers=signed(body))
    assert response.status_code == 400
    assert events(credits) == {}


def test_a_body_that_is_not_utf8_is_400(client, credits):
    body = b"\xff\xfe{}"
    response = client.post("/credits/stripe-webhook", data=body, headers={"Stripe-Signature": "t=1,v1=00"})
    assert response.status_code == 400


def test_a_huge_body_is_refused_before_anything_else(client, credits):
    body = "x" * (256 * 1024 + 1)
    response = client.post("/credits/stripe-webhook", data=body, headers=signed(body))
    assert response.status_code == 413
    assert events(credits) == {}


@pytest.mark.config(STRIPE_WEBHOOK_SECRET=["whsec_old", WHSEC])
def test_rotated_secrets_are_all_accepted(app, client, credits, buy, build_app):
    sid = buy()
    stripe_event = testing.event("checkout.session.completed", session(app, sid))
    assert testing.post_event(client, stripe_event, secret="whsec_old").status_code == 200
    # The same shop restarted with the secrets as one comma-separated string, the old one dropped.
    rotated, _, _ = build_app(STRIPE_WEBHOOK_SECRET=f"{WHSEC}, whsec_next")
    again = testing.event("checkout.session.async_payment_succeeded", session(app, sid))
    assert testing.post_event(rotated.test_client(), again, secret="whsec_next").status_code == 200
    dropped = testing.event("checkout.session.completed", session(app, sid))
    assert testing.post_event(rotated.test_client(), dropped, secret="whsec_old").status_code == 400
    assert credits.balance("alice") == 200


@pytest.mark.config(STRIPE_WEBHOOK_SECRET=None)
def test_no_secret_configured_refuses_everything(app, client, credits, paid_payload):
    payload, _ = paid_payload
    response = client.post("/credits/stripe-webhook", data=payload, headers=signed(payload))
    assert response.status_code == 400
    assert "no webhook secret" in response.json["message"]


def test_webhook_needs_no_login_and_no_csrf_token(app, client, credits, buy):
    app.config["WTF_CSRF_ENABLED"] = False
    CSRFProtect(app)  # set up after FlaskCredits, as apps often do
    sid = buy()
    app.config["WTF_CSRF_ENABLED"] = True
    response = deliver(client, "checkout.session.completed", session(app, sid))
    assert response.status_code == 200
    assert credits.balance("alice") == 200
    form = client.post("/credits/checkout", data={"quantity": "1"})
    assert form.status_code == 400  # the purchase form itself is CSRF-protected


# -- fulfilment -----------------------------------------------------------------------------------


def test_completed_paid_session_credits_the_wallet_once(app, client, credits, buy, received):
    sid = buy(quantity=3)
    stripe_event = testing.event("checkout.session.completed", session(app, sid))
    first = testing.post_event(client, stripe_event)
    assert first.json == {"received": True, "id": stripe_event["id"], "outcome": "fulfilled"}
    second = testing.post_event(client, stripe_event)
    assert second.json["outcome"] == "duplicate"
    assert credits.balance("alice") == 300
    row = purchase(credits, sid)
    assert (row.status, row.payment_intent is not None) == ("fulfilled", True)
    assert names(received).count("credits_purchased") == 1
    _, sender, kwargs = next(r for r in received if r[0] == "credits_purchased")
    assert (sender, kwargs["amount"], kwargs["purchase"].session_id) == (app, 300, sid)
    # The signal's purchase is the row as the crediting transaction left it.
    assert kwargs["purchase"] == purchases.find(credits, session_id=sid)
    assert credits.audit() == []


def test_different_events_for_one_session_credit_once(app, client, credits, buy):
    sid = buy()
    paid = session(app, sid)
    assert deliver(client, "checkout.session.completed", paid).json["outcome"] == "fulfilled"
    assert (
        deliver(client, "checkout.session.async_payment_succeeded", paid).json["outcome"]
        == "already_fulfilled"
    )
    assert credits.balance("alice") == 200
    assert len(events(credits)) == 2


def test_pack_purchase_credits_the_pack(app, client, credits, buy):
    sid = buy(pack="starter")
    deliver(client, "checkout.session.completed", session(app, sid))
    assert credits.balance("alice") == 500


def test_metadata_naming_another_user_is_ignored(app, client, credits, buy):
    sid = buy("alice")
    forged = session(app, sid)
    forged["metadata"] = {"userId": "bob", "credits": "1000000"}
    deliver(client, "checkout.session.completed", forged)
    assert (credits.balance("alice"), credits.balance("bob")) == (200, 0)


def test_a_session_this_app_did_not_create_is_recorded_not_credited(client, credits):
    foreign = testing.checkout_session("cs_test_foreign", amount_total=100, metadata={"userId": "alice"})
    response = deliver(client, "checkout.session.completed", foreign)
    assert (response.status_code, response.json["outcome"]) == (200, "unknown_session")
    assert credits.balance("alice") == 0
    assert list(events(credits).values()) == ["unknown_session"]


@pytest.mark.parametrize(("field", "value"), [("amount_total", 1), ("currency", "eur")])
def test_amount_or_currency_mismatch_is_not_credited(app, client, credits, buy, field, value):
    sid = buy()
    tampered = session(app, sid)
    tampered[field] = value
    assert deliver(client, "checkout.session.completed", tampered).json["outcome"] == "amount_mismatch"
    assert credits.balance("alice") == 0
    assert purchase(credits, sid).status == "mismatch"
    assert (
        deliver(client, "checkout.session.completed", session(app, sid)).json["outcome"] == "not_fulfillable"
    )
    assert credits.balance("alice") == 0


def test_delayed_payment_waits_then_succeeds(app, client, credits, buy):
    sid = buy()
    assert (
        deliver(client, "checkout.session.completed", session(app, sid, payment_status="unpaid")).json[
            "outcome"
        ]
        == "awaiting_payment"
    )
    assert (purchase(credits, sid).status, credits.balance("alice")) == ("unpaid", 0)
    deliver(client, "checkout.session.async_payment_succeeded", session(app, sid))
    assert (purchase(credits, sid).status, credits.balance("alice")) == ("fulfilled", 200)


def test_async_success_before_completed_arrives_credits_once(app, client, credits, buy):
    sid = buy()
    deliver(client, "checkout.session.async_payment_succeeded", session(app, sid))
    deliver(client, "checkout.session.completed", session(app, sid, payment_status="unpaid"))
    assert (purchase(credits, sid).status, credits.balance("alice")) == ("fulfilled", 200)


def test_delayed_payment_failure_marks_failed_and_signals(app, client, credits, buy, received):
    sid = buy()
    deliver(client, "checkout.session.completed", session(app, sid, payment_status="unpaid"))
    deliver(client, "checkout.session.async_payment_failed", session(app, sid, payment_status="unpaid"))
    assert (purchase(credits, sid).status, credits.balance("alice")) == ("failed", 0)
    assert names(received).count("credits_payment_failed") == 1


def test_expired_session_is_marked_expired(app, client, credits, buy):
    sid = buy()
    deliver(client, "checkout.session.expired", session(app, sid, payment_status="unpaid"))
    assert purchase(credits, sid).status == "expired"


def test_other_event_types_are_recorded_as_ignored(client, credits):
    response = deliver(client, "customer.created", {"id": "cus_1", "object": "customer"})
    assert (response.status_code, response.json["outcome"]) == (200, "ignored")


def test_webhook_arriving_before_the_checkout_view_saved_the_session_still_credits(
    app, client, credits, login, stripe
):
    """Stripe can deliver before POST /checkout has stored the session id: the client_reference_id
    (our attempt key) finds the pending row."""
    login("alice")
    p = credits.tables.purchases

    def reply(request):
        from urllib.parse import parse_qs

        reference = parse_qs(request.body)["client_reference_id"][0]
        early = testing.checkout_session("cs_test_early", amount_total=200, client_reference_id=reference)
        assert deliver(client, "checkout.session.completed", early).json["outcome"] == "fulfilled"
        body = testing.checkout_session(
            "cs_test_early", amount_total=200, status="open", payment_status="unpaid"
        )
        return 200, {}, json.dumps(body)

    testing.mock_create_customer(stripe)
    stripe.add_callback(responses.POST, f"{testing.STRIPE_API}/v1/checkout/sessions", callback=reply)
    assert client.post("/credits/checkout", json={"quantity": 2}).status_code == 200
    with credits.db.engine.connect() as conn:
        row = conn.execute(sa.select(p)).one()
    assert (row.session_id, row.status) == ("cs_test_early", "fulfilled")
    assert credits.balance("alice") == 200


# -- the success page ---------------------------------------------------------------------------


def test_success_page_fulfils_from_the_session_fetched_from_stripe(app, client, credits, buy, stripe):
    sid = buy()
    testing.mock_retrieve_session(stripe, session(app, sid))
    page = client.get(f"/credits/success?session_id={sid}", headers={"Accept": "text/html"})
    assert page.status_code == 200
    assert "200 credits were added" in page.get_data(as_text=True)
    assert credits.balance("alice") == 200
    deliver(client, "checkout.session.completed", session(app, sid))  # the late webhook
    assert credits.balance("alice") == 200


def test_success_page_with_an_unpaid_session_credits_nothing(app, client, credits, buy, stripe):
    sid = buy()
    testing.mock_retrieve_session(stripe, session(app, sid, payment_status="unpaid"))
    response = client.get(f"/credits/success?session_id={sid}", headers={"Accept": "application/json"})
    assert response.json["purchase"]["status"] == "unpaid"
    assert credits.balance("alice") == 0


def test_success_page_for_someone_elses_session_is_404(app, client, credits, buy, login, stripe):
    sid = buy("alice")
    login("bob")
    assert client.get(f"/credits/success?session_id={sid}").status_code == 404
    assert client.get("/credits/success?session_id=cs_test_made_up").status_code == 404
    assert client.get("/credits/success").status_code == 400
    assert len([c for c in stripe.calls if c.request.method == "GET"]) == 0
    assert credits.balance("alice") == 0


def retrieves(rsps):
    return len([c for c in rsps.calls if c.request.method == "GET"])


def test_success_page_asks_stripe_once_per_interval_however_often_it_is_loaded(
    app, client, credits, buy, stripe, clock
):
    sid = buy()
    testing.mock_retrieve_session(stripe, session(app, sid, payment_status="unpaid", status="open"))
    for _ in range(10):
        response = client.get(f"/credits/success?session_id={sid}", headers={"Accept": "application/json"})
        assert (response.status_code, response.json["purchase"]["status"]) == (200, "open")
    assert retrieves(stripe) == 1
    clock.advance(seconds=4.9)  # CREDITS_SUCCESS_CHECK_INTERVAL is 5
    assert client.get(f"/credits/success?session_id={sid}").status_code == 200
    assert retrieves(stripe) == 1
    clock.advance(seconds=0.1)
    for _ in range(3):
        assert client.get(f"/credits/success?session_id={sid}").status_code == 200
    assert retrieves(stripe) == 2


def test_a_success_page_not_asking_stripe_shows_what_the_webhook_stored(app, client, credits, buy, stripe):
    sid = buy()
    testing.mock_retrieve_session(stripe, session(app, sid, payment_status="unpaid", status="open"))
    page = client.get(f"/credits/success?session_id={sid}", headers={"Accept": "text/html"})
    assert "Waiting for payment" in page.get_data(as_text=True)
    deliver(client, "checkout.session.completed", session(app, sid))
    page = client.get(f"/credits/success?session_id={sid}", headers={"Accept": "text/html"})
    assert "200 credits were added" in page.get_data(as_text=True)
    assert retrieves(stripe) == 1


def test_success_pages_loaded_at_once_ask_stripe_once(app, credits, buy, stripe):
    """The conditional UPDATE of checked_at decides, so threads (or processes) agree."""
    sid = buy()
    testing.mock_retrieve_session(stripe, session(app, sid, payment_status="unpaid", status="open"))
    racers = 10
    clients = [logged_in(app) for _ in range(racers)]
    barrier = threading.Barrier(racers, timeout=60)

    def load(racer):
        barrier.wait()
        return racer.get(f"/credits/success?session_id={sid}").status_code

    with ThreadPoolExecutor(max_workers=racers) as pool:
        assert list(pool.map(load, clients, timeout=120)) == [200] * racers
    assert retrieves(stripe) == 1


def test_cancel_page(client, login):
    login("alice")
    assert "Nothing was charged" in client.get("/credits/cancel", headers={"Accept": "text/html"}).get_data(
        as_text=True
    )


# -- refunds and disputes -----------------------------------------------------------------------


@pytest.fixture
def bought(app, client, credits, buy):
    """Alice bought 1000 credits for 10.00 USD; returns (session id, payment intent)."""
    sid = buy(quantity=10)
    paid = session(app, sid, payment_intent="pi_test_bought")
    deliver(client, "checkout.session.completed", paid)
    assert credits.balance("alice") == 1000
    return sid, "pi_test_bought"


def refund(client, pi, refunded, **kwargs):
    return deliver(
        client, "charge.refunded", testing.charge(pi, amount=1000, amount_refunded=refunded), **kwargs
    )


def test_full_refund_claws_back_every_credit(client, credits, bought, received):
    _, pi = bought
    assert refund(client, pi, 1000).json["outcome"] == "revoked"
    assert credits.balance("alice") == 0
    assert credits.history("alice")[0].kind == "revoke"
    kwargs = next(kw for n, _, kw in received if n == "credits_revoked")
    assert (kwargs["amount"], kwargs["cause"]) == (1000, "refund")
    assert credits.audit() == []


def test_partial_refunds_add_up(client, credits, bought):
    _, pi = bought
    refund(client, pi, 250)
    assert credits.balance("alice") == 750
    refund(client, pi, 600)  # cumulative: 600 of 1000 refunded in all
    assert credits.balance("alice") == 400
    assert refund(client, pi, 600).json["outcome"] == "unchanged"  # a new event, same total
    assert credits.balance("alice") == 400
    assert credits.audit() == []


def test_a_late_refund_event_with_a_smaller_total_gives_nothing_back(client, credits, bought):
    _, pi = bought
    refund(client, pi, 600)
    assert refund(client, pi, 250).json["outcome"] == "unchanged"  # delivered out of order
    assert credits.balance("alice") == 400
    assert credits.audit() == []


def test_replayed_refund_event_changes_nothing(client, credits, bought):
    _, pi = bought
    stripe_event = testing.event("charge.refunded", testing.charge(pi, amount=1000, amount_refunded=500))
    testing.post_event(client, stripe_event)
    assert testing.post_event(client, stripe_event).json["outcome"] == "duplicate"
    assert credits.balance("alice") == 500


def test_refund_after_spending_leaves_debt_that_the_next_purchase_pays_first(
    app, client, credits, bought, buy
):
    _, pi = bought
    credits.spend("alice", 900, reason="big job")
    refund(client, pi, 1000)
    assert credits.balance("alice") == 0  # never below zero
    w = credits.tables.wallets
    with credits.db.engine.connect() as conn:
        assert conn.execute(sa.select(w.c.debt).where(w.c.user_id == "alice")).scalar_one() == 900
    sid = buy(quantity=10)
    deliver(client, "checkout.session.completed", session(app, sid))
    assert credits.balance("alice") == 100
    with credits.db.engine.connect() as conn:
        assert conn.execute(sa.select(w.c.debt).where(w.c.user_id == "alice")).scalar_one() == 0
    assert [e.kind for e in credits.history("alice")][:2] == ["debt", "purchase"]
    assert credits.audit() == []


def test_refund_before_the_purchase_event_arrives_fulfils_then_claws_back(app, client, credits, buy, stripe):
    sid = buy()
    pi = "pi_test_early_refund"
    testing.mock_find_session(stripe, pi, session(app, sid, payment_intent=pi))
    response = deliver(client, "charge.refunded", testing.charge(pi, amount=200, amount_refunded=200))
    assert response.json["outcome"] == "revoked"
    assert credits.balance("alice") == 0
    deliver(client, "checkout.session.completed", session(app, sid, payment_intent=pi))
    assert credits.balance("alice") == 0  # the late completion does not credit again
    assert [e.kind for e in credits.history("alice")] == ["revoke", "purchase"]


def test_refund_for_a_payment_this_app_does_not_know_is_recorded(client, credits, stripe):
    testing.mock_find_session(stripe, "pi_test_unknown", None)
    testing.mock_find_invoice(stripe, "pi_test_unknown", None)
    response = deliver(
        client, "charge.refunded", testing.charge("pi_test_unknown", amount=100, amount_refunded=100)
    )
    assert (response.status_code, response.json["outcome"]) == (200, "unmatched")


def test_dispute_lost_claws_back_and_won_gives_back(client, credits, bought, received):
    _, pi = bought
    credits.spend("alice", 300, reason="job")
    deliver(client, "charge.dispute.funds_withdrawn", testing.dispute(pi, amount=1000))
    assert credits.balance("alice") == 0
    deliver(client, "charge.dispute.closed", testing.dispute(pi, amount=1000, status="lost"))
    assert credits.balance("alice") == 0
    deliver(client, "charge.dispute.funds_reinstated", testing.dispute(pi, amount=1000))
    assert credits.balance("alice") == 700
    w = credits.tables.wallets
    with credits.db.engine.connect() as conn:
        assert conn.execute(sa.select(w.c.debt).where(w.c.user_id == "alice")).scalar_one() == 0
    causes = [kw["cause"] for n, _, kw in received if n == "credits_revoked"]
    assert causes == ["dispute", "dispute"]
    assert credits.audit() == []


def test_dispute_closed_won_after_withdrawal_gives_back(client, credits, bought):
    _, pi = bought
    deliver(client, "charge.dispute.funds_withdrawn", testing.dispute(pi, amount=400))
    assert credits.balance("alice") == 600
    deliver(client, "charge.dispute.closed", testing.dispute(pi, amount=400, status="won"))
    assert credits.balance("alice") == 1000
    assert credits.audit() == []


def test_dispute_warning_closed_moves_nothing(client, credits, bought):
    _, pi = bought
    response = deliver(
        client, "charge.dispute.closed", testing.dispute(pi, amount=1000, status="warning_closed")
    )
    assert response.json["outcome"] == "ignored"
    assert credits.balance("alice") == 1000


# -- failures and concurrency ---------------------------------------------------------------------


def test_database_failure_mid_webhook_is_5xx_leaves_nothing_and_the_retry_credits(
    app, client, credits, db, buy
):
    sid = buy()
    stripe_event = testing.event("checkout.session.completed", session(app, sid))
    fail = {"armed": True}

    @sa.event.listens_for(db.engine, "before_cursor_execute")
    def drop_connection(conn, cursor, statement, parameters, context, executemany):
        if fail["armed"] and statement.startswith("INSERT INTO credits_lots"):
            fail["armed"] = False
            raise sa.exc.OperationalError(statement, parameters, Exception("server closed the connection"))

    try:
        response = testing.post_event(client, stripe_event)
        assert response.status_code == 503
        assert (events(credits), purchase(credits, sid).status, credits.balance("alice")) == ({}, "open", 0)
        retry = testing.post_event(client, stripe_event)
        assert (retry.status_code, retry.json["outcome"]) == (200, "fulfilled")
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", drop_connection)
    assert credits.balance("alice") == 200
    assert credits.audit() == []


def test_concurrent_duplicate_deliveries_credit_once(app, credits, buy, backend):
    sid = buy(quantity=5)
    stripe_event = testing.event("checkout.session.completed", session(app, sid))
    payload = json.dumps(stripe_event)
    threads_n = 4 if backend == "sqlite" else 12
    barrier = threading.Barrier(threads_n)
    answers = []

    def post():
        client = app.test_client()
        barrier.wait(timeout=30)
        answers.append(
            client.post("/credits/stripe-webhook", data=payload, headers=signed(payload)).status_code
        )

    threads = [threading.Thread(target=post) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert answers == [200] * threads_n
    assert credits.balance("alice") == 500
    assert len(events(credits)) == 1
    assert credits.audit() == []


def test_webhook_and_success_page_racing_credit_once(app, credits, buy, stripe):
    sid = buy(quantity=4)
    paid = session(app, sid)
    testing.mock_retrieve_session(stripe, paid)
    barrier = threading.Barrier(6)
    codes = []

    def webhook():
        client = app.test_client()
        barrier.wait(timeout=30)
        codes.append(deliver(client, "checkout.session.completed", paid).status_code)

    def success_page():
        client = logged_in(app)
        barrier.wait(timeout=30)
        codes.append(client.get(f"/credits/success?session_id={sid}").status_code)

    threads = [threading.Thread(target=f) for f in (webhook, success_page) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert codes == [200] * 6
    assert credits.balance("alice") == 400
    assert credits.audit() == []


@pytest.mark.parametrize(
    ("data", "lifetime"),
    [
        pytest.param(
            {"quantity": 2},
            timedelta(hours=1),
            marks=pytest.mark.config(CREDITS_PURCHASE_EXPIRES_AFTER=3600),
            id="seconds",
        ),
        pytest.param(
            {"quantity": 2},
            timedelta(days=2),
            marks=pytest.mark.config(CREDITS_PURCHASE_EXPIRES_AFTER=timedelta(days=2)),
            id="timedelta",
        ),
        pytest.param(
            {"pack": "trial"},
            timedelta(minutes=1),
            marks=pytest.mark.config(
                CREDITS_PACKS={"trial": {"credits": 200, "amount": 200, "expires_after": 60}}
            ),
            id="pack",
        ),
    ],
)
def test_purchased_credits_expire_when_configured(app, client, credits, buy, clock, data, lifetime):
    sid = buy(**data)
    deliver(client, "checkout.session.completed", session(app, sid))
    assert credits.balance("alice") == 200
    clock.advance(seconds=lifetime.total_seconds() - 1)
    assert credits.balance("alice") == 200
    clock.advance(seconds=2)
    assert credits.balance("alice") == 0
    assert credits.history("alice")[0].kind == "expire"
    assert credits.audit() == []
