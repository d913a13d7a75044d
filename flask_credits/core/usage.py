"""Where a wallet's credits went: totals spent per day, reason or endpoint, and its whole history read
page by page for exports. Reads only.

What "spent" means: the credits of the wallet's spends made in ``[since, until)``, less the refunds of
those spends made before ``until``. A refund is counted against the spend it returns (its day, reason
and endpoint), not against the day it was made, so a closed period's totals do not move when a later
refund is made, and a group whose spends were all refunded by then totals 0. Holds count once they
are settled (the settle's spend entry); expiries, revocations and debt are not spending.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime
from typing import Any, Literal, NamedTuple

import sqlalchemy as sa

from ..errors import InvalidArgument
from ..records import Entry, Wallet
from ..storage.database import Database, unavailable_on_database_errors
from .ledger import entry_of

UsageBy = Literal["day", "reason", "endpoint"]
BY: tuple[UsageBy, ...] = ("day", "reason", "endpoint")

#: Entries read per query by :func:`pages`: a page is one short read on its own connection.
PAGE_SIZE = 500


def check_range(since: object, until: object, by: object) -> None:
    """InvalidArgument unless ``since`` < ``until`` are aware datetimes and ``by`` is one of :data:`BY`."""
    for name, value in (("since", since), ("until", until)):
        if not isinstance(value, datetime) or value.utcoffset() is None:
            raise InvalidArgument(f"{name} must be an aware datetime (tzinfo=timezone.utc), not {value!r}")
    if not since < until:  # type: ignore[operator]  # both are aware datetimes, checked above
        raise InvalidArgument(f"since must be before until, not {since!r} to {until!r}")
    if by not in BY:
        raise InvalidArgument(f"by must be one of {', '.join(BY)}, not {by!r}")


def _wallet_id(db: Database, wallet: Wallet) -> sa.ScalarSelect[Any]:
    # A scalar subquery, as Ledger.history does: the planner walks the (wallet_id, id) index of one
    # known wallet.
    w = db.t.wallets
    return (
        sa.select(w.c.id)
        .where(w.c.user_id == wallet.user_id, w.c.key_id == (wallet.key_id or ""))
        .scalar_subquery()
    )


@unavailable_on_database_errors
def usage(db: Database, wallet: Wallet, *, since: datetime, until: datetime, by: UsageBy) -> dict[Any, int]:
    """Credits spent (net of their refunds, see the module's docstring) in ``[since, until)`` per
    UTC ``date`` (``by="day"``, oldest first, days without spends left out), per reason or per
    endpoint (most spent first; spends made without the decorator have the endpoint ``None``). One
    query."""
    check_range(since, until, by)
    spend, refund = db.t.entries.alias("s"), db.t.entries.alias("r")
    key: sa.ColumnElement[Any]
    if by == "day":
        # date() of the stored naive UTC time: the UTC day on SQLite, PostgreSQL and MariaDB alike.
        key = sa.func.date(spend.c.created_at, type_=sa.Date)
    elif by == "reason":
        key = spend.c.reason
    else:
        key = spend.c.meta["endpoint"].as_string()
    spent = sa.func.sum(-spend.c.amount - sa.func.coalesce(refund.c.amount, 0))
    query = (
        sa.select(key.label("k"), spent.label("spent"))
        .select_from(
            # At most one refund per spend (a unique key): the join never counts a spend twice.
            spend.outerjoin(
                refund,
                sa.and_(
                    refund.c.reverses_id == spend.c.id,
                    refund.c.kind == "refund",
                    refund.c.created_at < until,
                ),
            )
        )
        .where(
            spend.c.wallet_id == _wallet_id(db, wallet),
            spend.c.kind == "spend",
            spend.c.created_at >= since,
            spend.c.created_at < until,
        )
        .group_by(key)
    )
    with db.reader.connect() as conn:
        rows = [(row.k, int(row.spent)) for row in conn.execute(query)]
    if by == "day":
        return {_day(k): n for k, n in sorted(rows, key=lambda r: _day(r[0]))}
    return dict(sorted(rows, key=lambda r: (-r[1], r[0] is None, r[0] or "")))


def _day(value: date | str) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])


class Exported(NamedTuple):
    entry: Entry
    actor: str | None  # who made a hand change (admin console, CLI), None for the app's own


def pages(db: Database, wallet: Wallet, *, page_size: int = PAGE_SIZE) -> Iterator[list[Exported]]:
    """The wallet's whole history, oldest first, ``page_size`` entries per query (keyset pagination
    on the (wallet_id, id) index: each page costs the same however long the history). Each page is
    read on its own connection, so a slow reader of the pages holds no transaction open."""
    after = 0
    while True:
        page = _page(db, wallet, after, page_size)
        if page:
            yield page
        if len(page) < page_size:
            return
        after = page[-1].entry.id


@unavailable_on_database_errors
def _page(db: Database, wallet: Wallet, after: int, page_size: int) -> list[Exported]:
    e = db.t.entries
    query = (
        sa.select(e)
        .where(e.c.wallet_id == _wallet_id(db, wallet), e.c.id > after)
        .order_by(e.c.id)
        .limit(page_size)
    )
    with db.reader.connect() as conn:
        return [Exported(entry_of(row, wallet), row.actor) for row in conn.execute(query)]
