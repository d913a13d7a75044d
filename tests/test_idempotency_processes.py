"""The Idempotency-Key of a paid view across real processes, on SQLite, PostgreSQL and MariaDB.

Six fresh interpreters (``_idempotency_worker.py``), each with its own app, engine and Flask test
client, send a request with one key at the same moment (a start signal written to all of them at
once). Each counts the runs of the view in its own process; the sum must be one, the ledger must hold
one spend, and every other answer must be 409, 422 or the byte-identical replay. No sleeps: a run
that must still be at work while the others answer waits for a line from the test.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from helpers import also_through_pgbouncer
from test_concurrency import Workers

pytestmark = also_through_pgbouncer

COUNT = 6
COST = 5  # of the workers' view


@pytest.fixture(scope="module")
def workers() -> Iterator[Workers]:
    pool = Workers(COUNT, script=Path(__file__).with_name("_idempotency_worker.py"))
    yield pool
    pool.close()


@contextlib.contextmanager
def started(workers: Workers, jobs: list[dict[str, Any]]) -> Iterator[list[Any]]:
    """Give worker i ``jobs[i]``, wait until every one is connected, start them together and yield
    the processes; end the jobs afterwards. On any failure the workers are killed."""
    if not workers.procs:
        workers.start()
    try:
        for proc, job in zip(workers.procs, jobs, strict=True):
            workers.send(proc, (json.dumps(job) + "\n").encode())
        for proc in workers.procs:
            workers.expect(proc, b"ready\n")
        for proc in workers.procs:
            workers.send(proc, b"go\n")
        yield workers.procs
        for proc in workers.procs:
            workers.send(proc, b"end\n")
        for proc in workers.procs:
            workers.expect(proc, b"ended\n")
    except BaseException:
        workers.close(kill=True)  # never leave a worker spending while the fixture clears the tables
        raise


def answer(workers: Workers, proc: Any) -> dict[str, Any]:
    return json.loads(workers.expect(proc))  # type: ignore[no-any-return]


def again(workers: Workers) -> list[dict[str, Any]]:
    """Every worker sends its request once more, one after the other: the first run is over."""
    found = []
    for proc in workers.procs:
        workers.send(proc, b"again\n")
        found.append(answer(workers, proc))
    return found


def jobs(url: str, seeds: list[str], *, hold: bool = False) -> list[dict[str, Any]]:
    return [{"url": url, "user": "alice", "key": "storm", "seed": seed, "hold": hold} for seed in seeds]


def seed_of(reply: dict[str, Any]) -> str:
    return json.loads(reply["body"])["seed"]  # type: ignore[no-any-return]


def in_progress(reply: dict[str, Any]) -> bool:
    """409: the first request with the key is still running; come back in a second."""
    answered = (reply["status"], reply["error"], reply["retry_after"])
    return answered == (409, "idempotency_request_in_progress", "1")


def reused(reply: dict[str, Any]) -> bool:
    """422: the key belongs to another request."""
    return (reply["status"], reply["error"]) == (422, "idempotency_key_reused")


def replay_of(reply: dict[str, Any], ran: dict[str, Any]) -> bool:
    """The stored answer of the run ``ran``, byte for byte, marked as replayed."""
    return (reply["status"], reply["replayed"], reply["body"]) == (ran["status"], True, ran["body"])


def charged_once(credits: Any, balance: int) -> None:
    """One spend of COST in the ledger, nothing refunded, the key's request stored as done."""
    entries = credits.history("alice")
    assert [(e.kind, e.amount) for e in entries if e.kind != "grant"] == [("spend", -COST)]
    assert credits.balance("alice") == balance
    t = credits.tables.requests
    with credits.db.engine.connect() as conn:
        assert conn.execute(sa.select(t.c.status)).scalars().all() == ["done"]
    assert credits.audit() == []


def test_processes_sending_one_request_with_one_key_at_once_run_the_view_once_and_charge_once(
    credits, database_url, workers
):
    credits.grant("alice", 100, reason="seed")
    with started(workers, jobs(database_url, ["same"] * COUNT)) as procs:
        first = [answer(workers, proc) for proc in procs]
        retried = again(workers)
    ran = [a for a in first if a["status"] == 201 and not a["replayed"]]
    assert len(ran) == 1, first
    assert sum(a["runs"] for a in retried) == 1  # counted in every process: one run in all
    others = [a for a in first if a is not ran[0]]
    assert all(in_progress(a) or replay_of(a, ran[0]) for a in others), others
    assert all(replay_of(a, ran[0]) for a in retried), retried
    charged_once(credits, 100 - COST)


def test_processes_sending_different_bodies_with_one_key_at_once_buy_one_run_and_one_charge(
    credits, database_url, workers
):
    """The attack of issue 10 across processes: one key, six different requests; one runs."""
    credits.grant("alice", 100, reason="seed")
    with started(workers, jobs(database_url, [f"seed-{i}" for i in range(COUNT)])) as procs:
        first = [answer(workers, proc) for proc in procs]
        retried = again(workers)
    ran = [i for i, a in enumerate(first) if a["status"] == 201 and not a["replayed"]]
    assert len(ran) == 1, first
    (winner,) = ran
    assert sum(a["runs"] for a in retried) == 1
    assert seed_of(first[winner]) == f"seed-{winner}"
    others = [a for i, a in enumerate(first) if i != winner]
    assert all(in_progress(a) or reused(a) for a in others), others
    assert replay_of(retried[winner], first[winner])
    assert all(reused(a) for i, a in enumerate(retried) if i != winner), retried
    charged_once(credits, 100 - COST)


def test_while_one_process_runs_the_view_every_other_process_gets_409_or_422_then_the_replay(
    credits, database_url, workers
):
    """The first run is held at work until every other process has its answer: the same request is
    409 (still running), another request with the key is 422; afterwards the same request is the
    replay and the other is still 422."""
    credits.grant("alice", 100, reason="seed")
    seeds = ["same"] * (COUNT // 2) + [f"other-{i}" for i in range(COUNT - COUNT // 2)]
    with started(workers, jobs(database_url, seeds, hold=True)) as procs:
        lines = [workers.expect(proc) for proc in procs]
        running = [i for i, line in enumerate(lines) if line == b"running\n"]
        assert len(running) == 1, lines
        (runner,) = running
        workers.send(procs[runner], b"finish\n")
        ran = answer(workers, procs[runner])
        retried = again(workers)
    assert (ran["status"], ran["replayed"], seed_of(ran)) == (201, False, seeds[runner])
    assert sum(a["runs"] for a in retried) == 1
    for i, line in enumerate(lines):
        if i != runner:
            during = json.loads(line)
            assert in_progress(during) if seeds[i] == seeds[runner] else reused(during), (seeds[i], during)
    for i, a in enumerate(retried):
        assert replay_of(a, ran) if seeds[i] == seeds[runner] else reused(a), (seeds[i], a)
    charged_once(credits, 100 - COST)
