"""Auto top-up: when a debit takes a wallet from at or above its threshold to below it, buy its pack
off-session with the saved card, once for that crossing; and ``credits_low`` for everyone else.

How "once per crossing" holds, whatever runs at once:

* A crossing is a property of one debit entry: ``balance_after`` below the threshold and
  ``balance_after - amount`` at or above it (credits held count as the wallet's, as in every entry).
  Debits of a wallet are serialized on its row, so concurrent debits that end below the threshold
  have one such entry between them. The ledger hands each committed debit to :func:`debited` with
  the thresholds its own UPDATE returned: no query for a wallet without any.
* Acting on it is ONE conditional UPDATE of the wallet's ``credits_auto_top_ups`` row, which moves
  ``crossing_entry_id`` forward to the entry only while auto top-up is on, nothing is in flight, the
  month's cap has room and the debt is no larger than the pack; the automatic purchase's row is
  written in the same transaction, and its attempt key is derived from the entry (unique). So the
  request that debited and the sweep (``flask credits top-up --due``) can both try: one wins.
* The Stripe call is never made in that transaction nor before the response: it runs when the
  response closes (``call_on_close``), or on a worker thread outside a request, and the sweep makes it
  for any purchase a dead worker left, with the same idempotency key (derived from the purchase row),
  so Stripe charges it once. A lease on the purchase row keeps two workers from calling at once.
* ``payment_intent.succeeded`` (or the call's own answer) credits the purchase through the same
  exactly-once fulfilment as a checkout; a decline or a bank asking for 3-D Secure turns auto top-up off
  for the wallet and sends ``auto_top_up_failed``.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from flask import current_app

from .. import signals
from ..core.inputs import make_wallet
from ..core.ledger import Limits
from ..errors import CreditsError, InvalidArgument
from ..records import AutoTopUp, Entry, Wallet
from . import customers
from .purchases import BadCheckout, find, offer_for
from .stripe_gateway import PaymentProviderError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Row

    from ..extension import FlaskCredits

log = logging.getLogger("flask_credits")

#: How long one worker owns an automatic purchase's Stripe call; past it, the sweep may call again
#: (with the same idempotency key: Stripe answers with the first call's PaymentIntent).
LEASE = timedelta(seconds=60)
#: Stripe keeps an idempotency key 24 hours: an automatic purchase not confirmed within this is not
#: called again (a second PaymentIntent could charge twice); it is marked ``error``, and the webhook
#: still credits it if Stripe did charge it.
CALL_WINDOW = timedelta(hours=23)
#: Metadata key naming the purchase row on the PaymentIntent.
PURCHASE = "purchaseId"


class BadAutoTopUp(InvalidArgument):
    """Settings that cannot work: HTTP 400."""


class CardRequired(CreditsError):
    """Auto top-up was turned on for a wallet with no saved card: HTTP 409 ``card_required``."""

    def __init__(self) -> None:
        super().__init__("Save a card first: auto top-up buys with a saved card.")


# -- settings ------------------------------------------------------------------------------------------


def _row(ext: FlaskCredits, wallet: Wallet) -> Row[Any] | None:
    a, w = ext.tables.auto_top_ups, ext.tables.wallets
    query = (
        sa.select(a, w.c.user_id, w.c.key_id.label("wallet_key_id"))
        .join(w, w.c.id == a.c.wallet_id)
        .where(w.c.user_id == wallet.user_id, w.c.key_id == (wallet.key_id or ""))
    )
    with ext.database.reader.connect() as conn:
        return conn.execute(query).first()


def _month(when: datetime) -> str:
    return when.strftime("%Y-%m")


def _record(ext: FlaskCredits, wallet: Wallet, row: Row[Any]) -> AutoTopUp:
    offer = _offer(ext, row.pack, row.quantity)
    month = _month(ext.database.now())
    return AutoTopUp(
        wallet=wallet,
        enabled=bool(row.enabled) and ext.settings.auto_top_up,
        threshold=int(row.threshold),
        pack=row.pack,
        quantity=None if row.quantity is None else int(row.quantity),
        credits=0 if offer is None else offer.credits,
        amount=0 if offer is None or offer.amount is None else offer.amount,
        currency=ext.settings.currency if offer is None else offer.currency,
        monthly_cap=int(row.monthly_cap),
        spent_this_month=int(row.month_spent) if row.month == month else 0,
        card_brand=row.card_brand,
        card_last4=row.card_last4,
        has_card=row.payment_method is not None,
        failure=row.failure,
        in_flight=row.purchase_id is not None,
    )


def get(ext: FlaskCredits, wallet: Wallet) -> AutoTopUp | None:
    """The wallet's auto top-up settings, or None if it never had any (nor a saved card)."""
    row = _row(ext, wallet)
    return None if row is None else _record(ext, wallet, row)


