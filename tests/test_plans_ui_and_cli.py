"""Plans on the credits page (the wallet's plan, or a Subscribe form per plan; "Manage billing") and
``flask credits plans`` / ``flask credits subscription``; subscriptions made through the webhooks."""

from __future__ import annotations

import re
from datetime import datetime, timezone

import pytest
import responses
from helpers import build_example_app, csrf_token, new_key, signed_up
from test_plan_webhooks import PLANS, Plan, subscription_row

from flask_credits import testing

HTML = {"Accept": "text/html"}


@pytest.fixture
def credits_config():
    return {
        "STRIPE_SECRET_KEY": "sk_test_plans_ui",
        "STRIPE_WEBHOOK_SECRET": "whsec_test_plans_ui",
        "CREDITS_STRIPE_MAX_RETRIES": 0,
        "CREDITS_PLANS": PLANS,
    }


@pytest.fixture
def subscribed(client, login, stripe, credits, clock):
    """Alice's subscription to Pro, started through the endpoint and made live by its webhooks; returns
    its :class:`Plan` (to deliver further events)."""
    testing.mock_create_session(stripe)
    login("alice")
    response = client.post("/credits/subscribe", json={"plan": "pro"})
    assert response.status_code == 200, response.json
    row = subscription_row(credits, checkout_session_id=response.json["id"])
    plan = Plan(client, clock, row.attempt_key, response.json["id"], "pro", "alice")
    assert plan.deliver("checkout.session.completed", plan.session()) == "subscribed"
    assert plan.deliver("invoice.paid", plan.invoice(0)) == "fulfilled"
    return plan


@pytest.fixture
def cli(app):
    runner = app.test_cli_runner()

    def invoke(*args):
        return runner.invoke(args=["credits", *args])

    return invoke


def page(client):
    response = client.get("/credits/", headers=HTML)
    assert response.status_code == 200
    return response.get_data(as_text=True)


def forms(html, action):
    """The bodies of the forms posting to ``action``."""
    return re.findall(rf'<form method="post" action="{re.escape(action)}"[^>]*>(.*?)</form>', html, re.S)


def hidden(form, name):
    found = re.search(rf'<input type="hidden" name="{name}" value="([^"]*)">', form)
    return None if found is None else found.group(1)


def day(timestamp):
    return datetime.fromtimestamp(timestamp, timezone.utc).date().isoformat()


# -- the credits page ----------------------------------------------------------------------------------


@pytest.mark.config(CREDITS_PLANS=None)
def test_without_plans_the_page_has_no_plans_section(client, login):
    login("alice")
    html = page(client)
    assert "Plans</h2>" not in html
    assert forms(html, "/credits/subscribe") == []
    assert "Buy credits" in html


def test_without_a_subscription_each_plan_has_a_subscribe_form(client, login):
    login("alice")
    html = page(client)
    assert "Plans</h2>" in html
    subscribe = forms(html, "/credits/subscribe")
    assert [hidden(f, "plan") for f in subscribe] == ["pro", "max", "forever"]
    assert {hidden(f, "key_id") for f in subscribe} == {""}
    assert "Subscribe to Pro" in subscribe[0]
    assert "2000 credits each billing period" in subscribe[0]
    assert "carry over" in subscribe[2]
    assert "carry over" not in subscribe[0]
    # No customer yet: nothing to manage.
    assert forms(html, "/credits/portal") == []


def test_the_subscribe_form_as_posted_starts_the_plans_checkout(client, login, stripe, credits):
    testing.mock_create_session(stripe, "cs_test_from_the_form")
    login("alice")
    form = forms(page(client), "/credits/subscribe")[1]
    data = {"plan": hidden(form, "plan"), "key_id": hidden(form, "key_id")}
    response = client.post("/credits/subscribe", data=data, headers=HTML)
    assert response.status_code == 303
    assert "cs_test_from_the_form" in response.headers["Location"]
    assert subscription_row(credits, checkout_session_id="cs_test_from_the_form").plan == "max"


def test_a_checkout_not_completed_yet_still_offers_the_plans(client, login, stripe):
    testing.mock_create_session(stripe)
    login("alice")
    assert client.post("/credits/subscribe", json={"plan": "pro"}).status_code == 200
    html = page(client)
    assert len(forms(html, "/credits/subscribe")) == 3
    assert 'data-testid="plan"' not in html


