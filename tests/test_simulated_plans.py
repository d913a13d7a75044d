"""Plans in the simulated (offline) Stripe: subscribing, paying, renewing, cancelling, a failed payment
and plan changes, each delivered as signed events through the real webhook code, no network."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
import responses
import sqlalchemy as sa
from helpers import build_example_app, signed_up

HTML = {"Accept": "text/html"}
PLANS = {
    "starter": {"price": "price_sim_starter", "credits": 500, "name": "Starter"},
    "pro": {"price": "price_sim_pro", "credits": 2000, "name": "Pro"},
}
PERIOD = timedelta(days=30)


@pytest.fixture
def credits_config():
    return {
        "CREDITS_STRIPE_MODE": "simulated",
        "STRIPE_WEBHOOK_SECRET": None,
        "STRIPE_SECRET_KEY": None,
        "CREDITS_PLANS": PLANS,
    }


@pytest.fixture(autouse=True)
def no_network():
    # Any HTTP call would fail the test: the simulated mode must not reach Stripe.
    with responses.RequestsMock() as rsps:
        yield rsps


def start(client, plan="pro"):
    """Subscribe from the credits page; returns the simulated checkout page's path."""
    response = client.post("/credits/subscribe", data={"plan": plan}, headers=HTML)
    assert response.status_code == 303, response.get_data(as_text=True)
    location = response.headers["Location"]
    assert "/credits/simulated-checkout/cs_sim_" in location
    return "/" + location.split("://", 1)[-1].split("/", 1)[-1]


def subscribe(client, plan="pro"):
    page = start(client, plan)
    paid = client.post(page, data={"action": "pay"}, headers=HTML)
    assert paid.status_code == 303
    assert paid.headers["Location"].endswith("/credits/")
    return page


def portal(client, credits, action, user="alice", **data):
    stripe_id = credits.subscription(user).stripe_subscription_id
    response = client.post(
        "/credits/simulated-portal", data={"action": action, "subscription": stripe_id, **data}, headers=HTML
    )
    assert response.status_code == 303, response.get_data(as_text=True)
    return response


def credits_page(client):
    response = client.get("/credits/", headers=HTML)
    assert response.status_code == 200
    return response.get_data(as_text=True)


def events(credits):
    t = credits.tables.stripe_events
    with credits.db.engine.connect() as conn:
        return sorted(conn.execute(sa.select(t.c.type, t.c.outcome)).all())


def test_subscribe_and_pay_grant_the_plan_allowance(client, login, credits, clock, received):
    login("alice")
    page = start(client)
    shown = client.get(page, headers=HTML).get_data(as_text=True)
    assert (
        "Subscribe to <strong>Pro</strong>: 2000 credits each month for <strong>20.00 USD</strong>" in shown
    )
    assert client.post(page, data={"action": "pay"}, headers=HTML).status_code == 303
    assert credits.balance("alice") == 2000
    subscription = credits.subscription("alice")
    assert (subscription.plan, subscription.status) == ("pro", "active")
    assert subscription.current_period_end == clock.now + PERIOD
    assert events(credits) == [("checkout.session.completed", "processed"), ("invoice.paid", "processed")]
    assert [n for n, _, _ in received].count("plan_started") == 1
    assert 'data-testid="plan-name">Pro<' in credits_page(client)
    # The checkout is over: paying again is refused, and nothing more is granted.
    assert "This checkout is closed." in client.get(page, headers=HTML).get_data(as_text=True)
    assert client.post(page, data={"action": "pay"}, headers=HTML).status_code == 400
    assert credits.balance("alice") == 2000


def test_renewal_grants_the_next_allowance_and_the_old_one_expires_at_its_period_end(
    client, login, credits, clock, received
):
    login("alice")
    subscribe(client)
    first_end = credits.subscription("alice").current_period_end
    portal(client, credits, "renew")
    assert credits.balance("alice") == 4000
    assert credits.subscription("alice").current_period_end == first_end + PERIOD
    assert [n for n, _, _ in received].count("plan_renewed") == 1
    clock.advance(days=30, seconds=1)
    assert credits.balance("alice") == 2000  # the first period's allowance expired at its end
    clock.advance(days=30)
    assert credits.balance("alice") == 0
    # Renewing after the period ended pays the next period, from where the last one ended.
    portal(client, credits, "renew")
    assert credits.balance("alice") == 2000
    assert credits.subscription("alice").current_period_end == first_end + 2 * PERIOD


def test_reconcile_finds_the_simulated_plan_invoices_in_step_with_their_rows(
    app, client, login, credits, received
):
    login("alice")
    subscribe(client)
    portal(client, credits, "renew")
    result = app.test_cli_runner().invoke(args=["credits", "reconcile", "--since", "1h"])
    assert result.exit_code == 0, result.output
    assert "checked 0 checkout sessions, 2 plan invoices and 0 automatic purchases" in result.output
    assert "fixed 0; 2 in step" in result.output
    assert credits.balance("alice") == 4000
    assert "purchase_reconciled" not in [n for n, _, _ in received]


def test_cancel_at_period_end_keeps_the_plan_until_the_period_ends(client, login, credits):
    login("alice")
    subscribe(client)
    portal(client, credits, "cancel_at_period_end")
    assert credits.subscription("alice").cancel_at_period_end is True
    assert "Cancelled: ends on" in credits_page(client)
    portal(client, credits, "keep")
    assert credits.subscription("alice").cancel_at_period_end is False
    portal(client, credits, "cancel_at_period_end")
    portal(client, credits, "renew")  # the period ends: the subscription ends, nothing more is granted
    assert credits.subscription("alice") is None
    assert credits.balance("alice") == 2000


