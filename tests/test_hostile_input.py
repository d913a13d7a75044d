"""Hostile and malformed input, on every backend.

1. The webhook fuzzed with random bodies and headers, valid deliveries mutated byte by byte, valid
   signatures over garbage, signatures made with wrong secrets or stale timestamps, and signed
   event-shaped garbage: never a 500, and without a valid signature nothing at all changes.
2. ``POST /credits/checkout`` fuzzed with random forms and JSON: never a 500; Stripe is called, and a
   purchase row written, exactly when the input is valid, and then for what the server decided.
3. A table of named bad inputs, each its own case, with the answer expected.
4. Secrets never appear in logs or error pages, whatever fails.

The heavy fuzzing runs on SQLite; PostgreSQL and MariaDB get a smaller sample of the same strategies.
Runs are derandomized, so failures reproduce. ``CREDITS_FUZZ_SCALE=10`` runs ten times as many cases;
``CREDITS_FUZZ_RANDOM=1`` explores new ones on each run; ``CREDITS_FUZZ_SHRINK=1`` shrinks failures.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
import responses
import sqlalchemy as sa
from _browser_server import live_server
from conftest import clear, make_app
from flask import g
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from flask_credits import testing

SCALE = float(os.environ.get("CREDITS_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("CREDITS_FUZZ_RANDOM") == "1"
# Shrinking a failure to its smallest form can take a minute here; the table below names the minimal
# inputs anyway. CREDITS_FUZZ_SHRINK=1 turns it on.
PHASES = tuple(Phase) if os.environ.get("CREDITS_FUZZ_SHRINK") == "1" else (Phase.reuse, Phase.generate)

WHSEC = "whsec_hostile_3f9d2b7c1e5a4d6f8b0c"
SECRET_KEY = "sk_test_hostile_7Kq2Xw9Lm4Np8Rt3Vy6Zb1Cd"
PACKS = {"starter": {"credits": 500, "amount": 400}, "bulk": {"credits": 5000, "amount": 3000}}
MAX_QUANTITY = 100
LIMIT = 256 * 1024  # CREDITS_WEBHOOK_MAX_BYTES
BODY_LIMIT = 64 * 1024  # CREDITS_MAX_CONTENT_LENGTH
EXAMPLE_LIMIT = 1024 * 1024  # the example app's MAX_CONTENT_LENGTH
CHUNK = 64 * 1024  # the most a WSGI server hands the app in one read, in these tests
WEBHOOK = "/credits/stripe-webhook"
CHECKOUT = "/credits/checkout"
JSON_HEADERS = {"Accept": "application/json"}


def cases(backend: str, sqlite: int, server: int) -> settings:
    """Hypothesis settings: ``sqlite`` examples there, ``server`` on PostgreSQL and MariaDB."""
    return settings(
        max_examples=max(1, int((sqlite if backend == "sqlite" else server) * SCALE)),
        deadline=None,
        derandomize=not RANDOM,
        database=None,
        print_blob=True,
        phases=PHASES,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )


def fresh_user_per_request(app: Any) -> None:
    """The shop's fixture holds an app context, which every test request then shares (and so one
    ``g``): Flask-Login would keep the first user it loaded for every client. Load it per request."""

    @app.before_request
    def load_the_user_of_this_request() -> None:
        g.pop("_login_user", None)


def stripe_signature(payload: str, secret: str = WHSEC, timestamp: int | None = None) -> str:
    return testing.sign(payload, secret, timestamp)


# -- the shop: a conftest app with one paid and one open purchase ----------------------------------------


@dataclass
class Shop:
    app: Any
    db: Any
    credits: Any
    stripe: responses.RequestsMock
    paid_session: str = ""
    paid_intent: str = ""
    open_session: str = ""
    open_payload: str = ""  # a valid checkout.session.completed delivery for the open purchase
    paid_event: dict[str, Any] = field(default_factory=dict)  # the delivery that credited alice
    clients: dict[str | None, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)  # the state right after reset()

    def client(self, user: str | None = None) -> Any:
        """A test client logged in as ``user`` (anonymous for None), one per user."""
        if user not in self.clients:
            self.clients[user] = self.app.test_client()
            if user is not None:
                assert self.clients[user].post(f"/_login/{user}").status_code == 200
        return self.clients[user]

    def reset(self) -> None:
        """Empty tables, then alice's paid purchase of 200 credits and bob's open one of 100."""
        clear(self.db)
        self.clients.clear()
        paid = self.checkout("alice", {"quantity": 2})
        self.paid_intent = "pi_hostile_paid"
        with self.app.app_context():
            session = testing.session_for(paid, payment_intent=self.paid_intent)
        self.paid_event = testing.event("checkout.session.completed", session)
        assert testing.post_event(self.client(), self.paid_event).json["outcome"] == "fulfilled"
        self.paid_session = paid
        self.open_session = self.checkout("bob", {"quantity": 1})
        with self.app.app_context():
            session = testing.session_for(self.open_session)
        self.open_payload = json.dumps(testing.event("checkout.session.completed", session))
        self.baseline = self.state()

    def checkout(self, user: str, body: dict[str, Any]) -> str:
        response = self.client(user).post("/credits/checkout", json=body)
        assert response.status_code == 200, response.json
        return str(response.json["id"])

    def state(self) -> dict[str, Any]:
        """Everything a delivery could change: wallets, and how many rows each table holds."""
        t = self.credits.tables
        with self.db.engine.connect() as conn:
            wallets = {
                (r.user_id, r.key_id): (r.balance, r.debt)
                for r in conn.execute(
                    sa.select(t.wallets.c.user_id, t.wallets.c.key_id, t.wallets.c.balance, t.wallets.c.debt)
                )
            }
            purchases = {
                r.session_id: (r.status, r.refund_revoked, r.dispute_revoked)
                for r in conn.execute(sa.select(t.purchases))
            }
            counts = {
                name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
                for name, table in (
                    ("events", t.stripe_events),
                    ("entries", t.entries),
                    ("lots", t.lots),
                    ("draws", t.draws),
                )
            }
        return {"wallets": wallets, "purchases": purchases, **counts}

    def post(self, body: bytes | str, headers: dict[str, str]) -> Any:
        return self.client().post(WEBHOOK, data=body, headers=headers)


@pytest.fixture(scope="module")
def shop_per_backend(database_url) -> Iterator[Shop]:
    """One app per backend for the whole module (building one per test would take most of its time)."""
    app, db, credits = make_app(
        database_url,
        STRIPE_SECRET_KEY=SECRET_KEY,
        STRIPE_WEBHOOK_SECRET=WHSEC,
        CREDITS_STRIPE_MAX_RETRIES=0,
        CREDITS_PACKS=PACKS,
        CREDITS_MAX_QUANTITY=MAX_QUANTITY,
    )
    fresh_user_per_request(app)

    @credits.wallet_checker
    def owns(user_id: str, key_id: str | None) -> bool:
        return (user_id, key_id) in {("alice", None), ("bob", None), ("alice", "key-1")}

    @app.get("/_boom")
    def boom() -> str:
        return str({}["missing"])  # a view that fails

    with app.app_context(), responses.RequestsMock(assert_all_requests_are_fired=False) as stripe:
        db.create_all()
        testing.mock_create_session(stripe)  # a new open session for each checkout
        # A payment intent Stripe knows nothing about (refunds and disputes look it up).
        stripe.add(
            responses.GET,
            f"{testing.STRIPE_API}/v1/checkout/sessions",
            json={"object": "list", "data": [], "has_more": False},
        )
        found = Shop(app, db, credits, stripe)
        try:
            yield found
        finally:
            clear(db)
            db.engine.dispose()


@pytest.fixture
def shop(shop_per_backend) -> Iterator[Shop]:
    """The shop as ``Shop.reset`` leaves it (reset again only if the last test changed it), with
    Stripe's call log empty, no purchase checked at Stripe lately, and the app's config restored
    afterwards."""
    found = shop_per_backend
    if not found.baseline or found.state() != found.baseline:
        found.reset()
    with found.db.engine.begin() as conn:  # so that the success page may ask Stripe in every test
        conn.execute(sa.update(found.credits.tables.purchases).values(checked_at=None))
    found.stripe.calls.reset()
    config = dict(found.app.config)
    yield found
    found.app.config.clear()
    found.app.config.update(config)


def stripe_calls(shop: Shop, method: str = "POST") -> int:
    return len([c for c in shop.stripe.calls if c.request.method == method])


# -- 1. fuzzing the webhook -------------------------------------------------------------------------------

LATIN1 = st.characters(min_codepoint=0x20, max_codepoint=0xFF)  # what an HTTP header can carry
HEX = st.text("0123456789abcdef", min_size=0, max_size=70)


def signature_headers(now: int) -> st.SearchStrategy[str]:
    """Stripe-Signature headers: free text, and ``t=...,v1=...`` lists with any number of entries."""
    timestamp = st.one_of(
        st.integers(now - 10**6, now + 10**6).map(str), st.text(LATIN1, max_size=12), st.just(str(now))
    )
    entry = st.one_of(
        st.tuples(st.just("t"), timestamp),
        st.tuples(
            st.sampled_from(["v1", "v0", "v2", "V1", " v1", "v1 "]),
            st.one_of(HEX, st.text(LATIN1, max_size=70)),
        ),
        st.tuples(st.text(LATIN1, max_size=4), st.text(LATIN1, max_size=20)),
    )
    listed = st.lists(entry, max_size=40).map(lambda items: ",".join(f"{k}={v}" for k, v in items))
    return st.one_of(listed, st.text(LATIN1, max_size=200))


def test_random_bodies_and_headers_are_refused_and_change_nothing(shop, backend):
    before = shop.state()
    now = int(time.time())
    content_types = st.sampled_from(
        ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""]
    )

    @cases(backend, sqlite=600, server=60)
    @given(
        body=st.one_of(st.binary(max_size=3000), st.text(max_size=1000)),
        signature=st.one_of(st.none(), signature_headers(now)),
        content_type=content_types,
    )
    def delivery(body: bytes | str, signature: str | None, content_type: str) -> None:
        headers = {"Content-Type": content_type} if content_type else {}
        if signature is not None:
            headers["Stripe-Signature"] = signature
        response = shop.post(body, headers)
        assert response.status_code == 400, response.get_data(as_text=True)
        assert shop.state() == before

    delivery()


def flip(data: bytes, index: int) -> bytes:
    index %= len(data)
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


BODY_MUTATIONS: dict[str, Callable[[bytes, int, bytes], bytes]] = {
    "flip a bit": lambda body, i, extra: flip(body, i),
    "truncate": lambda body, i, extra: body[: i % len(body)],
    "insert bytes": lambda body, i, extra: body[: i % len(body)] + (extra or b" ") + body[i % len(body) :],
    "delete a slice": lambda body, i, extra: body[: i % len(body)] + body[i % len(body) + 1 + len(extra) :],
    "append whitespace": lambda body, i, extra: body + b"\n",
    "prepend a BOM": lambda body, i, extra: b"\xef\xbb\xbf" + body,
    "re-serialise": lambda body, i, extra: json.dumps(
        json.loads(body), indent=i % 4 or None, sort_keys=True
    ).encode(),
    "double the credits": lambda body, i, extra: body.replace(b'"amount_total": 100', b'"amount_total": 200'),
    "another user": lambda body, i, extra: body.replace(b'"userId": "bob"', b'"userId": "alice"'),
    "paid -> no_payment_required": lambda body, i, extra: body.replace(b'"paid"', b'"no_payment_required"'),
    "unchanged": lambda body, i, extra: body,
}


def header_mutations(payload: str, now: int) -> dict[str, Callable[[str, int, bytes], str]]:
    """Ways to break a valid Stripe-Signature for ``payload``; none leaves a valid signature."""

    def valid(timestamp: int) -> str:
        return stripe_signature(payload, WHSEC, timestamp)

    def v1(header: str) -> str:
        return header.split("v1=", 1)[1]

    return {
        "unchanged": lambda header, i, extra: header,
        "flip a hex digit": lambda header, i, extra: header[:-1] + ("0" if header[-1] != "0" else "1"),
        "another timestamp": lambda header, i, extra: f"t={now + 1 + i % 200},v1={v1(header)}",
        "too old, validly signed": lambda header, i, extra: valid(int(time.time()) - 302 - i),
        "from the future, validly signed": lambda header, i, extra: valid(int(time.time()) + 302 + i),
        "wrong secret": lambda header, i, extra: stripe_signature(payload, "whsec_" + extra.hex(), now),
        "the API key as secret": lambda header, i, extra: stripe_signature(payload, SECRET_KEY, now),
        "scheme v0": lambda header, i, extra: header.replace("v1=", "v0="),
        "no timestamp": lambda header, i, extra: f"v1={v1(header)}",
        "no signature": lambda header, i, extra: f"t={now}",
        "many wrong v1": lambda header, i, extra: (
            f"t={now},"
            + ",".join(f"v1={hashlib.sha256(extra + bytes([n])).hexdigest()}" for n in range(i % 50 + 1))
        ),
        "uppercase signature": lambda header, i, extra: header.upper(),
        "signature of the empty body": lambda header, i, extra: stripe_signature("", WHSEC, now),
    }


def test_mutated_valid_deliveries_are_refused_and_change_nothing(shop, backend):
    """Start from a delivery that would credit bob 100, change the body or the signature in one of
    many ways (never leaving both valid), and check nothing moves."""
    before = shop.state()
    now = int(time.time())
    original = shop.open_payload.encode()
    header = stripe_signature(shop.open_payload, WHSEC, now)
    headers = header_mutations(shop.open_payload, now)

    @cases(backend, sqlite=600, server=80)
    @given(
        body_change=st.sampled_from(sorted(BODY_MUTATIONS)),
        header_change=st.sampled_from(sorted(headers)),
        where=st.integers(0, 10**6),
        extra=st.binary(min_size=1, max_size=16),
    )
    def delivery(body_change: str, header_change: str, where: int, extra: bytes) -> None:
        body = BODY_MUTATIONS[body_change](original, where, extra)
        signature = headers[header_change](header, where, extra)
        assume(body != original or signature != header)  # the one valid combination
        response = shop.post(body, {"Stripe-Signature": signature, "Content-Type": "application/json"})
        assert response.status_code == 400, (body_change, header_change, response.get_data(as_text=True))
        assert shop.state() == before

    delivery()


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=15,
)


def is_stripe_event(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and value.get("object") == "event"
        and isinstance(value.get("id"), str)
        and isinstance(value.get("type"), str)
        and isinstance(value.get("data"), dict)
        and isinstance(value["data"].get("object"), dict)
    )


def near_events() -> st.SearchStrategy[dict[str, Any]]:
    """Stripe events with one part missing or of the wrong type."""
    whole = {
        "id": "evt_near",
        "object": "event",
        "type": "checkout.session.completed",
        "data": {"object": {"id": "cs_x"}},
    }
    return st.sampled_from(["id", "object", "type", "data", "data.object"]).flatmap(
        lambda part: JSON_VALUES.map(lambda value: _replace(whole, part, value))
    )


def _replace(event: dict[str, Any], part: str, value: Any) -> dict[str, Any]:
    copy = json.loads(json.dumps(event))
    if part == "data.object":
        copy["data"]["object"] = value
    else:
        copy[part] = value
    return copy


def test_valid_signatures_over_garbage_are_refused_and_change_nothing(shop, backend):
    before = shop.state()
    garbage = st.one_of(
        st.text(max_size=500),
        JSON_VALUES.map(json.dumps),
        near_events().map(json.dumps),
        st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
    )

    @cases(backend, sqlite=300, server=40)
    @given(payload=garbage, secret=st.sampled_from([WHSEC, WHSEC, "whsec_rotated_elsewhere"]))
    def delivery(payload: str, secret: str) -> None:
        with contextlib.suppress(ValueError):  # not JSON at all: garbage indeed
            assume(not is_stripe_event(json.loads(payload)))
        response = shop.post(payload.encode(), {"Stripe-Signature": stripe_signature(payload, secret)})
        assert response.status_code == 400, response.get_data(as_text=True)
        assert shop.state() == before

    delivery()


HANDLED = [
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "checkout.session.expired",
    "charge.refunded",
    "charge.dispute.funds_withdrawn",
    "charge.dispute.funds_reinstated",
    "charge.dispute.closed",
]
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.lists(st.integers(), max_size=3),
)


#: Realistic objects naming the shop's purchases ("$OPEN", "$PAID" and "$PI" become the current ids).
REALISTIC: dict[str, dict[str, Any]] = {
    "session": {
        "id": "$OPEN",
        "object": "checkout.session",
        "status": "complete",
        "payment_status": "paid",
        "amount_total": 100,
        "currency": "usd",
        "client_reference_id": None,
        "payment_intent": "pi_hostile_new",
        "metadata": {"userId": "bob", "credits": "100"},
    },
    "charge": {
        "id": "ch_hostile",
        "object": "charge",
        "payment_intent": "$PI",
        "amount": 200,
        "amount_refunded": 100,
        "currency": "usd",
    },
    "dispute": {
        "id": "dp_hostile",
        "object": "dispute",
        "payment_intent": "$PI",
        "amount": 200,
        "status": "lost",
    },
}
ALTERNATIVES = st.sampled_from(
    [
        *("$OPEN", "$PAID", "$PI", "cs_test_never_created", "pi_unknown", {"id": "$PI"}, "chk_" + "0" * 32),
        *("paid", "unpaid", "no_payment_required", "complete", "open", "expired"),
        *("won", "lost", "warning_closed", "usd", "USD", "eur", 0, 1, 100, 200, 10**12, -100),
    ]
)
DELETE = object()


def event_objects() -> st.SearchStrategy[dict[str, Any]]:
    """A realistic Checkout Session, Charge or Dispute with a few fields deleted, mistyped, or
    swapped for values that name other purchases."""
    fields = sorted({name for obj in REALISTIC.values() for name in obj})
    changes = st.dictionaries(
        st.sampled_from(fields), st.one_of(ALTERNATIVES, ANY_VALUE, st.just(DELETE)), max_size=3
    )

    def perturbed(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
        obj = {**base, **change}
        return {k: v for k, v in obj.items() if v is not DELETE}

    return st.builds(perturbed, st.sampled_from(list(REALISTIC.values())), changes)


def test_signed_event_shaped_garbage_never_breaks_the_ledger(shop, backend):
    """Validly signed events of every type with fields missing, mistyped or naming real purchases:
    the answer is 200 or 400 (an id or type no database column could take is refused before it gets
    there, rather than answered 503 on every retry), the audit stays clean, no balance goes negative
    or above what its wallet bought, and no purchase row appears from a webhook."""

    delivered: list[str] = []

    def pristine() -> bool:
        return sorted(shop.state()["purchases"].values()) == [("fulfilled", 0, 0), ("open", 0, 0)]

    def real(value: Any) -> Any:
        if isinstance(value, str):
            return {"$OPEN": shop.open_session, "$PAID": shop.paid_session, "$PI": shop.paid_intent}.get(
                value, value
            )
        if isinstance(value, dict):
            return {k: real(v) for k, v in value.items()}
        return value

    @cases(backend, sqlite=200, server=30)
    @given(
        event_type=st.one_of(st.sampled_from(HANDLED), st.sampled_from(HANDLED), st.text(max_size=40)),
        event_id=st.one_of(st.text(min_size=1, max_size=40).map(lambda s: "evt_" + s), st.text(max_size=300)),
        obj=event_objects(),
    )
    def delivery(event_type: str, event_id: str, obj: dict[str, Any]) -> None:
        if not pristine():
            shop.reset()  # keep the open purchase open and the paid one whole for each example
        before = shop.state()
        delivered.append(event_id)  # each example's event is new, whatever its id looks like
        event_id = f"{event_id}#{len(delivered)}"
        payload = json.dumps(testing.event(event_type, real(obj), event_id=event_id))
        response = shop.post(payload, {"Stripe-Signature": stripe_signature(payload)})
        assert response.status_code in (200, 400), response.get_data(as_text=True)
        after = shop.state()
        if response.status_code != 200:
            assert after == before
        assert shop.credits.audit() == []
        assert set(after["purchases"]) == set(before["purchases"])
        bought = {("alice", ""): 200, ("bob", ""): 100}
        for wallet, (balance, debt) in after["wallets"].items():
            assert 0 <= balance <= bought.get(wallet, 0), wallet
            assert debt >= 0

    delivery()


# -- 2. fuzzing the checkout ------------------------------------------------------------------------------

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


def newest_purchase(shop: Shop) -> tuple[Any, ...]:
    t = shop.credits.tables
    with shop.db.engine.connect() as conn:
        row = conn.execute(
            sa.select(t.purchases.c.credits, t.purchases.c.amount, t.wallets.c.user_id, t.wallets.c.key_id)
            .join(t.wallets, t.wallets.c.id == t.purchases.c.wallet_id)
            .order_by(t.purchases.c.id.desc())
            .limit(1)
        ).one()
    return row.credits, row.amount, row.user_id, row.key_id or None


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

    @cases(backend, sqlite=300, server=40)
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

    @cases(backend, sqlite=250, server=40)
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


# -- 3. named bad inputs ----------------------------------------------------------------------------------


def open_delivery(shop: Shop, **sign: Any) -> tuple[str, dict[str, str]]:
    return shop.open_payload, {"Stripe-Signature": stripe_signature(shop.open_payload, **sign)}


def nothing_changed(shop: Shop, before: dict[str, Any]) -> None:
    assert shop.state() == before
    assert shop.credits.balance("bob") == 0


def signed_delivery(shop: Shop, stripe_event: dict[str, Any]) -> Any:
    return testing.post_event(shop.client(), stripe_event)


def case_missing_signature(shop: Shop) -> Any:
    return shop.post(shop.open_payload, {})


def case_empty_signature(shop: Shop) -> Any:
    return shop.post(shop.open_payload, {"Stripe-Signature": ""})


def case_garbled_signature(shop: Shop) -> Any:
    return shop.post(shop.open_payload, {"Stripe-Signature": "t=yesterday;v1:deadbeef"})


def case_signature_301_seconds_old(shop: Shop) -> Any:
    return shop.post(*open_delivery(shop, timestamp=int(time.time()) - 301))


def case_signature_from_the_future(shop: Shop) -> Any:
    return shop.post(*open_delivery(shop, timestamp=int(time.time()) + 3600))


def case_wrong_secret(shop: Shop) -> Any:
    return shop.post(*open_delivery(shop, secret="whsec_someone_elses"))


def case_signed_with_the_api_key(shop: Shop) -> Any:
    return shop.post(*open_delivery(shop, secret=SECRET_KEY))


def case_reserialised_body(shop: Shop) -> Any:
    payload, headers = open_delivery(shop)
    return shop.post(json.dumps(json.loads(payload), indent=2), headers)


def case_body_changed_after_signing(shop: Shop) -> Any:
    payload, headers = open_delivery(shop)
    return shop.post(payload.replace('"amount_total": 100', '"amount_total": 10000'), headers)


def case_a_thousand_wrong_signatures(shop: Shop) -> Any:
    wrong = ",".join(f"v1={hashlib.sha256(bytes([n % 256, n // 256])).hexdigest()}" for n in range(1000))
    return shop.post(shop.open_payload, {"Stripe-Signature": f"t={int(time.time())},{wrong}"})


def case_non_ascii_signature(shop: Shop) -> Any:
    return shop.post(shop.open_payload, {"Stripe-Signature": f"t={int(time.time())},v1=\xe9t\xe9"})


def case_signed_body_that_is_not_utf8(shop: Shop) -> Any:
    return shop.post(b"\xff\xfe" + shop.open_payload.encode(), open_delivery(shop)[1])


@pytest.mark.parametrize(
    "deliver",
    [
        pytest.param(case_missing_signature, id="missing Stripe-Signature"),
        pytest.param(case_empty_signature, id="empty Stripe-Signature"),
        pytest.param(case_garbled_signature, id="garbled Stripe-Signature"),
        pytest.param(case_signature_301_seconds_old, id="signature older than the tolerance"),
        pytest.param(case_signature_from_the_future, id="signature from the future"),
        pytest.param(case_wrong_secret, id="signed with the wrong secret"),
        pytest.param(case_signed_with_the_api_key, id="signed with the API key instead of the secret"),
        pytest.param(case_reserialised_body, id="re-serialised body"),
        pytest.param(case_body_changed_after_signing, id="body changed after signing"),
        pytest.param(case_a_thousand_wrong_signatures, id="a thousand wrong v1 signatures"),
        pytest.param(case_non_ascii_signature, id="non-ASCII characters in the signature"),
        pytest.param(case_signed_body_that_is_not_utf8, id="body that is not UTF-8"),
    ],
)
def test_webhook_without_a_valid_signature_is_400_and_changes_nothing(shop, deliver):
    before = shop.state()
    response = deliver(shop)
    assert response.status_code == 400
    assert response.json["error"] == "bad_request"
    nothing_changed(shop, before)


# -- bodies past a route's limit


class Padded(io.RawIOBase):
    """A request body of ``size`` bytes, ``prefix`` then ``filler`` repeated, made up as it is read and
    handed out at most ``CHUNK`` bytes per read, as a WSGI server hands the app a chunked body."""

    def __init__(self, size: int, prefix: bytes = b"", filler: bytes = b" ") -> None:
        self.size, self.prefix, self.filler, self.position = size, prefix, filler, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), CHUNK, self.size - self.position)
        head = self.prefix[self.position : self.position + n]
        buffer[:n] = head + self.filler * (n - len(head))
        self.position += n
        return n


class Counted(io.RawIOBase):
    """A WSGI input that counts the bytes the app pulls from the stream it wraps."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.pulled = stream, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = int(self.stream.readinto(buffer) or 0)
        self.pulled += n
        return n


