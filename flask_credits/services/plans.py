"""Plans: a wallet's Stripe subscription to one of ``CREDITS_PLANS``, and the allowance each paid
invoice grants. Balances change only in :mod:`flask_credits.core.ledger`.

Like a purchase, a subscription's row is written before the customer is sent to Stripe, and the
webhook trusts that row (its wallet), never the event's metadata alone: a subscription names its row
by the row's attempt key (``subscriptionRef`` in its metadata, the Checkout Session's
``client_reference_id``), and a subscription this app did not create is recorded, not credited.

Each paid invoice (the first and each renewal) becomes a row of ``credits_purchases`` whose unique
``invoice_id`` makes it one credit per invoice, however events are ordered, repeated or raced; its
``payment_intent`` lets the refund and dispute handlers claw it back like any purchase.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .. import signals
from ..core.ledger import InTx
from ..errors import CreditsError, InvalidArgument
from ..records import ENDED_SUBSCRIPTION, Entry, Subscription, Wallet
from ..settings import Plan, Settings
from . import customers
from .purchases import Recorder, record_only
from .stripe_gateway import PaymentProviderError, paid_payment_intent, stripe_time

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Row

    from ..extension import FlaskCredits

log = logging.getLogger("flask_credits")

#: The metadata key of a subscription (and its Checkout Session) that names its row's attempt key.
REFERENCE = "subscriptionRef"
#: Invoices that pay for a period of the plan, and so grant its allowance. A proration invoice
#: (``subscription_update``) does not: an upgrade's extra allowance is granted when the change
#: arrives (``customer.subscription.updated``).
ALLOWANCE_REASONS = ("subscription_create", "subscription_cycle")
#: Ours, before Stripe has a subscription: the wallet's checkout is pending.
PENDING = ("creating", "open")
#: A ``creating`` row older than this belongs to a request that died before Stripe answered it.
CREATING_TIMEOUT = timedelta(minutes=2)


class BadPlan(InvalidArgument):
    """A subscribe request for no configured plan: HTTP 400."""


class AlreadySubscribed(CreditsError):
    """The wallet has a live subscription (or a checkout for one under way): HTTP 409
    ``already_subscribed``. Nothing was written and Stripe was not asked for a session."""

    def __init__(self, subscription: Subscription | None) -> None:
        super().__init__("This account already has a plan. Manage it from the billing portal.")
        self.subscription = subscription


def plan_for(settings: Settings, data: Mapping[str, Any]) -> Plan:
    """The plan a subscribe request names (``plan``), or BadPlan."""
    plan_id = data.get("plan")
    if not isinstance(plan_id, str) or not plan_id:
        raise BadPlan("choose a plan")
    found = settings.plan(plan_id)
    if found is None:
        raise BadPlan(f"unknown plan {plan_id[:64]!r}")
    return found


# -- subscribing ---------------------------------------------------------------------------------------


def start_subscription(
    ext: FlaskCredits,
    wallet: Wallet,
    plan: Plan,
    *,
    success_url: str,
    cancel_url: str,
) -> dict[str, Any]:
    """Store the wallet's pending subscription, then create its Checkout Session in ``subscription``
    mode; returns ``{"id", "url"}``. Raises :class:`AlreadySubscribed` when the wallet has a live
    subscription; a checkout the wallet left open earlier is expired at Stripe first (so it can
    never become a second subscription). If Stripe fails, the row ends as ``error``.

    The session is for the wallet owner's Stripe Customer (found or created once the wallet's slot is
    claimed: a wallet already subscribed costs no Stripe call), so the portal then shows the plan
    beside the user's receipts and cards."""
    s = ext.tables.subscriptions
    wallet_id = ext.ledger.wallet_id(wallet, create=True)
    assert wallet_id is not None
    attempt = "sub_" + secrets.token_hex(16)
    row_id = _claim(ext, wallet_id, plan, attempt)
    try:
        customer = customers.customer_id(ext, wallet.user_id)
    except PaymentProviderError:
        _end(ext, sa.and_(s.c.id == row_id, s.c.status == "creating"), "error")
        raise
    metadata = {"userId": wallet.user_id, "plan": plan.id, REFERENCE: attempt}
    if wallet.key_id:
        metadata["keyId"] = wallet.key_id
    params: dict[str, Any] = {
        "mode": "subscription",
        "customer": customer,
        "line_items": [{"price": plan.price, "quantity": 1}],
        "client_reference_id": attempt,
        "metadata": metadata,
        "subscription_data": {"metadata": metadata},
        "success_url": success_url,
        "cancel_url": cancel_url,
    }
    if ext.settings.allow_promotion_codes:
        params["allow_promotion_codes"] = True
    try:
        session = ext.gateway.create_checkout_session(params, idempotency_key=attempt)
    except PaymentProviderError:
        _end(ext, sa.and_(s.c.id == row_id, s.c.status == "creating"), "error")
        raise
    # A webhook may have adopted the row already (the status moved on, the session id is set).
    ext.database.write(
        sa.update(s)
        .where(s.c.id == row_id, s.c.status == "creating")
        .values(checkout_session_id=session["id"], status="open", updated_at=ext.database.now())
    )
    return {"id": session["id"], "url": session["url"]}


