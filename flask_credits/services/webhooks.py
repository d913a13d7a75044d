"""Stripe webhooks: verify, de-duplicate, then one small handler per event type.

The signature is checked on the raw body before the database is touched. Each event's id is written
in the same transaction as its effect, under a unique key, so a duplicate delivery (even at the same
moment as the first) changes nothing, and a failed attempt leaves nothing behind for the retry to
trip over.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from ..core.settlement import credits_for
from ..records import FULFILLABLE, Purchase
from ..storage.statements import EVENT_SEEN
from . import auto_top_up, plans, purchases
from .purchases import Recorder
from .simulated_mode import webhook_secret
from .stripe_gateway import stripe_time, verify_event

if TYPE_CHECKING:
    from ..extension import FlaskCredits

log = logging.getLogger("flask_credits")

#: A handler of one Stripe event type: ``(ext, event data object, record) -> outcome``. ``record`` is
#: the event's :class:`Recorder`: run ``record.bind(outcome, purchase_id)`` inside the handler's own
#: transaction to make its effect and the event's record one; otherwise the event is recorded (as
#: seen, with the outcome returned) once the handler returns.
Handler = Callable[["FlaskCredits", Mapping[str, Any], Recorder], str]

#: The event types this extension handles itself. Each :class:`~flask_credits.FlaskCredits` starts
#: with a copy; ``FlaskCredits.webhook_handler`` adds or replaces one on that instance only.
BUILT_IN: dict[str, Handler] = {}


def _handles(*event_types: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        for event_type in event_types:
            BUILT_IN[event_type] = handler
        return handler

    return register


def secrets_for(ext: FlaskCredits) -> list[str]:
    """Every webhook secret accepted now: several while rotating (a list, or comma-separated)."""
    found = list(ext.settings.stripe_webhook_secrets)
    if ext.settings.stripe_mode == "simulated":
        found.append(webhook_secret())
    return found


def process(ext: FlaskCredits, payload: bytes, signature: str | None) -> dict[str, Any]:
    """Verify and handle one delivery; returns the JSON answer. Raises WebhookError (answer 400);
    database or Stripe errors propagate (answer 5xx so Stripe retries)."""
    event = verify_event(payload, signature, secrets_for(ext), ext.settings.webhook_tolerance)
    event_id, event_type = event["id"], event["type"]
    if _seen(ext, event_id):
        return {"received": True, "id": event_id, "outcome": "duplicate"}
    data = event["data"]
    previous = data.get("previous_attributes")
    record = Recorder(
        ext,
        event_id,
        event_type,
        created=stripe_time(event.get("created")),
        previous_attributes=previous if isinstance(previous, Mapping) else None,
    )
    handler = ext.webhook_handlers.get(event_type, _ignore)
    try:
        outcome = handler(ext, data["object"], record)
        if not record.recorded:
            purchases.record_only(ext, record, outcome, None)
    except sa.exc.IntegrityError:
        if not _seen(ext, event_id):
            raise
        outcome = "duplicate"  # delivered twice at once: the other delivery did the work
    log.info("Stripe event %s (%s): %s", event_id, event_type, outcome)
    return {"received": True, "id": event_id, "outcome": outcome}


def _seen(ext: FlaskCredits, event_id: str) -> bool:
    database = ext.database
    if database.one_statement:
        return database.one(EVENT_SEEN, {"event_id": event_id}) is not None
    with database.reader.connect() as conn:
        return conn.execute(database.sql.event_seen, {"b_event_id": event_id}).first() is not None


def _ignore(ext: FlaskCredits, obj: Mapping[str, Any], record: Recorder) -> str:
    return "ignored"  # recorded by process(), as any outcome a handler did not record itself


def _subscribes(session: Mapping[str, Any]) -> bool:
    """Whether a Checkout Session started a plan (``credits.subscribe``) rather than a purchase."""
    return session.get("mode") == "subscription"


@_handles("checkout.session.completed", "checkout.session.async_payment_succeeded")
def _session_paid(ext: FlaskCredits, session: Mapping[str, Any], record: Recorder) -> str:
    if session.get("mode") == "setup":
        return auto_top_up.card_saved(ext, session)
    if _subscribes(session):
        return plans.session_completed(ext, session, record)
    return purchases.fulfil(ext, session, record=record)


@_handles("checkout.session.async_payment_failed")
def _session_failed(ext: FlaskCredits, session: Mapping[str, Any], record: Recorder) -> str:
    if _subscribes(session):
        return "ignored"  # its invoice's invoice.payment_failed says it
    return purchases.mark(ext, session, "failed", FULFILLABLE, record=record)


@_handles("checkout.session.expired")
def _session_expired(ext: FlaskCredits, session: Mapping[str, Any], record: Recorder) -> str:
    if _subscribes(session):
        return plans.session_expired(ext, session, record)
    return purchases.mark(ext, session, "expired", ("creating", "open"), record=record)


@_handles("invoice.paid")
def _invoice_paid(ext: FlaskCredits, invoice: Mapping[str, Any], record: Recorder) -> str:
    return plans.invoice_paid(ext, invoice, record)


@_handles("invoice.payment_failed")
def _invoice_payment_failed(ext: FlaskCredits, invoice: Mapping[str, Any], record: Recorder) -> str:
    return plans.invoice_payment_failed(ext, invoice, record)


@_handles("customer.subscription.updated")
def _subscription_updated(ext: FlaskCredits, subscription: Mapping[str, Any], record: Recorder) -> str:
    return plans.subscription_updated(ext, subscription, record)


@_handles("customer.subscription.deleted")
def _subscription_deleted(ext: FlaskCredits, subscription: Mapping[str, Any], record: Recorder) -> str:
    return plans.subscription_deleted(ext, subscription, record)


@_handles("payment_intent.succeeded", "payment_intent.payment_failed", "payment_intent.requires_action")
def _payment_intent_changed(ext: FlaskCredits, intent: Mapping[str, Any], record: Recorder) -> str:
    """An automatic purchase's PaymentIntent (``metadata[purchaseId]``): paid credits it once; declined,
    or the bank wanting the customer, turns auto top-up off. Checkout's own PaymentIntents are
    ignored here (their sessions' events credit them)."""
    if auto_top_up.PURCHASE not in (intent.get("metadata") or {}):
        return "ignored"
    return auto_top_up.payment_intent_changed(ext, intent)


def _payment_intent(obj: Mapping[str, Any]) -> str | None:
    value = obj.get("payment_intent")
    if isinstance(value, Mapping):
        value = value.get("id")
    return value if isinstance(value, str) else None


def _paid_purchase(ext: FlaskCredits, payment_intent: str | None) -> Purchase | None:
    """The fulfilled purchase (a pack's checkout, or a plan's invoice) that ``payment_intent`` paid.

    A refund or dispute can overtake the events that credit what it is about; then Stripe is asked
    what the payment paid for, and that is credited first, through the same exactly-once path as
    its own event (which, when it comes, finds it done), so the claw-back has something to act on.
    """
    if not payment_intent:
        return None
    found = purchases.find(ext, payment_intent=payment_intent)
    if found is not None and found.status == "fulfilled":
        return found
    session = ext.gateway.find_checkout_session(payment_intent)
    if session is not None and not _subscribes(session):
        purchases.fulfil(ext, session)
    elif found is None:  # not a checkout's: perhaps a plan's invoice
        invoice = ext.gateway.find_invoice(payment_intent)
        if invoice is not None:
            plans.invoice_paid(ext, invoice, None, payment_intent=payment_intent)
    found = purchases.find(ext, payment_intent=payment_intent)
    return found if found is not None and found.status == "fulfilled" else None


@_handles("charge.refunded")
def _charge_refunded(ext: FlaskCredits, charge: Mapping[str, Any], record: Recorder) -> str:
    purchase = _paid_purchase(ext, _payment_intent(charge))
    if purchase is None:
        return "unmatched"
    target = credits_for(purchase.credits, purchase.amount, charge.get("amount_refunded"))
    return purchases.revoke(ext, purchase, cause="refund", refund_target=target, record=record)


def _dispute(ext: FlaskCredits, dispute: Mapping[str, Any], record: Recorder, *, lost: bool | None) -> str:
    """``lost`` True: claw back in proportion to the disputed amount; False: give it all back;
    None: nothing moved (for example closed as ``warning_closed``)."""
    purchase = _paid_purchase(ext, _payment_intent(dispute))
    if purchase is None:
        return "unmatched"
    if lost is None:
        purchases.record_only(ext, record, "ignored", purchase.id)
        return "ignored"
    target = credits_for(purchase.credits, purchase.amount, dispute.get("amount")) if lost else 0
    return purchases.revoke(ext, purchase, cause="dispute", dispute_target=target, record=record)


@_handles("charge.dispute.funds_withdrawn")
def _dispute_withdrawn(ext: FlaskCredits, dispute: Mapping[str, Any], record: Recorder) -> str:
    return _dispute(ext, dispute, record, lost=True)


@_handles("charge.dispute.funds_reinstated")
def _dispute_reinstated(ext: FlaskCredits, dispute: Mapping[str, Any], record: Recorder) -> str:
    return _dispute(ext, dispute, record, lost=False)


@_handles("charge.dispute.closed")
def _dispute_closed(ext: FlaskCredits, dispute: Mapping[str, Any], record: Recorder) -> str:
    status = dispute.get("status")
    return _dispute(ext, dispute, record, lost={"lost": True, "won": False}.get(str(status)))