def test_cancel_now_ends_the_plan_and_the_user_can_subscribe_again(client, login, credits, received):
    login("alice")
    subscribe(client)
    portal(client, credits, "cancel_now")
    assert credits.subscription("alice") is None
    assert [n for n, _, _ in received].count("plan_cancelled") == 1
    assert credits.balance("alice") == 2000  # what was granted stays until it expires
    subscribe(client, "starter")
    assert credits.subscription("alice").plan == "starter"
    assert credits.balance("alice") == 2500


def test_a_failed_payment_shows_past_due_and_paying_later_grants_that_period(
    client, login, credits, received
):
    login("alice")
    subscribe(client)
    portal(client, credits, "fail_payment")
    assert credits.subscription("alice").status == "past_due"
    assert 'data-testid="plan-payment-failed"' in credits_page(client)
    assert credits.balance("alice") == 2000
    assert [n for n, _, _ in received].count("credits_payment_failed") == 1
    portal(client, credits, "renew")  # the retried invoice is paid
    assert credits.subscription("alice").status == "active"
    assert credits.balance("alice") == 4000
    assert [t for t, _ in events(credits)].count("invoice.payment_failed") == 1


def test_switching_plan_upgrades_at_once_and_downgrades_at_renewal(client, login, credits, received):
    login("alice")
    subscribe(client, "starter")
    assert credits.balance("alice") == 500
    portal(client, credits, "change_plan", plan="pro")
    assert credits.subscription("alice").plan == "pro"
    assert credits.balance("alice") == 2000  # the difference, for the rest of the period
    portal(client, credits, "change_plan", plan="starter")
    assert credits.subscription("alice").plan == "starter"
    assert credits.balance("alice") == 2000  # a downgrade grants nothing now
    portal(client, credits, "renew")
    assert credits.balance("alice") == 2500  # the renewal grants the new plan's allowance
    assert [n for n, _, _ in received].count("plan_changed") == 2


def test_an_abandoned_checkout_does_not_stop_the_next_subscribe(client, login, credits):
    login("alice")
    first = start(client)
    cancelled = client.post(first, data={"action": "cancel"}, headers=HTML)
    assert cancelled.status_code == 303
    assert cancelled.headers["Location"].endswith("/credits/")
    second = start(client, "starter")  # the first session is expired at the simulated Stripe
    assert second != first
    assert ("checkout.session.expired", "processed") in events(credits)
    assert "This checkout expired." in client.get(first, headers=HTML).get_data(as_text=True)
    assert client.post(first, data={"action": "pay"}, headers=HTML).status_code == 400
    assert client.post(second, data={"action": "pay"}, headers=HTML).status_code == 303
    assert credits.subscription("alice").plan == "starter"
    assert credits.balance("alice") == 500
    # Left open without pressing Cancel is the same.
    portal(client, credits, "cancel_now")
    start(client)
    subscribe(client, "starter")
    assert credits.balance("alice") == 1000


def test_a_live_plan_sends_subscribe_to_the_portal(client, login, credits):
    login("alice")
    subscribe(client)
    response = client.post("/credits/subscribe", data={"plan": "starter"}, headers=HTML)
    assert response.status_code == 307
    assert response.headers["Location"].endswith("/credits/portal")
    shown = client.get("/credits/simulated-portal", headers=HTML).get_data(as_text=True)
    assert 'data-testid="subscription-status">active<' in shown
    assert "Switch to Starter (500 credits)" in shown


def test_no_one_acts_on_another_users_plan_or_checkout(client, login, credits):
    login("alice")
    page = start(client)
    login("bob")
    assert client.get(page, headers=HTML).status_code == 404
    assert client.post(page, data={"action": "pay"}, headers=HTML).status_code == 404
    login("alice")
    client.post(page, data={"action": "pay"}, headers=HTML)
    stripe_id = credits.subscription("alice").stripe_subscription_id
    login("bob")
    start(client, "starter")  # bob has a customer, so a portal page
    answer = client.post(
        "/credits/simulated-portal", data={"action": "cancel_now", "subscription": stripe_id}, headers=HTML
    )
    assert answer.status_code == 404
    assert credits.subscription("alice").status == "active"


@pytest.fixture
def example(empty_database):
    from example_app.models import db

    app = build_example_app(empty_database, WTF_CSRF_ENABLED=True)
    with app.app_context():
        db.create_all()
    yield app
    with app.app_context():
        db.engine.dispose()


def token_of(html):
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def test_the_example_apps_plans_subscribe_pay_and_renew_offline(example):
    client = example.test_client()
    signed_up(client, "ada")
    shown = credits_page(client)
    assert "Starter" in shown
    assert "Pro" in shown
    answer = client.post("/credits/subscribe", data={"plan": "starter", "csrf_token": token_of(shown)})
    assert answer.status_code == 303
    checkout = "/" + answer.headers["Location"].split("://", 1)[-1].split("/", 1)[-1]
    form = client.get(checkout).get_data(as_text=True)
    assert client.post(checkout, data={"action": "pay"}).status_code == 400  # no CSRF token
    assert client.post(checkout, data={"action": "pay", "csrf_token": token_of(form)}).status_code == 303

    def balance():
        return client.get("/credits/balance", headers={"Accept": "application/json"}).json["balance"]

    assert balance() == 500
    portal_page = client.get("/credits/simulated-portal").get_data(as_text=True)
    stripe_id = re.search(r'name="subscription" value="([^"]+)"', portal_page).group(1)
    renew = {"action": "renew", "subscription": stripe_id, "csrf_token": token_of(portal_page)}
    assert client.post("/credits/simulated-portal", data=renew).status_code == 303
    assert balance() == 1000
