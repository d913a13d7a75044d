"""Auto top-up: a debit that takes a wallet below its threshold buys its pack off-session, once per
crossing, whatever runs at once; the Stripe call after the debit, never in it; failures turn it off;
the cap, the one-in-flight rule and the debt guard hold; the sweep recovers what a dead worker left;
and ``credits_low``."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, parse_qsl

import pytest
import sqlalchemy as sa
from helpers import JSON_HEADERS

from flask_credits import CardRequired, InsufficientCredits, Wallet, testing
from flask_credits.services import auto_top_up

SECRET = "sk_test_51AutoTopUpSecretKey"
PACKS = {
    "small": {"credits": 500, "amount": 500, "currency": "usd", "name": "Small"},
    "big": {"credits": 5000, "amount": 4000, "currency": "usd", "name": "Big"},
    "priced": {"credits": 900, "price": "price_only", "currency": "usd"},
    "yen": {"credits": 1000, "amount": 1500, "currency": "jpy", "name": "Yen"},
}
INTENTS = f"{testing.STRIPE_API}/v1/payment_intents"
ALICE = Wallet("alice")


@pytest.fixture
def credits_config():
    return {
        "STRIPE_SECRET_KEY": SECRET,
        "STRIPE_WEBHOOK_SECRET": "whsec_test_top_up",
        "CREDITS_STRIPE_MAX_RETRIES": 0,
        "CREDITS_PACKS": PACKS,
        "SERVER_NAME": "shop.test",
    }


def with_card(credits, wallet=ALICE, payment_method="pm_test_visa"):
    auto_top_up.save_card(credits, wallet, payment_method=payment_method, brand="visa", last4="4242")


def turn_on(credits, *, threshold=300, pack="small", cap=10_000, user="alice", key_id=None):
    with_card(credits, Wallet(user, key_id))
    return credits.set_auto_top_up(
        user, key_id, enabled=True, threshold=threshold, monthly_cap=cap, pack=pack
    )


def automatic(credits):
    p = credits.tables.purchases
    with credits.db.engine.connect() as conn:
        return conn.execute(sa.select(p).where(p.c.automatic.is_(True)).order_by(p.c.id)).all()


def settings_row(credits):
    a = credits.tables.auto_top_ups
    with credits.db.engine.connect() as conn:
        return conn.execute(sa.select(a)).one()


def names(received):
    return [n for n, _, _ in received]


def spend(credits, amount, user="alice"):
    entry = credits.spend(user, amount, reason="work")
    assert auto_top_up.wait(), "the automatic purchase's worker did not finish"
    return entry


# -- the crossing --------------------------------------------------------------------------------------


def test_a_debit_that_crosses_the_threshold_buys_the_pack_once(credits, stripe, received):
    credits.grant("alice", 1000, reason="start")
    turn_on(credits)
    calls = testing.mock_create_payment_intent(stripe)
    spend(credits, 800)
    assert len(calls) == 1
    params = calls[0]["params"]
    [purchase] = automatic(credits)
    assert (params["amount"], params["currency"], params["payment_method"]) == ("500", "usd", "pm_test_visa")
    assert (params["off_session"], params["confirm"]) == ("true", "true")
    assert params["metadata[userId]"] == "alice"
    assert "metadata[keyId]" not in params
    assert params["metadata[purchaseId]"] == str(purchase.id)
    assert calls[0]["key"] == auto_top_up.idempotency_key(purchase.attempt_key)
    assert (purchase.status, purchase.credits, purchase.payment_intent) == (
        "fulfilled",
        500,
        calls[0]["intent"]["id"],
    )
    assert credits.balance("alice") == 700
    assert names(received).count("auto_top_up_started") == 1
    assert names(received).count("credits_purchased") == 1
    # Stripe's own event about it comes too: credited once.
    event = testing.event("payment_intent.succeeded", calls[0]["intent"])
    assert testing.post_event(credits_client(credits), event).json["outcome"] == "already_fulfilled"
    assert credits.balance("alice") == 700
    found = credits.auto_top_up("alice")
    assert (found.enabled, found.in_flight, found.spent_this_month) == (True, False, 500)
    assert credits.audit() == []


def credits_client(credits):
    from flask import current_app

    return current_app.test_client()


def test_debits_that_do_not_cross_buy_nothing(credits, stripe):
    credits.grant("alice", 1000, reason="start")
    turn_on(credits, threshold=300)
    calls = testing.mock_create_payment_intent(stripe)
    spend(credits, 700)  # 1000 -> 300: at the threshold, not below
    assert calls == []
    spend(credits, 1)  # 300 -> 299: crosses
    assert len(calls) == 1
    credits.set_auto_top_up("alice", enabled=True, threshold=100, monthly_cap=10_000, pack="small")
    spend(credits, 100)  # 799 -> 699, above
    spend(credits, 650)  # 699 -> 49: crosses 100
    assert len(calls) == 2
    spend(credits, 10)  # already below: no new crossing
    assert len(calls) == 2
    assert credits.audit() == []


def test_each_new_crossing_buys_again_up_to_the_monthly_cap_then_next_month(credits, stripe, clock):
    credits.grant("alice", 1000, reason="start")
    turn_on(credits, threshold=300, cap=1000)  # two purchases of 500 a month
    calls = testing.mock_create_payment_intent(stripe)
    spend(credits, 800)  # 200 -> +500 = 700
    spend(credits, 500)  # 200 -> +500 = 700
    assert len(calls) == 2
    spend(credits, 500)  # 200: the cap is reached, nothing bought
    assert len(calls) == 2
    assert credits.balance("alice") == 200
    assert credits.auto_top_up("alice").spent_this_month == 1000
    clock.advance(days=31)
    credits.grant("alice", 500, reason="support")  # 700
    spend(credits, 500)  # a new month: bought again
    assert len(calls) == 3
    assert credits.auto_top_up("alice").spent_this_month == 500
    assert credits.audit() == []


def test_at_most_one_automatic_purchase_is_in_flight(credits, stripe):
    credits.grant("alice", 1000, reason="start")
    turn_on(credits)
    calls = testing.mock_create_payment_intent(stripe, "processing")  # Stripe answers later
    spend(credits, 800)
    assert len(calls) == 1
    assert credits.auto_top_up("alice").in_flight
    credits.grant("alice", 500, reason="support")  # 700
    spend(credits, 500)  # crosses again while the first is in flight: nothing more
    assert len(calls) == 1
    [purchase] = automatic(credits)
    assert purchase.status == "open"
    # The webhook ends it; the next crossing may buy.
    intent = {**calls[0]["intent"], "status": "succeeded", "amount_received": 500}
    outcome = testing.post_event(credits_client(credits), testing.event("payment_intent.succeeded", intent))
    assert outcome.json["outcome"] == "fulfilled"
    assert credits.balance("alice") == 700
    testing.mock_create_payment_intent(stripe)
    spend(credits, 500)
    assert len(automatic(credits)) == 2


def test_no_purchase_while_the_wallet_owes_more_than_the_pack(credits, stripe):
    credits.grant("alice", 1000, reason="start")
    turn_on(credits)
    w = credits.tables.wallets
    with credits.db.engine.begin() as conn:
        conn.execute(sa.update(w).where(w.c.user_id == "alice").values(debt=501))
    calls = testing.mock_create_payment_intent(stripe)
    spend(credits, 800)
    assert calls == []
    assert automatic(credits) == []


@pytest.mark.config(CREDITS_AUTO_TOP_UP=False)
def test_the_kill_switch_stops_every_automatic_purchase(credits, stripe, app):
    credits.grant("alice", 1000, reason="start")
    turn_on(credits)
    calls = testing.mock_create_payment_intent(stripe)
    spend(credits, 800)
    assert calls == []
    assert automatic(credits) == []
    assert credits.auto_top_up("alice").enabled is False
    result = app.test_cli_runner().invoke(args=["credits", "top-up", "--due"])
    assert "auto top-up is off" in result.output


def test_concurrent_debits_crossing_the_threshold_make_one_payment(app, credits, stripe, backend):
    if backend == "sqlite":
        pytest.skip("SQLite runs one writer at a time: nothing to race")
    credits.grant("alice", 1000, reason="start")
    turn_on(credits, threshold=700)
    calls = testing.mock_create_payment_intent(stripe)
    barrier = threading.Barrier(50)

    def debit(_):
        with app.app_context():
            barrier.wait()
            return credits.spend("alice", 10, reason="work")

    with ThreadPoolExecutor(50) as pool:
        list(pool.map(debit, range(50)))
    assert auto_top_up.wait()
    assert len(calls) == 1
    assert len(automatic(credits)) == 1
    assert credits.balance("alice") == 1000 - 500 + 500
    assert credits.audit() == []


def test_the_monthly_cap_holds_under_concurrent_crossings(app, credits, stripe, backend):
    """Eight threads spend as fast as they can while each top-up lands and the wallet crosses its
    threshold again and again: the month's automatic purchases stop at the cap (three packs)."""
    if backend == "sqlite":
        pytest.skip("SQLite runs one writer at a time: nothing to race")
    credits.grant("alice", 2000, reason="start")
    turn_on(credits, threshold=1500, cap=12_000, pack="big")  # 5,000 credits for $40: three a month
    calls = testing.mock_create_payment_intent(stripe)
    barrier = threading.Barrier(8)

    deadline = time.monotonic() + 20  # bounded: the wallet runs dry long before

    def debit(_):
        spent = 0
        with app.app_context():
            barrier.wait()
            while time.monotonic() < deadline:
                try:
                    credits.spend("alice", 100, reason="work")
                    spent += 100
                except InsufficientCredits:
                    if len(automatic(credits)) == 3 and not credits.auto_top_up("alice").in_flight:
                        break  # dry, and the cap reached: no top-up will come
                    time.sleep(0.01)  # a top-up is on its way
        return spent

    with ThreadPoolExecutor(8) as pool:
        spent = sum(pool.map(debit, range(8)))
    assert auto_top_up.wait()
    bought = automatic(credits)
    assert len(bought) == 3 == len(calls), [p.status for p in bought]
    assert {p.status for p in bought} == {"fulfilled"}
    assert settings_row(credits).month_spent == 12_000
    assert credits.balance("alice") == 2000 + 15_000 - spent
    assert credits.audit() == []


