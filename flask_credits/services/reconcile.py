"""Reconcile with Stripe: find what lost webhooks should have done, and do it through their own paths.

A webhook can be lost for good (the endpoint was down longer than Stripe retries, a secret was rotated
badly). This asks Stripe how things stand: the Checkout Sessions and paid invoices created since a
time, and the PaymentIntents (their charges, refunds and disputes) of the purchases they paid and of
automatic purchases, then acts through exactly the functions the webhook handlers call:
``purchases.fulfil`` (exactly once, by the ledger's conditional update), ``plans.invoice_paid`` (once
per invoice, by its unique ``invoice_id`` and the same update), ``purchases.mark`` (a conditional
status change), ``purchases.revoke`` (absolute claw-back targets, so a late event and this converge)
and ``auto_top_up.payment_intent_changed``. So it is safe while webhooks arrive, and run twice at once.

Plans' checkouts are counted, not reconciled: a paid one's first invoice grants its allowance (and
links the subscription), and the subscription's state comes with its next
``customer.subscription.updated``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .. import signals
from ..core.settlement import credits_for
from ..records import FULFILLABLE, Purchase, Reconciled, ReconcileReport, Wallet
from . import auto_top_up, plans, purchases

if TYPE_CHECKING:
    from ..extension import FlaskCredits

log = logging.getLogger("flask_credits")

#: PaymentIntent statuses ``auto_top_up.payment_intent_changed`` marks an automatic purchase failed on.
_DECLINED = ("requires_payment_method", "requires_action", "canceled")


def reconcile(ext: FlaskCredits, since: timedelta, *, dry_run: bool = False) -> ReconcileReport:
    """Reconcile what was created in the last ``since``; see :func:`run`."""
    report = ReconcileReport(since=ext.database.now() - since, dry_run=dry_run)
    run(ext, report)
    return report


def run(ext: FlaskCredits, report: ReconcileReport) -> None:
    """Fill ``report`` as it goes (so a caller holding it sees what was done before a failure).
    Raises PaymentProviderError when Stripe cannot be reached: listing the sessions and invoices
    reads every page before anything is acted on, so a Stripe that is down changes nothing."""
    since = int(report.since.timestamp())
    sessions = ext.gateway.list_checkout_sessions(since)
    # An app that never started a subscription has no invoice of its to look for.
    invoices = ext.gateway.list_paid_invoices(since) if _any_subscription(ext) else []
    for session in sessions:
        report.sessions += 1
        _session(ext, session, report)
    for invoice in invoices:
        report.invoices += 1
        _invoice(ext, invoice, report)
    for purchase in _automatic(ext, report):
        report.automatic += 1
        _automatic_purchase(ext, purchase, report)


def _session(ext: FlaskCredits, session: Mapping[str, Any], report: ReconcileReport) -> None:
    mode = session.get("mode")
    if mode == "setup":
        report.count("setup_checkouts")
        return
    if mode == "subscription":
        report.count("plan_checkouts")
        return
    purchase = _ours(ext, session)
    if purchase is None:
        report.count("not_ours")
        return
    reference = str(session.get("id"))
    if purchase.status == "fulfilled":
        payment_intent = purchase.payment_intent or _id_of(session.get("payment_intent"))
        if payment_intent is None:
            report.count("in_step")
        else:
            _compare_charge(ext, purchase, reference, payment_intent, report)
        return
    status, paid = session.get("status"), session.get("payment_status") in purchases.PAID
    if purchase.status in FULFILLABLE and status == "complete" and paid:
        matches = session.get("amount_total") == purchase.amount and (
            str(session.get("currency") or "").lower() == purchase.currency
        )
        if report.dry_run:
            _fix(ext, report, purchase, reference, "fulfilled" if matches else "mismatch", _paid(session))
            return
        outcome = purchases.fulfil(ext, session)
        if outcome == "fulfilled":
            _fix(ext, report, purchase, reference, "fulfilled", _paid(session))
        elif outcome == "amount_mismatch":
            _fix(ext, report, purchase, reference, "mismatch", _paid(session) + ": not credited")
        else:
            report.count("done_meanwhile")
    elif purchase.status in purchases.UNFINISHED and status == "expired":
        unfinished = purchases.UNFINISHED
        if report.dry_run or purchases.mark(ext, session, "expired", unfinished) == "expired":
            _fix(ext, report, purchase, reference, "expired", "the checkout expired unpaid")
        else:
            report.count("done_meanwhile")
    elif status == "open":
        report.count("still_open")
    else:
        report.count("in_step")


def _paid(session: Mapping[str, Any]) -> str:
    amount, currency = session.get("amount_total"), str(session.get("currency") or "").upper()
    return f"paid {amount} {currency} at Stripe, never credited"


def _ours(ext: FlaskCredits, session: Mapping[str, Any]) -> Purchase | None:
    """The purchase behind a session: by its id, or (the checkout view never saved the id: Stripe's
    answer was lost) by the attempt key it carries as ``client_reference_id``. Reads only: fulfilling
    adopts the session id, as the webhook does."""
    session_id = session.get("id")
    if not isinstance(session_id, str):
        return None
    found = purchases.find(ext, session_id=session_id)
    reference = session.get("client_reference_id")
    if found is None and isinstance(reference, str) and purchases.ATTEMPT_KEY.fullmatch(reference):
        found = purchases.find(ext, attempt_key=reference)
        if found is not None and found.session_id not in (None, session_id):
            return None  # another session of the same attempt: not this one's purchase
    return found


def _any_subscription(ext: FlaskCredits) -> bool:
    s = ext.tables.subscriptions
    with ext.database.reader.connect() as conn:
        return conn.execute(sa.select(s.c.id).limit(1)).first() is not None


def _invoice(ext: FlaskCredits, invoice: Mapping[str, Any], report: ReconcileReport) -> None:
    """A paid invoice: grant its allowance if its ``invoice.paid`` was lost, else compare its charge."""
    invoice_id = _id_of(invoice.get("id"))
    row = plans.invoice_row(ext, invoice)
    if invoice_id is None or row is None:
        report.count("not_ours")
        return
    if invoice.get("billing_reason") not in plans.ALLOWANCE_REASONS:
        report.count("no_allowance")  # a proration: the plan change's own event grants it
        return
    purchase = purchases.find(ext, invoice_id=invoice_id)
    if purchase is not None and purchase.status == "fulfilled":
        if purchase.payment_intent is None:  # paid without a charge (the customer's balance)
            report.count("in_step")
        else:
            _compare_charge(ext, purchase, invoice_id, purchase.payment_intent, report)
        return
    if purchase is not None and purchase.status not in FULFILLABLE:
        report.count("in_step")
        return
    amount, currency = invoice.get("amount_paid"), str(invoice.get("currency") or "").upper()
    detail = f"invoice paid {amount} {currency} at Stripe, allowance never granted"
    if report.dry_run:
        wallet = Wallet(row.user_id, row.wallet_key_id or None)
        purchase_id = None if purchase is None else purchase.id
        report.fixes.append(Reconciled(purchase_id, wallet, invoice_id, "fulfilled", detail, done=False))
        return
    outcome = plans.invoice_paid(ext, invoice, None)
    granted = purchases.find(ext, invoice_id=invoice_id)
    if outcome == "fulfilled" and granted is not None:
        _fix(ext, report, granted, invoice_id, "fulfilled", detail)
    elif outcome == "already_fulfilled":
        report.count("done_meanwhile")
    else:
        report.count(outcome)  # unknown_plan: logged by invoice_paid


def _compare_charge(
    ext: FlaskCredits, purchase: Purchase, reference: str, payment_intent: str, report: ReconcileReport
) -> None:
    """Apply the refunds and disputes of a fulfilled purchase's charge whose webhooks were lost."""
    intent = ext.gateway.retrieve_payment_intent(payment_intent)
    charge = intent.get("latest_charge")
    if not isinstance(charge, Mapping):
        report.count("in_step")
        return
    refund_target = credits_for(purchase.credits, purchase.amount, charge.get("amount_refunded"))
    dispute_target, dispute_status = None, None
    if charge.get("disputed") is True:
        dispute_target, dispute_status = _dispute_target(ext, purchase, payment_intent)
    refund, dispute = _targets(purchase, _lot_amount(ext, purchase.id), refund_target, dispute_target)
    acted = False
    if refund != purchase.refund_revoked:
        detail = f"{charge.get('amount_refunded')} refunded at Stripe: {refund} credits clawed back in all"
        acted |= _revoke(ext, report, purchase, reference, "refund", detail, refund_target=refund_target)
    if dispute != purchase.dispute_revoked:
        action = "dispute" if dispute > purchase.dispute_revoked else "dispute_won"
        detail = f"dispute {dispute_status} at Stripe: {dispute} credits held back for it"
        acted |= _revoke(ext, report, purchase, reference, action, detail, dispute_target=dispute_target)
    if not acted:
        report.count("in_step")


