"""The ledger under real concurrency, on every backend: threads and processes racing on one wallet.

No mocks and no sleeps: every racer is a real thread (with its own app context, hence its own pooled
connection) or a real process (with its own app and engine), they are released together by a barrier,
and every loop is bounded and ends by itself. What is proved afterwards comes from the database: the
entries' ``balance_after`` chain, the lots, and ``audit()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest
import sqlalchemy as sa
from helpers import also_through_pgbouncer

from flask_credits import CreditsUnavailable, InsufficientCredits
from flask_credits.core.inputs import make_wallet
from flask_credits.storage.database import utcnow

#: Every race also runs through PgBouncer in transaction mode: many hosts' connections share a few
#: server connections, one transaction at a time.
pytestmark = also_through_pgbouncer

T = TypeVar("T")

WORKER = Path(__file__).with_name("_concurrency_worker.py")
#: Long enough for a slow CI machine, short enough that a hang fails instead of blocking the suite.
WAIT = 60


def racers(backend: str) -> int:
    """Threads per race: SQLite serialises writers through one file lock, so fewer there."""
    return 6 if backend == "sqlite" else 16


def race(app, count: int, body: Callable[[int], T]) -> list[T]:
    """Run ``body(0) .. body(count - 1)`` on ``count`` threads released together by a barrier; each
    thread pushes its own app context. Returns the results in order; if any thread raised, fails
    naming every exception, chained to the first one (whose traceback pytest prints)."""
    barrier = threading.Barrier(count, timeout=WAIT)
    engine = app.extensions["sqlalchemy"].engine

    def run(i: int) -> T:
        with app.app_context():
            with engine.connect() as conn:  # open the pool's connections before the start, not during
                conn.execute(sa.text("SELECT 1"))
            barrier.wait()
            return body(i)

    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(run, i) for i in range(count)]
        outcomes: list[Any] = []
        for future in futures:
            try:
                outcomes.append(future.result(timeout=WAIT))
            except Exception as exc:
                outcomes.append(exc)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    if errors:
        kinds = Counter(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}" for e in errors)
        summary = "; ".join(f"{n} x {kind}" for kind, n in kinds.items())
        raise AssertionError(f"{len(errors)} of {count} threads raised: {summary}") from errors[0]
    return outcomes


class Workers:
    """A few worker processes (``script``, by default ``_concurrency_worker.py``), started once for
    the module because a fresh interpreter takes a second to import Flask and SQLAlchemy. ``run(job)``
    gives every worker the job, waits until all are connected, starts them together and returns their
    results. On any failure the workers are killed, and the next ``run`` starts new ones."""

    def __init__(self, count: int, script: Path = WORKER) -> None:
        self.count = count
        self.script = script
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stderr: dict[int, IO[bytes]] = {}  # a file, not a pipe: a pipe nobody reads fills up

    def run(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        if not self.procs:
            self.start()
        try:
            line = (json.dumps(job) + "\n").encode()
            for proc in self.procs:
                self.send(proc, line)
            for proc in self.procs:  # the start barrier: every worker has its app and a connection
                self.expect(proc, b"ready\n")
            for proc in self.procs:
                self.send(proc, b"go\n")
            return [json.loads(self.expect(proc)) for proc in self.procs]
        except BaseException:
            self.close(kill=True)  # never leave a worker spending while the fixture clears the tables
            raise

    def start(self) -> None:
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        for _ in range(self.count):
            stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
            proc = subprocess.Popen(
                [sys.executable, str(self.script)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                bufsize=0,
                env=env,
                cwd=self.script.parent,
            )
            self.procs.append(proc)
            self.stderr[proc.pid] = stderr

    def send(self, proc: subprocess.Popen[bytes], line: bytes) -> None:
        assert proc.stdin is not None
        proc.stdin.write(line)

    def expect(self, proc: subprocess.Popen[bytes], wanted: bytes | None = None) -> bytes:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            ready = selector.select(timeout=WAIT)
        line = proc.stdout.readline() if ready else b""
        if not line.endswith(b"\n") or (wanted is not None and line != wanted):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            stderr = self.stderr[proc.pid]
            stderr.seek(0)
            raise AssertionError(
                f"worker {proc.pid} answered {line!r} (exit status {proc.returncode}):\n"
                + stderr.read().decode(errors="replace")
            )
        return line

    def close(self, *, kill: bool = False) -> None:
        for proc in self.procs:
            if kill and proc.poll() is None:
                proc.kill()
            for stream in (proc.stdin, proc.stdout, self.stderr.pop(proc.pid)):
                stream.close()  # end of input: an idle worker exits by itself
            try:
                proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []


@pytest.fixture(scope="module")
def workers() -> Iterator[Workers]:
    pool = Workers(4)
    yield pool
    pool.close()


def rows(credits, user: str, key: str | None = None) -> list[Any]:
    """The wallet's entries, oldest first, straight from the table."""
    t = credits.tables
    with credits.db.engine.connect() as conn:
        return conn.execute(
            sa.select(t.entries)
            .join(t.wallets, t.wallets.c.id == t.entries.c.wallet_id)
            .where(t.wallets.c.user_id == user, t.wallets.c.key_id == (key or ""))
            .order_by(t.entries.c.id)
        ).all()


