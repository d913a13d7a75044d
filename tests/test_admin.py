"""The admin console (CREDITS_ADMIN): only for admin_checker's admins, every change through the ledger
with the admin recorded as its actor, a double submit changing the wallet once, CSRF on every form;
the wallet's usage chart; credit codes made, listed and disabled."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import flask_migrate
import pytest
import sqlalchemy as sa
from flask_login import current_user
from helpers import build_example_app, sign_up, signed_up
from markupsafe import escape

from example_app.extensions import credits as example_credits
from example_app.models import db as example_db
from flask_credits import CodeDisabled

ADMIN = "/credits/admin"


@pytest.fixture
def credits_config():
    return {"CREDITS_ADMIN": True, "STRIPE_SECRET_KEY": "sk_test_admin", "CREDITS_HISTORY_PAGE_SIZE": 3}


@pytest.fixture
def checker(credits):
    """alice is the admin (identity: her email); bob and 42 are not."""

    @credits.admin_checker
    def is_admin() -> str | None:
        return "alice@example.com" if current_user.get_id() == "alice" else None

    return is_admin


def logged_in_as(app, user):
    client = app.test_client()
    assert client.post(f"/_login/{user}").status_code == 200
    return client


@pytest.fixture
def admin(app, checker):
    return logged_in_as(app, "alice")


def nonce(page: str, form: str = "grant") -> str:
    found = re.search(rf'action="{ADMIN}/wallet/{form}".*?name="nonce" value="([^"]+)"', page, re.DOTALL)
    assert found is not None
    return found.group(1)


def wallet_page(client, user="bob", **args):
    response = client.get(f"{ADMIN}/wallet", query_string={"user_id": user, **args})
    assert response.status_code == 200
    return response.get_data(as_text=True)


def change(client, form, amount, reason="support ticket 7", user="bob", token=None):
    token = token or nonce(wallet_page(client, user), form)
    return client.post(
        f"{ADMIN}/wallet/{form}",
        data={"user_id": user, "amount": amount, "reason": reason, "nonce": token},
    )


# -- who may use it ----------------------------------------------------------------------------------


def test_admin_without_a_checker_refuses_to_serve(build_app):
    app, _, _ = build_app(CREDITS_ADMIN=True)
    with pytest.raises(RuntimeError, match=r"CREDITS_ADMIN.*admin_checker"):
        app.test_client().get("/credits/balance")


def test_without_credits_admin_there_are_no_admin_pages(build_app):
    app, _, credits = build_app(CREDITS_ADMIN=False)
    credits.admin_checker(lambda: "anyone")
    assert logged_in_as(app, "alice").get(f"{ADMIN}/").status_code == 404


def test_logged_out_gets_401_and_a_non_admin_403(app, checker):
    assert app.test_client().get(f"{ADMIN}/").status_code == 401
    assert app.test_client().post(f"{ADMIN}/wallet/grant", data={"user_id": "bob"}).status_code == 401
    bob = logged_in_as(app, "bob")
    for path in ("/", "/wallet?user_id=bob", "/events", "/audit"):
        assert bob.get(ADMIN + path).status_code == 403, path
    response = bob.post(
        f"{ADMIN}/wallet/grant", data={"user_id": "bob", "amount": "5", "reason": "me", "nonce": "abc"}
    )
    assert response.status_code == 403


def test_a_non_admin_grants_nothing(app, credits, checker):
    bob = logged_in_as(app, "bob")
    bob.post(f"{ADMIN}/wallet/grant", data={"user_id": "bob", "amount": "5", "reason": "me", "nonce": "n1"})
    assert credits.balance("bob") == 0
    assert credits.history("bob") == []


# -- finding wallets ---------------------------------------------------------------------------------


def test_find_a_wallet_by_user_id_or_key_id(admin, credits):
    credits.grant("bob", 10, reason="seed")
    credits.grant("bob", 20, key_id="key_9", reason="seed")
    page = admin.get(f"{ADMIN}/", query_string={"q": "bob"}).get_data(as_text=True)
    assert page.count(f"{ADMIN}/wallet?user_id=bob") == 2
    page = admin.get(f"{ADMIN}/", query_string={"q": "key_9"}).get_data(as_text=True)
    assert f"{ADMIN}/wallet?user_id=bob&amp;key_id=key_9" in page
    assert f'{ADMIN}/wallet?user_id=bob"' not in page
    page = admin.get(f"{ADMIN}/", query_string={"q": "nobody"}).get_data(as_text=True)
    assert 'data-testid="no-wallet"' in page


def test_the_wallet_page_shows_balance_held_debt_and_lots_with_expiry(admin, credits):
    soon = datetime.now(timezone.utc) + timedelta(days=3)
    credits.grant("bob", 30, reason="promo", expires_at=soon)
    credits.grant("bob", 12, reason="gift")
    credits.hold("bob", 5, reason="job")
    page = wallet_page(admin)
    assert re.search(r'data-testid="balance">37<', page)
    assert re.search(r'data-testid="held">5<', page)
    assert re.search(r'data-testid="debt">0<', page)
    assert soon.strftime("%Y-%m-%d %H:%M") in page
    assert "never" in page


def usage_section(page: str) -> str:
    found = re.search(r'<section class="credits-usage".*?</section>', page, re.S)
    assert found, "no usage section"
    return found.group(0)


def test_the_wallet_page_shows_the_usage_chart_and_endpoints_of_the_credits_page(app, admin, credits, clock):
    credits.grant("bob", 100, reason="start")
    credits.grant("alice", 100, reason="start")
    credits.spend("bob", 5, reason="search", metadata={"endpoint": "search"})
    credits.spend("bob", 7, reason="export")
    credits.spend("alice", 50, reason="not bob's")
    clock.advance(days=1)
    credits.spend("bob", 4, reason="export")
    section = usage_section(wallet_page(admin))
    bars = re.findall(r'data-day="([\d-]+)" data-credits="(\d+)"', section)
    assert len(bars) == 30
    assert bars[-2:] == [("2030-01-01", "12"), ("2030-01-02", "4")]
    assert sum(int(n) for _, n in bars) == 16
    assert "16 credits spent from 2029-12-04 to 2030-01-02; the most, 12, on 2030-01-01." in section
    cells = re.findall(r'<tr><td>(.*?)</td><td class="credits-amount">(\d+)</td></tr>', section)
    assert cells == [("(direct)", "11"), ("<code>search</code>", "5")]
    # The same section, from the same macro and numbers, as on bob's own credits page.
    bob = logged_in_as(app, "bob")
    own = bob.get("/credits/", headers={"Accept": "text/html"}).get_data(as_text=True)
    assert usage_section(own) == section


def test_the_wallet_page_of_a_wallet_without_spends_charts_thirty_empty_days(admin, credits, clock):
    credits.grant("bob", 5, reason="start")
    section = usage_section(wallet_page(admin))
    assert re.findall(r'data-credits="(\d+)"', section) == ["0"] * 30
    assert "No credits spent in the last 30 days." in section


# -- changes through the ledger ----------------------------------------------------------------------


def test_grant_records_the_admin_and_the_history_shows_it(admin, credits):
    response = change(admin, "grant", "50")
    assert response.status_code == 303
    (entry,) = credits.history("bob")
    assert (entry.kind, entry.amount, entry.reason, entry.actor) == (
        "grant",
        50,
        "support ticket 7",
        "alice@example.com",
    )
    assert entry.idempotency_key is not None
    page = admin.get(response.headers["Location"]).get_data(as_text=True)
    assert 'data-testid="actor">alice@example.com<' in page
    assert f"entry {entry.id}" in page


def test_deduct_spends_through_the_ledger_with_the_actor(admin, credits):
    credits.grant("bob", 40, reason="seed")
    assert change(admin, "deduct", "15", reason="chargeback by hand").status_code == 303
    spend = credits.history("bob")[0]
    assert (spend.kind, spend.amount, spend.actor) == ("spend", -15, "alice@example.com")
    assert credits.balance("bob") == 25
    assert credits.audit() == []


def test_a_double_submit_changes_the_wallet_once(admin, credits):
    token = nonce(wallet_page(admin))
    assert change(admin, "grant", "50", token=token).status_code == 303
    assert change(admin, "grant", "50", token=token).status_code == 303
    assert credits.balance("bob") == 50
    credits.grant("bob", 10, reason="seed")
    token = nonce(wallet_page(admin), "deduct")
    for _ in range(2):
        assert change(admin, "deduct", "20", token=token).status_code == 303
    assert credits.balance("bob") == 40
    assert len(credits.history("bob")) == 3


def test_each_page_load_makes_a_new_nonce(admin):
    assert nonce(wallet_page(admin)) != nonce(wallet_page(admin))
    assert nonce(wallet_page(admin), "grant") != nonce(wallet_page(admin), "deduct")


@pytest.mark.parametrize(
    ("amount", "reason"),
    [
        ("0", "why"),
        ("-5", "why"),
        ("1.5", "why"),
        ("", "why"),
        ("abc", "why"),
        ("9" * 40, "why"),
        ("5", ""),
        ("5", "   "),
        ("5", "x" * 300),
    ],
)
def test_invalid_amounts_and_reasons_are_400_and_change_nothing(admin, credits, amount, reason):
    credits.grant("bob", 10, reason="seed")
    for form in ("grant", "deduct"):
        response = change(admin, form, amount, reason=reason)
        assert response.status_code == 400, (form, amount, reason)
        assert 'data-testid="error"' in response.get_data(as_text=True)
    assert credits.balance("bob") == 10
    assert len(credits.history("bob")) == 1


def test_a_missing_nonce_is_400(admin, credits):
    response = admin.post(f"{ADMIN}/wallet/grant", data={"user_id": "bob", "amount": "5", "reason": "r"})
    assert response.status_code == 400
    assert credits.balance("bob") == 0


def test_deducting_more_than_the_balance_is_400_and_changes_nothing(admin, credits):
    credits.grant("bob", 10, reason="seed")
    response = change(admin, "deduct", "11")
    assert response.status_code == 400
    assert credits.balance("bob") == 10


def test_the_same_nonce_for_another_amount_changes_nothing(admin, credits):
    token = nonce(wallet_page(admin))
    change(admin, "grant", "50", token=token)
    assert change(admin, "grant", "60", token=token).status_code == 400
    assert credits.balance("bob") == 50


def test_an_unknown_user_gets_nothing(admin, credits):
    assert change(admin, "grant", "5", user="mallory").status_code == 404
    assert credits.history("mallory") == []


def test_refund_a_spend_once_with_the_actor(admin, credits):
    credits.grant("bob", 40, reason="seed")
    spend = credits.spend("bob", 15, reason="api call")
    page = wallet_page(admin)
    assert f'name="entry_id" value="{spend.id}"' in page
    form = {"user_id": "bob", "entry_id": str(spend.id), "reason": "bug on our side"}
    assert admin.post(f"{ADMIN}/wallet/refund", data=form).status_code == 303
    assert admin.post(f"{ADMIN}/wallet/refund", data=form).status_code == 303
    assert credits.balance("bob") == 40
    refund = credits.history("bob")[0]
    assert (refund.kind, refund.reverses_id, refund.actor) == ("refund", spend.id, "alice@example.com")
    assert len(credits.history("bob")) == 3
    assert f'name="entry_id" value="{spend.id}"' not in wallet_page(admin)


def test_refunds_of_what_is_no_spend_or_not_this_wallets_change_nothing(admin, credits):
    grant = credits.grant("bob", 40, reason="seed")
    credits.grant("alice", 1, reason="seed")
    other = credits.spend("alice", 1, reason="x")
    cases = [(grant.id, "r", 400), (other.id, "r", 404), ("x", "r", 400), (grant.id, "", 400)]
    for entry_id, reason, status in cases:
        form = {"user_id": "bob", "entry_id": str(entry_id), "reason": reason}
        assert admin.post(f"{ADMIN}/wallet/refund", data=form).status_code == status, entry_id
    assert credits.balance("bob") == 40
    assert credits.balance("alice") == 0


def test_history_pages_both_ways(admin, credits):
    entries = [credits.grant("bob", n, reason=f"g{n}") for n in range(1, 8)]  # page size 3
    # Reasons as the history shows them: a bare "g4" can turn up in the page's random form tokens.
    page = wallet_page(admin)
    assert "Grant: g7" in page
    assert "Grant: g5" in page
    assert "Grant: g4" not in page
    older = re.search(r'before=(\d+)">Older', page)
    assert older is not None
    assert int(older.group(1)) == entries[4].id
    page = wallet_page(admin, before=older.group(1))
    assert "Grant: g4" in page
    assert "Grant: g2" in page
    assert "Grant: g5" not in page
    newer = re.search(r'after=(\d+)">Newer', page)
    assert newer is not None
    page = wallet_page(admin, after=newer.group(1))
    assert "Grant: g7" in page
    assert "Grant: g5" in page
    assert "Grant: g4" not in page
    assert admin.get(f"{ADMIN}/wallet", query_string={"user_id": "bob", "before": "x"}).status_code == 400


# -- purchases, events, audit ------------------------------------------------------------------------


def add_purchase(credits, db, user="bob"):
    credits.grant(user, 1, reason="seed")
    t = credits.tables
    now = datetime.now(timezone.utc)
    with db.engine.begin() as conn:
        wallet_id = conn.execute(sa.select(t.wallets.c.id).where(t.wallets.c.user_id == user)).scalar_one()
        purchase_id = conn.execute(
            sa.insert(t.purchases).values(
                wallet_id=wallet_id,
                session_id="cs_test_abc",
                attempt_key="a" * 32,
                credits=500,
                amount=1250,
                currency="usd",
                status="fulfilled",
                payment_intent="pi_test_def",
                automatic=False,
                created_at=now,
                updated_at=now,
            )
        ).inserted_primary_key[0]
        conn.execute(
            sa.insert(t.stripe_events),
            [
                {
                    "id": "evt_test_1",
                    "type": "checkout.session.completed",
                    "outcome": "fulfilled",
                    "purchase_id": purchase_id,
                    "received_at": now,
                },
                {
                    "id": "evt_test_2",
                    "type": "checkout.session.completed",
                    "outcome": "duplicate",
                    "purchase_id": None,
                    "received_at": now - timedelta(minutes=1),
                },
            ],
        )


def test_purchases_and_their_events_are_listed_with_dashboard_links(admin, credits, db):
    add_purchase(credits, db)
    page = wallet_page(admin)
    assert "fulfilled" in page
    assert "12.50 USD" in page
    assert 'href="https://dashboard.stripe.com/test/checkout/sessions/cs_test_abc"' in page
    assert 'href="https://dashboard.stripe.com/test/payments/pi_test_def"' in page
    assert "evt_test_1" in page
    assert "evt_test_2" not in page
    events = admin.get(f"{ADMIN}/events").get_data(as_text=True)
    assert events.index("evt_test_1") < events.index("evt_test_2")
    assert "duplicate" in events
    assert 'href="https://dashboard.stripe.com/test/events/evt_test_1"' in events
    assert admin.get(f"{ADMIN}/events?page=2").status_code == 200
    assert admin.get(f"{ADMIN}/events?page=0").status_code == 400


@pytest.mark.config(STRIPE_SECRET_KEY="sk_live_admin")
def test_a_live_key_links_to_the_live_dashboard(admin, credits, db):
    add_purchase(credits, db)
    assert 'href="https://dashboard.stripe.com/checkout/sessions/cs_test_abc"' in wallet_page(admin)


def test_audit_is_shown(admin, credits, db):
    credits.grant("bob", 5, reason="seed")
    assert 'data-testid="audit-passed"' in admin.get(f"{ADMIN}/audit").get_data(as_text=True)
    w = credits.tables.wallets
    with db.engine.begin() as conn:
        conn.execute(sa.update(w).values(balance=w.c.balance + 1))
    page = admin.get(f"{ADMIN}/audit").get_data(as_text=True)
    assert 'data-testid="audit-problems"' in page
    assert str(escape(credits.audit()[0])) in page


# -- the CLI -----------------------------------------------------------------------------------------


def test_the_cli_grant_records_the_os_user_or_actor_and_history_shows_it(app, credits, monkeypatch):
    monkeypatch.setattr("getpass.getuser", lambda: "ops-oscar")
    runner = app.test_cli_runner()
    assert runner.invoke(args=["credits", "grant", "bob", "5", "--reason", "r"]).exit_code == 0
    assert (
        runner.invoke(args=["credits", "grant", "bob", "6", "--reason", "r", "--actor", "eve"]).exit_code == 0
    )
    assert [e.actor for e in credits.history("bob")] == ["eve", "ops-oscar"]
    out = runner.invoke(args=["credits", "history", "bob"]).output
    assert "\tby eve" in out
    assert "\tby ops-oscar" in out
    assert credits.history("bob")[0].to_dict()["actor"] == "eve"


# -- credit codes ------------------------------------------------------------------------------------


def codes_page(client) -> str:
    response = client.get(f"{ADMIN}/codes")
    assert response.status_code == 200
    return response.get_data(as_text=True)


def code_row(page: str, code: str) -> str:
    found = re.search(rf'<tr data-testid="code-{code}">.*?</tr>', page, re.S)
    assert found, f"no row for {code}"
    return found.group(0)


def prefilled_code(page: str) -> str:
    found = re.search(r'name="code" maxlength="64" value="([A-Z0-9-]+)"', page)
    assert found is not None
    return found.group(1)


CODE_FORM = {"credits": "50", "max_redemptions": "10", "per_user": "2", "expires": "2031-02-01T12:30"}


def test_the_codes_page_lists_every_code(admin, credits):
    soon = datetime(2031, 3, 4, 5, 6, tzinfo=timezone.utc)
    credits.create_code(credits=500, max_redemptions=3, code="SPRING", expires_at=soon, actor="ops")
    credits.create_code(credits=20, max_redemptions=1, per_user=1, code="ONCE")
    credits.redeem_code("bob", "spring")
    page = codes_page(admin)
    assert f'href="{ADMIN}/codes"' in page
    spring = code_row(page, "SPRING")
    assert ">500<" in spring
    assert 'data-testid="redeemed">1/3<' in spring
    assert "2031-03-04 05:06" in spring
    assert 'data-testid="disabled">no<' in spring
    assert 'data-testid="actor">ops<' in spring
    assert "never" in code_row(page, "ONCE")
    # Newest first.
    assert page.index('data-testid="code-ONCE"') < page.index('data-testid="code-SPRING"')


def test_create_a_code_records_the_admin_and_a_double_submit_makes_one(admin, credits):
    page = codes_page(admin)
    code = prefilled_code(page)
    form = {**CODE_FORM, "code": code}
    response = admin.post(f"{ADMIN}/codes", data=form)
    assert response.status_code == 303
    made = credits.credit_code(code)
    assert made is not None
    assert (made.credits, made.max_redemptions, made.per_user, made.actor) == (50, 10, 2, "alice@example.com")
    assert made.expires_at == datetime(2031, 2, 1, 12, 30, tzinfo=timezone.utc)
    listed = admin.get(response.headers["Location"]).get_data(as_text=True)
    assert f"Created the code <code>{code}</code>" in listed
    assert 'data-testid="actor">alice@example.com<' in code_row(listed, code)
    # The same form again: the code exists, nothing more is made.
    again = admin.post(f"{ADMIN}/codes", data=form)
    assert again.status_code == 400
    assert "exists already" in again.get_data(as_text=True)
    assert [c.code for c in credits.credit_codes()] == [code]
    # Each load offers another code.
    assert prefilled_code(codes_page(admin)) != code


def test_an_empty_code_field_makes_a_random_code_and_typed_codes_are_upper_cased(admin, credits):
    assert admin.post(f"{ADMIN}/codes", data={**CODE_FORM, "code": "", "expires": ""}).status_code == 303
    assert admin.post(f"{ADMIN}/codes", data={**CODE_FORM, "code": " summer-31 "}).status_code == 303
    summer, generated = credits.credit_codes()
    assert summer.code == "SUMMER-31"
    assert re.fullmatch(r"[A-Z0-9]{4}-[A-Z0-9]{4}-[A-Z0-9]{4}", generated.code)
    assert generated.expires_at is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("credits", "0"),
        ("credits", "ten"),
        ("credits", ""),
        ("credits", "9" * 40),
        ("max_redemptions", "-1"),
        ("max_redemptions", "2147483648"),
        ("per_user", "1.5"),
        ("expires", "next week"),
        ("expires", "2020-01-01T00:00"),
        ("expires", "2031-01-01T00:00:00.000000+00:00" + "0" * 20),
        ("code", "no spaces!"),
        ("code", "X" * 65),
    ],
)
def test_invalid_code_forms_are_400_and_make_nothing(admin, credits, field, value):
    response = admin.post(f"{ADMIN}/codes", data={**CODE_FORM, "code": "PROMO", field: value})
    assert response.status_code == 400
    page = response.get_data(as_text=True)
    assert 'data-testid="error"' in page
    # The form comes back as it was sent.
    assert f'value="{escape(value.strip())}"' in page
    assert credits.credit_codes() == []


def test_disable_a_code_then_redeeming_it_is_refused(app, admin, credits):
    credits.create_code(credits=30, max_redemptions=5, code="AUTUMN")
    credits.redeem_code("carol", "AUTUMN")
    page = codes_page(admin)
    assert f'action="{ADMIN}/codes/disable"' in code_row(page, "AUTUMN")
    response = admin.post(f"{ADMIN}/codes/disable", data={"code": "autumn"})
    assert response.status_code == 303
    assert credits.credit_code("AUTUMN").disabled
    listed = admin.get(response.headers["Location"]).get_data(as_text=True)
    row = code_row(listed, "AUTUMN")
    assert 'data-testid="disabled">yes<' in row
    assert "/codes/disable" not in row
    assert 'data-testid="redeemed">1/5<' in row
    with pytest.raises(CodeDisabled):
        credits.redeem_code("dave", "AUTUMN")
    bob = logged_in_as(app, "bob")
    refused = bob.post("/credits/redeem", json={"code": "AUTUMN"})
    assert (refused.status_code, refused.get_json()["error"]) == (410, "code_disabled")
    assert credits.balance("bob") == 0
    assert credits.balance("carol") == 30


def test_disabling_an_unknown_or_malformed_code_changes_nothing(admin, credits):
    credits.create_code(credits=30, max_redemptions=5, code="WINTER")
    assert admin.post(f"{ADMIN}/codes/disable", data={"code": "NOPE"}).status_code == 404
    assert admin.post(f"{ADMIN}/codes/disable", data={"code": "not a code"}).status_code == 400
    assert admin.post(f"{ADMIN}/codes/disable", data={}).status_code == 400
    assert not credits.credit_code("WINTER").disabled


def test_codes_pages_are_refused_to_non_admins(app, credits, checker):
    credits.create_code(credits=30, max_redemptions=5, code="WINTER")
    anonymous = app.test_client()
    assert anonymous.get(f"{ADMIN}/codes").status_code == 401
    assert anonymous.post(f"{ADMIN}/codes/disable", data={"code": "WINTER"}).status_code == 401
    bob = logged_in_as(app, "bob")
    assert bob.get(f"{ADMIN}/codes").status_code == 403
    assert bob.post(f"{ADMIN}/codes", data={**CODE_FORM, "code": "MINE"}).status_code == 403
    assert bob.post(f"{ADMIN}/codes/disable", data={"code": "WINTER"}).status_code == 403
    assert [c.code for c in credits.credit_codes()] == ["WINTER"]
    assert not credits.credit_code("WINTER").disabled


# -- the example app: CSRF and its admins ------------------------------------------------------------


@pytest.fixture
def example(empty_database):
    app = build_example_app(empty_database, WTF_CSRF_ENABLED=True, ADMIN_USERNAMES="root")
    with app.app_context():
        flask_migrate.upgrade()
    yield app
    with app.app_context():
        example_db.engine.dispose()


def page_csrf(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found is not None
    return found.group(1)


def test_the_example_app_admin_needs_csrf_on_every_form(example):
    user = example.test_client()
    uid = signed_up(user, "ada")
    root = example.test_client()
    assert sign_up(root, "root").status_code == 302
    assert user.get(f"{ADMIN}/").status_code == 403
    assert f'href="{ADMIN}/"' in root.get("/").get_data(as_text=True)
    assert f'href="{ADMIN}/"' not in user.get("/").get_data(as_text=True)
    page = wallet_page(root, uid)
    form = {"user_id": uid, "amount": "9", "reason": "welcome", "nonce": nonce(page)}
    for path in ("grant", "deduct", "refund"):
        assert root.post(f"{ADMIN}/wallet/{path}", data=form).status_code == 400, path
    with example.app_context():
        assert example_credits.balance(uid) == 0
    assert root.post(f"{ADMIN}/wallet/grant", data={**form, "csrf_token": page_csrf(page)}).status_code == 303
    with example.app_context():
        (entry,) = example_credits.history(uid)
    assert (entry.amount, entry.actor) == (9, "root")
    assert 'data-testid="actor">root<' in wallet_page(root, uid)


def test_the_example_app_codes_page_needs_csrf(example):
    root = example.test_client()
    assert sign_up(root, "root").status_code == 302
    page = root.get(f"{ADMIN}/codes").get_data(as_text=True)
    assert f'href="{ADMIN}/codes"' in page
    form = {**CODE_FORM, "code": "LAUNCH"}
    assert root.post(f"{ADMIN}/codes", data=form).status_code == 400
    with example.app_context():
        assert example_credits.credit_codes() == []
    assert root.post(f"{ADMIN}/codes", data={**form, "csrf_token": page_csrf(page)}).status_code == 303
    with example.app_context():
        assert example_credits.credit_code("LAUNCH").actor == "root"
    assert root.post(f"{ADMIN}/codes/disable", data={"code": "LAUNCH"}).status_code == 400
    with example.app_context():
        assert not example_credits.credit_code("LAUNCH").disabled
    disable = {"code": "LAUNCH", "csrf_token": page_csrf(page)}
    assert root.post(f"{ADMIN}/codes/disable", data=disable).status_code == 303
    with example.app_context():
        assert example_credits.credit_code("LAUNCH").disabled
