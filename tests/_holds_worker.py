"""Holds placed, extended and settled from a process of its own, for tests/test_holds_concurrency.py.

``churn`` is the racers' loop, run by the test's threads and by this script's processes alike. Run as a
script (``python _holds_worker.py``), the worker takes one JSON job a line on stdin, as
``_concurrency_worker.py`` does::

    {"url": DATABASE_URL, "user": USER_ID, "rounds": N, "seed": S}

It builds its own app and engine (``helpers.make_app``), connects, prints ``ready``, waits for ``go``
(sent to every worker at once), runs ``churn`` and prints its result as one JSON line. Any other
exception ends the process with a traceback on stderr. End of input ends the worker.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from helpers import make_app

from flask_credits import FlaskCredits, HoldAlreadySettled, InsufficientCredits


def churn(
    credits: FlaskCredits, user: str, rounds: int, seed: int, ttl: float | None = None
) -> dict[str, Any]:
    """``rounds`` holds on ``user``'s wallet (lasting ``ttl`` seconds), each perhaps extended and with
    a spend beside it, then settled below, at or above what it holds (an overshoot may leave debt), at
    0, or released. Returns the entries the ledger answered with (id, amount) and what happened, for
    the caller to compare with the database."""
    entries: list[list[int]] = []
    done = {"held": 0, "refused": 0, "extended": 0, "not_extended": 0, "released": 0, "settled": 0}
    done["ended"] = 0  # extensions refused because the hold had expired meanwhile
    for r in range(rounds):
        step = seed + r
        try:
            hold = credits.hold(user, 1 + step % 5, reason="race", ttl=ttl)
        except InsufficientCredits:
            done["refused"] += 1
            continue
        done["held"] += 1
        amount = hold.amount
        if step % 3 == 0:
            try:
                amount = credits.extend_hold(hold.id, 2, ttl=ttl).amount
                done["extended"] += 1
            except InsufficientCredits:
                done["not_extended"] += 1
            except HoldAlreadySettled:
                done["ended"] += 1
        if step % 4 == 1:
            try:
                spend = credits.spend(user, 1, reason="beside a hold")
                entries.append([spend.id, spend.amount])
            except InsufficientCredits:
                pass
        how = step % 5
        if how == 0:
            credits.release(hold.id)
            done["released"] += 1
            continue
        charge = (0, amount - 1, amount, amount + 2)[how - 1]
        entry = credits.settle(hold.id, charge)
        done["settled"] += 1
        if entry is not None:
            assert not entry.replayed
            entries.append([entry.id, entry.amount])
    return {"entries": entries, **done}


def main() -> None:
    apps: dict[str, tuple[Flask, SQLAlchemy, FlaskCredits]] = {}
    for line in sys.stdin:
        job = json.loads(line)
        if job["url"] not in apps:
            apps[job["url"]] = make_app(job["url"])
        app, db, credits = apps[job["url"]]
        try:
            with app.app_context():
                credits.balance(job["user"])  # connect before the start signal
                print("ready", flush=True)
                if sys.stdin.readline().strip() != "go":
                    raise SystemExit("no start signal")
                result = churn(credits, job["user"], job["rounds"], job["seed"] + os.getpid())
        finally:
            with app.app_context():
                db.engine.dispose()  # hold no connection while the parent checks and clears the tables
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