# -- failures ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outcome", ["declined", "requires_action"])
def test_a_failed_automatic_payment_turns_auto_top_up_off_once(credits, stripe, received, outcome):
    credits.grant("alice", 1000, reason="start")
    turn_on(credits)
    calls = testing.mock_create_payment_intent(stripe, outcome)
    spend(credits, 800)
    assert len(calls) == 1
    [purchase] = automatic(credits)
    assert purchase.status == "failed"
    found = credits.auto_top_up("alice")
    assert (found.enabled, found.in_flight, found.spent_this_month) == (False, False, 0)
    assert found.failure
    assert "3-D Secure" in found.failure if outcome == "requires_action" else "declined" in found.failure
    failed = [kw for n, _, kw in received if n == "auto_top_up_failed"]
    assert len(failed) == 1
    assert failed[0]["reason"] == found.failure
    # Stripe's webhook about it changes nothing more.
    event_type = (
        "payment_intent.payment_failed" if outcome == "declined" else "payment_intent.requires_action"
    )
    answer = testing.post_event(credits_client(credits), testing.event(event_type, calls[0]["intent"]))
    assert answer.json["outcome"] == "unchanged"
    assert names(received).count("auto_top_up_failed") == 1
    # Off: the next crossing buys nothing; turning it on again clears the reason.
    credits.grant("alice", 500, reason="support")
    spend(credits, 500)
    assert len(calls) == 1
    again = credits.set_auto_top_up("alice", enabled=True, threshold=300, monthly_cap=10_000, pack="small")
    assert (again.enabled, again.failure) == (True, None)
    assert credits.balance("alice") == 200
    # Stripe's event about the old failure, delivered again late, leaves it on.
    late = testing.post_event(credits_client(credits), testing.event(event_type, calls[0]["intent"]))
    assert late.json["outcome"] == "unchanged"
    assert credits.auto_top_up("alice").enabled
    stripe.remove("POST", INTENTS)
    paid = testing.mock_create_payment_intent(stripe)
    credits.grant("alice", 500, reason="support")  # 700
    spend(credits, 500)
    assert len(paid) == 1
    assert credits.balance("alice") == 700


