"""Holds on every backend: reserve credits, then settle what the work really cost (issue 13).

What each test proves comes from the database: the wallet row (``balance``, ``held``, ``debt``), the
lots, the holds and their draws, the entries, and ``audit()``.
"""

from __future__ import annotations

import secrets
from datetime import timedelta

import pytest
import sqlalchemy as sa

from flask_credits import (
    CreditsError,
    HoldAlreadySettled,
    HoldNotFound,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidAmount,
    InvalidArgument,
    Wallet,
    signals,
)

# -- reading the database ------------------------------------------------------------------------------


def wallet_row(credits, user="alice"):
    """The wallet as stored (``credits.balance`` may first expire lots and holds)."""
    w = credits.tables.wallets
    with credits.db.engine.connect() as conn:
        return conn.execute(sa.select(w).where(w.c.user_id == user, w.c.key_id == "")).one()


def lots_of(credits, user="alice"):
    t = credits.tables
    with credits.db.engine.connect() as conn:
        return [
            (r.amount, r.remaining)
            for r in conn.execute(
                sa.select(t.lots.c.amount, t.lots.c.remaining)
                .join(t.wallets, t.wallets.c.id == t.lots.c.wallet_id)
                .where(t.wallets.c.user_id == user)
                .order_by(t.lots.c.id)
            )
        ]


def hold_row(credits, hold_id):
    h = credits.tables.holds
    with credits.db.engine.connect() as conn:
        return conn.execute(sa.select(h).where(h.c.id == hold_id)).one()


def count(credits, table):
    with credits.db.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def entry_sum(credits, user="alice"):
    t = credits.tables
    with credits.db.engine.connect() as conn:
        return conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(t.entries.c.amount), 0))
            .join(t.wallets, t.wallets.c.id == t.entries.c.wallet_id)
            .where(t.wallets.c.user_id == user)
        ).scalar_one()


def kinds(credits, user="alice"):
    """The wallet's entries, oldest first, as (kind, amount)."""
    return [(e.kind, e.amount) for e in reversed(credits.history(user, limit=1000))]


def consistent(credits, user="alice"):
    """The wallet's stored balance + held is what its entries sum to, and audit() finds nothing."""
    row = wallet_row(credits, user)
    assert row.balance + row.held == entry_sum(credits, user)
    assert credits.audit() == []


def buy(credits, user, amount):
    """A paid purchase of ``amount`` credits, fulfilled by the ledger as the webhook fulfils it."""
    wallet_id = credits.ledger.wallet_id(Wallet(user, None), create=True)
    p = credits.tables.purchases
    now = credits.clock()
    with credits.db.engine.begin() as conn:
        purchase_id = conn.execute(
            sa.insert(p).values(
                wallet_id=wallet_id,
                attempt_key=secrets.token_hex(16),
                credits=amount,
                amount=amount,
                currency="usd",
                status="open",
                created_at=now,
                updated_at=now,
            )
        ).inserted_primary_key[0]
    done = credits.ledger.fulfil_purchase(purchase_id, payment_intent=f"pi_{purchase_id}")
    assert done is not None
    return done


def names(received):
    return [n for n, _, _ in received]


# -- placing a hold ------------------------------------------------------------------------------------


def test_a_hold_moves_credits_from_the_balance_to_held_and_writes_no_entry(credits, clock, received):
    credits.grant("alice", 100, reason="welcome")
    hold = credits.hold("alice", 30, reason="llm call")
    assert (hold.amount, hold.user_id, hold.key_id, hold.status) == (30, "alice", None, "held")
    assert hold.expires_at == clock.now + timedelta(seconds=900)  # CREDITS_HOLD_TTL by default
    assert (credits.balance("alice"), credits.held("alice")) == (70, 30)
    assert credits.holds("alice") == [hold]
    assert credits.get_hold(hold.id) == hold
    assert kinds(credits) == [("grant", 100)]
    assert lots_of(credits) == [(100, 70)]
    with pytest.raises(InsufficientCredits):
        credits.spend("alice", 71, reason="more than is free")
    assert names(received) == ["credits_granted", "credits_held", "credits_insufficient"]
    _, _, kwargs = received[1]
    assert kwargs == {"wallet": Wallet("alice", None), "hold": hold, "amount": 30}
    consistent(credits)


