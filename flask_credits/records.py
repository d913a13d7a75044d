"""The read-only values the ledger hands back: a wallet's name and its entries."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple


class Wallet(NamedTuple):
    """Who owns credits: a user, or one of the user's API keys (``key_id``), as in Stripe metadata
    ``userId`` / ``keyId``. A user's own wallet and each key's wallet have separate balances."""

    user_id: str
    key_id: str | None = None


@dataclass(frozen=True)
class Entry:
    """One row of the append-only ledger: a change of one wallet's balance.

    ``amount`` is signed (credits in are positive), ``balance_after`` is what the wallet held once this
    entry applied (credits reserved by live holds included: it is the running sum of the amounts),
    ``kind`` is one of ``grant``, ``purchase``, ``spend``, ``refund``, ``expire``,
    ``revoke``, ``reinstate``, ``debt``, ``transfer`` (credits moved to another wallet, negative, with
    ``metadata["to"]``, or from one, positive, with ``metadata["from"]``: each names the other wallet's
    ``user_id`` and ``key_id``, and ``to`` also the target's ``entry_id``).

    ``replayed`` is about the call that returned it, not the row: ``True`` when an idempotency key
    made ``grant()`` or ``spend()`` return an entry written earlier (nothing was written this time).
    ``actor`` is who made a change by hand (an admin's identity, the CLI's user); ``None`` otherwise.
    """

    id: int
    wallet: Wallet
    amount: int
    balance_after: int
    kind: str
    reason: str
    idempotency_key: str | None
    metadata: dict[str, Any] | None
    created_at: datetime
    reverses_id: int | None = None
    actor: str | None = None
    replayed: bool = field(default=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, as the ``/transactions`` endpoint returns it."""
        return {
            "id": self.id,
            "user_id": self.wallet.user_id,
            "key_id": self.wallet.key_id,
            "amount": self.amount,
            "balance_after": self.balance_after,
            "kind": self.kind,
            "reason": self.reason,
            "idempotency_key": self.idempotency_key,
            "metadata": self.metadata,
            "created_at": self.created_at.isoformat(),
            "reverses_id": self.reverses_id,
            "actor": self.actor,
        }


@dataclass(frozen=True)
class Hold:
    """Credits reserved in one wallet for work whose cost is known only afterwards
    (:meth:`FlaskCredits.hold`); :meth:`FlaskCredits.settle` charges what it really cost.

    ``amount`` is what the hold reserves (it grows when extended), ``expires_at`` when it stops
    counting if nobody settles or releases it, ``status`` one of ``held``, ``settled``, ``released``
    or ``expired``. ``replayed`` is ``True`` when an idempotency key returned a hold placed earlier.
    """

    id: int
    user_id: str
    key_id: str | None
    amount: int
    expires_at: datetime
    status: str
    reason: str
    idempotency_key: str | None
    created_at: datetime
    replayed: bool = field(default=False, compare=False)

    @property
    def wallet(self) -> Wallet:
        return Wallet(self.user_id, self.key_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user_id": self.user_id,
            "key_id": self.key_id,
            "amount": self.amount,
            "status": self.status,
            "reason": self.reason,
            "expires_at": self.expires_at.isoformat(),
            "created_at": self.created_at.isoformat(),
        }


#: Subscription statuses of a subscription that has not ended (the wallet may not start another):
#: ours before Stripe has one, then Stripe's.
LIVE_SUBSCRIPTION = ("creating", "open", "incomplete", "trialing", "active", "past_due", "unpaid", "paused")
#: Statuses of a subscription that ended: ours ("expired": its checkout was abandoned; "error":
#: Stripe refused to create it), then Stripe's.
ENDED_SUBSCRIPTION = ("expired", "error", "incomplete_expired", "canceled")


@dataclass(frozen=True)
class Subscription:
    """A wallet's subscription to one of ``CREDITS_PLANS`` (:meth:`FlaskCredits.subscription`).

    ``status`` is Stripe's (``incomplete``, ``trialing``, ``active``, ``past_due``, ``unpaid``,
    ``paused``, ``canceled``, ``incomplete_expired``) once Stripe has the subscription; before, ours:
    ``creating``, ``open`` (its Checkout Session awaits the customer), ``expired`` or ``error``.
    ``current_period_end`` is when the period paid for ends (the next renewal), ``cancel_at_period_end``
    whether it ends then instead of renewing.
    """

    id: int
    user_id: str
    key_id: str | None
    plan: str
    status: str
    current_period_end: datetime | None
    cancel_at_period_end: bool
    stripe_subscription_id: str | None
    created_at: datetime

    @property
    def wallet(self) -> Wallet:
        return Wallet(self.user_id, self.key_id)

    @property
    def live(self) -> bool:
        return self.status in LIVE_SUBSCRIPTION

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user_id": self.user_id,
            "key_id": self.key_id,
            "plan": self.plan,
            "status": self.status,
            "current_period_end": (
                None if self.current_period_end is None else self.current_period_end.isoformat()
            ),
            "cancel_at_period_end": self.cancel_at_period_end,
            "created_at": self.created_at.isoformat(),
        }


#: Purchase statuses from which a payment may still be credited.
FULFILLABLE = ("creating", "open", "unpaid")


