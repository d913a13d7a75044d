"""Helpers for testing an app that uses flask_credits, without reaching Stripe.

Build Stripe-shaped objects and events, sign them like Stripe, post them to the app's webhook, and
register ``responses`` mocks for the Stripe API calls this extension makes::

    from flask_credits import testing

    def test_purchase(client, app):
        with responses.RequestsMock() as rsps:
            testing.mock_create_session(rsps, "cs_test_1")
            client.post("/credits/checkout", data={"quantity": "2"})
        with app.app_context():
            event = testing.event("checkout.session.completed", testing.session_for("cs_test_1"))
        assert testing.post_event(client, event).status_code == 200
"""

from __future__ import annotations

import json
import secrets
import time
from typing import TYPE_CHECKING, Any

from flask import current_app

from . import purchases
from .stripe_api import sign

if TYPE_CHECKING:
    import responses
    from flask.testing import FlaskClient
    from werkzeug.test import TestResponse

STRIPE_API = "https://api.stripe.com"

__all__ = [
    "charge",
    "checkout_session",
    "dispute",
    "event",
    "mock_create_session",
    "mock_expire_session",
    "mock_find_session",
    "mock_retrieve_session",
    "post_event",
    "session_for",
    "sign",
]


def _id(prefix: str) -> str:
    return f"{prefix}_test_{secrets.token_hex(12)}"


def checkout_session(
    session_id: str | None = None,
    *,
    amount_total: int,
    currency: str = "usd",
    payment_status: str = "paid",
    payment_intent: str | None = None,
    client_reference_id: str | None = None,
    metadata: dict[str, str] | None = None,
    status: str = "complete",
) -> dict[str, Any]:
    """A Checkout Session object as Stripe sends it in events and API answers."""
    session_id = session_id or _id("cs")
    return {
        "id": session_id,
        "object": "checkout.session",
        "mode": "payment",
        "status": status,
        "payment_status": payment_status,
        "amount_total": amount_total,
        "currency": currency,
        "client_reference_id": client_reference_id,
        "metadata": metadata or {},
        "payment_intent": payment_intent
        if payment_intent is not None
        else (_id("pi") if payment_status != "unpaid" or status == "complete" else None),
        "url": None if status != "open" else f"https://checkout.stripe.com/c/pay/{session_id}",
    }


def session_for(
    session_id: str,
    *,
    payment_status: str = "paid",
    payment_intent: str | None = None,
    status: str = "complete",
) -> dict[str, Any]:
    """The Checkout Session of a purchase this app started, with the amount, currency and references
    from its stored row (needs an app context)."""
    ext = current_app.extensions["credits"]
    purchase = purchases.find(ext, session_id=session_id)
    if purchase is None:
        raise LookupError(f"no purchase with Checkout Session {session_id!r}")
    metadata = {
        "userId": purchase.wallet.user_id,
        "credits": str(purchase.credits),
        "purchaseId": str(purchase.id),
    }
    if purchase.wallet.key_id:
        metadata["keyId"] = purchase.wallet.key_id
    return checkout_session(
        session_id,
        amount_total=purchase.amount,
        currency=purchase.currency,
        payment_status=payment_status,
        payment_intent=payment_intent or purchase.payment_intent or _id("pi"),
        metadata=metadata,
        status=status,
    )


def charge(
    payment_intent: str, *, amount: int, amount_refunded: int = 0, currency: str = "usd"
) -> dict[str, Any]:
    """A Charge object, as in ``charge.refunded`` (``amount_refunded`` is cumulative)."""
    return {
        "id": _id("ch"),
        "object": "charge",
        "payment_intent": payment_intent,
        "amount": amount,
        "amount_refunded": amount_refunded,
        "currency": currency,
        "refunded": amount_refunded >= amount,
    }


def dispute(payment_intent: str, *, amount: int, status: str = "needs_response") -> dict[str, Any]:
    """A Dispute object, as in ``charge.dispute.*`` events (``status`` ``won``/``lost`` when closed)."""
    return {
        "id": _id("dp"),
        "object": "dispute",
        "payment_intent": payment_intent,
        "charge": _id("ch"),
        "amount": amount,
        "status": status,
    }


