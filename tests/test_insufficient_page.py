"""The 402 (issue 17, item 10): how many credits are missing, one-click checkouts of what covers them
for the wallet that was short, and a refused form post kept for a "Try again"."""

from __future__ import annotations

import html
import io
import re

import flask_migrate
import pytest
from flask import abort, request
from helpers import PASSWORD, build_example_app, csrf_token, grant, signed_up
from werkzeug.datastructures import MultiDict

from example_app.models import db
from example_app.personas import generate_persona
from flask_credits import requires_credits
from flask_credits.web.responses import MAX_KEPT_CHARACTERS, MAX_KEPT_FIELDS

HTML = {"Accept": "text/html"}
JSON = {"Accept": "application/json"}
PACKS = {
    "tiny": {"credits": 3, "amount": 100, "name": "Tiny"},
    "big": {"credits": 100, "amount": 2000, "name": "Big"},
    "small": {"credits": 10, "amount": 300, "name": "Small"},
}


@pytest.fixture
def credits_config():
    return {"CREDITS_PACKS": PACKS, "CREDITS_PER_UNIT": 4, "CREDITS_MAX_QUANTITY": 5}


@pytest.fixture
def views(app, credits):
    @app.post("/persona")
    @requires_credits(8)
    def persona():
        return {"ok": True}

    @app.post("/huge")
    @requires_credits(1000)
    def huge():
        return {"ok": True}

    @app.post("/for-bob")
    def for_bob():
        credits.spend("bob", 5, reason="not alice's")
        abort(500)

    @app.get("/look")
    @requires_credits(8)
    def look():
        return {"ok": True}

    @credits.wallet_loader
    def wallet():
        return ("alice", request.headers.get("X-Key")) if request.headers.get("X-User") else None


def forms(page: str) -> list[dict[str, str]]:
    """Each form on the page: its action, target and hidden fields."""
    found = []
    for attributes, body in re.findall(r"<form ([^>]*)>(.*?)</form>", page, re.S):
        form = dict(re.findall(r'(\w+)="([^"]*)"', attributes))
        form.update(re.findall(r'<input type="hidden" name="([^"]*)" value="([^"]*)">', body))
        found.append({k: html.unescape(v) for k, v in form.items()})
    return found


WHO = {"X-User": "1"}


@pytest.mark.usefixtures("views")
def test_the_json_402_says_what_is_missing_and_which_packs_cover_it(client, credits):
    credits.grant("alice", 2, reason="welcome")
    refused = client.post("/persona", headers={**JSON, **WHO})
    assert refused.status_code == 402
    body = refused.json
    assert (body["required"], body["balance"], body["missing"]) == (8, 2, 6)
    assert body["packs"] == [
        {"id": "small", "name": "Small", "credits": 10, "amount": 300, "currency": "usd"},
        {"id": "big", "name": "Big", "credits": 100, "amount": 2000, "currency": "usd"},
    ]  # fewest credits first; Tiny (3) does not cover 6
    assert credits.balance("alice") == 2


@pytest.mark.usefixtures("views")
def test_the_402_page_offers_one_click_checkouts_that_cover_what_is_missing(client, credits):
    credits.grant("alice", 2, reason="welcome")
    refused = client.post("/persona", headers={**HTML, **WHO})
    assert refused.status_code == 402
    page = refused.get_data(as_text=True)
    assert re.search(r'data-testid="missing">You are <strong>6</strong> credits short', page)
    checkouts = [f for f in forms(page) if f["action"] == "/credits/checkout"]
    assert [(f.get("pack"), f.get("quantity"), f["key_id"]) for f in checkouts] == [
        ("small", None, ""),
        ("big", None, ""),
        (None, "2", ""),  # 2 units of 4 credits cover 6
    ]
    assert all("target" not in f for f in checkouts)  # nothing to keep: same tab
    assert "Buy Small: 10 credits for 3.00 USD" in page
    assert "Buy 8 credits for 2.00 USD" in page
    assert 'href="/credits/"' in page
    assert "needs <strong>8</strong>" in page


@pytest.mark.usefixtures("views")
def test_the_checkouts_are_for_the_api_key_that_was_short(client, credits):
    credits.grant("alice", 50, reason="the account has plenty")
    refused = client.post("/persona", headers={**HTML, **WHO, "X-Key": "k1"})
    assert refused.status_code == 402
    checkouts = [f for f in forms(refused.get_data(as_text=True)) if f["action"] == "/credits/checkout"]
    assert checkouts
    assert {f["key_id"] for f in checkouts} == {"k1"}


@pytest.mark.usefixtures("views")
def test_no_pack_or_quantity_covers_it_then_only_the_credits_page_is_offered(client):
    page = client.post("/huge", headers={**HTML, **WHO}).get_data(as_text=True)
    assert "You are <strong>1000</strong> credits short" in page
    assert not [f for f in forms(page) if f["action"] == "/credits/checkout"]  # 250 units > 5
    assert 'href="/credits/"' in page
    assert client.post("/huge", headers={**JSON, **WHO}).json["packs"] == []


