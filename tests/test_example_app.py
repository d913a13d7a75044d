"""example_app end to end: accounts, personas paid with credits, API keys with wallets of their own,
signals and CSRF, on the schema built by migrations/."""

from __future__ import annotations

import logging

import pytest
import sqlalchemy as sa
from helpers import (
    PASSWORD,
    balance,
    build_example_app,
    create_key,
    csrf_token,
    grant,
    new_key,
    sign_up,
    signed_up,
)

from example_app.extensions import credits
from example_app.models import User, db
from example_app.personas import generate_persona

HTML = {"Accept": "text/html"}


@pytest.fixture
def app(example):
    return example


@pytest.fixture
def client(app):
    return app.test_client()


def log_in(client, username: str = "ada", password: str = PASSWORD, next_url: str | None = None):
    url = "/login" + (f"?next={next_url}" if next_url else "")
    return client.post(url, data={"username": username, "password": password})


def make_persona(client, seed: str = "lighthouse"):
    return client.post("/personas", data={"seed": seed}, headers=HTML)


def api_persona(client, secret: str | None, seed: str = "lighthouse"):
    headers = {"X-API-Key": secret} if secret is not None else {}
    return client.post("/api/personas", json={"seed": seed}, headers=headers)


# -- accounts ---------------------------------------------------------------------------------------


def test_sign_up_log_out_and_log_back_in(client):
    assert client.get("/").status_code == 200
    response = sign_up(client)
    assert response.status_code == 302
    assert "Log out" in client.get("/").get_data(as_text=True)  # signed up is logged in

    assert client.post("/logout").status_code == 302
    response = client.get("/personas")
    assert response.status_code == 302
    assert response.headers["Location"].startswith("/login?next=")

    assert log_in(client, password="wrong password").status_code == 400
    response = log_in(client, "ADA", next_url="/personas")  # usernames are case-insensitive
    assert response.status_code == 302
    assert response.headers["Location"] == "/personas"
    assert client.get("/personas").status_code == 200


def test_sign_up_refuses_a_taken_name_and_a_short_password(client):
    assert sign_up(client).status_code == 302
    client.post("/logout")
    response = sign_up(client, "Ada")
    assert response.status_code == 400
    assert "That username is taken." in response.get_data(as_text=True)
    response = client.post("/signup", data={"username": "bea", "password": "short", "confirm": "short"})
    assert response.status_code == 400


def test_log_in_never_redirects_to_another_site(client):
    sign_up(client)
    client.post("/logout")
    response = log_in(client, next_url="//evil.example/")
    assert response.headers["Location"] == "/"


def test_password_is_stored_hashed(app, client):
    sign_up(client)
    with app.app_context():
        user = db.session.scalar(sa.select(User))
        assert user.password_hash != PASSWORD
        assert user.check_password(PASSWORD)


# -- personas paid with credits ---------------------------------------------------------------------


def test_persona_costs_five_credits_and_needs_them(app, client):
    uid = signed_up(client)

    response = make_persona(client)
    assert response.status_code == 402
    page = response.get_data(as_text=True)
    assert '<a href="/credits/">Buy credits</a>' in page
    assert "Persona Studio" in page  # the credits templates use the app's layout

    result = grant(app, uid, 20)
    assert result.exit_code == 0, result.output
    response = make_persona(client)
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert generate_persona("lighthouse").name in page
    assert 'data-testid="balance">15<' in page
    assert balance(app, uid) == 15


def test_an_invalid_seed_costs_nothing(app, client):
    uid = signed_up(client)
    grant(app, uid, 20)
    assert make_persona(client, seed="   ").status_code == 400
    assert balance(app, uid) == 20


def test_the_price_comes_from_the_config(database_url, app):
    client = build_example_app(database_url, PERSONA_COST=7).test_client()
    uid = signed_up(client)
    grant(app, uid, 10)
    assert make_persona(client).status_code == 200
    assert balance(app, uid) == 3


def test_the_same_seed_gives_the_same_persona():
    persona = generate_persona("lighthouse")
    assert persona == generate_persona("lighthouse")
    assert persona != generate_persona("lighthouses")
    assert 18 <= persona.age < 78
    assert persona.name.split()[0] in persona.bio


# -- signals ----------------------------------------------------------------------------------------