def send(client: Any, path: str, body: Counted, headers: dict[str, str], length: int | None = None) -> Any:
    """POST ``body`` chunked (as gunicorn and the dev server present it: no length, and
    ``wsgi.input_terminated``), or with the ``Content-Length`` given."""
    environ: dict[str, Any] = {"wsgi.input": body, "wsgi.input_terminated": True}
    if length is None:
        headers = {**headers, "Transfer-Encoding": "chunked"}
    else:
        environ["CONTENT_LENGTH"] = str(length)
    if "Content-Type" in headers:  # as given: the test client would make up its own multipart boundary
        environ["CONTENT_TYPE"] = headers["Content-Type"]
    return client.post(path, headers=headers, environ_overrides=environ)


TOO_LARGE = {"error": "bad_request", "message": "body too large"}
MULTIPART = "multipart/form-data; boundary=b"
MULTIPART_BODY = b'--b\r\nContent-Disposition: form-data; name="quantity"\r\n\r\n1\r\n--b\r\n'
MULTIPART_BODY += b'Content-Disposition: form-data; name="padding"\r\n\r\n'
FORM = "application/x-www-form-urlencoded"


@pytest.mark.parametrize(
    ("path", "content_type", "prefix", "filler", "answer"),
    [
        pytest.param(WEBHOOK, "application/json", b"{", b" ", "json", id="webhook JSON"),
        pytest.param(WEBHOOK, FORM, b"a=", b"x", "json", id="webhook form, answered in JSON all the same"),
        pytest.param(
            CHECKOUT, "application/json", b'{"quantity": 1}', b" ", "json", id="checkout JSON, valid if cut"
        ),
        pytest.param(CHECKOUT, FORM, b"quantity=1&padding=", b"x", "html", id="checkout form, valid if cut"),
        pytest.param(
            CHECKOUT, MULTIPART, MULTIPART_BODY, b"x", "html", id="checkout multipart, valid if cut"
        ),
        pytest.param(CHECKOUT, "application/json", b"", b"[", "json", id="checkout JSON of [ only"),
    ],
)
@pytest.mark.parametrize("sent", ["chunked", "with Content-Length"])
def test_a_body_over_a_routes_limit_is_413_and_never_read_past_it(
    shop, path, content_type, prefix, filler, answer, sent
):
    """Chunked: 200 MiB offered, at most one byte past the limit read (plus what the server hands out
    in one read), where Werkzeug alone would cut the body at the limit and parse what it had (a valid
    checkout here). With a Content-Length over the limit: 413 before a byte is read."""
    before = shop.state()
    limit = LIMIT if path == WEBHOOK else BODY_LIMIT
    size = 200 * 1024 * 1024 if sent == "chunked" else limit + 1
    body = Counted(Padded(size, prefix, filler))
    headers = {"Content-Type": content_type, "Stripe-Signature": stripe_signature("{}")}
    response = send(shop.client("alice"), path, body, headers, None if sent == "chunked" else size)
    assert response.status_code == 413
    if answer == "json":
        assert response.json == TOO_LARGE
    else:
        assert response.mimetype == "text/html"
        assert f"larger than the {limit} bytes" in response.get_data(as_text=True)
    if sent == "chunked":
        assert limit < body.pulled <= limit + 1 + CHUNK
    else:
        assert body.pulled == 0
    assert stripe_calls(shop) == 0
    nothing_changed(shop, before)