def event(event_type: str, obj: dict[str, Any], *, event_id: str | None = None) -> dict[str, Any]:
    """A Stripe event wrapping ``obj``."""
    return {
        "id": event_id or _id("evt"),
        "object": "event",
        "type": event_type,
        "created": int(time.time()),
        "livemode": False,
        "api_version": "2026-10-28.endive",
        "data": {"object": obj},
    }


def post_event(
    client: FlaskClient,
    stripe_event: dict[str, Any] | str,
    *,
    secret: str | None = None,
    timestamp: int | None = None,
    url: str | None = None,
) -> TestResponse:
    """Sign ``stripe_event`` with the app's webhook secret (or ``secret``) and post it to the webhook
    route, as Stripe would."""
    app = client.application
    payload = stripe_event if isinstance(stripe_event, str) else json.dumps(stripe_event)
    if secret is None:
        with app.app_context():
            from .webhooks import secrets_for

            secret = secrets_for(app.extensions["credits"])[0]
    if url is None:
        url = app.config["CREDITS_URL_PREFIX"].rstrip("/") + "/stripe-webhook"
    return client.post(
        url,
        data=payload,
        headers={"Stripe-Signature": sign(payload, secret, timestamp), "Content-Type": "application/json"},
    )


def mock_create_session(
    rsps: responses.RequestsMock,
    session_id: str | None = None,
    *,
    amount_total: int | None = None,
    status: int = 200,
    error: dict[str, Any] | None = None,
) -> None:
    """Answer ``POST /v1/checkout/sessions`` with an open session (or with ``error`` and ``status``).
    Without ``session_id`` each call gets a new id; without ``amount_total`` the answer echoes the
    requested line items' total."""
    import responses as responses_lib

    url = f"{STRIPE_API}/v1/checkout/sessions"
    if error is not None:
        rsps.add(responses_lib.POST, url, json={"error": error}, status=status)
        return

    def reply(request: Any) -> tuple[int, dict[str, str], str]:
        from urllib.parse import parse_qs

        form = parse_qs(request.body if isinstance(request.body, str) else request.body.decode())
        total = amount_total
        if total is None:
            unit = int(form.get("line_items[0][price_data][unit_amount]", ["0"])[0])
            total = unit * int(form.get("line_items[0][quantity]", ["1"])[0])
        currency = form.get("line_items[0][price_data][currency]", ["usd"])[0]
        body = checkout_session(
            session_id,
            amount_total=total,
            currency=currency,
            payment_status="unpaid",
            status="open",
            client_reference_id=form.get("client_reference_id", [None])[0],
        )
        return 200, {"Request-Id": "req_test"}, json.dumps(body)

    rsps.add_callback(responses_lib.POST, url, callback=reply, content_type="application/json")


def mock_retrieve_session(rsps: responses.RequestsMock, session: dict[str, Any]) -> None:
    """Answer ``GET /v1/checkout/sessions/{id}`` with ``session``."""
    import responses as responses_lib

    rsps.add(responses_lib.GET, f"{STRIPE_API}/v1/checkout/sessions/{session['id']}", json=session)


def mock_expire_session(
    rsps: responses.RequestsMock,
    session: dict[str, Any],
    *,
    status: int = 200,
    error: dict[str, Any] | None = None,
) -> None:
    """Answer ``POST /v1/checkout/sessions/{id}/expire`` with ``session`` now expired, or with
    ``error`` and ``status`` (Stripe refuses to expire a session that is not open)."""
    import responses as responses_lib

    url = f"{STRIPE_API}/v1/checkout/sessions/{session['id']}/expire"
    if error is not None:
        rsps.add(responses_lib.POST, url, json={"error": error}, status=status)
    else:
        rsps.add(responses_lib.POST, url, json={**session, "status": "expired", "url": None})


def mock_find_session(
    rsps: responses.RequestsMock, payment_intent: str, session: dict[str, Any] | None
) -> None:
    """Answer ``GET /v1/checkout/sessions?payment_intent=...`` with ``session`` (or none)."""
    import responses as responses_lib
    from responses import matchers

    rsps.add(
        responses_lib.GET,
        f"{STRIPE_API}/v1/checkout/sessions",
        json={"object": "list", "data": [session] if session else [], "has_more": False},
        match=[matchers.query_param_matcher({"payment_intent": payment_intent, "limit": "1"})],
    )