def test_stripe_unreachable_leaves_the_purchase_to_the_sweep_with_the_same_key(credits, stripe, clock, app):
    credits.grant("alice", 1000, reason="start")
    turn_on(credits)
    failing = testing.mock_create_payment_intent(stripe, status=500)
    spend(credits, 800)
    assert len(failing) == 1
    [purchase] = automatic(credits)
    assert purchase.status == "creating"
    assert credits.balance("alice") == 200
    # Within the lease nobody calls again.
    assert auto_top_up.sweep(credits) == {"skipped": 1}
    stripe.remove("POST", INTENTS)
    calls = testing.mock_create_payment_intent(stripe)
    clock.advance(seconds=61)
    result = app.test_cli_runner().invoke(args=["credits", "top-up", "--due"])
    assert result.exit_code == 0, result.output
    assert "1 fulfilled" in result.output
    assert [c["key"] for c in calls] == [failing[0]["key"]]
    assert credits.balance("alice") == 700
    assert credits.audit() == []


def test_a_purchase_never_confirmed_within_stripes_key_window_is_given_up(credits, stripe, clock, received):
    credits.grant("alice", 1000, reason="start")
    turn_on(credits)
    testing.mock_create_payment_intent(stripe, status=500)
    spend(credits, 800)
    clock.advance(hours=24)
    calls = testing.mock_create_payment_intent(stripe)
    assert auto_top_up.sweep(credits) == {"gave_up": 1}
    assert calls == []  # not called again: a second PaymentIntent could charge twice
    assert automatic(credits)[0].status == "failed"
    assert credits.auto_top_up("alice").enabled is False
    # Had Stripe charged it after all, its event still credits it.
    [purchase] = automatic(credits)
    intent = testing.payment_intent(
        amount=500, metadata={"userId": "alice", "keyId": "", "purchaseId": str(purchase.id)}
    )
    answer = testing.post_event(credits_client(credits), testing.event("payment_intent.succeeded", intent))
    assert answer.json["outcome"] == "fulfilled"
    assert credits.balance("alice") == 700


