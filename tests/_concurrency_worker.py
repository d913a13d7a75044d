"""Child process for tests/test_concurrency.py: drains a wallet from a process of its own.

The test module starts a few of these once (``python _concurrency_worker.py``) and gives them one job
after another, one JSON line each on stdin::

    {"url": DATABASE_URL, "user": USER_ID, "amounts": [1, 2, ...], "limit": N}

For each job the worker uses its own app and engine, built here with ``helpers.make_app`` (nothing is
shared with the parent, and nothing crosses a fork: the worker is a fresh interpreter). It connects,
prints ``ready``, waits for the line ``go`` (the parent's start signal, sent to every worker at once),
then spends the amounts in turn, over and over, until the wallet refuses a 1-credit spend or ``limit``
attempts were made. It closes its connections and prints one JSON line: the spends that succeeded, the
refusals, why it stopped, and how many transactions the ledger had to retry. Any other exception ends
the process with a traceback on stderr and a non-zero status. End of input ends the worker.

A job ``{"url": DATABASE_URL, "user": USER_ID, "checkouts": N}`` instead posts N checkouts one after
another as that user (the app has a test Stripe key, and Stripe is answered by ``responses``, as in
the tests) and prints ``{"codes": [...], "stripe_calls": n}`` (n: Checkout Sessions created).

A job ``{"url": DATABASE_URL, "transfers": [[FROM_USER, TO_USER, AMOUNT, KEY_OR_NULL], ...]}`` makes
those transfers in turn (tests/test_transfers.py) and prints ``{"moved": [[entry id, amount,
replayed], ...], "refused": n}``.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import responses
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from helpers import make_app

from flask_credits import FlaskCredits, InsufficientCredits, Wallet, testing

#: Config of the worker's apps: what a checkout needs (spends need nothing).
STRIPE_CONFIG = {"STRIPE_SECRET_KEY": "sk_test_worker", "CREDITS_STRIPE_MAX_RETRIES": 0}


class Retries(logging.Handler):
    """Counts the ledger's "transaction retried" warnings (and keeps them off stderr)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "retried" in record.getMessage()


def drain(credits: FlaskCredits, user: str, amounts: list[int], limit: int) -> dict[str, Any]:
    spent: list[list[int]] = []
    refused: list[list[int]] = []
    stopped = "limit"
    for attempt in range(limit):
        amount = amounts[attempt % len(amounts)]
        try:
            entry = credits.spend(user, amount, reason="process")
        except InsufficientCredits as exc:
            refused.append([amount, exc.required, exc.balance])
            if amount == 1:
                stopped = "refused 1"
                break
        else:
            spent.append([entry.id, entry.amount, entry.balance_after])
    return {"spent": spent, "refused": refused, "stopped": stopped}


def transfers(credits: FlaskCredits, moves: list[list[Any]]) -> dict[str, Any]:
    moved: list[list[Any]] = []
    refused = 0
    for source, target, amount, key in moves:
        try:
            entry = credits.transfer(
                Wallet(source), Wallet(target), amount, reason="process", idempotency_key=key
            )
        except InsufficientCredits:
            refused += 1
        else:
            moved.append([entry.id, -entry.amount, entry.replayed])
    return {"moved": moved, "refused": refused}


def checkouts(app: Flask, user: str, count: int) -> dict[str, Any]:
    client = app.test_client()
    assert client.post(f"/_login/{user}").status_code == 200
    with responses.RequestsMock(assert_all_requests_are_fired=False) as stripe:
        testing.mock_create_session(stripe)
        started()
        codes = [client.post("/credits/checkout", json={"quantity": 1}).status_code for _ in range(count)]
        sessions = [c for c in stripe.calls if "/checkout/sessions" in c.request.url]
        return {"codes": codes, "stripe_calls": len(sessions)}


def started() -> None:
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("no start signal")


def main() -> None:
    retries = Retries()
    logging.getLogger("flask_credits").addHandler(retries)
    apps: dict[str, tuple[Flask, SQLAlchemy, FlaskCredits]] = {}
    for line in sys.stdin:
        job = json.loads(line)
        if job["url"] not in apps:
            apps[job["url"]] = make_app(job["url"], **STRIPE_CONFIG)
        app, db, credits = apps[job["url"]]
        retries.count = 0
        with app.app_context():
            credits.balance(
                job.get("user", "nobody")
            )  # connect before the start signal, so the start is not staggered
        try:
            if "checkouts" in job:
                result = checkouts(app, job["user"], job["checkouts"])
            elif "transfers" in job:
                with app.app_context():
                    started()
                    result = transfers(credits, job["transfers"])
            else:
                with app.app_context():
                    started()
                    result = drain(credits, job["user"], job["amounts"], job["limit"])
        finally:
            with app.app_context():
                db.engine.dispose()  # hold no connection while the parent checks and clears the tables
        print(json.dumps({**result, "retries": retries.count}), flush=True)


if __name__ == "__main__":
    main()