@pytest.mark.usefixtures("views")
def test_another_users_wallet_that_was_short_is_offered_no_checkout(app, client):
    app.config["PROPAGATE_EXCEPTIONS"] = False
    refused = client.post("/for-bob", headers={**HTML, **WHO})
    assert refused.status_code == 402
    page = refused.get_data(as_text=True)
    assert not [f for f in forms(page) if f["action"] == "/credits/checkout"]
    assert client.post("/for-bob", headers={**JSON, **WHO}).json["missing"] == 5


@pytest.mark.usefixtures("views")
def test_a_refused_form_post_is_kept_for_try_again_escaped_without_its_old_csrf_token(client):
    fields = [("seed", 'ada"><script>alert(1)</script>'), ("tag", "a"), ("tag", "b"), ("csrf_token", "old")]
    refused = client.post("/persona?draft=1&x=%22", data=MultiDict(fields), headers={**HTML, **WHO})
    assert refused.status_code == 402
    page = refused.get_data(as_text=True)
    assert "<script>alert(1)</script>" not in page
    assert 'value="ada&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"' in page
    again = re.search(
        r'<form method="post" action="([^"]*)" data-testid="try-again">(.*?)</form>', page, re.S
    )
    assert again is not None
    assert html.unescape(again.group(1)) == "/persona?draft=1&x=%22"
    kept = re.findall(r'<input type="hidden" name="([^"]*)" value="([^"]*)">', again.group(2))
    assert [(n, html.unescape(v)) for n, v in kept] == fields[:3]  # order and repeats kept; no old token
    # While the post is kept, the checkouts open in a new tab, so this page stays.
    checkouts = [f for f in forms(page) if f["action"] == "/credits/checkout"]
    assert checkouts
    assert {f.get("target") for f in checkouts} == {"_blank"}


@pytest.mark.usefixtures("views")
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(lambda: {f"f{i}": "x" for i in range(MAX_KEPT_FIELDS + 1)}, id="too-many-fields"),
        pytest.param(lambda: {"seed": "x" * (MAX_KEPT_CHARACTERS + 1)}, id="too-long"),
        pytest.param(lambda: {"seed": "ada", "file": (io.BytesIO(b"data"), "a.txt")}, id="a-file"),
    ],
)
def test_a_post_too_large_or_with_a_file_is_not_kept_but_still_gets_the_402_page(client, body):
    refused = client.post("/persona", data=body(), headers={**HTML, **WHO})
    assert refused.status_code == 402
    page = refused.get_data(as_text=True)
    assert 'data-testid="try-again"' not in page
    assert "You are <strong>8</strong> credits short" in page
    assert len(page) < 10_000  # nothing of the body came back


@pytest.mark.usefixtures("views")
def test_a_get_or_a_json_post_has_nothing_to_keep(client):
    looked = client.get("/look", headers={**HTML, **WHO})
    assert looked.status_code == 402
    assert 'data-testid="try-again"' not in looked.get_data(as_text=True)
    refused = client.post("/persona", json={"seed": "ada"}, headers=WHO)
    assert refused.status_code == 402
    assert refused.is_json


# -- the example app: one click to checkout, then Try again ------------------------------------------


@pytest.fixture
def example(empty_database):
    app = build_example_app(empty_database, WTF_CSRF_ENABLED=True)
    with app.app_context():
        flask_migrate.upgrade()
    yield app
    with app.app_context():
        db.engine.dispose()


def test_the_example_apps_402_buys_a_pack_in_one_click_then_tries_again_with_the_same_seed(example):
    client = example.test_client()
    token = csrf_token(client, "/signup")
    form = {"username": "ada", "password": PASSWORD, "confirm": PASSWORD}
    assert client.post("/signup", data={**form, "csrf_token": token}).status_code == 302
    user_id = str(client.get("/credits/balance", headers=JSON).json["user_id"])
    token = csrf_token(client, "/personas")
    refused = client.post("/personas", data={"seed": "lighthouse", "csrf_token": token}, headers=HTML)
    assert refused.status_code == 402
    page = refused.get_data(as_text=True)
    assert "You are <strong>5</strong> credits short" in page
    small = next(f for f in forms(page) if f.get("pack") == "small")
    assert (small["action"], small["key_id"], small["target"]) == ("/credits/checkout", "", "_blank")
    assert small["csrf_token"]

    fields = {k: v for k, v in small.items() if k not in ("action", "method", "class", "target")}
    started = client.post("/credits/checkout", data=fields)
    assert started.status_code == 303
    assert re.search(r"/credits/simulated-checkout/cs_sim_\w+$", started.headers["Location"])

    assert grant(example, user_id, 5).exit_code == 0  # as if that checkout was paid
    again = next(f for f in forms(page) if f.get("data") is None and f["action"] == "/personas")
    answered = client.post("/personas", data={k: again[k] for k in ("seed", "csrf_token")}, headers=HTML)
    assert answered.status_code == 200
    assert generate_persona("lighthouse").name in answered.get_data(as_text=True)


def test_the_example_app_offers_packs_on_its_credits_page(example):
    client = example.test_client()
    example.config["WTF_CSRF_ENABLED"] = False
    signed_up(client)
    page = client.get("/credits/", headers=HTML).get_data(as_text=True)
    assert "Small: 500 credits for 5.00 USD" in page
    assert "Large: 2000 credits for 18.00 USD" in page
