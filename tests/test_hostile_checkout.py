"""Hostile input to ``POST /credits/checkout`` and its success page, on every backend: random forms and
JSON never give a 500, and Stripe is called, and a purchase row written, exactly when the input is
valid, and then for what the server decided; then named bad forms, JSON and success URLs.

The heavy fuzzing runs on SQLite; PostgreSQL and MariaDB get a smaller sample of the same strategies
(``helpers.py`` has the CREDITS_FUZZ_* knobs).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import (
    JSON_HEADERS,
    JSON_VALUES,
    MAX_QUANTITY,
    PACKS,
    Shop,
    fuzz_cases,
    newest_purchase,
    stripe_calls,
)
from hypothesis import given
from hypothesis import strategies as st

from flask_credits import testing

# -- fuzzing ------------------------------------------------------------------------------------------

QUANTITY_TEXT = st.one_of(
    st.integers(-5, MAX_QUANTITY + 5).map(str),
    st.sampled_from(
        ["", " 3 ", "+3", "3.0", "1e2", "0x10", "1_0", "\u0663", "\uff13", "99999999999999999999", "\x003"]
    ),
    st.text(max_size=12),
)


FIELD_TEXT = st.one_of(
    QUANTITY_TEXT,
    st.sampled_from(["starter", "bulk", "gold", "key-1", "key-2", "STARTER"]),
    st.text(max_size=20),
)


def expected_offer(data: dict[str, Any], user: str) -> tuple[int, int, str | None] | None:
    """What a checkout with ``data`` should sell, as ``(credits, amount, key_id)``, or None for 400.
    The rules of docs/stripe.md: ``pack`` (an id of CREDITS_PACKS) or ``quantity`` (a whole number
    from 1 to CREDITS_MAX_QUANTITY, as written by Python's int() of decimal digits), not both, and
    ``key_id`` only naming one of the user's keys. Anything else in the body is ignored."""
    key_id = data.get("key_id")
    if key_id not in (None, ""):
        if not isinstance(key_id, str) or (user, key_id) != ("alice", "key-1"):
            return None
    else:
        key_id = None
    pack, quantity = data.get("pack"), data.get("quantity")
    has_pack, has_quantity = pack not in (None, ""), quantity not in (None, "")
    if has_pack == has_quantity:
        return None
    if has_pack:
        spec = PACKS.get(pack) if isinstance(pack, str) else None
        return None if spec is None else (spec["credits"], spec["amount"], key_id)
    units: int | None = None
    if isinstance(quantity, int) and not isinstance(quantity, bool):
        units = quantity
    elif isinstance(quantity, str) and quantity.strip().isdecimal() and len(quantity.strip()) <= 9:
        units = int(quantity.strip())
    if units is None or not 1 <= units <= MAX_QUANTITY:
        return None
    return units * 100, units * 100, key_id


#: CREDITS_MAX_OPEN_PURCHASES (the default): unfinished checkouts one wallet may have.
CAP = 5


def unfinished(shop: Shop, user: str, key_id: str | None) -> int:
    """How many of the wallet's checkouts count against the cap."""
    t = shop.credits.tables
    with shop.db.engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(t.purchases.join(t.wallets, t.wallets.c.id == t.purchases.c.wallet_id))
                .where(
                    t.wallets.c.user_id == user,
                    t.wallets.c.key_id == (key_id or ""),
                    t.purchases.c.status.in_(["creating", "open"]),
                )
            ).scalar_one()
        )


def check_checkout(shop: Shop, user: str, data: Any, post: Callable[[], Any]) -> None:
    """Post a checkout with ``post()`` and check the answer against the rules: 400 for bad input;
    for good input 429 when the wallet already has CAP unfinished checkouts, else the sale."""
    expected = expected_offer(data, user) if isinstance(data, dict) else None
    waiting = unfinished(shop, user, expected[2]) if expected is not None else 0
    calls, rows_before = stripe_calls(shop), len(shop.state()["purchases"])
    response = post()
    rows = len(shop.state()["purchases"])
    if expected is None:
        assert response.status_code == 400, (data, response.status_code, response.get_data(as_text=True))
        assert stripe_calls(shop) == calls, data  # nothing reached Stripe
        assert rows == rows_before, data
    elif waiting >= CAP:
        assert response.status_code == 429, (data, response.get_data(as_text=True))
        assert int(response.headers["Retry-After"]) >= 1
        assert stripe_calls(shop) == calls
        assert rows == rows_before
    else:
        assert response.status_code in (200, 303), (data, response.get_data(as_text=True))
        assert stripe_calls(shop) == calls + 1
        assert rows == rows_before + 1
        credits, amount, key_id = expected
        assert newest_purchase(shop) == (credits, amount, user, key_id)