def test_a_crossing_nobody_acted_on_is_found_by_the_sweep(credits, stripe):
    credits.grant("alice", 1000, reason="start")
    turn_on(credits)
    calls = testing.mock_create_payment_intent(stripe)
    hook, credits.ledger.on_debit = credits.ledger.on_debit, None  # the process died after the debit
    try:
        credits.spend("alice", 800, reason="work")
    finally:
        credits.ledger.on_debit = hook
    assert calls == []
    assert auto_top_up.sweep(credits) == {"started": 1, "fulfilled": 1}
    assert auto_top_up.sweep(credits) == {}
    assert credits.balance("alice") == 700
    assert len(calls) == 1


def test_webhooks_about_other_payments_are_ignored_and_a_foreign_wallet_is_refused(credits, stripe, client):
    credits.grant("alice", 1000, reason="start")
    turn_on(credits)
    testing.mock_create_payment_intent(stripe, "processing")
    spend(credits, 800)
    [purchase] = automatic(credits)
    checkout_intent = testing.payment_intent(amount=500)  # a checkout's: no purchaseId
    assert (
        testing.post_event(client, testing.event("payment_intent.succeeded", checkout_intent)).json["outcome"]
        == "ignored"
    )
    forged = testing.payment_intent(
        amount=500, metadata={"userId": "bob", "keyId": "", "purchaseId": str(purchase.id)}
    )
    assert (
        testing.post_event(client, testing.event("payment_intent.succeeded", forged)).json["outcome"]
        == "mismatch"
    )
    short = testing.payment_intent(
        amount=1, metadata={"userId": "alice", "keyId": "", "purchaseId": str(purchase.id)}
    )
    assert (
        testing.post_event(client, testing.event("payment_intent.succeeded", short)).json["outcome"]
        == "mismatch"
    )
    assert credits.balance("alice") == 200