def _offer(ext: FlaskCredits, pack: str | None, quantity: int | None) -> Any:
    try:
        return offer_for(ext.settings, {"pack": pack} if pack else {"quantity": quantity})
    except BadCheckout:
        return None  # a pack since removed from CREDITS_PACKS: nothing is bought


def _whole(value: object, name: str, *, minimum: int = 0) -> int:
    if isinstance(value, str) and value.strip().isdecimal() and len(value.strip()) <= 15:
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value < 2**53:
        raise BadAutoTopUp(f"{name} must be a whole number of at least {minimum}")
    return value


def configure(
    ext: FlaskCredits,
    wallet: Wallet,
    *,
    enabled: bool,
    threshold: object,
    monthly_cap: object,
    pack: object = None,
    quantity: object = None,
) -> AutoTopUp:
    """Set the wallet's auto top-up: buy ``pack`` (or ``quantity`` units) when a debit takes the
    wallet below ``threshold`` credits, at most ``monthly_cap`` (minor units of the currency) a
    calendar month. Turning it on needs a saved card (:class:`CardRequired`) and clears the reason of
    an earlier failure. Raises :class:`BadAutoTopUp` for settings that cannot work."""
    if not isinstance(enabled, bool):
        raise BadAutoTopUp("enabled must be true or false")
    threshold = _whole(threshold, "threshold")
    cap = _whole(monthly_cap, "monthly_cap")
    try:
        offer = offer_for(ext.settings, {"pack": pack, "quantity": quantity})
    except BadCheckout as exc:
        raise BadAutoTopUp(str(exc)) from None
    if offer.amount is None:
        raise BadAutoTopUp(
            f"pack {offer.pack!r} has only a Stripe Price: auto top-up needs its amount in CREDITS_PACKS"
        )
    if cap < offer.amount:
        raise BadAutoTopUp("monthly_cap must cover at least one top-up")
    if offer.credits <= 0:  # pragma: no cover - settings refuse such packs
        raise BadAutoTopUp("the top-up must buy credits")
    a = ext.tables.auto_top_ups
    now = ext.database.now()
    values: dict[str, Any] = {
        "enabled": enabled,
        "threshold": threshold,
        "pack": offer.pack,
        "quantity": offer.quantity,
        "monthly_cap": cap,
        "updated_at": now,
    }
    if enabled:
        values["failure"] = None

    def in_tx(conn: Connection, wallet_id: int) -> None:
        found = conn.execute(sa.select(a.c.payment_method).where(a.c.wallet_id == wallet_id)).first()
        if enabled and (found is None or found.payment_method is None):
            raise CardRequired()
        if found is None:
            conn.execute(sa.insert(a).values(wallet_id=wallet_id, month_spent=0, created_at=now, **values))
        else:
            conn.execute(sa.update(a).where(a.c.wallet_id == wallet_id).values(values))

    ext.ledger.set_limits(wallet, top_up_below=threshold if enabled else None, in_tx=in_tx)
    found = get(ext, wallet)
    assert found is not None
    return found


def save_card(
    ext: FlaskCredits, wallet: Wallet, *, payment_method: str, brand: str | None, last4: str | None
) -> None:
    """Keep ``payment_method`` (a card of the owner's Stripe customer, saved by a setup-mode Checkout
    Session) as the wallet's card for auto top-up. Does not turn auto top-up on."""
    a = ext.tables.auto_top_ups
    now = ext.database.now()
    card = {
        "payment_method": payment_method[:255],
        "card_brand": (brand or None) and str(brand)[:32],
        "card_last4": (last4 or None) and str(last4)[:4],
        "updated_at": now,
    }

    def in_tx(conn: Connection, wallet_id: int) -> None:
        moved = conn.execute(sa.update(a).where(a.c.wallet_id == wallet_id).values(card))
        if moved.rowcount == 0:
            # Off until the user sets it: a default threshold and pack are chosen on the page.
            offer = next(iter(ext.settings.packs), None)
            conn.execute(
                sa.insert(a).values(
                    wallet_id=wallet_id,
                    enabled=False,
                    threshold=0,
                    pack=offer.id if offer is not None and offer.amount is not None else None,
                    quantity=None if offer is not None and offer.amount is not None else 1,
                    monthly_cap=0,
                    month_spent=0,
                    created_at=now,
                    **card,
                )
            )

    ext.ledger.set_limits(wallet, in_tx=in_tx)