def test_random_checkout_forms_call_stripe_only_for_valid_input(shop, backend):
    form_keys = st.sampled_from(["quantity", "pack", "key_id", "credits", "amount", "price", "userId"])

    @fuzz_cases(backend, sqlite=300, server=40)
    @given(
        user=st.sampled_from(["alice", "bob"]),
        form=st.dictionaries(st.one_of(form_keys, st.text(max_size=8)), FIELD_TEXT, max_size=5),
        multipart=st.booleans(),
        accept=st.sampled_from([{}, JSON_HEADERS, {"Accept": "text/html"}]),
    )
    def checkout(user: str, form: dict[str, str], multipart: bool, accept: dict[str, str]) -> None:
        def post() -> Any:
            return shop.client(user).post(
                "/credits/checkout",
                data=form,
                headers=accept,
                content_type="multipart/form-data" if multipart else "application/x-www-form-urlencoded",
            )

        check_checkout(shop, user, form, post)

    checkout()


def test_random_checkout_json_calls_stripe_only_for_valid_input(shop, backend):
    values = st.one_of(FIELD_TEXT, JSON_VALUES, st.integers(-(10**12), 10**12), st.floats())
    body = st.one_of(
        st.dictionaries(
            st.sampled_from(["quantity", "pack", "key_id", "credits", "amount", "currency"]),
            values,
            max_size=4,
        ),
        JSON_VALUES,
    )

    @fuzz_cases(backend, sqlite=250, server=40)
    @given(
        user=st.sampled_from(["alice", "bob"]),
        data=body,
        raw=st.one_of(st.none(), st.binary(max_size=200)),
    )
    def checkout(user: str, data: Any, raw: bytes | None) -> None:
        payload = raw if raw is not None else json.dumps(data).encode()
        if raw is not None:
            try:
                data = json.loads(raw)
            except ValueError:
                data = None

        def post() -> Any:
            return shop.client(user).post(
                "/credits/checkout", data=payload, headers={"Content-Type": "application/json"}
            )

        check_checkout(shop, user, data, post)

    checkout()


