"""Auto top-up on the credits page and in the simulated Stripe: saving a card through the simulated
setup-mode Checkout (the real webhook code), the settings form, the state and failure shown per
wallet, and the switches that make the next automatic payment fail."""

from __future__ import annotations

import re

import pytest
import responses
import sqlalchemy as sa
from helpers import PACKS, build_example_app, signed_up

from flask_credits.services import auto_top_up

HTML = {"Accept": "text/html"}
KEYS = {"alice": [("key-1", "laptop")], "bob": []}


@pytest.fixture
def credits_config():
    return {
        "CREDITS_STRIPE_MODE": "simulated",
        "STRIPE_WEBHOOK_SECRET": None,
        "STRIPE_SECRET_KEY": None,
        "CREDITS_PACKS": PACKS,
    }


@pytest.fixture(autouse=True)
def no_network():
    # Any HTTP call would fail the test: the simulated mode must not reach Stripe.
    with responses.RequestsMock() as rsps:
        yield rsps


@pytest.fixture
def client(app, credits):
    """A client of the app, whose user alice has one API key."""
    credits.keys_loader(lambda user_id: KEYS.get(user_id, []))
    return app.test_client()


def page(client) -> str:
    response = client.get("/credits/", headers=HTML)
    assert response.status_code == 200
    return response.get_data(as_text=True)


def section(html: str, wallet: str = "account") -> str:
    """The auto top-up section of one wallet (``account`` or a key id) on the credits page."""
    match = re.search(rf'<section [^>]*data-testid="auto-top-up-{wallet}">(.*?)</section>', html, re.S)
    assert match, html
    return match.group(1)


def text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html))


def setup_page(client, key_id: str | None = None) -> str:
    """Start saving a card as the page's "Save a card" button does; the simulated page's path."""
    answer = client.post("/credits/auto-top-up/card", data={"key_id": key_id or ""}, headers=HTML)
    assert answer.status_code == 303
    path = "/" + answer.headers["Location"].split("://", 1)[-1].split("/", 1)[-1]
    expected = "/credits/simulated-setup" + (f"?key_id={key_id}" if key_id else "")
    assert path == expected
    return path


def save_card(client, card: str = "pm_sim_visa", key_id: str | None = None):
    return client.post(setup_page(client, key_id), data={"action": card}, headers=HTML)


def turn_on(client, key_id: str = "", **changes: str):
    form = {
        "key_id": key_id,
        "enabled": "on",
        "threshold": "100",
        "pack": "starter",
        "quantity": "",
        "monthly_cap_amount": "50.00",
        **changes,
    }
    return client.post("/credits/auto-top-up", data=form, headers=HTML)


def events(credits):
    t = credits.tables.stripe_events
    with credits.db.engine.connect() as conn:
        return conn.execute(sa.select(t.c.type, t.c.outcome).order_by(t.c.received_at)).all()


# -- the page ------------------------------------------------------------------------------------------


def test_the_page_offers_auto_top_up_for_the_account_and_each_key(client, login):
    login("alice")
    html = page(client)
    assert '<h2 id="credits-auto-top-up-title">Auto top-up</h2>' in html
    for wallet, key_id in (("account", ""), ("key-1", "key-1")):
        own = section(html, wallet)
        assert "Off." in text(own)
        assert "No card saved yet" in text(own)
        assert f'<input type="hidden" name="key_id" value="{key_id}">' in own
        assert 'action="/credits/auto-top-up"' in own
        assert 'action="/credits/auto-top-up/card"' in own
        assert ">Save a card</button>" in own
        # Every field has a label; packs are offered with their price, and units.
        for field in ("threshold", "pack", "quantity", "cap"):
            ids = re.findall(rf'id="(credits-atu-{field}-\d+)"', own)
            assert len(ids) == 1, field
            assert f'<label for="{ids[0]}">' in own
        assert "500 credits: 500 credits for 4.00 USD" in own
        assert "units of 100 credits at 1.00 USD each" in own
        assert "Next payment is declined" not in own  # no card: no switches
    assert "API key laptop" in text(section(html, "key-1"))