def set_low_balance(ext: FlaskCredits, wallet: Wallet, threshold: int | None) -> None:
    """The wallet's own low-balance threshold for ``credits_low`` (None: ``CREDITS_LOW_BALANCE``)."""
    value = None if threshold is None else _whole(threshold, "threshold")
    ext.ledger.set_limits(wallet, low_below=value)


# -- a debit crossed a threshold -----------------------------------------------------------------------


def crossed(entry: Entry, threshold: int | None) -> bool:
    """Whether debit ``entry`` took the wallet from at or above ``threshold`` to below it."""
    if threshold is None or entry.amount >= 0:
        return False
    return entry.balance_after < threshold <= entry.balance_after - entry.amount


def debited(ext: FlaskCredits, wallet: Wallet, entry: Entry, limits: Limits) -> None:
    """The ledger's hook after every committed debit: ``credits_low`` and auto top-up."""
    low = limits.low_below if limits.low_below is not None else ext.settings.low_balance
    if crossed(entry, low):
        assert low is not None
        ext.emit(signals.credits_low, wallet=wallet, balance=entry.balance_after, threshold=low, entry=entry)
    if ext.settings.auto_top_up and crossed(entry, limits.top_up_below):
        try:
            purchase_id = trigger(ext, wallet, entry)
        except Exception:  # the debit stands; the sweep acts on the crossing later
            log.exception("auto top-up of %s after entry %s could not start", wallet, entry.id)
            return
        if purchase_id is not None:
            schedule(ext, purchase_id)


def trigger(ext: FlaskCredits, wallet: Wallet, entry: Entry) -> int | None:
    """Act on crossing ``entry`` once: the conditional UPDATE and the automatic purchase's row, in one
    transaction. Returns the purchase's id, or None when this crossing is not (or no longer) one to
    act on: acted on already, auto top-up off, a purchase in flight, the cap reached, debt too large."""
    a, w, p = ext.tables.auto_top_ups, ext.tables.wallets, ext.tables.purchases
    row = _row(ext, wallet)
    if row is None or not row.enabled or row.payment_method is None or row.purchase_id is not None:
        return None
    offer = _offer(ext, row.pack, row.quantity)
    if offer is None or offer.amount is None:
        return None
    now = ext.database.now()
    month = _month(now)
    spent = sa.case((a.c.month == month, a.c.month_spent), else_=0)
    before, after = entry.balance_after - entry.amount, entry.balance_after
    same_offer = a.c.pack == offer.pack if offer.pack else a.c.quantity == offer.quantity
    debt = sa.select(w.c.debt).where(w.c.id == a.c.wallet_id).scalar_subquery()
    claim = (
        sa.update(a)
        .where(
            a.c.wallet_id == row.wallet_id,
            a.c.enabled.is_(True),
            a.c.payment_method.is_not(None),
            a.c.purchase_id.is_(None),
            sa.or_(a.c.crossing_entry_id.is_(None), a.c.crossing_entry_id < entry.id),
            a.c.threshold > after,
            a.c.threshold <= before,
            same_offer,
            spent + offer.amount <= a.c.monthly_cap,
            debt <= offer.credits,
        )
        # month_spent before month: MySQL and MariaDB evaluate SET left to right, with the new values.
        .ordered_values(
            (a.c.month_spent, spent + offer.amount),
            (a.c.month, month),
            (a.c.crossing_entry_id, entry.id),
            (a.c.updated_at, now),
        )
    )

    def tx(conn: Connection) -> int | None:
        if conn.execute(claim).rowcount != 1:
            return None
        key = conn.execute(
            sa.insert(p).values(
                wallet_id=row.wallet_id,
                attempt_key=f"auto_{int(row.wallet_id)}_{entry.id}",
                pack=offer.pack,
                quantity=offer.quantity,
                credits=offer.credits,
                amount=offer.amount,
                currency=offer.currency,
                status="creating",
                automatic=True,
                expires_after_seconds=offer.expires_after,
                created_at=now,
                updated_at=now,
            )
        ).inserted_primary_key
        assert key is not None
        purchase_id = int(key[0])
        conn.execute(sa.update(a).where(a.c.wallet_id == row.wallet_id).values(purchase_id=purchase_id))
        return purchase_id

    try:
        purchase_id = ext.database.run(tx)
    except sa.exc.IntegrityError:
        return None  # the same crossing's purchase exists: another worker acted on it
    if purchase_id is not None:
        ext.emit(
            signals.auto_top_up_started,
            wallet=wallet,
            purchase=find(ext, id=purchase_id),
            entry=entry,
        )
    return purchase_id