# -- named bad inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"quantity": "-1"}, id="negative quantity"),
        pytest.param({"quantity": "0"}, id="zero quantity"),
        pytest.param({"quantity": str(MAX_QUANTITY + 1)}, id="one unit over the maximum"),
        pytest.param({"quantity": "1000000000000"}, id="huge quantity"),
        pytest.param({"quantity": "9" * 400}, id="a 400-digit quantity"),
        pytest.param({"quantity": "1.5"}, id="fractional quantity"),
        pytest.param({"quantity": "1e2"}, id="quantity in exponent notation"),
        pytest.param({"quantity": "0x10"}, id="hexadecimal quantity"),
        pytest.param({"quantity": "3 credits"}, id="quantity with words"),
        pytest.param({"quantity": "+3"}, id="quantity with a sign"),
        pytest.param({"pack": "gold"}, id="unknown pack"),
        pytest.param({"pack": "Starter"}, id="pack in the wrong case"),
        pytest.param({"pack": "starter", "quantity": "1"}, id="pack and quantity"),
        pytest.param({}, id="neither pack nor quantity"),
        pytest.param({"credits": "1000000", "amount": "1"}, id="credits and price without a product"),
        pytest.param({"quantity": "1", "key_id": "key-of-someone-else"}, id="another user's API key"),
    ],
)
def test_bad_checkout_forms_are_400_and_never_reach_stripe(shop, data):
    before = shop.state()
    response = shop.client("alice").post("/credits/checkout", data=data, headers=JSON_HEADERS)
    assert response.status_code == 400, response.json
    assert stripe_calls(shop) == 0
    assert shop.state() == before


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"quantity": -3}, id="JSON negative quantity"),
        pytest.param({"quantity": 0}, id="JSON zero quantity"),
        pytest.param({"quantity": 10**30}, id="JSON huge quantity"),
        pytest.param({"quantity": 2.5}, id="JSON fractional quantity"),
        pytest.param({"quantity": 2.0}, id="JSON float quantity"),
        pytest.param({"quantity": True}, id="JSON true as quantity"),
        pytest.param({"quantity": None, "pack": None}, id="JSON nulls"),
        pytest.param({"quantity": [1]}, id="JSON list as quantity"),
        pytest.param({"quantity": {"units": 1}}, id="JSON object as quantity"),
        pytest.param({"pack": ["starter"]}, id="JSON list as pack"),
        pytest.param({"quantity": 1, "key_id": 7}, id="JSON number as key id"),
        pytest.param([{"quantity": 1}], id="JSON array body"),
        pytest.param("quantity=1", id="JSON string body"),
    ],
)
def test_bad_checkout_json_is_400_and_never_reaches_stripe(shop, body):
    before = shop.state()
    response = shop.client("alice").post("/credits/checkout", json=body)
    assert response.status_code == 400, response.json
    assert stripe_calls(shop) == 0
    assert shop.state() == before


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"quantity": 1', id="truncated JSON"),
        pytest.param(b"\xff\xfe{}", id="JSON that is not UTF-8"),
        pytest.param(b'{"quantity": 1e400}', id="JSON number out of range"),
        pytest.param(b"[" * 30_000 + b"]" * 30_000, id="JSON nested thirty thousand deep"),
        pytest.param(b"[" * 60_000, id="JSON opened sixty thousand deep"),
        pytest.param(b'{"pack": ' + b"[" * 200 + b"]" * 200 + b"}", id="JSON pack nested two hundred deep"),
    ],
)
def test_malformed_checkout_json_is_400_and_never_reaches_stripe(shop, raw):
    before = shop.state()
    response = shop.client("alice").post(
        "/credits/checkout", data=raw, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    assert stripe_calls(shop) == 0
    assert shop.state() == before


def test_credits_and_prices_sent_by_the_client_are_ignored(shop):
    response = shop.client("alice").post(
        "/credits/checkout",
        json={"quantity": 1, "credits": 1000000, "amount": 1, "currency": "jpy", "price": "price_free"},
    )
    assert response.status_code == 200
    assert newest_purchase(shop) == (100, 100, "alice", None)


# -- the success page ------------------------------------------------------------------------------------


def test_a_forged_success_url_with_someone_elses_session_is_404_and_asks_stripe_nothing(shop):
    response = shop.client("bob").get(f"/credits/success?session_id={shop.paid_session}")
    assert response.status_code == 404
    assert stripe_calls(shop, "GET") == 0
    assert shop.credits.balance("bob") == 0


def test_a_success_url_with_an_unpaid_session_credits_nothing(shop):
    with shop.app.app_context():
        session = testing.session_for(shop.open_session, payment_status="unpaid", status="open")
    testing.mock_retrieve_session(shop.stripe, session)
    response = shop.client("bob").get(
        f"/credits/success?session_id={shop.open_session}", headers=JSON_HEADERS
    )
    assert response.status_code == 200
    assert (response.json["purchase"]["status"], response.json["balance"]) == ("open", 0)
    assert shop.credits.balance("bob") == 0


@pytest.mark.parametrize(
    ("query", "status"),
    [
        pytest.param("session_id=cs_test_never_created", 404, id="a session this app never created"),
        pytest.param("", 400, id="no session id"),
        pytest.param("session_id=", 400, id="an empty session id"),
        pytest.param("session_id=" + "c" * 256, 400, id="a 256-character session id"),
        pytest.param("session_id=cs_test_%00abc", 404, id="a NUL byte in the session id"),
        pytest.param("session_id=%27%20OR%201%3D1%20--", 404, id="SQL in the session id"),
    ],
)
def test_forged_success_urls_are_refused_and_ask_stripe_nothing(shop, query, status):
    before = shop.state()
    response = shop.client("bob").get(f"/credits/success?{query}")
    assert response.status_code == status
    assert stripe_calls(shop, "GET") == 0
    assert shop.state() == before