def test_low_balance_is_logged_and_shown(app, client, caplog):
    caplog.set_level(logging.INFO, logger="example_app")
    uid = signed_up(client)
    grant(app, uid, 14)

    page = make_persona(client).get_data(as_text=True)  # 9 left: below the threshold of 10
    assert f"low balance: wallet user {uid} has 9 credits left" in caplog.text
    assert "You have 9 credits left." in page

    # credits_low: once as the balance falls below the threshold, not on every debit under it.
    page = make_persona(client).get_data(as_text=True)  # 4 left
    assert "credits left." not in page
    assert caplog.text.count("low balance:") == 1
    make_persona(client)  # refused
    assert f"insufficient credits: wallet user {uid} needs 5, holds 4" in caplog.text

    grant(app, uid, 20)  # 24: above again, so the next fall warns again
    make_persona(client)  # 19
    make_persona(client)  # 14
    assert caplog.text.count("low balance:") == 1
    page = make_persona(client).get_data(as_text=True)  # 9
    assert caplog.text.count("low balance:") == 2
    assert "You have 9 credits left." in page


def test_the_low_balance_threshold_is_flask_credits_low_balance(empty_database):
    assert build_example_app(empty_database).config["CREDITS_LOW_BALANCE"] == 10
    app = build_example_app(empty_database, LOW_BALANCE_THRESHOLD=50)
    assert app.config["CREDITS_LOW_BALANCE"] == 50
    with app.app_context():
        assert app.extensions["credits"].settings.low_balance == 50


def test_the_example_sells_packs_that_auto_top_up_can_buy(empty_database):
    app = build_example_app(empty_database)
    with app.app_context():
        packs = app.extensions["credits"].settings.packs
    assert [(p.id, p.credits, p.amount) for p in packs] == [("small", 500, 500), ("large", 2000, 1800)]


# -- API keys ---------------------------------------------------------------------------------------


def test_an_api_key_spends_from_its_own_wallet(app, client):
    uid = signed_up(client)
    grant(app, uid, 20)
    key_id, secret = create_key(client)
    assert key_id in client.get("/keys/").get_data(as_text=True)

    response = api_persona(client, secret)
    assert response.status_code == 402
    body = response.get_json()
    assert (body["error"], body["required"], body["balance"]) == ("insufficient_credits", 5, 0)
    assert body["purchase_url"] == "/credits/"

    result = grant(app, uid, 12, key_id)
    assert result.exit_code == 0, result.output
    response = api_persona(client, secret)
    assert response.status_code == 200
    assert response.get_json() == {
        "persona": generate_persona("lighthouse").to_dict(),
        "cost": 5,
        "balance": 7,
    }
    assert balance(app, uid, key_id) == 7
    assert balance(app, uid) == 20  # the user's own wallet is untouched
    response = client.get("/credits/balance", headers={"X-API-Key": secret})
    assert response.get_json() == {"user_id": uid, "key_id": key_id, "balance": 7, "held": 0}


def test_credits_bought_for_a_key_with_the_simulated_checkout_are_the_keys(app, client, caplog):
    caplog.set_level(logging.INFO, logger="example_app")
    uid = signed_up(client)
    key_id, secret = create_key(client)
    assert f"key-balance-{key_id}" in client.get("/credits/", headers=HTML).get_data(as_text=True)

    response = client.post("/credits/checkout", data={"quantity": "1", "key_id": key_id}, headers=HTML)
    assert response.status_code == 303
    assert client.post(response.headers["Location"], data={"action": "pay"}).status_code == 303
    assert balance(app, uid, key_id) == 100
    assert balance(app, uid) == 0
    assert f"purchase: wallet user {uid} key {key_id} bought 100 credits" in caplog.text
    assert api_persona(client, secret).status_code == 200


def test_one_idempotency_key_buys_one_persona_not_one_per_seed(app, client):
    """Issue 10's attack: a key wallet holding 5 credits, one Idempotency-Key, four seeds. Before, each
    request got 200 and a different persona for one debit; now the first runs, the rest get 422."""
    uid = signed_up(client)
    key_id, secret = create_key(client)
    grant(app, uid, 5, key_id)
    headers = {"X-API-Key": secret, "Idempotency-Key": "same"}
    first = client.post("/api/personas", json={"seed": "alpha"}, headers=headers)
    assert first.status_code == 200
    assert first.get_json()["persona"] == generate_persona("alpha").to_dict()
    for seed in ("bravo", "charlie", "delta"):
        response = client.post("/api/personas", json={"seed": seed}, headers=headers)
        assert response.status_code == 422
        assert response.get_json()["error"] == "idempotency_key_reused"
    again = client.post("/api/personas", json={"seed": "alpha"}, headers=headers)
    assert again.get_data() == first.get_data()
    assert again.headers["Idempotent-Replayed"] == "true"
    with app.app_context():
        kinds = [e.kind for e in credits.history(uid, key_id)]
    assert (kinds, balance(app, uid, key_id)) == (["spend", "grant"], 0)