def test_a_page_seen_with_an_api_key_shows_that_keys_auto_top_up_only(client, credits):
    @credits.wallet_loader
    def with_a_key():
        return ("alice", "key-1")

    # No key_id sent: the current wallet, the key's, which the setup page's URL names.
    assert save_card(client, key_id="key-1").status_code == 303
    unnamed = client.post("/credits/auto-top-up/card", headers=HTML)
    assert unnamed.headers["Location"].endswith("/credits/simulated-setup?key_id=key-1")
    assert credits.auto_top_up("alice") is None
    html = page(client)
    assert re.findall(r'<section [^>]*data-testid="auto-top-up-([^"]+)"', html) == ["key-1"]
    own = section(html, "key-1")
    assert re.search(r"<h3 [^>]*>API key laptop</h3>", own)
    assert "Card: Visa ending 4242." in text(own)


@pytest.mark.config(CREDITS_AUTO_TOP_UP=False)
def test_no_auto_top_up_section_while_the_kill_switch_is_off(client, login):
    login("alice")
    assert "auto-top-up" not in page(client).replace('action="/credits/auto-top-up', "")


# -- the simulated setup page --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("card", "last4"),
    [("pm_sim_visa", "4242"), ("pm_sim_declined", "0002"), ("pm_sim_authentication", "3184")],
)
def test_each_simulated_card_is_saved_through_the_webhook(client, login, credits, card, last4):
    login("alice")
    shown = client.get(setup_page(client), headers=HTML).get_data(as_text=True)
    assert "Save a card for the auto top-up of your account." in text(shown)
    for value in ("pm_sim_visa", "pm_sim_declined", "pm_sim_authentication", "cancel"):
        assert f'name="action" value="{value}"' in shown

    done = client.post(setup_page(client), data={"action": card}, headers=HTML)
    assert done.status_code == 303
    assert done.headers["Location"].endswith("/credits/")
    assert events(credits) == [("checkout.session.completed", "card_saved")]
    found = credits.auto_top_up("alice")
    assert (found.has_card, found.card_brand, found.card_last4, found.enabled) == (True, "visa", last4, False)
    t = credits.tables.auto_top_ups
    with credits.db.engine.connect() as conn:
        assert conn.execute(sa.select(t.c.payment_method)).scalars().all() == [card]
    own = text(section(page(client)))
    assert f"Card: Visa ending {last4}." in own
    assert "Save another card" in own
    assert credits.auto_top_up("alice", "key-1") is None


def test_a_card_saved_for_a_key_is_that_keys_only(client, login, credits):
    login("alice")
    assert save_card(client, key_id="key-1").status_code == 303
    assert credits.auto_top_up("alice") is None
    assert credits.auto_top_up("alice", "key-1").card_last4 == "4242"
    html = page(client)
    assert "Card: Visa ending 4242." in text(section(html, "key-1"))
    assert "No card saved yet" in text(section(html))


def test_cancel_saves_nothing(client, login, credits):
    login("alice")
    done = client.post(setup_page(client), data={"action": "cancel"}, headers=HTML)
    assert done.status_code == 303
    assert done.headers["Location"].endswith("/credits/")
    assert events(credits) == []
    assert credits.auto_top_up("alice") is None


def test_someone_elses_key_and_unknown_cards_are_refused(client, login, credits):
    login("bob")
    assert client.get("/credits/simulated-setup?key_id=key-1", headers=HTML).status_code == 404
    refused = client.post("/credits/simulated-setup?key_id=key-1", data={"action": "pm_sim_visa"})
    assert refused.status_code == 404
    assert client.post("/credits/auto-top-up/card", data={"key_id": "key-1"}, headers=HTML).status_code == 400
    assert client.post("/credits/simulated-setup", data={"action": "pm_card_visa"}).status_code == 400
    assert client.post("/credits/simulated-setup", data={}).status_code == 400
    assert events(credits) == []
    assert credits.auto_top_up("alice", "key-1") is None
    assert credits.auto_top_up("bob") is None


def test_the_setup_page_needs_a_login(client):
    assert client.get("/credits/simulated-setup", headers=HTML).status_code == 401
    assert client.post("/credits/simulated-setup", data={"action": "pm_sim_visa"}).status_code == 401