def lots(credits, user: str) -> list[tuple[int, int]]:
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


def stored_balance(credits, user: str) -> int:
    """The wallet row's balance as stored (``credits.balance`` may first expire lots)."""
    w = credits.tables.wallets
    with credits.db.engine.connect() as conn:
        return conn.execute(sa.select(w.c.balance).where(w.c.user_id == user, w.c.key_id == "")).scalar_one()


def assert_chain(entries: list[Any]) -> None:
    """Each entry's ``balance_after`` is the previous one plus its amount, and never negative: the
    writers of the wallet were serialised and none of them read a stale balance."""
    balance = 0
    for row in entries:
        balance += row.amount
        assert row.balance_after == balance, f"entry {row.id} ({row.kind} {row.amount}) lost an update"
        assert row.balance_after >= 0, f"entry {row.id} overdrew the wallet"


def grant_stock(credits, user: str, sizes: list[int], now) -> int:
    """Grant one lot per size, with different expiries (and some never expiring); return the total."""
    for i, size in enumerate(sizes):
        expires = None if i % 3 == 2 else now + timedelta(days=1 + i)
        credits.grant(user, size, reason=f"stock {i}", expires_at=expires)
    return sum(sizes)


def drain(credits, user: str, amounts: tuple[int, ...], limit: int) -> dict[str, Any]:
    """Spend ``amounts`` in turn until the wallet refuses a 1-credit spend (which proves it held 0 at
    that moment) or ``limit`` attempts were made."""
    spent, refused, stopped = [], [], "limit"
    for attempt in range(limit):
        amount = amounts[attempt % len(amounts)]
        try:
            entry = credits.spend(user, amount, reason="race")
        except InsufficientCredits as exc:
            refused.append((amount, exc.required, exc.balance))
            if amount == 1:
                stopped = "refused 1"
                break
        else:
            spent.append((entry.id, entry.amount, entry.balance_after))
    return {"spent": spent, "refused": refused, "stopped": stopped}


def check_drained(credits, user: str, granted: int, outcomes: list[dict[str, Any]]) -> None:
    """The wallet was drained exactly: what callers were told matches the database, to the credit."""
    spent = [tuple(s) for o in outcomes for s in o["spent"]]
    assert all(o["stopped"] == "refused 1" for o in outcomes), [o["stopped"] for o in outcomes]
    assert sum(-amount for _, amount, _ in spent) == granted  # every credit spent, not one more
    assert len({entry_id for entry_id, _, _ in spent}) == len(spent)
    for amount, required, balance in (r for o in outcomes for r in o["refused"]):
        assert required == amount
        assert 0 <= balance < amount  # refused only when the wallet could not pay
    entries = rows(credits, user)
    assert_chain(entries)
    spends = [(r.id, r.amount, r.balance_after) for r in entries if r.kind == "spend"]
    assert sorted(spends) == sorted(spent)  # no entry nobody was told about, none lost
    assert stored_balance(credits, user) == 0 == credits.balance(user)
    assert all(remaining == 0 for _, remaining in lots(credits, user))
    assert credits.audit() == []


# -- 1. many threads, one wallet ----------------------------------------------------------------------


def test_threads_draining_one_wallet_never_overdraw_and_spend_exactly_what_it_held(app, credits, backend):
    count = racers(backend)
    sizes = [7, 5, 11, 3, 9, 6, 13, 4] * (1 if backend == "sqlite" else 3)
    granted = grant_stock(credits, "shared", sizes, utcnow())
    amounts = (1, 3, 1, 2, 1, 5)  # mostly single credits, some larger: lots are split across spends
    limit = 2 * granted + len(amounts)  # more 1-credit attempts than credits: a thread must be refused

    outcomes = race(
        app, count, lambda i: drain(credits, "shared", amounts[i % 2 :] + amounts[: i % 2], limit)
    )

    check_drained(credits, "shared", granted, outcomes)


