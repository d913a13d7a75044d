"""``flask credits ...`` and the blueprint's JSON endpoints."""

from __future__ import annotations

import re
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


# -- what USER is -------------------------------------------------------------------------------------

USER_COMMANDS = [
    ["balance"],
    ["grant"],
    ["history"],
    ["holds"],
    ["subscription"],
    ["auto-top-up"],
]


@pytest.mark.parametrize("command", USER_COMMANDS, ids=lambda c: c[0])
def test_every_command_taking_a_user_says_what_user_is(cli, command):
    result = cli(*command, "--help")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # click wraps the epilog
    assert "USER is the user's id, as the app's Flask-Login user_loader reads it" in text
    assert "@credits.user_lookup" in text


@pytest.fixture
def by_email(credits):
    emails = {"alice@example.com": "alice", "bob@example.com": "bob"}
    credits.user_lookup(emails.get)
    yield
    credits._user_lookup = None  # the fixture's instance is this test's alone; tidy all the same


def test_user_lookup_lets_an_operator_type_an_email_and_still_an_id(cli, credits, by_email):
    result = cli("grant", "alice@example.com", "25", "--reason", "r")
    assert result.exit_code == 0, result.output
    assert credits.balance("alice") == 25
    assert cli("balance", "alice@example.com").output.strip() == "25"
    # What the lookup does not know is tried as the user id itself.
    assert cli("balance", "alice").output.strip() == "25"
    assert credits.find_user("bob@example.com") == "bob"
    assert credits.find_user("bob") == "bob"


def test_text_neither_the_lookup_nor_the_loader_knows_is_an_unknown_user(cli, credits, by_email):
    result = cli("grant", "carol@example.com", "5", "--reason", "r")
    assert result.exit_code == 1
    assert result.output.strip() == "Error: unknown user 'carol@example.com'"
    assert credits.history("carol@example.com") == []


def test_a_loader_that_raises_on_what_was_typed_is_a_clean_unknown_user(cli, app, credits):
    def load(user_id):  # a common loader: ids are integers, so a user name raises ValueError
        return {1: object()}.get(int(user_id))

    app.login_manager.user_loader(load)
    for args in (["grant", "alice", "3", "--reason", "r"], ["balance", "alice"], ["history", "alice"]):
        result = cli(*args)
        assert result.exit_code == 1, result.output
        assert result.output.strip() == "Error: unknown user 'alice'"
        assert "Traceback" not in result.output
        assert isinstance(result.exception, SystemExit)
    assert cli("grant", "1", "3", "--reason", "r").exit_code == 0
    assert credits.balance("1") == 3
    assert credits.history("alice") == []


def test_a_lookup_that_raises_is_a_clean_unknown_user(cli, credits):
    def lookup(text):
        raise LookupError(text)

    credits.user_lookup(lookup)
    result = cli("balance", "alice")
    assert (result.exit_code, result.output.strip()) == (1, "Error: unknown user 'alice'")


@pytest.fixture
def alices_key(credits):
    @credits.wallet_checker
    def owns(user_id, key_id):
        return (user_id, key_id) in {("alice", None), ("bob", None), ("alice", "key-1")}


def test_a_key_that_is_not_the_users_is_named_as_such(cli, credits, alices_key):
    result = cli("grant", "alice", "10", "--reason", "r", "--key", "key-9")
    assert result.exit_code == 1
    assert result.output.strip() == "Error: key 'key-9' is not one of user alice's keys (or it is revoked)"
    bob = cli("balance", "bob", "--key", "key-1")
    assert bob.output.strip() == "Error: key 'key-1' is not one of user bob's keys (or it is revoked)"
    assert cli("grant", "alice", "10", "--reason", "r", "--key", "key-1").exit_code == 0
    assert credits.balance("alice", "key-1") == 10
    assert cli("balance", "mallory", "--key", "key-1").output.strip() == "Error: unknown user 'mallory'"


def test_a_key_message_names_the_user_typed_and_the_id_found(cli, credits, alices_key, by_email):
    result = cli("balance", "bob@example.com", "--key", "key-1")
    assert result.output.strip() == (
        "Error: key 'key-1' is not one of user bob@example.com (id bob)'s keys (or it is revoked)"
    )


# -- the credits page's history ------------------------------------------------------------------------

HTML = {"Accept": "text/html"}


