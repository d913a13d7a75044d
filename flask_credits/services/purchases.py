"""Buying credits: what a checkout sells, the pending purchase row, and fulfilment from a Checkout
Session. Balances themselves change only in :mod:`flask_credits.ledger`.

Fulfilment trusts the purchase row written before the customer was sent to Stripe (wallet, credits,
amount, currency), never the event's metadata: a session this app did not create, or whose amount or
currency differ from the row, is recorded and not credited.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .. import signals
from ..core.ledger import InTx
from ..errors import CreditsError, InvalidArgument
from ..records import FULFILLABLE, Purchase, Wallet
from ..settings import Settings
from . import customers
from .stripe_gateway import PaymentProviderError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Row

    from ..extension import FlaskCredits

log = logging.getLogger("flask_credits")

PAID = ("paid", "no_payment_required")

#: Statuses of a checkout the customer may still pay at Stripe: these count against
#: ``CREDITS_MAX_OPEN_PURCHASES``.
UNFINISHED = ("creating", "open")
#: The longest a Checkout Session lives at Stripe (its default ``expires_at``). An unfinished purchase
#: older than this is over even if its ``checkout.session.expired`` event never arrived, so it stops
#: counting.
SESSION_LIFETIME = timedelta(hours=24)
#: What ``start_checkout`` makes the attempt keys look like: the cancel page looks nothing else up.
ATTEMPT_KEY = re.compile(r"chk_[0-9a-f]{32}")
#: The checkouts the credits page lists as unfinished: ``open`` (the customer may still pay, or cancel,
#: at Stripe) and ``unpaid`` (completed with a delayed payment method, waiting for the money).
PENDING = ("open", "unpaid")
#: At most this many of them are listed (``unpaid`` ones are not capped by CREDITS_MAX_OPEN_PURCHASES).
PENDING_LISTED = 20
#: How long an ``unpaid`` checkout stays listed: delayed methods settle in days (a SEPA Direct Debit
#: can take up to 14 business days), long after its session's 24 hours.
UNPAID_LISTED_FOR = timedelta(days=21)


class BadCheckout(InvalidArgument):
    """A checkout request the server refuses (unknown pack, bad quantity...): HTTP 400."""


class TooManyOpenCheckouts(CreditsError):
    """The wallet already has ``limit`` unfinished checkouts (``CREDITS_MAX_OPEN_PURCHASES``): HTTP 429
    with ``Retry-After: retry_after`` (seconds until the oldest stops counting). Nothing was written
    and Stripe was not called."""

    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(
            f"You already have {limit} unfinished checkouts. Complete or cancel one of them,"
            " or try again later."
        )
        self.limit = limit
        self.retry_after = retry_after


@dataclass(frozen=True)
class Offer:
    """What one checkout sells, decided by the server alone."""

    credits: int
    amount: int | None  # minor units; None for a Stripe Price whose amount Stripe reports
    currency: str
    pack: str | None
    quantity: int | None
    line_item: dict[str, Any]
    expires_after: int | None  # seconds


def offer_for(settings: Settings, data: Mapping[str, Any]) -> Offer:
    """Turn a checkout request (``pack`` or ``quantity``) into an Offer, or raise BadCheckout.

    Anything else the client sends about credits or prices is ignored.
    """
    pack_id, quantity = data.get("pack"), data.get("quantity")
    if pack_id not in (None, "") and quantity not in (None, ""):
        raise BadCheckout("choose a pack or a quantity, not both")
    if pack_id not in (None, ""):
        found = settings.pack(str(pack_id))
        if found is None:
            raise BadCheckout(f"unknown pack {str(pack_id)[:64]!r}")
        if found.price:
            item: dict[str, Any] = {"price": found.price, "quantity": 1}
        else:
            item = {
                "price_data": {
                    "currency": found.currency,
                    "product_data": {"name": found.name, "description": f"{found.credits} credits"},
                    "unit_amount": found.amount,
                },
                "quantity": 1,
            }
        return Offer(found.credits, found.amount, found.currency, found.id, None, item, found.expires_after)
    if quantity in (None, ""):
        raise BadCheckout("choose a pack or a quantity")
    units = _quantity(quantity, settings.max_quantity)
    per_unit, unit_amount, currency = settings.per_unit, settings.unit_amount, settings.currency
    item = {
        "price_data": {
            "currency": currency,
            "product_data": {
                "name": settings.product_name,
                "description": f"{per_unit} credits",
            },
            "unit_amount": unit_amount,
        },
        "quantity": units,
    }
    return Offer(
        units * per_unit,
        units * unit_amount,
        currency,
        None,
        units,
        item,
        settings.purchase_expires_after,
    )


def _quantity(value: object, maximum: int) -> int:
    if isinstance(value, bool):
        raise BadCheckout("quantity must be a whole number")
    if isinstance(value, str):
        text = value.strip()
        if not text.isdecimal() or len(text) > 9:
            raise BadCheckout("quantity must be a whole number")
        value = int(text)
    if not isinstance(value, int):
        raise BadCheckout("quantity must be a whole number")
    if not 1 <= value <= maximum:
        raise BadCheckout(f"quantity must be between 1 and {maximum}")
    return value


def start_checkout(
    ext: FlaskCredits, wallet: Wallet, offer: Offer, *, success_url: str, cancel_url: str
) -> dict[str, Any]:
    """Store the pending purchase, then create its Checkout Session; returns ``{"id", "url"}``.
    ``success_url`` gets Stripe's ``?session_id={CHECKOUT_SESSION_ID}``, ``cancel_url`` the
    purchase's attempt key (``?attempt=``), which only this customer's browser is given.

    The row is committed before Stripe is called, with a fresh key that is both Stripe's idempotency
    key and the session's ``client_reference_id``; a webhook that overtakes this function still finds
    its purchase. If Stripe fails the row becomes ``error`` and can never be credited. Raises
    :class:`TooManyOpenCheckouts`, before writing a purchase or creating a session, when the wallet
    already has ``CREDITS_MAX_OPEN_PURCHASES`` unfinished checkouts.

    The session is for the wallet owner's Stripe Customer (:func:`customers.customer_id`), found or
    created before the purchase row is written: if Stripe fails there, no purchase exists at all.
    """
    p = ext.tables.purchases
    customer = customers.customer_id(ext, wallet.user_id)
    wallet_id = ext.ledger.wallet_id(wallet, create=True)
    assert wallet_id is not None
    attempt = "chk_" + secrets.token_hex(16)
    now = ext.database.now()
    purchase_id = _insert_within_cap(
        ext,
        wallet_id,
        now,
        dict(
            wallet_id=wallet_id,
            attempt_key=attempt,
            pack=offer.pack,
            quantity=offer.quantity,
            credits=offer.credits,
            amount=offer.amount or 0,
            currency=offer.currency,
            status="creating",
            expires_after_seconds=offer.expires_after,
            created_at=now,
            updated_at=now,
        ),
    )
    metadata = {"userId": wallet.user_id, "credits": str(offer.credits), "purchaseId": str(purchase_id)}
    if wallet.key_id:
        metadata["keyId"] = wallet.key_id
    params: dict[str, Any] = {
        "mode": "payment",
        # Receipts, cards and invoices of all the user's purchases in one place (with a customer,
        # Checkout creates none: no customer_creation).
        "customer": customer,
        "line_items": [offer.line_item],
        "client_reference_id": attempt,
        "metadata": metadata,
        "payment_intent_data": {"metadata": metadata},
        # Stripe fills in {CHECKOUT_SESSION_ID} on the success URL only; the cancel page finds the
        # purchase by its attempt key.
        "success_url": _with_query(success_url, "session_id={CHECKOUT_SESSION_ID}"),
        "cancel_url": _with_query(cancel_url, f"attempt={attempt}"),
    }
    if ext.settings.allow_promotion_codes:
        params["allow_promotion_codes"] = True
    try:
        session = ext.gateway.create_checkout_session(params, idempotency_key=attempt)
    except PaymentProviderError:
        _set_status(ext, purchase_id, "error", ("creating",))
        raise
    values: dict[str, Any] = {"session_id": session["id"], "status": "open", "updated_at": ext.database.now()}
    if offer.amount is None and isinstance(session.get("amount_total"), int):
        values["amount"] = session["amount_total"]
    # A webhook may have adopted the row already (status moved on): the session id is then set.
    ext.database.write(sa.update(p).where(p.c.id == purchase_id, p.c.status == "creating").values(values))
    return {"id": session["id"], "url": session["url"]}


def _with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


def _insert_within_cap(ext: FlaskCredits, wallet_id: int, now: datetime, row: dict[str, Any]) -> int:
    """Insert the purchase ``row`` unless the wallet already has its cap of unfinished checkouts.

    Count and insert must not race (twenty checkouts at once would all count four and all insert), so
    the transaction first locks the wallet row with an UPDATE that changes nothing (never the balance),
    and only then counts. Every checkout of the wallet takes that lock first, so they run one after
    another, and each one's count sees the rows of those before it:

    * PostgreSQL (READ COMMITTED): each statement reads a snapshot taken when it starts; the count
      starts after the UPDATE got the lock, so after the previous holder committed its row.
    * MariaDB/MySQL (REPEATABLE READ): InnoDB takes the transaction's read view at its first plain
      read, which is the count, after the lock; the UPDATE is a locking read of the newest row.
    * SQLite: the UPDATE takes the database's write lock; the transaction read nothing before it.
    """
    cap = ext.settings.max_open_purchases
    p, w = ext.tables.purchases, ext.tables.wallets

    def tx(conn: Connection) -> int:
        conn.execute(sa.update(w).where(w.c.id == wallet_id).values(updated_at=w.c.updated_at))
        count, oldest = conn.execute(
            sa.select(sa.func.count(), sa.func.min(p.c.created_at)).where(
                p.c.wallet_id == wallet_id,
                p.c.status.in_(UNFINISHED),
                p.c.created_at > now - SESSION_LIFETIME,
            )
        ).one()
        if count >= cap:
            wait = (oldest + SESSION_LIFETIME - now).total_seconds()
            raise TooManyOpenCheckouts(cap, max(1, math.ceil(wait)))
        return int(conn.execute(sa.insert(p).values(row)).inserted_primary_key[0])  # type: ignore[index]

    return ext.database.run(tx)


def claim_stripe_check(ext: FlaskCredits, purchase_id: int) -> bool:
    """Whether this request may ask Stripe about the purchase now: at most one request per
    ``CREDITS_SUCCESS_CHECK_INTERVAL`` may, across threads and processes, decided by one conditional
    UPDATE of ``checked_at`` (the row count says who won). The success and cancel pages share it."""
    interval = ext.settings.success_check_interval
    p = ext.tables.purchases
    now = ext.database.now()
    won = ext.database.write(
        sa.update(p)
        .where(p.c.id == purchase_id, sa.or_(p.c.checked_at.is_(None), p.c.checked_at <= now - interval))
        .values(checked_at=now)
    )
    return won == 1


def cancel(ext: FlaskCredits, user_id: str, attempt: str) -> Purchase | None:
    """The customer came back from Stripe without paying: expire the Checkout Session at Stripe so the
    purchase stops counting against the cap at once, and mark it ``expired``, but only if Stripe
    agreed (a session completed meanwhile cannot be expired: the row is left as it is, for the
    webhook). Only the owner's own ``open`` purchase, named by its attempt key, at most once per
    ``CREDITS_SUCCESS_CHECK_INTERVAL``. Returns the purchase (None if it is not this user's)."""
    purchase = own_attempt(ext, user_id, attempt)
    if purchase is None:
        return None
    if purchase.status != "open" or purchase.session_id is None or not claim_stripe_check(ext, purchase.id):
        return purchase
    try:
        ext.gateway.expire_checkout_session(purchase.session_id)
    except PaymentProviderError:
        return purchase  # completed meanwhile, or Stripe unreachable (logged): its events will tell
    _set_status(ext, purchase.id, "expired", ("open",))
    return find(ext, id=purchase.id)


def own_attempt(ext: FlaskCredits, user_id: str, attempt: str) -> Purchase | None:
    """The user's purchase with this attempt key; None for anything else (not a key, another user's)."""
    if not ATTEMPT_KEY.fullmatch(attempt):
        return None
    purchase = find(ext, attempt_key=attempt)
    return purchase if purchase is not None and purchase.wallet.user_id == user_id else None


def resume_url(ext: FlaskCredits, purchase: Purchase) -> str | None:
    """Where the customer pays an ``open`` purchase: its Checkout Session's ``url``, asked of Stripe
    now (one call, since the url is not stored), or None when the session is no longer open (paid,
    completed with a delayed method, or expired: its webhook tells the rest)."""
    if purchase.status != "open" or purchase.session_id is None:
        return None
    session = ext.gateway.retrieve_checkout_session(purchase.session_id)
    url = session.get("url")
    return url if session.get("status") == "open" and isinstance(url, str) and url else None


@dataclass(frozen=True)
class Pending:
    """An unfinished checkout the buyer's credits page lists, with its attempt key (the secret that
    resumes or cancels it: render it on the buyer's own page only)."""

    purchase: Purchase
    attempt: str


def pending(ext: FlaskCredits, user_id: str, key_ids: list[str | None]) -> list[Pending]:
    """The user's :data:`PENDING` checkouts in the wallets of ``key_ids`` (None is the account's own),
    newest first: open ones started within the last :data:`SESSION_LIFETIME` (an older open one has
    expired at Stripe), unpaid ones within :data:`UNPAID_LISTED_FOR`. Automatic (auto top-up) purchases
    are not checkouts and are left out."""
    p, w = ext.tables.purchases, ext.tables.wallets
    now = ext.database.now()
    query = (
        sa.select(p, w.c.user_id, w.c.key_id.label("wallet_key_id"))
        .join(w, w.c.id == p.c.wallet_id)
        .where(
            w.c.user_id == user_id,
            w.c.key_id.in_([key_id or "" for key_id in key_ids]),
            p.c.automatic.is_(False),
            p.c.session_id.is_not(None),
            sa.or_(
                sa.and_(p.c.status == "open", p.c.created_at > now - SESSION_LIFETIME),
                sa.and_(p.c.status == "unpaid", p.c.created_at > now - UNPAID_LISTED_FOR),
            ),
        )
        .order_by(p.c.id.desc())
        .limit(PENDING_LISTED)
    )
    with ext.database.reader.connect() as conn:
        rows = conn.execute(query).all()
    return [Pending(_purchase(ext, row), str(row.attempt_key)) for row in rows]


def attempt_key_of(ext: FlaskCredits, purchase_id: int) -> str:
    """The purchase's attempt key: its Stripe idempotency key and ``client_reference_id``."""
    row = _row(ext, id=purchase_id)
    assert row is not None
    return str(row.attempt_key)


def find(ext: FlaskCredits, **where: Any) -> Purchase | None:
    """The purchase with the given ``session_id``, ``payment_intent`` or ``id``."""
    row = _row(ext, **where)
    return None if row is None else _purchase(ext, row)


def _row(ext: FlaskCredits, **where: Any) -> Row[Any] | None:
    if len(where) == 1:
        [(column, value)] = where.items()
        built = ext.database.sql.purchase_by.get(column)
        if built is not None and value is not None:  # None: the query below says IS NULL
            with ext.database.reader.connect() as conn:
                return conn.execute(built, {"b_value": value}).first()
    p = ext.tables.purchases
    query = ext.database.sql.purchase_with_owner
    for column, value in where.items():
        query = query.where(p.c[column] == value)
    with ext.database.reader.connect() as conn:
        return conn.execute(query).first()


def _purchase(ext: FlaskCredits, row: Row[Any]) -> Purchase:
    return Purchase(
        id=int(row.id),
        wallet=Wallet(row.user_id, row.wallet_key_id or None),
        session_id=row.session_id,
        pack=row.pack,
        quantity=row.quantity,
        credits=int(row.credits),
        amount=int(row.amount),
        currency=row.currency,
        status=row.status,
        payment_intent=row.payment_intent,
        refund_revoked=int(row.refund_revoked),
        dispute_revoked=int(row.dispute_revoked),
        created_at=row.created_at,
    )


def _set_status(
    ext: FlaskCredits,
    purchase_id: int,
    status: str,
    from_statuses: tuple[str, ...],
    in_tx: InTx | None = None,
) -> bool:
    p = ext.tables.purchases
    now = ext.database.now()

    def tx(conn: Connection) -> bool:
        if in_tx is not None:
            in_tx(conn)
        changed = conn.execute(
            sa.update(p)
            .where(p.c.id == purchase_id, p.c.status.in_(from_statuses))
            .values(status=status, updated_at=now)
        )
        return changed.rowcount == 1

    return ext.database.run(tx)


def _object_id(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("id"), str):
        return str(value["id"])
    return None


def purchase_for_session(ext: FlaskCredits, session: Mapping[str, Any]) -> Purchase | None:
    """The purchase behind a Checkout Session: by session id, or (when the webhook overtook the
    checkout view) by ``client_reference_id``, adopting the session id once."""
    session_id = session.get("id")
    if not isinstance(session_id, str):
        return None
    found = find(ext, session_id=session_id)
    if found is not None:
        return found
    reference = session.get("client_reference_id")
    if not isinstance(reference, str) or not reference.startswith("chk_"):
        return None
    p = ext.tables.purchases
    ext.database.write(
        sa.update(p)
        .where(p.c.attempt_key == reference, p.c.session_id.is_(None), p.c.status == "creating")
        .values(session_id=session_id, status="open", updated_at=ext.database.now())
    )
    return find(ext, session_id=session_id)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _discounted(ext: FlaskCredits, session: Mapping[str, Any], purchase: Purchase) -> int | None:
    """What was paid for ``purchase`` when a promotion code discounted it (CREDITS_ALLOW_PROMOTION_CODES):
    the subtotal is the purchase's price and the total is it less Stripe's reported discount. None
    otherwise (the amounts are then checked as they are)."""
    if not ext.settings.allow_promotion_codes:
        return None
    subtotal, total = session.get("amount_subtotal"), session.get("amount_total")
    details = session.get("total_details")
    discount = details.get("amount_discount") if isinstance(details, Mapping) else None
    if not (_count(subtotal) and _count(total) and _count(discount)):
        return None
    assert isinstance(subtotal, int)
    assert isinstance(total, int)
    assert isinstance(discount, int)
    if discount == 0 or subtotal != purchase.amount or total != subtotal - discount:
        return None
    return total


def fulfil(ext: FlaskCredits, session: Mapping[str, Any], *, record: Recorder | None = None) -> str:
    """Credit the purchase of a Checkout Session if it is paid, exactly once; idempotent and safe to
    run concurrently from webhooks and the success page. Returns what happened."""
    purchase = _purchase_of(ext, session, record)
    if purchase is None:
        return "unknown_session"
    in_tx = record.bind("processed", purchase.id) if record else None
    amount, currency = session.get("amount_total"), str(session.get("currency") or "").lower()
    paid = _discounted(ext, session, purchase)
    if paid is not None:
        # A Stripe promotion code: the full credits for less; the row keeps what was paid, so refunds
        # (which report amounts of the charge) claw back in proportion to it.
        amount, recorded, pid = purchase.amount, in_tx, purchase.id

        def in_tx(conn: Connection) -> None:
            if recorded is not None:
                recorded(conn)
            p = ext.tables.purchases
            conn.execute(sa.update(p).where(p.c.id == pid, p.c.status.in_(FULFILLABLE)).values(amount=paid))

    if amount != purchase.amount or currency != purchase.currency:
        log.error(
            "Checkout Session %s reports %s %s, but purchase %s was for %s %s: not credited",
            session.get("id"),
            amount,
            currency,
            purchase.id,
            purchase.amount,
            purchase.currency,
        )
        _set_status(
            ext,
            purchase.id,
            "mismatch",
            FULFILLABLE,
            record.bind("mismatch", purchase.id) if record else None,
        )
        return "amount_mismatch"
    payment_status = session.get("payment_status")
    if payment_status in PAID:
        payment_intent = _object_id(session.get("payment_intent"))
        done = ext.ledger.fulfil_purchase(purchase.id, payment_intent=payment_intent, in_tx=in_tx)
        if done is None:
            now = find(ext, id=purchase.id)
            if now is not None and now.status != "fulfilled":
                log.error(
                    "paid Checkout Session %s arrived for %s purchase %s: not credited",
                    session.get("id"),
                    now.status,
                    purchase.id,
                )
                return "not_fulfillable"
            return "already_fulfilled"
        # As the crediting transaction left it (nothing is clawed back before fulfilment).
        fulfilled = dataclasses.replace(purchase, status="fulfilled", payment_intent=payment_intent)
        ext.emit(
            signals.credits_purchased,
            wallet=done.wallet,
            amount=done.entry.amount,
            entry=done.entry,
            purchase=fulfilled,
        )
        return "fulfilled"
    if payment_status == "unpaid" and session.get("status") == "complete":
        _set_status(ext, purchase.id, "unpaid", ("creating", "open"), in_tx)
        return "awaiting_payment"
    record_only(ext, record, "ignored", purchase.id)
    return "ignored"


def mark(
    ext: FlaskCredits,
    session: Mapping[str, Any],
    status: str,
    from_statuses: tuple[str, ...],
    *,
    record: Recorder | None = None,
) -> str:
    """Move a session's purchase to ``failed`` or ``expired`` (no credits move), once."""
    purchase = _purchase_of(ext, session, record)
    if purchase is None:
        return "unknown_session"
    in_tx = record.bind("processed", purchase.id) if record else None
    if not _set_status(ext, purchase.id, status, from_statuses, in_tx):
        return "unchanged"
    if status == "failed":
        ext.emit(signals.credits_payment_failed, wallet=purchase.wallet, purchase=find(ext, id=purchase.id))
    return status


def _purchase_of(ext: FlaskCredits, session: Mapping[str, Any], record: Recorder | None) -> Purchase | None:
    """The session's purchase, or None after recording the event as about an unknown session."""
    purchase = purchase_for_session(ext, session)
    if purchase is None:
        log.warning("Checkout Session %s is not one of this app's purchases", session.get("id"))
        record_only(ext, record, "unknown_session", None)
    return purchase


def revoke(
    ext: FlaskCredits,
    purchase: Purchase,
    *,
    cause: str,
    refund_target: int | None = None,
    dispute_target: int | None = None,
    record: Recorder | None = None,
) -> str:
    done = ext.ledger.revoke_purchase(
        purchase.id,
        refund_target=refund_target,
        dispute_target=dispute_target,
        in_tx=record.bind("processed", purchase.id) if record else None,
    )
    if done is None:
        return "not_fulfilled"
    if done.change == 0:
        return "unchanged"
    ext.emit(
        signals.credits_revoked,
        wallet=done.wallet,
        amount=done.credits_taken + done.debt_added,
        entry=done.entry,
        purchase=find(ext, id=purchase.id),
        cause=cause,
    )
    return "revoked" if done.change > 0 else "reinstated"


class Recorder:
    """Writes a webhook event's row inside the transaction that acts on it."""

    def __init__(
        self,
        ext: FlaskCredits,
        event_id: str,
        event_type: str,
        *,
        created: datetime | None = None,
        previous_attributes: Mapping[str, Any] | None = None,
    ) -> None:
        self.ext, self.event_id, self.event_type = ext, event_id, event_type
        #: When Stripe created the event (None if it did not say), and what a ``*.updated``
        #: event's object had before.
        self.created, self.previous_attributes = created, previous_attributes or {}
        #: Whether the event's row was written (in a transaction that then committed, or this
        #: delivery would have failed).
        self.recorded = False

    def bind(self, outcome: str, purchase_id: int | None) -> InTx:
        def insert(conn: Connection) -> None:
            self.recorded = True
            database = self.ext.database
            conn.execute(
                database.sql.insert_event,
                {
                    "id": self.event_id,
                    "type": self.event_type,
                    "outcome": outcome,
                    "purchase_id": purchase_id,
                    "received_at": database.now(),
                },
            )

        return insert


def record_only(ext: FlaskCredits, record: Recorder | None, outcome: str, purchase_id: int | None) -> None:
    if record is not None:
        ext.database.run(record.bind(outcome, purchase_id))