def test_a_client_claiming_more_than_the_webhook_limit_is_413_whatever_it_sends(shop):
    before = shop.state()
    response = shop.client().post(
        WEBHOOK,
        input_stream=io.BytesIO(b"{}"),
        headers={"Stripe-Signature": stripe_signature("{}")},
        environ_overrides={"CONTENT_LENGTH": str(LIMIT + 1)},
    )
    assert (response.status_code, response.json) == (413, TOO_LARGE)
    nothing_changed(shop, before)


def test_a_checkout_of_exactly_the_body_limit_sent_chunked_is_read_whole_and_sold(shop):
    """The other side of the line: a body of exactly ``CREDITS_MAX_CONTENT_LENGTH`` bytes is not
    refused for the byte the server could not tell was missing."""
    body = Counted(Padded(BODY_LIMIT, b'{"quantity": 2}'))
    response = send(shop.client("alice"), CHECKOUT, body, {"Content-Type": "application/json"})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert body.pulled == BODY_LIMIT
    assert stripe_calls(shop) == 1
    assert newest_purchase(shop) == (200, 200, "alice", None)


def test_a_webhook_delivery_past_the_checkout_limit_is_read_whole_and_credited(shop):
    """The webhook reads up to its own ``CREDITS_WEBHOOK_MAX_BYTES``, not the blueprint's smaller
    ``CREDITS_MAX_CONTENT_LENGTH``: a signed delivery padded to exactly that many bytes is credited."""
    payload = shop.open_payload + " " * (LIMIT - len(shop.open_payload))
    body = Counted(Padded(LIMIT, payload.encode()))
    headers = {"Content-Type": "application/json", "Stripe-Signature": stripe_signature(payload)}
    response = send(shop.client(), WEBHOOK, body, headers)
    assert (response.status_code, response.json["outcome"]) == (200, "fulfilled")
    assert shop.credits.balance("bob") == 100