def _claim(ext: FlaskCredits, wallet_id: int, plan: Plan, attempt: str) -> int:
    """Insert the wallet's pending subscription: the unique ``live_wallet_id`` refuses a second live
    one, whatever runs at once. A pending checkout left behind is ended first, once."""
    s = ext.tables.subscriptions
    for _ in range(2):
        now = ext.database.now()
        try:
            return ext.database.insert(
                sa.insert(s).values(
                    wallet_id=wallet_id,
                    plan=plan.id,
                    status="creating",
                    attempt_key=attempt,
                    cancel_at_period_end=False,
                    live_wallet_id=wallet_id,
                    created_at=now,
                    updated_at=now,
                )
            )
        except sa.exc.IntegrityError:
            row = _live_row(ext, wallet_id)
            if row is not None and not _abandon(ext, row):
                raise AlreadySubscribed(_record(row)) from None
    raise AlreadySubscribed(None)


def _abandon(ext: FlaskCredits, row: Row[Any]) -> bool:
    """End a pending checkout the customer left (True), so the wallet may start another; False when it
    may still become a subscription (a request is creating it now, or Stripe says it completed)."""
    s = ext.tables.subscriptions
    if row.stripe_subscription_id is not None or row.status not in PENDING:
        return False
    if row.status == "creating":
        if row.created_at > ext.database.now() - CREATING_TIMEOUT:
            return False  # another subscribe request is at Stripe right now
        # Its request died: its customer was never given the session's URL.
        return _end(ext, sa.and_(s.c.id == row.id, s.c.status == "creating"), "error")
    try:
        ext.gateway.expire_checkout_session(row.checkout_session_id)
    except PaymentProviderError as exc:
        if exc.kind == "invalid_request":
            return False  # completed (or expired) meanwhile: its events will tell
        raise
    # Expired at Stripe, so it can never complete: ended here, or already by its
    # ``checkout.session.expired`` (which may arrive before this line). Either way the slot is free; a
    # new insert still races any other subscribe request through the unique key.
    _end(
        ext,
        sa.and_(s.c.id == row.id, s.c.status == "open", s.c.stripe_subscription_id.is_(None)),
        "expired",
    )
    return True


def _end(ext: FlaskCredits, where: sa.ColumnElement[bool], status: str, in_tx: InTx | None = None) -> bool:
    """Move the row ``where`` picks to the ended ``status`` (freeing its wallet's live slot)."""
    s = ext.tables.subscriptions
    statement = (
        sa.update(s).where(where).values(status=status, live_wallet_id=None, updated_at=ext.database.now())
    )

    def tx(conn: Connection) -> bool:
        if in_tx is not None:
            in_tx(conn)
        return int(conn.execute(statement).rowcount) == 1

    return ext.database.run(tx)


# -- reading -------------------------------------------------------------------------------------------