def test_a_refund_of_an_automatic_purchase_claws_back(credits, stripe, client):
    credits.grant("alice", 1000, reason="start")
    turn_on(credits)
    calls = testing.mock_create_payment_intent(stripe)
    spend(credits, 800)
    refund = testing.charge(calls[0]["intent"]["id"], amount=500, amount_refunded=500)
    assert testing.post_event(client, testing.event("charge.refunded", refund)).json["outcome"] == "revoked"
    assert credits.balance("alice") == 200
    assert credits.audit() == []


# -- settles, and credits_low --------------------------------------------------------------------------


def test_a_settle_that_crosses_the_threshold_tops_up(credits, stripe):
    credits.grant("alice", 1000, reason="start")
    turn_on(credits)
    calls = testing.mock_create_payment_intent(stripe)
    hold = credits.hold("alice", 900, reason="stream")
    assert calls == []  # a hold is no debit
    credits.settle(hold.id, 800)
    assert auto_top_up.wait()
    assert len(calls) == 1
    assert credits.balance("alice") == 700


@pytest.mark.config(CREDITS_LOW_BALANCE=100)
def test_credits_low_once_per_crossing_with_a_wallets_own_threshold(credits, received):
    credits.grant("alice", 300, reason="start")
    credits.spend("alice", 150, reason="x")  # 150: above 100
    credits.spend("alice", 60, reason="x")  # 90: crosses
    credits.spend("alice", 10, reason="x")  # 80: already below
    low = [kw for n, _, kw in received if n == "credits_low"]
    assert [(kw["balance"], kw["threshold"]) for kw in low] == [(90, 100)]
    credits.set_low_balance("alice", 50)
    credits.spend("alice", 40, reason="x")  # 40: crosses the wallet's own 50
    low = [kw for n, _, kw in received if n == "credits_low"]
    assert [(kw["balance"], kw["threshold"]) for kw in low] == [(90, 100), (40, 50)]


# -- settings and the JSON endpoints -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"threshold": -1}, "threshold"),
        ({"threshold": "lots"}, "threshold"),
        ({"pack": "nope"}, "unknown pack"),
        ({"pack": "priced"}, "Stripe Price"),
        ({"monthly_cap": 499}, "monthly_cap"),
        ({"pack": None, "quantity": 0}, "quantity"),
    ],
)
def test_settings_that_cannot_work_are_refused(credits, changes, message):
    with_card(credits)
    settings = {"enabled": True, "threshold": 300, "monthly_cap": 1000, "pack": "small", **changes}
    with pytest.raises(auto_top_up.BadAutoTopUp, match=message):
        credits.set_auto_top_up("alice", **settings)
    assert credits.auto_top_up("alice").enabled is False


def test_turning_it_on_needs_a_saved_card(credits):
    with pytest.raises(CardRequired):
        credits.set_auto_top_up("alice", enabled=True, threshold=300, monthly_cap=1000, pack="small")
    assert credits.auto_top_up("alice") is None
    off = credits.set_auto_top_up("alice", enabled=False, threshold=300, monthly_cap=1000, quantity=3)
    assert (off.enabled, off.quantity, off.credits, off.amount) == (False, 3, 300, 300)


