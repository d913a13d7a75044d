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
    payment_intent: str,
    *,
    amount: int,
    amount_refunded: int = 0,
    currency: str = "usd",
    disputed: bool = False,
) -> dict[str, Any]:
    """A Charge object, as in ``charge.refunded`` (``amount_refunded`` is cumulative; ``disputed``
    whether it has a dispute, which the Charge does not name: list the disputes by payment)."""
    return {
        "id": _id("ch"),
        "object": "charge",
        "payment_intent": payment_intent,
        "amount": amount,
        "amount_refunded": amount_refunded,
        "currency": currency,
        "refunded": amount_refunded >= amount,
        "disputed": disputed,
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


def subscription_session(
    session_id: str | None = None,
    *,
    subscription: str | None,
    client_reference_id: str | None,
    amount_total: int,
    currency: str = "usd",
    payment_status: str = "paid",
    status: str = "complete",
    customer: str | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Checkout Session in ``subscription`` mode, as Stripe sends it: no PaymentIntent (its first
    invoice has one), the ``subscription`` it created once complete."""
    found = checkout_session(
        session_id,
        amount_total=amount_total,
        currency=currency,
        payment_status=payment_status,
        client_reference_id=client_reference_id,
        metadata=metadata,
        status=status,
    )
    return {
        **found,
        "mode": "subscription",
        "payment_intent": None,
        "subscription": subscription,
        "customer": customer or _id("cus"),
        "invoice": _id("in") if status == "complete" else None,
    }


def setup_session(session_id: str, *, customer: str | None, metadata: dict[str, str]) -> dict[str, Any]:
    """A completed Checkout Session in ``setup`` mode, as Stripe sends it: no amount, no
    PaymentIntent, the SetupIntent that saved the card."""
    return {
        "id": session_id,
        "object": "checkout.session",
        "mode": "setup",
        "status": "complete",
        "payment_status": "no_payment_required",
        "amount_total": None,
        "currency": None,
        "customer": customer,
        "metadata": metadata,
        "payment_intent": None,
        "setup_intent": _id("seti"),
        "url": None,
    }


def subscription(
    subscription_id: str,
    *,
    price: str,
    period_start: int,
    period_end: int,
    status: str = "active",
    cancel_at_period_end: bool = False,
    metadata: dict[str, str] | None = None,
    customer: str | None = None,
) -> dict[str, Any]:
    """A Subscription with one item, as in ``customer.subscription.*`` events: since API version
    2025-03-31 the current period is on the item, not the subscription."""
    return {
        "id": subscription_id,
        "object": "subscription",
        "customer": customer or _id("cus"),
        "status": status,
        "cancel_at_period_end": cancel_at_period_end,
        "cancel_at": period_end if cancel_at_period_end else None,
        "canceled_at": None,
        "ended_at": None,
        "collection_method": "charge_automatically",
        "metadata": metadata or {},
        "items": {
            "object": "list",
            "data": [
                {
                    "id": _id("si"),
                    "object": "subscription_item",
                    "subscription": subscription_id,
                    "current_period_start": period_start,
                    "current_period_end": period_end,
                    "quantity": 1,
                    "price": {"id": price, "object": "price", "type": "recurring"},
                }
            ],
            "has_more": False,
            "url": f"/v1/subscription_items?subscription={subscription_id}",
        },
    }


def invoice(
    invoice_id: str | None = None,
    *,
    subscription: str | None,
    price: str,
    period_start: int,
    period_end: int,
    amount_paid: int,
    currency: str = "usd",
    billing_reason: str = "subscription_cycle",
    status: str = "paid",
    payment_intent: str | None = None,
    metadata: dict[str, str] | None = None,
    customer: str | None = None,
) -> dict[str, Any]:
    """An Invoice of a subscription as in ``invoice.*`` events, API version 2026-10-28: the
    subscription under ``parent.subscription_details``, the service period on the line, and the
    PaymentIntent only in ``payments`` (included when ``payment_intent`` is given: Stripe leaves
    ``payments`` out of events unless asked)."""
    invoice_id = invoice_id or _id("in")
    line = {
        "id": _id("il"),
        "object": "line_item",
        "invoice": invoice_id,
        "amount": amount_paid,
        "currency": currency,
        "description": "1 x plan",
        "period": {"start": period_start, "end": period_end},
        "pricing": {
            "type": "price_details",
            "price_details": {"price": price, "product": _id("prod")},
            "unit_amount_decimal": str(amount_paid),
        },
        "parent": {
            "type": "subscription_item_details",
            "invoice_item_details": None,
            "subscription_item_details": {
                "invoice_item": None,
                "proration": False,
                "proration_details": {"credited_items": None},
                "subscription": subscription,
                "subscription_item": _id("si"),
            },
        },
        "quantity": 1,
        "subscription": subscription,
    }
    found: dict[str, Any] = {
        "id": invoice_id,
        "object": "invoice",
        "customer": customer or _id("cus"),
        "status": status,
        "billing_reason": billing_reason,
        "collection_method": "charge_automatically",
        "amount_due": amount_paid,
        "amount_paid": amount_paid if status == "paid" else 0,
        "amount_remaining": 0 if status == "paid" else amount_paid,
        "currency": currency,
        "period_start": period_start,
        "period_end": period_end,
        "parent": {
            "type": "subscription_details",
            "quote_details": None,
            "subscription_details": {"metadata": metadata or {}, "subscription": subscription},
        },
        "lines": {
            "object": "list",
            "data": [line],
            "has_more": False,
            "total_count": 1,
            "url": f"/v1/invoices/{invoice_id}/lines",
        },
    }
    if payment_intent is not None:
        found["payments"] = {
            "object": "list",
            "data": [
                {
                    "id": _id("inpay"),
                    "object": "invoice_payment",
                    "amount_paid": amount_paid,
                    "currency": currency,
                    "invoice": invoice_id,
                    "is_default": True,
                    "payment": {"type": "payment_intent", "payment_intent": payment_intent},
                    "status": "paid",
                }
            ],
            "has_more": False,
            "url": f"/v1/invoice_payments?invoice={invoice_id}",
        }
    return found


def payment_intent(
    intent_id: str | None = None,
    *,
    amount: int,
    currency: str = "usd",
    status: str = "succeeded",
    metadata: dict[str, str] | None = None,
    payment_method: str | None = "pm_test_card",
    customer: str | None = None,
    decline_code: str | None = None,
) -> dict[str, Any]:
    """A PaymentIntent as ``payment_intent.*`` events and ``POST /v1/payment_intents`` give it:
    ``requires_payment_method`` with a ``last_payment_error`` when ``decline_code`` is given (a
    declined card), ``requires_action`` when the bank wants the customer (3-D Secure)."""
    error = None
    if decline_code is not None:
        status = "requires_payment_method"
        error = {
            "type": "card_error",
            "code": "card_declined",
            "decline_code": decline_code,
            "message": "Your card was declined.",
        }
    return {
        "id": intent_id or _id("pi"),
        "object": "payment_intent",
        "amount": amount,
        "amount_received": amount if status == "succeeded" else 0,
        "currency": currency,
        "status": status,
        "customer": customer,
        "payment_method": payment_method,
        "metadata": metadata or {},
        "last_payment_error": error,
        "livemode": False,
    }


def event(
    event_type: str,
    obj: dict[str, Any],
    *,
    event_id: str | None = None,
    created: int | None = None,
    previous_attributes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Stripe event wrapping ``obj``; ``previous_attributes``: what a ``*.updated`` event's object
    had before (whole arrays, as Stripe sends them)."""
    data: dict[str, Any] = {"object": obj}
    if previous_attributes is not None:
        data["previous_attributes"] = previous_attributes
    return {
        "id": event_id or _id("evt"),
        "object": "event",
        "type": event_type,
        "created": int(time.time()) if created is None else created,
        "livemode": False,
        "api_version": "2026-10-28.endive",
        "data": data,
    }
