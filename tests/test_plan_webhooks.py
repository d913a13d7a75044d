"""Plans through Stripe's webhooks: a subscription's Checkout Session, each paid invoice granting its
allowance once, plan changes, cancellation, failed payments, refunds; events in any order, repeated
and raced."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa

from flask_credits import testing

DAY = 24 * 60 * 60
PLANS = {
    "pro": {"price": "price_pro", "credits": 2000, "name": "Pro"},
    "max": {"price": "price_max", "credits": 5000, "name": "Max"},
    "forever": {"price": "price_forever", "credits": 1000, "rollover": True},
}
PRICES = {"pro": ("price_pro", 2000), "max": ("price_max", 5000), "forever": ("price_forever", 900)}


@pytest.fixture
def credits_config():
    return {
        "STRIPE_SECRET_KEY": "sk_test_plan_webhooks",
        "STRIPE_WEBHOOK_SECRET": "whsec_test_plan_webhooks",
        "CREDITS_STRIPE_MAX_RETRIES": 0,
        "CREDITS_PLANS": PLANS,
    }


class Plan:
    """One subscription this app started (POST /credits/subscribe), and the Stripe objects about it."""

    counter = itertools.count(1)

    def __init__(self, client, clock, attempt, session_id, plan, user):
        self.client, self.clock = client, clock
        self.attempt, self.session_id, self.plan, self.user = attempt, session_id, plan, user
        self.stripe_id = f"sub_test_{user}_{next(self.counter)}"
        self.start = int(clock.now.timestamp())

    @property
    def metadata(self):
        return {"userId": self.user, "plan": self.plan, "subscriptionRef": self.attempt}

    def period(self, n):
        """The n-th 30-day period (0: the first), as Unix times."""
        return self.start + n * 30 * DAY, self.start + (n + 1) * 30 * DAY

    def session(self, **kwargs):
        return testing.subscription_session(
            self.session_id,
            subscription=self.stripe_id,
            client_reference_id=self.attempt,
            amount_total=PRICES[self.plan][1],
            metadata=self.metadata,
            **kwargs,
        )

    def invoice(self, n=0, *, plan=None, invoice_id=None, payment_intent="default", **kwargs):
        plan = plan or self.plan
        start, end = self.period(n)
        kwargs.setdefault("billing_reason", "subscription_create" if n == 0 else "subscription_cycle")
        return testing.invoice(
            invoice_id or f"in_test_{self.stripe_id}_{n}",
            subscription=self.stripe_id,
            price=PRICES[plan][0],
            period_start=start,
            period_end=end,
            amount_paid=PRICES[plan][1],
            payment_intent=f"pi_test_{self.stripe_id}_{n}" if payment_intent == "default" else payment_intent,
            metadata=self.metadata,
            **kwargs,
        )

    def subscription(self, n=0, *, plan=None, **kwargs):
        start, end = self.period(n)
        return testing.subscription(
            self.stripe_id,
            price=PRICES[plan or self.plan][0],
            period_start=start,
            period_end=end,
            metadata=self.metadata,
            **kwargs,
        )

    def deliver(self, event_type, obj, **kwargs):
        response = testing.post_event(self.client, testing.event(event_type, obj, **kwargs))
        assert response.status_code == 200, response.json
        return response.json["outcome"]


@pytest.fixture
def subscribe(app, client, login, stripe, credits, clock):
    """Subscribe ``user`` to ``plan`` through the endpoint; returns its :class:`Plan`."""

    def start(plan="pro", user="alice"):
        testing.mock_create_session(stripe)
        login(user)
        response = client.post("/credits/subscribe", json={"plan": plan})
        assert response.status_code == 200, response.json
        row = subscription_row(credits, checkout_session_id=response.json["id"])
        return Plan(client, clock, row.attempt_key, response.json["id"], plan, user)

    return start


def subscription_row(credits, **where):
    s = credits.tables.subscriptions
    with credits.db.engine.connect() as conn:
        query = sa.select(s)
        for column, value in where.items():
            query = query.where(s.c[column] == value)
        return conn.execute(query).one()


def invoice_purchases(credits):
    p = credits.tables.purchases
    with credits.db.engine.connect() as conn:
        return conn.execute(sa.select(p).where(p.c.invoice_id.is_not(None)).order_by(p.c.id)).all()


def lots(credits, user="alice"):
    lt, w = credits.tables.lots, credits.tables.wallets
    with credits.db.engine.connect() as conn:
        return conn.execute(
            sa.select(lt.c.amount, lt.c.remaining, lt.c.expires_at)
            .join(w, w.c.id == lt.c.wallet_id)
            .where(w.c.user_id == user)
            .order_by(lt.c.id)
        ).all()


def outcomes(credits):
    t = credits.tables.stripe_events
    with credits.db.engine.connect() as conn:
        return [r.outcome for r in conn.execute(sa.select(t).order_by(t.c.received_at, t.c.id))]


def names(received):
    return [n for n, _, _ in received]


def at(timestamp):
    from datetime import datetime, timezone

    return datetime.fromtimestamp(timestamp, timezone.utc)


# -- the subscription's checkout -----------------------------------------------------------------------


def test_a_completed_checkout_links_the_stripe_subscription_and_activates_it(credits, subscribe):
    plan = subscribe()
    assert plan.deliver("checkout.session.completed", plan.session()) == "subscribed"
    row = subscription_row(credits, id=subscription_row(credits, attempt_key=plan.attempt).id)
    assert (row.stripe_subscription_id, row.status) == (plan.stripe_id, "active")
    found = credits.subscription("alice")
    assert (found.plan, found.status) == ("pro", "active")
    # The checkout grants nothing: the paid invoice does.
    assert credits.balance("alice") == 0


def test_a_checkout_paid_later_is_incomplete_until_its_invoice_is_paid(credits, subscribe):
    plan = subscribe()
    plan.deliver("checkout.session.completed", plan.session(payment_status="unpaid"))
    assert credits.subscription("alice").status == "incomplete"
    plan.deliver("invoice.paid", plan.invoice())
    assert credits.subscription("alice").status == "active"
    assert credits.balance("alice") == 2000


def test_an_expired_subscription_checkout_frees_the_wallet(credits, subscribe, client, stripe):
    plan = subscribe()
    expired = plan.session(status="expired", payment_status="unpaid")
    expired["subscription"] = None
    assert plan.deliver("checkout.session.expired", expired) == "expired"
    row = subscription_row(credits, attempt_key=plan.attempt)
    assert (row.status, row.live_wallet_id) == ("expired", None)
    testing.mock_create_session(stripe)
    assert client.post("/credits/subscribe", json={"plan": "max"}).status_code == 200


def test_payment_mode_sessions_still_go_to_purchases(app, client, login, stripe, credits, subscribe):
    plan = subscribe()
    testing.mock_create_session(stripe, "cs_test_pack")
    assert client.post("/credits/checkout", json={"quantity": 2}).status_code == 200
    with app.app_context():
        paid = testing.session_for("cs_test_pack")
    assert plan.deliver("checkout.session.completed", paid) == "fulfilled"
    assert credits.balance("alice") == 200
    assert subscription_row(credits, attempt_key=plan.attempt).status == "open"


# -- paid invoices -------------------------------------------------------------------------------------


def test_the_first_paid_invoice_grants_the_allowance_until_the_period_ends(credits, subscribe, received):
    plan = subscribe()
    plan.deliver("checkout.session.completed", plan.session())
    assert plan.deliver("invoice.paid", plan.invoice()) == "fulfilled"
    assert credits.balance("alice") == 2000
    [purchase] = invoice_purchases(credits)
    end = plan.period(0)[1]
    assert (purchase.invoice_id, purchase.status, purchase.pack, purchase.credits) == (
        f"in_test_{plan.stripe_id}_0",
        "fulfilled",
        "pro",
        2000,
    )
    assert (purchase.amount, purchase.currency) == (2000, "usd")
    assert purchase.payment_intent == f"pi_test_{plan.stripe_id}_0"
    assert lots(credits) == [(2000, 2000, at(end))]
    entry = credits.history("alice")[0]
    assert (entry.kind, entry.amount, entry.reason) == ("purchase", 2000, "Pro plan: 2000 credits")
    assert entry.metadata["invoice_id"] == purchase.invoice_id
    assert credits.subscription("alice").current_period_end == at(end)
    assert names(received) == ["credits_granted", "plan_started"]
    started = received[1][2]
    assert (started["amount"], started["subscription"].plan, started["wallet"].user_id) == (
        2000,
        "pro",
        "alice",
    )
    assert credits.audit() == []


def test_the_payment_intent_is_asked_of_stripe_when_the_invoice_leaves_out_its_payments(
    credits, subscribe, stripe
):
    plan = subscribe()
    invoice = plan.invoice(payment_intent=None)
    assert "payments" not in invoice
    testing.mock_invoice_payments(stripe, invoice["id"], "pi_test_looked_up")
    plan.deliver("invoice.paid", invoice)
    assert invoice_purchases(credits)[0].payment_intent == "pi_test_looked_up"
    assert credits.balance("alice") == 2000


@pytest.mark.parametrize(
    "order",
    list(
        itertools.permutations(
            ["checkout.session.completed", "invoice.paid", "customer.subscription.updated"]
        )
    ),
)
def test_events_in_any_order_credit_the_first_invoice_once(credits, subscribe, order):
    plan = subscribe()
    objects = {
        "checkout.session.completed": plan.session(),
        "invoice.paid": plan.invoice(),
        "customer.subscription.updated": plan.subscription(),
    }
    for event_type in order:
        plan.deliver(event_type, objects[event_type])
    assert credits.balance("alice") == 2000
    found = credits.subscription("alice")
    assert (found.status, found.plan, found.current_period_end) == ("active", "pro", at(plan.period(0)[1]))
    assert subscription_row(credits, attempt_key=plan.attempt).stripe_subscription_id == plan.stripe_id


def test_a_repeated_invoice_paid_credits_once(credits, subscribe):
    plan = subscribe()
    event = testing.event("invoice.paid", plan.invoice())
    assert testing.post_event(plan.client, event).json["outcome"] == "fulfilled"
    assert testing.post_event(plan.client, event).json["outcome"] == "duplicate"
    # Another event about the same invoice (Stripe resends under a new id after a timeout, say).
    assert plan.deliver("invoice.paid", plan.invoice()) == "already_fulfilled"
    assert credits.balance("alice") == 2000
    assert len(invoice_purchases(credits)) == 1


@pytest.mark.parametrize("same_event", [True, False], ids=["same-event", "new-event-ids"])
def test_concurrent_deliveries_of_one_paid_invoice_credit_once(app, credits, subscribe, backend, same_event):
    if backend == "sqlite":
        pytest.skip("SQLite runs one writer at a time: nothing to race")
    plan = subscribe()
    invoice = plan.invoice()
    shared = testing.event("invoice.paid", invoice)
    deliveries = 8
    barrier = threading.Barrier(deliveries)

    def deliver(_):
        client = app.test_client()
        event = shared if same_event else testing.event("invoice.paid", invoice)
        barrier.wait()
        return testing.post_event(client, event)

    with ThreadPoolExecutor(deliveries) as pool:
        answers = list(pool.map(deliver, range(deliveries)))
    assert {a.status_code for a in answers} == {200}
    found = [a.json["outcome"] for a in answers]
    assert found.count("fulfilled") == 1
    assert set(found) <= {"fulfilled", "duplicate", "already_fulfilled"}
    assert credits.balance("alice") == 2000
    assert len(invoice_purchases(credits)) == 1
    assert credits.audit() == []


def test_an_invoice_of_a_subscription_this_app_did_not_create_is_recorded_not_credited(
    credits, subscribe, received
):
    plan = subscribe()
    stranger = plan.invoice()
    stranger["parent"]["subscription_details"] = {
        "subscription": "sub_test_made_in_the_dashboard",
        # Metadata alone names no wallet: only a row this app stored does.
        "metadata": {"userId": "alice", "plan": "pro"},
    }
    assert plan.deliver("invoice.paid", stranger) == "unknown_subscription"
    assert outcomes(credits) == ["unknown_subscription"]
    assert credits.balance("alice") == 0
    assert invoice_purchases(credits) == []
    assert received == []


def test_the_wallet_comes_from_the_stored_row_not_the_metadata(credits, subscribe):
    plan = subscribe()
    invoice = plan.invoice()
    invoice["parent"]["subscription_details"]["metadata"]["userId"] = "bob"
    plan.deliver("invoice.paid", invoice)
    assert (credits.balance("alice"), credits.balance("bob")) == (2000, 0)


def test_an_invoice_that_is_not_a_subscriptions_is_ignored(credits, subscribe):
    plan = subscribe()
    one_off = plan.invoice(billing_reason="manual")
    one_off["parent"] = None
    assert plan.deliver("invoice.paid", one_off) == "ignored"
    assert credits.balance("alice") == 0


def test_a_proration_invoice_grants_no_allowance(credits, subscribe):
    plan = subscribe()
    plan.deliver("invoice.paid", plan.invoice())
    assert (
        plan.deliver(
            "invoice.paid", plan.invoice(invoice_id="in_test_prorate", billing_reason="subscription_update")
        )
        == "ignored"
    )
    assert credits.balance("alice") == 2000


def test_a_renewal_grants_a_new_allowance_and_the_old_one_expires_at_its_period_end(
    credits, subscribe, clock, received
):
    plan = subscribe()
    plan.deliver("invoice.paid", plan.invoice(0))
    credits.spend("alice", 500, reason="work")
    clock.advance(days=29, hours=23)
    # Stripe renews (and charges) shortly before the first period ends.
    assert plan.deliver("invoice.paid", plan.invoice(1)) == "fulfilled"
    assert credits.balance("alice") == 1500 + 2000
    assert names(received)[-2:] == ["credits_granted", "plan_renewed"]
    clock.advance(hours=2)  # past the first period's end
    assert credits.balance("alice") == 2000
    assert [e.kind for e in credits.history("alice")][:1] == ["expire"]
    assert credits.subscription("alice").current_period_end == at(plan.period(1)[1])
    clock.advance(days=30)
    assert credits.balance("alice") == 0
    assert credits.audit() == []


def test_a_rollover_plans_allowance_never_expires(credits, subscribe, clock):
    plan = subscribe("forever")
    plan.deliver("invoice.paid", plan.invoice(0))
    clock.advance(days=31)
    plan.deliver("invoice.paid", plan.invoice(1))
    clock.advance(days=365)
    assert credits.balance("alice") == 2000
    assert [lot.expires_at for lot in lots(credits)] == [None, None]


def test_a_late_invoice_for_an_older_period_does_not_move_the_period_end_back(credits, subscribe):
    plan = subscribe()
    plan.deliver("invoice.paid", plan.invoice(1))
    plan.deliver("invoice.paid", plan.invoice(0))
    assert credits.subscription("alice").current_period_end == at(plan.period(1)[1])


# -- refunds and disputes ------------------------------------------------------------------------------


def test_a_refund_of_a_plan_invoice_claws_back_in_proportion(credits, subscribe, received):
    plan = subscribe()
    plan.deliver("invoice.paid", plan.invoice())
    pi = f"pi_test_{plan.stripe_id}_0"
    assert plan.deliver("charge.refunded", testing.charge(pi, amount=2000, amount_refunded=500)) == "revoked"
    assert credits.balance("alice") == 1500
    credits.spend("alice", 1400, reason="work")
    plan.deliver("charge.refunded", testing.charge(pi, amount=2000, amount_refunded=2000))
    assert credits.balance("alice") == 0
    w = credits.tables.wallets
    with credits.db.engine.connect() as conn:
        assert conn.execute(sa.select(w.c.debt).where(w.c.user_id == "alice")).scalar_one() == 1400
    # The next allowance pays the debt first.
    plan.deliver("invoice.paid", plan.invoice(1))
    assert credits.balance("alice") == 600
    assert credits.audit() == []


def test_a_lost_dispute_of_a_plan_invoice_claws_back(credits, subscribe):
    plan = subscribe()
    plan.deliver("invoice.paid", plan.invoice())
    pi = f"pi_test_{plan.stripe_id}_0"
    plan.deliver("charge.dispute.funds_withdrawn", testing.dispute(pi, amount=2000))
    assert credits.balance("alice") == 0
    plan.deliver("charge.dispute.funds_reinstated", testing.dispute(pi, amount=2000, status="won"))
    assert credits.balance("alice") == 2000


@pytest.mark.parametrize("cause", ["refund", "dispute"])
def test_a_refund_or_dispute_that_overtakes_its_invoice_paid_credits_the_invoice_then_claws_back(
    credits, subscribe, stripe, received, cause
):
    plan = subscribe()
    invoice = plan.invoice()
    pi = f"pi_test_{plan.stripe_id}_0"
    testing.mock_find_session(stripe, pi, None)  # not a checkout's payment: an invoice's
    testing.mock_find_invoice(stripe, pi, invoice)
    if cause == "refund":
        event = "charge.refunded", testing.charge(pi, amount=2000, amount_refunded=500)
    else:
        event = "charge.dispute.funds_withdrawn", testing.dispute(pi, amount=500)
    assert plan.deliver(*event) == "revoked"
    assert credits.balance("alice") == 1500
    assert [e.kind for e in credits.history("alice")] == ["revoke", "purchase"]
    assert names(received)[:3] == ["credits_granted", "plan_started", "credits_revoked"]
    subscription = credits.subscription("alice")
    assert (subscription.status, subscription.current_period_end) == ("active", at(plan.period(0)[1]))
    # The invoice's own event, when it comes, finds it credited; the same refund again, nothing more.
    assert plan.deliver("invoice.paid", invoice) == "already_fulfilled"
    assert plan.deliver(*event) == "unchanged"
    assert credits.balance("alice") == 1500
    assert len(invoice_purchases(credits)) == 1
    assert credits.audit() == []


def test_a_refund_of_an_invoice_of_a_subscription_this_app_did_not_create_is_unmatched(
    credits, subscribe, stripe
):
    plan = subscribe()
    stranger = plan.invoice()
    stranger["parent"]["subscription_details"] = {
        "subscription": "sub_test_made_in_the_dashboard",
        "metadata": {"userId": "alice", "plan": "pro"},
    }
    pi = f"pi_test_{plan.stripe_id}_0"
    testing.mock_find_session(stripe, pi, None)
    testing.mock_find_invoice(stripe, pi, stranger)
    refund = testing.charge(pi, amount=2000, amount_refunded=2000)
    assert plan.deliver("charge.refunded", refund) == "unmatched"
    assert credits.balance("alice") == 0
    assert invoice_purchases(credits) == []
    assert outcomes(credits) == ["unmatched"]


def test_a_refund_racing_its_invoice_paid_credits_once_and_claws_back_once(
    app, credits, subscribe, stripe, backend
):
    if backend == "sqlite":
        pytest.skip("SQLite runs one writer at a time: nothing to race")
    plan = subscribe()
    invoice = plan.invoice()
    pi = f"pi_test_{plan.stripe_id}_0"
    testing.mock_find_session(stripe, pi, None)
    testing.mock_find_invoice(stripe, pi, invoice)
    refund = testing.charge(pi, amount=2000, amount_refunded=500)
    events = [testing.event("invoice.paid", invoice), testing.event("charge.refunded", refund)] * 4
    barrier = threading.Barrier(len(events))

    def deliver(event):
        client = app.test_client()
        barrier.wait()
        return testing.post_event(client, event)

    with ThreadPoolExecutor(len(events)) as pool:
        answers = list(pool.map(deliver, events))
    assert {a.status_code for a in answers} == {200}, [a.json for a in answers]
    found = [a.json["outcome"] for a in answers]
    assert found.count("revoked") == 1, found
    assert credits.balance("alice") == 1500
    assert len(invoice_purchases(credits)) == 1
    assert credits.audit() == []


# -- plan changes --------------------------------------------------------------------------------------


def test_an_upgrade_grants_the_difference_at_once_until_the_period_ends(credits, subscribe, clock, received):
    plan = subscribe()
    plan.deliver("invoice.paid", plan.invoice(0))
    clock.advance(days=10)
    upgraded = plan.subscription(0, plan="max")
    assert plan.deliver("customer.subscription.updated", upgraded) == "plan_changed"
    assert credits.balance("alice") == 5000
    assert credits.subscription("alice").plan == "max"
    changed = next(kw for n, _, kw in received if n == "plan_changed")
    assert (changed["previous"], changed["amount"], changed["subscription"].plan) == ("pro", 3000, "max")
    assert lots(credits)[-1] == (3000, 3000, at(plan.period(0)[1]))
    # The same change again (a new event about it) grants nothing more.
    assert plan.deliver("customer.subscription.updated", upgraded) == "updated"
    assert credits.balance("alice") == 5000
    # The renewal grants the new plan's allowance; the period's credits expire.
    clock.advance(days=20)
    plan.deliver("invoice.paid", plan.invoice(1, plan="max"))
    clock.advance(hours=1)
    assert credits.balance("alice") == 5000
    assert credits.audit() == []


def changed(plan, n, old, new, *, created):
    """``customer.subscription.updated`` for a change from ``old`` to ``new`` in period ``n``, as
    Stripe sends it: the item as it was before in ``previous_attributes``."""
    return testing.event(
        "customer.subscription.updated",
        plan.subscription(n, plan=new),
        created=created,
        previous_attributes={"items": plan.subscription(n, plan=old)["items"]},
    )


def test_changes_delivered_in_reverse_order_grant_what_each_was_worth_and_keep_the_newest_plan(
    credits, subscribe, clock, received
):
    plan = subscribe()
    plan.deliver("invoice.paid", plan.invoice(0))
    now = int(clock.now.timestamp())
    up, down = (
        changed(plan, 0, "pro", "max", created=now + 10),
        changed(plan, 0, "max", "pro", created=now + 20),
    )
    # The downgrade (newer) arrives first: the plan is what it says, nothing granted.
    assert testing.post_event(plan.client, down).json["outcome"] == "updated"
    # The upgrade (older) arrives late: its difference is granted, the plan stays the newer one's.
    assert testing.post_event(plan.client, up).json["outcome"] == "plan_changed"
    assert credits.balance("alice") == 5000
    assert credits.subscription("alice").plan == "pro"
    moved = [kw for n, _, kw in received if n == "plan_changed"]
    assert [(kw["previous"], kw["amount"]) for kw in moved] == [("pro", 3000)]
    # The same change told again by another event grants nothing more.
    again = changed(plan, 0, "pro", "max", created=now + 10)
    assert testing.post_event(plan.client, again).json["outcome"] == "updated"
    assert credits.balance("alice") == 5000
    assert credits.audit() == []


def test_an_upgrade_is_granted_from_the_plan_the_event_says_not_the_stored_one(credits, subscribe, clock):
    """Two upgrades in one period (pro > forever is none: 1000 < 2000; pro > max is one), told out of
    order: each event's own before and after decide, not what the row shows when it arrives."""
    plan = subscribe("forever")
    plan.deliver("invoice.paid", plan.invoice(0, plan="forever"))
    now = int(clock.now.timestamp())
    first = changed(plan, 0, "forever", "pro", created=now + 10)
    second = changed(plan, 0, "pro", "max", created=now + 20)
    assert testing.post_event(plan.client, second).json["outcome"] == "plan_changed"
    assert testing.post_event(plan.client, first).json["outcome"] == "plan_changed"
    # 1000 (forever) + 1000 (forever > pro) + 3000 (pro > max), each once.
    assert credits.balance("alice") == 5000
    assert credits.subscription("alice").plan == "max"
    assert credits.audit() == []


