"""What the admin console reads: wallets found by user or key id, a wallet's lots, debt, purchases and
the Stripe events about them, and the webhook events received. Reads only: every change the console
makes goes through the ledger."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from ..records import Wallet

if TYPE_CHECKING:
    from sqlalchemy.engine import Row

    from ..extension import FlaskCredits

#: How many rows a list of the console shows at most (wallets found, purchases, events per page).
PAGE = 50


@dataclass(frozen=True)
class WalletState:
    """A wallet as the console shows it: ``balance`` spendable now, ``held`` by live holds, ``debt``
    owed, and its lots with credits left (``lots``: rows with amount, remaining, expires_at)."""

    wallet: Wallet
    exists: bool
    balance: int
    held: int
    debt: int
    lots: Sequence[Any]


def find_wallets(ext: FlaskCredits, query: str) -> list[Wallet]:
    """The wallets whose user id or key id is exactly ``query`` (a user's own wallet and its keys'),
    at most :data:`PAGE`."""
    w = ext.tables.wallets
    with ext.database.reader.connect() as conn:
        rows = conn.execute(
            sa.select(w.c.user_id, w.c.key_id)
            .where(sa.or_(w.c.user_id == query, w.c.key_id == query))
            .order_by(w.c.user_id, w.c.key_id)
            .limit(PAGE)
        ).all()
    return [Wallet(row.user_id, row.key_id or None) for row in rows]


def wallet_state(ext: FlaskCredits, wallet: Wallet) -> WalletState:
    w, lt = ext.tables.wallets, ext.tables.lots
    balance = ext.ledger.balance(wallet)  # expires what is due first
    with ext.database.reader.connect() as conn:
        row = conn.execute(
            sa.select(w.c.id, w.c.held, w.c.debt).where(
                w.c.user_id == wallet.user_id, w.c.key_id == (wallet.key_id or "")
            )
        ).first()
        lots = (
            []
            if row is None
            else conn.execute(
                sa.select(lt.c.id, lt.c.entry_id, lt.c.amount, lt.c.remaining, lt.c.expires_at)
                .where(lt.c.wallet_id == row.id, lt.c.remaining > 0)
                .order_by(lt.c.expires_at.is_(None), lt.c.expires_at, lt.c.id)
                .limit(PAGE)
            ).all()
        )
    if row is None:
        return WalletState(wallet, False, 0, 0, 0, [])
    return WalletState(wallet, True, balance, int(row.held), int(row.debt), lots)


def purchases_of(ext: FlaskCredits, wallet: Wallet) -> list[Row[Any]]:
    """The wallet's newest purchases (checkouts, plans' invoices, automatic top-ups)."""
    p, w = ext.tables.purchases, ext.tables.wallets
    with ext.database.reader.connect() as conn:
        return list(
            conn.execute(
                sa.select(p)
                .join(w, w.c.id == p.c.wallet_id)
                .where(w.c.user_id == wallet.user_id, w.c.key_id == (wallet.key_id or ""))
                .order_by(p.c.id.desc())
                .limit(PAGE)
            ).all()
        )


def events(ext: FlaskCredits, *, page: int = 1, purchase_ids: list[int] | None = None) -> list[Row[Any]]:
    """Webhook events received, newest first, :data:`PAGE` a page (``page`` counts from 1); only
    those about ``purchase_ids`` when given."""
    ev = ext.tables.stripe_events
    query = sa.select(ev).order_by(ev.c.received_at.desc(), ev.c.id.desc())
    if purchase_ids is not None:
        if not purchase_ids:
            return []
        query = query.where(ev.c.purchase_id.in_(purchase_ids))
    with ext.database.reader.connect() as conn:
        return list(conn.execute(query.limit(PAGE).offset((page - 1) * PAGE)).all())


def dashboard_url(ext: FlaskCredits, stripe_id: str | None) -> str | None:
    """The Stripe Dashboard page of a Checkout Session, PaymentIntent, invoice or event id, in test or
    live mode as the secret key says; None in simulated mode or for an id of another kind."""
    settings = ext.settings
    if not stripe_id or settings.stripe_mode == "simulated":
        return None
    paths = {"cs_": "checkout/sessions", "pi_": "payments", "in_": "invoices", "evt_": "events"}
    path = next((v for k, v in paths.items() if stripe_id.startswith(k)), None)
    if path is None:
        return None
    key = settings.stripe_secret_key or ""
    live = key.startswith(("sk_live_", "rk_live_"))
    return f"https://dashboard.stripe.com/{'' if live else 'test/'}{path}/{stripe_id}"


def when(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M")