# -- 2. many threads, one wallet each -----------------------------------------------------------------


def test_threads_on_separate_wallets_at_once_each_end_exact(app, credits, backend, caplog):
    count = racers(backend)
    now = utcnow()

    def own_wallet(i: int) -> tuple[int, int]:
        user = f"user-{i}"
        expected = 0
        for n in range(3):  # the first grant creates the wallet, at the same moment as the others
            expires = now + timedelta(days=n + 1)
            expected += credits.grant(user, 5 + i % 4 + n, reason="top up", expires_at=expires).amount
        first = credits.spend(user, 7, reason="job")
        expected -= 7
        result = drain(credits, user, (2, 1), 100)
        assert result["stopped"] == "refused 1"
        expected += sum(amount for _, amount, _ in result["spent"])
        refund = credits.refund(user, first.id, reason="job failed")
        expected += refund.amount
        return expected, credits.balance(user)

    results = race(app, count, own_wallet)

    assert [told for told, _ in results] == [7] * count  # drained, then the first spend came back
    for i, (expected, seen) in enumerate(results):
        user = f"user-{i}"
        assert seen == expected == stored_balance(credits, user)
        assert_chain(rows(credits, user))
        assert sum(r for _, r in lots(credits, user)) == expected
    assert credits.audit() == []
    if backend != "sqlite":  # SQLite has one writer at a time: waiting there is by design
        # Separate wallets share no row: not even one deadlock retry (InnoDB gap locks once did).
        assert "retried" not in caplog.text


# -- 3. many processes, one wallet --------------------------------------------------------------------


def test_processes_draining_one_wallet_never_overdraw_and_spend_exactly_what_it_held(
    app, credits, database_url, workers
):
    granted = grant_stock(credits, "shared", [9, 4, 12, 7, 5, 10, 8], utcnow())
    amounts = [1, 2, 1, 4, 1, 3]
    job = {"url": database_url, "user": "shared", "amounts": amounts, "limit": 2 * granted + len(amounts)}

    outcomes = workers.run(job)

    check_drained(credits, "shared", granted, outcomes)


def test_processes_checking_out_for_one_wallet_stop_exactly_at_the_cap(app, credits, database_url, workers):
    """Four processes post four checkouts each for one wallet at once: exactly
    CREDITS_MAX_OPEN_PURCHASES (5) reach Stripe and are stored, the other eleven get 429."""
    outcomes = workers.run({"url": database_url, "user": "alice", "checkouts": 4})

    assert sorted(code for o in outcomes for code in o["codes"]) == [200] * 5 + [429] * 11
    assert sum(o["stripe_calls"] for o in outcomes) == 5
    p = credits.tables.purchases
    with credits.db.engine.connect() as conn:
        assert conn.execute(sa.select(p.c.status)).scalars().all() == ["open"] * 5


# -- 4. the same idempotency key at once --------------------------------------------------------------


def test_concurrent_grants_with_one_idempotency_key_write_one_entry_and_all_get_it(app, credits, backend):
    count = racers(backend)
    # The wallet does not exist yet: the racers also race to create it.
    entries = race(
        app, count, lambda i: credits.grant("alice", 25, reason="promo", idempotency_key="promo-1")
    )

    assert len({e.id for e in entries}) == 1
    assert {(e.amount, e.balance_after, e.idempotency_key) for e in entries} == {(25, 25, "promo-1")}
    assert [(r.kind, r.amount) for r in rows(credits, "alice")] == [("grant", 25)]
    assert lots(credits, "alice") == [(25, 25)]
    assert credits.balance("alice") == 25
    assert credits.audit() == []


def test_concurrent_spends_with_one_idempotency_key_debit_once_and_all_get_the_same_entry(
    app, credits, backend
):
    count = racers(backend)
    credits.grant("alice", 100, reason="stock")
    entries = race(app, count, lambda i: credits.spend("alice", 10, reason="job", idempotency_key="job-1"))

    assert len({e.id for e in entries}) == 1
    assert {(e.amount, e.balance_after) for e in entries} == {(-10, 90)}
    assert [(r.kind, r.amount) for r in rows(credits, "alice")] == [("grant", 100), ("spend", -10)]
    assert credits.balance("alice") == 90
    assert credits.audit() == []