def _dispute_target(ext: FlaskCredits, purchase: Purchase, payment_intent: str) -> tuple[int | None, str]:
    """What the payment's dispute claws back, as the ``charge.dispute.*`` webhooks would have left it:
    in proportion to the amount when lost, nothing when won, and as it is while it is open (its
    ``funds_withdrawn`` event, if lost too, is then made good once the dispute closes)."""
    disputes = ext.gateway.list_disputes(payment_intent)
    if not disputes:
        return None, "none"
    dispute = max(disputes, key=lambda d: int(d.get("created") or 0))  # a charge has one; the newest
    status = str(dispute.get("status"))
    if status == "lost":
        return credits_for(purchase.credits, purchase.amount, dispute.get("amount")), status
    if status == "won":
        return 0, status
    return None, status


def _targets(
    purchase: Purchase, lot_amount: int | None, refund_target: int, dispute_target: int | None
) -> tuple[int, int]:
    """The refund and dispute shares (credits) a claw-back to these targets would leave, by the rules
    of :func:`flask_credits.core.settlement.claw_back`: a refund share only grows, up to what the
    purchase's lot holds; a dispute share is capped by what the refund leaves."""
    if lot_amount is None:  # everything bought paid debt: there is nothing to claw back
        return purchase.refund_revoked, purchase.dispute_revoked
    refund = max(purchase.refund_revoked, min(refund_target, lot_amount))
    dispute = purchase.dispute_revoked if dispute_target is None else max(dispute_target, 0)
    return refund, min(dispute, lot_amount - refund)