def test_holds_of_a_key_wallet_are_its_own(credits):
    credits.grant("alice", 10, reason="user")
    credits.grant("alice", 10, key_id="key-1", reason="key")
    hold = credits.hold("alice", 4, key_id="key-1", ttl=60)
    assert hold.key_id == "key-1"
    assert (credits.held("alice"), credits.held("alice", "key-1")) == (0, 4)
    assert (credits.balance("alice"), credits.balance("alice", "key-1")) == (10, 6)
    assert credits.holds("alice") == []
    credits.settle(hold.id, 3)
    assert credits.balance("alice", "key-1") == 7
    assert credits.audit() == []


def test_a_hold_the_wallet_cannot_cover_is_402_and_writes_nothing(credits, received):
    credits.grant("alice", 10, reason="welcome")
    credits.hold("alice", 6)
    before = (wallet_row(credits), lots_of(credits), count(credits, credits.tables.holds))
    with pytest.raises(InsufficientCredits) as info:
        credits.hold("alice", 5)
    assert (info.value.code, info.value.required, info.value.balance) == (402, 5, 4)
    assert (wallet_row(credits), lots_of(credits), count(credits, credits.tables.holds)) == before
    assert count(credits, credits.tables.hold_draws) == 1
    with pytest.raises(InsufficientCredits) as info:
        credits.hold("nobody", 1)
    assert info.value.balance == 0
    assert names(received)[-1] == "credits_insufficient"
    consistent(credits)


def test_a_hold_with_a_bad_ttl_is_refused(credits):
    credits.grant("alice", 10, reason="welcome")
    for ttl in (0, -5, timedelta(0), timedelta(days=400), "60", True):
        with pytest.raises(InvalidArgument):
            credits.hold("alice", 1, ttl=ttl)
    assert count(credits, credits.tables.holds) == 0


def test_holds_draw_the_soonest_expiring_lots_first(credits, clock):
    now = clock.now
    credits.grant("alice", 10, reason="forever")
    credits.grant("alice", 10, reason="late", expires_at=now + timedelta(days=30))
    credits.grant("alice", 10, reason="soon", expires_at=now + timedelta(days=1))
    hold = credits.hold("alice", 15)
    assert lots_of(credits) == [(10, 10), (10, 5), (10, 0)]
    credits.spend("alice", 8, reason="job")  # a spend after it draws what the hold left
    assert lots_of(credits) == [(10, 7), (10, 0), (10, 0)]
    credits.settle(hold.id, 12)  # the soon lot pays first; the 3 given back return to the late lot
    assert lots_of(credits) == [(10, 7), (10, 3), (10, 0)]
    assert credits.balance("alice") == 10
    consistent(credits)


# -- settling -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("charge", "balance_after"), [(0, 100), (1, 99), (25, 75), (40, 60)])
def test_settling_at_most_the_hold_charges_it_and_gives_the_rest_back(
    credits, received, charge, balance_after
):
    credits.grant("alice", 100, reason="welcome")
    hold = credits.hold("alice", 40, reason="render")
    entry = credits.settle(hold.id, charge)
    assert (credits.balance("alice"), credits.held("alice")) == (balance_after, 0)
    assert lots_of(credits) == [(100, balance_after)]
    assert credits.holds("alice") == []
    row = hold_row(credits, hold.id)
    if charge == 0:  # a settle at 0 is a release
        assert entry is None
        assert row.status == "released"
        assert kinds(credits) == [("grant", 100)]
        assert names(received)[-1] == "credits_released"
        assert received[-1][2]["amount"] == 40
    else:
        assert (entry.kind, entry.amount, entry.balance_after, entry.reason) == (
            "spend",
            -charge,
            balance_after,
            "render",
        )
        assert entry.metadata == {"hold_id": hold.id, "held": 40, "amount": charge}
        assert (row.status, row.settled_amount, row.entry_id, row.debt) == ("settled", charge, entry.id, 0)
        assert kinds(credits) == [("grant", 100), ("spend", -charge)]
        assert names(received)[-1] == "credits_settled"
        settled = received[-1][2]
        assert (settled["held"], settled["amount"], settled["entry"]) == (40, charge, entry)
        assert settled["hold"].status == "settled"
    assert "credits_overdrawn" not in names(received)
    consistent(credits)