def test_concurrent_spends_with_one_idempotency_key_all_get_the_entry_even_when_it_took_the_last_credits(
    app, credits, backend
):
    """A retried request racing its original must be answered with the original spend, not with
    InsufficientCredits because the original already took the credits."""
    count = racers(backend)
    credits.grant("alice", 10, reason="stock")
    entries = race(app, count, lambda i: credits.spend("alice", 10, reason="job", idempotency_key="job-1"))

    assert len({e.id for e in entries}) == 1
    assert [(r.kind, r.amount) for r in rows(credits, "alice")] == [("grant", 10), ("spend", -10)]
    assert credits.balance("alice") == 0
    assert credits.audit() == []


# -- 5. the same refund at once -----------------------------------------------------------------------


def test_concurrent_refunds_of_one_spend_write_one_refund_and_restore_the_lots_once(app, credits, backend):
    count = racers(backend)
    credits.grant("alice", 30, reason="soon", expires_at=utcnow() + timedelta(days=1))
    credits.grant("alice", 70, reason="forever")
    spend = credits.spend("alice", 40, reason="job")  # all of the first lot, 10 of the second
    credits.spend("alice", 5, reason="other")
    assert lots(credits, "alice") == [(30, 0), (70, 55)]

    refunds = race(app, count, lambda i: credits.refund("alice", spend.id, reason="job failed"))

    assert len({r.id for r in refunds}) == 1
    assert {(r.kind, r.amount, r.reverses_id) for r in refunds} == {("refund", 40, spend.id)}
    assert [(r.kind, r.amount) for r in rows(credits, "alice")][-1] == ("refund", 40)
    assert [r.kind for r in rows(credits, "alice")].count("refund") == 1
    assert lots(credits, "alice") == [(30, 30), (70, 65)]
    assert credits.balance("alice") == 95
    assert_chain(rows(credits, "alice"))
    assert credits.audit() == []


# -- 6. everything at once ----------------------------------------------------------------------------


def test_concurrent_grants_spends_refunds_and_expiry_keep_balance_entries_and_lots_in_step(
    app, credits, backend, clock
):
    """Granters, spenders, refunders and a thread moving the clock past three lots' expiries, all on
    one wallet at once: afterwards every entry is one a caller was told about (or an expiry), the
    balance_after chain is unbroken, and balance = sum of entries = credits left in lots."""
    count = max(racers(backend), 8)
    start = clock.now
    # Lots expiring in 1, 2 and 3 hours hold more than the spenders can take, so some credits are
    # certainly still in them when the clock passes their expiry.
    for hours in (1, 2, 3):
        credits.grant("mix", 60, reason=f"{hours}h", expires_at=start + timedelta(hours=hours))
    credits.grant("mix", 20, reason="forever")
    premade = [credits.spend("mix", n, reason="earlier").id for n in (4, 7, 3, 6, 5, 2, 8, 9)]
    last_before = rows(credits, "mix")[-1].id
    refunders = [i for i in range(1, count) if i % 3 == 0]

    def work(i: int) -> list[Any]:
        role = "clock" if i == 0 else ("refund", "grant", "spend")[i % 3]
        told: list[Any] = []
        if role == "clock":
            for _ in range(4):  # 4 x 61 minutes: every dated lot falls due while the others work
                clock.advance(minutes=61)
                credits.balance("mix")
                credits.expire()
        elif role == "grant":
            for n in range(6):
                expires = None if n % 2 else start + timedelta(days=30 + i + n)
                told.append(credits.grant("mix", 1 + (i + n) % 5, reason="top up", expires_at=expires))
        elif role == "spend":
            for n in range(8):
                with contextlib.suppress(InsufficientCredits):
                    told.append(credits.spend("mix", 1 + (i + n) % 3, reason="job"))
        else:
            # Refund spends made before the race (each by exactly one refunder), and spends of its own.
            mine = premade[refunders.index(i) :: len(refunders)]
            for n in range(4):
                try:
                    own = credits.spend("mix", 1 + n % 3, reason="job")
                except InsufficientCredits:
                    continue
                told.append(own)
                told.append(credits.refund("mix", own.id, reason="job failed"))
            told.extend(credits.refund("mix", spend_id, reason="job failed") for spend_id in mine)
        return told

    told = [e for entries in race(app, count, work) for e in entries]

    assert clock.now == start + timedelta(minutes=4 * 61)
    credits.expire()
    entries = rows(credits, "mix")
    assert_chain(entries)
    assert all(r.balance_after >= 0 for r in entries)
    by_id = {r.id: r for r in entries}
    for entry in told:  # what each caller was told is what the ledger holds
        assert (by_id[entry.id].kind, by_id[entry.id].amount) == (entry.kind, entry.amount)
    racing = {r.id for r in entries if r.id > last_before and r.kind != "expire"}
    assert racing == {e.id for e in told}  # nothing written that no caller was told about
    kinds = [r.kind for r in entries]
    assert kinds.count("expire") >= 1
    assert kinds.count("refund") >= len(premade)
    assert {r.reverses_id for r in entries if r.kind == "refund"} >= set(premade)
    balance = credits.balance("mix")
    assert balance == sum(r.amount for r in entries) == entries[-1].balance_after
    assert balance == sum(remaining for _, remaining in lots(credits, "mix"))
    assert all(remaining == 0 for (_, remaining) in lots(credits, "mix")[:3])  # all expired now
    assert credits.audit() == []


