"""How an app listens to flask_credits: log purchases and warn when a balance runs low.

flask_credits sends its signals after the ledger change has committed, with the app as sender. A
receiver that raises is logged by the extension and cannot undo the change.
"""

from __future__ import annotations

from flask import Flask, flash, has_request_context

from flask_credits import Entry, Wallet, signals


def connect(app: Flask) -> None:
    """Listen to ``app``'s credits signals only (other apps in the process are not affected). Each
    receiver takes ``**_`` so that arguments a later flask_credits adds do not break it. They log
    to ``app.logger``, which ``flask run --debug`` prints."""
    signals.credits_spent.connect(warn_when_low, sender=app)
    signals.credits_purchased.connect(log_purchase, sender=app)
    signals.credits_insufficient.connect(log_refusal, sender=app)


def warn_when_low(app: Flask, *, wallet: Wallet, amount: int, entry: Entry, **_: object) -> None:
    threshold = app.config["LOW_BALANCE_THRESHOLD"]
    if entry.balance_after >= threshold:
        return
    app.logger.warning(
        "low balance: wallet %s has %d credits left (threshold %d)",
        _name(wallet),
        entry.balance_after,
        threshold,
    )
    if has_request_context() and wallet.key_id is None:  # a person is looking: tell them too
        flash(f"You have {entry.balance_after} credits left. Buy more before you run out.", "warning")


def log_purchase(app: Flask, *, wallet: Wallet, amount: int, entry: Entry, **_: object) -> None:
    app.logger.info(
        "purchase: wallet %s bought %d credits; balance %d", _name(wallet), amount, entry.balance_after
    )


def log_refusal(app: Flask, *, wallet: Wallet, required: int, balance: int, **_: object) -> None:
    app.logger.info("insufficient credits: wallet %s needs %d, holds %d", _name(wallet), required, balance)


def _name(wallet: Wallet) -> str:
    return f"user {wallet.user_id}" + (f" key {wallet.key_id}" if wallet.key_id else "")