def test_settling_above_the_hold_takes_the_excess_from_what_the_wallet_can_spend(credits, received):
    credits.grant("alice", 100, reason="welcome")
    hold = credits.hold("alice", 40)
    entry = credits.settle(hold.id, 70, reason="long answer")
    assert (entry.amount, entry.balance_after, entry.reason) == (-70, 30, "long answer")
    assert entry.metadata == {"hold_id": hold.id, "held": 40, "amount": 70}
    assert (credits.balance("alice"), credits.held("alice"), wallet_row(credits).debt) == (30, 0, 0)
    assert lots_of(credits) == [(100, 30)]
    assert "credits_overdrawn" not in names(received)
    consistent(credits)


def test_an_overshoot_the_wallet_cannot_pay_becomes_debt_that_the_next_purchase_pays_first(
    credits, clock, received
):
    credits.grant("alice", 50, reason="welcome")
    hold = credits.hold("alice", 40)
    entry = credits.settle(hold.id, 65)
    assert (entry.amount, entry.balance_after) == (-50, 0)  # every credit the wallet had
    assert entry.metadata == {"hold_id": hold.id, "held": 40, "amount": 65, "debt": 15}
    row = wallet_row(credits)
    assert (row.balance, row.held, row.debt) == (0, 0, 15)
    assert hold_row(credits, hold.id).debt == 15
    overdrawn = [kw for n, _, kw in received if n == "credits_overdrawn"]
    assert len(overdrawn) == 1
    assert (overdrawn[0]["amount"], overdrawn[0]["entry"], overdrawn[0]["hold"].id) == (15, entry, hold.id)
    assert names(received)[-2:] == ["credits_settled", "credits_overdrawn"]
    with pytest.raises(InsufficientCredits):
        credits.hold("alice", 1)

    buy(credits, "alice", 100)

    assert (credits.balance("alice"), wallet_row(credits).debt) == (85, 0)
    assert kinds(credits)[-2:] == [("purchase", 100), ("debt", -15)]
    consistent(credits)


def test_a_purchase_smaller_than_the_debt_pays_part_of_it(credits):
    credits.grant("alice", 5, reason="welcome")
    hold = credits.hold("alice", 5)
    credits.settle(hold.id, 30)
    assert wallet_row(credits).debt == 25
    buy(credits, "alice", 10)
    assert (credits.balance("alice"), wallet_row(credits).debt) == (0, 15)
    consistent(credits)


def test_settling_again_with_the_same_amount_returns_the_same_entry(credits, received):
    credits.grant("alice", 100, reason="welcome")
    hold = credits.hold("alice", 40)
    first = credits.settle(hold.id, 25)
    again = credits.settle(hold.id, 25)
    assert again == first
    assert (first.replayed, again.replayed) == (False, True)
    with pytest.raises(HoldAlreadySettled):
        credits.settle(hold.id, 26)
    with pytest.raises(HoldAlreadySettled):
        credits.settle(hold.id, 0)
    assert credits.balance("alice") == 75
    assert names(received).count("credits_settled") == 1
    assert kinds(credits) == [("grant", 100), ("spend", -25)]
    consistent(credits)


def test_an_overshoot_settled_again_adds_no_second_debt(credits, received):
    credits.grant("alice", 10, reason="welcome")
    hold = credits.hold("alice", 10)
    first = credits.settle(hold.id, 14)
    assert credits.settle(hold.id, 14) == first
    assert wallet_row(credits).debt == 4
    assert names(received).count("credits_overdrawn") == 1
    consistent(credits)


