"""``audit()``: every wallet's invariants checked against its entries, lots and draws."""

from __future__ import annotations

import sqlalchemy as sa

from ..records import Wallet
from ..storage.database import Database, unavailable_on_database_errors


@unavailable_on_database_errors
def audit(db: Database) -> list[str]:
    """Check every wallet's invariants; return one line per problem, naming the wallet."""
    w, e, lt, d = db.t.wallets, db.t.entries, db.t.lots, db.t.draws
    h, hd = db.t.holds, db.t.hold_draws
    problems: list[str] = []
    with db.engine.connect() as conn:
        wallets = {r.id: r for r in conn.execute(sa.select(w))}
        sums = {
            r.wallet_id: r
            for r in conn.execute(
                sa.select(
                    e.c.wallet_id,
                    sa.func.sum(e.c.amount).label("total"),
                    sa.func.max(e.c.id).label("last_id"),
                ).group_by(e.c.wallet_id)
            )
        }
        # A join, not IN (ids...): a list of one id per wallet outgrows the bind-parameter limit.
        last = sa.select(sa.func.max(e.c.id).label("id")).group_by(e.c.wallet_id).subquery()
        last_after = dict(
            conn.execute(sa.select(e.c.wallet_id, e.c.balance_after).join(last, last.c.id == e.c.id)).all()
        )
        lots = {
            r.wallet_id: r
            for r in conn.execute(
                sa.select(
                    lt.c.wallet_id,
                    sa.func.sum(lt.c.remaining).label("remaining"),
                    sa.func.min(sa.case((lt.c.remaining > 0, lt.c.expires_at), else_=None)).label("soonest"),
                ).group_by(lt.c.wallet_id)
            )
        }
        drawn = sa.func.coalesce(sa.func.sum(d.c.amount), 0)
        bad_draws = conn.execute(
            sa.select(e.c.id, e.c.wallet_id, e.c.amount, drawn.label("drawn"))
            .outerjoin(d, d.c.entry_id == e.c.id)
            .where(
                sa.or_(
                    e.c.kind.in_(("spend", "refund", "expire", "revoke", "reinstate", "debt")),
                    # A transfer's source entry drew from lots; its target entry created lots.
                    sa.and_(e.c.kind == "transfer", e.c.amount < 0),
                )
            )
            .group_by(e.c.id, e.c.wallet_id, e.c.amount)
            .having(drawn != e.c.amount)
        ).all()
        live = {
            r.wallet_id: r
            for r in conn.execute(
                sa.select(
                    h.c.wallet_id,
                    sa.func.sum(h.c.amount).label("held"),
                    sa.func.min(h.c.expires_at).label("soonest"),
                )
                .where(h.c.status == "held")
                .group_by(h.c.wallet_id)
            )
        }
        held_draws = sa.func.coalesce(sa.func.sum(hd.c.amount), 0)
        bad_holds = conn.execute(
            sa.select(h.c.id, h.c.wallet_id, h.c.status, h.c.amount, held_draws.label("drawn"))
            .outerjoin(hd, hd.c.hold_id == h.c.id)
            .group_by(h.c.id, h.c.wallet_id, h.c.status, h.c.amount)
            .having(sa.case((h.c.status == "held", h.c.amount), else_=0) != held_draws)
        ).all()
        # An entry creates one lot (a transfer in: one per expiry it brought): they hold its amount.
        created = sa.func.sum(lt.c.amount)
        bad_lots = conn.execute(
            sa.select(
                e.c.id,
                e.c.wallet_id,
                created.label("amount"),
                e.c.amount.label("entry_amount"),
            )
            .join(lt, lt.c.entry_id == e.c.id)
            .group_by(e.c.id, e.c.wallet_id, e.c.amount)
            .having(created != e.c.amount)
        ).all()
    for wid, row in wallets.items():
        name = f"wallet {Wallet(row.user_id, row.key_id or None)}"
        total = int(sums[wid].total) if wid in sums else 0
        remaining = int(lots[wid].remaining) if wid in lots else 0
        held = int(live[wid].held) if wid in live else 0
        if row.balance + row.held != total:
            problems.append(f"{name}: balance {row.balance} + held {row.held} != sum of entries {total}")
        if row.held != held:
            problems.append(f"{name}: held {row.held} != credits of its live holds {held}")
        if row.balance != remaining:
            problems.append(f"{name}: balance {row.balance} != credits left in lots {remaining}")
        if wid in last_after and last_after[wid] != row.balance + row.held:
            problems.append(
                f"{name}: balance {row.balance} + held {row.held} != last entry's balance_after"
                f" {last_after[wid]}"
            )
        soonest = lots[wid].soonest if wid in lots else None
        if soonest is not None and (row.next_expiry is None or row.next_expiry > soonest):
            problems.append(f"{name}: next_expiry {row.next_expiry} is after a lot's expiry")
        hold_expiry = live[wid].soonest if wid in live else None
        if hold_expiry is not None and (row.next_expiry is None or row.next_expiry > hold_expiry):
            problems.append(f"{name}: next_expiry {row.next_expiry} is after a live hold's expiry")
    for r in bad_draws:
        problems.append(
            f"wallet id {r.wallet_id}: entry {r.id} moved {r.amount} but its lots moved {r.drawn}"
        )
    for hr in bad_holds:
        problems.append(
            f"wallet id {hr.wallet_id}: hold {hr.id} ({hr.status}, {hr.amount}) has {hr.drawn} credits"
            " drawn from lots"
        )
    for r in bad_lots:
        problems.append(
            f"wallet id {r.wallet_id}: the lots of entry {r.id} hold {r.amount}, the entry {r.entry_amount}"
        )
    return problems