def test_postgresql_one_statement_on_the_driver_connection_answers_like_sqlalchemy(credits, backend):
    """The one statements skip SQLAlchemy's execution layer on psycopg: their rows, errors (what the
    ledger catches: DataError 22012, IntegrityError) and the pooled connection's state after them are
    what SQLAlchemy would give."""
    if backend != "postgresql":
        pytest.skip("the one-statement debit is PostgreSQL's")
    database = credits.ledger.db
    assert database.direct
    row = database.one("SELECT %(a)s::bigint AS a, 'x' AS b", {"a": 7})
    assert (row.a, row.b) == (7, "x")
    assert database.one("SELECT 1 WHERE false", {}) is None
    with pytest.raises(sa.exc.DataError) as raised:
        database.one("SELECT 1 / 0", {})
    assert raised.value.orig.sqlstate == "22012"
    credits.grant("twice", 5, reason="first", idempotency_key="k")
    wallet_id = credits.ledger.wallet_id(make_wallet("twice"))
    taken = (
        "INSERT INTO credits_entries (wallet_id, amount, balance_after, kind, idempotency_key, created_at)"
        " VALUES (%(w)s, 1, 1, 'grant', 'k', now()) RETURNING id"
    )
    with pytest.raises(sa.exc.IntegrityError):
        database.one(taken, {"w": wallet_id})
    # Every pooled connection is back in its transaction mode, with nothing left open.
    with database.engine.connect() as conn:
        dbapi = conn.connection.driver_connection
        assert dbapi is not None
        assert not dbapi.autocommit
    assert credits.balance("twice") == 5
    assert credits.audit() == []


def test_postgresql_one_statement_whose_connection_dies_answers_unavailable_and_the_next_spend_works(
    app, db, credits, backend
):
    """The one statement on psycopg's own connection: the server ends that connection while the
    statement waits for the wallet row. The spend raises CreditsUnavailable (503), the pool drops the
    dead connection, nothing is written, and the next spend debits normally."""
    if backend != "postgresql":
        pytest.skip("the one-statement debit is PostgreSQL's")
    credits.grant("cut", 5, reason="r")
    assert credits.ledger.db.direct
    t = credits.tables
    blocker = db.engine.connect()
    try:
        with blocker.begin():
            blocker.execute(
                sa.update(t.wallets).where(t.wallets.c.user_id == "cut").values(balance=t.wallets.c.balance)
            )
            with ThreadPoolExecutor(max_workers=1) as pool:

                def spend() -> object:
                    with app.app_context():
                        return credits.spend("cut", 1, reason="cut off")

                future = pool.submit(spend)
                waiting = (
                    "SELECT pid FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND query LIKE 'WITH w AS%'"
                )
                for _ in range(WAIT * 20):
                    with db.engine.connect() as probe:
                        pid = probe.execute(sa.text(waiting)).scalar()
                        if pid is not None:
                            probe.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                            break
                    threading.Event().wait(0.05)
                else:
                    pytest.fail("the spend never waited for the wallet row")
                with pytest.raises(CreditsUnavailable):
                    future.result(timeout=WAIT)
    finally:
        blocker.close()
    assert credits.balance("cut") == 5
    assert credits.spend("cut", 1, reason="after").balance_after == 4
    assert credits.audit() == []