_workers: list[threading.Thread] = []
_workers_lock = threading.Lock()


def schedule(ext: FlaskCredits, purchase_id: int) -> None:
    """Make the Stripe call for ``purchase_id`` on a worker thread: never in the debit's transaction,
    never delaying the view (which may still be running: a settle can come mid-stream). A worker that
    dies with its process leaves the purchase to the sweep."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]

    def run() -> None:
        with app.app_context():
            try:
                charge(ext, purchase_id)
            except Exception:  # the sweep calls again, with the same idempotency key
                log.exception("automatic purchase %s: the Stripe call failed", purchase_id)

    worker = threading.Thread(target=run, name=f"flask-credits-top-up-{purchase_id}", daemon=True)
    with _workers_lock:
        _workers[:] = [t for t in _workers if t.is_alive()]
        _workers.append(worker)
    worker.start()


def wait(timeout: float = 30.0) -> bool:
    """Wait for the automatic purchases started in this process (tests, the CLI); False if some are
    still running after ``timeout`` seconds."""
    with _workers_lock:
        running = list(_workers)
    deadline = time.monotonic() + timeout
    for worker in running:
        worker.join(max(0.0, deadline - time.monotonic()))
    return not any(t.is_alive() for t in running)


# -- the Stripe call -----------------------------------------------------------------------------------


def _claim_call(ext: FlaskCredits, purchase_id: int, now: datetime) -> bool:
    """Take the lease on the purchase's Stripe call: one worker at a time, another after LEASE."""
    p = ext.tables.purchases
    return (
        ext.database.write(
            sa.update(p)
            .where(
                p.c.id == purchase_id,
                p.c.automatic.is_(True),
                p.c.status == "creating",
                p.c.created_at > now - CALL_WINDOW,
                sa.or_(p.c.checked_at.is_(None), p.c.checked_at <= now - LEASE),
            )
            .values(checked_at=now)
        )
        == 1
    )


def idempotency_key(attempt_key: str) -> str:
    """Stripe's idempotency key for an automatic purchase: derived from its row, the same on every
    attempt (a retry, the sweep), so Stripe creates one PaymentIntent for it."""
    return f"flask-credits-{attempt_key}"


def charge(ext: FlaskCredits, purchase_id: int) -> str:
    """Make the off-session PaymentIntent of automatic purchase ``purchase_id`` and act on Stripe's
    answer. Returns what happened: ``fulfilled``, ``pending`` (Stripe is still processing: the webhook
    says), ``failed``, ``retry`` (Stripe could not be reached: the sweep calls again) or ``skipped``
    (another worker has it, or it is done)."""
    now = ext.database.now()
    if not _claim_call(ext, purchase_id, now):
        return "skipped"
    row = _purchase_row(ext, purchase_id)
    if row is None or row.payment_method is None:
        fail(ext, purchase_id, "no saved card")
        return "failed"
    wallet = Wallet(row.user_id, row.wallet_key_id or None)
    customer = customers.stored(ext, wallet.user_id)
    params: dict[str, Any] = {
        "amount": int(row.amount),
        "currency": row.currency,
        "payment_method": row.payment_method,
        "off_session": True,
        "confirm": True,
        "description": f"{int(row.credits)} credits (auto top-up)",
        # No empty keyId: Stripe treats an empty metadata value as "unset".
        "metadata": {"userId": wallet.user_id, PURCHASE: str(purchase_id)},
    }
    if wallet.key_id:
        params["metadata"]["keyId"] = wallet.key_id
    if customer:
        params["customer"] = customer
    try:
        intent = ext.gateway.create_payment_intent(params, idempotency_key(row.attempt_key))
    except PaymentProviderError as exc:
        if exc.kind in ("network", "rate_limit", "conflict", "stripe"):
            log.warning("automatic purchase %s: %s; the sweep calls again", purchase_id, exc.user_message)
            return "retry"
        fail(ext, purchase_id, exc.user_message)
        return "failed"
    return payment_intent_changed(ext, intent)


