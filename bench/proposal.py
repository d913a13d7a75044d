"""A prototype of the changes ``docs/benchmarks.md`` proposes for ``Ledger.spend()`` - NOT part of the
extension, and not used by it: it exists so that the report can show, in the same run, what the
proposed changes would gain.

``ProposedSpend(ledger)`` debits like ``Ledger.spend()``'s fast path (wallet not expired, one lot
covering the amount, no idempotency key), writing the same rows:

1. the statements are built once, with bind parameters, instead of on every call (the profile shows
   SQLAlchemy expression construction, cache-key generation and coercion as the largest cost);
2. the lot is drawn with one statement,
   ``UPDATE credits_lots SET remaining = remaining - :n WHERE id = (SELECT id ... ORDER BY <expiry
   order> LIMIT 1) AND remaining >= :n RETURNING id``, instead of ``SELECT ... FOR UPDATE`` followed by
   ``UPDATE`` (the wallet row lock taken by the first statement already serialises every writer of the
   wallet's lots, so the lot needs no lock of its own);

3. ``single=True`` (PostgreSQL only): the whole debit is one statement, ``WITH w AS (UPDATE wallet
   ... RETURNING), l AS (UPDATE lot ...), e AS (INSERT entry ...), d AS (INSERT draw ...) SELECT ...``
   (``SINGLE`` below), so the wallet row stays locked for one statement and the COMMIT, as short as in
   the hand-written limit. All parts of a ``WITH`` share one snapshot: if the wallet row was locked
   by a concurrent debit, the lot chosen may have been emptied meanwhile; the lot's own
   ``remaining >= :n`` re-check then fails, no entry is written, and the fallback below completes the
   debit in the same transaction (the wallet row is still locked).

When the first lot does not cover the amount, it falls back to the ledger's own ``_draw`` loop inside
the same transaction; when the wallet cannot pay, it returns ``None`` (the real method then goes on to
its slow path). ``audit()`` stays clean after it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from flask_credits import signals
from flask_credits.ledger import Ledger, _Draw, utcnow
from flask_credits.records import Entry, Wallet

SINGLE = """
WITH w AS (
    UPDATE credits_wallets SET balance = balance - :p_amount, updated_at = :p_now
    WHERE user_id = :p_user_id AND key_id = :p_key_id AND balance >= :p_amount
      AND (next_expiry IS NULL OR next_expiry > :p_now)
    RETURNING id, balance
), l AS (
    UPDATE credits_lots SET remaining = remaining - :p_amount
    WHERE id = (
        SELECT lots.id FROM credits_lots AS lots, w
        WHERE lots.wallet_id = w.id AND lots.remaining > 0
        ORDER BY CASE WHEN lots.expires_at IS NULL THEN 1 ELSE 0 END, lots.expires_at, lots.id
        LIMIT 1
    ) AND remaining >= :p_amount
    RETURNING id
), e AS (
    INSERT INTO credits_entries
        (wallet_id, amount, balance_after, kind, reason, idempotency_key, reverses_id, meta, created_at)
    SELECT w.id, -:p_amount, w.balance, 'spend', :p_reason, NULL, NULL, CAST(:p_meta AS JSON), :p_now
    FROM w, l
    RETURNING id
), d AS (
    INSERT INTO credits_draws (entry_id, lot_id, amount) SELECT e.id, l.id, -:p_amount FROM e, l
    RETURNING entry_id
)
SELECT w.id, w.balance, (SELECT entry_id FROM d) AS entry_id FROM w
"""


class ProposedSpend:
    def __init__(self, ledger: Ledger, *, single: bool = False) -> None:
        self.ledger = ledger
        t = ledger.t
        w, lt, e, d = t.wallets, t.lots, t.entries, t.draws
        self.pg = ledger.engine.dialect.name == "postgresql"
        if single and not self.pg:
            raise ValueError("the single-statement debit needs PostgreSQL")
        self.single = single
        self.one_statement = sa.text(SINGLE).bindparams(
            sa.bindparam("p_now", type_=w.c.updated_at.type),
            sa.bindparam("p_meta", type_=e.c.meta.type),
            sa.bindparam("p_amount", type_=sa.BigInteger()),
        )
        now = sa.bindparam("p_now", type_=w.c.updated_at.type)
        amount = sa.bindparam("p_amount", type_=sa.BigInteger())
        self.debit = (
            sa.update(w)
            .where(
                w.c.user_id == sa.bindparam("p_user_id"),
                w.c.key_id == sa.bindparam("p_key_id"),
                w.c.balance >= amount,
                sa.or_(w.c.next_expiry.is_(None), w.c.next_expiry > now),
            )
            .values(balance=w.c.balance - amount, updated_at=now)
            .returning(w.c.id, w.c.balance)
        )
        first_lot = (
            sa.select(lt.c.id)
            .where(lt.c.wallet_id == sa.bindparam("p_wallet_id"), lt.c.remaining > 0)
            .order_by(sa.case((lt.c.expires_at.is_(None), 1), else_=0), lt.c.expires_at, lt.c.id)
            .limit(1)
            .scalar_subquery()
        )
        self.draw = (
            sa.update(lt)
            .where(lt.c.id == first_lot, lt.c.remaining >= amount)
            .values(remaining=lt.c.remaining - amount)
            .returning(lt.c.id)
        )
        self.entry = sa.insert(e).values(
            wallet_id=sa.bindparam("p_wallet_id"),
            amount=sa.bindparam("p_signed"),
            balance_after=sa.bindparam("p_balance_after"),
            kind="spend",
            reason=sa.bindparam("p_reason"),
            idempotency_key=None,
            reverses_id=None,
            meta=sa.bindparam("p_meta", type_=e.c.meta.type),
            created_at=sa.bindparam("p_now", type_=e.c.created_at.type),
        )
        if self.pg:
            self.entry = self.entry.returning(e.c.id)
        self.draw_row = sa.insert(d).values(
            entry_id=sa.bindparam("p_entry_id"),
            lot_id=sa.bindparam("p_lot_id"),
            amount=sa.bindparam("p_signed"),
        )

    def spend(
        self, wallet: Wallet, amount: int, *, reason: str, metadata: dict[str, Any] | None = None
    ) -> Entry | None:
        now = utcnow()
        with self.ledger.engine.begin() as conn:
            entry = self._tx(conn, wallet, amount, reason, metadata, now)
        if entry is not None:
            self.ledger.emit(signals.credits_spent, wallet=wallet, amount=amount, entry=entry)
        return entry

    def _tx(
        self,
        conn: Connection,
        wallet: Wallet,
        amount: int,
        reason: str,
        metadata: dict[str, Any] | None,
        now: datetime,
    ) -> Entry | None:
        owner = {
            "p_user_id": wallet.user_id,
            "p_key_id": wallet.key_id or "",
            "p_amount": amount,
            "p_now": now,
        }
        if self.single:
            row = conn.execute(self.one_statement, {**owner, "p_reason": reason, "p_meta": metadata}).first()
            if row is None:
                return None
            if row.entry_id is not None:
                return self._entry(int(row.entry_id), wallet, amount, int(row.balance), reason, metadata, now)
            lot = None  # the lot chosen was emptied while the wallet row was locked: draw below
        else:
            row = conn.execute(self.debit, owner).first()
            if row is None:
                return None
            lot = conn.execute(self.draw, {"p_wallet_id": int(row[0]), "p_amount": amount}).first()
        wallet_id, balance_after = int(row[0]), int(row[1])
        if lot is not None:
            draws = [_Draw(int(lot[0]), -amount)]
        else:  # the first lot does not cover the amount: the ledger's loop, same transaction
            draws = self.ledger._draw(conn, wallet_id, amount)
        values = {
            "p_wallet_id": wallet_id,
            "p_signed": -amount,
            "p_balance_after": balance_after,
            "p_reason": reason,
            "p_meta": metadata,
            "p_now": now,
        }
        result = conn.execute(self.entry, values)
        entry_id = int(result.scalar_one() if self.pg else result.inserted_primary_key[0])  # type: ignore[index]
        conn.execute(
            self.draw_row,
            [{"p_entry_id": entry_id, "p_lot_id": d.lot_id, "p_signed": d.amount} for d in draws],
        )
        return self._entry(entry_id, wallet, amount, balance_after, reason, metadata, now)

    @staticmethod
    def _entry(
        entry_id: int,
        wallet: Wallet,
        amount: int,
        balance_after: int,
        reason: str,
        metadata: dict[str, Any] | None,
        now: datetime,
    ) -> Entry:
        return Entry(
            id=entry_id,
            wallet=wallet,
            amount=-amount,
            balance_after=balance_after,
            kind="spend",
            reason=reason,
            idempotency_key=None,
            metadata=metadata,
            created_at=now,
        )
