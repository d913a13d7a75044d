"""``flask credits ...`` and the blueprint's JSON endpoints."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa


@pytest.fixture
def cli(app):
    runner = app.test_cli_runner()

    def invoke(*args):
        return runner.invoke(args=["credits", *args])

    return invoke


def test_cli_grant_balance_and_history(cli, credits):
    result = cli("grant", "alice", "25", "--reason", "support ticket 12")
    assert result.exit_code == 0, result.output
    assert "balance 25" in result.output
    assert cli("balance", "alice").output.strip() == "25"
    history = cli("history", "alice").output
    assert "grant" in history
    assert "support ticket 12" in history
    assert credits.balance("alice") == 25


def test_cli_grant_run_twice_with_one_idempotency_key_says_nothing_changed(cli, credits):
    first = cli("grant", "alice", "25", "--reason", "r", "--idempotency-key", "ticket-12")
    again = cli("grant", "alice", "25", "--reason", "r", "--idempotency-key", "ticket-12")
    assert first.output.startswith("granted 25 credits (entry ")
    entry = first.output.split("(entry ")[1].split(")")[0]
    assert again.output.strip() == f"already granted 25 credits (entry {entry}); nothing changed"
    assert credits.balance("alice") == 25


def test_cli_grant_to_an_api_key_with_expiry(cli, credits, clock):
    expires = (clock.now + timedelta(days=3)).replace(tzinfo=None).isoformat()
    assert cli("grant", "alice", "5", "--reason", "r", "--key", "k1", "--expires", expires).exit_code == 0
    assert credits.balance("alice", "k1") == 5
    assert credits.balance("alice") == 0
    clock.advance(days=4)
    assert cli("balance", "alice", "--key", "k1").output.strip() == "0"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["grant", "mallory", "5", "--reason", "r"], "unknown user 'mallory'"),
        (["balance", "mallory"], "unknown user 'mallory'"),
        (["history", "mallory"], "unknown user 'mallory'"),
        (["grant", "alice", "0", "--reason", "r"], "amount must be at least 1"),
        (["grant", "alice", "--reason", "r", "--", "-3"], "amount must be at least 1"),
        (["grant", "alice", "2.5", "--reason", "r"], "'2.5' is not a valid integer"),
        (["grant", "alice", "five", "--reason", "r"], "'five' is not a valid integer"),
        (["grant", "alice", "5"], "Missing option '--reason'"),
        (["grant", "alice", "5", "--reason", "r", "--expires", "soon"], "not an ISO 8601"),
        (["grant", "alice", "5", "--reason", "r", "--expires", "2001-01-01"], "not in the future"),
    ],
)
def test_cli_refuses_bad_input_clearly_and_writes_nothing(cli, credits, args, message):
    result = cli(*args)
    assert result.exit_code != 0
    assert message in result.output
    assert credits.balance("alice") == 0
    assert credits.history("alice") == []


def test_cli_audit_passes_then_names_a_tampered_wallet(cli, credits, db):
    credits.grant("alice", 5, reason="x")
    ok = cli("audit")
    assert (ok.exit_code, "audit passed" in ok.output) == (0, True)
    w = credits.tables.wallets
    with db.engine.begin() as conn:
        conn.execute(sa.update(w).values(balance=6))
    bad = cli("audit")
    assert bad.exit_code == 1
    assert "alice" in bad.output


def test_cli_expire_sweeps_due_wallets(cli, credits, clock):
    credits.grant("alice", 5, reason="trial", expires_at=clock.now + timedelta(minutes=1))
    clock.advance(minutes=2)
    result = cli("expire")
    assert (result.exit_code, "checked 1 wallets" in result.output) == (0, True)
    assert credits.history("alice")[0].kind == "expire"


def test_json_balance_and_transactions_for_the_logged_in_user(client, login, credits):
    for i in range(5):
        credits.grant("alice", i + 1, reason=f"g{i}")
    credits.grant("bob", 100, reason="not alice's")
    login("alice")
    assert client.get("/credits/balance").json == {
        "user_id": "alice",
        "key_id": None,
        "balance": 15,
        "held": 0,
    }
    first = client.get("/credits/transactions?limit=2").json
    assert [t["amount"] for t in first["transactions"]] == [5, 4]
    second = client.get(f"/credits/transactions?limit=2&before={first['next_before']}").json
    assert [t["amount"] for t in second["transactions"]] == [3, 2]
    last = client.get(f"/credits/transactions?limit=2&before={second['next_before']}").json
    assert [t["amount"] for t in last["transactions"]] == [1]
    assert last["next_before"] is None


@pytest.mark.parametrize("query", ["limit=abc", "limit=0", "limit=5000", "before=x"])
def test_bad_pagination_is_a_400(client, login, query):
    login("alice")
    assert client.get(f"/credits/transactions?{query}").status_code == 400


@pytest.mark.parametrize("path", ["/credits/", "/credits/balance", "/credits/transactions"])
def test_anonymous_users_cannot_read_balances(client, path):
    assert client.get(path).status_code == 401


def test_credits_page_shows_balance_and_history(client, login, credits):
    credits.grant("alice", 42, reason="welcome bonus")
    login("alice")
    page = client.get("/credits/").get_data(as_text=True)
    assert 'data-testid="balance">42<' in page
    assert "welcome bonus" in page


def test_credits_page_lists_each_api_keys_balance_and_offers_to_buy_for_it(client, login, credits):
    @credits.keys_loader
    def keys(user_id):
        return [("key-1", "laptop"), ("key-2", "ci")] if user_id == "alice" else []

    credits.grant("alice", 3, key_id="key-1", reason="x")
    login("alice")
    page = client.get("/credits/", headers={"Accept": "text/html"}).get_data(as_text=True)
    assert 'data-testid="key-balance-key-1">3<' in page
    assert 'data-testid="key-balance-key-2">0<' in page
    assert '<option value="key-2">API key ci</option>' in page
    assert credits.owns_key("alice", "key-2")
    assert not credits.owns_key("bob", "key-2")


def test_template_helpers_render_a_badge_and_a_purchase_button(app, client, login, credits):
    @app.get("/layout")
    def layout():
        from flask import render_template_string

        return render_template_string(
            '{% import "credits/macros.html" as ui %}'
            "{{ ui.balance_badge() }}{{ ui.purchase_button(quantity=5) }}"
        )

    assert client.get("/layout").get_data(as_text=True).count("credits-badge") == 0  # anonymous: no badge
    credits.grant("alice", 12, reason="x")
    login("alice")
    html = client.get("/layout").get_data(as_text=True)
    assert 'data-testid="credits-balance">12<' in html
    assert 'action="/credits/checkout"' in html
    assert 'name="quantity" value="5"' in html
    assert "b.disabled=true" in html


def test_the_stylesheet_is_served(client):
    response = client.get("/credits/static/credits.css")
    assert response.status_code == 200
    assert b".credits-badge" in response.data
    response.close()