def test_an_older_update_delivered_late_does_not_undo_a_newer_status(credits, subscribe, clock):
    plan = subscribe()
    plan.deliver("invoice.paid", plan.invoice(0))
    now = int(clock.now.timestamp())
    newer = testing.event(
        "customer.subscription.updated", plan.subscription(0, cancel_at_period_end=True), created=now + 20
    )
    older = testing.event(
        "customer.subscription.updated", plan.subscription(0, status="past_due"), created=now + 10
    )
    testing.post_event(plan.client, newer)
    testing.post_event(plan.client, older)
    found = credits.subscription("alice")
    assert (found.status, found.cancel_at_period_end) == ("active", True)


def test_a_downgrade_grants_nothing_now_and_the_renewal_grants_the_smaller_plan(
    credits, subscribe, clock, received
):
    plan = subscribe("max")
    plan.deliver("invoice.paid", plan.invoice(0))
    assert plan.deliver("customer.subscription.updated", plan.subscription(0, plan="pro")) == "plan_changed"
    assert credits.balance("alice") == 5000
    changed = next(kw for n, _, kw in received if n == "plan_changed")
    assert (changed["previous"], changed["amount"], changed["entry"]) == ("max", 0, None)
    clock.advance(days=30, hours=1)
    plan.deliver("invoice.paid", plan.invoice(1, plan="pro"))
    assert credits.balance("alice") == 2000


