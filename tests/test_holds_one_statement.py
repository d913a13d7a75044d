"""PostgreSQL's one-statement hold and settle (``HOLD`` and ``SETTLE`` in ``storage/statements.py``):
they write exactly what the long way writes, send the same signals and answer the same, and under
threads racing on one wallet (directly and through PgBouncer) they never charge twice or lose a release.

Every case here runs on PostgreSQL only (the other backends have no one-statement path); the long way
itself is proved on every backend by the ledger's own tests.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import also_through_pgbouncer
from test_concurrency import WAIT, assert_chain, race, rows

from flask_credits import HoldAlreadySettled, InsufficientCredits

pytestmark = also_through_pgbouncer


@pytest.fixture(autouse=True)
def _postgresql_only(backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("the one-statement hold and settle are PostgreSQL's")


@pytest.fixture
def sent(db):
    """The first word of every statement the engine sends, from any thread."""
    found: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        found.append(statement.split(None, 1)[0].upper())

    sa.event.listen(db.engine, "before_cursor_execute", record)
    yield found
    sa.event.remove(db.engine, "before_cursor_execute", record)


def play(credits, clock, user: str) -> list[Any]:
    """A program of holds and settles in ``user``'s wallets that passes through every case of the
    one-statement path, and every way out of it; what each call answered or raised, without ids."""
    out: list[Any] = []

    def call(op, *args: Any, **kwargs: Any) -> Any:
        try:
            result = op(*args, **kwargs)
        except (HoldAlreadySettled, InsufficientCredits) as exc:
            out.append((type(exc).__name__, str(exc).replace(f"hold {args[0]} ", "hold <id> ")))
            return None
        out.append(plain(result))
        return result

    start = clock.now
    credits.grant(user, 100, reason="soon", expires_at=start + timedelta(days=10))
    credits.grant(user, 50, reason="never")
    credits.grant(user, 40, key_id="key-1", reason="for the key")
    a = call(credits.hold, user, 30, reason="job")  # one statement
    call(credits.settle, a.id, 20)  # one statement: 10 back to the soonest lot
    call(credits.settle, a.id, 20)  # replay: the long way
    call(credits.settle, a.id, 21)  # HoldAlreadySettled
    b = call(credits.hold, user, 10, idempotency_key="h1", ttl=timedelta(minutes=5))
    call(credits.hold, user, 10, idempotency_key="h1")  # replay
    call(credits.settle, b.id, 10, reason="all of it", idempotency_key="s1")  # nothing back
    call(credits.settle, b.id, 10, idempotency_key="s1")  # replay
    call(credits.release, b.id)  # HoldAlreadySettled
    c = call(credits.hold, user, 75)  # takes the soonest lot down to 5
    d = call(credits.hold, user, 10)  # spans two lots: the long way
    call(credits.settle, d.id, 3)  # two draws: the long way
    call(credits.settle, c.id, 80)  # overshoot: the long way
    e = call(credits.hold, user, 5, key_id="key-1")
    credits.extend_hold(e.id, 5)  # the same lot: still one draw
    call(credits.settle, e.id, 7)  # one statement, in the key's wallet
    f = call(credits.hold, user, 4)
    call(credits.settle, f.id, 0)  # a release: the long way
    g = call(credits.hold, user, 4, ttl=timedelta(minutes=1))
    clock.advance(minutes=2)
    call(credits.settle, g.id, 2)  # expired: the long way, from what can be spent
    h = call(credits.hold, user, 9)
    call(credits.release, h.id)
    call(credits.settle, h.id, 1)  # released: HoldAlreadySettled
    call(credits.hold, user, 10_000)  # InsufficientCredits
    clock.advance(days=11)
    i = call(credits.hold, user, 2)  # an expiry is due: the long way first expires the lot
    call(credits.settle, i.id, 1)
    for key_id in (None, "key-1"):
        out.append(("balance", credits.balance(user, key_id=key_id), credits.held(user, key_id=key_id)))
    return out


def plain(value: Any) -> Any:
    """A hold or an entry as a dict without what differs between two users' identical programs."""
    if value is None:
        return None
    found = dataclasses.asdict(value)
    found.pop("id", None)
    found.pop("user_id", None)
    found.pop("wallet", None)
    meta = found.get("metadata")
    if isinstance(meta, dict) and "hold_id" in meta:
        found["metadata"] = {**meta, "hold_id": "<id>"}
    return found