def _purchase_row(ext: FlaskCredits, purchase_id: int) -> Row[Any] | None:
    p, w, a = ext.tables.purchases, ext.tables.wallets, ext.tables.auto_top_ups
    query = (
        sa.select(p, w.c.user_id, w.c.key_id.label("wallet_key_id"), a.c.payment_method)
        .join(w, w.c.id == p.c.wallet_id)
        .outerjoin(a, a.c.wallet_id == p.c.wallet_id)
        .where(p.c.id == purchase_id, p.c.automatic.is_(True))
    )
    with ext.database.reader.connect() as conn:
        return conn.execute(query).first()


def _failure_reason(intent: Mapping[str, Any]) -> str:
    if intent.get("status") == "requires_action":
        return "Your bank asked to confirm the payment (3-D Secure), which cannot be done automatically."
    error = intent.get("last_payment_error")
    if isinstance(error, Mapping):
        message = error.get("message") or error.get("decline_code") or error.get("code")
        if isinstance(message, str) and message:
            return message[:255]
    return "The card was declined."


def payment_intent_changed(ext: FlaskCredits, intent: Mapping[str, Any]) -> str:
    """Act on an automatic purchase's PaymentIntent as Stripe reports it (the call's answer, or a
    ``payment_intent.*`` webhook): ``fulfilled`` once paid, ``failed`` when declined or when the bank
    wants the customer (3-D Secure), ``pending`` while processing, ``unknown`` when it is not one of
    this app's automatic purchases (or it does not match the row)."""
    purchase_id = _purchase_id(intent)
    row = None if purchase_id is None else _purchase_row(ext, purchase_id)
    if row is None:
        return "unknown"
    metadata = intent.get("metadata") if isinstance(intent.get("metadata"), Mapping) else {}
    assert isinstance(metadata, Mapping)
    if metadata.get("userId") != row.user_id or (metadata.get("keyId") or "") != (row.wallet_key_id or ""):
        log.error("PaymentIntent %s names another wallet than purchase %s: ignored", intent.get("id"), row.id)
        return "mismatch"
    status = intent.get("status")
    intent_id = intent.get("id") if isinstance(intent.get("id"), str) else None
    if status == "succeeded":
        if (
            intent.get("amount_received", intent.get("amount")) != row.amount
            or str(intent.get("currency") or "").lower() != row.currency
        ):
            log.error(
                "PaymentIntent %s reports another amount than purchase %s: not credited", intent_id, row.id
            )
            return "mismatch"
        return fulfil(ext, int(row.id), intent_id)
    if status in ("requires_payment_method", "requires_action", "canceled"):
        return (
            "failed"
            if fail(ext, int(row.id), _failure_reason(intent), payment_intent=intent_id)
            else "unchanged"
        )
    if intent_id is not None:  # processing (or requires_confirmation): the webhook tells the end
        p = ext.tables.purchases
        ext.database.write(
            sa.update(p)
            .where(p.c.id == row.id, p.c.status == "creating")
            .values(status="open", payment_intent=intent_id, updated_at=ext.database.now())
        )
    return "pending"


def _purchase_id(intent: Mapping[str, Any]) -> int | None:
    metadata = intent.get("metadata")
    value = metadata.get(PURCHASE) if isinstance(metadata, Mapping) else None
    if isinstance(value, str) and value.isdecimal() and len(value) <= 18:
        return int(value)
    return None