def test_a_live_subscription_shows_plan_status_renewal_and_allowance(client, subscribed):
    html = page(client)
    assert forms(html, "/credits/subscribe") == []
    assert re.search(r'data-testid="plan-name">Pro<', html)
    assert re.search(r'data-testid="plan-status">active<', html)
    assert re.search(r'data-testid="plan-allowance">2000<', html)
    assert f"Renews on <time>{day(subscribed.period(0)[1])}</time>" in html
    assert "plan-payment-failed" not in html
    # One "Manage billing", beside the plan.
    assert len(forms(html, "/credits/portal")) == 1
    assert "Manage billing" in forms(html, "/credits/portal")[0]


def test_a_subscription_awaiting_its_first_payment_shows_its_status_and_no_date(
    client, login, stripe, credits, clock
):
    testing.mock_create_session(stripe)
    login("alice")
    session_id = client.post("/credits/subscribe", json={"plan": "max"}).json["id"]
    row = subscription_row(credits, checkout_session_id=session_id)
    plan = Plan(client, clock, row.attempt_key, session_id, "max", "alice")
    plan.deliver("checkout.session.completed", plan.session(payment_status="unpaid"))
    html = page(client)
    assert re.search(r'data-testid="plan-name">Max<', html)
    assert re.search(r'data-testid="plan-status">incomplete<', html)
    assert 'data-testid="plan-renewal"' not in html
    assert forms(html, "/credits/subscribe") == []


def test_a_past_due_subscription_says_to_update_the_card(client, subscribed):
    failed = subscribed.invoice(1, status="open", payment_intent=None)
    assert subscribed.deliver("invoice.payment_failed", failed) == "past_due"
    html = page(client)
    assert re.search(r'data-testid="plan-status">past due<', html)
    warning = re.search(r'data-testid="plan-payment-failed">(.*?)</p>', html, re.S)
    assert warning is not None
    assert "Update your card" in warning.group(1)
    # The period paid for is over: no renewal date in the past.
    assert 'data-testid="plan-renewal"' not in html
    assert len(forms(html, "/credits/portal")) == 1


def test_a_subscription_cancelled_at_period_end_shows_when_it_ends(client, subscribed):
    update = subscribed.subscription(1, cancel_at_period_end=True)
    subscribed.deliver("customer.subscription.updated", update)
    html = page(client)
    assert f"ends on <time>{day(subscribed.period(1)[1])}</time>" in html
    assert "Renews on" not in html
    assert forms(html, "/credits/subscribe") == []


def test_a_cancelled_subscription_offers_the_plans_again(client, subscribed):
    deleted = subscribed.subscription(0, status="canceled")
    assert subscribed.deliver("customer.subscription.deleted", deleted) == "cancelled"
    html = page(client)
    assert 'data-testid="plan"' not in html
    assert len(forms(html, "/credits/subscribe")) == 3
    # The customer stays: its receipts are still in the portal.
    assert len(forms(html, "/credits/portal")) == 1


# -- CSRF, in the example app (which checks it) --------------------------------------------------------


@pytest.fixture
def example(empty_database):
    from example_app.models import db

    app = build_example_app(empty_database, WTF_CSRF_ENABLED=True, CREDITS_PLANS=PLANS)
    with app.app_context():
        db.create_all()
    yield app
    with app.app_context():
        db.engine.dispose()


def test_the_subscribe_forms_carry_the_csrf_token_and_need_it(example):
    with responses.RequestsMock():  # simulated mode: any request to Stripe would fail the test
        client = example.test_client()
        signed_up(client, "ada")
        subscribe = forms(page(client), "/credits/subscribe")
        assert len(subscribe) == 3
        tokens = {re.search(r'name="csrf_token" value="([^"]+)"', f).group(1) for f in subscribe}
        assert len(tokens) == 1
        assert "" not in tokens
        assert client.post("/credits/subscribe", data={"plan": "pro"}).status_code == 400
        forged = {"plan": "pro", "csrf_token": "forged"}
        assert client.post("/credits/subscribe", data=forged).status_code == 400


