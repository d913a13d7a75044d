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
import threading
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from flask import current_app

from .services import purchases
from .services.stripe_gateway import sign
from .services.stripe_objects import (
    charge,
    checkout_session,
    dispute,
    event,
    invoice,
    payment_intent,
    session_of,
    subscription,
    subscription_session,
)
from .services.webhooks import secrets_for

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
    "invoice",
    "mock_create_customer",
    "mock_create_payment_intent",
    "mock_create_portal_session",
    "mock_create_session",
    "mock_expire_session",
    "mock_find_session",
    "mock_invoice_payments",
    "mock_list_invoices",
    "mock_list_sessions",
    "mock_payment_intent",
    "mock_retrieve_session",
    "mock_setup_card",
    "payment_intent",
    "post_event",
    "session_for",
    "sign",
    "subscription",
    "subscription_session",
]


def session_for(
    session_id: str,
    *,
    payment_status: str = "paid",
    payment_intent: str | None = None,
    status: str = "complete",
) -> dict[str, Any]:
    """The Checkout Session of a purchase this app started, with the amount, currency and references
    from its stored row (needs an app context)."""
    purchase = purchases.find(current_app.extensions["credits"], session_id=session_id)
    if purchase is None:
        raise LookupError(f"no purchase with Checkout Session {session_id!r}")
    return session_of(purchase, payment_status=payment_status, payment_intent=payment_intent, status=status)


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
    requested line items' total. Every checkout is for the user's Stripe Customer: unless
    ``POST /v1/customers`` is answered already, :func:`mock_create_customer` answers it."""
    import responses as responses_lib

    url = f"{STRIPE_API}/v1/checkout/sessions"
    customers = f"{STRIPE_API}/v1/customers"
    if not any(r.method == "POST" and r.url == customers for r in rsps.registered()):
        mock_create_customer(rsps)
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


def mock_list_sessions(
    rsps: responses.RequestsMock,
    sessions: list[dict[str, Any]],
    *,
    page_size: int = 100,
    status: int = 200,
    error: dict[str, Any] | None = None,
) -> list[dict[str, str]]:
    """Answer ``GET /v1/checkout/sessions?created[gte]=...`` (what ``flask credits reconcile`` lists)
    as Stripe does: ``sessions`` (newest first) created at or after ``created[gte]`` (a session
    without ``created`` counts as just created), ``page_size`` a page, with ``has_more`` and
    ``starting_after`` paging; or every call refused with ``error`` and ``status``. Lookups by
    ``payment_intent`` (:func:`mock_find_session`) are left alone. Returns the query of each request
    answered, in order."""
    return _mock_listing(rsps, "/v1/checkout/sessions", sessions, page_size, status, error)


def mock_list_invoices(
    rsps: responses.RequestsMock,
    invoices: list[dict[str, Any]],
    *,
    page_size: int = 100,
    status: int = 200,
    error: dict[str, Any] | None = None,
) -> list[dict[str, str]]:
    """Answer ``GET /v1/invoices?created[gte]=...&status=paid`` (the paid invoices ``flask credits
    reconcile`` lists) as :func:`mock_list_sessions` answers its listing. List ``invoices`` without
    ``payments`` (see :func:`invoice`), as Stripe does, and answer their payments' lookups with
    :func:`mock_invoice_payments`. Returns the query of each request answered, in order."""
    return _mock_listing(rsps, "/v1/invoices", invoices, page_size, status, error)


def _mock_listing(
    rsps: responses.RequestsMock,
    path: str,
    objects: list[dict[str, Any]],
    page_size: int,
    status: int,
    error: dict[str, Any] | None,
) -> list[dict[str, str]]:
    import time

    import responses as responses_lib

    asked: list[dict[str, str]] = []

    def listing(request: Any) -> tuple[bool, str]:
        query = dict(parse_qsl(request.url.partition("?")[2]))
        return "payment_intent" not in query, "a lookup by payment_intent"

    def reply(request: Any) -> tuple[int, dict[str, str], str]:
        query = dict(parse_qsl(request.url.partition("?")[2]))
        asked.append(query)
        if error is not None:
            return status, {"Request-Id": "req_test"}, json.dumps({"error": error})
        since = int(query.get("created[gte]", "0"))
        found = [o for o in objects if int(o.get("created", time.time())) >= since]
        after = query.get("starting_after")
        if after is not None:
            found = found[[o["id"] for o in found].index(after) + 1 :]
        limit = min(page_size, int(query.get("limit", "10")))
        body = {"object": "list", "url": path, "data": found[:limit], "has_more": len(found) > limit}
        return 200, {"Request-Id": "req_test"}, json.dumps(body)

    rsps.add_callback(
        responses_lib.GET,
        f"{STRIPE_API}{path}",
        callback=reply,
        content_type="application/json",
        match=[listing],
    )
    return asked


def mock_payment_intent(
    rsps: responses.RequestsMock,
    intent: dict[str, Any],
    *,
    latest_charge: dict[str, Any] | None = None,
    disputes: list[dict[str, Any]] | None = None,
) -> None:
    """Answer ``GET /v1/payment_intents/<id>`` with ``intent``, its ``latest_charge`` expanded to
    ``latest_charge`` (see :func:`charge`), and ``GET /v1/disputes?payment_intent=<id>`` with
    ``disputes`` (see :func:`dispute`)."""
    import responses as responses_lib
    from responses import matchers

    rsps.add(
        responses_lib.GET,
        f"{STRIPE_API}/v1/payment_intents/{intent['id']}",
        json={**intent, "latest_charge": latest_charge},
    )
    rsps.add(
        responses_lib.GET,
        f"{STRIPE_API}/v1/disputes",
        json={"object": "list", "url": "/v1/disputes", "data": disputes or [], "has_more": False},
        match=[matchers.query_param_matcher({"payment_intent": intent["id"], "limit": "100"})],
    )


def mock_invoice_payments(rsps: responses.RequestsMock, invoice_id: str, payment_intent: str | None) -> None:
    """Answer ``GET /v1/invoice_payments?invoice=...&status=paid`` with the invoice's one paid
    payment by ``payment_intent`` (or none)."""
    import responses as responses_lib
    from responses import matchers

    data = []
    if payment_intent is not None:
        data.append(
            {
                "id": f"inpay_{invoice_id}",
                "object": "invoice_payment",
                "invoice": invoice_id,
                "is_default": True,
                "payment": {"type": "payment_intent", "payment_intent": payment_intent},
                "status": "paid",
            }
        )
    rsps.add(
        responses_lib.GET,
        f"{STRIPE_API}/v1/invoice_payments",
        json={"object": "list", "data": data, "has_more": False},
        match=[matchers.query_param_matcher({"invoice": invoice_id, "status": "paid", "limit": "10"})],
    )


def mock_find_invoice(
    rsps: responses.RequestsMock, payment_intent: str, invoice: dict[str, Any] | None
) -> None:
    """Answer the lookup of the invoice ``payment_intent`` paid: ``GET /v1/invoice_payments`` by
    payment (with ``invoice``'s one paid payment, or none) and, when there is one,
    ``GET /v1/invoices/<id>`` with ``invoice``."""
    import responses as responses_lib
    from responses import matchers

    data = []
    if invoice is not None:
        data.append(
            {
                "id": f"inpay_{invoice['id']}",
                "object": "invoice_payment",
                "invoice": invoice["id"],
                "is_default": True,
                "payment": {"type": "payment_intent", "payment_intent": payment_intent},
                "status": "paid",
            }
        )
        rsps.add(responses_lib.GET, f"{STRIPE_API}/v1/invoices/{invoice['id']}", json=invoice)
    rsps.add(
        responses_lib.GET,
        f"{STRIPE_API}/v1/invoice_payments",
        json={"object": "list", "data": data, "has_more": False},
        match=[
            matchers.query_param_matcher(
                {
                    "payment[type]": "payment_intent",
                    "payment[payment_intent]": payment_intent,
                    "status": "paid",
                    "limit": "1",
                }
            )
        ],
    )


def mock_create_payment_intent(
    rsps: responses.RequestsMock, outcome: str = "succeeded", *, status: int | None = None
) -> list[dict[str, Any]]:
    """Answer ``POST /v1/payment_intents`` as Stripe does for an off-session payment: ``outcome``
    "succeeded", "declined" (402 ``card_error`` naming the PaymentIntent), "requires_action" (402
    ``authentication_required``), "processing", or ``status`` 500 (a Stripe failure). The same
    Idempotency-Key gets the same PaymentIntent. Returns the list of requests it answered, each
    ``{"key", "params", "intent"}``, in order."""
    import responses as responses_lib

    answered: list[dict[str, Any]] = []
    by_key: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def reply(request: Any) -> tuple[int, dict[str, str], str]:
        body = request.body.decode() if isinstance(request.body, bytes) else request.body or ""
        params = dict(parse_qsl(body, keep_blank_values=True))
        key = str(request.headers.get("Idempotency-Key"))
        metadata = {k[9:-1]: v for k, v in params.items() if k.startswith("metadata[")}
        with lock:
            if status is not None:
                answered.append({"key": key, "params": params, "intent": None})
                error = {"type": "api_error", "message": "Something went wrong."}
                return status, {"Request-Id": "req_test"}, json.dumps({"error": error})
            intent = by_key.get(key)
            if intent is None:
                intent = by_key[key] = payment_intent(
                    amount=int(params["amount"]),
                    currency=params["currency"],
                    status={"declined": "requires_payment_method"}.get(outcome, outcome),
                    metadata=metadata,
                    payment_method=params.get("payment_method"),
                    customer=params.get("customer"),
                    decline_code="generic_decline" if outcome == "declined" else None,
                )
            answered.append({"key": key, "params": params, "intent": intent})
        if outcome in ("declined", "requires_action"):
            code = "card_declined" if outcome == "declined" else "authentication_required"
            declined: dict[str, Any] = {
                "type": "card_error",
                "code": code,
                "message": "Your card was declined." if outcome == "declined" else "Authentication required.",
                "payment_intent": intent,
            }
            return 402, {"Request-Id": "req_test"}, json.dumps({"error": declined})
        return 200, {"Request-Id": "req_test"}, json.dumps(intent)

    rsps.add_callback(responses_lib.POST, f"{STRIPE_API}/v1/payment_intents", callback=reply)
    return answered


def mock_setup_card(
    rsps: responses.RequestsMock,
    session_id: str,
    *,
    customer: str,
    payment_method: str = "pm_test_visa",
    brand: str = "visa",
    last4: str = "4242",
) -> None:
    """Answer ``GET /v1/checkout/sessions/<id>?expand[]=setup_intent.payment_method`` for a completed
    setup-mode session that saved a card."""
    import responses as responses_lib

    session = {
        "id": session_id,
        "object": "checkout.session",
        "mode": "setup",
        "status": "complete",
        "customer": customer,
        "setup_intent": {
            "id": "seti_" + secrets.token_hex(8),
            "object": "setup_intent",
            "status": "succeeded",
            "payment_method": {
                "id": payment_method,
                "object": "payment_method",
                "type": "card",
                "card": {"brand": brand, "last4": last4, "exp_month": 12, "exp_year": 2030},
            },
        },
    }
    rsps.add(responses_lib.GET, f"{STRIPE_API}/v1/checkout/sessions/{session_id}", json=session)


def mock_create_customer(
    rsps: responses.RequestsMock,
    customer_id: str | None = None,
    *,
    status: int = 200,
    error: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Answer ``POST /v1/customers`` as Stripe does (replacing any answer registered before): a new
    customer per ``Idempotency-Key``, and the same one again for a key seen before; ``customer_id``
    names the first. With ``error``, every call is refused with it and ``status``. Returns the list of
    customers created, which grows as the app creates them."""
    import responses as responses_lib

    url = f"{STRIPE_API}/v1/customers"
    rsps.remove(responses_lib.POST, url)
    created: list[dict[str, Any]] = []
    if error is not None:
        rsps.add(responses_lib.POST, url, json={"error": error}, status=status)
        return created
    by_key: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def reply(request: Any) -> tuple[int, dict[str, str], str]:
        from urllib.parse import parse_qs

        form = parse_qs(request.body if isinstance(request.body, str) else request.body.decode())
        key = request.headers.get("Idempotency-Key") or secrets.token_hex(8)
        with lock:
            found = by_key.get(key)
            if found is None:
                found = by_key[key] = {
                    "id": (
                        customer_id if not created and customer_id else "cus_test_" + secrets.token_hex(7)
                    ),
                    "object": "customer",
                    "email": form.get("email", [None])[0],
                    "name": form.get("name", [None])[0],
                    "metadata": {k[9:-1]: v[0] for k, v in form.items() if k.startswith("metadata[")},
                }
                created.append(found)
        return 200, {"Request-Id": "req_test", "Idempotent-Replayed": "false"}, json.dumps(found)

    rsps.add_callback(responses_lib.POST, url, callback=reply, content_type="application/json")
    return created


def mock_create_portal_session(
    rsps: responses.RequestsMock, *, status: int = 200, error: dict[str, Any] | None = None
) -> None:
    """Answer ``POST /v1/billing_portal/sessions`` with a session for the customer asked for (or with
    ``error`` and ``status``, as when the portal is not configured in the Dashboard)."""
    import responses as responses_lib

    url = f"{STRIPE_API}/v1/billing_portal/sessions"
    if error is not None:
        rsps.add(responses_lib.POST, url, json={"error": error}, status=status)
        return

    def reply(request: Any) -> tuple[int, dict[str, str], str]:
        from urllib.parse import parse_qs

        form = parse_qs(request.body if isinstance(request.body, str) else request.body.decode())
        session_id = "bps_test_" + secrets.token_hex(8)
        body = {
            "id": session_id,
            "object": "billing_portal.session",
            "customer": form["customer"][0],
            "return_url": form.get("return_url", [None])[0],
            "url": f"https://billing.stripe.com/p/session/{session_id}",
        }
        return 200, {"Request-Id": "req_test"}, json.dumps(body)

    rsps.add_callback(responses_lib.POST, url, callback=reply, content_type="application/json")
