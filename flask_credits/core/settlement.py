"""Settlement arithmetic: what paying for, refunding and disputing a purchase does to credits and debt.

Pure functions of numbers read from the database, so the rules can be read, and tested with worked
examples, without one. The ledger reads the rows, calls these, and writes what they return: it stays
the only module that writes balances.
"""

from __future__ import annotations

from dataclasses import dataclass


def credits_for(credits: int, price: int, amount: object) -> int:
    """How many of a purchase's ``credits`` the ``amount`` of money is worth, out of its ``price``
    (both in the currency's smallest unit): in proportion, rounded down, and at most ``credits``.
    Anything but a positive whole number (a missing or malformed Stripe field) is worth none, and so
    is any amount of a free purchase."""
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0 or price <= 0:
        return 0
    return min(credits, credits * amount // price)


def debt_payment(debt: int, credits: int) -> int:
    """How many of a new purchase's ``credits`` pay the wallet's ``debt`` before any reach the wallet:
    all of the debt if the purchase covers it, else every credit bought. The rest go into the
    purchase's lot."""
    return min(debt, credits)


@dataclass(frozen=True)
class Revoked:
    """What has been clawed back of one purchase, as its row stores it: the refund's and the dispute's
    shares of the total, and what covers that total: ``from_lot`` credits taken out of the purchase's
    lot, ``as_debt`` credits added to the wallet's debt, and the rest (``by_expiry``) credits of the
    lot that had expired, which the customer never used and so owes nothing for."""

    refund: int = 0
    dispute: int = 0
    from_lot: int = 0
    as_debt: int = 0

    @property
    def total(self) -> int:
        return self.refund + self.dispute

    @property
    def by_expiry(self) -> int:
        return self.total - self.from_lot - self.as_debt


@dataclass(frozen=True)
class PurchaseLot:
    """The lot a fulfilled purchase created, as a claw-back finds it."""

    amount: int  # the credits bought: the lot was created with all of them
    remaining: int  # still in the wallet
    expired: int  # taken by expiry over the lot's life (credits put back and expired again count twice)


@dataclass(frozen=True)
class ClawBack:
    """What a claw-back does: the purchase's new ``revoked`` state, the credits it takes out of the
    purchase's lot (negative: puts back), the debt it adds to the wallet (negative: cancels), and how
    far the clawed-back total moved (``change``; zero for a replay or a late, older event)."""

    revoked: Revoked
    credits_taken: int
    debt_added: int
    change: int


def claw_back(
    before: Revoked,
    *,
    refund_target: int | None,
    dispute_target: int | None,
    lot: PurchaseLot,
    wallet_debt: int,
) -> ClawBack:
    """Move a purchase's claw-back to its new targets, counted in credits.

    Targets are cumulative totals, not increments, so replays and out-of-order events converge.
    A refund target only ever raises the refund's share, up to the credits bought: Stripe's refunded
    amount never shrinks, so a smaller one is an older event arriving late. A dispute target sets the
    dispute's share up or down (a dispute lost, then won), capped by what the refund leaves, which a
    later, larger refund therefore squeezes. ``None`` leaves that share as it was.

    A higher total is covered first by credits still in the purchase's lot (taken out of the wallet),
    then by the lot's expired credits not yet covering anything, and the rest, credits already spent,
    becomes the wallet's debt: the balance never goes below zero. A lower total is undone in the
    reverse order: the purchase's debt first, then the expiry's cover, then the credits taken from
    the lot. Debt still owed is cancelled; debt the wallet has since paid off (a later purchase pays
    debt first) comes back as credits, as do the credits taken, into the purchase's lot, which never
    holds more than was bought (``wallet_debt`` is the wallet's debt now, whichever purchase it came
    from)."""
    refund = before.refund if refund_target is None else max(before.refund, min(refund_target, lot.amount))
    dispute = before.dispute if dispute_target is None else max(dispute_target, 0)
    dispute = min(dispute, lot.amount - refund)
    change = refund + dispute - before.total
    from_lot, as_debt = before.from_lot, before.as_debt
    taken = debt_added = 0
    if change > 0:
        taken = min(change, lot.remaining)
        by_expiry = min(change - taken, lot.expired - before.by_expiry)
        debt_added = change - taken - by_expiry
        from_lot, as_debt = from_lot + taken, as_debt + debt_added
    elif change < 0:
        back = -change
        debt_back = min(back, as_debt)
        expiry_back = min(back - debt_back, before.by_expiry)
        lot_back = min(back - debt_back - expiry_back, from_lot)
        cancelled = min(debt_back, wallet_debt)
        given = min(lot_back + debt_back - cancelled, lot.amount - lot.remaining)
        taken, debt_added = -given, -cancelled
        from_lot, as_debt = from_lot - lot_back, as_debt - debt_back
    return ClawBack(Revoked(refund, dispute, from_lot, as_debt), taken, debt_added, change)


__all__ = ["ClawBack", "PurchaseLot", "Revoked", "claw_back", "credits_for", "debt_payment"]