def _query(ext: FlaskCredits) -> sa.Select[Any]:
    s, w = ext.tables.subscriptions, ext.tables.wallets
    return sa.select(s, w.c.user_id, w.c.key_id.label("wallet_key_id")).join(w, w.c.id == s.c.wallet_id)


def _row(ext: FlaskCredits, where: sa.ColumnElement[bool]) -> Row[Any] | None:
    with ext.database.reader.connect() as conn:
        return conn.execute(_query(ext).where(where)).first()


def _live_row(ext: FlaskCredits, wallet_id: int) -> Row[Any] | None:
    return _row(ext, ext.tables.subscriptions.c.live_wallet_id == wallet_id)


def _record(row: Row[Any]) -> Subscription:
    return Subscription(
        id=int(row.id),
        user_id=row.user_id,
        key_id=row.wallet_key_id or None,
        plan=row.plan,
        status=row.status,
        current_period_end=row.current_period_end,
        cancel_at_period_end=bool(row.cancel_at_period_end),
        stripe_subscription_id=row.stripe_subscription_id,
        created_at=row.created_at,
    )


def find(ext: FlaskCredits, subscription_id: int) -> Subscription | None:
    row = _row(ext, ext.tables.subscriptions.c.id == subscription_id)
    return None if row is None else _record(row)


def current(ext: FlaskCredits, wallet: Wallet) -> Subscription | None:
    """The wallet's live subscription, once Stripe has it (a checkout still open is not one)."""
    wallet_id = ext.ledger.wallet_id(wallet)
    if wallet_id is None:
        return None
    row = _live_row(ext, wallet_id)
    if row is None or row.status in PENDING:
        return None
    return _record(row)


def stored_row(ext: FlaskCredits, *, checkout_session_id: str) -> Row[Any] | None:
    """The row of a subscription Checkout Session, with its wallet's ``user_id`` and
    ``wallet_key_id`` (for the simulated Stripe, whose state is these rows)."""
    return _row(ext, ext.tables.subscriptions.c.checkout_session_id == checkout_session_id)


def live_rows_of(ext: FlaskCredits, user_id: str) -> list[Row[Any]]:
    """The live subscriptions Stripe has of any of the user's wallets (for the simulated portal)."""
    s, w = ext.tables.subscriptions, ext.tables.wallets
    query = _query(ext).where(
        w.c.user_id == user_id, s.c.live_wallet_id.is_not(None), s.c.stripe_subscription_id.is_not(None)
    )
    with ext.database.reader.connect() as conn:
        return list(conn.execute(query.order_by(s.c.id)))


# -- Stripe's objects ----------------------------------------------------------------------------------


def _id_of(value: object) -> str | None:
    """An expandable field's id: the string itself, or the expanded object's ``id``."""
    if isinstance(value, Mapping):
        value = value.get("id")
    return value if isinstance(value, str) and 0 < len(value) <= 255 else None


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list[Mapping[str, Any]]:
    data = _mapping(value).get("data")
    return [item for item in data if isinstance(item, Mapping)] if isinstance(data, list) else []


def _invoice_subscription(invoice: Mapping[str, Any]) -> tuple[str | None, Mapping[str, Any]]:
    """The subscription an invoice bills, and the subscription's metadata when the invoice was
    finalized: ``parent.subscription_details`` since API version 2025-03-31."""
    details = _mapping(_mapping(invoice.get("parent")).get("subscription_details"))
    return _id_of(details.get("subscription")), _mapping(details.get("metadata"))