def test_an_upgrade_arriving_after_its_period_ended_grants_nothing(credits, subscribe, clock):
    plan = subscribe()
    plan.deliver("invoice.paid", plan.invoice(0))
    clock.advance(days=31)
    plan.deliver("customer.subscription.updated", plan.subscription(0, plan="max"))
    assert credits.balance("alice") == 0


def test_a_change_from_a_plan_no_longer_configured_grants_nothing_and_is_recorded(
    credits, subscribe, received
):
    plan = subscribe()
    s = credits.tables.subscriptions
    with credits.db.engine.begin() as conn:
        conn.execute(sa.update(s).where(s.c.attempt_key == plan.attempt).values(plan="legacy"))
    assert plan.deliver("customer.subscription.updated", plan.subscription(0, plan="max")) == "plan_changed"
    assert credits.balance("alice") == 0
    changed = next(kw for n, _, kw in received if n == "plan_changed")
    assert (changed["previous"], changed["amount"]) == ("legacy", 0)


def test_an_update_records_status_period_and_cancellation_at_period_end(credits, subscribe):
    plan = subscribe()
    plan.deliver("invoice.paid", plan.invoice(0))
    plan.deliver("customer.subscription.updated", plan.subscription(1, cancel_at_period_end=True))
    found = credits.subscription("alice")
    assert (found.status, found.cancel_at_period_end, found.current_period_end) == (
        "active",
        True,
        at(plan.period(1)[1]),
    )


