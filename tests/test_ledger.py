"""The ledger's rules, on every backend: lots, idempotency, expiry, refunds, constraints, audit."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from flask_credits import (
    EntryNotFound,
    IdempotencyConflict,
    InsufficientCredits,
    InvalidAmount,
    InvalidArgument,
    InvalidWallet,
    NotRefundable,
    Wallet,
)


def lots_of(credits, user, key=None):
    t = credits.tables
    with credits.db.engine.connect() as conn:
        wallet_id = conn.execute(
            sa.select(t.wallets.c.id).where(t.wallets.c.user_id == user, t.wallets.c.key_id == (key or ""))
        ).scalar_one()
        return [
            (r.amount, r.remaining)
            for r in conn.execute(
                sa.select(t.lots.c.amount, t.lots.c.remaining)
                .where(t.lots.c.wallet_id == wallet_id)
                .order_by(t.lots.c.id)
            )
        ]


def refused(constraint):
    """The database rejects the statement, naming the constraint (MariaDB's driver reports a failed
    CHECK as an OperationalError, the others as an IntegrityError)."""
    return pytest.raises((sa.exc.IntegrityError, sa.exc.OperationalError), match=constraint)


def count(credits, table):
    with credits.db.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def test_new_wallet_has_zero_balance_and_no_history(credits):
    assert credits.balance("alice") == 0
    assert credits.history("alice") == []


def test_grant_then_spend_moves_the_balance_and_records_entries(credits):
    grant = credits.grant("alice", 100, reason="welcome")
    spend = credits.spend("alice", 30, reason="persona")
    assert credits.balance("alice") == 70
    assert (grant.amount, grant.balance_after, grant.kind) == (100, 100, "grant")
    assert (spend.amount, spend.balance_after, spend.kind) == (-30, 70, "spend")
    assert [e.id for e in credits.history("alice")] == [spend.id, grant.id]
    assert spend.wallet == Wallet("alice", None)
    assert credits.audit() == []


def test_user_and_key_wallets_are_separate(credits):
    credits.grant("alice", 10, reason="user")
    credits.grant("alice", 5, key_id="key-1", reason="key")
    credits.spend("alice", 5, key_id="key-1", reason="api")
    assert credits.balance("alice") == 10
    assert credits.balance("alice", "key-1") == 0
    assert credits.balance("bob") == 0
    with pytest.raises(InsufficientCredits):
        credits.spend("alice", 1, key_id="key-1", reason="api")


def test_insufficient_spend_raises_402_and_writes_nothing(credits):
    credits.grant("alice", 5, reason="welcome")
    entries_before = count(credits, credits.tables.entries)
    with pytest.raises(InsufficientCredits) as info:
        credits.spend("alice", 6, reason="too much")
    assert (info.value.code, info.value.required, info.value.balance) == (402, 6, 5)
    assert credits.balance("alice") == 5
    assert count(credits, credits.tables.entries) == entries_before
    assert lots_of(credits, "alice") == [(5, 5)]


def test_spend_from_a_wallet_that_never_existed_is_insufficient(credits):
    with pytest.raises(InsufficientCredits) as info:
        credits.spend("nobody", 1, reason="x")
    assert info.value.balance == 0
    assert count(credits, credits.tables.wallets) == 0


@pytest.mark.parametrize("bad", [0, -1, 1.5, "3", True, None, 10**16])
def test_bad_amounts_are_refused_and_change_nothing(credits, bad):
    credits.grant("alice", 5, reason="welcome")
    with pytest.raises(InvalidAmount):
        credits.grant("alice", bad, reason="bad")
    with pytest.raises(InvalidAmount):
        credits.spend("alice", bad, reason="bad")
    assert credits.balance("alice") == 5
    assert len(credits.history("alice")) == 1


@pytest.mark.parametrize("bad", ["", " alice", "x" * 65, None, 1.5, True, b"alice"])
def test_bad_user_ids_are_refused(credits, bad):
    with pytest.raises(InvalidWallet):
        credits.grant(bad, 5, reason="x")
    with pytest.raises(InvalidWallet):
        credits.balance("alice", key_id=bad if bad not in ("", None) else "y" * 65)


def test_integer_user_ids_name_the_same_wallet_as_their_string(credits):
    credits.grant(42, 5, reason="int id")
    assert credits.balance("42") == 5


def test_reason_and_keys_are_checked(credits):
    with pytest.raises(InvalidArgument):
        credits.grant("alice", 5, reason="")
    with pytest.raises(InvalidArgument):
        credits.grant("alice", 5, reason="ok", idempotency_key="k" * 256)
    with pytest.raises(InvalidArgument):
        credits.history("alice", limit=0)
    with pytest.raises(InvalidArgument):
        credits.grant("alice", 5, reason="ok", expires_at=datetime(2030, 1, 1))  # naive
    assert count(credits, credits.tables.entries) == 0


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param({"when": datetime(2030, 1, 1)}, id="a datetime"),
        pytest.param({"blob": b"bytes"}, id="bytes"),
        pytest.param({"x": float("nan")}, id="NaN"),
        pytest.param(["a", "list"], id="a list instead of a dict"),
    ],
)
def test_metadata_that_is_not_a_json_object_is_refused_and_nothing_is_written(credits, metadata):
    credits.grant("alice", 5, reason="seed")
    with pytest.raises(InvalidArgument, match="metadata"):
        credits.spend("alice", 1, reason="job", metadata=metadata)
    with pytest.raises(InvalidArgument, match="metadata"):
        credits.grant("alice", 1, reason="gift", metadata=metadata)
    assert credits.balance("alice") == 5
    assert count(credits, credits.tables.entries) == 1


def test_replayed_grant_returns_the_original_and_writes_nothing(credits, received):
    first = credits.grant("alice", 50, reason="promo", idempotency_key="promo-1")
    again = credits.grant("alice", 50, reason="promo", idempotency_key="promo-1")
    assert again == first
    assert credits.balance("alice") == 50
    assert [name for name, _, _ in received].count("credits_granted") == 1


def test_a_grant_replayed_after_its_expiry_passed_returns_the_original(credits, clock):
    """A retried job may come back after the credits it granted expired: it gets its entry, not an
    error about the expiry date it passed the first time."""
    expires = clock.now + timedelta(hours=1)
    first = credits.grant("alice", 10, reason="trial", expires_at=expires, idempotency_key="trial-1")
    clock.advance(hours=2)
    again = credits.grant("alice", 10, reason="trial", expires_at=expires, idempotency_key="trial-1")
    assert again == first
    with pytest.raises(InvalidArgument, match="not in the future"):
        credits.grant("alice", 10, reason="trial", expires_at=expires, idempotency_key="trial-2")


def test_replayed_spend_returns_the_original(credits):
    credits.grant("alice", 50, reason="promo")
    first = credits.spend("alice", 20, reason="job", idempotency_key="job-7")
    again = credits.spend("alice", 20, reason="job", idempotency_key="job-7")
    assert again.id == first.id
    assert credits.balance("alice") == 30


def test_idempotency_key_reused_for_another_operation_is_a_conflict(credits):
    credits.grant("alice", 50, reason="promo", idempotency_key="k")
    with pytest.raises(IdempotencyConflict):
        credits.grant("alice", 51, reason="promo", idempotency_key="k")
    with pytest.raises(IdempotencyConflict):
        credits.spend("alice", 50, reason="promo", idempotency_key="k")
    assert credits.balance("alice") == 50


def test_idempotency_keys_are_per_wallet(credits):
    credits.grant("alice", 5, reason="a", idempotency_key="same")
    credits.grant("bob", 5, reason="b", idempotency_key="same")
    assert (credits.balance("alice"), credits.balance("bob")) == (5, 5)


def test_refused_spend_records_nothing_so_its_key_can_succeed_later(credits):
    with pytest.raises(InsufficientCredits):
        credits.spend("alice", 10, reason="job", idempotency_key="job-1")
    credits.grant("alice", 10, reason="top up")
    entry = credits.spend("alice", 10, reason="job", idempotency_key="job-1")
    assert entry.amount == -10
    assert credits.balance("alice") == 0


def test_spend_draws_soonest_expiring_lots_first_and_no_expiry_last(credits, clock):
    now = clock.now
    credits.grant("alice", 10, reason="forever")
    credits.grant("alice", 10, reason="late", expires_at=now + timedelta(days=30))
    credits.grant("alice", 10, reason="soon", expires_at=now + timedelta(days=1))
    credits.spend("alice", 15, reason="job")
    assert lots_of(credits, "alice") == [(10, 10), (10, 5), (10, 0)]
    credits.spend("alice", 8, reason="job")
    assert lots_of(credits, "alice") == [(10, 7), (10, 0), (10, 0)]
    assert credits.audit() == []


def test_spend_across_many_lots(credits):
    for i in range(40):
        credits.grant("alice", 1, reason=f"drip {i}")
    credits.spend("alice", 37, reason="big job")
    assert credits.balance("alice") == 3
    assert sum(r for _, r in lots_of(credits, "alice")) == 3
    assert credits.audit() == []


def test_expired_credits_stop_counting_and_leave_an_expire_entry(credits, clock, received):
    credits.grant("alice", 10, reason="trial", expires_at=clock.now + timedelta(hours=1))
    credits.grant("alice", 5, reason="forever")
    clock.advance(hours=1, seconds=1)
    assert credits.balance("alice") == 5
    latest = credits.history("alice")[0]
    assert (latest.kind, latest.amount, latest.balance_after) == ("expire", -10, 5)
    assert ("credits_expired", 10) in [(n, kw.get("amount")) for n, _, kw in received]
    assert credits.balance("alice") == 5  # expiring twice does nothing
    assert [e.kind for e in credits.history("alice")].count("expire") == 1
    assert credits.audit() == []


def test_spend_after_expiry_cannot_use_expired_credits(credits, clock):
    credits.grant("alice", 10, reason="trial", expires_at=clock.now + timedelta(minutes=5))
    credits.grant("alice", 3, reason="forever")
    clock.advance(minutes=10)
    with pytest.raises(InsufficientCredits) as info:
        credits.spend("alice", 4, reason="job")
    assert info.value.balance == 3
    credits.spend("alice", 3, reason="job")
    assert credits.balance("alice") == 0
    assert credits.audit() == []


def test_grant_in_the_past_is_refused(credits, clock):
    with pytest.raises(InvalidArgument):
        credits.grant("alice", 5, reason="x", expires_at=clock.now - timedelta(seconds=1))


def test_expire_sweeps_every_due_wallet(credits, clock):
    for user in ("alice", "bob"):
        credits.grant(user, 4, reason="trial", expires_at=clock.now + timedelta(days=1))
    credits.grant("42", 4, reason="forever")
    clock.advance(days=2)
    assert credits.expire() == 2
    t = credits.tables
    with credits.db.engine.connect() as conn:
        balances = dict(conn.execute(sa.select(t.wallets.c.user_id, t.wallets.c.balance)).all())
    assert balances == {"alice": 0, "bob": 0, "42": 4}
    assert credits.audit() == []


def test_refund_returns_credits_to_the_same_lots_once(credits, clock, received):
    credits.grant("alice", 10, reason="soon", expires_at=clock.now + timedelta(days=1))
    credits.grant("alice", 10, reason="forever")
    spend = credits.spend("alice", 15, reason="job")
    credits.spend("alice", 2, reason="other")
    assert lots_of(credits, "alice") == [(10, 0), (10, 3)]
    refund = credits.refund("alice", spend.id, reason="job failed")
    assert (refund.kind, refund.amount, refund.reverses_id) == ("refund", 15, spend.id)
    assert lots_of(credits, "alice") == [(10, 10), (10, 8)]
    assert credits.refund("alice", spend.id) == refund
    assert credits.balance("alice") == 18
    assert [n for n, _, _ in received].count("credits_refunded") == 1
    assert credits.audit() == []


def test_refund_of_credits_from_an_expired_lot_expires_them_again(credits, clock):
    credits.grant("alice", 10, reason="trial", expires_at=clock.now + timedelta(hours=1))
    spend = credits.spend("alice", 4, reason="job")
    clock.advance(hours=2)
    assert credits.balance("alice") == 0
    credits.refund("alice", spend.id)
    assert credits.balance("alice") == 0
    assert [e.kind for e in credits.history("alice")][:2] == ["expire", "refund"]
    assert credits.audit() == []


def test_only_spends_of_the_wallet_can_be_refunded(credits):
    grant = credits.grant("alice", 10, reason="welcome")
    spend = credits.spend("alice", 1, reason="job")
    with pytest.raises(NotRefundable):
        credits.refund("alice", grant.id)
    with pytest.raises(EntryNotFound):
        credits.refund("bob", spend.id)
    with pytest.raises(EntryNotFound):
        credits.refund("alice", 10**9)
    assert credits.balance("alice") == 9


def test_history_is_newest_first_and_keyset_paginated(credits):
    ids = [credits.grant("alice", i, reason=f"g{i}").id for i in range(1, 8)]
    first = credits.history("alice", limit=3)
    second = credits.history("alice", limit=3, before=first[-1].id)
    third = credits.history("alice", limit=3, before=second[-1].id)
    assert [e.id for e in first + second + third] == ids[::-1]
    assert credits.history("alice", limit=3, before=ids[0]) == []


def test_metadata_round_trips(credits):
    entry = credits.grant("alice", 1, reason="x", metadata={"order": "A-1", "n": [1, 2]})
    assert credits.history("alice")[0].metadata == {"order": "A-1", "n": [1, 2]}
    assert entry.to_dict()["metadata"] == {"order": "A-1", "n": [1, 2]}


def test_created_at_is_aware_utc_with_microseconds(credits, clock):
    clock.now = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)
    credits.grant("alice", 1, reason="x")
    assert credits.history("alice")[0].created_at == clock.now


def test_database_refuses_a_negative_balance(credits, db):
    credits.grant("alice", 1, reason="x")
    w = credits.tables.wallets
    with refused("ck_credits_wallets_balance"), db.engine.begin() as conn:
        conn.execute(sa.update(w).values(balance=-1))
    assert credits.balance("alice") == 1


def test_database_refuses_a_lot_above_its_amount_or_below_zero(credits, db):
    credits.grant("alice", 3, reason="x")
    lots = credits.tables.lots
    for bad in (-1, 4):
        with refused("ck_credits_lots_remaining"), db.engine.begin() as conn:
            conn.execute(sa.update(lots).values(remaining=bad))
    assert lots_of(credits, "alice") == [(3, 3)]


def test_database_refuses_a_zero_entry_and_a_duplicate_key(credits, db):
    grant = credits.grant("alice", 3, reason="x", idempotency_key="k")
    e = credits.tables.entries
    row = {
        "wallet_id": None,
        "balance_after": 3,
        "kind": "grant",
        "reason": "x",
        "created_at": grant.created_at,
    }
    with db.engine.connect() as conn:
        row["wallet_id"] = conn.execute(sa.select(e.c.wallet_id)).scalar_one()
    with refused("ck_credits_entries_amount"), db.engine.begin() as conn:
        conn.execute(sa.insert(e).values(amount=0, **row))
    with refused("uq_credits_entries_idempotency|UNIQUE constraint failed"), db.engine.begin() as conn:
        conn.execute(sa.insert(e).values(amount=1, idempotency_key="k", **row))


def test_audit_names_the_wallet_whose_balance_was_tampered_with(credits, db):
    credits.grant("alice", 5, reason="x")
    credits.grant("bob", 5, reason="x")
    w = credits.tables.wallets
    with db.engine.begin() as conn:
        conn.execute(sa.update(w).where(w.c.user_id == "bob").values(balance=7))
    problems = credits.audit()
    assert problems
    assert all("bob" in p for p in problems)
