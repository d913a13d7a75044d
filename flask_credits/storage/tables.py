"""The extension's tables, defined on the host app's own ``MetaData``.

They are SQLAlchemy Core tables rather than ORM models so that the ledger can issue exactly the
statements a correct debit needs, and so that they land on the host's ``db.metadata``: the host's own
``flask db migrate`` then picks them up like its own models.

The database enforces what it can: no negative balance, lot or debt; no zero-amount entry; a lot never
holds more than it was created with; one idempotency key per wallet; one refund per spend; one
purchase per Checkout Session; one row per Stripe event; one Stripe Customer per user.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect

#: Longest user id or API-key id a wallet can carry.
ID_LENGTH = 64

#: Longest Idempotency-Key a request may carry, and longest endpoint name it is scoped to.
KEY_LENGTH = 255
ENDPOINT_LENGTH = 255

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# A stored response body: MySQL's plain BLOB stops at 64 KiB.
_BLOB = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """Timezone-aware UTC in Python, naive UTC with microseconds in every database.

    MySQL/MariaDB ``DATETIME`` would otherwise drop the microseconds, and SQLite and MySQL have no
    time zones; storing naive UTC everywhere keeps comparisons in SQL portable.
    """

    impl = sa.DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("flask_credits stores aware datetimes only; pass tzinfo=timezone.utc")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class Tables:
    wallets: sa.Table
    lots: sa.Table
    entries: sa.Table
    draws: sa.Table
    purchases: sa.Table
    stripe_events: sa.Table
    requests: sa.Table
    holds: sa.Table
    hold_draws: sa.Table
    subscriptions: sa.Table
    customers: sa.Table
    auto_top_ups: sa.Table
    codes: sa.Table
    code_redemptions: sa.Table


_cache: weakref.WeakKeyDictionary[sa.MetaData, Tables] = weakref.WeakKeyDictionary()


def tables_for(metadata: sa.MetaData) -> Tables:
    """Return the extension's tables on ``metadata``, defining them there the first time."""
    found = _cache.get(metadata)
    if found is None:
        found = _cache[metadata] = _define(metadata)
    return found