@pytest.mark.parametrize("path", [WEBHOOK, CHECKOUT])
def test_the_apps_max_content_length_caps_every_route_of_the_blueprint(shop, path):
    before = shop.state()
    shop.app.config["MAX_CONTENT_LENGTH"] = 1000
    body = Counted(Padded(10 * 1024 * 1024, b'{"quantity": 1}'))
    response = send(shop.client("alice"), path, body, {"Content-Type": "application/json"})
    assert (response.status_code, response.json) == (413, TOO_LARGE)
    assert body.pulled <= 1001 + CHUNK
    nothing_changed(shop, before)


def test_a_chunked_five_mib_webhook_body_through_a_real_server_is_413(shop):
    """Werkzeug's own server, on loopback, dechunking a real ``Transfer-Encoding: chunked`` body sent by
    http.client: 413, after the app pulled at most one byte past the limit from the server."""
    before = shop.state()
    inputs: list[Counted] = []
    app = shop.app.wsgi_app

    def counting(environ: dict[str, Any], start_response: Any) -> Any:
        inputs.append(Counted(environ["wsgi.input"]))
        environ["wsgi.input"] = inputs[-1]
        return app(environ, start_response)

    def five_mib() -> Iterator[bytes]:
        for _ in range(80):
            yield b" " * CHUNK

    shop.app.wsgi_app = counting  # type: ignore[method-assign]
    try:
        with live_server(shop.app) as url:
            connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
            try:
                # The server may stop reading once it has answered; the answer is still there to read.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    connection.request(
                        "POST", WEBHOOK, body=five_mib(), headers={"Content-Type": "application/json"}
                    )
                response = connection.getresponse()
                status, answer = response.status, json.loads(response.read())
            finally:
                connection.close()
    finally:
        shop.app.wsgi_app = app  # type: ignore[method-assign]
    assert (status, answer) == (413, TOO_LARGE)
    assert len(inputs) == 1
    assert LIMIT < inputs[0].pulled <= LIMIT + 1 + CHUNK
    nothing_changed(shop, before)