def test_release_gives_the_credits_back_and_is_idempotent(credits, received):
    credits.grant("alice", 100, reason="welcome")
    hold = credits.hold("alice", 40)
    assert credits.release(hold.id) is None
    credits.release(hold.id)
    assert (credits.balance("alice"), credits.held("alice")) == (100, 0)
    assert lots_of(credits) == [(100, 100)]
    assert hold_row(credits, hold.id).status == "released"
    assert credits.get_hold(hold.id).status == "released"
    assert names(received).count("credits_released") == 1
    released = next(kw for n, _, kw in received if n == "credits_released")
    assert (released["amount"], released["expired"], released["hold"].status) == (40, False, "released")
    assert kinds(credits) == [("grant", 100)]  # a released hold leaves no trace in the history
    assert count(credits, credits.tables.hold_draws) == 0
    consistent(credits)


def test_a_settled_hold_cannot_be_released_and_a_released_one_cannot_be_charged(credits):
    credits.grant("alice", 100, reason="welcome")
    settled = credits.hold("alice", 10)
    credits.settle(settled.id, 5)
    with pytest.raises(HoldAlreadySettled):
        credits.release(settled.id)
    released = credits.hold("alice", 10)
    credits.release(released.id)
    with pytest.raises(HoldAlreadySettled):
        credits.settle(released.id, 1)
    assert credits.settle(released.id, 0) is None  # settling a released hold at 0 is releasing it again
    zero = credits.hold("alice", 10)
    assert credits.settle(zero.id, 0) is None
    credits.release(zero.id)  # a hold settled at 0 was released: releasing it again is fine
    with pytest.raises(HoldAlreadySettled):
        credits.settle(zero.id, 3)
    assert credits.balance("alice") == 95
    assert [h.status for h in map(credits.get_hold, (settled.id, released.id, zero.id))] == [
        "settled",
        "released",
        "released",
    ]
    consistent(credits)


def test_hold_errors_are_credits_errors():
    assert issubclass(HoldNotFound, CreditsError)
    assert issubclass(HoldAlreadySettled, CreditsError)


def test_unknown_or_malformed_hold_ids_are_hold_not_found(credits):
    credits.grant("alice", 10, reason="welcome")
    hold = credits.hold("alice", 5)
    for bad in (0, -1, True, "1", str(hold.id), 1.0, None, 2**70, hold.id + 1, 10**9):
        for call, args in (
            (credits.settle, (bad, 1)),
            (credits.release, (bad,)),
            (credits.get_hold, (bad,)),
            (credits.extend_hold, (bad, 1)),
        ):
            with pytest.raises(HoldNotFound):
                call(*args)
    assert (credits.balance("alice"), credits.get_hold(hold.id).status) == (5, "held")


def test_bad_settle_and_extend_amounts_are_refused_and_change_nothing(credits):
    credits.grant("alice", 10, reason="welcome")
    hold = credits.hold("alice", 5)
    for bad in (-1, 1.5, "3", True, None, 10**16):
        with pytest.raises(InvalidAmount):
            credits.settle(hold.id, bad)
        with pytest.raises(InvalidAmount):
            credits.extend_hold(hold.id, bad)
    for bad in (0, -1, 1.5, "3", True, None, 10**16):
        with pytest.raises(InvalidAmount):
            credits.hold("alice", bad)
    assert (credits.balance("alice"), credits.held("alice")) == (5, 5)
    consistent(credits)


# -- expiry ---------------------------------------------------------------------------------------------


def test_a_hold_past_its_expiry_stops_counting_at_once(credits, clock, received):
    credits.grant("alice", 100, reason="welcome")
    hold = credits.hold("alice", 40, ttl=60)
    clock.advance(seconds=59)
    assert (credits.balance("alice"), credits.held("alice")) == (60, 40)
    clock.advance(seconds=1)
    assert credits.held("alice") == 0  # read first: held() alone must notice the expiry
    assert credits.balance("alice") == 100
    assert credits.holds("alice") == []
    assert hold_row(credits, hold.id).status == "expired"
    released = [kw for n, _, kw in received if n == "credits_released"]
    assert len(released) == 1
    assert (released[0]["amount"], released[0]["expired"]) == (40, True)
    assert released[0]["hold"].status == "expired"
    credits.release(hold.id)  # releasing an expired hold does nothing
    assert credits.balance("alice") == 100
    assert kinds(credits) == [("grant", 100)]
    consistent(credits)


