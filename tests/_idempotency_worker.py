"""Child process for tests/test_idempotency_processes.py: one client of a paid view, sending an
Idempotency-Key from a process of its own.

The test module starts a few of these once (``python _idempotency_worker.py``) and gives them one job
after another, one JSON line each on stdin::

    {"url": DATABASE_URL, "user": USER_ID, "key": IDEMPOTENCY_KEY, "seed": SEED, "hold": false}

For each job the worker uses its own app (``helpers.make_app`` plus the paid view ``POST /persona``,
5 credits) and its own Flask test client logged in as USER_ID: nothing is shared with the parent or
with the other workers but the database. It connects, prints ``ready``, waits for the line ``go`` (the
parent's start signal, sent to every worker at once), posts ``{"seed": SEED}`` with the key and prints
one JSON line about the answer (see :func:`sent`), including how many times the view has run in this
process during the job. Then it reads commands: ``again`` posts the same request once more and prints
another such line; ``end`` closes its connections, prints ``ended`` and waits for the next job. Any
other input, or an exception, ends the process with a non-zero status. End of input ends the worker.

With ``"hold": true`` the view, once it runs, prints ``running`` and waits for the line ``finish``
before it answers: the parent collects every other worker's answer while the first run is at work.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any

from flask import Flask, g, jsonify, request
from flask.testing import FlaskClient
from flask.typing import ResponseReturnValue
from flask_sqlalchemy import SQLAlchemy
from helpers import make_app

from flask_credits import FlaskCredits, requires_credits

COST = 5


@dataclass
class Job:
    runs: int = 0
    hold: bool = False


JOB = Job()


def paid_app(url: str) -> tuple[Flask, SQLAlchemy, FlaskCredits]:
    app, db, credits = make_app(url)

    @app.post("/persona")
    @requires_credits(COST)
    def persona() -> ResponseReturnValue:
        JOB.runs += 1
        if JOB.hold:
            print("running", flush=True)
            if sys.stdin.readline().strip() != "finish":
                raise SystemExit("no finish signal")
        seed = (request.get_json(silent=True) or {}).get("seed")
        # The pid says which process ran it: a replay elsewhere must carry the runner's.
        return jsonify(seed=seed, pid=os.getpid(), balance=g.credits_spend.balance_after), 201

    return app, db, credits


def sent(client: FlaskClient, job: dict[str, Any]) -> dict[str, Any]:
    """Post the job's request; its answer as one JSON-able dict."""
    headers = {"Idempotency-Key": job["key"], "Accept": "application/json"}
    response = client.post("/persona", json={"seed": job["seed"]}, headers=headers)
    body = response.get_json(silent=True)
    return {
        "status": response.status_code,
        "body": response.get_data(as_text=True),
        "error": body.get("error") if isinstance(body, dict) else None,
        "replayed": response.headers.get("Idempotent-Replayed") == "true",
        "retry_after": response.headers.get("Retry-After"),
        "runs": JOB.runs,
    }


def main() -> None:
    apps: dict[str, tuple[Flask, SQLAlchemy, FlaskCredits]] = {}
    while line := sys.stdin.readline():
        job = json.loads(line)
        if job["url"] not in apps:
            apps[job["url"]] = paid_app(job["url"])
        app, db, credits = apps[job["url"]]
        JOB.runs, JOB.hold = 0, bool(job.get("hold"))
        client = app.test_client()
        if client.post(f"/_login/{job['user']}").status_code != 200:
            raise SystemExit("could not log in")
        with app.app_context():
            credits.balance(job["user"])  # connect before the start signal, so the start is not staggered
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("no start signal")
        print(json.dumps(sent(client, job)), flush=True)
        while (command := sys.stdin.readline().strip()) == "again":
            print(json.dumps(sent(client, job)), flush=True)
        if command != "end":
            raise SystemExit(f"unknown command {command!r}")
        with app.app_context():
            db.engine.dispose()  # hold no connection while the parent checks and clears the tables
        print("ended", flush=True)


if __name__ == "__main__":
    main()