def test_the_api_also_accepts_the_session(app, client):
    uid = signed_up(client)
    grant(app, uid, 5)
    response = client.post("/api/personas", json={"seed": "harbour"})
    assert response.status_code == 200
    assert response.get_json()["balance"] == 0
    assert balance(app, uid) == 0


def test_a_bad_api_request_costs_nothing(app, client):
    uid = signed_up(client)
    grant(app, uid, 5)
    assert client.post("/api/personas", json={"seed": ""}).status_code == 400
    assert client.post("/api/personas", json=["lighthouse"]).status_code == 400
    assert client.post("/api/personas", data={"seed": "lighthouse"}).status_code == 415
    assert balance(app, uid) == 5


def test_revoked_and_unknown_keys_get_401(app, client):
    uid = signed_up(client)
    grant(app, uid, 20)
    key_id, secret = create_key(client)
    grant(app, uid, 20, key_id)

    assert client.post(f"/keys/{key_id}/revoke", data={"confirm": "yes"}).status_code == 302
    assert "Revoked" in client.get("/keys/").get_data(as_text=True)
    for key in (secret, "sk_not-a-key", ""):
        response = api_persona(client, key)
        assert response.status_code == 401
        assert response.get_json()["error"] == "unauthorized"
    # The session is still logged in: a bad key is refused, not charged to the user instead (the
    # key's credits moved to the account when it was revoked).
    assert balance(app, uid) == 40
    assert balance(app, uid, key_id) == 0
    assert grant(app, uid, 5, key_id).exit_code != 0  # nor can it be topped up


def test_without_a_key_or_a_session_the_api_answers_401(client):
    response = api_persona(client, None)
    assert response.status_code == 401
    assert response.get_json()["error"] == "unauthorized"


def test_keys_belong_to_their_owner(app, client):
    sign_up(client)
    key_id, _ = create_key(client)
    client.post("/logout")
    bea = signed_up(client, "bea")

    assert client.post(f"/keys/{key_id}/revoke").status_code == 404
    assert key_id not in client.get("/keys/").get_data(as_text=True)
    result = grant(app, bea, 5, key_id)
    assert result.exit_code == 1
    assert f"key '{key_id}' is not one of user {bea}'s keys" in result.output


def test_pages_need_a_login(client):
    for path in ("/keys/", "/personas", "/credits/"):
        response = client.get(path, headers=HTML)
        assert response.status_code == 302, path
        assert response.headers["Location"].startswith("/login?next="), path


# -- CSRF -------------------------------------------------------------------------------------------


def test_forms_need_a_csrf_token_but_the_api_does_not(app, database_url):
    client = build_example_app(database_url, WTF_CSRF_ENABLED=True).test_client()
    form = {"username": "ada", "password": PASSWORD, "confirm": PASSWORD}

    assert client.post("/signup", data=form).status_code == 400
    form["csrf_token"] = csrf_token(client, "/signup")
    assert client.post("/signup", data=form).status_code == 302
    assert client.post("/keys/", data={"name": "no token"}).status_code == 400
    token = csrf_token(client, "/keys/")
    _, secret = new_key(client.post("/keys/", data={"name": "ci", "csrf_token": token}))

    # No token, yet past CSRF: all this request lacks is credits.
    assert api_persona(client, secret).status_code == 402


# -- the command line's USER ------------------------------------------------------------------------


def test_the_cli_finds_a_user_by_user_name_and_the_page_shows_the_id(app, client):
    user_id = signed_up(client, "ada")
    page = client.get("/credits/", headers=HTML).get_data(as_text=True)
    assert f'<p class="hint" data-testid="user-id">Your user id: {user_id}</p>' in page
    for typed, amount in (("ada", 5), ("Ada", 3), (user_id, 2)):
        result = grant(app, typed, amount)
        assert result.exit_code == 0, result.output
    assert balance(app, user_id) == 10
    unknown = grant(app, "nobody", 5)
    assert (unknown.exit_code, unknown.output.strip()) == (1, "Error: unknown user 'nobody'")