def _history(client, query=""):
    """The page's entry ids, newest first, and its paging links as {name: href}."""
    response = client.get(f"/credits/{query}", headers=HTML)
    assert response.status_code == 200, response.status_code
    page = response.get_data(as_text=True)
    ids = [int(i) for i in re.findall(r'<tr data-testid="entry-(\d+)">', page)]
    links = {
        name: href.replace("&amp;", "&")
        for href, name in re.findall(r'<a href="([^"]+)" data-testid="history-(newest|newer|older)">', page)
    }
    return ids, links


def test_history_pages_walk_older_then_newer_and_back_to_the_newest(client, login, credits):
    ids = [credits.grant("alice", n, reason=f"g{n}").id for n in range(1, 6)][::-1]  # newest first
    credits.grant("bob", 9, reason="not alice's")
    login("alice")
    first, links = _history(client, "?limit=2")
    assert first == ids[:2]
    assert links == {"older": f"/credits/?before={ids[1]}&limit=2"}
    second, links = _history(client, links["older"].removeprefix("/credits/"))
    assert second == ids[2:4]
    assert links == {
        "newest": "/credits/?limit=2",
        "newer": f"/credits/?after={ids[2]}&limit=2",
        "older": f"/credits/?before={ids[3]}&limit=2",
    }
    last, last_links = _history(client, links["older"].removeprefix("/credits/"))
    assert last == ids[4:]
    assert last_links == {"newest": "/credits/?limit=2", "newer": f"/credits/?after={ids[4]}&limit=2"}
    # Newer from the last page is the second page again, and from there the first.
    again, links = _history(client, last_links["newer"].removeprefix("/credits/"))
    assert again == second
    assert set(links) == {"newest", "newer", "older"}
    newest, links = _history(client, links["newer"].removeprefix("/credits/"))
    assert newest == first
    assert links == {"older": f"/credits/?before={ids[1]}&limit=2"}  # the newest page, as first read
    # A page past either end (an id from another page size, a hand-made URL) is empty, with the way back.
    for query in (f"?after={ids[0]}", f"?before={ids[4]}"):
        empty = client.get(f"/credits/{query}", headers=HTML).get_data(as_text=True)
        assert "No entries on this page." in empty
        assert _history(client, query) == ([], {"newest": "/credits/"})
    assert _history(client, "")[0] == ids


@pytest.mark.parametrize("query", ["after=x", "after=1.5", "after=0", "after=1&before=2"])
def test_a_bad_newer_page_is_a_400(client, login, query):
    login("alice")
    assert client.get(f"/credits/?{query}", headers=HTML).status_code == 400


def test_history_rows_say_what_tells_them_apart(client, login, credits):
    by_hand = credits.grant("alice", 10, reason="support ticket 12", actor="ops@example.com")
    request = {"endpoint": "main.create_persona", "method": "POST"}
    paid = credits.spend("alice", 1, reason="generate persona", metadata=request)
    named = credits.spend("alice", 2, reason="main.create_persona", metadata=request)
    refund = credits.refund("alice", paid.id, reason="failed")
    login("alice")
    page = client.get("/credits/", headers=HTML).get_data(as_text=True)
    rows = {
        int(i): " ".join(re.sub(r"<[^>]+>", " ", row).split()[2:])  # after the date and time
        for i, row in re.findall(r'<tr data-testid="entry-(\d+)">(.*?)</tr>', page, re.S)
    }
    assert rows[paid.id].startswith("Spend: generate persona POST main.create_persona -1 ")
    assert rows[named.id].startswith("Spend: main.create_persona -2 ")  # the endpoint said once
    assert rows[by_hand.id].startswith("Grant: support ticket 12 by ops@example.com +10 ")
    assert rows[refund.id].startswith(f"Refund: failed of entry {paid.id} +1 ")


def test_a_keys_history_names_the_key_that_paid(client, credits):
    credits.wallet_loader(lambda: ("alice", "key-1"))
    credits.grant("alice", 5, key_id="key-1", reason="r")
    spent = credits.spend("alice", 2, key_id="key-1", reason="generate persona")
    page = client.get("/credits/", headers=HTML).get_data(as_text=True)
    row = re.search(rf'<tr data-testid="entry-{spent.id}">(.*?)</tr>', page, re.S)
    assert row is not None
    assert 'generate persona <small class="credits-detail">API key key-1</small>' in row[1]


def test_a_loader_whose_database_is_down_is_not_called_an_unknown_user(cli, app):
    def load(user_id):
        raise sa.exc.OperationalError("SELECT", {}, Exception("connection refused"))

    app.login_manager.user_loader(load)
    result = cli("balance", "alice")
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: could not look up user 'alice': the database is unavailable (OperationalError)"
    )