def test_the_json_endpoints(client, login, credits):
    login("alice")
    assert client.get("/credits/auto-top-up").json == {"auto_top_up": None}
    body = {"enabled": True, "threshold": 300, "monthly_cap": 1000, "pack": "small"}
    refused = client.post("/credits/auto-top-up", json=body, headers=JSON_HEADERS)
    assert (refused.status_code, refused.json["error"]) == (409, "card_required")
    with_card(credits)
    done = client.post("/credits/auto-top-up", json=body, headers=JSON_HEADERS)
    assert done.status_code == 200, done.json
    assert done.json["auto_top_up"]["card"] == {"brand": "visa", "last4": "4242"}
    assert client.get("/credits/auto-top-up").json["auto_top_up"]["threshold"] == 300
    bad = client.post("/credits/auto-top-up", json={**body, "threshold": -5}, headers=JSON_HEADERS)
    assert bad.status_code == 400
    other = client.post("/credits/auto-top-up", json={**body, "key_id": "not-mine"}, headers=JSON_HEADERS)
    assert other.status_code == 400
    form = {"enabled": "on", "threshold": "200", "monthly_cap_amount": "25.50", "pack": "small"}
    page = client.post("/credits/auto-top-up", data=form)
    assert page.status_code == 303
    found = credits.auto_top_up("alice")
    assert (found.threshold, found.monthly_cap) == (200, 2550)
    assert (
        client.post("/credits/auto-top-up", data={**form, "monthly_cap_amount": "1.234"}).status_code == 400
    )


def test_saving_a_card_through_a_setup_session(client, login, credits, stripe):
    login("alice")
    testing.mock_create_customer(stripe, "cus_test_alice")
    testing.mock_create_session(stripe, "cs_test_setup")
    response = client.post("/credits/auto-top-up/card", headers=JSON_HEADERS, json={})
    assert response.status_code == 200, response.json
    [create] = [c for c in stripe.calls if c.request.url.endswith("/v1/checkout/sessions")]
    form = parse_qs(create.request.body)
    assert form["mode"] == ["setup"]
    assert form["customer"] == ["cus_test_alice"]
    assert form["metadata[purpose]"] == ["auto_top_up"]
    assert form["metadata[userId]"] == ["alice"]
    testing.mock_setup_card(stripe, "cs_test_setup", customer="cus_test_alice", last4="1881")
    session = {
        "id": "cs_test_setup",
        "object": "checkout.session",
        "mode": "setup",
        "status": "complete",
        "customer": "cus_test_alice",
        "metadata": {"userId": "alice", "keyId": "", "purpose": "auto_top_up"},
    }
    answer = testing.post_event(client, testing.event("checkout.session.completed", session))
    assert answer.json["outcome"] == "card_saved"
    found = credits.auto_top_up("alice")
    assert (found.has_card, found.card_last4, found.enabled) == (True, "1881", False)
    # A session of another customer, naming alice, saves nothing.
    stranger = {**session, "id": "cs_test_other", "customer": "cus_test_mallory"}
    answer = testing.post_event(client, testing.event("checkout.session.completed", stranger))
    assert answer.json["outcome"] == "unknown_customer"


# -- a worker killed between the trigger and Stripe ----------------------------------------------------