def test_several_signatures_with_one_valid_among_them_are_accepted(shop):
    """The control case: Stripe sends several v1 signatures while a secret is rotated."""
    payload, headers = open_delivery(shop)
    timestamp, valid = headers["Stripe-Signature"].split(",")
    wrong = ",".join(f"v1={'0' * 64}" for _ in range(5))
    response = shop.post(payload, {"Stripe-Signature": f"{timestamp},{wrong},{valid},v0=abc"})
    assert (response.status_code, response.json["outcome"]) == (200, "fulfilled")
    assert shop.credits.balance("bob") == 100


@pytest.mark.parametrize(
    "event_id",
    [
        pytest.param("evt_" + "x" * 252, id="an event id longer than its column"),
        pytest.param("evt_\x00nul", id="a NUL byte in the event id"),
        pytest.param("evt_ spaced", id="a space in the event id"),
        pytest.param("evt_\u00e9", id="a non-ASCII event id"),
    ],
)
def test_a_signed_event_with_an_id_stripe_never_sends_is_400_once_not_503_forever(shop, event_id):
    """Signed, so it passes the signature check, but no database column would take it: refused
    with 400 (Stripe stops retrying) rather than 503 on every retry."""
    before = shop.state()
    session = testing.checkout_session(shop.open_session, amount_total=100)
    response = signed_delivery(shop, testing.event("checkout.session.completed", session, event_id=event_id))
    assert response.status_code == 400
    assert "event id" in response.json["message"]
    nothing_changed(shop, before)