def test_a_spend_after_a_hold_expired_can_use_its_credits(credits, clock):
    credits.grant("alice", 10, reason="welcome")
    credits.hold("alice", 10, ttl=60)
    clock.advance(minutes=2)
    assert credits.spend("alice", 10, reason="job").balance_after == 0
    consistent(credits)


def test_a_new_hold_after_an_old_one_expired_can_use_its_credits(credits, clock):
    credits.grant("alice", 10, reason="welcome")
    credits.hold("alice", 10, ttl=60)
    clock.advance(minutes=2)
    assert credits.hold("alice", 10).amount == 10
    consistent(credits)


def test_the_expire_command_releases_expired_holds_in_the_database(app, credits, clock):
    credits.grant("alice", 10, reason="welcome")
    credits.grant("bob", 10, reason="welcome")
    old = credits.hold("alice", 4, ttl=60)
    young = credits.hold("bob", 4, ttl=3600)
    clock.advance(minutes=5)
    assert wallet_row(credits).held == 4  # nothing read the wallet: still stored as held

    result = app.test_cli_runner().invoke(args=["credits", "expire"])

    assert result.exit_code == 0, result.output
    assert hold_row(credits, old.id).status == "expired"
    assert hold_row(credits, young.id).status == "held"
    alice, bob = wallet_row(credits, "alice"), wallet_row(credits, "bob")
    assert (alice.balance, alice.held, bob.balance, bob.held) == (10, 0, 6, 4)
    assert count(credits, credits.tables.hold_draws) == 1  # only the live hold's
    consistent(credits, "alice")
    consistent(credits, "bob")


def test_settling_an_expired_hold_charges_what_can_be_spent_now_and_debt_for_the_rest(
    credits, clock, received
):
    credits.grant("alice", 30, reason="welcome")
    hold = credits.hold("alice", 20, ttl=60)
    clock.advance(minutes=2)
    credits.spend("alice", 25, reason="spent the expired hold's credits")
    entry = credits.settle(hold.id, 12)
    assert (entry.amount, entry.balance_after) == (-5, 0)
    assert entry.metadata == {"hold_id": hold.id, "held": 0, "amount": 12, "debt": 7}
    assert (wallet_row(credits).debt, hold_row(credits, hold.id).status) == (7, "settled")
    assert [kw["amount"] for n, _, kw in received if n == "credits_overdrawn"] == [7]
    assert credits.settle(hold.id, 12) == entry
    with pytest.raises(HoldAlreadySettled):
        credits.release(hold.id)
    consistent(credits)


def test_settling_an_expired_hold_the_sweep_already_released(credits, clock):
    credits.grant("alice", 30, reason="welcome")
    hold = credits.hold("alice", 20, ttl=60)
    clock.advance(minutes=2)
    credits.expire()
    entry = credits.settle(hold.id, 12)
    assert (entry.amount, credits.balance("alice"), wallet_row(credits).debt) == (-12, 18, 0)
    consistent(credits)


def test_an_expired_hold_whose_whole_charge_becomes_debt_has_no_entry(credits, clock):
    credits.grant("alice", 10, reason="welcome")
    hold = credits.hold("alice", 10, ttl=60)
    clock.advance(minutes=2)
    credits.spend("alice", 10, reason="job")
    assert credits.settle(hold.id, 4) is None
    assert credits.settle(hold.id, 4) is None  # and again: the same (no) entry
    assert (wallet_row(credits).debt, hold_row(credits, hold.id).status) == (4, "settled")
    with pytest.raises(HoldAlreadySettled):
        credits.settle(hold.id, 5)
    consistent(credits)


