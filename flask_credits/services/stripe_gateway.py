"""Everything that talks to Stripe: the only module that imports ``stripe``.

It hands the rest of the package plain dicts and its own exceptions, so no other module needs to know
stripe-python's types, and the simulated (offline) Stripe can stand in for it behind the same
:class:`Gateway` protocol.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from typing import Any, Protocol

import stripe

from ..errors import CreditsError

log = logging.getLogger("flask_credits")


class PaymentProviderError(CreditsError):
    """Stripe refused or could not be reached. ``user_message`` is safe to show to the user (no
    secrets, no internals); ``kind`` is one of ``card``, ``auth``, ``rate_limit``, ``network``,
    ``invalid_request``, ``idempotency`` (the idempotency key was used with other parameters),
    ``conflict`` (a request with the same idempotency key is still running), ``stripe``."""

    def __init__(self, kind: str, user_message: str) -> None:
        super().__init__(user_message)
        self.kind = kind
        self.user_message = user_message


class WebhookError(CreditsError):
    """A webhook body that must be refused with 400: bad or missing signature, stale or future
    timestamp, not JSON, or not a Stripe event. Nothing was written."""


class Gateway(Protocol):
    """What the rest of the package needs from Stripe."""

    def create_checkout_session(self, params: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        """Create a Checkout Session; returns it with at least ``id`` and ``url``."""
        ...

    def retrieve_checkout_session(self, session_id: str) -> dict[str, Any]:
        """Fetch a Checkout Session afresh (never trust what the browser says about it)."""
        ...

    def find_checkout_session(self, payment_intent: str) -> dict[str, Any] | None:
        """The Checkout Session that created ``payment_intent``, if any."""
        ...

    def expire_checkout_session(self, session_id: str) -> dict[str, Any]:
        """Expire an ``open`` Checkout Session so it can no longer be paid; returns it. Raises
        PaymentProviderError when Stripe refuses (the session is complete or expired already)."""
        ...

    def create_customer(self, params: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        """Create a Customer; returns it with at least ``id``. The same ``idempotency_key`` within
        Stripe's 24 hours returns the same customer."""
        ...

    def create_portal_session(self, params: dict[str, Any]) -> dict[str, Any]:
        """Create a Billing Portal session for ``params["customer"]``; returns it with ``id`` and
        ``url``."""
        ...

    def invoice_payment_intent(self, invoice_id: str) -> str | None:
        """The PaymentIntent that paid invoice ``invoice_id`` (None when nothing did: paid out of
        band, or from the customer's balance). Since API version 2025-03-31 an invoice no longer
        names it; its paid InvoicePayment does."""
        ...

    def list_checkout_sessions(self, created_since: int) -> list[dict[str, Any]]:
        """Every Checkout Session of the account created at or after the Unix time
        ``created_since``, newest first, all pages read before returning (so a failure part way
        raises before the caller acts on any)."""
        ...

    def list_paid_invoices(self, created_since: int) -> list[dict[str, Any]]:
        """Every paid invoice of the account created at or after the Unix time ``created_since``
        (with their lines; not their ``payments``), all pages read before returning."""
        ...

    def retrieve_payment_intent(self, payment_intent: str) -> dict[str, Any]:
        """A PaymentIntent as Stripe has it now, its ``latest_charge`` expanded (``amount_refunded``,
        ``disputed``)."""
        ...

    def list_disputes(self, payment_intent: str) -> list[dict[str, Any]]:
        """The disputes of ``payment_intent``'s charges (a Charge no longer names its dispute)."""
        ...

    def create_payment_intent(self, params: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        """Create (and, with ``confirm``, confirm) a PaymentIntent; returns it. A declined card is
        not an exception: the PaymentIntent comes back with status ``requires_payment_method`` and
        its ``last_payment_error``. Other failures raise PaymentProviderError."""
        ...

    def setup_card(self, session_id: str) -> dict[str, Any] | None:
        """The card a completed setup-mode Checkout Session saved: ``{"payment_method", "brand",
        "last4", "customer"}``, or None if it saved none."""
        ...

    def find_invoice(self, payment_intent: str) -> dict[str, Any] | None:
        """The invoice that ``payment_intent`` paid (with its lines), if any: how a refund or
        dispute that overtook its ``invoice.paid`` finds the plan invoice it is about."""
        ...


class LiveStripe:
    """The real Stripe API through stripe-python's ``StripeClient``."""

    def __init__(
        self, secret_key: str, *, timeout: float, max_network_retries: int, api_base: str | None = None
    ) -> None:
        self._client = stripe.StripeClient(
            secret_key,
            max_network_retries=max_network_retries,
            http_client=stripe.RequestsClient(timeout=timeout),
            base_addresses={"api": api_base} if api_base else None,
        )

    def create_checkout_session(self, params: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        with _translated("create a checkout session"):
            session = self._client.v1.checkout.sessions.create(
                params=params,  # type: ignore[arg-type]
                options={"idempotency_key": idempotency_key},
            )
        return session.to_dict()

    def retrieve_checkout_session(self, session_id: str) -> dict[str, Any]:
        with _translated("retrieve a checkout session"):
            session = self._client.v1.checkout.sessions.retrieve(session_id)
        return session.to_dict()

    def find_checkout_session(self, payment_intent: str) -> dict[str, Any] | None:
        with _translated("look up a checkout session"):
            found = self._client.v1.checkout.sessions.list(
                params={"payment_intent": payment_intent, "limit": 1}
            )
        data = found.to_dict().get("data") or []
        return dict(data[0]) if data else None

    def expire_checkout_session(self, session_id: str) -> dict[str, Any]:
        with _translated("expire a checkout session"):
            session = self._client.v1.checkout.sessions.expire(session_id)
        return session.to_dict()

    def create_customer(self, params: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        with _translated("create a customer"):
            customer = self._client.v1.customers.create(
                params=params,  # type: ignore[arg-type]
                options={"idempotency_key": idempotency_key},
            )
        return customer.to_dict()

    def create_portal_session(self, params: dict[str, Any]) -> dict[str, Any]:
        # No idempotency key of ours: a portal session is short-lived and creating two is harmless
        # (stripe-python gives its own retries one).
        with _translated("create a billing portal session"):
            session = self._client.v1.billing_portal.sessions.create(params=params)  # type: ignore[arg-type]
        return session.to_dict()

    def invoice_payment_intent(self, invoice_id: str) -> str | None:
        with _translated("look up an invoice's payment"):
            found = self._client.v1.invoice_payments.list(
                params={"invoice": invoice_id, "status": "paid", "limit": 10}
            )
        return paid_payment_intent(found.to_dict().get("data") or [])

    def list_checkout_sessions(self, created_since: int) -> list[dict[str, Any]]:
        with _translated("list checkout sessions"):
            pages = self._client.v1.checkout.sessions.list(
                params={"created": {"gte": created_since}, "limit": 100}
            )
            return [session.to_dict() for session in pages.auto_paging_iter()]

    def list_paid_invoices(self, created_since: int) -> list[dict[str, Any]]:
        with _translated("list invoices"):
            pages = self._client.v1.invoices.list(
                params={"created": {"gte": created_since}, "status": "paid", "limit": 100}
            )
            return [invoice.to_dict() for invoice in pages.auto_paging_iter()]

    def retrieve_payment_intent(self, payment_intent: str) -> dict[str, Any]:
        with _translated("retrieve a payment"):
            intent = self._client.v1.payment_intents.retrieve(
                payment_intent, params={"expand": ["latest_charge"]}
            )
        return intent.to_dict()

    def list_disputes(self, payment_intent: str) -> list[dict[str, Any]]:
        with _translated("list a payment's disputes"):
            pages = self._client.v1.disputes.list(params={"payment_intent": payment_intent, "limit": 100})
            return [dispute.to_dict() for dispute in pages.auto_paging_iter()]

    def create_payment_intent(self, params: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        with _translated("create a payment"):
            try:
                intent = self._client.v1.payment_intents.create(
                    params=params,  # type: ignore[arg-type]
                    options={"idempotency_key": idempotency_key},
                )
            except stripe.CardError as exc:
                # Declined (or the bank wants the customer): Stripe's error names the PaymentIntent.
                found = getattr(exc.error, "payment_intent", None)
                if found is None:
                    raise
                return dict(found.to_dict() if hasattr(found, "to_dict") else found)
        return intent.to_dict()

    def setup_card(self, session_id: str) -> dict[str, Any] | None:
        with _translated("look up a saved card"):
            session = self._client.v1.checkout.sessions.retrieve(
                session_id, params={"expand": ["setup_intent.payment_method"]}
            ).to_dict()
        return card_of(session)

    def find_invoice(self, payment_intent: str) -> dict[str, Any] | None:
        with _translated("look up the invoice of a payment"):
            found = self._client.v1.invoice_payments.list(
                params={
                    "payment": {"type": "payment_intent", "payment_intent": payment_intent},
                    "status": "paid",
                    "limit": 1,
                }
            )
            data = found.to_dict().get("data") or []
            invoice = data[0].get("invoice") if data and isinstance(data[0], dict) else None
            if isinstance(invoice, dict):
                invoice = invoice.get("id")
            if not isinstance(invoice, str) or not invoice:
                return None
            return self._client.v1.invoices.retrieve(invoice).to_dict()


def card_of(session: dict[str, Any]) -> dict[str, Any] | None:
    """The card a setup-mode Checkout Session saved (its ``setup_intent.payment_method`` expanded)."""
    intent = session.get("setup_intent")
    method = intent.get("payment_method") if isinstance(intent, dict) else None
    if not isinstance(method, dict) or not isinstance(method.get("id"), str):
        return None
    found = method.get("card")
    card: dict[str, Any] = found if isinstance(found, dict) else {}
    customer = session.get("customer")
    if isinstance(customer, dict):
        customer = customer.get("id")
    return {
        "payment_method": method["id"],
        "brand": card.get("brand"),
        "last4": card.get("last4"),
        "customer": customer if isinstance(customer, str) else None,
    }


def stripe_time(timestamp: object) -> datetime | None:
    """A Unix time from a Stripe object (``created``, a period's ``end``) as an aware datetime; None
    when it is missing or not a plausible one."""
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or not 0 < timestamp < 2**37:
        return None
    return datetime.fromtimestamp(timestamp, timezone.utc)


def paid_payment_intent(payments: list[Any]) -> str | None:
    """The PaymentIntent of the first paid one of an invoice's InvoicePayments (plain dicts), if any."""
    for item in payments:
        if not isinstance(item, dict) or item.get("status") != "paid":
            continue
        payment = item.get("payment")
        found = payment.get("payment_intent") if isinstance(payment, dict) else None
        if isinstance(found, dict):
            found = found.get("id")
        if isinstance(found, str) and found:
            return found
    return None


class _translated:
    """Turn stripe-python's errors into PaymentProviderError, logging them without secrets."""

    def __init__(self, action: str) -> None:
        self.action = action

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None or not isinstance(exc, stripe.StripeError):
            return
        kind, message = _describe(exc)
        # The error's own text and request id help operators; the API key never appears in them.
        log.warning(
            "Stripe could not %s: %s (%s, request %s)",
            self.action,
            type(exc).__name__,
            getattr(exc, "code", None) or getattr(exc, "http_status", None),
            getattr(exc, "request_id", None),
        )
        raise PaymentProviderError(kind, message) from None


def _describe(exc: stripe.StripeError) -> tuple[str, str]:
    if isinstance(exc, stripe.CardError):
        return "card", exc.user_message or "The card was declined."
    if isinstance(exc, (stripe.AuthenticationError, stripe.PermissionError)):
        return "auth", "Payments are not configured correctly on this site. Please try again later."
    if isinstance(exc, stripe.RateLimitError):
        return "rate_limit", "The payment service is busy. Please try again in a moment."
    if isinstance(exc, stripe.APIConnectionError):
        return "network", "The payment service could not be reached. Please try again."
    if isinstance(exc, stripe.InvalidRequestError):
        return "invalid_request", "The payment service refused this purchase."
    if isinstance(exc, stripe.IdempotencyError):
        return "idempotency", "The payment service refused this request. Please try again."
    if exc.http_status == 409:  # the same idempotency key is in use by a request still running
        return "conflict", "The payment service is busy with this account. Please try again."
    return "stripe", "The payment service had a problem. Please try again."


def verify_event(payload: bytes, header: str | None, secrets: list[str], tolerance: int) -> dict[str, Any]:
    """Check ``Stripe-Signature`` over the raw body against each secret (rotation), then parse it.

    Too old timestamps are refused as Stripe's library does; so are timestamps further in the future
    than the tolerance, which no honest sender produces.
    """
    if not secrets:
        raise WebhookError("no webhook secret is configured (STRIPE_WEBHOOK_SECRET)")
    if not header:
        raise WebhookError("missing Stripe-Signature header")
    if not header.isascii() or len(header) > 8192:
        raise WebhookError("no valid signature for this body")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise WebhookError("body is not UTF-8") from None
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(text, header, secret, tolerance)
        except stripe.SignatureVerificationError as exc:
            reason = str(exc.user_message or exc)
            if "tolerance" in reason:
                raise WebhookError("signature timestamp is too old") from None
            continue
        break
    else:
        raise WebhookError("no valid signature for this body")
    timestamp = _timestamp(header)
    if timestamp is not None and timestamp > time.time() + tolerance:
        raise WebhookError("signature timestamp is in the future")
    try:
        event = json.loads(text)
    except (ValueError, RecursionError):
        raise WebhookError("body is not JSON") from None
    if (
        not isinstance(event, dict)
        or event.get("object") != "event"
        or not isinstance(event.get("id"), str)
        or not isinstance(event.get("type"), str)
        or not isinstance(event.get("data"), dict)
        or not isinstance(event["data"].get("object"), dict)
    ):
        raise WebhookError("body is not a Stripe event")
    # Ids and types Stripe sends are short printable ASCII (evt_..., checkout.session.completed).
    # Anything else, even signed, would fail at the database on every retry (an id too long for
    # its column, a NUL byte PostgreSQL refuses): answer 400 once instead of 503 forever.
    if not _printable(event["id"], 255) or not _printable(event["type"], 128):
        raise WebhookError("event id or type is not one Stripe sends")
    return event


def _printable(value: str, limit: int) -> bool:
    return 0 < len(value) <= limit and value.isascii() and value.isprintable() and " " not in value


def _timestamp(header: str) -> int | None:
    for item in header.split(","):
        key, _, value = item.partition("=")
        if key.strip() == "t":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def sign(payload: str, secret: str, timestamp: int | None = None) -> str:
    """A ``Stripe-Signature`` header for ``payload``, as Stripe would send it."""
    return str(stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp))