# -- cancellation and failed payments ------------------------------------------------------------------


def test_a_deleted_subscription_ends_grants_nothing_more_and_keeps_what_was_granted(
    credits, subscribe, client, stripe, received
):
    plan = subscribe()
    plan.deliver("invoice.paid", plan.invoice(0))
    assert (
        plan.deliver("customer.subscription.deleted", plan.subscription(0, status="canceled")) == "cancelled"
    )
    assert credits.subscription("alice") is None
    row = subscription_row(credits, attempt_key=plan.attempt)
    assert (row.status, row.live_wallet_id) == ("canceled", None)
    assert credits.balance("alice") == 2000
    assert names(received)[-1] == "plan_cancelled"
    # A late update cannot bring it back; a repeated deletion changes nothing.
    plan.deliver("customer.subscription.updated", plan.subscription(0, status="active"))
    assert subscription_row(credits, attempt_key=plan.attempt).status == "canceled"
    assert (
        plan.deliver("customer.subscription.deleted", plan.subscription(0, status="canceled")) == "unchanged"
    )
    # The wallet may subscribe again.
    testing.mock_create_session(stripe)
    assert client.post("/credits/subscribe", json={"plan": "pro"}).status_code == 200


def test_a_deletion_before_the_checkout_event_is_not_undone_by_it(credits, subscribe):
    plan = subscribe()
    plan.deliver("customer.subscription.deleted", plan.subscription(0, status="canceled"))
    plan.deliver("checkout.session.completed", plan.session())
    assert subscription_row(credits, attempt_key=plan.attempt).status == "canceled"
    assert credits.subscription("alice") is None


