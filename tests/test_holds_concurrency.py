"""Holds under real concurrency: threads and processes racing on one wallet and on one hold, on every
backend and through PgBouncer in transaction mode (issue 13).

The harness is tests/test_concurrency.py's: racers released together by a barrier, no sleeps, bounded
loops. What is proved afterwards comes from the database: the entries' ``balance_after`` chain, the
wallet row, the holds, and ``audit()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _holds_worker import churn
from helpers import also_through_pgbouncer
from test_concurrency import Workers, assert_chain, race, racers, rows

from flask_credits import HoldAlreadySettled, IdempotencyConflict

pytestmark = also_through_pgbouncer


@pytest.fixture(scope="module")
def workers() -> Iterator[Workers]:
    pool = Workers(4, script=Path(__file__).with_name("_holds_worker.py"))
    yield pool
    pool.close()


def wallet_row(credits, user: str) -> Any:
    w = credits.tables.wallets
    with credits.db.engine.connect() as conn:
        return conn.execute(sa.select(w).where(w.c.user_id == user, w.c.key_id == "")).one()


def hold_rows(credits) -> list[Any]:
    h = credits.tables.holds
    with credits.db.engine.connect() as conn:
        return conn.execute(sa.select(h).order_by(h.c.id)).all()


def check_churned(
    credits, user: str, granted: int, outcomes: list[dict[str, Any]], *, ended=("settled", "released")
) -> None:
    """After racers ran ``churn`` on one wallet: no credit was spent twice or made up, every entry is
    one a racer was told about, every hold ended as its settle said, and the wallet adds up."""
    told = sorted(tuple(e) for o in outcomes for e in o["entries"])
    assert len({entry_id for entry_id, _ in told}) == len(told)
    assert sum(o["held"] for o in outcomes) > 0
    assert sum(o["settled"] for o in outcomes) > 0
    entries = rows(credits, user)
    assert_chain(entries)  # never below zero: never more spent (and held) than granted
    assert sorted((r.id, r.amount) for r in entries if r.kind == "spend") == told
    spent = -sum(amount for _, amount in told)
    row = wallet_row(credits, user)
    assert row.held == 0  # every hold ended
    assert row.balance + spent == granted  # what is left and what was charged: exactly what was granted
    holds = hold_rows(credits)
    assert {h.status for h in holds} <= set(ended)
    assert len(holds) == sum(o["held"] for o in outcomes)
    by_id = {r.id: r for r in entries}
    for h in holds:  # each settle charged what it was asked: from the wallet, the rest as debt
        if h.status == "settled":
            charged = 0 if h.entry_id is None else -by_id[h.entry_id].amount
            assert charged + h.debt == h.settled_amount
    assert row.debt == sum(h.debt for h in holds)
    assert credits.audit() == []


# -- 1. many holds, spends, extends and settles on one wallet ----------------------------------------


def test_threads_holding_extending_spending_and_settling_on_one_wallet_keep_it_exact(app, credits, backend):
    count = racers(backend)
    for size in (25, 15, 20):
        credits.grant("shared", size, reason="stock")
    granted = 60

    outcomes = race(app, count, lambda i: churn(credits, "shared", 8, seed=i * 7))

    check_churned(credits, "shared", granted, outcomes)
    # The wallet ran dry while the racers worked: refusals and debt were both exercised.
    assert sum(o["refused"] for o in outcomes) > 0


def test_threads_holding_and_settling_while_holds_expire_and_a_sweeper_runs_keep_the_wallet_exact(
    app, credits, backend
):
    """Holds that last a millisecond: most expire while their racer still works on them, so settles
    of expired holds, lazy expiry on reads and ``expire()`` sweeps all race on one wallet."""
    count = racers(backend)
    credits.grant("shared", 100, reason="stock")

    def work(i: int) -> dict[str, Any]:
        if i == 0:
            for _ in range(6):
                credits.expire()
            return {"entries": [], "held": 0, "settled": 0}
        return churn(credits, "shared", 6, seed=i * 5, ttl=0.001)

    outcomes = race(app, count, work)

    credits.expire()
    check_churned(credits, "shared", 100, outcomes, ended=("settled", "released", "expired"))
    spends = [r for r in rows(credits, "shared") if r.kind == "spend" and r.meta and "hold_id" in r.meta]
    expired = [h for h in hold_rows(credits) if h.status == "expired"]
    late = [r for r in spends if r.meta["held"] == 0]  # settles of holds that had expired
    assert expired or late


def test_processes_holding_extending_spending_and_settling_on_one_wallet_keep_it_exact(
    app, credits, backend, database_url, workers
):
    if backend == "sqlite":  # the threads cover SQLite; across processes its busy handler only sleeps
        pytest.skip("processes race on the server databases")
    credits.grant("shared", 60, reason="stock")

    outcomes = workers.run({"url": database_url, "user": "shared", "rounds": 6, "seed": 0})

    check_churned(credits, "shared", 60, outcomes)


# -- 2. one hold, settled and released at once ---------------------------------------------------------


def test_settle_and_release_racing_on_one_hold_exactly_one_wins(app, credits, backend):
    pairs = racers(backend) // 2
    credits.grant("alice", 10 * pairs, reason="stock")
    holds = [credits.hold("alice", 10) for _ in range(pairs)]

    def settle_or_release(i: int) -> tuple[str, Any]:
        hold = holds[i // 2]
        try:
            if i % 2:
                return "released", credits.release(hold.id)
            return "settled", credits.settle(hold.id, 7)
        except HoldAlreadySettled:
            return "refused", None

    outcomes = race(app, 2 * pairs, settle_or_release)

    settled = 0
    for n, hold in enumerate(holds):
        settle, release = outcomes[2 * n], outcomes[2 * n + 1]
        status = credits.get_hold(hold.id).status
        assert {settle[0], release[0]} in ({"settled", "refused"}, {"released", "refused"}), (settle, release)
        winner = settle[0] if settle[0] != "refused" else release[0]
        assert status == winner
        settled += status == "settled"
    spends = [r for r in rows(credits, "alice") if r.kind == "spend"]
    assert len(spends) == settled
    assert all(r.amount == -7 for r in spends)
    assert (credits.balance("alice"), credits.held("alice")) == (10 * pairs - 7 * settled, 0)
    assert credits.audit() == []


# -- 3. one idempotency key at once --------------------------------------------------------------------


def test_concurrent_settles_of_one_hold_with_one_key_write_one_entry(app, credits, backend):
    credits.grant("alice", 20, reason="stock")
    hold = credits.hold("alice", 10)

    entries = race(app, racers(backend), lambda i: credits.settle(hold.id, 15, idempotency_key="settle-1"))

    assert len({e.id for e in entries}) == 1
    assert sorted(e.replayed for e in entries) == [False] + [True] * (len(entries) - 1)
    assert [(r.kind, r.amount) for r in rows(credits, "alice")] == [("grant", 20), ("spend", -15)]
    assert (credits.balance("alice"), credits.held("alice")) == (5, 0)
    assert credits.audit() == []


def test_concurrent_settles_of_different_holds_with_one_key_charge_one_hold(app, credits, backend):
    count = racers(backend)
    credits.grant("alice", 5 * count, reason="stock")
    holds = [credits.hold("alice", 5) for _ in range(count)]

    def settle(i: int) -> Any:
        try:
            return credits.settle(holds[i].id, 3, idempotency_key="settle-1")
        except IdempotencyConflict:
            return None

    entries = race(app, count, settle)

    won = [i for i, e in enumerate(entries) if e is not None]
    assert len(won) == 1
    assert [credits.get_hold(h.id).status for h in holds].count("settled") == 1
    assert credits.get_hold(holds[won[0]].id).status == "settled"
    assert (credits.balance("alice"), credits.held("alice")) == (2, 5 * (count - 1))
    assert credits.audit() == []


@pytest.mark.parametrize("stock", [10, 100], ids=["exactly enough for one", "enough for all"])
def test_concurrent_holds_with_one_key_place_one_hold_and_all_get_it(app, credits, backend, stock):
    credits.grant("alice", stock, reason="stock")

    holds = race(app, racers(backend), lambda i: credits.hold("alice", 10, idempotency_key="job-1"))

    assert len({h.id for h in holds}) == 1
    assert sorted(h.replayed for h in holds) == [False] + [True] * (len(holds) - 1)
    assert len(hold_rows(credits)) == 1
    assert (credits.balance("alice"), credits.held("alice")) == (stock - 10, 10)
    assert credits.audit() == []
