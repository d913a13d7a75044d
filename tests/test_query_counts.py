"""Exact statement counts per ledger operation, so that a regression in round trips shows without timing.

Statements are counted with SQLAlchemy's ``before_cursor_execute`` event on ``db.engine``, commits and
rollbacks with its ``commit`` / ``rollback`` events. The ``BEGIN`` a driver sends by itself (psycopg
before the first statement of a transaction, sqlite3 before the first write) is not an event and is not
counted. MariaDB/MySQL cannot ``UPDATE ... RETURNING``, so every wallet update there is followed by a
``SELECT`` of the row it changed. ``python -m bench`` prints the same counts next to the timings.

If an intended change alters a count, update the table below (and say why in the commit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from sqlalchemy import event

from flask_credits import InsufficientCredits, requires_credits, testing

#: (statements, commits, rollbacks) per operation and backend ("mysql": MariaDB/MySQL). PostgreSQL runs
#: its reads and its one-statement debit in autocommit: the "rollback" SQLAlchemy reports when the
#: connection goes back to the pool then sends nothing (psycopg has no transaction to end).
EXPECTED: dict[str, dict[str, tuple[int, int, int]]] = {
    # postgresql: WITH (debit, lot, entry, draw) in autocommit
    # sqlite: UPDATE wallet RETURNING; UPDATE the first lot RETURNING; INSERT entry; INSERT draw
    # mysql: UPDATE wallet; SELECT it; SELECT lots; UPDATE lot; INSERT entry; INSERT draw
    "spend": {"postgresql": (1, 0, 1), "sqlite": (4, 1, 0), "mysql": (6, 1, 0)},
    # SELECT the key's entry; then the spend
    "spend with a new idempotency key": {"postgresql": (2, 0, 2), "sqlite": (5, 1, 1), "mysql": (7, 1, 1)},
    # SELECT the key's entry: nothing written
    "replayed spend": {"postgresql": (1, 0, 1), "sqlite": (1, 0, 1), "mysql": (1, 0, 1)},
    # postgresql: the WITH (no row back); SELECT the wallet: cannot pay
    # elsewhere: UPDATE wallet (no row); SELECT next_expiry; SELECT balance
    "refused spend": {"postgresql": (2, 0, 2), "sqlite": (3, 1, 2), "mysql": (3, 1, 2)},
    # UPDATE wallet RETURNING; INSERT entry; INSERT lot
    "grant to an existing wallet": {"postgresql": (3, 1, 0), "sqlite": (3, 1, 0), "mysql": (4, 1, 0)},
    "balance": {"postgresql": (1, 0, 1), "sqlite": (1, 0, 1), "mysql": (1, 0, 1)},
    # INSERT the key's claim; SELECT the spend's key (new); the spend; UPDATE the claim's lease; UPDATE
    # the claim with the response. PostgreSQL runs the claim's statements in autocommit too.
    "request with a new Idempotency-Key": {"postgresql": (5, 0, 5), "sqlite": (8, 4, 1), "mysql": (10, 4, 1)},
    # INSERT the claim (duplicate key: rolled back); SELECT the stored response
    "request replayed with its Idempotency-Key": {
        "postgresql": (2, 0, 2),
        "sqlite": (2, 0, 2),
        "mysql": (2, 0, 2),
    },
    "history page": {"postgresql": (1, 0, 1), "sqlite": (1, 0, 1), "mysql": (1, 0, 1)},
    # postgresql: WITH (reserve on the wallet, lot, hold, its draw) in autocommit
    # sqlite: UPDATE wallet RETURNING; UPDATE the first lot RETURNING; INSERT hold; INSERT its draw
    # mysql: UPDATE wallet; SELECT it; SELECT lots; UPDATE lot; INSERT hold; INSERT its draw
    "hold": {"postgresql": (1, 0, 1), "sqlite": (4, 1, 0), "mysql": (6, 1, 0)},
    # postgresql: WITH (wallet, entry, hold, lot, hold draw, draw) in autocommit
    # elsewhere: SELECT the hold; SELECT the wallet's next_expiry; then one transaction: UPDATE the
    # wallet (to lock it), SELECT it, SELECT the hold, SELECT its draws, UPDATE the lot, DELETE the
    # draws, UPDATE the wallet, INSERT the entry, INSERT its draw, UPDATE the hold
    "settle below the hold": {"postgresql": (1, 0, 1), "sqlite": (12, 1, 2), "mysql": (12, 1, 2)},
    # SELECT the wallet's id; one transaction: UPDATE the wallet (changing nothing, to lock it), SELECT
    # how many unfinished checkouts it has, INSERT the purchase; then Stripe; UPDATE the purchase with
    # its session. The cap on unfinished checkouts (issue 10) is the UPDATE and the count: 3 before.
    # Since issue 11 that last UPDATE is a storage-layer write, in autocommit on PostgreSQL (a
    # "rollback", no COMMIT sent). Since issue 14 a SELECT of the user's Stripe Customer comes first
    # (created by the first checkout; a read, so one more "rollback").
    "checkout": {"postgresql": (6, 1, 3), "sqlite": (6, 2, 2), "mysql": (6, 2, 2)},
    # SELECT the purchase; UPDATE its checked_at, which changes no row (Stripe was asked less than
    # CREDITS_SUCCESS_CHECK_INTERVAL ago, so it is not asked again; autocommit on PostgreSQL since
    # issue 11); SELECT the balance
    "success page within the interval": {"postgresql": (3, 0, 3), "sqlite": (3, 1, 2), "mysql": (3, 1, 2)},
}


@dataclass
class Counter:
    statements: list[str] = field(default_factory=list)
    commits: int = 0
    rollbacks: int = 0

    def reset(self) -> None:
        self.statements.clear()
        self.commits = self.rollbacks = 0

    @property
    def counts(self) -> tuple[int, int, int]:
        return len(self.statements), self.commits, self.rollbacks


@pytest.fixture
def counter(db) -> Iterator[Counter]:
    found = Counter()

    def statement(conn, cursor, sql, parameters, context, executemany) -> None:
        found.statements.append(sql)

    def commit(conn) -> None:
        found.commits += 1

    def rollback(conn) -> None:
        found.rollbacks += 1

    engine = db.engine
    event.listen(engine, "before_cursor_execute", statement)
    event.listen(engine, "commit", commit)
    event.listen(engine, "rollback", rollback)
    yield found
    event.remove(engine, "before_cursor_execute", statement)
    event.remove(engine, "commit", commit)
    event.remove(engine, "rollback", rollback)


def expected(operation: str, backend: str) -> tuple[int, int, int]:
    return EXPECTED[operation]["mysql" if backend in ("mysql", "mariadb") else backend]


def count(counter: Counter, op: Callable[[], object], times: int = 3) -> list[tuple[int, int, int]]:
    """The counts of ``times`` calls, each on its own (every call must send the same)."""
    out = []
    for _ in range(times):
        counter.reset()
        op()
        out.append(counter.counts)
    return out


@pytest.fixture
def funded(credits) -> str:
    credits.grant("alice", 1_000, reason="test")
    credits.spend("alice", 1, reason="warm-up")  # the pool holds a used connection, caches are warm
    return "alice"


def test_spend_fast_path(credits, counter, funded, backend):
    results = count(counter, lambda: credits.spend(funded, 1, reason="test"))
    assert results == [expected("spend", backend)] * 3
    first = "WITH" if backend == "postgresql" else "UPDATE CREDITS_WALLETS"
    assert counter.statements[0].lstrip().upper().startswith(first)


def test_spend_with_a_new_idempotency_key(credits, counter, funded, backend):
    keys = iter(["k1", "k2", "k3"])
    results = count(counter, lambda: credits.spend(funded, 1, reason="test", idempotency_key=next(keys)))
    assert results == [expected("spend with a new idempotency key", backend)] * 3


def test_replayed_idempotent_spend_reads_once_and_writes_nothing(credits, counter, funded, backend):
    first = credits.spend(funded, 2, reason="test", idempotency_key="job-1")
    results = count(counter, lambda: credits.spend(funded, 2, reason="test", idempotency_key="job-1"))
    assert results == [expected("replayed spend", backend)] * 3
    assert all(s.lstrip().upper().startswith("SELECT") for s in counter.statements)
    assert credits.history(funded, limit=1)[0].id == first.id


def test_refused_spend(credits, counter, backend):
    credits.grant("bob", 1, reason="test")
    credits.spend("bob", 1, reason="test")

    def refused() -> None:
        with pytest.raises(InsufficientCredits):
            credits.spend("bob", 1, reason="test")

    assert count(counter, refused) == [expected("refused spend", backend)] * 3


def test_hold_and_settle_below_the_hold(credits, counter, funded, backend):
    holds = []
    held = count(counter, lambda: holds.append(credits.hold(funded, 10)))
    settled = count(counter, lambda: credits.settle(holds.pop().id, 4))
    assert held == [expected("hold", backend)] * 3
    assert settled == [expected("settle below the hold", backend)] * 3
    if backend == "postgresql":
        assert counter.statements[0].lstrip().upper().startswith("WITH")
    assert credits.held(funded) == 0


def test_spend_next_to_a_live_hold_costs_what_it_costs_without(credits, counter, funded, backend):
    credits.hold(funded, 10)
    results = count(counter, lambda: credits.spend(funded, 1, reason="test"))
    assert results == [expected("spend", backend)] * 3


def test_grant_to_an_existing_wallet(credits, counter, funded, backend):
    results = count(counter, lambda: credits.grant(funded, 5, reason="test"))
    assert results == [expected("grant to an existing wallet", backend)] * 3


def test_balance(credits, counter, funded, backend):
    assert count(counter, lambda: credits.balance(funded)) == [expected("balance", backend)] * 3


def test_history_page(credits, counter, funded, backend):
    for _ in range(30):
        credits.spend(funded, 1, reason="test")
    page = credits.history(funded, limit=10)
    results = count(counter, lambda: credits.history(funded, limit=10, before=page[-1].id))
    assert results == [expected("history page", backend)] * 3


def test_a_decorated_request_adds_exactly_one_spend(app, client, login, credits, counter, funded, backend):
    @app.post("/free")
    def free() -> str:
        return "ok"

    @app.post("/paid")
    @requires_credits(1)
    def paid() -> str:
        return "ok"

    login(funded)
    free_counts = count(counter, lambda: client.post("/free"))
    paid_counts = count(counter, lambda: client.post("/paid"))
    assert free_counts == [(0, 0, 0)] * 3
    assert paid_counts == [expected("spend", backend)] * 3


def test_a_request_with_an_idempotency_key_adds_its_claim_and_its_stored_response(
    app, client, login, credits, counter, funded, backend
):
    @app.post("/paid")
    @requires_credits(1)
    def paid() -> str:
        return "ok"

    login(funded)
    keys = iter(range(100))
    new = count(counter, lambda: client.post("/paid", headers={"Idempotency-Key": f"k{next(keys)}"}))
    replayed = count(counter, lambda: client.post("/paid", headers={"Idempotency-Key": "k0"}))
    assert new == [expected("request with a new Idempotency-Key", backend)] * 3
    assert replayed == [expected("request replayed with its Idempotency-Key", backend)] * 3


@pytest.fixture
def credits_config():
    return {"STRIPE_SECRET_KEY": "sk_test_counts", "CREDITS_STRIPE_MAX_RETRIES": 0}


@pytest.mark.config(CREDITS_MAX_OPEN_PURCHASES=10)
def test_a_checkout(client, login, counter, stripe, backend):
    testing.mock_create_session(stripe)
    login("alice")
    assert client.post("/credits/checkout", json={"quantity": 1}).status_code == 200  # the wallet exists
    results = count(counter, lambda: client.post("/credits/checkout", json={"quantity": 1}))
    assert results == [expected("checkout", backend)] * 3


def test_a_success_page_loaded_again_within_the_interval(app, client, login, counter, stripe, backend):
    testing.mock_create_session(stripe)
    login("alice")
    session_id = client.post("/credits/checkout", json={"quantity": 1}).json["id"]
    with app.app_context():
        open_session = testing.session_for(session_id, payment_status="unpaid", status="open")
    testing.mock_retrieve_session(stripe, open_session)
    assert client.get(f"/credits/success?session_id={session_id}").status_code == 200  # asks Stripe
    results = count(counter, lambda: client.get(f"/credits/success?session_id={session_id}"))
    assert results == [expected("success page within the interval", backend)] * 3
    assert len([c for c in stripe.calls if c.request.method == "GET"]) == 1
