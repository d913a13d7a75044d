"""How an app listens to flask_credits: log purchases, warn when a balance runs low, and log an
automatic purchase that failed.

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
    signals.credits_low.connect(warn_when_low, sender=app)
    signals.credits_purchased.connect(log_purchase, sender=app)
    signals.credits_insufficient.connect(log_refusal, sender=app)
    signals.auto_top_up_failed.connect(log_auto_top_up_failure, sender=app)


def warn_when_low(app: Flask, *, wallet: Wallet, balance: int, threshold: int, **_: object) -> None:
    """``credits_low``: a debit took the wallet below ``CREDITS_LOW_BALANCE`` (this app sets it from
    ``LOW_BALANCE_THRESHOLD``), sent once each time the balance falls below it, not on every debit
    under it."""
    app.logger.warning(
        "low balance: wallet %s has %d credits left (threshold %d)", _name(wallet), balance, threshold
    )
    if has_request_context() and wallet.key_id is None:  # a person is looking: tell them too
        flash(f"You have {balance} credits left. Buy more before you run out.", "warning")


def log_purchase(app: Flask, *, wallet: Wallet, amount: int, entry: Entry, **_: object) -> None:
    app.logger.info(
        "purchase: wallet %s bought %d credits; balance %d", _name(wallet), amount, entry.balance_after
    )


def log_refusal(app: Flask, *, wallet: Wallet, required: int, balance: int, **_: object) -> None:
    app.logger.info("insufficient credits: wallet %s needs %d, holds %d", _name(wallet), required, balance)


def log_auto_top_up_failure(app: Flask, *, wallet: Wallet, reason: str, **_: object) -> None:
    app.logger.warning("auto top-up of wallet %s failed and is off: %s", _name(wallet), reason)


def _name(wallet: Wallet) -> str:
    return f"user {wallet.user_id}" + (f" key {wallet.key_id}" if wallet.key_id else "")