def _plan_lines(invoice: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The invoice's lines for the subscription's own items (no prorations, no one-off items)."""
    found = []
    for line in _list(invoice.get("lines")):
        parent = _mapping(line.get("parent"))
        details = _mapping(parent.get("subscription_item_details"))
        if parent.get("type") == "subscription_item_details" and not details.get("proration"):
            found.append(line)
    return found


def _line_price(line: Mapping[str, Any]) -> str | None:
    return _id_of(_mapping(_mapping(line.get("pricing")).get("price_details")).get("price"))


def _subscription_item(subscription: Mapping[str, Any]) -> Mapping[str, Any]:
    items = _list(subscription.get("items"))
    return items[0] if items else {}


# -- linking events to rows ----------------------------------------------------------------------------


def _linked(ext: FlaskCredits, stripe_id: str | None, reference: object) -> Row[Any] | None:
    """The row of Stripe subscription ``stripe_id``: by its id, or (for the first event about it) by
    the attempt key ``reference`` it carries, adopting the id once."""
    if stripe_id is None:
        return None
    s = ext.tables.subscriptions
    row = _row(ext, s.c.stripe_subscription_id == stripe_id)
    if row is not None or not isinstance(reference, str) or not reference.startswith("sub_"):
        return row
    ext.database.write(
        sa.update(s)
        .where(s.c.attempt_key == reference, s.c.stripe_subscription_id.is_(None))
        .values(stripe_subscription_id=stripe_id, updated_at=ext.database.now())
    )
    return _row(ext, s.c.stripe_subscription_id == stripe_id)


def invoice_row(ext: FlaskCredits, invoice: Mapping[str, Any]) -> Row[Any] | None:
    """The row of the subscription ``invoice`` bills, as :func:`invoice_paid` would link it, but
    reading only: by its Stripe id, or by the attempt key it carries while the row has none yet.
    None for an invoice of no subscription this app created."""
    stripe_id, metadata = _invoice_subscription(invoice)
    if stripe_id is None:
        return None
    s = ext.tables.subscriptions
    row = _row(ext, s.c.stripe_subscription_id == stripe_id)
    reference = metadata.get(REFERENCE)
    if row is None and isinstance(reference, str) and reference.startswith("sub_"):
        row = _row(ext, sa.and_(s.c.attempt_key == reference, s.c.stripe_subscription_id.is_(None)))
    return row


def _unknown(ext: FlaskCredits, record: Recorder | None, stripe_id: str | None) -> str:
    log.warning("Stripe subscription %s is not one this app created: nothing done", stripe_id)
    record_only(ext, record, "unknown_subscription", None)
    return "unknown_subscription"


def _status_update(
    ext: FlaskCredits, row_id: int, status: str, *, from_statuses: tuple[str, ...] | None = None
) -> sa.Update:
    """Move a row to ``status`` (from ``from_statuses``, or from any status but an ended one: an
    ended subscription never comes back), freeing its wallet's live slot when ``status`` ends it."""
    s = ext.tables.subscriptions
    where = s.c.status.in_(from_statuses) if from_statuses else s.c.status.not_in(ENDED_SUBSCRIPTION)
    values: dict[str, Any] = {"status": status, "updated_at": ext.database.now()}
    if status in ENDED_SUBSCRIPTION:
        values["live_wallet_id"] = None
    return sa.update(s).where(s.c.id == row_id, where).values(values)


def _later_period_end(ext: FlaskCredits, row_id: int, period_end: datetime) -> sa.Update:
    """Move the row's period end forward only: events about an older period may come late."""
    s = ext.tables.subscriptions
    return (
        sa.update(s)
        .where(
            s.c.id == row_id,
            sa.or_(s.c.current_period_end.is_(None), s.c.current_period_end < period_end),
        )
        .values(current_period_end=period_end)
    )


# -- webhook handlers ----------------------------------------------------------------------------------


def session_completed(ext: FlaskCredits, session: Mapping[str, Any], record: Recorder) -> str:
    """A subscription's Checkout Session completed: link the row to its Stripe subscription."""
    s = ext.tables.subscriptions
    stripe_id = _id_of(session.get("subscription"))
    session_id = _id_of(session.get("id"))
    reference = session.get("client_reference_id")
    row = _linked(ext, stripe_id, reference)
    if row is None and isinstance(reference, str) and session_id is not None:
        # No subscription on the session (yet): find the row by its attempt key alone.
        row = _row(ext, s.c.attempt_key == reference)
    if row is None:
        return _unknown(ext, record, stripe_id)
    paid = session.get("payment_status") in ("paid", "no_payment_required")
    status = "active" if paid else "incomplete"

    def tx(conn: Connection) -> None:
        record.bind("processed", None)(conn)
        if session_id is not None:
            conn.execute(
                sa.update(s)
                .where(s.c.id == row.id, s.c.checkout_session_id.is_(None))
                .values(checkout_session_id=session_id)
            )
        conn.execute(_status_update(ext, int(row.id), status, from_statuses=PENDING))

    ext.database.run(tx)
    return "subscribed"


def session_expired(ext: FlaskCredits, session: Mapping[str, Any], record: Recorder) -> str:
    """A subscription's Checkout Session expired unpaid: the wallet may subscribe again."""
    s = ext.tables.subscriptions
    session_id, reference = _id_of(session.get("id")), session.get("client_reference_id")
    if session_id is None:
        return "ignored"
    where = s.c.checkout_session_id == session_id
    if isinstance(reference, str) and reference.startswith("sub_"):
        where = sa.or_(where, s.c.attempt_key == reference)
    ended = _end(
        ext,
        sa.and_(where, s.c.status.in_(PENDING), s.c.stripe_subscription_id.is_(None)),
        "expired",
        record.bind("processed", None),
    )
    return "expired" if ended else "unchanged"


def invoice_paid(
    ext: FlaskCredits,
    invoice: Mapping[str, Any],
    record: Recorder | None,
    *,
    payment_intent: str | None = None,
) -> str:
    """Grant the plan's allowance for a paid invoice of a subscription, once per invoice.

    ``record`` None: not for its own event (a refund that overtook it); ``payment_intent``: what paid
    it, when known already."""
    stripe_id, details_metadata = _invoice_subscription(invoice)
    if stripe_id is None:
        return "ignored"  # not a subscription's invoice
    row = _linked(ext, stripe_id, details_metadata.get(REFERENCE))
    if row is None:
        return _unknown(ext, record, stripe_id)
    invoice_id = _id_of(invoice.get("id"))
    reason = invoice.get("billing_reason")
    if invoice_id is None or reason not in ALLOWANCE_REASONS:
        record_only(ext, record, "ignored", None)
        return "ignored"
    lines = _plan_lines(invoice)
    prices = [price for price in map(_line_price, lines) if price]
    # The plan the invoice charged for (a downgrade shows first on its renewal's invoice), else the
    # row's.
    plan = next(filter(None, map(ext.settings.plan_for_price, prices)), None) or ext.settings.plan(row.plan)
    if plan is None:
        log.error("invoice %s is for no plan of CREDITS_PLANS (prices %s): not credited", invoice_id, prices)
        record_only(ext, record, "unknown_plan", None)
        return "unknown_plan"
    ends = [stripe_time(_mapping(line.get("period")).get("end")) for line in lines]
    period_end = max((end for end in ends if end is not None), default=None) or stripe_time(
        invoice.get("period_end")
    )
    # The invoice names it only when its ``payments`` were included; else ask Stripe.
    payments = _list(invoice.get("payments"))
    payment_intent = (
        payment_intent or paid_payment_intent(payments) or ext.gateway.invoice_payment_intent(invoice_id)
    )
    purchase_id = _invoice_purchase(ext, row, invoice_id, invoice, plan)
    s = ext.tables.subscriptions
    recorded = record.bind("processed", purchase_id) if record is not None else None

    def in_tx(conn: Connection) -> None:
        if recorded is not None:
            recorded(conn)
        # Paid: live again after a failed payment, and active even if its checkout's event is late.
        conn.execute(
            _status_update(
                ext, int(row.id), "active", from_statuses=(*PENDING, "incomplete", "past_due", "unpaid")
            )
        )
        if period_end is not None:
            conn.execute(_later_period_end(ext, int(row.id), period_end))
        conn.execute(sa.update(s).where(s.c.id == row.id).values(updated_at=ext.database.now()))

    done = ext.ledger.fulfil_purchase(
        purchase_id,
        payment_intent=payment_intent,
        in_tx=in_tx,
        expires_at=None if plan.rollover else period_end,
        reason=f"{plan.name} plan: {plan.credits} credits",
    )
    if done is None:
        return "already_fulfilled"
    subscription = find(ext, int(row.id))
    ext.emit(signals.credits_granted, wallet=done.wallet, amount=done.entry.amount, entry=done.entry)
    signal = signals.plan_started if reason == "subscription_create" else signals.plan_renewed
    amount = done.entry.amount
    ext.emit(signal, wallet=done.wallet, subscription=subscription, amount=amount, entry=done.entry)
    return "fulfilled"


def _invoice_purchase(
    ext: FlaskCredits, row: Row[Any], invoice_id: str, invoice: Mapping[str, Any], plan: Plan
) -> int:
    """The purchase row of a paid invoice, inserted by the first delivery to get here (the unique
    ``invoice_id`` turns the others' INSERT into an IntegrityError: then it is read)."""
    p = ext.tables.purchases
    paid = invoice.get("amount_paid")
    amount = paid if isinstance(paid, int) and not isinstance(paid, bool) and paid >= 0 else 0
    currency = str(invoice.get("currency") or "").lower()
    now = ext.database.now()
    try:
        return ext.database.insert(
            sa.insert(p).values(
                wallet_id=row.wallet_id,
                # The invoice is the attempt: unique, and never an attempt key a browser is given.
                attempt_key="inv_" + hashlib.sha256(invoice_id.encode()).hexdigest()[:32],
                pack=plan.id,
                credits=plan.credits,
                amount=amount,
                currency=currency if len(currency) == 3 else ext.settings.currency,
                # Fulfillable, and not counted against CREDITS_MAX_OPEN_PURCHASES.
                status="unpaid",
                invoice_id=invoice_id,
                subscription_id=row.id,
                created_at=now,
                updated_at=now,
            )
        )
    except sa.exc.IntegrityError:
        with ext.database.reader.connect() as conn:
            found = conn.execute(sa.select(p.c.id).where(p.c.invoice_id == invoice_id)).scalar_one_or_none()
        if found is None:
            raise
        return int(found)


def subscription_updated(ext: FlaskCredits, subscription: Mapping[str, Any], record: Recorder) -> str:
    """Status, period end, cancel at period end, and a plan change: an upgrade grants the difference
    in allowance at once, until the period's end; a downgrade grants nothing (the renewal's invoice
    grants the new plan).

    The plan changed from is the one the event says it had before (``previous_attributes``), so
    changes delivered in any order grant what each change was worth, once; without one, the stored
    plan. Plan, status and cancellation move only forward in Stripe's time (the event's
    ``created``): a late older event does not undo a newer one."""
    stripe_id = _id_of(subscription.get("id"))
    row = _linked(ext, stripe_id, _mapping(subscription.get("metadata")).get(REFERENCE))
    if row is None:
        return _unknown(ext, record, stripe_id)
    s = ext.tables.subscriptions
    item = _subscription_item(subscription)
    # Since API version 2025-03-31 the period is on the subscription's items.
    period_end = stripe_time(item.get("current_period_end")) or stripe_time(
        subscription.get("current_period_end")
    )
    status = subscription.get("status")
    new = ext.settings.plan_for_price(_id_of(item.get("price")) or "")
    old = None
    if "items" in record.previous_attributes:
        before = _subscription_item(record.previous_attributes)
        old = ext.settings.plan_for_price(_id_of(before.get("price")) or "")
    previous = old.id if old is not None else str(row.plan)
    old = old or ext.settings.plan(row.plan)
    entry = None
    if new is not None and old is not None and new.id != old.id:
        entry = _upgrade(ext, row, old, new, period_end, status)
    at = record.created

    def tx(conn: Connection) -> bool:
        record.bind("processed", None)(conn)
        if period_end is not None:
            conn.execute(_later_period_end(ext, int(row.id), period_end))
        # Not older than what the row shows (an event without a time counts as the newest).
        newer = sa.true() if at is None else sa.or_(s.c.stripe_event_at.is_(None), s.c.stripe_event_at <= at)
        moved = 0
        if new is not None:
            moved = conn.execute(
                sa.update(s).where(s.c.id == row.id, newer, s.c.plan != new.id).values(plan=new.id)
            ).rowcount
        if isinstance(status, str) and status and len(status) <= 24:
            conn.execute(_status_update(ext, int(row.id), status).where(newer))
        conn.execute(
            sa.update(s)
            .where(s.c.id == row.id, newer)
            .values(
                cancel_at_period_end=bool(subscription.get("cancel_at_period_end")),
                stripe_event_at=s.c.stripe_event_at if at is None else at,
                updated_at=ext.database.now(),
            )
        )
        return int(moved) == 1

    moved = ext.database.run(tx)
    granted = entry if entry is not None and not entry.replayed else None
    if new is None or new.id == previous or (granted is None and not moved):
        # No change, or this one was seen already (or a newer event has the last word on the plan).
        return "updated"
    ext.emit(
        signals.plan_changed,
        wallet=Wallet(row.user_id, row.wallet_key_id or None),
        subscription=find(ext, int(row.id)),
        previous=previous,
        amount=0 if granted is None else granted.amount,
        entry=granted,
    )
    return "plan_changed"


def _upgrade(
    ext: FlaskCredits, row: Row[Any], old: Plan, new: Plan, period_end: datetime | None, status: object
) -> Entry | None:
    """Grant ``new``'s extra allowance over ``old`` until ``period_end``; once per change and period
    (the idempotency key), so a repeated or retried event grants nothing more. None for a downgrade,
    an unpaid subscription, or a period already over."""
    if new.credits <= old.credits or period_end is None or status not in ("active", "trialing"):
        return None
    if period_end <= ext.database.now():
        return None
    key = f"plan-upgrade:{row.id}:{int(period_end.timestamp())}:{old.id}>{new.id}"
    return ext.ledger.grant(
        Wallet(row.user_id, row.wallet_key_id or None),
        new.credits - old.credits,
        reason=f"upgraded to {new.name}: {new.credits - old.credits} credits for the rest of the period",
        expires_at=None if new.rollover else period_end,
        idempotency_key=key,
        metadata={"subscription_id": int(row.id), "plan": new.id, "previous": old.id},
    )


def subscription_deleted(ext: FlaskCredits, subscription: Mapping[str, Any], record: Recorder) -> str:
    """The subscription ended: nothing more is granted; what was granted stays until it expires."""
    stripe_id = _id_of(subscription.get("id"))
    row = _linked(ext, stripe_id, _mapping(subscription.get("metadata")).get(REFERENCE))
    if row is None:
        return _unknown(ext, record, stripe_id)
    s = ext.tables.subscriptions

    def tx(conn: Connection) -> bool:
        record.bind("processed", None)(conn)
        ended = conn.execute(
            sa.update(s)
            .where(s.c.id == row.id, s.c.status != "canceled")
            .values(
                status="canceled",
                live_wallet_id=None,
                cancel_at_period_end=bool(subscription.get("cancel_at_period_end")),
                updated_at=ext.database.now(),
            )
        )
        return int(ended.rowcount) == 1

    if not ext.database.run(tx):
        return "unchanged"
    wallet = Wallet(row.user_id, row.wallet_key_id or None)
    ext.emit(signals.plan_cancelled, wallet=wallet, subscription=find(ext, int(row.id)))
    return "cancelled"


def invoice_payment_failed(ext: FlaskCredits, invoice: Mapping[str, Any], record: Recorder) -> str:
    """An invoice of a plan could not be charged: the subscription is past due; nothing is granted."""
    stripe_id, details_metadata = _invoice_subscription(invoice)
    if stripe_id is None:
        return "ignored"
    row = _linked(ext, stripe_id, details_metadata.get(REFERENCE))
    if row is None:
        return _unknown(ext, record, stripe_id)

    def tx(conn: Connection) -> None:
        record.bind("processed", None)(conn)
        conn.execute(
            _status_update(
                ext, int(row.id), "past_due", from_statuses=(*PENDING, "incomplete", "trialing", "active")
            )
        )

    ext.database.run(tx)
    ext.emit(
        signals.credits_payment_failed,
        wallet=Wallet(row.user_id, row.wallet_key_id or None),
        purchase=None,
        subscription=find(ext, int(row.id)),
    )
    return "past_due"