def test_a_failed_payment_makes_the_plan_past_due_until_an_invoice_is_paid(credits, subscribe, received):
    plan = subscribe()
    plan.deliver("invoice.paid", plan.invoice(0))
    failed = plan.invoice(1, status="open", payment_intent=None)
    assert plan.deliver("invoice.payment_failed", failed) == "past_due"
    assert credits.subscription("alice").status == "past_due"
    assert credits.balance("alice") == 2000
    kwargs = next(kw for n, _, kw in received if n == "credits_payment_failed")
    assert (kwargs["purchase"], kwargs["subscription"].status, kwargs["wallet"].user_id) == (
        None,
        "past_due",
        "alice",
    )
    plan.deliver("invoice.paid", plan.invoice(1))
    assert credits.subscription("alice").status == "active"
    assert credits.balance("alice") == 4000


def test_events_about_unknown_subscriptions_are_recorded_and_change_nothing(credits, subscribe):
    plan = subscribe()
    stranger = plan.subscription(0)
    stranger["id"], stranger["metadata"] = "sub_test_stranger", {}
    assert plan.deliver("customer.subscription.updated", stranger) == "unknown_subscription"
    assert plan.deliver("customer.subscription.deleted", stranger) == "unknown_subscription"
    failed = plan.invoice(0)
    failed["parent"]["subscription_details"] = {"subscription": "sub_test_stranger", "metadata": {}}
    assert plan.deliver("invoice.payment_failed", failed) == "unknown_subscription"
    assert subscription_row(credits, attempt_key=plan.attempt).status == "open"