@pytest.mark.parametrize("watched", [True, False], ids=["through SQLAlchemy", "on the driver connection"])
def test_postgresql_one_statement_debit_that_loses_its_lot_to_a_concurrent_debit_writes_nothing_half(
    app, db, credits, backend, watched, monkeypatch
):
    """PostgreSQL debits in one statement whose parts all see the snapshot taken when it began. Here a
    concurrent debit empties the soonest lot while the statement waits for the wallet row: the lot's
    own re-check then fails, the statement's guard undoes it whole, and the debit is completed from
    the next lot the long way. Deterministic: the concurrent debit is a transaction held open here."""
    if backend != "postgresql":
        pytest.skip("the one-statement debit is PostgreSQL's")
    soon = utcnow() + timedelta(days=1)
    credits.grant("racer", 1, reason="soon", expires_at=soon)
    credits.grant("racer", 10, reason="later")
    t = credits.tables
    with db.engine.connect() as conn:
        wallet_id, soon_lot = conn.execute(
            sa.select(t.lots.c.wallet_id, t.lots.c.id).where(t.lots.c.expires_at.is_not(None))
        ).one()
    sent: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        if threading.current_thread() is not threading.main_thread():
            sent.append(statement.split(None, 1)[0].upper())

    # Watched: a cursor event listener makes the ledger send its one statement through SQLAlchemy.
    # Unwatched: on psycopg's own connection (Database._direct), whose errors must come out the same.
    database = credits.ledger.db
    direct = database._direct

    def on_the_driver(statement: str, params: dict[str, Any]) -> Any:
        try:
            row = direct(statement, params)
        except sa.exc.DataError as exc:
            sent.append(f"{statement.split(None, 1)[0]} {exc.orig.sqlstate}")
            raise
        sent.append(f"{statement.split(None, 1)[0]} {row}")
        return row

    if watched:
        sa.event.listen(db.engine, "before_cursor_execute", record)
    else:
        monkeypatch.setattr(database, "_direct", on_the_driver)
    blocker = db.engine.connect()
    try:
        with blocker.begin():
            # A debit of the soonest lot's only credit, written by hand, committed only after the
            # ledger's statement is waiting for the wallet row.
            balance = blocker.execute(
                sa.update(t.wallets)
                .where(t.wallets.c.id == wallet_id)
                .values(balance=t.wallets.c.balance - 1)
                .returning(t.wallets.c.balance)
            ).scalar_one()
            blocker.execute(sa.update(t.lots).where(t.lots.c.id == soon_lot).values(remaining=0))
            entry_id = blocker.execute(
                sa.insert(t.entries)
                .values(
                    wallet_id=wallet_id,
                    amount=-1,
                    balance_after=balance,
                    kind="spend",
                    reason="by hand",
                    created_at=utcnow(),
                )
                .returning(t.entries.c.id)
            ).scalar_one()
            blocker.execute(sa.insert(t.draws).values(entry_id=entry_id, lot_id=soon_lot, amount=-1))
            with ThreadPoolExecutor(max_workers=1) as pool:

                def spend() -> object:
                    with app.app_context():
                        return credits.spend("racer", 2, reason="racing")

                future = pool.submit(spend)
                waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                for _ in range(WAIT * 20):
                    with db.engine.connect() as probe:
                        if probe.execute(sa.text(waiting)).scalar_one():
                            break
                    threading.Event().wait(0.05)
                else:
                    pytest.fail("the spend never waited for the wallet row")
                blocker.commit()
                entry = future.result(timeout=WAIT)
    finally:
        blocker.close()
        if watched:
            sa.event.remove(db.engine, "before_cursor_execute", record)
    # The one statement ran and was undone by its guard; a fresh read found credits enough, and the
    # long way (UPDATE the wallet ...) did the debit.
    if watched:
        assert sent[0] == "WITH", sent
        assert "UPDATE" in sent[1:], sent
    else:
        # Its wallet update re-checked the soonest lot after the wait and matched nothing (or the
        # guard undid it): no row back, nothing written.
        assert sent in (["WITH None"], ["WITH 22012"]), sent
    assert (entry.amount, entry.balance_after) == (-2, 8)
    assert credits.balance("racer") == 8
    with db.engine.connect() as conn:
        draws = conn.execute(
            sa.select(t.draws.c.lot_id, t.draws.c.amount).where(t.draws.c.entry_id == entry.id)
        ).all()
    assert [tuple(row) for row in draws] == [(soon_lot + 1, -2)]
    assert credits.audit() == []