@dataclass(frozen=True)
class Purchase:
    """One Stripe Checkout purchase of credits, as stored before redirecting to Stripe.

    ``status`` is ``creating`` (before Stripe answered), ``open`` (waiting for the customer),
    ``unpaid`` (completed with a delayed payment method), ``fulfilled`` (credited), ``failed``,
    ``expired``, ``error`` (Stripe refused to create it) or ``mismatch`` (Stripe reported another
    amount than this app asked for: never credited).
    """

    id: int
    wallet: Wallet
    session_id: str | None
    pack: str | None
    quantity: int | None
    credits: int
    amount: int
    currency: str
    status: str
    payment_intent: str | None
    refund_revoked: int
    dispute_revoked: int
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user_id": self.wallet.user_id,
            "key_id": self.wallet.key_id,
            "session_id": self.session_id,
            "pack": self.pack,
            "quantity": self.quantity,
            "credits": self.credits,
            "amount": self.amount,
            "currency": self.currency,
            "status": self.status,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class AutoTopUp:
    """A wallet's auto top-up (:meth:`FlaskCredits.auto_top_up`): when a debit takes it below
    ``threshold`` credits, buy ``pack`` (or ``quantity`` units: ``credits`` for ``amount`` minor units of
    ``currency``) with the saved card, at most ``monthly_cap`` a calendar month (UTC).

    ``enabled`` is False when the user turned it off, when a failed automatic purchase did
    (``failure`` says why), or while ``CREDITS_AUTO_TOP_UP`` is False. ``in_flight``: an automatic
    purchase is under way (at most one per wallet).
    """

    wallet: Wallet
    enabled: bool
    threshold: int
    pack: str | None
    quantity: int | None
    credits: int
    amount: int
    currency: str
    monthly_cap: int
    spent_this_month: int
    card_brand: str | None
    card_last4: str | None
    has_card: bool
    failure: str | None
    in_flight: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.wallet.user_id,
            "key_id": self.wallet.key_id,
            "enabled": self.enabled,
            "threshold": self.threshold,
            "pack": self.pack,
            "quantity": self.quantity,
            "credits": self.credits,
            "amount": self.amount,
            "currency": self.currency,
            "monthly_cap": self.monthly_cap,
            "spent_this_month": self.spent_this_month,
            "card": {"brand": self.card_brand, "last4": self.card_last4} if self.has_card else None,
            "failure": self.failure,
            "in_flight": self.in_flight,
        }


@dataclass(frozen=True)
class CreditCode:
    """A redeemable credit code (``flask credits codes create``): each redemption grants ``credits``,
    at most ``max_redemptions`` in all (``redeemed`` so far) and ``per_user`` per wallet owner, until
    ``expires_at`` (None: never), unless ``disabled``. The credits granted expire
    ``credits_expire_after`` seconds after each redemption (None: never). ``code`` is upper-case:
    codes are matched case-insensitively. ``actor`` made it."""

    id: int
    code: str
    credits: int
    max_redemptions: int
    redeemed: int
    per_user: int
    expires_at: datetime | None
    credits_expire_after: int | None
    disabled: bool
    actor: str | None
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "code": self.code,
            "credits": self.credits,
            "max_redemptions": self.max_redemptions,
            "redeemed": self.redeemed,
            "per_user": self.per_user,
            "expires_at": None if self.expires_at is None else self.expires_at.isoformat(),
            "credits_expire_after": self.credits_expire_after,
            "disabled": self.disabled,
            "actor": self.actor,
            "created_at": self.created_at.isoformat(),
        }


@dataclass(frozen=True)
class Reconciled:
    """One purchase :meth:`FlaskCredits.reconcile` found out of step with Stripe, and what it did (in a
    dry run, would do). ``action`` is ``fulfilled`` (a paid checkout or automatic purchase credited),
    ``expired``, ``failed`` (an automatic purchase Stripe declined), ``mismatch`` (Stripe reports
    another amount: never credited), ``refund`` or ``dispute`` (a missed claw-back applied), or
    ``dispute_won`` (a dispute's claw-back given back). ``done`` is False in a dry run.
    ``purchase_id`` is None only in a dry run, for a paid plan invoice that has no purchase row yet
    (granting it would insert one)."""

    purchase_id: int | None
    wallet: Wallet
    reference: str  # the Checkout Session id, the automatic purchase's PaymentIntent id, or the invoice id
    action: str
    detail: str
    done: bool


@dataclass
class ReconcileReport:
    """What :meth:`FlaskCredits.reconcile` did: ``fixes``, one per action on a purchase, and
    ``counts`` of what needed nothing (``in_step``, ``not_ours``, ``plan_checkouts``,
    ``setup_checkouts``, ``no_allowance`` (a plan invoice that grants none, like a proration's),
    ``still_open``, ``done_meanwhile``: a webhook or another run was first)."""

    since: datetime
    dry_run: bool
    fixes: list[Reconciled] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    sessions: int = 0
    invoices: int = 0
    automatic: int = 0

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def summary(self) -> str:
        """One line: what was looked at, what was (or would be) fixed, and the rest counted."""
        actions: dict[str, int] = {}
        for fix in self.fixes:
            actions[fix.action] = actions.get(fix.action, 0) + 1
        fixed = ", ".join(f"{n} {action}" for action, n in sorted(actions.items()))
        rest = ", ".join(f"{n} {what.replace('_', ' ')}" for what, n in sorted(self.counts.items()))
        return (
            f"{'dry run: ' if self.dry_run else ''}checked {self.sessions} checkout sessions,"
            f" {self.invoices} plan invoices and {self.automatic} automatic purchases"
            f" since {self.since.isoformat(timespec='seconds')};"
            f" {'would fix' if self.dry_run else 'fixed'} {len(self.fixes)}"
            + (f" ({fixed})" if fixed else "")
            + (f"; {rest}" if rest else "")
        )