def test_the_cli_names_a_revoked_key_rather_than_an_unknown_user(app, client):
    user_id = signed_up(client, "ada")
    key_id, _ = create_key(client, "laptop")
    assert grant(app, "ada", 4, key_id).exit_code == 0
    assert client.post(f"/keys/{key_id}/revoke", data={"confirm": "yes"}).status_code == 302
    refused = grant(app, "ada", 4, key_id)
    assert refused.exit_code == 1
    assert (
        refused.output.strip()
        == f"Error: key '{key_id}' of user ada (id {user_id}) is revoked (or no longer theirs)"
    )
    assert (balance(app, user_id), balance(app, user_id, key_id)) == (4, 0)
    never, _ = create_key(client, "never-used")
    assert client.post(f"/keys/{never}/revoke").status_code == 302  # no credits: no question
    refused = grant(app, "ada", 4, never)
    assert refused.output.strip() == (
        f"Error: key '{never}' is not one of user ada (id {user_id})'s keys (or it is revoked)"
    )


# -- revoking a key that holds credits --------------------------------------------------------------


def test_revoking_a_key_with_credits_asks_first_then_moves_them_to_the_account_once(app, client):
    user_id = signed_up(client, "ada")
    key_id, secret = create_key(client, "laptop")
    assert grant(app, "ada", 30, key_id).exit_code == 0
    keys_page = client.get("/keys/").get_data(as_text=True)
    assert 'class="danger" aria-label="Revoke the key laptop"' in keys_page  # not the primary action

    asked = client.post(f"/keys/{key_id}/revoke")
    page = asked.get_data(as_text=True)
    assert asked.status_code == 200
    assert (
        f'Key <code>{key_id}</code> holds <strong data-testid="revoke-credits">30</strong> credits.' in page
    )
    assert "Revoke it and move them to your account?" in page
    with_key = {"X-API-Key": secret}
    assert client.get("/credits/balance", headers=with_key).status_code == 200  # asking revoked nothing
    assert balance(app, user_id, key_id) == 30

    done = client.post(f"/keys/{key_id}/revoke", data={"confirm": "yes"})
    assert done.status_code == 302
    keys_page = client.get("/keys/").get_data(as_text=True)
    assert "Moved 30 credits from it to your account." in keys_page
    assert (balance(app, user_id), balance(app, user_id, key_id)) == (30, 0)
    assert client.get("/credits/balance", headers=with_key).status_code == 401
    # A retried confirm moves nothing more, and the account's history says where they came from.
    assert client.post(f"/keys/{key_id}/revoke", data={"confirm": "yes"}).status_code == 302
    assert (balance(app, user_id), balance(app, user_id, key_id)) == (30, 0)
    with app.app_context():
        [moved] = [e for e in credits.history(user_id) if e.kind == "transfer"]
        assert (moved.amount, moved.metadata["from"]["key_id"]) == (30, key_id)
        out = credits.history(user_id, key_id)[0]
        assert (out.kind, out.amount, out.idempotency_key) == ("transfer", -30, f"revoke-{key_id}")
        assert credits.audit() == []


def test_a_revoked_keys_held_credits_stay_with_it_and_the_message_says_so(app, client):
    user_id = signed_up(client, "ada")
    key_id, _ = create_key(client, "laptop")
    assert grant(app, "ada", 30, key_id).exit_code == 0
    with app.app_context():
        credits.hold(user_id, 12, key_id=key_id, ttl=600, reason="running")
    page = client.post(f"/keys/{key_id}/revoke").get_data(as_text=True)
    assert 'holds <strong data-testid="revoke-credits">18</strong> credits' in page
    assert "The 12 credits reserved by its running" in page
    client.post(f"/keys/{key_id}/revoke", data={"confirm": "yes"})
    said = client.get("/keys/").get_data(as_text=True)
    assert (
        "Moved 18 credits from it to your account; 12 credits reserved by its running requests stay" in said
    )
    assert (balance(app, user_id), balance(app, user_id, key_id)) == (18, 0)
