"""The statements of the ledger's hot paths, built once per database, and PostgreSQL's one-statement
debit."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from ..records import FULFILLABLE, Wallet
from .tables import Tables

#: Lots fetched per round while drawing a debit.
LOT_BATCH = 16


class Statements:
    """The statements of the hot paths, built once per ledger with bind parameters: building a
    SQLAlchemy expression and its cache key on every call cost more than running it."""

    def __init__(self, t: Tables, *, returning: bool, lock_rows: bool) -> None:
        w, lt = t.wallets, t.lots
        # Bind names must differ from column names: SQLAlchemy reserves those in INSERT and UPDATE.
        owner = (w.c.user_id == sa.bindparam("b_user_id"), w.c.key_id == sa.bindparam("b_key_id"))
        amount = sa.bindparam("b_amount", type_=sa.BigInteger())
        now = sa.bindparam("b_now", type_=w.c.updated_at.type)
        wallet_id = sa.bindparam("b_wallet_id", type_=sa.BigInteger())
        self.balance = sa.select(
            w.c.id, w.c.balance, w.c.held, w.c.next_expiry, w.c.top_up_below, w.c.low_below
        ).where(*owner)
        debit = (
            sa.update(w)
            .where(*owner, w.c.balance >= amount, sa.or_(w.c.next_expiry.is_(None), w.c.next_expiry > now))
            .values(balance=w.c.balance - amount, updated_at=now)
        )
        self.debit = (
            debit.returning(w.c.id, w.c.balance, w.c.held, w.c.top_up_below, w.c.low_below)
            if returning
            else debit
        )
        # Soonest expiry first, lots that never expire last, then the oldest.
        order = (sa.case((lt.c.expires_at.is_(None), 1), else_=0), lt.c.expires_at, lt.c.id)
        # A plain read: the wallet row lock already keeps every other writer out of these lots, and
        # a locking range read would take InnoDB gap locks that collide with the neighbouring
        # wallet's lots (deadlocks between unrelated wallets).
        self.lots = (
            sa.select(lt.c.id, lt.c.remaining)
            .where(lt.c.wallet_id == wallet_id, lt.c.remaining > 0)
            .order_by(*order)
            .limit(LOT_BATCH)
        )
        first = (
            sa.select(lt.c.id)
            .where(lt.c.wallet_id == wallet_id, lt.c.remaining > 0)
            .order_by(*order)
            .limit(1)
            .scalar_subquery()
        )
        self.draw_first = (
            sa.update(lt)
            .where(lt.c.id == first, lt.c.remaining >= amount)
            .values(remaining=lt.c.remaining - amount)
            .returning(lt.c.id)
        )
        e = t.entries
        self.replay = sa.select(e).where(
            e.c.wallet_id == sa.select(w.c.id).where(*owner).scalar_subquery(),
            e.c.idempotency_key == sa.bindparam("b_key"),
        )
        self.insert_entry = sa.insert(e)
        self.insert_draws = sa.insert(t.draws)
        # A webhook's duplicate check, the whole work of a duplicate delivery.
        se = t.stripe_events
        self.event_seen = sa.select(se.c.id).where(se.c.id == sa.bindparam("b_event_id"))
        self.insert_event = sa.insert(se)
        # A purchase with its wallet's owner, by one column (``purchases.find``).
        p = t.purchases
        owner_key = w.c.key_id.label("wallet_key_id")
        self.purchase_with_owner = sa.select(p, w.c.user_id, owner_key).join(w, w.c.id == p.c.wallet_id)
        self.purchase_by = {
            column: self.purchase_with_owner.where(p.c[column] == sa.bindparam("b_value"))
            for column in ("id", "session_id", "payment_intent")
        }
        # Fulfilment (``Ledger.fulfil_purchase``): the conditional win, the wallet locked and
        # credited, the lot, and the lot's id back on the purchase.
        purchase_id = sa.bindparam("b_purchase_id", type_=sa.BigInteger())
        win = (
            sa.update(p)
            .where(p.c.id == purchase_id, p.c.status.in_(FULFILLABLE))
            .values(
                status="fulfilled",
                payment_intent=sa.bindparam("b_payment_intent", type_=p.c.payment_intent.type),
                updated_at=now,
            )
        )
        self.purchase_win = win.returning(*p.c) if returning else win
        self.purchase = sa.select(p).where(p.c.id == purchase_id)
        wallet_row = sa.select(w).where(w.c.id == wallet_id)
        self.wallet_locked = wallet_row.with_for_update() if lock_rows else wallet_row
        paid = sa.bindparam("b_paid", type_=sa.BigInteger())
        credit = sa.update(w).where(w.c.id == wallet_id, w.c.debt >= paid)
        gained = {"balance": w.c.balance + amount, "debt": w.c.debt - paid, "updated_at": now}
        self.credit = credit.values(**gained)
        # ``sooner(next_expiry, b_expiry)`` with the expiry bound rather than rendered.
        expiry = sa.bindparam("b_expiry", type_=w.c.next_expiry.type)
        self.credit_expiring = credit.values(**gained, next_expiry=earlier(w.c.next_expiry, expiry))
        self.insert_lot = sa.insert(lt)
        lot_id = sa.bindparam("b_lot_id", type_=sa.BigInteger())
        self.purchase_lot = sa.update(p).where(p.c.id == purchase_id).values(lot_id=lot_id)

    @staticmethod
    def owner(wallet: Wallet) -> dict[str, str]:
        return {"b_user_id": wallet.user_id, "b_key_id": wallet.key_id or ""}


#: PostgreSQL's one-statement debit (``Ledger._spend_in_one_statement``), run in autocommit. ``w``
#: debits the wallet only if its soonest lot covers the amount (a plain read); ``l`` takes the amount
#: from that lot; ``e`` and ``d`` write the entry and its draw. Every part of a ``WITH`` sees the
#: snapshot taken when the statement began, but ``w`` and ``l`` re-check their own row's conditions
#: after waiting for its lock (READ COMMITTED). So when ``w`` waited for a concurrent debit that
#: emptied that lot meanwhile, ``l`` writes nothing; the division by the draw count then raises
#: (SQLSTATE 22012) and the statement, its own transaction, is undone whole. No row back: nothing
#: written either.
SPEND = """\
WITH w AS (
    UPDATE credits_wallets SET balance = balance - %(amount)s::bigint, updated_at = %(now)s
    WHERE user_id = %(user_id)s AND key_id = %(key_id)s AND balance >= %(amount)s::bigint
      AND (next_expiry IS NULL OR next_expiry > %(now)s)
      AND (
        SELECT soonest.remaining FROM credits_lots AS soonest
        WHERE soonest.wallet_id = credits_wallets.id AND soonest.remaining > 0
        ORDER BY CASE WHEN soonest.expires_at IS NULL THEN 1 ELSE 0 END, soonest.expires_at, soonest.id
        LIMIT 1
      ) >= %(amount)s::bigint
    RETURNING id, balance, held, top_up_below, low_below
), l AS (
    UPDATE credits_lots SET remaining = remaining - %(amount)s::bigint
    WHERE id = (
        SELECT lots.id FROM credits_lots AS lots, w
        WHERE lots.wallet_id = w.id AND lots.remaining > 0
        ORDER BY CASE WHEN lots.expires_at IS NULL THEN 1 ELSE 0 END, lots.expires_at, lots.id
        LIMIT 1
    ) AND remaining >= %(amount)s::bigint
    RETURNING id
), e AS (
    INSERT INTO credits_entries
        (wallet_id, amount, balance_after, kind, reason, idempotency_key, meta, created_at)
    SELECT w.id, -%(amount)s::bigint, w.balance + w.held, 'spend', %(reason)s, %(key)s,
        CAST(%(meta)s AS JSON), %(now)s
    FROM w, l
    RETURNING id
), d AS (
    INSERT INTO credits_draws (entry_id, lot_id, amount)
    SELECT e.id, l.id, -%(amount)s::bigint FROM e, l
    RETURNING entry_id
)
SELECT w.id, w.balance, w.held, w.top_up_below, w.low_below, d.entry_id, 1 / (SELECT count(*) FROM d) AS guard
FROM w LEFT JOIN d ON true
"""


#: PostgreSQL: a webhook's duplicate check (``Statements.event_seen``) as ``Database.one`` runs it, on
#: the driver's connection in autocommit: the whole work of a duplicate delivery.
EVENT_SEEN = "SELECT id FROM credits_stripe_events WHERE id = %(event_id)s"


def sooner(column: sa.ColumnElement[Any], when: datetime | None) -> sa.ColumnElement[Any]:
    """``LEAST(column, when)`` where NULL means "never", portable to SQLite and MySQL."""
    if when is None:
        return column
    return earlier(column, sa.literal(when, column.type))


def earlier(column: sa.ColumnElement[Any], bound: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """``sooner`` with ``bound`` an expression (a bind parameter in a statement built once)."""
    return sa.case((sa.or_(column.is_(None), column > bound), bound), else_=column)


#: PostgreSQL's one-statement hold (``Ledger._hold_in_one_statement``), run in autocommit, built like
#: ``SPEND``: ``w`` reserves the credits on the wallet (``LEAST`` skips a NULL ``next_expiry``, which
#: means "never") only if its soonest lot covers them, ``l`` takes them from that lot, ``h`` and ``d``
#: write the hold and its one draw. Every write but ``w`` reads a row of the one before it, so the
#: wallet row is always locked first, as in the long way. The same guard undoes it whole when a
#: concurrent debit emptied the lot while ``w`` waited.
HOLD = """\
WITH w AS (
    UPDATE credits_wallets SET balance = balance - %(amount)s::bigint, held = held + %(amount)s::bigint,
        next_expiry = LEAST(next_expiry, %(expires_at)s), updated_at = %(now)s
    WHERE user_id = %(user_id)s AND key_id = %(key_id)s AND balance >= %(amount)s::bigint
      AND (next_expiry IS NULL OR next_expiry > %(now)s)
      AND (
        SELECT soonest.remaining FROM credits_lots AS soonest
        WHERE soonest.wallet_id = credits_wallets.id AND soonest.remaining > 0
        ORDER BY CASE WHEN soonest.expires_at IS NULL THEN 1 ELSE 0 END, soonest.expires_at, soonest.id
        LIMIT 1
      ) >= %(amount)s::bigint
    RETURNING id
), l AS (
    UPDATE credits_lots SET remaining = remaining - %(amount)s::bigint
    WHERE id = (
        SELECT lots.id FROM credits_lots AS lots, w
        WHERE lots.wallet_id = w.id AND lots.remaining > 0
        ORDER BY CASE WHEN lots.expires_at IS NULL THEN 1 ELSE 0 END, lots.expires_at, lots.id
        LIMIT 1
    ) AND remaining >= %(amount)s::bigint
    RETURNING id
), h AS (
    INSERT INTO credits_holds
        (wallet_id, amount, requested, status, reason, idempotency_key, expires_at, debt, created_at,
         updated_at)
    SELECT w.id, %(amount)s::bigint, %(amount)s::bigint, 'held', %(reason)s, %(key)s, %(expires_at)s, 0,
        %(now)s, %(now)s
    FROM w, l
    RETURNING id
), d AS (
    INSERT INTO credits_hold_draws (hold_id, lot_id, amount)
    SELECT h.id, l.id, %(amount)s::bigint FROM h, l
    RETURNING hold_id
)
SELECT d.hold_id, 1 / (SELECT count(*) FROM d) AS guard FROM w LEFT JOIN d ON true
"""

#: PostgreSQL's one-statement settle (``Ledger._settle_in_one_statement``) of the common case, run in
#: autocommit: a live hold drawn from one lot, settled at 1 up to its amount, in a wallet with no
#: expiry due. ``s`` reads the hold and its draw (a plain read, the snapshot); ``w`` gives the rest
#: back to the wallet's balance and ends the reservation, only if the wallet still reserves that
#: much; ``e`` writes the spend entry (metadata written as ``json.dumps`` writes the long way's);
#: ``h`` marks the hold settled only if it is still held with the amount ``s`` read; then ``l``
#: gives the rest back to the lot, ``gone`` deletes the hold's draw and ``d`` writes the entry's.
#: Lock order: each write reads a row of one after ``w``, so the wallet row is locked first, as in
#: the long way, and every other writer of a hold or a lot holds that lock too. When a concurrent
#: settle, release, extension or expiry of the hold committed while ``w`` waited, ``h`` re-checks the
#: newest row and writes nothing: the division by zero (SQLSTATE 22012) undoes the statement whole.
#: No row back: nothing written either; the long way decides. The hold is found by its id in every
#: part (a ``bigint``, so that the planner takes the primary key, not the index of live holds).
SETTLE = """\
WITH s AS (
    SELECT holds.id, holds.wallet_id, holds.amount, holds.reason, draws.lot_id, lots.expires_at AS lot_expiry,
        holds.amount - %(amount)s::bigint AS back
    FROM credits_holds AS holds
    JOIN credits_hold_draws AS draws ON draws.hold_id = holds.id AND draws.amount = holds.amount
    JOIN credits_lots AS lots ON lots.id = draws.lot_id
    WHERE holds.id = %(hold_id)s::bigint AND holds.status = 'held' AND holds.expires_at > %(now)s
      AND holds.amount >= %(amount)s::bigint
      AND (SELECT count(*) FROM credits_hold_draws AS others WHERE others.hold_id = holds.id) = 1
), w AS (
    UPDATE credits_wallets SET balance = balance + s.back, held = held - s.amount,
        next_expiry = CASE WHEN s.back > 0 THEN LEAST(next_expiry, s.lot_expiry) ELSE next_expiry END,
        updated_at = %(now)s
    FROM s
    WHERE credits_wallets.id = s.wallet_id AND credits_wallets.held >= s.amount
      AND (credits_wallets.next_expiry IS NULL OR credits_wallets.next_expiry > %(now)s)
    RETURNING credits_wallets.id, credits_wallets.user_id, credits_wallets.key_id,
        credits_wallets.balance + credits_wallets.held AS balance_after, credits_wallets.top_up_below,
        credits_wallets.low_below
), e AS (
    INSERT INTO credits_entries
        (wallet_id, amount, balance_after, kind, reason, idempotency_key, meta, created_at)
    SELECT w.id, -%(amount)s::bigint, w.balance_after, 'spend',
        COALESCE(NULLIF(%(reason)s, ''), NULLIF(s.reason, ''), 'settled hold'), %(key)s,
        CAST('{"hold_id": ' || s.id || ', "held": ' || s.amount || ', "amount": ' || %(amount)s::bigint
            || '}' AS JSON),
        %(now)s
    FROM w, s
    RETURNING id, reason
), h AS (
    UPDATE credits_holds SET status = 'settled', settled_amount = %(amount)s::bigint, entry_id = e.id,
        debt = 0, updated_at = %(now)s
    FROM e, s
    WHERE credits_holds.id = %(hold_id)s::bigint AND credits_holds.status = 'held'
      AND credits_holds.amount = s.amount
    RETURNING credits_holds.*
), l AS (
    UPDATE credits_lots SET remaining = remaining + s.back
    FROM h, s
    WHERE credits_lots.id = s.lot_id AND s.back > 0
    RETURNING credits_lots.id
), gone AS (
    DELETE FROM credits_hold_draws AS draws USING h, s
    WHERE draws.hold_id = %(hold_id)s::bigint AND draws.lot_id = s.lot_id
    RETURNING draws.hold_id
), d AS (
    INSERT INTO credits_draws (entry_id, lot_id, amount)
    SELECT e.id, s.lot_id, -%(amount)s::bigint FROM e, h, s
    RETURNING entry_id
)
SELECT w.user_id, w.key_id, w.balance_after, w.top_up_below, w.low_below, e.id AS spend_id,
    e.reason AS spend_reason, h.*,
    1 / ((SELECT count(*) FROM gone) * (SELECT count(*) FROM d)) AS guard
FROM w CROSS JOIN e LEFT JOIN h ON true
"""