def stored(db, credits, user: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of ``user``'s wallets, ids replaced by their rank within the user's rows, metadata
    as the JSON text PostgreSQL keeps."""
    t = credits.tables
    with db.engine.connect() as conn:
        wallets = conn.execute(
            sa.select(t.wallets).where(t.wallets.c.user_id == user).order_by(t.wallets.c.key_id)
        ).all()
        ids = [w.id for w in wallets]
        lots = conn.execute(sa.select(t.lots).where(t.lots.c.wallet_id.in_(ids)).order_by(t.lots.c.id)).all()
        entries = conn.execute(
            sa.select(t.entries, sa.cast(t.entries.c.meta, sa.Text).label("meta_text"))
            .where(t.entries.c.wallet_id.in_(ids))
            .order_by(t.entries.c.id)
        ).all()
        holds = conn.execute(
            sa.select(t.holds).where(t.holds.c.wallet_id.in_(ids)).order_by(t.holds.c.id)
        ).all()
        draws = conn.execute(
            sa.select(t.draws)
            .where(t.draws.c.entry_id.in_([e.id for e in entries]))
            .order_by(t.draws.c.entry_id)
        ).all()
        hold_draws = conn.execute(
            sa.select(t.hold_draws).where(t.hold_draws.c.hold_id.in_([h.id for h in holds]))
        ).all()
    rank = {
        "wallet": {w.id: n for n, w in enumerate(wallets)},
        "lot": {r.id: n for n, r in enumerate(lots)},
        "entry": {r.id: n for n, r in enumerate(entries)},
        "hold": {r.id: n for n, r in enumerate(holds)},
    }
    hold_of = {str(r.id): str(rank["hold"][r.id]) for r in holds}

    def meta(text: str | None) -> str | None:
        for real, ranked in hold_of.items():
            if text and f'"hold_id": {real},' in text:
                return text.replace(f'"hold_id": {real},', f'"hold_id": #{ranked},')
        return text

    return {
        "wallets": [(w.key_id, w.balance, w.held, w.debt, w.next_expiry, w.updated_at) for w in wallets],
        "lots": [(rank["wallet"][r.wallet_id], r.amount, r.remaining, r.expires_at) for r in lots],
        "entries": [
            (
                rank["wallet"][r.wallet_id],
                r.amount,
                r.balance_after,
                r.kind,
                r.reason,
                r.idempotency_key,
                meta(r.meta_text),
                r.created_at,
            )
            for r in entries
        ],
        "draws": sorted((rank["entry"][r.entry_id], rank["lot"][r.lot_id], r.amount) for r in draws),
        "holds": [
            (
                rank["wallet"][r.wallet_id],
                r.amount,
                r.requested,
                r.status,
                r.reason,
                r.idempotency_key,
                r.expires_at,
                r.settled_amount,
                None if r.entry_id is None else rank["entry"][r.entry_id],
                r.debt,
                r.created_at,
                r.updated_at,
            )
            for r in holds
        ],
        "hold_draws": sorted((rank["hold"][r.hold_id], rank["lot"][r.lot_id], r.amount) for r in hold_draws),
    }


def signals_of(received: list[tuple[str, object, dict[str, object]]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (
            name,
            {k: plain(v) if dataclasses.is_dataclass(v) else v for k, v in kwargs.items() if k != "wallet"},
        )
        for name, _, kwargs in received
    ]


def test_one_statement_hold_and_settle_write_answer_and_signal_exactly_what_the_long_way_does(
    db, credits, clock, received, sent
):
    start = clock.now
    fast = play(credits, clock, "fast")
    fast_signals = signals_of(received)
    assert sent.count("WITH") >= 8  # the program did take the one-statement path
    received.clear()
    clock.now = start
    credits.ledger.db.one_statement = False
    try:
        sent.clear()
        slow = play(credits, clock, "slow")
        assert "WITH" not in sent
    finally:
        credits.ledger.db.one_statement = True
    assert fast == slow
    assert fast_signals == signals_of(received)
    assert stored(db, credits, "fast") == stored(db, credits, "slow")
    assert credits.audit() == []


def test_a_settle_that_waited_for_the_wallet_while_its_hold_was_released_writes_nothing_and_says_so(
    app, db, credits, sent
):
    """The settle's statement reads the hold as held, then waits for the wallet row, which a release
    of that very hold holds. When the release commits, the statement's own re-check of the hold row
    fails and its guard undoes it whole (another hold keeps the wallet's reservation large enough for
    the wallet's part to go through); the long way then finds the hold released."""
    credits.grant("racer", 100, reason="stock")
    other = credits.hold("racer", 40)
    hold = credits.hold("racer", 30)
    t = credits.tables
    first_thread: list[str] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        blocker = db.engine.connect()
        try:
            with blocker.begin():
                # Lock the wallet as every writer does, first.
                blocker.execute(
                    sa.update(t.wallets)
                    .where(t.wallets.c.user_id == "racer")
                    .values(updated_at=sa.func.now())
                )

                def in_app(op):
                    def run() -> object:
                        with app.app_context():
                            return op()

                    return run

                release = pool.submit(in_app(lambda: credits.release(hold.id)))
                wait_for_lock_waiters(db, 1)
                sent.clear()
                settle = pool.submit(in_app(lambda: credits.settle(hold.id, 10)))
                wait_for_lock_waiters(db, 2)
                first_thread.extend(sent)
            release.result(timeout=WAIT)
            with pytest.raises(HoldAlreadySettled, match="released"):
                settle.result(timeout=WAIT)
        finally:
            blocker.close()
    assert first_thread == ["WITH"]  # the settle was the one statement, waiting
    assert credits.get_hold(hold.id).status == "released"
    assert (credits.balance("racer"), credits.held("racer")) == (60, 40)
    assert [e.kind for e in credits.history("racer")] == ["grant"]
    assert credits.settle(other.id, 40).amount == -40
    assert credits.audit() == []


def wait_for_lock_waiters(db, count: int) -> None:
    """Until ``count`` statements wait for a lock (asked on an engine of its own, so that the
    statements recorded by ``sent`` are the racers' only)."""
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
    engine = sa.create_engine(db.engine.url, poolclass=sa.pool.NullPool)
    try:
        for _ in range(WAIT * 20):
            with engine.connect() as probe:
                if probe.execute(sa.text(waiting)).scalar_one() >= count:
                    return
            threading.Event().wait(0.05)
    finally:
        engine.dispose()
    pytest.fail(f"never saw {count} statement(s) waiting for a lock")


def test_threads_holding_settling_releasing_and_spending_on_one_wallet_never_charge_twice_or_lose_credits(
    app, credits, sent, caplog
):
    """16 threads on one wallet: each holds, then settles below the hold (one statement each when
    nothing interferes), releases, spends, and races another thread to settle or release a shared
    hold. Afterwards every settle is one entry, every release gave everything back, and the wallet's
    balance, held credits, entries and lots agree."""
    count = 16
    credits.grant("hot", 10_000, reason="stock")
    shared = [credits.hold("hot", 10) for _ in range(count // 2)]

    def work(i: int) -> dict[str, Any]:
        told: dict[str, Any] = {"settled": [], "spent": [], "released": 0, "shared": None}
        for n in range(6):
            hold = credits.hold("hot", 5 + n)
            if n % 3 == 2:
                credits.release(hold.id)
                told["released"] += 5 + n
            else:
                told["settled"].append(credits.settle(hold.id, 1 + n))
            told["spent"].append(credits.spend("hot", 1, reason="job"))
        mine = shared[i // 2]
        try:
            told["shared"] = credits.settle(mine.id, 7) if i % 2 else credits.release(mine.id) or "released"
        except HoldAlreadySettled:
            told["shared"] = "lost"
        return told

    sent.clear()
    with caplog.at_level(logging.WARNING, logger="flask_credits"):
        outcomes = race(app, count, work)
    # Every writer locks the wallet row first, the one statements too: no deadlock to retry.
    assert [r.getMessage() for r in caplog.records if "retried" in r.getMessage()] == []
    assert sent.count("WITH") >= count * 6  # most of them did take the one statement
    entries = rows(credits, "hot")
    assert_chain(entries)
    by_id = {e.id: e for e in entries}
    settles = [e for o in outcomes for e in o["settled"]]
    assert len({e.id for e in settles}) == len(settles) == count * 4
    for entry in settles + [e for o in outcomes for e in o["spent"]]:
        assert (by_id[entry.id].kind, by_id[entry.id].amount) == ("spend", entry.amount)
    # Each shared hold: exactly one of its two racers won, and the other was told it lost.
    for pair in range(count // 2):
        released, settled = outcomes[2 * pair]["shared"], outcomes[2 * pair + 1]["shared"]
        assert (released, settled) == ("released", "lost") or (released == "lost" and settled.amount == -7)
    won = [o["shared"] for o in outcomes if o["shared"] not in ("lost", "released")]
    spent = sum(-e.amount for e in entries if e.kind == "spend")
    expected = (sum(1 + n for n in range(6) if n % 3 != 2) + 6) * count + 7 * len(won)
    assert spent == expected
    assert len([e for e in entries if e.kind == "spend"]) == count * 4 + count * 6 + len(won)
    assert credits.held("hot") == 0
    assert credits.balance("hot") == 10_000 - spent == entries[-1].balance_after
    statuses = Counter(credits.get_hold(h.id).status for h in shared)
    # Counter on both sides: a status no hold ended in counts as 0 (a plain dict's 0 would not match).
    assert statuses == Counter({"settled": len(won), "released": count // 2 - len(won)})
    assert credits.audit() == []