def test_an_api_keys_page_subscribes_that_keys_wallet(example):
    with responses.RequestsMock():
        client = example.test_client()
        signed_up(client, "ada")
        token = csrf_token(client, "/keys/")
        key_id, secret = new_key(client.post("/keys/", data={"name": "ci", "csrf_token": token}))
        html = client.get("/credits/", headers={"X-API-Key": secret, **HTML}).get_data(as_text=True)
        assert {hidden(f, "key_id") for f in forms(html, "/credits/subscribe")} == {key_id}
        # The account's page subscribes the account or, chosen in "For", one of its keys.
        own = forms(page(client), "/credits/subscribe")
        assert own
        assert [re.findall(r'<option value="([^"]*)"', f) for f in own] == [["", key_id]] * len(own)
        plan = hidden(own[0], "plan")
        token = csrf_token(client, "/keys/")
        started = client.post(
            "/credits/subscribe", data={"plan": plan, "key_id": key_id, "csrf_token": token}, headers=HTML
        )
        assert started.status_code == 303, started.get_data(as_text=True)
        checkout = "/" + started.headers["Location"].split("://", 1)[-1].split("/", 1)[-1]
        paid = client.post(checkout, data={"action": "pay", "csrf_token": token}, headers=HTML)
        assert paid.status_code == 303
        # The key's plan shows on the account's page, and only the account may subscribe now.
        html = page(client)
        assert re.search(rf'data-testid="key-plan-{key_id}">API key ci: <strong>', html)
        after = forms(html, "/credits/subscribe")
        assert {hidden(f, "key_id") for f in after} == {""}


# -- the CLI -------------------------------------------------------------------------------------------


def test_cli_plans_lists_the_configured_plans(cli):
    result = cli("plans")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "pro\tPro\t2000 credits per period\tprice_pro\texpire at period end",
        "max\tMax\t5000 credits per period\tprice_max\texpire at period end",
        "forever\tforever\t1000 credits per period\tprice_forever\trollover",
    ]


@pytest.mark.config(CREDITS_PLANS=None)
def test_cli_plans_says_when_none_are_configured(cli):
    result = cli("plans")
    assert (result.exit_code, result.output.strip()) == (0, "no plans configured (CREDITS_PLANS)")


def test_cli_subscription_shows_the_live_plan(cli, subscribed):
    result = cli("subscription", "alice")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (
        f"Pro (pro)\tactive\trenews {day(subscribed.period(0)[1])}\t2000 credits per period"
    )


def test_cli_subscription_shows_when_a_cancelled_plan_ends(cli, subscribed):
    subscribed.deliver("customer.subscription.updated", subscribed.subscription(1, cancel_at_period_end=True))
    result = cli("subscription", "alice")
    assert f"\tends {day(subscribed.period(1)[1])}\t" in result.output


def test_cli_subscription_without_one(cli, credits):
    credits.grant("alice", 5, reason="x")
    result = cli("subscription", "alice")
    assert (result.exit_code, result.output.strip()) == (0, "no live subscription")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["subscription", "mallory"], "unknown user 'mallory'"),
        (["subscription", "x" * 300], "Error: unknown user 'xxx"),
        (["subscription", "alice", "--key", "k" * 300], "Error: key_id"),
        (["subscription"], "Missing argument 'USER'"),
    ],
)
def test_cli_subscription_refuses_bad_input_clearly(cli, credits, args, message):
    credits.grant("alice", 5, reason="x")
    result = cli(*args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an exception


def test_a_plan_removed_from_the_config_still_shows_by_id(build_app, subscribed):
    app, _, _ = build_app(CREDITS_PLANS={"max": PLANS["max"]})
    client = app.test_client()
    assert client.post("/_login/alice").status_code == 200
    html = page(client)
    assert re.search(r'data-testid="plan-name">pro<', html)
    assert 'data-testid="plan-allowance"' not in html
    with app.app_context():  # the command runs in the current app context, the fixture app's otherwise
        result = app.test_cli_runner().invoke(args=["credits", "subscription", "alice"])
    assert result.output.strip() == f"pro\tactive\trenews {day(subscribed.period(0)[1])}"
