"""Hostile input to the Stripe webhook, on every backend: random bodies and headers, valid deliveries
mutated byte by byte, valid signatures over garbage, signatures made with wrong secrets or stale
timestamps, and signed event-shaped garbage: never a 500, and without a valid signature nothing at all
changes. Then a table of named bad deliveries, each its own case, with the answer expected.

The heavy fuzzing runs on SQLite; PostgreSQL and MariaDB get a smaller sample of the same strategies
(``helpers.py`` has the CREDITS_FUZZ_* knobs).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import (
    JSON_VALUES,
    SECRET_KEY,
    WHSEC,
    Shop,
    fuzz_cases,
    nothing_changed,
    open_delivery,
    signed_delivery,
    stripe_signature,
)
from hypothesis import assume, given
from hypothesis import strategies as st

from flask_credits import testing

# -- fuzzing ------------------------------------------------------------------------------------------

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

    @fuzz_cases(backend, sqlite=600, server=60)
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

    @fuzz_cases(backend, sqlite=600, server=80)
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

    @fuzz_cases(backend, sqlite=300, server=40)
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

    @fuzz_cases(backend, sqlite=200, server=30)
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


# -- named bad deliveries --------------------------------------------------------------------------------


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