def test_a_lot_that_expires_while_held_does_not_make_the_settle_fail(credits, clock):
    credits.grant("alice", 10, reason="trial", expires_at=clock.now + timedelta(minutes=10))
    credits.grant("alice", 5, reason="forever")
    hold = credits.hold("alice", 8, ttl=3600)
    assert lots_of(credits) == [(10, 2), (5, 5)]
    clock.advance(minutes=20)
    # The trial's 2 unheld credits expired; its 8 held ones still count as held.
    assert (credits.balance("alice"), credits.held("alice")) == (5, 8)
    entry = credits.settle(hold.id, 6)
    assert entry.amount == -6
    # The 2 given back went to the expired trial lot: they expire, they are not spendable.
    assert credits.balance("alice") == 5
    assert lots_of(credits) == [(10, 0), (5, 5)]
    assert [k for k, _ in kinds(credits)] == ["grant", "grant", "expire", "spend", "expire"]
    consistent(credits)


def test_credits_released_to_an_expired_lot_expire(credits, clock):
    credits.grant("alice", 10, reason="trial", expires_at=clock.now + timedelta(minutes=10))
    hold = credits.hold("alice", 10, ttl=3600)
    clock.advance(minutes=20)
    credits.release(hold.id)
    assert credits.balance("alice") == 0
    with pytest.raises(InsufficientCredits):
        credits.spend("alice", 1, reason="job")
    assert kinds(credits) == [("grant", 10), ("expire", -10)]
    consistent(credits)


def test_a_hold_that_outlives_its_lot_gives_the_lot_back_expired_when_it_expires(credits, clock):
    credits.grant("alice", 10, reason="trial", expires_at=clock.now + timedelta(minutes=10))
    credits.hold("alice", 10, ttl=1800)
    clock.advance(hours=1)
    assert (credits.balance("alice"), credits.held("alice")) == (0, 0)
    assert kinds(credits) == [("grant", 10), ("expire", -10)]
    consistent(credits)


# -- history, signals, idempotency ----------------------------------------------------------------------


def test_history_shows_a_settle_as_one_spend_and_released_holds_not_at_all(credits, clock):
    credits.grant("alice", 10, reason="trial", expires_at=clock.now + timedelta(days=1))
    credits.grant("alice", 100, reason="forever")
    for _ in range(3):
        credits.release(credits.hold("alice", 5).id)
    hold = credits.hold("alice", 8)
    credits.extend_hold(hold.id, 8)
    entry = credits.settle(hold.id, 20)  # across both lots, held and not
    assert kinds(credits) == [("grant", 10), ("grant", 100), ("spend", -20)]
    d = credits.tables.draws
    with credits.db.engine.connect() as conn:
        drawn = sorted(conn.execute(sa.select(d.c.amount).where(d.c.entry_id == entry.id)).scalars())
    assert drawn == [-10, -10]  # one draw per lot
    consistent(credits)


def test_signals_are_sent_after_the_commit_with_the_documented_arguments(app, credits, received):
    seen = []

    def look(sender, **kwargs):  # what a receiver reads from the database is already committed
        seen.append((kwargs["hold"].id, credits.get_hold(kwargs["hold"].id).status, wallet_row(credits).held))

    for signal in (signals.credits_held, signals.credits_settled, signals.credits_released):
        signal.connect(look)
    try:
        credits.grant("alice", 10, reason="welcome")
        first = credits.hold("alice", 4)
        credits.settle(first.id, 2)
        second = credits.hold("alice", 3)
        credits.release(second.id)
    finally:
        for signal in (signals.credits_held, signals.credits_settled, signals.credits_released):
            signal.disconnect(look)
    assert seen == [
        (first.id, "held", 4),
        (first.id, "settled", 0),
        (second.id, "held", 3),
        (second.id, "released", 0),
    ]
    sent = [(n, sorted(kw)) for n, _, kw in received if n != "credits_granted"]
    assert sent == [
        ("credits_held", ["amount", "hold", "wallet"]),
        ("credits_settled", ["amount", "entry", "held", "hold", "wallet"]),
        ("credits_held", ["amount", "hold", "wallet"]),
        ("credits_released", ["amount", "expired", "hold", "wallet"]),
    ]
    assert all(sender is app for _, sender, _ in received)