def fulfil(ext: FlaskCredits, purchase_id: int, payment_intent: str | None) -> str:
    """Credit a paid automatic purchase, exactly once, and free the wallet's slot for the next. Stripe
    saying it was paid wins over a failure recorded here (the sweep gave up on it, say): the money was
    taken, so the credits are given."""
    a, p = ext.tables.auto_top_ups, ext.tables.purchases
    ext.database.write(
        sa.update(p)
        .where(p.c.id == purchase_id, p.c.automatic.is_(True), p.c.status.in_(("failed", "error")))
        .values(status="open", updated_at=ext.database.now())
    )

    def in_tx(conn: Connection) -> None:
        conn.execute(sa.update(a).where(a.c.purchase_id == purchase_id).values(purchase_id=None))

    done = ext.ledger.fulfil_purchase(
        purchase_id, payment_intent=payment_intent, in_tx=in_tx, reason="auto top-up"
    )
    if done is None:
        return "already_fulfilled"
    purchase = find(ext, id=purchase_id)
    assert purchase is not None
    ext.emit(
        signals.credits_purchased,
        wallet=done.wallet,
        amount=purchase.credits,
        entry=done.entry,
        purchase=purchase,
    )
    return "fulfilled"


def fail(ext: FlaskCredits, purchase_id: int, reason: str, *, payment_intent: str | None = None) -> bool:
    """An automatic purchase failed: mark it, give its amount back to the month's cap, turn auto
    top-up off for the wallet with ``reason`` (shown on the credits page) and send
    ``auto_top_up_failed``; once (False when it was no longer in flight)."""
    p, a, w = ext.tables.purchases, ext.tables.auto_top_ups, ext.tables.wallets
    row = _purchase_row(ext, purchase_id)
    if row is None:
        return False
    wallet = Wallet(row.user_id, row.wallet_key_id or None)
    now = ext.database.now()
    failed = [False]

    def in_tx(conn: Connection, wallet_id: int) -> Limits | None:
        moved = conn.execute(
            sa.update(p)
            .where(p.c.id == purchase_id, p.c.status.in_(("creating", "open")))
            .values(status="failed", payment_intent=payment_intent or p.c.payment_intent, updated_at=now)
        )
        failed[0] = moved.rowcount == 1
        if not failed[0]:
            return None  # no longer in flight: nothing changes (auto top-up may be on again)
        low = conn.execute(sa.select(w.c.low_below).where(w.c.id == wallet_id)).scalar_one()
        month = _month(row.created_at)
        conn.execute(
            sa.update(a)
            .where(a.c.wallet_id == wallet_id, a.c.purchase_id == purchase_id)
            .values(
                purchase_id=None,
                enabled=False,
                failure=reason[:255],
                month_spent=sa.case(
                    (
                        sa.and_(a.c.month == month, a.c.month_spent >= int(row.amount)),
                        a.c.month_spent - int(row.amount),
                    ),
                    else_=a.c.month_spent,
                ),
                updated_at=now,
            )
        )
        return Limits(top_up_below=None, low_below=None if low is None else int(low))

    ext.ledger.set_limits(wallet, in_tx=in_tx)
    if failed[0]:
        log.warning("automatic purchase %s of %s failed: %s; auto top-up is off", purchase_id, wallet, reason)
        ext.emit(signals.auto_top_up_failed, wallet=wallet, purchase=find(ext, id=purchase_id), reason=reason)
    return failed[0]


# -- the sweep -----------------------------------------------------------------------------------------