class FakeStripe:
    """Stripe's PaymentIntent API on loopback: each Idempotency-Key gets one PaymentIntent (as Stripe
    keeps keys), answered after ``delay`` seconds, so a worker can be killed mid-call."""

    def __init__(self, delay: float) -> None:
        self.delay, self.keys, self.intents = delay, [], {}
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
                params = dict(parse_qsl(body, keep_blank_values=True))
                key = self.headers.get("Idempotency-Key")
                with fake.lock:
                    fake.keys.append(key)
                time.sleep(fake.delay)
                metadata = {k[9:-1]: v for k, v in params.items() if k.startswith("metadata[")}
                with fake.lock:
                    intent = fake.intents.setdefault(
                        key,
                        testing.payment_intent(
                            amount=int(params["amount"]), currency=params["currency"], metadata=metadata
                        ),
                    )
                data = json.dumps(intent).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the caller was killed

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.1,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_stripe():
    fake = FakeStripe(delay=0.5)
    yield fake
    fake.close()


@pytest.mark.parametrize("kill_after_call", [False, True], ids=["before-the-call", "during-the-call"])
def test_a_worker_killed_after_the_trigger_is_recovered_by_the_sweep_with_the_same_key(
    db, build_app, database_url, fake_stripe, kill_after_call
):
    """``db``: the tables exist (and are emptied after). The worker is a real process, killed with
    SIGKILL once the purchase's row exists (before its Stripe call, or while Stripe answers it)."""
    config = {
        "STRIPE_SECRET_KEY": SECRET,
        "STRIPE_WEBHOOK_SECRET": "whsec_test_top_up",
        "CREDITS_STRIPE_MAX_RETRIES": 0,
        "CREDITS_PACKS": PACKS,
        "CREDITS_STRIPE_API_BASE": fake_stripe.url,
    }
    app, _, credits = build_app(**config)
    with app.app_context():
        credits.grant("alice", 1000, reason="start")
        turn_on(credits)
        worker = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("_top_up_worker.py")),
                database_url,
                json.dumps(config),
                "alice",
                "800",
            ],
            cwd=Path(__file__).parent,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert worker.stdout is not None
            assert worker.stdout.readline().startswith("spent "), "the worker's debit did not commit"
            for _ in range(200):  # the purchase's row, then (maybe) the call: kill then
                ready = automatic(credits) and (not kill_after_call or fake_stripe.keys)
                if ready:
                    break
                time.sleep(0.01)
            assert automatic(credits), "no automatic purchase was recorded"
        finally:
            worker.kill()
            worker.wait(10)
            worker.stdout.close()
        [purchase] = automatic(credits)
        assert purchase.status == "creating"
        assert credits.balance("alice") == 200
        credits.clock = lambda: datetime.now(timezone.utc) + auto_top_up.LEASE + timedelta(seconds=1)
        assert auto_top_up.sweep(credits) == {"fulfilled": 1}
        assert auto_top_up.sweep(credits) == {}
        expected = auto_top_up.idempotency_key(purchase.attempt_key)
        assert set(fake_stripe.keys) == {expected}, fake_stripe.keys
        assert len(fake_stripe.intents) == 1  # Stripe made (and would charge) one PaymentIntent
        assert credits.balance("alice") == 700
        assert credits.audit() == []


def test_the_cli_shows_a_wallets_auto_top_up(app, credits):
    runner = app.test_cli_runner()
    assert runner.invoke(args=["credits", "auto-top-up", "alice"]).output.strip() == "no auto top-up"
    turn_on(credits, threshold=300, cap=2000)
    shown = runner.invoke(args=["credits", "auto-top-up", "alice"]).output.strip().split("\t")
    assert shown == [
        "on",
        "below 300 credits",
        "buys pack small (500 credits for 500 usd)",
        "0 of 2000 usd this month",
        "card visa 4242",
    ]


def test_a_forms_cap_is_read_in_the_currency_of_what_it_buys(client, login, credits):
    login("alice")
    with_card(credits)
    form = {"enabled": "on", "threshold": "100", "monthly_cap_amount": "3000", "pack": "yen"}
    assert client.post("/credits/auto-top-up", data=form).status_code == 303
    found = credits.auto_top_up("alice")
    assert (found.currency, found.monthly_cap, found.amount) == ("jpy", 3000, 1500)  # yen have no cents