def test_an_event_for_a_session_this_app_never_created_is_recorded_not_credited(shop):
    before = shop.state()
    session = testing.checkout_session(
        "cs_test_made_elsewhere", amount_total=100, metadata={"userId": "bob", "credits": "100000"}
    )
    response = signed_delivery(shop, testing.event("checkout.session.completed", session))
    assert (response.status_code, response.json["outcome"]) == (200, "unknown_session")
    after = shop.state()
    assert (after["wallets"], after["entries"], after["events"]) == (
        before["wallets"],
        before["entries"],
        before["events"] + 1,
    )


def test_a_session_naming_another_purchases_attempt_key_is_not_credited(shop):
    t = shop.credits.tables
    with shop.db.engine.connect() as conn:
        attempt = conn.execute(
            sa.select(t.purchases.c.attempt_key).where(t.purchases.c.session_id == shop.open_session)
        ).scalar_one()
    session = testing.checkout_session("cs_test_forged", amount_total=100, client_reference_id=attempt)
    response = signed_delivery(shop, testing.event("checkout.session.completed", session))
    assert response.json["outcome"] == "unknown_session"
    assert shop.credits.balance("bob") == 0
    assert shop.state()["purchases"][shop.open_session][0] == "open"


def test_metadata_naming_another_user_credits_only_the_purchases_own_wallet(shop):
    with shop.app.app_context():
        session = testing.session_for(shop.open_session)  # bob's purchase
    session["metadata"] = {"userId": "alice", "keyId": "key-1", "credits": "1000000", "purchaseId": "1"}
    response = signed_delivery(shop, testing.event("checkout.session.completed", session))
    assert response.json["outcome"] == "fulfilled"
    assert (shop.credits.balance("bob"), shop.credits.balance("alice")) == (100, 200)
    assert shop.credits.balance("alice", "key-1") == 0


def test_a_session_with_another_amount_is_not_credited(shop):
    with shop.app.app_context():
        session = testing.session_for(shop.open_session)
    session["amount_total"] = 1
    response = signed_delivery(shop, testing.event("checkout.session.completed", session))
    assert response.json["outcome"] == "amount_mismatch"
    assert shop.credits.balance("bob") == 0


def refund_event(shop: Shop, refunded: int) -> dict[str, Any]:
    return testing.event(
        "charge.refunded", testing.charge(shop.paid_intent, amount=200, amount_refunded=refunded)
    )


def test_a_replayed_old_event_after_a_refund_is_a_duplicate_and_credits_nothing(shop):
    refund = refund_event(shop, 200)
    assert signed_delivery(shop, refund).json["outcome"] == "revoked"
    assert shop.credits.balance("alice") == 0
    for old in (shop.paid_event, refund, shop.paid_event):  # re-signed now, so only the id tells
        response = signed_delivery(shop, old)
        assert (response.status_code, response.json["outcome"]) == (200, "duplicate")
    with shop.app.app_context():  # the same session again under a new event id: paid already
        again = testing.event("checkout.session.completed", testing.session_for(shop.paid_session))
    assert signed_delivery(shop, again).json["outcome"] == "already_fulfilled"
    assert shop.credits.balance("alice") == 0
    assert shop.credits.audit() == []


def test_an_earlier_partial_refund_delivered_after_the_full_refund_gives_nothing_back(shop):
    """Stripe does not promise the order of deliveries, and ``amount_refunded`` only ever grows: the
    event of a first partial refund, arriving after the event of the full refund, must not hand the
    customer credits for money that was refunded."""
    first_partial, then_full = refund_event(shop, 50), refund_event(shop, 200)
    assert signed_delivery(shop, then_full).json["outcome"] == "revoked"
    assert shop.credits.balance("alice") == 0
    late = signed_delivery(shop, first_partial)
    assert late.status_code == 200
    balance = shop.credits.balance("alice")
    assert balance == 0, f"the late partial refund answered {late.json['outcome']!r} and gave back {balance}"
    assert shop.credits.audit() == []