def sweep(ext: FlaskCredits) -> dict[str, int]:
    """``flask credits top-up --due``: make the Stripe call of every automatic purchase a dead worker
    left (same idempotency key), give up on those past Stripe's idempotency window, and act on
    crossings nobody acted on (a process that died between its debit and the trigger). Returns
    counts per outcome."""
    counts: dict[str, int] = {}
    if not ext.settings.auto_top_up:
        return counts
    p, a, w, e = ext.tables.purchases, ext.tables.auto_top_ups, ext.tables.wallets, ext.tables.entries
    now = ext.database.now()
    with ext.database.reader.connect() as conn:
        stuck = conn.execute(
            sa.select(p.c.id, p.c.created_at).where(p.c.automatic.is_(True), p.c.status == "creating")
        ).all()
    for row in stuck:
        if row.created_at <= now - CALL_WINDOW:
            outcome = "gave_up" if _give_up(ext, int(row.id)) else "skipped"
        else:
            outcome = charge(ext, int(row.id))
        counts[outcome] = counts.get(outcome, 0) + 1
    with ext.database.reader.connect() as conn:
        below = conn.execute(
            sa.select(a.c.wallet_id, a.c.threshold, a.c.crossing_entry_id, w.c.user_id, w.c.key_id)
            .join(w, w.c.id == a.c.wallet_id)
            .where(
                a.c.enabled.is_(True),
                a.c.purchase_id.is_(None),
                a.c.payment_method.is_not(None),
                w.c.balance + w.c.held < a.c.threshold,
            )
        ).all()
        crossings = []
        for candidate in below:
            # The wallet's latest debit that crossed its threshold: acted on, or not yet.
            latest = conn.execute(
                sa.select(e)
                .where(
                    e.c.wallet_id == candidate.wallet_id,
                    e.c.amount < 0,
                    e.c.balance_after < candidate.threshold,
                    e.c.balance_after - e.c.amount >= candidate.threshold,
                )
                .order_by(e.c.id.desc())
                .limit(1)
            ).first()
            if latest is not None and (
                candidate.crossing_entry_id is None or latest.id > candidate.crossing_entry_id
            ):
                crossings.append((Wallet(candidate.user_id, candidate.key_id or None), int(latest.id)))
    for wallet, entry_id in crossings:
        entry = ext.ledger.entry(wallet, entry_id)
        purchase_id = trigger(ext, wallet, entry)
        if purchase_id is None:
            continue
        counts["started"] = counts.get("started", 0) + 1
        outcome = charge(ext, purchase_id)
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def _give_up(ext: FlaskCredits, purchase_id: int) -> bool:
    """An automatic purchase whose Stripe call was never confirmed within Stripe's idempotency window:
    calling again could charge twice, so it is marked ``error`` (a webhook still credits it if Stripe
    did charge it) and auto top-up is turned off with a reason."""
    return fail(ext, purchase_id, "The automatic purchase could not be confirmed with Stripe.")


# -- saving a card -------------------------------------------------------------------------------------

#: ``metadata[purpose]`` of a setup-mode Checkout Session that saves a card for auto top-up.
SETUP_PURPOSE = "auto_top_up"


def start_card_setup(
    ext: FlaskCredits, wallet: Wallet, *, success_url: str, cancel_url: str
) -> dict[str, Any]:
    """A Checkout Session in ``setup`` mode that saves a card on the owner's Stripe customer for the
    wallet's auto top-up (its ``checkout.session.completed`` keeps it). Returns ``{"id", "url"}``."""
    customer = customers.customer_id(ext, wallet.user_id)
    metadata = {"userId": wallet.user_id, "keyId": wallet.key_id or "", "purpose": SETUP_PURPOSE}
    params: dict[str, Any] = {
        "mode": "setup",
        "customer": customer,
        "currency": ext.settings.currency,
        "payment_method_types": ["card"],
        "success_url": success_url,
        "cancel_url": cancel_url,
        "metadata": metadata,
        "setup_intent_data": {"metadata": metadata},
    }
    return ext.gateway.create_checkout_session(params, "flask-credits-setup-" + secrets.token_hex(16))


def card_saved(ext: FlaskCredits, session: Mapping[str, Any]) -> str:
    """A setup-mode Checkout Session completed: keep its card for the wallet its metadata names,
    if the session belongs to that user's Stripe customer (a session of someone else's customer
    saves nothing)."""
    metadata = session.get("metadata") if isinstance(session.get("metadata"), Mapping) else {}
    assert isinstance(metadata, Mapping)
    if metadata.get("purpose") != SETUP_PURPOSE:
        return "ignored"
    user_id, key_id = metadata.get("userId"), metadata.get("keyId") or None
    session_id = session.get("id")
    if not isinstance(user_id, str) or not user_id or not isinstance(session_id, str):
        return "ignored"
    try:
        wallet = make_wallet(user_id, key_id if isinstance(key_id, str) else None)
    except InvalidArgument:
        return "ignored"
    customer = session.get("customer")
    if isinstance(customer, Mapping):
        customer = customer.get("id")
    stored = customers.stored(ext, wallet.user_id)
    if ext.settings.stripe_mode == "live" and (stored is None or customer != stored):
        log.warning("setup session %s is not of %s's Stripe customer: no card saved", session_id, user_id)
        return "unknown_customer"
    card = ext.gateway.setup_card(session_id)
    if card is None:
        return "no_card"
    save_card(
        ext, wallet, payment_method=card["payment_method"], brand=card.get("brand"), last4=card.get("last4")
    )
    return "card_saved"
