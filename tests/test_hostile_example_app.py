"""Hostile input to the example app, on every backend: forms without their CSRF token, anonymous
requests, API keys used against other wallets, revoked or made-up keys, NUL bytes, bodies past its
limits and JSON nested too deep: refused, never a 500, and nothing charged or written."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import (
    BODY_LIMIT,
    CHECKOUT,
    CHUNK,
    FORM,
    LIMIT,
    PASSWORD,
    TOO_LARGE,
    WEBHOOK,
    Counted,
    Padded,
    balance,
    build_example_app,
    clear,
    create_key,
    grant,
    send,
    signed_up,
)

EXAMPLE_LIMIT = 1024 * 1024  # the example app's MAX_CONTENT_LENGTH


@pytest.fixture(scope="module")
def example_apps(database_url) -> Iterator[dict[bool, Any]]:
    """The example app (simulated Stripe) on this backend, with CSRF protection off and on; built once
    per module, as the tables are."""
    from example_app.models import db

    apps = {csrf: build_example_app(database_url, WTF_CSRF_ENABLED=csrf) for csrf in (False, True)}
    with apps[False].app_context():
        db.create_all()
    yield apps
    for app in apps.values():
        with app.app_context():
            clear(db)
            db.engine.dispose()


@pytest.fixture
def example(example_apps) -> Callable[..., Any]:
    """``example(csrf=False)``: the example app with its tables empty and no login attempts counted."""
    from example_app.extensions import limiter
    from example_app.models import db

    with example_apps[False].app_context():
        clear(db)
        limiter.reset()

    def app(*, csrf: bool = False) -> Any:
        return example_apps[csrf]

    return app


def purchase_count(app: Any) -> int:
    from example_app.extensions import credits
    from example_app.models import db

    with app.app_context(), db.engine.connect() as conn:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(credits.tables.purchases)).scalar_one()
        )


def row_counts(app: Any) -> dict[str, int]:
    """How many rows each table of the example app holds (its own and the credits tables)."""
    from example_app.models import db

    with app.app_context(), db.engine.connect() as conn:
        return {
            table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in db.metadata.sorted_tables
        }


@pytest.mark.parametrize(
    ("path", "data"),
    [
        pytest.param("/credits/checkout", {"quantity": "1"}, id="buying credits"),
        pytest.param("/personas", {"seed": "lighthouse"}, id="spending credits"),
        pytest.param("/keys/", {"name": "sneaky"}, id="creating an API key"),
    ],
)
def test_a_form_post_without_the_csrf_token_is_400_and_changes_nothing(example, path, data):
    app = example(csrf=True)
    client = app.test_client()
    user = signed_up(client, "ada")
    grant(app, user, 20)
    response = client.post(path, data=data, headers={"Accept": "text/html"})
    assert response.status_code == 400
    forged = client.post(path, data={**data, "csrf_token": "forged"}, headers={"Accept": "text/html"})
    assert forged.status_code == 400
    assert (balance(app, user), purchase_count(app)) == (20, 0)
    assert "sneaky" not in client.get("/keys/").get_data(as_text=True)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("post", "/credits/checkout", id="checkout"),
        pytest.param("get", "/credits/balance", id="balance"),
        pytest.param("get", "/credits/transactions", id="transactions"),
        pytest.param("get", "/credits/", id="credits page"),
        pytest.param("post", "/api/personas", id="API persona"),
    ],
)
def test_anonymous_example_app_requests_are_turned_away(example, method, path):
    app = example()
    client = app.test_client()
    page = getattr(client, method)(path, headers={"Accept": "text/html"}, data={"quantity": "1"})
    assert page.status_code in (302, 401)
    if page.status_code == 302:
        assert page.headers["Location"].startswith("/login?next=")
    api = getattr(client, method)(path, json={"quantity": 1, "seed": "x"})
    assert api.status_code == 401
    assert purchase_count(app) == 0


def test_an_api_key_spends_only_from_its_own_wallet(example):
    app = example()
    alice, bob = app.test_client(), app.test_client()
    alice_id, bob_id = signed_up(alice, "alice"), signed_up(bob, "bob")
    bob_key, bob_secret = create_key(bob)
    grant(app, alice_id, 50)
    grant(app, bob_id, 50)
    grant(app, bob_id, 5, bob_key)

    # Alice, logged in, sends bob's key: it spends bob's key's credits, never her own nor bob's own.
    response = alice.post("/api/personas", json={"seed": "x"}, headers={"X-API-Key": bob_secret})
    assert response.status_code == 200
    assert (balance(app, alice_id), balance(app, bob_id), balance(app, bob_id, bob_key)) == (50, 50, 0)
    # The key's wallet is empty now: 402, and nothing falls back to the session's or the owner's wallet.
    response = alice.post("/api/personas", json={"seed": "x"}, headers={"X-API-Key": bob_secret})
    assert response.status_code == 402
    assert (balance(app, alice_id), balance(app, bob_id)) == (50, 50)
    # A key's public id is not its secret, and alice cannot buy credits for bob's key.
    response = alice.post("/api/personas", json={"seed": "x"}, headers={"X-API-Key": bob_key})
    assert response.status_code == 401
    response = alice.post("/credits/checkout", json={"quantity": 1, "key_id": bob_key})
    assert response.status_code == 400
    assert purchase_count(app) == 0


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("revoked", id="revoked key"),
        pytest.param("sk_" + "A" * 43, id="unknown key"),
        pytest.param("", id="empty key"),
        pytest.param("' OR '1'='1", id="SQL as key"),
        pytest.param("x" * 10_000, id="ten-thousand-character key"),
    ],
)
def test_a_revoked_or_unknown_api_key_is_401_even_with_a_session(example, key):
    app = example()
    client = app.test_client()
    user = signed_up(client, "ada")
    key_id, secret = create_key(client)
    grant(app, user, 20)
    grant(app, user, 20, key_id)
    revoked = key == "revoked"
    if revoked:  # confirmed: its 20 credits move to the account
        assert client.post(f"/keys/{key_id}/revoke", data={"confirm": "yes"}).status_code == 302
        key = secret
    for method, path in (
        ("post", "/api/personas"),
        ("get", "/credits/balance"),
        ("post", "/credits/checkout"),
    ):
        response = getattr(client, method)(
            path, json={"seed": "x", "quantity": 1}, headers={"X-API-Key": key}
        )
        assert response.status_code == 401, path
    expected = (40, 0) if revoked else (20, 20)
    assert (balance(app, user), balance(app, user, key_id), purchase_count(app)) == (*expected, 0)


@pytest.mark.parametrize(
    ("method", "path", "data", "logged_in"),
    [
        pytest.param("post", "/keys/", {"name": "laptop\x00"}, True, id="a NUL byte in an API key's name"),
        pytest.param(
            "post",
            "/login",
            {"username": "ada\x00", "password": PASSWORD},
            False,
            id="a NUL byte in a username",
        ),
        pytest.param(
            "post", "/personas", {"seed": "light\x00house"}, True, id="a NUL byte in a persona seed"
        ),
        pytest.param("post", "/keys/key_%00/revoke", None, True, id="a NUL byte in the key to revoke"),
        pytest.param(
            "get", "/credits/simulated-checkout/cs_%00", None, True, id="a NUL byte in a simulated checkout"
        ),
    ],
)
def test_a_nul_byte_from_a_user_is_refused_not_a_500(example, method, path, data, logged_in):
    """PostgreSQL refuses NUL in text, so a NUL that reaches a query becomes a 500 there."""
    app = example()
    client = app.test_client()
    signed_up(client, "ada")
    if not logged_in:
        client.post("/logout")
    response = getattr(client, method)(path, data=data, headers={"Accept": "text/html"})
    assert response.status_code in (200, 400, 402, 404), response.status_code  # 402: no credits yet
    assert purchase_count(app) == 0


SIGNUP = f"username=mallory&password={PASSWORD}&confirm={PASSWORD}&padding=".replace(" ", "+").encode()


@pytest.mark.parametrize(
    ("path", "content_type", "prefix", "filler", "limit", "csrf"),
    [
        pytest.param(
            "/api/personas",
            "application/json",
            b'{"seed": "lighthouse"}',
            b" ",
            EXAMPLE_LIMIT,
            False,
            id="the JSON API, valid if cut",
        ),
        pytest.param(
            "/personas", FORM, b"seed=lighthouse&padding=", b"x", EXAMPLE_LIMIT, False, id="the persona form"
        ),
        pytest.param("/signup", FORM, SIGNUP, b"x", EXAMPLE_LIMIT, False, id="signing up"),
        pytest.param("/keys/", FORM, b"name=sneaky&padding=", b"x", EXAMPLE_LIMIT, False, id="a new API key"),
        pytest.param(
            CHECKOUT,
            FORM,
            b"quantity=1&padding=",
            b"x",
            BODY_LIMIT,
            True,
            id="buying credits: the blueprint's limit comes before CSRFProtect reads the form",
        ),
        pytest.param(WEBHOOK, "application/json", b"{", b" ", LIMIT, True, id="the webhook"),
        pytest.param(
            "/credits/simulated-checkout/cs_test_x",
            FORM,
            b"action=pay&padding=",
            b"x",
            BODY_LIMIT,
            False,
            id="paying on the simulated checkout",
        ),
    ],
)
@pytest.mark.parametrize("sent", ["chunked", "with Content-Length"])
def test_a_body_over_the_example_apps_limits_is_413_and_changes_nothing(
    example, path, content_type, prefix, filler, limit, csrf, sent
):
    """Every route of the example app reads at most ``MAX_CONTENT_LENGTH`` (1 MiB) + 1 bytes, the
    credits routes at most their own smaller limit + 1, and answers 413 past it."""
    app = example(csrf=csrf)
    client = app.test_client()
    user = signed_up(client, "ada")
    grant(app, user, 20)
    before = row_counts(app)
    size = 200 * 1024 * 1024 if sent == "chunked" else limit + 1
    body = Counted(Padded(size, prefix, filler))
    response = send(client, path, body, {"Content-Type": content_type}, None if sent == "chunked" else size)
    assert response.status_code == 413
    if content_type == "application/json":
        assert response.json == TOO_LARGE
    if sent == "chunked":
        assert limit < body.pulled <= limit + 1 + CHUNK
    else:
        assert body.pulled == 0
    assert row_counts(app) == before
    assert balance(app, user) == 20


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"[" * 100_000, id="[ a hundred thousand times"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="a list nested a hundred thousand deep"),
        pytest.param(
            b'{"seed": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", id="a seed nested fifty thousand deep"
        ),
        pytest.param(
            b'{"seed": "x", "more": ' + b'{"a": ' * 20_000 + b"1" + b"}" * 20_001, id="deep objects"
        ),
    ],
)
def test_deep_json_to_the_example_api_is_400_and_charges_nothing(example, raw):
    """Too deep for Python's parser: 400 like any malformed JSON, not a RecursionError (500)."""
    app = example()
    client = app.test_client()
    user = signed_up(client, "ada")
    grant(app, user, 20)
    before = row_counts(app)
    response = client.post("/api/personas", data=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    assert response.json["error"] == "invalid_seed"
    assert row_counts(app) == before
    assert balance(app, user) == 20
