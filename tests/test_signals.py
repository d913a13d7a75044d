"""Signals: sender is the app, sent after commit, and a failing receiver never undoes anything."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
import sqlalchemy as sa

from flask_credits import InsufficientCredits, Wallet, signals


def test_each_ledger_signal_carries_the_app_wallet_amount_and_entry(app, credits, received, clock):
    grant = credits.grant("alice", 10, reason="welcome", expires_at=clock.now + timedelta(hours=1))
    spend = credits.spend("alice", 4, reason="job")
    refund = credits.refund("alice", spend.id)
    with pytest.raises(InsufficientCredits):
        credits.spend("alice", 11, reason="job")
    clock.advance(hours=2)
    credits.balance("alice")
    alice = Wallet("alice", None)
    assert [(n, s, kw) for n, s, kw in received] == [
        ("credits_granted", app, {"wallet": alice, "amount": 10, "entry": grant}),
        ("credits_spent", app, {"wallet": alice, "amount": 4, "entry": spend}),
        ("credits_refunded", app, {"wallet": alice, "amount": 4, "entry": refund, "spend": spend}),
        ("credits_insufficient", app, {"wallet": alice, "required": 11, "balance": 10}),
        ("credits_expired", app, {"wallet": alice, "amount": 10, "entry": credits.history("alice")[0]}),
    ]


def test_signal_is_sent_after_the_commit(app, credits, db):
    seen = []

    def look_from_another_connection(sender, wallet, amount, entry):
        with db.engine.connect() as conn:
            seen.append(
                conn.execute(
                    sa.select(credits.tables.wallets.c.balance).where(
                        credits.tables.wallets.c.user_id == wallet.user_id
                    )
                ).scalar_one()
            )

    with signals.credits_granted.connected_to(look_from_another_connection, sender=app):
        credits.grant("alice", 7, reason="welcome")
    assert seen == [7]


def test_failing_receiver_is_logged_and_changes_nothing(app, credits, received, caplog):
    def broken(sender, **kwargs):
        raise ValueError("receiver bug")

    with (
        signals.credits_spent.connected_to(broken, sender=app),
        caplog.at_level(logging.ERROR, "flask_credits"),
    ):
        credits.grant("alice", 5, reason="welcome")
        entry = credits.spend("alice", 2, reason="job")
    assert entry.amount == -2
    assert credits.balance("alice") == 3
    assert "receiver bug" in caplog.text
    assert [n for n, _, _ in received].count("credits_spent") == 1  # the other receiver still ran


def test_receivers_connected_via_another_app_are_not_called(app, credits):
    from flask import Flask

    other = Flask("other")
    calls = []
    with signals.credits_granted.connected_to(lambda sender, **kw: calls.append(kw), sender=other):
        credits.grant("alice", 1, reason="x")
    assert calls == []


def test_signal_names_are_kebab_case_in_one_namespace():
    names = {getattr(signals, n).name for n in signals.__all__}
    assert names == {
        "credits-granted",
        "credits-spent",
        "credits-transferred",
        "credits-refunded",
        "credits-insufficient",
        "credits-expired",
        "credits-purchased",
        "credits-redeemed",
        "credits-revoked",
        "credits-payment-failed",
        "credits-held",
        "credits-settled",
        "credits-released",
        "credits-overdrawn",
        "plan-started",
        "plan-renewed",
        "plan-changed",
        "plan-cancelled",
        "credits-low",
        "auto-top-up-started",
        "auto-top-up-failed",
        "purchase-reconciled",
    }