def test_a_refund_for_a_payment_this_app_never_saw_is_recorded_and_changes_nothing(shop):
    before = shop.state()
    stripe_event = testing.event(
        "charge.refunded", testing.charge("pi_never_seen", amount=100, amount_refunded=100)
    )
    response = signed_delivery(shop, stripe_event)
    assert (response.status_code, response.json["outcome"]) == (200, "unmatched")
    assert shop.state()["wallets"] == before["wallets"]


# -- checkout: named bad inputs


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


# -- the success page: named bad inputs


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


# -- who may see and spend what


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("post", "/credits/checkout", id="checkout"),
        pytest.param("get", "/credits/balance", id="balance"),
        pytest.param("get", "/credits/transactions", id="transactions"),
        pytest.param("get", "/credits/", id="credits page"),
        pytest.param("get", "/credits/success?session_id=cs_x", id="success page"),
        pytest.param("get", "/credits/cancel", id="cancel page"),
    ],
)
def test_anonymous_requests_are_401_and_reach_nothing(shop, method, path):
    before = shop.state()
    response = getattr(shop.client(None), method)(path, json={"quantity": 1} if method == "post" else None)
    assert response.status_code == 401
    assert "alice" not in response.get_data(as_text=True)
    assert stripe_calls(shop) == 0
    assert shop.state() == before


def test_bob_never_sees_alices_entries_whatever_he_asks(shop):
    shop.credits.grant("alice", 7, reason="alice-private-grant")
    shop.credits.spend("alice", 3, reason="alice-private-spend")
    shop.credits.grant("bob", 5, reason="bob-grant")
    alice_ids = {e.id for e in shop.credits.history("alice", limit=1000)}
    bob_ids = {e.id for e in shop.credits.history("bob", limit=1000)}
    bob = shop.client("bob")
    queries = ["", "?limit=1000", "?user_id=alice", "?user_id=alice&key_id=key-1", "?key_id=key-1"]
    queries += [f"?before={i + 1}&limit=1" for i in sorted(alice_ids)]
    for query in queries:
        response = bob.get(f"/credits/transactions{query}")
        assert response.status_code == 200
        entries = response.json["transactions"]
        assert {e["id"] for e in entries} <= bob_ids, query
        assert {e["user_id"] for e in entries} <= {"bob"}, query
        page = bob.get(f"/credits/{query}", headers={"Accept": "text/html"}).get_data(as_text=True)
        assert "alice-private" not in page, query
    assert bob.get("/credits/balance?user_id=alice").json == {"user_id": "bob", "key_id": None, "balance": 5}


@pytest.mark.parametrize(
    "before",
    [
        pytest.param("99999999999999999999", id="before beyond any 64-bit id"),
        pytest.param("-99999999999999999999", id="before below any 64-bit id"),
        pytest.param("9223372036854775808", id="before one past the largest BIGINT"),
    ],
)
def test_history_with_an_out_of_range_cursor_is_not_a_500(shop, before):
    for path in ("/credits/transactions", "/credits/"):
        response = shop.client("alice").get(f"{path}?before={before}")
        assert response.status_code in (200, 400), (path, response.status_code)


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("limit=0", id="zero limit"),
        pytest.param("limit=-1", id="negative limit"),
        pytest.param("limit=100000", id="huge limit"),
        pytest.param("limit=ten", id="limit in words"),
        pytest.param("before=1.5", id="fractional cursor"),
        pytest.param("before=abc", id="cursor in words"),
    ],
)
def test_history_with_a_bad_page_is_400(shop, query):
    assert shop.client("alice").get(f"/credits/transactions?{query}").status_code == 400


def test_random_query_strings_on_the_read_endpoints_are_never_a_500(shop, backend):
    """Whatever a logged-in user puts in the query string of the pages that read the ledger, the
    answer is 200, 400 or 404, shows only their own wallet, and nothing is written or asked of Stripe."""
    before = shop.state()
    text = st.one_of(
        st.integers(-(2**70), 2**70).map(str),
        st.sampled_from(["", "0", "-1", "1", "1000", "1001", "1.5", "nan", "inf", "0x10", " 7"]),
        st.sampled_from([str(2**63), str(-(2**63) - 1), "9" * 30, "cs_test_\x00", "\x00", "%00", "'--"]),
        st.text(max_size=30),
    )

    @cases(backend, sqlite=200, server=60)
    @given(
        path=st.sampled_from(["/credits/transactions", "/credits/", "/credits/balance", "/credits/success"]),
        query=st.dictionaries(
            st.sampled_from(["limit", "before", "session_id", "user_id", "key_id"]), text, max_size=3
        ),
    )
    def read(path: str, query: dict[str, str]) -> None:
        response = shop.client("bob").get(path, query_string=query, headers=JSON_HEADERS)
        assert response.status_code in (200, 400, 404), response.status_code
        if response.status_code == 200 and path == "/credits/transactions":
            assert {e["user_id"] for e in response.json["transactions"]} <= {"bob"}
        assert stripe_calls(shop, "GET") == 0
        assert shop.state() == before

    read()


# -- the example app: CSRF and API keys


PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def example_apps(database_url) -> Iterator[dict[bool, Any]]:
    """The example app (simulated Stripe) on this backend, with CSRF protection off and on; built once
    per module, as the tables are."""
    from example_app import create_app
    from example_app.models import db

    apps = {
        csrf: create_app({"TESTING": True, "WTF_CSRF_ENABLED": csrf, "SQLALCHEMY_DATABASE_URI": database_url})
        for csrf in (False, True)
    }
    with apps[False].app_context():
        db.create_all()
    yield apps
    for app in apps.values():
        with app.app_context():
            clear(db)
            db.engine.dispose()


@pytest.fixture
def example(example_apps) -> Callable[..., Any]:
    """``example(csrf=False)``: the example app with its tables empty."""
    from example_app.models import db

    with example_apps[False].app_context():
        clear(db)

    def app(*, csrf: bool = False) -> Any:
        return example_apps[csrf]

    return app


def sign_up(client: Any, username: str) -> str:
    """Sign up (and stay logged in); return the user id."""
    form = {"username": username, "password": PASSWORD, "confirm": PASSWORD}
    if client.application.config["WTF_CSRF_ENABLED"]:
        form["csrf_token"] = csrf_token(client, "/signup")
    assert client.post("/signup", data=form).status_code == 302
    return str(client.get("/credits/balance", headers=JSON_HEADERS).json["user_id"])