def test_the_setup_page_does_not_exist_in_live_mode(build_app):
    app, _, _ = build_app(
        CREDITS_STRIPE_MODE="live", STRIPE_SECRET_KEY="sk_test_x", STRIPE_WEBHOOK_SECRET="whsec_x"
    )
    client = app.test_client()
    assert client.post("/_login/alice").status_code == 200
    assert client.get("/credits/simulated-setup", headers=HTML).status_code == 404
    assert "Next payment is declined" not in client.get("/credits/", headers=HTML).get_data(as_text=True)


# -- the settings form ---------------------------------------------------------------------------------


def test_turning_it_on_without_a_card_says_to_save_one(client, login, credits):
    login("alice")
    answer = turn_on(client)
    assert answer.status_code == 409
    html = answer.get_data(as_text=True)
    assert "Save a card first: auto top-up buys with a saved card." in html
    assert 'value="100"' in section(html)  # what was sent stays in the form
    assert credits.auto_top_up("alice") is None


def test_settings_that_cannot_work_are_refused_and_kept_in_the_form(client, login, credits):
    login("alice")
    save_card(client)
    answer = turn_on(client, threshold="75", monthly_cap_amount="1.00")  # below one starter pack
    assert answer.status_code == 400
    html = answer.get_data(as_text=True)
    assert "monthly_cap must cover at least one top-up" in html
    own = section(html)
    assert 'value="75"' in own
    assert 'value="1.00"' in own
    assert 'value="75"' not in section(html, "key-1")
    assert credits.auto_top_up("alice").enabled is False


def test_auto_top_up_on_refills_the_wallet_and_the_page_shows_it(client, login, credits, received):
    login("alice")
    save_card(client)
    assert turn_on(client).status_code == 303
    own = text(section(page(client)))
    assert "On: when the balance falls below 100 credits, buy 500 credits for 4.00 USD." in own
    assert "Monthly cap: 50.00 USD; 0.00 USD spent on automatic purchases this month." in own
    html = section(page(client))
    assert re.search(r'name="enabled" value="on" checked', html)
    assert re.search(r'<option value="starter" selected>', html)
    assert 'value="50.00"' in html

    credits.grant("alice", 150, reason="test")
    credits.spend("alice", 60, reason="test")  # 150 -> 90: below 100
    assert auto_top_up.wait()
    assert credits.balance("alice") == 590
    own = text(section(page(client)))
    assert "4.00 USD spent on automatic purchases this month" in own
    assert "under way" not in own
    names = [name for name, _, _ in received]
    assert names.count("auto_top_up_started") == 1
    assert names.count("credits_purchased") == 1


def test_a_purchase_in_flight_is_shown(client, login, credits, monkeypatch):
    login("alice")
    save_card(client)
    turn_on(client)
    started = []
    monkeypatch.setattr(auto_top_up, "schedule", lambda ext, purchase_id: started.append(purchase_id))
    credits.grant("alice", 150, reason="test")
    credits.spend("alice", 60, reason="test")
    assert len(started) == 1
    assert "An automatic purchase is under way" in text(section(page(client)))
    # The simulated Stripe delivers payment_intent.succeeded (which credits it) before it answers.
    assert auto_top_up.charge(credits, started[0]) == "already_fulfilled"
    assert "under way" not in text(section(page(client)))
    assert credits.balance("alice") == 590


def test_turning_it_off_keeps_the_card(client, login, credits):
    login("alice")
    save_card(client)
    turn_on(client)
    form = {"key_id": "", "threshold": "100", "pack": "starter", "monthly_cap_amount": "50"}
    assert client.post("/credits/auto-top-up", data=form, headers=HTML).status_code == 303
    found = credits.auto_top_up("alice")
    assert (found.enabled, found.has_card, found.monthly_cap) == (False, True, 5000)
    assert "Off." in text(section(page(client)))


