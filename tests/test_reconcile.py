"""Reconcile with Stripe: ``flask credits reconcile`` does what lost webhooks should have done, through
their own exactly-once paths, and is safe while webhooks arrive and when run twice at once."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
import responses
import sqlalchemy as sa

from flask_credits import Wallet, testing
from flask_credits.services import auto_top_up

WHSEC = "whsec_test_reconcile"
ALICE = Wallet("alice")


@pytest.fixture
def credits_config():
    return {
        "STRIPE_SECRET_KEY": "sk_test_reconcile",
        "STRIPE_WEBHOOK_SECRET": WHSEC,
        "CREDITS_STRIPE_MAX_RETRIES": 0,
        "CREDITS_PACKS": {"small": {"credits": 500, "amount": 500, "currency": "usd", "name": "Small"}},
        "CREDITS_PLANS": {"pro": {"price": "price_pro", "credits": 2000, "name": "Pro"}},
        "SERVER_NAME": "shop.test",
    }


@pytest.fixture
def buy(app, client, login, stripe):
    """Start a checkout of ``quantity`` units (100 credits and 1.00 USD each) for ``user``; returns
    its session id (the purchase is open: Stripe's events about it are up to the test)."""
    counter = iter(range(1, 1000))

    def start(user="alice", quantity=10):
        session_id = f"cs_test_{user}_{next(counter)}"
        testing.mock_create_session(stripe, session_id)
        login(user)
        response = client.post("/credits/checkout", json={"quantity": quantity})
        assert response.status_code == 200, response.json
        return session_id

    return start


def session(app, session_id, **kwargs):
    with app.app_context():
        return testing.session_for(session_id, **kwargs)


def deliver(client, event_type, obj):
    return testing.post_event(client, testing.event(event_type, obj))


def reconcile(app, *args):
    return app.test_cli_runner().invoke(args=["credits", "reconcile", *args])


def at_stripe(stripe, pi, *, amount=1000, refunded=0, disputes=None):
    """Stripe's PaymentIntent ``pi`` now: its charge with ``refunded`` refunded, and ``disputes``."""
    stripe.remove(responses.GET, f"{testing.STRIPE_API}/v1/payment_intents/{pi}")
    stripe.remove(responses.GET, f"{testing.STRIPE_API}/v1/disputes")
    testing.mock_payment_intent(
        stripe,
        testing.payment_intent(pi, amount=amount),
        latest_charge=testing.charge(pi, amount=amount, amount_refunded=refunded, disputed=bool(disputes)),
        disputes=disputes,
    )


def listed(stripe, sessions, **kwargs):
    stripe.remove(responses.GET, f"{testing.STRIPE_API}/v1/checkout/sessions")
    return testing.mock_list_sessions(stripe, sessions, **kwargs)


def purchase_row(credits, session_id):
    p = credits.tables.purchases
    with credits.db.engine.connect() as conn:
        return conn.execute(sa.select(p).where(p.c.session_id == session_id)).one()


def state(credits):
    """Everything reconcile may change: purchases, entries, wallets, webhook events."""
    t = credits.tables
    with credits.db.engine.connect() as conn:
        return tuple(
            sorted(tuple(r) for r in conn.execute(sa.select(table)))
            for table in (t.purchases, t.entries, t.wallets, t.stripe_events, t.lots)
        )


def reconciled(received):
    return [(kw["purchase"].id, kw["action"]) for n, _, kw in received if n == "purchase_reconciled"]


@pytest.fixture
def bought(app, client, credits, buy):
    """Alice bought 1000 credits for 10.00 USD and its webhook arrived; returns (session, intent)."""
    sid = buy()
    paid = session(app, sid, payment_intent="pi_test_bought")
    assert deliver(client, "checkout.session.completed", paid).json["outcome"] == "fulfilled"
    assert credits.balance("alice") == 1000
    return paid, "pi_test_bought"


# -- lost checkout webhooks ---------------------------------------------------------------------------


def test_lost_webhooks_of_paid_sessions_are_credited_once_across_pages(app, credits, buy, stripe, received):
    lost = [session(app, buy(quantity=q), payment_intent=f"pi_test_lost_{q}") for q in (1, 2, 3)]
    still_open = session(app, buy(quantity=4), payment_status="unpaid", status="open")
    not_ours = testing.checkout_session("cs_test_someone_else", amount_total=999)
    setup = {**testing.checkout_session("cs_test_setup", amount_total=0), "mode": "setup"}
    asked = listed(stripe, [*lost, still_open, not_ours, setup], page_size=2)
    for s in lost:
        at_stripe(stripe, s["payment_intent"], amount=s["amount_total"])

    result = reconcile(app)
    assert result.exit_code == 0, result.output
    assert credits.balance("alice") == 600
    assert len(asked) == 3  # three pages, each after the last id of the one before
    assert [q.get("starting_after") for q in asked] == [None, lost[1]["id"], still_open["id"]]
    assert {q["created[gte]"] for q in asked} == {asked[0]["created[gte]"]}
    for s in lost:
        assert purchase_row(credits, s["id"]).status == "fulfilled"
        assert f"{s['id']}\talice\tfulfilled: paid" in result.output
    assert purchase_row(credits, still_open["id"]).status == "open"
    assert "fixed 3 (3 fulfilled)" in result.output
    assert "1 not ours" in result.output
    assert "1 still open" in result.output
    assert "1 setup checkouts" in result.output
    purchased = [n for n, _, _ in received].count("credits_purchased")
    assert (purchased, sorted(a for _, a in reconciled(received))) == (3, ["fulfilled"] * 3)

    before = state(credits)
    again = reconcile(app)
    assert again.exit_code == 0, again.output
    assert "fixed 0" in again.output
    assert "3 in step" in again.output
    assert state(credits) == before
    # The lost event, delivered at last, credits nothing more.
    assert deliver(app.test_client(), "checkout.session.completed", lost[0]).json["outcome"] == (
        "already_fulfilled"
    )
    assert credits.balance("alice") == 600
    assert credits.audit() == []


def test_only_sessions_created_since_are_listed(app, credits, buy, stripe):
    old = {**session(app, buy()), "created": int(time.time()) - 4 * 86400}
    asked = listed(stripe, [old])
    result = reconcile(app, "--since", "3d")
    assert result.exit_code == 0, result.output
    assert "checked 0 checkout sessions" in result.output
    assert credits.balance("alice") == 0
    since = int(asked[0]["created[gte]"])
    assert abs(since - (time.time() - 3 * 86400)) < 60
    assert reconcile(app, "--since", "5d").exit_code == 0  # a wider window finds it
    assert credits.balance("alice") == 1000


@pytest.mark.parametrize("since", ["3", "0d", "3w", "-1d", "d"])
def test_a_bad_duration_is_refused(app, stripe, since):
    result = reconcile(app, "--since", since)
    assert result.exit_code == 2
    assert "duration like 3d, 12h or 30m" in result.output


def test_an_expired_session_marks_its_purchase_expired(app, credits, buy, stripe, received):
    sid = buy()
    listed(stripe, [session(app, sid, payment_status="unpaid", status="expired")])
    result = reconcile(app, "--since", "12h")
    assert result.exit_code == 0, result.output
    assert purchase_row(credits, sid).status == "expired"
    assert "expired: the checkout expired unpaid" in result.output
    assert reconciled(received) == [(purchase_row(credits, sid).id, "expired")]
    assert "fixed 0" in reconcile(app, "--since", "30m").output


def test_a_session_this_app_did_not_create_is_ignored(app, credits, stripe, received):
    listed(
        stripe,
        [
            testing.checkout_session("cs_test_foreign", amount_total=500),
            testing.checkout_session(
                "cs_test_foreign_ref", amount_total=500, client_reference_id="chk_" + "0" * 32
            ),
        ],
    )
    before = state(credits)
    result = reconcile(app)
    assert result.exit_code == 0, result.output
    assert "2 not ours" in result.output
    assert "fixed 0" in result.output
    assert state(credits) == before
    assert reconciled(received) == []


def test_a_session_stripe_reports_with_another_amount_is_not_credited(app, credits, buy, stripe):
    sid = buy()
    listed(stripe, [{**session(app, sid), "amount_total": 1}])
    result = reconcile(app)
    assert "mismatch" in result.output
    assert (purchase_row(credits, sid).status, credits.balance("alice")) == ("mismatch", 0)


# -- missed refunds and disputes ------------------------------------------------------------------------


def test_a_missed_partial_then_full_refund_is_clawed_back(app, client, credits, bought, stripe, received):
    paid, pi = bought
    listed(stripe, [paid])
    at_stripe(stripe, pi, refunded=250)
    result = reconcile(app)
    assert result.exit_code == 0, result.output
    assert credits.balance("alice") == 750
    assert "refund: 250 refunded at Stripe: 250 credits clawed back in all" in result.output
    revoked = [kw for n, _, kw in received if n == "credits_revoked"]
    assert [(kw["amount"], kw["cause"]) for kw in revoked] == [(250, "refund")]
    assert [a for _, a in reconciled(received)] == ["refund"]

    at_stripe(stripe, pi, refunded=1000)
    assert reconcile(app).exit_code == 0
    assert credits.balance("alice") == 0
    assert "fixed 0" in reconcile(app).output  # in step now
    # The refund's own event, delivered late, changes nothing.
    late = testing.event("charge.refunded", testing.charge(pi, amount=1000, amount_refunded=1000))
    assert testing.post_event(client, late).json["outcome"] == "unchanged"
    assert credits.balance("alice") == 0
    assert credits.audit() == []


def test_a_missed_lost_dispute_is_clawed_back_and_a_won_one_given_back(
    app, credits, bought, stripe, received
):
    paid, pi = bought
    credits.spend("alice", 300, reason="job")
    listed(stripe, [paid])
    at_stripe(stripe, pi, disputes=[testing.dispute(pi, amount=1000, status="under_review")])
    assert "fixed 0" in reconcile(app).output  # open: nothing to say yet
    at_stripe(stripe, pi, disputes=[testing.dispute(pi, amount=1000, status="lost")])
    result = reconcile(app)
    assert "dispute: dispute lost at Stripe: 1000 credits held back for it" in result.output
    assert credits.balance("alice") == 0
    w = credits.tables.wallets
    with credits.db.engine.connect() as conn:
        assert conn.execute(sa.select(w.c.debt).where(w.c.user_id == "alice")).scalar_one() == 300
    assert "fixed 0" in reconcile(app).output
    at_stripe(stripe, pi, disputes=[testing.dispute(pi, amount=1000, status="won")])
    assert "dispute_won" in reconcile(app).output
    assert credits.balance("alice") == 700
    assert [a for _, a in reconciled(received)] == ["dispute", "dispute_won"]
    assert credits.audit() == []


# -- dry run, Stripe down -------------------------------------------------------------------------------


def test_a_dry_run_changes_nothing_and_says_what_it_would_do(app, credits, bought, buy, stripe, received):
    paid, pi = bought
    lost = session(app, buy(quantity=3), payment_intent="pi_test_lost")
    listed(stripe, [lost, paid])
    at_stripe(stripe, pi, refunded=500)
    before = state(credits)
    received.clear()
    result = reconcile(app, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would be fulfilled: paid 300 USD" in result.output
    assert "would be refund: 500 refunded" in result.output
    assert "dry run: " in result.output
    assert "would fix 2 (1 fulfilled, 1 refund)" in result.output
    assert state(credits) == before
    assert received == []
    assert "fixed 2 (1 fulfilled, 1 refund)" in reconcile(app).output
    assert credits.balance("alice") == 500 + 300


@pytest.mark.parametrize(
    "answer",
    [
        {"status": 500, "error": {"type": "api_error", "message": "Something went wrong."}},
        {"status": 401, "error": {"type": "invalid_request_error", "message": "Invalid API Key."}},
    ],
)
def test_stripe_down_exits_non_zero_and_changes_nothing(app, credits, buy, stripe, answer, received):
    buy()
    listed(stripe, [], **answer)
    before = state(credits)
    result = reconcile(app)
    assert result.exit_code == 1
    assert "Stripe could not be reached" in result.output
    assert state(credits) == before
    assert reconciled(received) == []


def test_stripe_unreachable_part_way_through_the_pages_changes_nothing(app, credits, buy, stripe):
    import requests

    sessions = [session(app, buy(quantity=q)) for q in (1, 2, 3)]
    asked = []

    def first_page_then_reset(request):
        asked.append(request.url)
        if len(asked) > 1:
            raise requests.exceptions.ConnectionError("connection reset by peer")
        page = {"object": "list", "url": "/v1/checkout/sessions", "data": sessions[:2], "has_more": True}
        return 200, {}, json.dumps(page)

    stripe.remove(responses.GET, f"{testing.STRIPE_API}/v1/checkout/sessions")
    stripe.add_callback(responses.GET, f"{testing.STRIPE_API}/v1/checkout/sessions", first_page_then_reset)
    before = state(credits)
    result = reconcile(app)
    assert result.exit_code == 1, result.output
    assert "Stripe could not be reached (network)" in result.output
    assert len(asked) == 2
    assert f"starting_after={sessions[1]['id']}" in asked[1]
    assert state(credits) == before


def test_the_method_reports_and_raises_as_the_command_does(app, credits, buy, stripe):
    from flask_credits.services.stripe_gateway import PaymentProviderError

    sid = buy()
    listed(stripe, [session(app, sid)])
    report = credits.reconcile(timedelta(days=1), dry_run=True)
    assert [(f.purchase_id, f.action, f.done) for f in report.fixes] == [
        (purchase_row(credits, sid).id, "fulfilled", False)
    ]
    report = credits.reconcile(timedelta(days=1))
    assert [(f.action, f.done, f.wallet) for f in report.fixes] == [("fulfilled", True, ALICE)]
    listed(stripe, [], status=503, error={"type": "api_error", "message": "down"})
    with pytest.raises(PaymentProviderError):
        credits.reconcile(timedelta(days=1))


# -- automatic purchases ----------------------------------------------------------------------------------


def test_an_automatic_purchase_stuck_open_whose_payment_succeeded_is_credited_once(
    app, credits, stripe, received
):
    credits.grant("alice", 1000, reason="start")
    auto_top_up.save_card(credits, ALICE, payment_method="pm_test_visa", brand="visa", last4="4242")
    credits.set_auto_top_up("alice", enabled=True, threshold=300, monthly_cap=10_000, pack="small")
    calls = testing.mock_create_payment_intent(stripe, "processing")  # its webhook never comes
    credits.spend("alice", 800, reason="work")
    assert auto_top_up.wait()
    intent = calls[0]["intent"]
    p = credits.tables.purchases
    with credits.db.engine.connect() as conn:
        row = conn.execute(sa.select(p).where(p.c.automatic.is_(True))).one()
    assert (row.status, row.payment_intent) == ("open", intent["id"])
    listed(stripe, [])
    testing.mock_payment_intent(
        stripe,
        {**intent, "status": "succeeded", "amount_received": 500},
        latest_charge=testing.charge(intent["id"], amount=500),
    )
    assert "would be fulfilled" in reconcile(app, "--dry-run").output
    assert credits.balance("alice") == 200
    result = reconcile(app)
    assert result.exit_code == 0, result.output
    assert f"{intent['id']}\talice\tfulfilled: PaymentIntent succeeded at Stripe" in result.output
    assert "1 automatic purchases" in result.output
    assert credits.balance("alice") == 700
    again = reconcile(app)
    assert "fixed 0" in again.output
    assert "1 in step" in again.output
    assert credits.balance("alice") == 700
    assert [n for n, _, _ in received].count("credits_purchased") == 1
    assert reconciled(received) == [(row.id, "fulfilled")]
    assert credits.auto_top_up("alice").in_flight is False
    assert credits.audit() == []


# -- at once --------------------------------------------------------------------------------------------


def test_two_reconciles_and_the_webhooks_at_once_credit_and_claw_back_exactly_once(
    app, credits, buy, stripe, backend, received
):
    n = 3 if backend == "sqlite" else 5  # CREDITS_MAX_OPEN_PURCHASES
    lost = [session(app, buy(quantity=2 + i), payment_intent=f"pi_test_race_{i}") for i in range(n)]
    listed(stripe, lost, page_size=4)
    for s in lost:
        # Half of each is refunded at Stripe; the refund's webhook races too (and asks Stripe which
        # session the payment was for, when it overtakes the crediting).
        at_stripe(stripe, s["payment_intent"], amount=s["amount_total"], refunded=s["amount_total"] // 2)
        testing.mock_find_session(stripe, s["payment_intent"], s)
    received.clear()
    barrier = threading.Barrier(2 + 2 * n)
    errors = []

    def run(job):
        try:
            barrier.wait(timeout=30)
            job()
        except Exception as exc:  # reported below, with the others
            errors.append(exc)

    def reconciler():
        with app.app_context():
            credits.reconcile(timedelta(days=3))

    def completed(s):
        return lambda: (
            deliver(app.test_client(), "checkout.session.completed", s).status_code == 200
            or (errors.append(s["id"]))
        )

    def refunded(s):
        charge = testing.charge(
            s["payment_intent"], amount=s["amount_total"], amount_refunded=s["amount_total"] // 2
        )
        return lambda: (
            deliver(app.test_client(), "charge.refunded", charge).status_code == 200
            or (errors.append(s["id"]))
        )

    jobs = [reconciler, reconciler] + [completed(s) for s in lost] + [refunded(s) for s in lost]
    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    bought_credits = sum(100 * (2 + i) for i in range(n))
    assert credits.balance("alice") == bought_credits - bought_credits // 2
    e = credits.tables.entries
    with credits.db.engine.connect() as conn:
        kinds = [r.kind for r in conn.execute(sa.select(e.c.kind))]
    assert kinds.count("purchase") == n
    assert [name for name, _, _ in received].count("credits_purchased") == n
    assert [name for name, _, _ in received].count("credits_revoked") == n  # each refund once
    assert all(purchase_row(credits, s["id"]).status == "fulfilled" for s in lost)
    assert credits.audit() == []
    # And once it is all over, a last run finds everything in step.
    result = reconcile(app)
    assert "fixed 0" in result.output, result.output


def test_two_reconciles_and_the_refund_webhooks_at_once_claw_back_once(
    app, client, credits, buy, stripe, backend, received
):
    n = 3 if backend == "sqlite" else 5
    paid = [session(app, buy(quantity=4 + i), payment_intent=f"pi_test_refunded_{i}") for i in range(n)]
    for s in paid:
        assert deliver(client, "checkout.session.completed", s).json["outcome"] == "fulfilled"
        at_stripe(stripe, s["payment_intent"], amount=s["amount_total"], refunded=s["amount_total"])
    credits.spend("alice", 100, reason="job")  # so some of the claw-back becomes debt
    listed(stripe, paid, page_size=2)
    received.clear()
    barrier = threading.Barrier(3 + n)
    errors = []

    def reconciler():
        barrier.wait(timeout=30)
        with app.app_context():
            credits.reconcile(timedelta(days=3))

    def refunded(s):
        charge = testing.charge(
            s["payment_intent"], amount=s["amount_total"], amount_refunded=s["amount_total"]
        )
        barrier.wait(timeout=30)
        if deliver(app.test_client(), "charge.refunded", charge).status_code != 200:
            errors.append(s["id"])

    def run(job, *args):
        try:
            job(*args)
        except Exception as exc:  # reported below
            errors.append(exc)

    jobs = [(reconciler,)] * 3 + [(refunded, s) for s in paid]
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert credits.balance("alice") == 0
    w = credits.tables.wallets
    with credits.db.engine.connect() as conn:
        assert conn.execute(sa.select(w.c.debt).where(w.c.user_id == "alice")).scalar_one() == 100
    revoked = [kw for name, _, kw in received if name == "credits_revoked"]
    assert sorted(kw["purchase"].id for kw in revoked) == sorted(
        purchase_row(credits, s["id"]).id for s in paid
    )
    assert len(reconciled(received)) <= n
    assert credits.audit() == []


# -- plans' invoices ------------------------------------------------------------------------------------

DAY = 24 * 60 * 60


class Subscribed:
    """Alice's Pro subscription, which this app started: its invoices, as Stripe has them."""

    stripe_id = "sub_test_alice"

    def __init__(self, attempt):
        self.attempt = attempt
        self.start = int(time.time()) - DAY

    def pi(self, n):
        return f"pi_test_alice_plan_{n}"

    def invoice(self, n, *, listed=False):
        """The n-th period's paid invoice (0: the first); ``listed``: as Stripe lists it, without its
        ``payments``."""
        start = self.start + n * 30 * DAY
        return testing.invoice(
            f"in_test_alice_{n}",
            subscription=self.stripe_id,
            price="price_pro",
            period_start=start,
            period_end=start + 30 * DAY,
            amount_paid=2000,
            billing_reason="subscription_create" if n == 0 else "subscription_cycle",
            payment_intent=None if listed else self.pi(n),
            metadata={"userId": "alice", "plan": "pro", "subscriptionRef": self.attempt},
        )


@pytest.fixture
def plan(client, login, stripe, credits):
    """Alice subscribed to Pro, and the webhook of its first invoice arrived."""
    testing.mock_create_session(stripe)
    login("alice")
    response = client.post("/credits/subscribe", json={"plan": "pro"})
    assert response.status_code == 200, response.json
    s = credits.tables.subscriptions
    with credits.db.engine.connect() as conn:
        attempt = conn.execute(
            sa.select(s.c.attempt_key).where(s.c.checkout_session_id == response.json["id"])
        ).scalar_one()
    subscribed = Subscribed(attempt)
    assert deliver(client, "invoice.paid", subscribed.invoice(0)).json["outcome"] == "fulfilled"
    assert credits.balance("alice") == 2000
    return subscribed


def invoices_listed(stripe, invoices, **kwargs):
    """Stripe lists no Checkout Sessions, and these paid invoices."""
    listed(stripe, [])
    stripe.remove(responses.GET, f"{testing.STRIPE_API}/v1/invoices")
    return testing.mock_list_invoices(stripe, invoices, **kwargs)


def invoice_row(credits, invoice_id):
    p = credits.tables.purchases
    with credits.db.engine.connect() as conn:
        return conn.execute(sa.select(p).where(p.c.invoice_id == invoice_id)).one()


def test_a_lost_renewal_invoice_is_granted_once_across_pages_and_its_late_webhook_grants_nothing(
    app, credits, plan, stripe, received
):
    renewal = plan.invoice(1, listed=True)
    asked = invoices_listed(stripe, [renewal, plan.invoice(0, listed=True)], page_size=1)
    testing.mock_invoice_payments(stripe, renewal["id"], plan.pi(1))  # a listed invoice names none
    at_stripe(stripe, plan.pi(0), amount=2000)
    received.clear()

    result = reconcile(app)
    assert result.exit_code == 0, result.output
    assert credits.balance("alice") == 4000
    row = invoice_row(credits, renewal["id"])
    assert (row.status, row.payment_intent, row.credits) == ("fulfilled", plan.pi(1), 2000)
    assert (
        f"purchase {row.id}\t{renewal['id']}\talice\tfulfilled: invoice paid 2000 USD at Stripe,"
        " allowance never granted"
    ) in result.output
    assert "checked 0 checkout sessions, 2 plan invoices and 0 automatic purchases" in result.output
    assert "fixed 1 (1 fulfilled); 1 in step" in result.output
    assert len(asked) == 2  # two pages, the second after the first's last invoice
    assert [q.get("starting_after") for q in asked] == [None, renewal["id"]]
    assert {(q["status"], q["created[gte]"]) for q in asked} == {("paid", asked[0]["created[gte]"])}
    names = [n for n, _, _ in received]
    assert (names.count("plan_renewed"), names.count("credits_granted")) == (1, 1)
    assert reconciled(received) == [(row.id, "fulfilled")]
    assert credits.subscription("alice").status == "active"

    at_stripe(stripe, plan.pi(1), amount=2000)
    before = state(credits)
    again = reconcile(app)
    assert "fixed 0; 2 in step" in again.output, again.output
    assert state(credits) == before
    # The lost event, delivered at last, grants nothing more.
    assert deliver(app.test_client(), "invoice.paid", plan.invoice(1)).json["outcome"] == "already_fulfilled"
    assert credits.balance("alice") == 4000
    assert credits.audit() == []


def test_invoices_of_subscriptions_this_app_did_not_create_are_ignored(app, credits, plan, stripe, received):
    foreign = {**plan.invoice(1, listed=True), "id": "in_test_foreign"}
    foreign["parent"]["subscription_details"] = {"subscription": "sub_test_foreign", "metadata": {}}
    made_up = {**plan.invoice(2, listed=True), "id": "in_test_made_up"}
    made_up["parent"]["subscription_details"] = {
        "subscription": "sub_test_made_up",
        "metadata": {"subscriptionRef": "sub_" + "0" * 32},
    }
    one_off = {**plan.invoice(3, listed=True), "id": "in_test_one_off", "parent": None}
    invoices_listed(stripe, [foreign, made_up, one_off])
    before = state(credits)
    received.clear()
    result = reconcile(app)
    assert result.exit_code == 0, result.output
    assert "fixed 0; 3 not ours" in result.output
    assert state(credits) == before
    assert received == []


def test_a_missed_refund_of_a_plan_invoice_is_clawed_back(app, client, credits, plan, stripe, received):
    invoices_listed(stripe, [plan.invoice(0, listed=True)])
    at_stripe(stripe, plan.pi(0), amount=2000, refunded=1000)
    result = reconcile(app)
    assert result.exit_code == 0, result.output
    assert credits.balance("alice") == 1000
    row = invoice_row(credits, "in_test_alice_0")
    assert f"purchase {row.id}\tin_test_alice_0\talice\trefund: 1000 refunded at Stripe" in result.output
    assert reconciled(received) == [(row.id, "refund")]
    assert "fixed 0" in reconcile(app).output
    late = testing.event("charge.refunded", testing.charge(plan.pi(0), amount=2000, amount_refunded=1000))
    assert testing.post_event(client, late).json["outcome"] == "unchanged"
    assert credits.balance("alice") == 1000
    assert credits.audit() == []


def test_a_dry_run_of_a_lost_invoice_changes_nothing(app, credits, plan, stripe, received):
    renewal = plan.invoice(1, listed=True)
    invoices_listed(stripe, [renewal])
    before = state(credits)
    received.clear()
    result = reconcile(app, "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"purchase new\t{renewal['id']}\talice\twould be fulfilled: invoice paid 2000 USD" in result.output
    assert "would fix 1 (1 fulfilled)" in result.output
    assert state(credits) == before
    assert received == []
    report = credits.reconcile(timedelta(days=1), dry_run=True)
    assert [(f.purchase_id, f.reference, f.wallet, f.done) for f in report.fixes] == [
        (None, renewal["id"], ALICE, False)
    ]
    testing.mock_invoice_payments(stripe, renewal["id"], plan.pi(1))
    assert "fixed 1 (1 fulfilled)" in reconcile(app).output
    assert credits.balance("alice") == 4000


def test_reconciles_and_the_invoice_paid_webhooks_at_once_grant_each_invoice_once(
    app, credits, plan, stripe, backend, received
):
    n = 3
    renewals = [plan.invoice(k) for k in range(1, n + 1)]
    invoices_listed(stripe, [{**i, "payments": None} for i in reversed(renewals)], page_size=2)
    for k, invoice in enumerate(renewals, start=1):
        testing.mock_invoice_payments(stripe, invoice["id"], plan.pi(k))
        at_stripe(stripe, plan.pi(k), amount=2000)
    received.clear()
    barrier = threading.Barrier(2 + n)
    errors = []

    def reconciler():
        with app.app_context():
            credits.reconcile(timedelta(days=3))

    def webhook(invoice):
        response = deliver(app.test_client(), "invoice.paid", invoice)
        if response.status_code != 200 or response.json["outcome"] not in ("fulfilled", "already_fulfilled"):
            errors.append((invoice["id"], response.json))

    def run(job, *args):
        try:
            barrier.wait(timeout=30)
            job(*args)
        except Exception as exc:  # reported below
            errors.append(exc)

    jobs = [(reconciler,), (reconciler,)] + [(webhook, i) for i in renewals]
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert credits.balance("alice") == 2000 * (n + 1)
    e = credits.tables.entries
    with credits.db.engine.connect() as conn:
        kinds = [r.kind for r in conn.execute(sa.select(e.c.kind))]
    assert kinds.count("purchase") == n + 1
    assert [name for name, _, _ in received].count("plan_renewed") == n
    assert all(invoice_row(credits, i["id"]).status == "fulfilled" for i in renewals)
    assert len(reconciled(received)) <= n
    assert credits.audit() == []
    assert "fixed 0" in reconcile(app).output