def _define(md: sa.MetaData) -> Tables:
    wallets = sa.Table(
        "credits_wallets",
        md,
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.String(ID_LENGTH), nullable=False),
        # "" is the user's own wallet: a NULL would let two rows claim it despite the unique key.
        sa.Column("key_id", sa.String(ID_LENGTH), nullable=False, server_default=""),
        sa.Column("balance", sa.BigInteger(), nullable=False, server_default="0"),
        # Credits owed after a refund or dispute took back credits already spent; purchases pay it first.
        sa.Column("debt", sa.BigInteger(), nullable=False, server_default="0"),
        # Credits reserved by live holds: out of ``balance`` (which is what can be spent now) and out
        # of the lots they were drawn from (``credits_hold_draws`` says which), still the wallet's.
        sa.Column("held", sa.BigInteger(), nullable=False, server_default="0"),
        # Soonest expiry among lots with credits left and live holds (or earlier): spends take the
        # slow path only once it passed.
        sa.Column("next_expiry", UtcDateTime(), nullable=True),
        # The wallet's auto top-up threshold while auto top-up is on (NULL: off), and its own
        # low-balance threshold (NULL: CREDITS_LOW_BALANCE). Every debit returns both with the row it
        # already updates, so telling whether it crossed one costs no query.
        sa.Column("top_up_below", sa.BigInteger(), nullable=True),
        sa.Column("low_below", sa.BigInteger(), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.UniqueConstraint("user_id", "key_id", name="uq_credits_wallets_owner"),
        sa.CheckConstraint("balance >= 0", name="ck_credits_wallets_balance"),
        sa.CheckConstraint("debt >= 0", name="ck_credits_wallets_debt"),
        sa.CheckConstraint("held >= 0", name="ck_credits_wallets_held"),
    )
    entries = sa.Table(
        "credits_entries",
        md,
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("wallet_id", _ID, sa.ForeignKey("credits_wallets.id"), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("balance_after", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(255), nullable=False, server_default=""),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        # The spend this entry returns (kind "refund"): unique, so a spend is returned at most once.
        sa.Column("reverses_id", _ID, sa.ForeignKey("credits_entries.id"), nullable=True),
        sa.Column("meta", sa.JSON(), nullable=True),
        # Who made a change by hand (an admin's identity, the CLI's OS user or --actor); NULL for the
        # app's own debits and purchases.
        sa.Column("actor", sa.String(255), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.UniqueConstraint("wallet_id", "idempotency_key", name="uq_credits_entries_idempotency"),
        sa.UniqueConstraint("reverses_id", name="uq_credits_entries_reverses"),
        sa.CheckConstraint("amount <> 0", name="ck_credits_entries_amount"),
        sa.CheckConstraint("balance_after >= 0", name="ck_credits_entries_balance_after"),
        sa.Index("ix_credits_entries_wallet_id", "wallet_id", "id"),
    )
    lots = sa.Table(
        "credits_lots",
        md,
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("wallet_id", _ID, sa.ForeignKey("credits_wallets.id"), nullable=False),
        sa.Column("entry_id", _ID, sa.ForeignKey("credits_entries.id"), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("remaining", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", UtcDateTime(), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.CheckConstraint("amount > 0", name="ck_credits_lots_amount"),
        sa.CheckConstraint("remaining >= 0 AND remaining <= amount", name="ck_credits_lots_remaining"),
        sa.Index("ix_credits_lots_wallet_expiry", "wallet_id", "expires_at", "id"),
    )
    draws = sa.Table(
        "credits_draws",
        md,
        sa.Column("entry_id", _ID, sa.ForeignKey("credits_entries.id"), primary_key=True),
        sa.Column("lot_id", _ID, sa.ForeignKey("credits_lots.id"), primary_key=True),
        # Signed like the entry: negative when the entry took credits out of the lot.
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("amount <> 0", name="ck_credits_draws_amount"),
        sa.Index("ix_credits_draws_lot_id", "lot_id"),
    )
    subscriptions = sa.Table(
        "credits_subscriptions",
        md,
        # A wallet's Stripe subscription to one of CREDITS_PLANS, stored before the customer is sent
        # to Stripe, like a purchase.
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("wallet_id", _ID, sa.ForeignKey("credits_wallets.id"), nullable=False),
        # The plan now on the subscription (a portal change moves it); each invoice grants by its price.
        sa.Column("plan", sa.String(64), nullable=False),
        # Ours before Stripe has a subscription ("creating", "open" while its Checkout Session is,
        # "expired" when abandoned, "error" when Stripe refused), then Stripe's own status.
        sa.Column("status", sa.String(24), nullable=False),
        # Stripe's idempotency key and the Checkout Session's client_reference_id.
        sa.Column("attempt_key", sa.String(64), nullable=False),
        sa.Column("checkout_session_id", sa.String(255), nullable=True),
        sa.Column("stripe_subscription_id", sa.String(255), nullable=True),
        sa.Column("current_period_end", UtcDateTime(), nullable=True),
        sa.Column("cancel_at_period_end", sa.Boolean(), nullable=False),
        # When Stripe created the latest ``customer.subscription.*`` event applied to plan, status and
        # cancel_at_period_end: an older event, delivered late, does not undo a newer one.
        sa.Column("stripe_event_at", UtcDateTime(), nullable=True),
        # = wallet_id while the subscription is live, NULL once it ended: the unique key lets a wallet
        # have one live subscription, whatever runs at once.
        sa.Column("live_wallet_id", _ID, nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.UniqueConstraint("attempt_key", name="uq_credits_subscriptions_attempt_key"),
        sa.UniqueConstraint("checkout_session_id", name="uq_credits_subscriptions_session_id"),
        sa.UniqueConstraint("stripe_subscription_id", name="uq_credits_subscriptions_stripe_id"),
        sa.UniqueConstraint("live_wallet_id", name="uq_credits_subscriptions_live_wallet"),
        sa.CheckConstraint(
            "live_wallet_id IS NULL OR live_wallet_id = wallet_id", name="ck_credits_subscriptions_live"
        ),
        sa.Index("ix_credits_subscriptions_wallet_id", "wallet_id", "id"),
    )
    purchases = sa.Table(
        "credits_purchases",
        md,
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("wallet_id", _ID, sa.ForeignKey("credits_wallets.id"), nullable=False),
        sa.Column("session_id", sa.String(255), nullable=True),
        sa.Column("attempt_key", sa.String(64), nullable=False),
        sa.Column("pack", sa.String(64), nullable=True),
        sa.Column("quantity", sa.Integer(), nullable=True),
        sa.Column("credits", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("expires_after_seconds", sa.BigInteger(), nullable=True),
        sa.Column("payment_intent", sa.String(255), nullable=True),
        # Bought by auto top-up (an off-session PaymentIntent), not at a checkout.
        sa.Column("automatic", sa.Boolean(), nullable=False, default=False),
        sa.Column("lot_id", _ID, sa.ForeignKey("credits_lots.id"), nullable=True),
        # Credits clawed back so far: for refunds (cumulative over partial refunds) and for a
        # dispute (given back if it is won). Together they are covered by credits taken from the
        # purchase's lot, by its expired credits, and by debt for credits already spent.
        sa.Column("refund_revoked", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("dispute_revoked", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("revoked_from_lot", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("revoked_as_debt", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        # When the success page last asked Stripe about this purchase: it asks at most once per
        # CREDITS_SUCCESS_CHECK_INTERVAL, however often the page is loaded.
        sa.Column("checked_at", UtcDateTime(), nullable=True),
        # A plan's allowance: the paid Stripe invoice it came from (one row, so one credit, per
        # invoice) and the subscription it belongs to. NULL for Checkout purchases.
        sa.Column("invoice_id", sa.String(255), nullable=True),
        sa.Column("subscription_id", _ID, sa.ForeignKey("credits_subscriptions.id"), nullable=True),
        sa.UniqueConstraint("session_id", name="uq_credits_purchases_session_id"),
        sa.UniqueConstraint("invoice_id", name="uq_credits_purchases_invoice_id"),
        sa.UniqueConstraint("attempt_key", name="uq_credits_purchases_attempt_key"),
        sa.UniqueConstraint("payment_intent", name="uq_credits_purchases_payment_intent"),
        sa.CheckConstraint("credits > 0", name="ck_credits_purchases_credits"),
        sa.CheckConstraint("amount >= 0", name="ck_credits_purchases_amount"),
        sa.CheckConstraint(
            "refund_revoked >= 0 AND dispute_revoked >= 0 AND revoked_from_lot >= 0"
            " AND revoked_as_debt >= 0 AND refund_revoked + dispute_revoked <= credits"
            " AND revoked_from_lot + revoked_as_debt <= refund_revoked + dispute_revoked",
            name="ck_credits_purchases_revoked",
        ),
        sa.Index("ix_credits_purchases_wallet_id", "wallet_id", "id"),
    )
    stripe_events = sa.Table(
        "credits_stripe_events",
        md,
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("type", sa.String(128), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        # No foreign key on purpose: on InnoDB it would share-lock the purchase row that the same
        # transaction then updates, turning concurrent deliveries into deadlocks.
        sa.Column("purchase_id", _ID, nullable=True),
        sa.Column("received_at", UtcDateTime(), nullable=False),
        sa.Index("ix_credits_stripe_events_purchase_id", "purchase_id"),
    )
    requests = sa.Table(
        "credits_requests",
        md,
        # One row per Idempotency-Key of a @requires_credits request, scoped to the wallet and the
        # endpoint: the unique key lets exactly one request claim it, whatever runs at once.
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.String(ID_LENGTH), nullable=False),
        sa.Column("key_id", sa.String(ID_LENGTH), nullable=False, server_default=""),
        sa.Column("endpoint", sa.String(ENDPOINT_LENGTH), nullable=False),
        sa.Column("idempotency_key", sa.String(KEY_LENGTH), nullable=False),
        # SHA-256 of the method, path, query and body: the same key with another request is refused.
        sa.Column("fingerprint", sa.String(64), nullable=False),
        # "running" while a request holds the key, "done" with its stored response, "unstored" when
        # the response could not be kept (streamed or too large).
        sa.Column("status", sa.String(16), nullable=False),
        # Fencing token: bumped when a request takes over the key of one that crashed, so the
        # crashed one can no longer store its response or free the key.
        sa.Column("attempt", sa.Integer(), nullable=False, server_default="1"),
        # Until then the running request owns the key; after it, its worker is taken to be dead.
        sa.Column("locked_until", UtcDateTime(), nullable=False),
        # The spend that paid for the run (no foreign key, as for Stripe events: InnoDB would
        # share-lock the entry row).
        sa.Column("spend_id", _ID, nullable=True),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response_headers", sa.JSON(), nullable=True),
        sa.Column("response_body", _BLOB, nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("expires_at", UtcDateTime(), nullable=False),
        sa.UniqueConstraint(
            "user_id", "key_id", "endpoint", "idempotency_key", name="uq_credits_requests_key"
        ),
        sa.CheckConstraint("status IN ('running', 'done', 'unstored')", name="ck_credits_requests_status"),
        sa.Index("ix_credits_requests_expires_at", "expires_at"),
        # Row ids are never reused (SQLite would reuse a deleted last one): a run's ledger spend is
        # keyed by its row id, and a freed key's next run must not find the refunded spend of the last.
        sqlite_autoincrement=True,
    )
    holds = sa.Table(
        "credits_holds",
        md,
        # A reservation of credits for work whose cost is known only afterwards (hold, then settle).
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("wallet_id", _ID, sa.ForeignKey("credits_wallets.id"), nullable=False),
        # Credits the hold reserves now (it grows when extended); what was asked for first.
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("requested", sa.BigInteger(), nullable=False),
        # "held" while it counts; "settled" (charged), "released" (given back) or "expired" (given
        # back by expiry: it can still be settled, from what the wallet can spend then).
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(255), nullable=False, server_default=""),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("expires_at", UtcDateTime(), nullable=False),
        # What the settle charged, the spend entry it wrote (none when nothing left the wallet), and
        # the part of the charge the wallet could not pay, which became debt.
        sa.Column("settled_amount", sa.BigInteger(), nullable=True),
        sa.Column("entry_id", _ID, nullable=True),
        sa.Column("debt", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.UniqueConstraint("wallet_id", "idempotency_key", name="uq_credits_holds_idempotency"),
        sa.CheckConstraint("amount >= 0 AND requested > 0 AND debt >= 0", name="ck_credits_holds_amount"),
        sa.CheckConstraint(
            "status IN ('held', 'settled', 'released', 'expired')", name="ck_credits_holds_status"
        ),
        # A wallet's live holds (its expiry, ``holds()``). No index across wallets: the sweep finds
        # wallets by ``next_expiry``, and every index written costs each hold and settle.
        sa.Index("ix_credits_holds_wallet_status", "wallet_id", "status", "expires_at"),
    )
    hold_draws = sa.Table(
        "credits_hold_draws",
        md,
        # Which lots a live hold's credits came from: a settle charges them (soonest expiry first)
        # and gives the rest back to the same lots. Deleted when the hold ends.
        sa.Column("hold_id", _ID, sa.ForeignKey("credits_holds.id"), primary_key=True),
        sa.Column("lot_id", _ID, sa.ForeignKey("credits_lots.id"), primary_key=True),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("amount > 0", name="ck_credits_hold_draws_amount"),
        sa.Index("ix_credits_hold_draws_lot_id", "lot_id"),
    )
    customers = sa.Table(
        "credits_customers",
        md,
        # The Stripe Customer of a wallet owner (a user; an API key's wallet uses its user's). The
        # row is written before Stripe is asked, with the idempotency key every attempt to create
        # the customer sends, so that concurrent first checkouts (and a retry after a crash between
        # Stripe's answer and the row) create one customer; the unique keys let exactly one id stick.
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.String(ID_LENGTH), nullable=False),
        sa.Column("stripe_customer_id", sa.String(255), nullable=True),
        # Random, never derived from the user id: another app or environment on the same Stripe
        # account has users with the same ids, and Stripe would answer them with this user's customer.
        sa.Column("idempotency_key", sa.String(64), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.UniqueConstraint("user_id", name="uq_credits_customers_user_id"),
        sa.UniqueConstraint("stripe_customer_id", name="uq_credits_customers_stripe_customer_id"),
    )
    auto_top_ups = sa.Table(
        "credits_auto_top_ups",
        md,
        # A wallet's auto top-up: when a debit takes it from at or above ``threshold`` to below it,
        # buy ``pack`` (or ``quantity`` units) off-session with the saved card, once per crossing.
        sa.Column(
            "wallet_id", _ID, sa.ForeignKey("credits_wallets.id"), primary_key=True, autoincrement=False
        ),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("threshold", sa.BigInteger(), nullable=False),
        sa.Column("pack", sa.String(64), nullable=True),
        sa.Column("quantity", sa.Integer(), nullable=True),
        # At most this much (minor units of the currency) bought automatically per calendar month
        # (UTC); ``month_spent`` is what was bought in ``month`` ("2026-11").
        sa.Column("monthly_cap", sa.BigInteger(), nullable=False),
        sa.Column("month", sa.String(7), nullable=True),
        sa.Column("month_spent", sa.BigInteger(), nullable=False, server_default="0"),
        # The debit entry of the latest crossing acted on: a crossing is acted on once, by whoever
        # moves this forward (the request that debited, or the sweep).
        sa.Column("crossing_entry_id", _ID, nullable=True),
        # The automatic purchase in flight (at most one per wallet), NULL when none.
        sa.Column("purchase_id", _ID, nullable=True),
        # The saved card (a PaymentMethod of the owner's Stripe customer).
        sa.Column("payment_method", sa.String(255), nullable=True),
        sa.Column("card_brand", sa.String(32), nullable=True),
        sa.Column("card_last4", sa.String(4), nullable=True),
        # Why auto top-up was turned off by a failed automatic purchase (shown on the credits page).
        sa.Column("failure", sa.String(255), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.CheckConstraint("threshold >= 0", name="ck_credits_auto_top_ups_threshold"),
        sa.CheckConstraint("monthly_cap >= 0", name="ck_credits_auto_top_ups_cap"),
        sa.CheckConstraint("month_spent >= 0", name="ck_credits_auto_top_ups_spent"),
        sa.CheckConstraint(
            "(pack IS NULL) <> (quantity IS NULL)", name="ck_credits_auto_top_ups_pack_or_quantity"
        ),
    )
    codes = sa.Table(
        "credits_codes",
        md,
        # A redeemable credit code (support, promotions): ``credits`` each time, at most
        # ``max_redemptions`` in all (``redeemed`` counts them: a conditional UPDATE takes one) and
        # ``per_user`` per wallet owner, until ``expires_at``, unless ``disabled``.
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        # Stored upper-case: codes are typed by people, case-insensitively.
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("credits", sa.BigInteger(), nullable=False),
        sa.Column("max_redemptions", sa.Integer(), nullable=False),
        sa.Column("redeemed", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("per_user", sa.Integer(), nullable=False),
        sa.Column("expires_at", UtcDateTime(), nullable=True),
        # The granted credits expire this long after each redemption (None: never).
        sa.Column("credits_expire_after_seconds", sa.BigInteger(), nullable=True),
        sa.Column("disabled", sa.Boolean(), nullable=False, default=False),
        # Who made it (the CLI's OS user or --actor, the admin's identity).
        sa.Column("actor", sa.String(255), nullable=True),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
        sa.UniqueConstraint("code", name="uq_credits_codes_code"),
        sa.CheckConstraint("credits > 0", name="ck_credits_codes_credits"),
        sa.CheckConstraint("per_user > 0", name="ck_credits_codes_per_user"),
        sa.CheckConstraint("redeemed >= 0 AND redeemed <= max_redemptions", name="ck_credits_codes_redeemed"),
    )
    code_redemptions = sa.Table(
        "credits_code_redemptions",
        md,
        # One redemption of a code: by ``user_id`` (the wallet owner, for ``per_user``) into a wallet,
        # written in the grant's own transaction (``entry_id``).
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("code_id", _ID, sa.ForeignKey("credits_codes.id"), nullable=False),
        sa.Column("user_id", sa.String(ID_LENGTH), nullable=False),
        sa.Column("wallet_id", _ID, sa.ForeignKey("credits_wallets.id"), nullable=False),
        sa.Column("entry_id", _ID, sa.ForeignKey("credits_entries.id"), nullable=False),
        sa.Column("created_at", UtcDateTime(), nullable=False),
        sa.UniqueConstraint("entry_id", name="uq_credits_code_redemptions_entry_id"),
        sa.Index("ix_credits_code_redemptions_code_user", "code_id", "user_id"),
    )
    return Tables(
        wallets,
        lots,
        entries,
        draws,
        purchases,
        stripe_events,
        requests,
        holds,
        hold_draws,
        subscriptions,
        customers,
        auto_top_ups,
        codes,
        code_redemptions,
    )
