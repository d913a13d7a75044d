"""Stripe-shaped objects (Checkout Sessions, charges, disputes, events) as Stripe sends them: the
simulated Stripe builds its events with these, and :mod:`flask_credits.testing` hands them to tests."""

from __future__ import annotations

import secrets
import time
from typing import Any

from ..records import Purchase


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


def session_of(
    purchase: Purchase,
    *,
    payment_status: str = "paid",
    payment_intent: str | None = None,
    status: str = "complete",
) -> dict[str, Any]:
    """The Checkout Session of a stored purchase, with its amount, currency and references."""
    assert purchase.session_id is not None
    metadata = {
        "userId": purchase.wallet.user_id,
        "credits": str(purchase.credits),
        "purchaseId": str(purchase.id),
    }
    if purchase.wallet.key_id:
        metadata["keyId"] = purchase.wallet.key_id
    return checkout_session(
        purchase.session_id,
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
