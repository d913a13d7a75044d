"""The ledger: the only module that writes balances.

Every change of a balance is one short transaction on its own connection that

1. locks the wallet row by changing it with one conditional ``UPDATE`` (for a debit:
   ``... SET balance = balance - :n WHERE ... AND balance >= :n``, checking the row count),
2. moves credits in or out of the wallet's lots and records which lots it touched (``credits_draws``),
3. appends one entry with the balance after it.

The wallet row lock taken in step 1 serialises every writer of that wallet, on SQLite (database lock),
PostgreSQL (READ COMMITTED re-checks the ``WHERE`` after waiting) and MariaDB/MySQL (locking read),
so steps 2 and 3 never race. Unique keys turn a replayed idempotency key or a second refund of the same
spend into an ``IntegrityError``, which this module answers with the original entry. Signals are handed
to ``emit`` only after the commit.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from .. import signals
from ..errors import (
    EntryNotFound,
    HoldAlreadySettled,
    HoldNotFound,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidArgument,
    NotRefundable,
)
from ..records import Entry, Hold, Wallet
from ..storage.database import Database, sqlstate, unavailable_on_database_errors
from ..storage.statements import HOLD, SETTLE, SPEND, sooner
from .inputs import MAX_ID, check_amount, check_text
from .settlement import PurchaseLot, Revoked, claw_back, debt_payment

log = logging.getLogger("flask_credits")

T = TypeVar("T")
Emit = Callable[..., None]


InTx = Callable[[Connection], None]


@dataclass(frozen=True)
class Fulfilment:
    wallet: Wallet
    entry: Entry
    debt_paid: int


@dataclass(frozen=True)
class Revocation:
    wallet: Wallet
    entry: Entry | None  # None when no credits moved (all went to or came from debt)
    credits_taken: int  # out of the wallet; negative when given back
    debt_added: int  # negative when debt was cancelled
    change: int  # how much the clawed-back total moved


@dataclass
class _Draw:
    lot_id: int
    amount: int  # signed, as stored


def _naive_utc(when: datetime) -> datetime:
    """``when`` as the one-statement writes send it: naive UTC, like ``UtcDateTime`` stores it."""
    return when.astimezone(timezone.utc).replace(tzinfo=None)


def entry_of(row: Row[Any], wallet: Wallet) -> Entry:
    """The :class:`Entry` of a ``credits_entries`` row of ``wallet``."""
    return Entry(
        id=int(row.id),
        wallet=wallet,
        amount=int(row.amount),
        balance_after=int(row.balance_after),
        kind=row.kind,
        reason=row.reason,
        idempotency_key=row.idempotency_key,
        metadata=row.meta,
        created_at=row.created_at,
        reverses_id=row.reverses_id,
        actor=row.actor,
    )


def _merge(draws: list[_Draw]) -> list[_Draw]:
    """One draw per lot (a settle may take from a lot both the held credits and more)."""
    merged: dict[int, int] = {}
    for d in draws:
        merged[d.lot_id] = merged.get(d.lot_id, 0) + d.amount
    return [_Draw(lot_id, amount) for lot_id, amount in merged.items()]


class _Keep:
    """The type of :data:`KEEP`."""


#: ``Ledger.set_limits``: leave this threshold as it is.
KEEP = _Keep()


@dataclass(frozen=True)
class Limits:
    """A wallet's thresholds as its debit left the row: auto top-up's (None: off) and its own
    low-balance one (None: the app's default)."""

    top_up_below: int | None
    low_below: int | None


def _limits(row: Any) -> Limits:
    top_up, low = row.top_up_below, row.low_below
    return Limits(None if top_up is None else int(top_up), None if low is None else int(low))


class _WalletAfter(NamedTuple):
    id: int
    balance_after: int  # credits in the wallet, held ones included: an entry's balance_after
    limits: Limits


#: Called after each debit that committed (a spend, a settle that charged; never a replay) with the
#: wallet, its entry, and the wallet's thresholds: how a debit that crossed one is acted on.
OnDebit = Callable[[Wallet, Entry, Limits], None]


@dataclass(frozen=True)
class _Settled:
    hold: Hold
    entry: Entry | None
    held: int
    debt: int
    limits: Limits | None = None


@dataclass(frozen=True)
class _Transferred:
    entry: Entry  # the source's
    to_entry: Entry
    limits: Limits  # the source's thresholds, as its debit left the row


class _Refused(Exception):
    """Raised inside a transfer's transaction when the source cannot pay, to roll it back."""


def _owner_dict(wallet: Wallet) -> dict[str, str | None]:
    """A wallet as a transfer entry's metadata names the other side."""
    return {"user_id": wallet.user_id, "key_id": wallet.key_id or None}


class Ledger:
    """Balance arithmetic for one engine and one set of tables. Each public method is one atomic,
    committed operation; ``emit(signal, **kwargs)`` is called after the commit."""

    def __init__(self, db: Database, emit: Emit) -> None:
        self.db = db
        self.t = db.t
        self.emit = emit
        self.on_debit: OnDebit | None = None

    # -- reading ---------------------------------------------------------------------------------

    @unavailable_on_database_errors
    def balance(self, wallet: Wallet) -> int:
        now = self.db.now()
        with self.db.reader.connect() as conn:
            row = conn.execute(self.db.sql.balance, self.db.sql.owner(wallet)).first()
        if row is None:
            return 0
        if row.next_expiry is not None and row.next_expiry <= now:
            return self.expire(wallet, now=now)
        return int(row.balance)

    @unavailable_on_database_errors
    def history(
        self, wallet: Wallet, *, limit: int = 50, before: int | None = None, after: int | None = None
    ) -> list[Entry]:
        """The wallet's entries, newest first: the newest ``limit``, those older than ``before``, or
        the ``limit`` just newer than ``after`` (the page before, walking back towards the newest)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise InvalidArgument(f"limit must be a whole number from 1 to 1000, not {limit!r}")
        for name, value in (("before", before), ("after", after)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ID
            ):
                raise InvalidArgument(f"{name} must be an entry id, not {value!r}")
        if before is not None and after is not None:
            raise InvalidArgument("pass before or after, not both")
        e = self.t.entries
        # The wallet id as a scalar subquery, not a join: the planner then walks the
        # (wallet_id, id) index backwards from a known wallet and stops after ``limit`` rows, however
        # long the history (a join let PostgreSQL scan entries by id instead).
        query = sa.select(e).where(e.c.wallet_id == self._wallet_id_of(wallet)).limit(limit)
        if after is not None:
            query = query.where(e.c.id > after).order_by(e.c.id.asc())
        else:
            query = query.order_by(e.c.id.desc())
        if before is not None:
            query = query.where(e.c.id < before)
        with self.db.reader.connect() as conn:
            found = [self._entry(row, wallet) for row in conn.execute(query)]
        return found[::-1] if after is not None else found

    @unavailable_on_database_errors
    def wallet_id(self, wallet: Wallet, *, create: bool = False) -> int | None:
        """The wallet's row id; with ``create``, make the (empty) wallet if it does not exist."""
        w = self.t.wallets
        query = sa.select(w.c.id).where(*self._owner(wallet))
        with self.db.reader.connect() as conn:
            found = conn.execute(query).scalar_one_or_none()
        if found is None and create:
            self._create_wallet(wallet)
            with self.db.reader.connect() as conn:
                found = conn.execute(query).scalar_one()
        return None if found is None else int(found)

    @unavailable_on_database_errors
    def key_wallets_holding_credits(self, user_id: str) -> list[str]:
        """The key ids of the user's key wallets whose balance is above 0 (expired credits not yet
        swept included: :meth:`balance` says what each can spend), revoked keys' too."""
        w = self.t.wallets
        with self.db.reader.connect() as conn:
            rows = conn.execute(
                sa.select(w.c.key_id)
                .where(w.c.user_id == user_id, w.c.key_id != "", w.c.balance > 0)
                .order_by(w.c.id)
            ).all()
        return [str(r.key_id) for r in rows]

    @unavailable_on_database_errors
    def entry(self, wallet: Wallet, entry_id: int) -> Entry:
        e, w = self.t.entries, self.t.wallets
        with self.db.reader.connect() as conn:
            row = conn.execute(
                sa.select(e).join(w, w.c.id == e.c.wallet_id).where(e.c.id == entry_id, *self._owner(wallet))
            ).first()
        if row is None:
            raise EntryNotFound(f"no entry {entry_id} in the wallet of {wallet}")
        return self._entry(row, wallet)

    @unavailable_on_database_errors
    def find_by_key(self, wallet: Wallet, idempotency_key: str) -> Entry | None:
        """The entry written with ``idempotency_key`` in this wallet, if any (never marked replayed)."""
        with self.db.reader.connect() as conn:
            row = conn.execute(
                self.db.sql.replay, {**self.db.sql.owner(wallet), "b_key": idempotency_key}
            ).first()
        return None if row is None else self._entry(row, wallet)

    @unavailable_on_database_errors
    def refund_of(self, spend: Entry) -> Entry | None:
        """The refund entry that returned ``spend``'s credits, if any."""
        row = self._refund_of(spend.id)
        return None if row is None else self._entry(row, spend.wallet)

    # -- writing ---------------------------------------------------------------------------------

    @unavailable_on_database_errors
    def grant(
        self,
        wallet: Wallet,
        amount: int,
        *,
        reason: str,
        kind: str = "grant",
        expires_at: datetime | None = None,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        in_tx: Callable[[Connection, Entry], None] | None = None,
        actor: str | None = None,
    ) -> Entry:
        """Add ``amount`` credits as a new lot. A replayed ``idempotency_key`` returns the original.
        ``in_tx(conn, entry)`` runs in the same transaction once the entry is written (the wallet row
        locked): what it writes commits with the grant, and what it raises undoes both. ``actor``
        records who made a change by hand (an admin, the CLI's user)."""
        amount = check_amount(amount)
        check_text(reason, "reason", 255, optional=False)
        check_text(idempotency_key, "idempotency_key", 255, optional=True)
        check_text(actor, "actor", 255, optional=True)
        self._metadata_json(metadata)
        if expires_at is not None and (not isinstance(expires_at, datetime) or expires_at.tzinfo is None):
            raise InvalidArgument("expires_at must be a timezone-aware datetime")
        if idempotency_key is not None:
            # Before the expiry check: a replay after the original's expiry passed still returns it.
            done = self._replay(wallet, idempotency_key, kind, amount)
            if done is not None:
                return done
        now = self.db.now()
        if expires_at is not None and expires_at <= now:
            raise InvalidArgument(f"expires_at {expires_at.isoformat()} is not in the future")

        def tx(conn: Connection) -> Entry | None:
            found = self._add_to_wallet(conn, wallet, amount, expires_at, now)
            if found is None:
                return None
            wallet_id, balance_after, _ = found
            entry = self._insert_entry(
                conn,
                wallet,
                wallet_id,
                amount=amount,
                balance_after=balance_after,
                kind=kind,
                reason=reason,
                idempotency_key=idempotency_key,
                metadata=metadata,
                now=now,
                actor=actor,
            )
            conn.execute(
                sa.insert(self.t.lots).values(
                    wallet_id=wallet_id,
                    entry_id=entry.id,
                    amount=amount,
                    remaining=amount,
                    expires_at=expires_at,
                    created_at=now,
                )
            )
            if in_tx is not None:
                in_tx(conn, entry)
            return entry

        entry = self._write(tx, wallet, idempotency_key, kind, amount, create_wallet=True)
        if entry is None:  # pragma: no cover - the wallet was just created
            raise RuntimeError(f"could not create the wallet of {wallet}")
        self.emit(signals.credits_granted, wallet=wallet, amount=amount, entry=entry)
        return entry

    @unavailable_on_database_errors
    def spend(
        self,
        wallet: Wallet,
        amount: int,
        *,
        reason: str,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        actor: str | None = None,
    ) -> Entry:
        """Debit ``amount`` credits, soonest-expiring lots first, or raise InsufficientCredits (the
        HTTP layer adds where to buy more). ``actor`` records who made a change by hand."""
        amount = check_amount(amount)
        check_text(reason, "reason", 255, optional=False)
        check_text(idempotency_key, "idempotency_key", 255, optional=True)
        check_text(actor, "actor", 255, optional=True)
        meta_json = self._metadata_json(metadata)
        if idempotency_key is not None:
            done = self._replay(wallet, idempotency_key, "spend", amount)
            if done is not None:
                return done
        now = self.db.now()
        # A spend by hand (an actor) is rare: it takes the long way, so the one statement stays as is.
        if self.db.one_statement and actor is None:
            try:
                fast = self._spend_in_one_statement(
                    wallet, amount, reason, idempotency_key, metadata, meta_json, now
                )
            except sa.exc.IntegrityError:
                # A concurrent call with the same key committed first: answer with its entry.
                done = (
                    None
                    if idempotency_key is None
                    else self._replay(wallet, idempotency_key, "spend", amount)
                )
                if done is None:
                    raise
                return done
            if fast is not None:
                crossed, spent = fast
                self.emit(signals.credits_spent, wallet=wallet, amount=amount, entry=spent)
                self._debited(wallet, spent, crossed)
                return spent
            # Nothing was written. A fresh read tells a wallet that cannot pay (answered now: two
            # round trips for a 402) from one the statement did not fit (an expiry due, a debit
            # spanning lots, a lot emptied or a grant made while it ran): the long way below.
            with self.db.reader.connect() as conn:
                row = conn.execute(self.db.sql.balance, self.db.sql.owner(wallet)).first()
            balance = 0 if row is None else int(row.balance)
            if balance < amount and (row is None or row.next_expiry is None or row.next_expiry > now):
                return self._refused(wallet, amount, lambda: balance, idempotency_key)

        limits: list[Limits] = []

        def tx(conn: Connection) -> Entry | None:
            found = self._debit(conn, wallet, amount, now)
            if found is None:
                return None
            wallet_id, balance_after, _ = found
            limits[:] = [found.limits]
            draws = self._draw(conn, wallet_id, amount)
            entry = self._insert_entry(
                conn,
                wallet,
                wallet_id,
                amount=-amount,
                balance_after=balance_after,
                kind="spend",
                reason=reason,
                idempotency_key=idempotency_key,
                metadata=metadata,
                now=now,
                actor=actor,
            )
            self._insert_draws(conn, entry.id, draws)
            return entry

        entry = self._write(tx, wallet, idempotency_key, "spend", amount)
        if entry is None and self._expiry_due(wallet, now):
            self.expire(wallet, now=now)
            entry = self._write(tx, wallet, idempotency_key, "spend", amount)
        if entry is None:
            return self._refused(wallet, amount, lambda: self.balance(wallet), idempotency_key)
        self.emit(signals.credits_spent, wallet=wallet, amount=amount, entry=entry)
        if not entry.replayed and limits:
            self._debited(wallet, entry, limits[0])
        return entry

    def _debited(self, wallet: Wallet, entry: Entry, limits: Limits) -> None:
        if self.on_debit is not None:
            self.on_debit(wallet, entry, limits)

    def _refused(
        self,
        wallet: Wallet,
        amount: int,
        balance: Callable[[], int],
        idempotency_key: str | None,
    ) -> Entry:
        """A spend the wallet could not pay: the replay if a concurrent call with the same key took
        the credits and committed while this one waited for the wallet row, else InsufficientCredits."""
        if idempotency_key is not None:
            entry = self._replay(wallet, idempotency_key, "spend", amount)
            if entry is not None:
                return entry
        held = balance()
        self.emit(signals.credits_insufficient, wallet=wallet, required=amount, balance=held)
        raise InsufficientCredits(amount, held, wallet=wallet)

    @unavailable_on_database_errors
    def set_limits(
        self,
        wallet: Wallet,
        *,
        top_up_below: int | _Keep | None = KEEP,
        low_below: int | _Keep | None = KEEP,
        in_tx: Callable[[Connection, int], Limits | None] | None = None,
    ) -> int:
        """Set the wallet's thresholds (``KEEP`` leaves one as it is), creating the wallet if needed;
        ``in_tx(conn, wallet_id)`` runs in the same transaction, with the wallet row locked, and may
        return the thresholds to set instead (decided by what it found). Returns the wallet's id."""
        w = self.t.wallets
        values: dict[str, Any] = {}
        if not isinstance(top_up_below, _Keep):
            values["top_up_below"] = top_up_below
        if not isinstance(low_below, _Keep):
            values["low_below"] = low_below
        now = self.db.now()

        def tx(conn: Connection) -> int | None:
            locked = self._lock_wallet(conn, sa.and_(*self._owner(wallet)), now)
            if locked is None:
                return None
            decided = None if in_tx is None else in_tx(conn, int(locked.id))
            changes = (
                values
                if decided is None
                else {"top_up_below": decided.top_up_below, "low_below": decided.low_below}
            )
            if changes:
                conn.execute(sa.update(w).where(w.c.id == locked.id).values(changes))
            return int(locked.id)

        found = self.db.run(tx)
        if found is None:
            self._create_wallet(wallet)
            found = self.db.run(tx)
        assert found is not None
        return found

    @unavailable_on_database_errors
    def refund(self, wallet: Wallet, spend_id: int, *, reason: str, actor: str | None = None) -> Entry:
        """Return a spend's credits to the very lots it drew from. Refunding twice returns the first
        refund; only spends can be refunded. ``actor`` records who made a change by hand."""
        check_text(reason, "reason", 255, optional=False)
        check_text(actor, "actor", 255, optional=True)
        spend = self.entry(wallet, spend_id)
        if spend.kind != "spend":
            raise NotRefundable(f"entry {spend_id} is a {spend.kind}, only a spend can be refunded")
        existing = self._refund_of(spend.id)
        if existing is not None:
            return self._entry(existing, wallet)
        amount = -spend.amount
        now = self.db.now()
        d, lt = self.t.draws, self.t.lots

        def tx(conn: Connection) -> Entry | None:
            taken = conn.execute(
                sa.select(d.c.lot_id, d.c.amount, lt.c.expires_at)
                .join(lt, lt.c.id == d.c.lot_id)
                .where(d.c.entry_id == spend.id)
                .order_by(d.c.lot_id)
            ).all()
            soonest = min((r.expires_at for r in taken if r.expires_at is not None), default=None)
            found = self._add_to_wallet(conn, wallet, amount, soonest, now)
            if found is None:  # pragma: no cover - the spend proves the wallet exists
                return None
            wallet_id, balance_after, _ = found
            # The entry goes first: its unique reverses_id stops a second refund that raced past
            # the check above before it can overfill the lots.
            entry = self._insert_entry(
                conn,
                wallet,
                wallet_id,
                amount=amount,
                balance_after=balance_after,
                kind="refund",
                reason=reason,
                metadata={"spend_id": spend.id},
                now=now,
                reverses_id=spend.id,
                actor=actor,
            )
            returned = [_Draw(r.lot_id, -int(r.amount)) for r in taken]
            for draw in returned:
                conn.execute(
                    sa.update(lt).where(lt.c.id == draw.lot_id).values(remaining=lt.c.remaining + draw.amount)
                )
            self._insert_draws(conn, entry.id, returned)
            return entry

        try:
            entry = self.db.run(tx)
        except sa.exc.IntegrityError:
            existing = self._refund_of(spend.id)
            if existing is None:
                raise
            return self._entry(existing, wallet)
        assert entry is not None
        self.emit(signals.credits_refunded, wallet=wallet, amount=amount, entry=entry, spend=spend)
        return entry

    @unavailable_on_database_errors
    def expire(self, wallet: Wallet, *, now: datetime | None = None) -> int:
        """Give back the credits of holds past their expiry, then remove the credits of lots whose
        expiry has passed; return what the wallet can spend after."""
        now = now or self.db.now()
        w, lt = self.t.wallets, self.t.lots

        def tx(conn: Connection) -> tuple[int, Entry | None, list[tuple[Hold, int]]]:
            locked = self._lock_wallet(conn, sa.and_(*self._owner(wallet)), now)
            if locked is None:
                return 0, None, []
            wallet_id = int(locked.id)
            h = self.t.holds
            ended: list[tuple[Hold, int]] = []
            for row in conn.execute(
                sa.select(h).where(h.c.wallet_id == wallet_id, h.c.status == "held", h.c.expires_at <= now)
            ).all():
                # Conditional, and before its credits move: a renewal (``renew``, which does not lock
                # the wallet) that committed since the read above wins.
                expired = sa.update(h).where(h.c.id == row.id, h.c.status == "held", h.c.expires_at <= now)
                if conn.execute(expired.values(status="expired", updated_at=now)).rowcount != 1:
                    continue
                self._unhold(conn, int(row.id), 0)
                ended.append((self._hold(row, wallet, status="expired"), int(row.amount)))
            released = sum(amount for _, amount in ended)
            # After the holds gave their credits back: those of lots that expired meanwhile go too.
            due = (
                sa.select(lt.c.id, lt.c.remaining)
                .where(lt.c.wallet_id == wallet_id, lt.c.remaining > 0, lt.c.expires_at <= now)
                .order_by(lt.c.id)
            )
            draws = [_Draw(r.id, -int(r.remaining)) for r in conn.execute(due)]
            for draw in draws:
                conn.execute(sa.update(lt).where(lt.c.id == draw.lot_id).values(remaining=0))
            total = -sum(d.amount for d in draws)
            conn.execute(
                sa.update(w)
                .where(w.c.id == wallet_id)
                .values(
                    balance=w.c.balance + released - total,
                    held=w.c.held - released,
                    next_expiry=self._next_expiry(conn, wallet_id),
                )
            )
            available = int(locked.balance) + released - total
            if not total:
                return available, None, ended
            entry = self._insert_entry(
                conn,
                wallet,
                wallet_id,
                amount=-total,
                balance_after=int(locked.balance) + int(locked.held) - total,
                kind="expire",
                reason="credits expired",
                now=now,
            )
            self._insert_draws(conn, entry.id, draws)
            return available, entry, ended

        available, entry, ended = self.db.run(tx)
        for hold, amount in ended:
            self.emit(signals.credits_released, wallet=wallet, hold=hold, amount=amount, expired=True)
        if entry is not None:
            self.emit(signals.credits_expired, wallet=wallet, amount=-entry.amount, entry=entry)
        return available

    @unavailable_on_database_errors
    def expire_all(self, *, now: datetime | None = None) -> int:
        """Expire every wallet whose soonest lot expiry has passed; return how many were visited."""
        now = now or self.db.now()
        w = self.t.wallets
        with self.db.reader.connect() as conn:
            due = conn.execute(sa.select(w.c.user_id, w.c.key_id).where(w.c.next_expiry <= now)).all()
        for row in due:
            self.expire(Wallet(row.user_id, row.key_id or None), now=now)
        return len(due)

    # -- holds -----------------------------------------------------------------------------------

    @unavailable_on_database_errors
    def held(self, wallet: Wallet) -> int:
        """Credits reserved by the wallet's live holds (those past their expiry no longer count)."""
        now = self.db.now()
        with self.db.reader.connect() as conn:
            row = conn.execute(self.db.sql.balance, self.db.sql.owner(wallet)).first()
        if row is None:
            return 0
        if row.next_expiry is not None and row.next_expiry <= now:
            self.expire(wallet, now=now)
            with self.db.reader.connect() as conn:
                row = conn.execute(self.db.sql.balance, self.db.sql.owner(wallet)).one()
        return int(row.held)

    @unavailable_on_database_errors
    def holds(self, wallet: Wallet) -> list[Hold]:
        """The wallet's live holds, soonest expiry first."""
        h = self.t.holds
        now = self.db.now()
        with self.db.reader.connect() as conn:
            rows = conn.execute(
                sa.select(h)
                .where(
                    h.c.wallet_id == self._wallet_id_of(wallet), h.c.status == "held", h.c.expires_at > now
                )
                .order_by(h.c.expires_at, h.c.id)
            ).all()
        return [self._hold(row, wallet) for row in rows]

    @unavailable_on_database_errors
    def get_hold(self, hold_id: int) -> Hold:
        """The hold with this id, in whatever state it is (``HoldNotFound`` if there is none)."""
        row, wallet = self._hold_row(hold_id)
        return self._hold(row, wallet)

    @unavailable_on_database_errors
    def find_hold(self, wallet: Wallet, idempotency_key: str) -> Hold | None:
        """The hold placed with ``idempotency_key`` in this wallet, if any (never marked replayed)."""
        h = self.t.holds
        with self.db.reader.connect() as conn:
            row = conn.execute(
                sa.select(h).where(
                    h.c.wallet_id == self._wallet_id_of(wallet), h.c.idempotency_key == idempotency_key
                )
            ).first()
        return None if row is None else self._hold(row, wallet)

    @unavailable_on_database_errors
    def hold(
        self,
        wallet: Wallet,
        amount: int,
        *,
        ttl: timedelta,
        reason: str = "",
        idempotency_key: str | None = None,
    ) -> Hold:
        """Reserve ``amount`` credits, drawn from the lots as a spend would draw them, until
        ``ttl`` from now; or raise InsufficientCredits, nothing written. A replayed
        ``idempotency_key`` returns the hold it placed."""
        amount = check_amount(amount)
        check_text(reason, "reason", 255, optional=True)
        check_text(idempotency_key, "idempotency_key", 255, optional=True)
        if idempotency_key is not None:
            done = self._hold_replay(wallet, idempotency_key, amount)
            if done is not None:
                return done
        now = self.db.now()
        expires_at = now + ttl
        if self.db.one_statement:
            fast = self._hold_in_one_statement(wallet, amount, reason, idempotency_key, expires_at, now)
            if fast is not None:
                if not fast.replayed:
                    self.emit(signals.credits_held, wallet=wallet, hold=fast, amount=amount)
                return fast
        h = self.t.holds
        reserve = self._reserve(sa.and_(*self._owner(wallet)), amount, now, expires_at)

        def tx(conn: Connection) -> Hold | None:
            found = self._update_wallet(conn, reserve, wallet)
            if found is None:
                return None
            wallet_id = found.id
            draws = self._draw(conn, wallet_id, amount)
            hold_id = conn.execute(
                sa.insert(h).values(
                    wallet_id=wallet_id,
                    amount=amount,
                    requested=amount,
                    status="held",
                    reason=reason,
                    idempotency_key=idempotency_key,
                    expires_at=expires_at,
                    debt=0,
                    created_at=now,
                    updated_at=now,
                )
            ).inserted_primary_key[0]  # type: ignore[index]
            self._insert_hold_draws(conn, int(hold_id), draws)
            return Hold(
                id=int(hold_id),
                user_id=wallet.user_id,
                key_id=wallet.key_id,
                amount=amount,
                expires_at=expires_at,
                status="held",
                reason=reason,
                idempotency_key=idempotency_key,
                created_at=now,
            )

        placed = self._run_hold(tx, wallet, idempotency_key, amount)
        if placed is None and self._expiry_due(wallet, now):
            self.expire(wallet, now=now)
            placed = self._run_hold(tx, wallet, idempotency_key, amount)
        if placed is None and idempotency_key is not None:
            # A concurrent call with the same key took the credits and committed while this one
            # waited for the wallet row: the answer is its hold, not a 402.
            placed = self._hold_replay(wallet, idempotency_key, amount)
        if placed is None:
            balance = self.balance(wallet)
            self.emit(signals.credits_insufficient, wallet=wallet, required=amount, balance=balance)
            raise InsufficientCredits(amount, balance, wallet=wallet)
        if not placed.replayed:
            self.emit(signals.credits_held, wallet=wallet, hold=placed, amount=amount)
        return placed

    @unavailable_on_database_errors
    def extend(self, hold_id: int, amount: int, *, ttl: timedelta | None = None) -> Hold:
        """Reserve ``amount`` more credits for a live hold (same rules as :meth:`hold`); with
        ``ttl``, the hold also lasts at least that long from now. InsufficientCredits when the
        wallet cannot cover it (the hold stays as it was); HoldAlreadySettled when it has ended."""
        amount = check_amount(amount)
        row, wallet = self._hold_row(hold_id)
        now = self.db.now()
        if row.status != "held" or row.expires_at <= now:  # expired, even if no read released it yet
            status = "expired" if row.status == "held" else row.status
            raise HoldAlreadySettled(f"hold {hold_id} is {status}: it cannot be extended")
        w, h, hd = self.t.wallets, self.t.holds, self.t.hold_draws
        later = None if ttl is None else now + ttl
        reserve = self._reserve(w.c.id == row.wallet_id, amount, now, later)

        def tx(conn: Connection) -> Hold | None:
            if conn.execute(reserve).rowcount != 1:
                return None
            current = conn.execute(sa.select(h).where(h.c.id == hold_id)).one()
            if current.status != "held" or current.expires_at <= now:
                # Raised inside the transaction: the reservation above is undone with it.
                raise HoldAlreadySettled(f"hold {hold_id} has ended ({current.status}): it cannot grow")
            for draw in self._draw(conn, int(row.wallet_id), amount):
                added = conn.execute(
                    sa.update(hd)
                    .where(hd.c.hold_id == hold_id, hd.c.lot_id == draw.lot_id)
                    .values(amount=hd.c.amount - draw.amount)
                )
                if added.rowcount != 1:
                    self._insert_hold_draws(conn, hold_id, [draw])
            expires_at = current.expires_at if later is None else max(current.expires_at, later)
            conn.execute(
                sa.update(h)
                .where(h.c.id == hold_id)
                .values(amount=h.c.amount + amount, expires_at=expires_at, updated_at=now)
            )
            return self._hold(current, wallet, amount=int(current.amount) + amount, expires_at=expires_at)

        extended = self.db.run(tx)
        if extended is None and self._expiry_due(wallet, now):
            self.expire(wallet, now=now)
            extended = self.db.run(tx)
        if extended is None:
            ended = self._hold_row(hold_id)[0].status
            if ended != "held":  # settled, released or expired while this call waited: say so, not 402
                raise HoldAlreadySettled(f"hold {hold_id} is {ended}: it cannot be extended")
            balance = self.balance(wallet)
            self.emit(signals.credits_insufficient, wallet=wallet, required=amount, balance=balance)
            raise InsufficientCredits(amount, balance, wallet=wallet)
        self.emit(signals.credits_held, wallet=wallet, hold=extended, amount=amount)
        return extended

    @unavailable_on_database_errors
    def renew(self, hold_id: int, *, ttl: timedelta) -> datetime | None:
        """Make a live hold last ``ttl`` from now (never shorter than it was): one conditional UPDATE
        of the hold, for work that goes on longer than the hold's first ``ttl`` without growing it.
        The new expiry, or None when the hold has ended or already expired."""
        h = self.t.holds
        now = self.db.now()
        later = now + ttl
        renewed = self.db.write(
            sa.update(h)
            .where(h.c.id == hold_id, h.c.status == "held", h.c.expires_at > now, h.c.expires_at < later)
            .values(expires_at=later, updated_at=now)
        )
        if renewed:
            return later
        row, _ = self._hold_row(hold_id)
        return row.expires_at if row.status == "held" and row.expires_at > now else None

    @unavailable_on_database_errors
    def settle(
        self,
        hold_id: int,
        amount: int,
        *,
        reason: str | None = None,
        idempotency_key: str | None = None,
    ) -> Entry | None:
        """Charge ``amount`` for a hold and give the rest back, in one transaction: the held credits
        pay first (soonest-expiring lots first), then what the wallet can spend, and what it cannot
        becomes debt. One spend entry records the charge (``None`` when nothing left the wallet: a
        settle at 0 is a release). Settling again with the same amount returns the same entry
        (marked replayed); with another, HoldAlreadySettled. A hold that expired is settled from
        what the wallet can spend now."""
        amount = check_amount(amount, minimum=0)
        check_text(reason, "reason", 255, optional=True)
        check_text(idempotency_key, "idempotency_key", 255, optional=True)
        if self.db.one_statement and amount:
            fast = self._settle_in_one_statement(hold_id, amount, reason, idempotency_key)
            if fast is not None:
                settled = {"held": fast.held, "amount": amount, "entry": fast.entry}
                self.emit(signals.credits_settled, wallet=fast.hold.wallet, hold=fast.hold, **settled)
                if fast.entry is not None and fast.limits is not None:
                    self._debited(fast.hold.wallet, fast.entry, fast.limits)
                return fast.entry
        row, wallet = self._hold_row(hold_id)
        done = self._settled(row, wallet, amount)
        if done is not None:
            return done[0]
        now = self.db.now()
        if row.expires_at <= now or self._expiry_due(wallet, now):
            self.expire(wallet, now=now)  # an expired hold stops counting; expired lots go first
        w, h = self.t.wallets, self.t.holds

        def tx(conn: Connection) -> _Settled | tuple[Entry | None]:
            locked = self._lock_wallet(conn, w.c.id == row.wallet_id, now)
            assert locked is not None  # the hold's wallet
            current = conn.execute(sa.select(h).where(h.c.id == hold_id)).one()
            replay = self._settled(current, wallet, amount, conn)
            if replay is not None:
                return replay
            held = int(current.amount) if current.status == "held" else 0
            from_hold = min(amount, held)
            charged, soonest = self._unhold(conn, hold_id, from_hold) if held else ([], None)
            given_back = held - from_hold
            extra = min(amount - from_hold, int(locked.balance))
            if extra:
                charged = _merge(charged + self._draw(conn, int(locked.id), extra))
            debt = amount - from_hold - extra
            charge = from_hold + extra
            conn.execute(
                sa.update(w)
                .where(w.c.id == locked.id)
                .values(
                    balance=w.c.balance + given_back - extra,
                    held=w.c.held - held,
                    debt=w.c.debt + debt,
                    next_expiry=sooner(w.c.next_expiry, soonest),
                    updated_at=now,
                )
            )
            entry = None
            if charge:
                metadata: dict[str, Any] = {"hold_id": hold_id, "held": held, "amount": amount}
                if debt:
                    metadata["debt"] = debt
                entry = self._insert_entry(
                    conn,
                    wallet,
                    int(locked.id),
                    amount=-charge,
                    balance_after=int(locked.balance) + int(locked.held) - charge,
                    kind="spend",
                    reason=reason or current.reason or "settled hold",
                    idempotency_key=idempotency_key,
                    metadata=metadata,
                    now=now,
                )
                self._insert_draws(conn, entry.id, charged)
            conn.execute(
                sa.update(h)
                .where(h.c.id == hold_id)
                .values(
                    status="settled" if amount else "released",
                    settled_amount=amount,
                    entry_id=None if entry is None else entry.id,
                    debt=debt,
                    updated_at=now,
                )
            )
            status = "settled" if amount else "released"
            hold = self._hold(current, wallet, status=status)
            return _Settled(hold, entry, held, debt, _limits(locked))

        try:
            result = self.db.run(tx)
        except sa.exc.IntegrityError:
            # The idempotency key is taken: by this very settle, committed by a concurrent call
            # (a replay), or by another entry of the wallet (a conflict).
            if idempotency_key is None:
                raise
            row, wallet = self._hold_row(hold_id)
            done = self._settled(row, wallet, amount)
            if done is not None:
                return done[0]
            if self.find_by_key(wallet, idempotency_key) is None:
                raise
            raise IdempotencyConflict(
                f"idempotency key {idempotency_key!r} was used for another entry,"
                f" not for a settle of hold {hold_id}"
            ) from None
        if not isinstance(result, _Settled):
            return result[0]
        hold, entry, held = result.hold, result.entry, result.held
        if amount:
            settled = {"held": held, "amount": amount, "entry": entry}
            self.emit(signals.credits_settled, wallet=wallet, hold=hold, **settled)
        else:
            self.emit(signals.credits_released, wallet=wallet, hold=hold, amount=held, expired=False)
        if result.debt:
            self.emit(signals.credits_overdrawn, wallet=wallet, hold=hold, amount=result.debt, entry=entry)
        if entry is not None and result.limits is not None:
            self._debited(wallet, entry, result.limits)
        return entry

    @unavailable_on_database_errors
    def release(self, hold_id: int) -> None:
        """Give a hold's credits back to the lots they came from. Releasing a released or expired
        hold does nothing; a settled one raises HoldAlreadySettled."""
        row, wallet = self._hold_row(hold_id)
        if row.status == "settled":
            raise HoldAlreadySettled(f"hold {hold_id} was settled: it can no longer be released")
        if row.status != "held":
            return
        now = self.db.now()
        w, h = self.t.wallets, self.t.holds

        def tx(conn: Connection) -> tuple[Hold, int] | None:
            locked = self._lock_wallet(conn, w.c.id == row.wallet_id, now)
            assert locked is not None
            current = conn.execute(sa.select(h).where(h.c.id == hold_id)).one()
            if current.status == "settled":
                raise HoldAlreadySettled(f"hold {hold_id} was settled: it can no longer be released")
            if current.status != "held":
                return None
            held = int(current.amount)
            soonest = self._unhold(conn, hold_id, 0)[1]
            conn.execute(
                sa.update(w)
                .where(w.c.id == locked.id)
                .values(
                    balance=w.c.balance + held,
                    held=w.c.held - held,
                    next_expiry=sooner(w.c.next_expiry, soonest),
                    updated_at=now,
                )
            )
            conn.execute(sa.update(h).where(h.c.id == hold_id).values(status="released", updated_at=now))
            return self._hold(current, wallet, status="released"), held

        released = self.db.run(tx)
        if released is not None:
            hold, held = released
            self.emit(signals.credits_released, wallet=wallet, hold=hold, amount=held, expired=False)

    # -- transfers ---------------------------------------------------------------------------------

    @unavailable_on_database_errors
    def transfer(
        self,
        from_wallet: Wallet,
        to_wallet: Wallet,
        amount: int,
        *,
        reason: str,
        idempotency_key: str | None = None,
        actor: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Entry:
        """Move ``amount`` credits from one wallet to another in one transaction, or raise
        InsufficientCredits, nothing written. The source pays as a spend does (soonest-expiring lots
        first; credits of live holds cannot move) and the target gets one lot per expiry it drew
        from, so the credits keep their expiry; an incoming transfer pays the target's debt first, as
        a purchase does. Both wallets get a ``transfer`` entry naming the other (``metadata["to"]``,
        with the target entry's id, and ``metadata["from"]``). Returns the source's entry; a replayed
        ``idempotency_key`` returns it again, marked replayed."""
        amount = check_amount(amount)
        check_text(reason, "reason", 255, optional=False)
        check_text(idempotency_key, "idempotency_key", 255, optional=True)
        check_text(actor, "actor", 255, optional=True)
        self._metadata_json(metadata)
        source, target = _owner_dict(from_wallet), _owner_dict(to_wallet)
        if source == target:
            raise InvalidArgument(f"cannot transfer credits from {from_wallet} to the same wallet")
        if idempotency_key is not None:
            done = self._transfer_replay(from_wallet, to_wallet, idempotency_key, amount)
            if done is not None:
                return done
        now = self.db.now()
        with self.db.reader.connect() as conn:
            row = conn.execute(self.db.sql.balance, self.db.sql.owner(from_wallet)).first()
        due = row is not None and row.next_expiry is not None and row.next_expiry <= now
        if row is None or (int(row.balance) < amount and not due):
            # Answered before the target wallet is made: a refused transfer writes nothing at all.
            return self._transfer_refused(from_wallet, to_wallet, amount, idempotency_key)
        source_id = int(row.id)
        target_id = self.wallet_id(to_wallet, create=True)
        assert target_id is not None
        w, lt = self.t.wallets, self.t.lots
        extra = dict(metadata or {})

        debit = (
            sa.update(w)
            .where(
                w.c.id == source_id,
                w.c.balance >= amount,
                sa.or_(w.c.next_expiry.is_(None), w.c.next_expiry > now),
            )
            .values(balance=w.c.balance - amount, updated_at=now)
        )
        touch = sa.update(w).where(w.c.id == target_id).values(updated_at=now)

        def tx(conn: Connection) -> _Transferred:
            # Both rows locked by writes in the order of their ids, so two opposite transfers cannot
            # deadlock, and nothing read before both are held: on InnoDB (REPEATABLE READ) the first
            # plain read fixes the snapshot every later one sees, and one taken while waiting for the
            # second lock would miss what its holder committed (its lots, the target's debt).
            for wallet_id in sorted((source_id, target_id)):
                if wallet_id == target_id:
                    conn.execute(touch)
                elif conn.execute(debit).rowcount != 1:
                    raise _Refused  # undoes the target's lock write too: nothing is committed
            found = conn.execute(sa.select(w).where(w.c.id == source_id)).one()
            locked = conn.execute(sa.select(w).where(w.c.id == target_id)).one()
            draws = self._draw(conn, source_id, amount)
            expiries = dict(
                conn.execute(
                    sa.select(lt.c.id, lt.c.expires_at).where(lt.c.id.in_([d.lot_id for d in draws]))
                ).all()
            )
            moved: dict[datetime | None, int] = {}
            for draw in draws:
                moved[expiries[draw.lot_id]] = moved.get(expiries[draw.lot_id], 0) - draw.amount
            # Soonest expiry first, as a spend draws: the target's debt takes those first.
            lots = sorted(moved.items(), key=lambda lot: (lot[0] is None, lot[0] or now))
            paid = debt_payment(int(locked.debt), amount)
            owed, new_lots = paid, []
            for expires_at, credits in lots:
                take = min(owed, credits)
                owed -= take
                new_lots.append((expires_at, credits, take))
            soonest = min((when for when, n, take in new_lots if when is not None and n > take), default=None)
            changed = conn.execute(
                sa.update(w)
                .where(w.c.id == target_id, w.c.debt >= paid)
                .values(
                    balance=w.c.balance + (amount - paid),
                    debt=w.c.debt - paid,
                    next_expiry=sooner(w.c.next_expiry, soonest),
                    updated_at=now,
                )
            )
            if changed.rowcount != 1:  # pragma: no cover - the wallet row is locked
                raise RuntimeError(f"wallet {to_wallet} changed under its lock")
            before = int(locked.balance) + int(locked.held)
            came_from = {**extra, "from": source}
            to_entry = self._insert_entry(
                conn,
                to_wallet,
                target_id,
                amount=amount,
                balance_after=before + amount,
                kind="transfer",
                reason=reason,
                metadata=came_from,
                now=now,
                actor=actor,
            )
            debt_draws = []
            for expires_at, credits, take in new_lots:
                lot_id = conn.execute(
                    sa.insert(lt).values(
                        wallet_id=target_id,
                        entry_id=to_entry.id,
                        amount=credits,
                        remaining=credits - take,
                        expires_at=expires_at,
                        created_at=now,
                    )
                ).inserted_primary_key[0]  # type: ignore[index]
                if take:
                    debt_draws.append(_Draw(int(lot_id), -take))
            if paid:
                debt_entry = self._insert_entry(
                    conn,
                    to_wallet,
                    target_id,
                    amount=-paid,
                    balance_after=before + amount - paid,
                    kind="debt",
                    reason="paid credits owed (a refund, a dispute, or a settle beyond the balance)",
                    metadata=came_from,
                    now=now,
                )
                self._insert_draws(conn, debt_entry.id, debt_draws)
            entry = self._insert_entry(
                conn,
                from_wallet,
                source_id,
                amount=-amount,
                balance_after=int(found.balance) + int(found.held),
                kind="transfer",
                reason=reason,
                idempotency_key=idempotency_key,
                metadata={**extra, "to": {**target, "entry_id": to_entry.id}},
                now=now,
                actor=actor,
            )
            self._insert_draws(conn, entry.id, draws)
            return _Transferred(entry, to_entry, _limits(found))

        result = self._run_transfer(tx, from_wallet, to_wallet, idempotency_key, amount)
        if result is None and self._expiry_due(from_wallet, now):
            self.expire(from_wallet, now=now)
            result = self._run_transfer(tx, from_wallet, to_wallet, idempotency_key, amount)
        if isinstance(result, Entry):
            return result
        if result is None:
            return self._transfer_refused(from_wallet, to_wallet, amount, idempotency_key)
        self.emit(
            signals.credits_transferred,
            from_wallet=from_wallet,
            to_wallet=to_wallet,
            amount=amount,
            entry=result.entry,
            to_entry=result.to_entry,
        )
        self._debited(from_wallet, result.entry, result.limits)
        return result.entry

    def _run_transfer(
        self,
        tx: Callable[[Connection], _Transferred],
        from_wallet: Wallet,
        to_wallet: Wallet,
        key: str | None,
        amount: int,
    ) -> _Transferred | Entry | None:
        try:
            return self.db.run(tx)
        except _Refused:
            return None
        except sa.exc.IntegrityError:
            # A concurrent call with the same key committed first: answer with its entry.
            done = None if key is None else self._transfer_replay(from_wallet, to_wallet, key, amount)
            if done is None:
                raise
            return done

    def _transfer_replay(self, from_wallet: Wallet, to_wallet: Wallet, key: str, amount: int) -> Entry | None:
        """The committed transfer for ``key`` out of ``from_wallet``, checked to be the same request
        (kind, amount and target)."""
        entry = self._replay(from_wallet, key, "transfer", amount)
        if entry is None:
            return None
        went = dict((entry.metadata or {}).get("to") or {})
        went.pop("entry_id", None)
        if entry.amount > 0 or went != _owner_dict(to_wallet):
            raise IdempotencyConflict(
                f"idempotency key {key!r} was used for a transfer of {abs(entry.amount)} to another wallet,"
                f" not to {to_wallet}"
            )
        return entry

    def _transfer_refused(
        self, from_wallet: Wallet, to_wallet: Wallet, amount: int, key: str | None
    ) -> Entry:
        """A transfer the source could not pay: the replay if a concurrent call with the same key took
        the credits and committed while this one waited for the wallet row, else InsufficientCredits."""
        if key is not None:
            entry = self._transfer_replay(from_wallet, to_wallet, key, amount)
            if entry is not None:
                return entry
        held = self.balance(from_wallet)
        self.emit(signals.credits_insufficient, wallet=from_wallet, required=amount, balance=held)
        raise InsufficientCredits(amount, held)

    # -- purchases ---------------------------------------------------------------------------------

    @unavailable_on_database_errors
    def fulfil_purchase(
        self,
        purchase_id: int,
        *,
        payment_intent: str | None,
        in_tx: InTx | None = None,
        expires_at: datetime | None = None,
        reason: str | None = None,
    ) -> Fulfilment | None:
        """Credit a paid purchase exactly once: the conditional status change
        ``open/unpaid -> fulfilled`` and the credit are one transaction, so however many webhooks and
        success pages race, one wins and the rest get ``None``. The new lot pays the wallet's debt
        first. ``in_tx(conn)`` runs first inside the same transaction (the webhook records its event
        there, so both commit or neither does). The credits expire at ``expires_at`` when given (a
        plan's allowance: the end of the period its invoice pays for), else the purchase's own
        ``expires_after_seconds`` after now."""
        sql, now = self.db.sql, self.db.now()

        def tx(conn: Connection) -> Fulfilment | None:
            if in_tx is not None:
                in_tx(conn)
            key = {"b_purchase_id": purchase_id}
            won = conn.execute(sql.purchase_win, {**key, "b_payment_intent": payment_intent, "b_now": now})
            if self.db.returning:
                purchase = won.first()
                if purchase is None:
                    return None
            else:
                if won.rowcount != 1:
                    return None
                purchase = conn.execute(sql.purchase, key).one()
            owner = conn.execute(sql.wallet_locked, {"b_wallet_id": purchase.wallet_id}).one()
            wallet = Wallet(owner.user_id, owner.key_id or None)
            credits = int(purchase.credits)
            paid = debt_payment(int(owner.debt), credits)
            expiry = expires_at
            if expiry is None and purchase.expires_after_seconds is not None:
                expiry = now + timedelta(seconds=int(purchase.expires_after_seconds))
            gain = {"b_wallet_id": owner.id, "b_paid": paid, "b_amount": credits - paid, "b_now": now}
            if expiry is None:
                changed = conn.execute(sql.credit, gain)
            else:
                changed = conn.execute(sql.credit_expiring, {**gain, "b_expiry": expiry})
            if changed.rowcount != 1:  # pragma: no cover - the wallet row is locked
                raise RuntimeError(f"wallet {wallet} changed under its lock")
            balance = int(owner.balance) + int(owner.held) + credits
            meta = {"purchase_id": purchase_id, "session_id": purchase.session_id}
            if purchase.invoice_id is not None:
                meta["invoice_id"] = purchase.invoice_id
            entry = self._insert_entry(
                conn,
                wallet,
                owner.id,
                amount=credits,
                balance_after=balance,
                kind="purchase",
                reason=reason or f"bought {credits} credits",
                metadata=meta,
                now=now,
            )
            lot_id = conn.execute(
                sql.insert_lot,
                {
                    "wallet_id": owner.id,
                    "entry_id": entry.id,
                    "amount": credits,
                    "remaining": credits - paid,
                    "expires_at": expiry,
                    "created_at": now,
                },
            ).inserted_primary_key[0]  # type: ignore[index]
            if paid:
                debt_entry = self._insert_entry(
                    conn,
                    wallet,
                    owner.id,
                    amount=-paid,
                    balance_after=balance - paid,
                    kind="debt",
                    reason="paid credits owed (a refund, a dispute, or a settle beyond the balance)",
                    metadata=meta,
                    now=now,
                )
                self._insert_draws(conn, debt_entry.id, [_Draw(int(lot_id), -paid)])
            conn.execute(sql.purchase_lot, {**key, "b_lot_id": lot_id})
            return Fulfilment(wallet, entry, paid)

        return self.db.run(tx)

    @unavailable_on_database_errors
    def revoke_purchase(
        self,
        purchase_id: int,
        *,
        refund_target: int | None = None,
        dispute_target: int | None = None,
        in_tx: InTx | None = None,
    ) -> Revocation | None:
        """Set how many of a fulfilled purchase's credits are clawed back for refunds and for a dispute
        (absolute, cumulative targets, so replays and out-of-order events converge): the purchase's
        row, its lot and its wallet are locked and read, ``settlement.claw_back`` says what moves (its
        docstring has the rules), and this writes it. Returns ``None`` when the purchase is not
        fulfilled (yet)."""
        p, w, lt, d, e = self.t.purchases, self.t.wallets, self.t.lots, self.t.draws, self.t.entries
        now = self.db.now()

        def tx(conn: Connection) -> Revocation | None:
            if in_tx is not None:
                in_tx(conn)
            if not self.db.lock_rows:
                # SQLite has no row locks and starts the transaction at its first write: without one
                # first, two claw-backs (reconcile and a webhook) could both read the shares before
                # either wrote, and both take the credits. This write takes the database's lock.
                conn.execute(sa.update(p).where(p.c.id == purchase_id).values(updated_at=p.c.updated_at))
            purchase = conn.execute(self.db.lock(sa.select(p).where(p.c.id == purchase_id))).one()
            if purchase.status != "fulfilled" or purchase.lot_id is None:
                return None
            owner = conn.execute(self.db.lock(sa.select(w).where(w.c.id == purchase.wallet_id))).one()
            wallet = Wallet(owner.user_id, owner.key_id or None)
            lot = conn.execute(self.db.lock(sa.select(lt).where(lt.c.id == purchase.lot_id))).one()
            expired = -int(
                conn.execute(
                    sa.select(sa.func.coalesce(sa.func.sum(d.c.amount), 0))
                    .join(e, e.c.id == d.c.entry_id)
                    .where(d.c.lot_id == lot.id, e.c.kind == "expire")
                ).scalar_one()
            )
            done = claw_back(
                Revoked(
                    int(purchase.refund_revoked),
                    int(purchase.dispute_revoked),
                    int(purchase.revoked_from_lot),
                    int(purchase.revoked_as_debt),
                ),
                refund_target=refund_target,
                dispute_target=dispute_target,
                lot=PurchaseLot(int(lot.amount), int(lot.remaining), expired),
                wallet_debt=int(owner.debt),
            )
            after, take, debt_change = done.revoked, done.credits_taken, done.debt_added
            conn.execute(
                sa.update(p)
                .where(p.c.id == purchase_id)
                .values(
                    refund_revoked=after.refund,
                    dispute_revoked=after.dispute,
                    revoked_from_lot=after.from_lot,
                    revoked_as_debt=after.as_debt,
                    updated_at=now,
                )
            )
            entry = None
            if take or debt_change:
                conn.execute(
                    sa.update(w)
                    .where(w.c.id == owner.id)
                    .values(
                        balance=w.c.balance - take,
                        debt=w.c.debt + debt_change,
                        next_expiry=sooner(w.c.next_expiry, lot.expires_at if take < 0 else None),
                        updated_at=now,
                    )
                )
            if take:
                conn.execute(sa.update(lt).where(lt.c.id == lot.id).values(remaining=lt.c.remaining - take))
                kind = "revoke" if take > 0 else "reinstate"
                reason = "credits clawed back" if take > 0 else "clawed-back credits returned"
                entry = self._insert_entry(
                    conn,
                    wallet,
                    owner.id,
                    amount=-take,
                    balance_after=int(owner.balance) + int(owner.held) - take,
                    kind=kind,
                    reason=reason,
                    metadata={"purchase_id": purchase_id, "refund": after.refund, "dispute": after.dispute},
                    now=now,
                )
                self._insert_draws(conn, entry.id, [_Draw(int(lot.id), -take)])
            return Revocation(wallet, entry, take, debt_change, done.change)

        return self.db.run(tx)

    # -- internals ---------------------------------------------------------------------------------

    def _spend_in_one_statement(
        self,
        wallet: Wallet,
        amount: int,
        reason: str,
        idempotency_key: str | None,
        metadata: dict[str, Any] | None,
        meta_json: str | None,
        now: datetime,
    ) -> tuple[Limits, Entry] | None:
        """PostgreSQL's fast path: the whole debit as one statement in autocommit (see ``SPEND``), so
        the wallet row is locked for one statement and its commit, and a debit costs one round trip.
        ``None`` when it did not apply (not enough credits, expiry due, no wallet, the first lot does
        not cover the amount, or a concurrent debit emptied that lot): the caller's transaction then
        does it the long way. Nothing is written in any of those cases."""
        params = {
            "user_id": wallet.user_id,
            "key_id": wallet.key_id or "",
            "amount": amount,
            "now": _naive_utc(now),
            "reason": reason,
            "key": idempotency_key,
            "meta": meta_json,
        }
        row = self._one_statement(SPEND, params)
        if row is None:
            return None
        return _limits(row), Entry(
            id=int(row.entry_id),
            wallet=wallet,
            amount=-amount,
            balance_after=int(row.balance) + int(row.held),
            kind="spend",
            reason=reason,
            idempotency_key=idempotency_key,
            metadata=metadata,
            created_at=now,
        )

    def _hold_in_one_statement(
        self,
        wallet: Wallet,
        amount: int,
        reason: str,
        idempotency_key: str | None,
        expires_at: datetime,
        now: datetime,
    ) -> Hold | None:
        """PostgreSQL's fast hold: one statement in autocommit (see ``HOLD``), one round trip. ``None``
        when it did not apply (not enough credits, expiry due, no wallet, the soonest lot does not
        cover the amount, or a concurrent debit emptied that lot); nothing is written then, and the
        caller's transaction does it the long way. A concurrent hold with the same key that committed
        first is answered with that hold, as the long way answers it."""
        params = {
            "user_id": wallet.user_id,
            "key_id": wallet.key_id or "",
            "amount": amount,
            "now": _naive_utc(now),
            "expires_at": _naive_utc(expires_at),
            "reason": reason,
            "key": idempotency_key,
        }
        try:
            row = self._one_statement(HOLD, params)
        except sa.exc.IntegrityError:
            done = None if idempotency_key is None else self._hold_replay(wallet, idempotency_key, amount)
            if done is None:
                raise
            return done
        if row is None:
            return None
        return Hold(
            id=int(row.hold_id),
            user_id=wallet.user_id,
            key_id=wallet.key_id,
            amount=amount,
            expires_at=expires_at,
            status="held",
            reason=reason,
            idempotency_key=idempotency_key,
            created_at=now,
        )

    def _settle_in_one_statement(
        self, hold_id: int, amount: int, reason: str | None, idempotency_key: str | None
    ) -> _Settled | None:
        """PostgreSQL's fast settle of the common case (see ``SETTLE``): a live hold drawn from one
        lot, charged ``amount`` (1 up to what it holds), in a wallet with no expiry due; one statement
        in autocommit, one round trip. ``None`` in every other case, nothing written: the long way
        then decides (replays, HoldAlreadySettled, HoldNotFound, expiry, overshoot, debt, a taken
        idempotency key) exactly as it does without this."""
        if isinstance(hold_id, bool) or not isinstance(hold_id, int) or not 1 <= hold_id <= MAX_ID:
            return None  # the long way names the error
        now = self.db.now()
        params = {
            "hold_id": hold_id,
            "amount": amount,
            "now": _naive_utc(now),
            "reason": reason,
            "key": idempotency_key,
        }
        try:
            row = self._one_statement(SETTLE, params)
        except sa.exc.IntegrityError:
            return None  # the key is taken: the long way tells a replay from a conflict
        if row is None:
            return None
        wallet = Wallet(row.user_id, row.key_id or None)
        held = int(row.amount)
        hold = Hold(
            id=hold_id,
            user_id=wallet.user_id,
            key_id=wallet.key_id,
            amount=held,
            expires_at=row.expires_at.replace(tzinfo=timezone.utc),
            status="settled",
            reason=row.reason,
            idempotency_key=row.idempotency_key,
            created_at=row.created_at.replace(tzinfo=timezone.utc),
        )
        entry = Entry(
            id=int(row.spend_id),
            wallet=wallet,
            amount=-amount,
            balance_after=int(row.balance_after),
            kind="spend",
            reason=row.spend_reason,
            idempotency_key=idempotency_key,
            metadata={"hold_id": hold_id, "held": held, "amount": amount},
            created_at=now,
        )
        return _Settled(hold, entry, held, 0, _limits(row))

    def _one_statement(self, statement: str, params: dict[str, Any]) -> Any:
        """Run one of PostgreSQL's one-statement writes in autocommit: its row (a named tuple), or
        ``None`` when it wrote nothing (no row back, or its guard undid it: SQLSTATE 22012)."""
        try:
            return self.db.one(statement, params)
        except sa.exc.DataError as exc:
            if sqlstate(exc) != "22012":
                raise
            return None

    def _reserve(
        self, where: sa.ColumnElement[bool], amount: int, now: datetime, until: datetime | None
    ) -> sa.Update:
        """Move ``amount`` from the wallet's balance to its held credits, only if it can spend that
        much and no expiry is due; the row stays locked. ``until``: the hold's expiry (folded into
        ``next_expiry``)."""
        w = self.t.wallets
        return (
            sa.update(w)
            .where(where, w.c.balance >= amount, sa.or_(w.c.next_expiry.is_(None), w.c.next_expiry > now))
            .values(
                balance=w.c.balance - amount,
                held=w.c.held + amount,
                next_expiry=sooner(w.c.next_expiry, until),
                updated_at=now,
            )
        )

    def _lock_wallet(self, conn: Connection, where: sa.ColumnElement[bool], now: datetime) -> Row[Any] | None:
        """Lock one wallet row (a write takes the lock on every backend, SQLite's database lock
        included) and read it; None if there is no such wallet."""
        w = self.t.wallets
        if conn.execute(sa.update(w).where(where).values(updated_at=now)).rowcount != 1:
            return None
        return conn.execute(sa.select(w).where(where)).one()

    def _next_expiry(self, conn: Connection, wallet_id: int) -> datetime | None:
        """The soonest expiry among the wallet's lots with credits left and its live holds."""
        lt, h = self.t.lots, self.t.holds
        lots = conn.execute(
            sa.select(sa.func.min(lt.c.expires_at)).where(lt.c.wallet_id == wallet_id, lt.c.remaining > 0)
        ).scalar_one()
        holds = conn.execute(
            sa.select(sa.func.min(h.c.expires_at)).where(h.c.wallet_id == wallet_id, h.c.status == "held")
        ).scalar_one()
        found = [when for when in (lots, holds) if when is not None]
        return min(found) if found else None

    def _hold_draws(self, conn: Connection, hold_id: int) -> list[Row[Any]]:
        """The lots a live hold drew on, in the order a spend draws: soonest expiry first."""
        hd, lt = self.t.hold_draws, self.t.lots
        return list(
            conn.execute(
                sa.select(hd.c.lot_id, hd.c.amount, lt.c.expires_at)
                .join(lt, lt.c.id == hd.c.lot_id)
                .where(hd.c.hold_id == hold_id)
                .order_by(sa.case((lt.c.expires_at.is_(None), 1), else_=0), lt.c.expires_at, lt.c.id)
            )
        )

    def _unhold(self, conn: Connection, hold_id: int, keep: int) -> tuple[list[_Draw], datetime | None]:
        """End a hold's reservation: ``keep`` of its credits are charged (returned as the draws of a
        spend), the rest go back to the lots they came from. Returns the draws and the soonest expiry
        among the lots credits went back to (the wallet's ``next_expiry`` must not be later)."""
        hd, lt = self.t.hold_draws, self.t.lots
        charged: list[_Draw] = []
        soonest: datetime | None = None
        rows = self._hold_draws(conn, hold_id)
        for r in rows:
            take = min(keep, int(r.amount))
            keep -= take
            if take:
                charged.append(_Draw(int(r.lot_id), -take))
            back = int(r.amount) - take
            if back:
                conn.execute(sa.update(lt).where(lt.c.id == r.lot_id).values(remaining=lt.c.remaining + back))
                if r.expires_at is not None and (soonest is None or r.expires_at < soonest):
                    soonest = r.expires_at
        if keep:  # pragma: no cover - the wallet lock keeps a hold's draws equal to its amount
            raise RuntimeError(f"credits hold {hold_id} holds fewer credits than it says")
        if rows:
            conn.execute(sa.delete(hd).where(hd.c.hold_id == hold_id))
        return charged, soonest

    def _insert_hold_draws(self, conn: Connection, hold_id: int, draws: Sequence[_Draw]) -> None:
        if draws:
            conn.execute(
                sa.insert(self.t.hold_draws),
                [{"hold_id": hold_id, "lot_id": d.lot_id, "amount": -d.amount} for d in draws],
            )

    def _hold_row(self, hold_id: int) -> tuple[Row[Any], Wallet]:
        if isinstance(hold_id, bool) or not isinstance(hold_id, int) or not 1 <= hold_id <= MAX_ID:
            raise HoldNotFound(f"no hold {hold_id!r}")
        h, w = self.t.holds, self.t.wallets
        with self.db.reader.connect() as conn:
            row = conn.execute(
                sa.select(h, w.c.user_id, w.c.key_id)
                .join(w, w.c.id == h.c.wallet_id)
                .where(h.c.id == hold_id)
            ).first()
        if row is None:
            raise HoldNotFound(f"no hold {hold_id}")
        return row, Wallet(row.user_id, row.key_id or None)

    def _hold(self, row: Row[Any], wallet: Wallet, **changes: Any) -> Hold:
        hold = Hold(
            id=int(row.id),
            user_id=wallet.user_id,
            key_id=wallet.key_id,
            amount=int(row.amount),
            expires_at=row.expires_at,
            status=row.status,
            reason=row.reason,
            idempotency_key=row.idempotency_key,
            created_at=row.created_at,
        )
        return dataclasses.replace(hold, **changes) if changes else hold

    def _settled(
        self, row: Row[Any], wallet: Wallet, amount: int, conn: Connection | None = None
    ) -> tuple[Entry | None] | None:
        """For a hold that ended: what settling it at ``amount`` again answers (its entry, marked
        replayed; read on ``conn`` when given), or HoldAlreadySettled. ``None`` while it can still be
        settled (held; expired, at a charge above 0)."""
        if row.status == "settled" or (row.status == "released" and row.settled_amount is not None):
            if int(row.settled_amount) != amount:
                raise HoldAlreadySettled(f"hold {row.id} was settled at {row.settled_amount}, not {amount}")
            if row.entry_id is None:
                return (None,)
            if conn is None:
                entry = self.entry(wallet, int(row.entry_id))
            else:
                # Inside the settle's transaction, on its connection: a second one could wait for a
                # free connection that never comes (the pool's, or PgBouncer's server connections,
                # all held by settles queued behind this one on the wallet row).
                e = self.t.entries
                entry = self._entry(conn.execute(sa.select(e).where(e.c.id == row.entry_id)).one(), wallet)
            return (dataclasses.replace(entry, replayed=True),)
        if row.status == "released":
            if amount:
                raise HoldAlreadySettled(f"hold {row.id} was released: it can no longer be charged")
            return (None,)
        if row.status == "expired" and not amount:
            return (None,)  # its credits went back when it expired: charging nothing leaves it as it is
        return None

    def _hold_replay(self, wallet: Wallet, key: str, amount: int) -> Hold | None:
        h = self.t.holds
        with self.db.reader.connect() as conn:
            row = conn.execute(
                sa.select(h).where(h.c.wallet_id == self._wallet_id_of(wallet), h.c.idempotency_key == key)
            ).first()
        if row is None:
            return None
        if int(row.requested) != amount:
            raise IdempotencyConflict(
                f"idempotency key {key!r} was used for a hold of {row.requested}, not {amount}"
            )
        return dataclasses.replace(self._hold(row, wallet), replayed=True)

    def _run_hold(
        self, tx: Callable[[Connection], Hold | None], wallet: Wallet, key: str | None, amount: int
    ) -> Hold | None:
        try:
            return self.db.run(tx)
        except sa.exc.IntegrityError:
            done = None if key is None else self._hold_replay(wallet, key, amount)
            if done is None:
                raise
            return done

    def _metadata_json(self, metadata: object) -> str | None:
        """``metadata`` as the JSON the database will store, or InvalidArgument if it has none."""
        if metadata is None:
            return None
        if not isinstance(metadata, dict):
            raise InvalidArgument(f"metadata must be a dict, not {type(metadata).__name__}")
        try:
            return self.db.json(metadata)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"metadata must be JSON-serialisable: {exc}") from None

    def _debit(self, conn: Connection, wallet: Wallet, amount: int, now: datetime) -> _WalletAfter | None:
        """Take ``amount`` off the wallet's balance if it holds that much and no expiry is due; return
        (wallet id, balance after), the row locked until the transaction ends, or None."""
        params = {**self.db.sql.owner(wallet), "b_amount": amount, "b_now": now}
        return self._update_wallet(conn, self.db.sql.debit, wallet, params, prebuilt=True)

    def _wallet_id_of(self, wallet: Wallet) -> sa.ScalarSelect[Any]:
        return sa.select(self.t.wallets.c.id).where(*self._owner(wallet)).scalar_subquery()

    def _owner(self, wallet: Wallet) -> tuple[sa.ColumnElement[bool], ...]:
        w = self.t.wallets
        return (w.c.user_id == wallet.user_id, w.c.key_id == (wallet.key_id or ""))

    def _add_to_wallet(
        self, conn: Connection, wallet: Wallet, amount: int, expires_at: datetime | None, now: datetime
    ) -> _WalletAfter | None:
        """Add credits (a grant, a refund) that expire at ``expires_at``: (wallet id, balance after),
        the row locked, or None when the wallet does not exist."""
        w = self.t.wallets
        return self._update_wallet(
            conn,
            sa.update(w)
            .where(*self._owner(wallet))
            .values(
                balance=w.c.balance + amount,
                next_expiry=sooner(w.c.next_expiry, expires_at),
                updated_at=now,
            ),
            wallet,
        )

    def _update_wallet(
        self,
        conn: Connection,
        stmt: sa.Update,
        wallet: Wallet,
        params: dict[str, Any] | None = None,
        *,
        prebuilt: bool = False,
    ) -> _WalletAfter | None:
        """Run an UPDATE of one wallet row; return (wallet id, credits in the wallet after it, held
        ones included: an entry's ``balance_after``) or None if no row matched. The row stays locked
        until the transaction ends. A ``prebuilt`` statement (from ``Statements``) already returns
        the id, balance and held credits where the database can."""
        w = self.t.wallets
        if self.db.returning:
            if not prebuilt:
                stmt = stmt.returning(w.c.id, w.c.balance, w.c.held, w.c.top_up_below, w.c.low_below)
            row = conn.execute(stmt, params).first()
        else:
            if conn.execute(stmt, params).rowcount != 1:
                return None
            row = conn.execute(self.db.sql.balance, self.db.sql.owner(wallet)).one()
        if row is None:
            return None
        return _WalletAfter(int(row.id), int(row.balance) + int(row.held), _limits(row))

    def _draw(self, conn: Connection, wallet_id: int, amount: int) -> list[_Draw]:
        """Take ``amount`` credits from the wallet's lots, soonest expiry first, no-expiry last."""
        lt = self.t.lots
        if self.db.returning:
            # Most debits fit in the first lot: one UPDATE of it, or nothing changed and the loop below.
            row = conn.execute(self.db.sql.draw_first, {"b_wallet_id": wallet_id, "b_amount": amount}).first()
            if row is not None:
                return [_Draw(int(row.id), -amount)]
        need = amount
        draws: list[_Draw] = []
        while need > 0:
            # A plain read: the wallet row lock already keeps every other writer out of these lots,
            # and a locking range read would take InnoDB gap locks that collide with the
            # neighbouring wallet's lots (deadlocks between unrelated wallets).
            batch = conn.execute(self.db.sql.lots, {"b_wallet_id": wallet_id}).all()
            if not batch:
                raise RuntimeError(
                    f"credits ledger is inconsistent: wallet id {wallet_id} has a balance its lots"
                    " do not hold; run `flask credits audit`"
                )
            for lot in batch:
                take = min(need, int(lot.remaining))
                result = conn.execute(
                    sa.update(lt)
                    .where(lt.c.id == lot.id, lt.c.remaining >= take)
                    .values(remaining=lt.c.remaining - take)
                )
                if result.rowcount != 1:  # pragma: no cover - the wallet lock rules this out
                    raise RuntimeError(f"credits lot {lot.id} changed under a held wallet lock")
                draws.append(_Draw(int(lot.id), -take))
                need -= take
                if need == 0:
                    break
        return draws

    def _insert_entry(
        self,
        conn: Connection,
        wallet: Wallet,
        wallet_id: int,
        *,
        amount: int,
        balance_after: int,
        kind: str,
        reason: str,
        now: datetime,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        reverses_id: int | None = None,
        actor: str | None = None,
    ) -> Entry:
        values = {
            "wallet_id": wallet_id,
            "amount": amount,
            "balance_after": balance_after,
            "kind": kind,
            "reason": reason,
            "idempotency_key": idempotency_key,
            "reverses_id": reverses_id,
            "meta": metadata,
            "created_at": now,
            "actor": actor,
        }
        result = conn.execute(self.db.sql.insert_entry, values)
        assert result.inserted_primary_key is not None
        return Entry(
            id=int(result.inserted_primary_key[0]),
            wallet=wallet,
            amount=amount,
            balance_after=balance_after,
            kind=kind,
            reason=reason,
            idempotency_key=idempotency_key,
            metadata=metadata,
            created_at=now,
            reverses_id=reverses_id,
            actor=actor,
        )

    def _insert_draws(self, conn: Connection, entry_id: int, draws: Sequence[_Draw]) -> None:
        if draws:
            conn.execute(
                self.db.sql.insert_draws,
                [{"entry_id": entry_id, "lot_id": d.lot_id, "amount": d.amount} for d in draws],
            )

    def _entry(self, row: Row[Any], wallet: Wallet) -> Entry:
        return entry_of(row, wallet)

    def _replay(self, wallet: Wallet, key: str, kind: str, amount: int) -> Entry | None:
        """The committed entry for ``key`` in this wallet, if any, checked to be the same request."""
        entry = self.find_by_key(wallet, key)
        if entry is None:
            return None
        if entry.kind != kind or abs(entry.amount) != amount:
            raise IdempotencyConflict(
                f"idempotency key {key!r} was used for a {entry.kind} of {abs(entry.amount)},"
                f" not a {kind} of {amount}"
            )
        return dataclasses.replace(entry, replayed=True)

    def _refund_of(self, spend_id: int) -> Row[Any] | None:
        e = self.t.entries
        with self.db.reader.connect() as conn:
            return conn.execute(sa.select(e).where(e.c.reverses_id == spend_id)).first()

    def _expiry_due(self, wallet: Wallet, now: datetime) -> bool:
        with self.db.reader.connect() as conn:
            row = conn.execute(self.db.sql.balance, self.db.sql.owner(wallet)).first()
        return row is not None and row.next_expiry is not None and row.next_expiry <= now

    def _create_wallet(self, wallet: Wallet) -> None:
        now = self.db.now()
        try:
            with self.db.engine.begin() as conn:
                conn.execute(
                    sa.insert(self.t.wallets).values(
                        user_id=wallet.user_id,
                        key_id=wallet.key_id or "",
                        balance=0,
                        debt=0,
                        created_at=now,
                        updated_at=now,
                    )
                )
        except sa.exc.IntegrityError:
            pass  # created at the same moment by another request: just as good

    def _write(
        self,
        tx: Callable[[Connection], Entry | None],
        wallet: Wallet,
        idempotency_key: str | None,
        kind: str,
        amount: int,
        *,
        create_wallet: bool = False,
    ) -> Entry | None:
        """Run a write; create the wallet first if needed; answer a lost idempotency race with the
        winner's entry."""
        try:
            entry = self.db.run(tx)
            if entry is None and create_wallet:
                self._create_wallet(wallet)
                entry = self.db.run(tx)
        except sa.exc.IntegrityError:
            if idempotency_key is None:
                raise
            done = self._replay(wallet, idempotency_key, kind, amount)
            if done is None:
                raise
            return done
        return entry


__all__ = ["Ledger"]