def _lot_amount(ext: FlaskCredits, purchase_id: int) -> int | None:
    p, lt = ext.tables.purchases, ext.tables.lots
    with ext.database.reader.connect() as conn:
        found = conn.execute(
            sa.select(lt.c.amount).join(p, p.c.lot_id == lt.c.id).where(p.c.id == purchase_id)
        ).scalar()
    return None if found is None else int(found)


def _revoke(
    ext: FlaskCredits,
    report: ReconcileReport,
    purchase: Purchase,
    reference: str,
    action: str,
    detail: str,
    *,
    refund_target: int | None = None,
    dispute_target: int | None = None,
) -> bool:
    if not report.dry_run:
        outcome = purchases.revoke(
            ext,
            purchase,
            cause="refund" if action == "refund" else "dispute",
            refund_target=refund_target,
            dispute_target=dispute_target,
        )
        if outcome not in ("revoked", "reinstated"):
            report.count("done_meanwhile")
            return True
    _fix(ext, report, purchase, reference, action, detail)
    return True


def _automatic(ext: FlaskCredits, report: ReconcileReport) -> list[Purchase]:
    """Automatic purchases started since, whose Stripe call was made (it has a PaymentIntent): those
    still waiting for its outcome, and those paid (their charge may have been refunded since). Ones
    with no PaymentIntent are the top-up sweep's (``flask credits top-up --due``)."""
    p = ext.tables.purchases
    with ext.database.reader.connect() as conn:
        ids = list(
            conn.execute(
                sa.select(p.c.id)
                .where(
                    p.c.automatic.is_(True),
                    p.c.payment_intent.is_not(None),
                    p.c.status.in_((*purchases.UNFINISHED, "fulfilled")),
                    p.c.created_at >= report.since,
                )
                .order_by(p.c.id)
            ).scalars()
        )
    found = [purchases.find(ext, id=purchase_id) for purchase_id in ids]
    return [purchase for purchase in found if purchase is not None]


def _automatic_purchase(ext: FlaskCredits, purchase: Purchase, report: ReconcileReport) -> None:
    payment_intent = purchase.payment_intent
    assert payment_intent is not None
    if purchase.status == "fulfilled":
        _compare_charge(ext, purchase, payment_intent, payment_intent, report)
        return
    intent = ext.gateway.retrieve_payment_intent(payment_intent)
    status = intent.get("status")
    if status not in ("succeeded", *_DECLINED):
        report.count("still_open")
        return
    action = "fulfilled" if status == "succeeded" else "failed"
    detail = f"PaymentIntent {status} at Stripe"
    if not report.dry_run:
        outcome = auto_top_up.payment_intent_changed(ext, intent)
        if outcome == "mismatch":
            log.error("automatic purchase %s: Stripe's PaymentIntent does not match it", purchase.id)
            report.count("mismatch")
            return
        if outcome != action:
            report.count("done_meanwhile")
            return
    _fix(ext, report, purchase, payment_intent, action, detail)


def _fix(
    ext: FlaskCredits, report: ReconcileReport, purchase: Purchase, reference: str, action: str, detail: str
) -> None:
    report.fixes.append(
        Reconciled(purchase.id, purchase.wallet, reference, action, detail, done=not report.dry_run)
    )
    if report.dry_run:
        return
    log.warning("reconcile: purchase %s (%s): %s (%s)", purchase.id, reference, action, detail)
    ext.emit(
        signals.purchase_reconciled,
        wallet=purchase.wallet,
        purchase=purchases.find(ext, id=purchase.id),
        action=action,
    )


def _id_of(value: object) -> str | None:
    if isinstance(value, Mapping):
        value = value.get("id")
    return value if isinstance(value, str) and value else None