def csrf_token(client: Any, path: str) -> str:
    found = re.search(
        r'name="csrf_token" type="hidden" value="([^"]+)"', client.get(path).get_data(as_text=True)
    )
    assert found is not None
    return found.group(1)


def create_key(client: Any, name: str = "laptop") -> tuple[str, str]:
    page = client.post("/keys/", data={"name": name}).get_data(as_text=True)
    key_id = re.search(r'data-testid="key-id">([^<]+)<', page)
    secret = re.search(r'data-testid="secret">([^<]+)<', page)
    assert key_id is not None
    assert secret is not None
    return key_id.group(1), secret.group(1)


def grant(app: Any, user: str, amount: int, key_id: str | None = None) -> None:
    from example_app.extensions import credits

    with app.app_context():
        credits.grant(user, amount, key_id=key_id, reason="test")


def balance(app: Any, user: str, key_id: str | None = None) -> int:
    from example_app.extensions import credits

    with app.app_context():
        return int(credits.balance(user, key_id))


def purchase_count(app: Any) -> int:
    from example_app.extensions import credits
    from example_app.models import db

    with app.app_context(), db.engine.connect() as conn:
        return int(
            conn.execute(sa.select(sa.func.count()).select_from(credits.tables.purchases)).scalar_one()
        )


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
    user = sign_up(client, "ada")
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
    alice_id, bob_id = sign_up(alice, "alice"), sign_up(bob, "bob")
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
    user = sign_up(client, "ada")
    key_id, secret = create_key(client)
    grant(app, user, 20)
    grant(app, user, 20, key_id)
    if key == "revoked":
        assert client.post(f"/keys/{key_id}/revoke").status_code == 302
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
    assert (balance(app, user), balance(app, user, key_id), purchase_count(app)) == (20, 20, 0)


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
    sign_up(client, "ada")
    if not logged_in:
        client.post("/logout")
    response = getattr(client, method)(path, data=data, headers={"Accept": "text/html"})
    assert response.status_code in (200, 400, 402, 404), response.status_code  # 402: no credits yet
    assert purchase_count(app) == 0


def row_counts(app: Any) -> dict[str, int]:
    """How many rows each table of the example app holds (its own and the credits tables)."""
    from example_app.models import db

    with app.app_context(), db.engine.connect() as conn:
        return {
            table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in db.metadata.sorted_tables
        }


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
    user = sign_up(client, "ada")
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
    user = sign_up(client, "ada")
    grant(app, user, 20)
    before = row_counts(app)
    response = client.post("/api/personas", data=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.get_data(as_text=True)[:300]
    assert response.json["error"] == "invalid_seed"
    assert row_counts(app) == before
    assert balance(app, user) == 20


# -- 4. secrets never appear in logs or error pages --------------------------------------------------------


def test_secrets_never_appear_in_logs_or_error_pages(shop, caplog):
    app = shop.app
    app.config["PROPAGATE_EXCEPTIONS"] = False  # errors become 500 pages, logged as they would be live

    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="stripe")
    bodies: list[str] = []

    def seen(response: Any) -> Any:
        bodies.append(response.get_data(as_text=True))
        bodies.extend(f"{k}: {v}" for k, v in response.headers.items())
        return response

    alice = shop.client("alice")
    stripe_errors = [
        (402, {"type": "card_error", "code": "card_declined", "message": "Your card was declined."}),
        (401, {"type": "invalid_request_error", "message": "Invalid API Key provided: sk_test_****3Cd"}),
        (429, {"type": "invalid_request_error", "code": "rate_limit", "message": "Too many requests"}),
        (400, {"type": "invalid_request_error", "message": "Invalid currency"}),
        (500, {"type": "api_error", "message": "Something went wrong"}),
    ]
    for status, error in stripe_errors:
        with responses.RequestsMock() as failing:
            testing.mock_create_session(failing, status=status, error=error)
            assert seen(alice.post("/credits/checkout", json={"quantity": 1})).status_code == 502
            page = alice.post("/credits/checkout", data={"quantity": "1"}, headers={"Accept": "text/html"})
            assert seen(page).status_code == 502  # the browser's error page
    for failure in (requests.exceptions.ConnectionError("down"), requests.exceptions.Timeout("slow")):
        with responses.RequestsMock() as failing:
            failing.add(responses.POST, f"{testing.STRIPE_API}/v1/checkout/sessions", body=failure)
            assert seen(alice.post("/credits/checkout", json={"quantity": 1})).status_code == 502
    with responses.RequestsMock() as failing:  # the success page cannot reach Stripe
        failing.add(responses.GET, re.compile(r".*/v1/checkout/sessions/.*"), status=500, json={"error": {}})
        seen(shop.client("bob").get(f"/credits/success?session_id={shop.open_session}"))

    payload = shop.open_payload
    for headers in (
        {},
        {"Stripe-Signature": "garbage"},
        {"Stripe-Signature": stripe_signature(payload, "whsec_wrong")},
        {"Stripe-Signature": stripe_signature(payload, timestamp=int(time.time()) - 3600)},
    ):
        assert seen(shop.post(payload, headers)).status_code == 400

    def fail_every_statement(conn, cursor, statement, parameters, context, executemany):
        raise sa.exc.OperationalError(statement, parameters, Exception("the database went away"))

    def fail_every_write(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
            fail_every_statement(conn, cursor, statement, parameters, context, executemany)

    for failure in (fail_every_statement, fail_every_write):
        sa.event.listen(shop.db.engine, "before_cursor_execute", failure)
        try:
            assert seen(shop.post(*open_delivery(shop))).status_code == 503
            assert seen(alice.post("/credits/checkout", json={"quantity": 1})).status_code == 503
            seen(alice.get("/credits/balance"))
            seen(alice.get("/credits/", headers={"Accept": "text/html"}))
        finally:
            sa.event.remove(shop.db.engine, "before_cursor_execute", failure)
    assert seen(alice.get("/_boom")).status_code == 500
    seen(alice.get("/credits/", headers={"Accept": "text/html"}))

    # The failures above were logged, with tracebacks, and stripe-python's debug lines were captured.
    assert "Traceback" in caplog.text
    assert "Stripe could not create a checkout session" in caplog.text
    assert any(r.name == "stripe" and r.levelno == logging.DEBUG for r in caplog.records)
    for secret in (SECRET_KEY, WHSEC, SECRET_KEY[8:], WHSEC[6:]):
        assert secret not in caplog.text
        for body in bodies:
            assert secret not in body