def test_a_replayed_hold_key_returns_the_same_hold_and_reserves_nothing_more(credits, received):
    credits.grant("alice", 100, reason="welcome")
    first = credits.hold("alice", 30, idempotency_key="job-1")
    again = credits.hold("alice", 30, idempotency_key="job-1")
    assert again == first
    assert (first.replayed, again.replayed) == (False, True)
    assert (credits.balance("alice"), credits.held("alice")) == (70, 30)
    with pytest.raises(IdempotencyConflict):
        credits.hold("alice", 31, idempotency_key="job-1")
    credits.settle(first.id, 10)
    assert credits.hold("alice", 30, idempotency_key="job-1").id == first.id  # even once settled
    credits.grant("bob", 1, reason="welcome")
    assert credits.hold("bob", 1, idempotency_key="job-1").replayed is False  # keys are per wallet
    assert names(received).count("credits_held") == 2  # alice's once, bob's once
    assert credits.balance("alice") == 90
    consistent(credits)


def test_a_refused_hold_leaves_its_key_free(credits):
    with pytest.raises(InsufficientCredits):
        credits.hold("alice", 10, idempotency_key="job-1")
    credits.grant("alice", 10, reason="top up")
    assert credits.hold("alice", 10, idempotency_key="job-1").replayed is False


def test_a_settle_key_replays_the_settle_and_a_key_used_elsewhere_is_a_conflict(credits):
    credits.grant("alice", 100, reason="welcome")
    hold = credits.hold("alice", 30)
    entry = credits.settle(hold.id, 20, idempotency_key="settle-1")
    assert entry.idempotency_key == "settle-1"
    assert credits.settle(hold.id, 20, idempotency_key="settle-1") == entry
    other = credits.hold("alice", 30)
    with pytest.raises(IdempotencyConflict):
        credits.settle(other.id, 20, idempotency_key="settle-1")
    credits.spend("alice", 1, reason="job", idempotency_key="spend-1")
    with pytest.raises(IdempotencyConflict):
        credits.settle(other.id, 1, idempotency_key="spend-1")
    with pytest.raises(IdempotencyConflict):
        credits.spend("alice", 21, reason="job", idempotency_key="settle-1")
    assert (credits.get_hold(other.id).status, credits.held("alice")) == ("held", 30)
    assert credits.settle(other.id, 5, idempotency_key="settle-2").amount == -5
    assert credits.balance("alice") == 74
    consistent(credits)


# -- extending ------------------------------------------------------------------------------------------


def test_extending_a_hold_reserves_more_and_pushes_its_expiry(credits, clock, received):
    credits.grant("alice", 100, reason="welcome")
    hold = credits.hold("alice", 10, ttl=60)
    clock.advance(seconds=30)
    grown = credits.extend_hold(hold.id, 15, ttl=600)
    assert (grown.id, grown.amount, grown.expires_at) == (hold.id, 25, clock.now + timedelta(seconds=600))
    assert (credits.balance("alice"), credits.held("alice")) == (75, 25)
    assert credits.get_hold(hold.id).amount == 25
    assert [kw["amount"] for n, _, kw in received if n == "credits_held"] == [10, 15]
    clock.advance(seconds=120)  # past the first ttl, not the extended one
    assert credits.held("alice") == 25
    shorter = credits.extend_hold(hold.id, 1, ttl=5)  # a shorter ttl never shortens the hold
    assert shorter.expires_at == grown.expires_at
    assert credits.settle(hold.id, 26).amount == -26
    assert credits.balance("alice") == 74
    consistent(credits)