def test_a_quantity_instead_of_a_pack(client, login, credits):
    login(
        "alice",
    )
    save_card(client, key_id="key-1")
    assert turn_on(client, key_id="key-1", pack="", quantity="3").status_code == 303
    own = text(section(page(client), "key-1"))
    assert "On: when the balance falls below 100 credits, buy 300 credits for 3.00 USD." in own
    both = turn_on(client, key_id="key-1", pack="starter", quantity="3")
    assert both.status_code == 400
    assert "choose a pack or a quantity, not both" in both.get_data(as_text=True)


# -- the switches --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("switch", "reason"),
    [
        ("pm_sim_declined", "Your card was declined."),
        ("pm_sim_authentication", "Your bank asked to confirm the payment (3-D Secure)"),
    ],
)
def test_a_switch_makes_the_next_automatic_payment_fail_and_the_page_says_what_to_do(
    client, login, credits, received, switch, reason
):
    login("alice")
    save_card(client)
    turn_on(client)
    html = section(page(client))
    assert 'action="/credits/simulated-setup"' in html
    flipped = client.post("/credits/simulated-setup", data={"action": switch}, headers=HTML)
    assert flipped.status_code == 303
    assert events(credits)[-1] == ("checkout.session.completed", "card_saved")
    assert credits.auto_top_up("alice").enabled is True  # a new card does not turn it off

    credits.grant("alice", 150, reason="test")
    credits.spend("alice", 60, reason="test")
    assert auto_top_up.wait()
    assert credits.balance("alice") == 90
    found = credits.auto_top_up("alice")
    assert (found.enabled, found.spent_this_month, found.in_flight) == (False, 0, False)
    assert reason in found.failure
    html = section(page(client))
    own = text(html)
    assert "Off." in own
    failure = re.search(
        r'<p class="credits-error" role="alert" data-testid="auto-top-up-failure">(.*?)</p>', html, re.S
    )
    assert failure
    assert reason in text(failure.group(1))
    assert "Save a card again below" in text(failure.group(1))
    assert "buy credits by hand" in text(failure.group(1))
    assert [name for name, _, _ in received].count("auto_top_up_failed") == 1
    assert (
        "payment_intent.payment_failed" if switch == "pm_sim_declined" else "payment_intent.requires_action"
    ) in [t for t, _ in events(credits)]

    # The way back: the paying card again, on again, and the next fall is topped up.
    client.post("/credits/simulated-setup", data={"action": "pm_sim_visa"}, headers=HTML)
    assert turn_on(client).status_code == 303
    assert credits.auto_top_up("alice").failure is None
    credits.grant("alice", 100, reason="test")  # 190
    credits.spend("alice", 100, reason="test")  # 90: below 100 again
    assert auto_top_up.wait()
    assert credits.balance("alice") == 590


# -- CSRF, in the example app --------------------------------------------------------------------------


@pytest.fixture
def example(empty_database):
    from example_app.models import db

    app = build_example_app(empty_database, WTF_CSRF_ENABLED=True)
    with app.app_context():
        db.create_all()
    yield app
    with app.app_context():
        db.engine.dispose()


def token_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found
    return found.group(1)


def test_the_setup_page_and_the_settings_form_need_the_csrf_token(example):
    client = example.test_client()
    signed_up(client, "ada")
    html = client.get("/credits/").get_data(as_text=True)
    token = token_of(html)
    assert client.post("/credits/auto-top-up/card", data={"key_id": ""}).status_code == 400
    answer = client.post("/credits/auto-top-up/card", data={"key_id": "", "csrf_token": token})
    assert answer.status_code == 303
    setup = "/" + answer.headers["Location"].split("://", 1)[-1].split("/", 1)[-1]
    form = client.get(setup).get_data(as_text=True)
    assert client.post(setup, data={"action": "pm_sim_visa"}).status_code == 400
    assert client.post(setup, data={"action": "pm_sim_visa", "csrf_token": token_of(form)}).status_code == 303
    settings = {"enabled": "on", "threshold": "10", "pack": "small", "monthly_cap_amount": "20"}
    assert client.post("/credits/auto-top-up", data=settings).status_code == 400
    assert client.post("/credits/auto-top-up", data={**settings, "csrf_token": token}).status_code == 303
    assert "Card: Visa ending 4242." in text(client.get("/credits/").get_data(as_text=True))