def test_an_extension_the_wallet_cannot_cover_leaves_the_hold_unchanged(credits):
    credits.grant("alice", 20, reason="welcome")
    hold = credits.hold("alice", 15)
    before = (hold_row(credits, hold.id), wallet_row(credits), lots_of(credits))
    with pytest.raises(InsufficientCredits) as info:
        credits.extend_hold(hold.id, 6)
    assert (info.value.required, info.value.balance) == (6, 5)
    assert (hold_row(credits, hold.id), wallet_row(credits), lots_of(credits)) == before
    consistent(credits)


def test_an_ended_hold_cannot_be_extended(credits, clock):
    credits.grant("alice", 100, reason="welcome")
    settled, released, expired = (credits.hold("alice", 5, ttl=60) for _ in range(3))
    credits.settle(settled.id, 5)
    credits.release(released.id)
    clock.advance(minutes=2)
    for hold in (settled, released, expired):
        with pytest.raises(HoldAlreadySettled):
            credits.extend_hold(hold.id, 1)
    assert (credits.balance("alice"), credits.held("alice")) == (95, 0)
    consistent(credits)


@pytest.mark.parametrize("more", [1, 1000], ids=["the wallet could cover", "the wallet could not cover"])
def test_an_expired_but_unswept_hold_cannot_be_extended(credits, clock, more):
    credits.grant("alice", 100, reason="welcome")
    hold = credits.hold("alice", 5, ttl=60)
    clock.advance(minutes=2)
    with pytest.raises(HoldAlreadySettled):
        credits.extend_hold(hold.id, more)
    assert (credits.balance("alice"), hold_row(credits, hold.id).status) == (100, "expired")
    consistent(credits)


# -- refunds --------------------------------------------------------------------------------------------


def test_refunding_a_settle_returns_the_credits_to_the_lots_it_drew(credits, clock):
    credits.grant("alice", 10, reason="soon", expires_at=clock.now + timedelta(days=1))
    credits.grant("alice", 10, reason="forever")
    hold = credits.hold("alice", 12)
    spend = credits.settle(hold.id, 15)
    assert lots_of(credits) == [(10, 0), (10, 5)]
    refund = credits.refund("alice", spend.id, reason="job failed")
    assert (refund.kind, refund.amount, refund.reverses_id) == ("refund", 15, spend.id)
    assert lots_of(credits) == [(10, 10), (10, 10)]
    assert credits.refund("alice", spend.id, reason="again") == refund
    assert credits.balance("alice") == 20
    consistent(credits)


def test_refunding_an_overdrawn_settle_returns_what_left_the_wallet(credits):
    credits.grant("alice", 10, reason="welcome")
    hold = credits.hold("alice", 10)
    spend = credits.settle(hold.id, 14)
    credits.refund("alice", spend.id, reason="job failed")
    assert lots_of(credits) == [(10, 10)]
    assert credits.balance("alice") == 10
    consistent(credits)


def test_settling_an_expired_hold_at_0_changes_nothing_like_releasing_it(credits, clock, received):
    credits.grant("alice", 10, reason="welcome")
    hold = credits.hold("alice", 6, ttl=60)
    clock.advance(minutes=2)
    assert credits.settle(hold.id, 0) is None
    assert (hold_row(credits, hold.id).status, credits.balance("alice")) == ("expired", 10)
    assert [kw["expired"] for n, _, kw in received if n == "credits_released"] == [True]
    assert credits.settle(hold.id, 3).amount == -3  # it can still be charged afterwards
    consistent(credits)


def test_audit_names_the_wallet_whose_held_credits_do_not_match_its_holds(credits, db):
    credits.grant("alice", 10, reason="welcome")
    credits.grant("bob", 10, reason="welcome")
    credits.hold("alice", 4)
    hold = credits.hold("bob", 4)
    assert credits.audit() == []
    h = credits.tables.holds
    with db.engine.begin() as conn:
        conn.execute(sa.update(h).where(h.c.id == hold.id).values(amount=3))
    problems = credits.audit()
    assert any("held 4 != credits of its live holds 3" in p for p in problems), problems
    assert any(f"hold {hold.id}" in p for p in problems), problems
    assert not any("alice" in p for p in problems)
