"""Faults: the example app under gunicorn on PostgreSQL and MariaDB, broken on purpose at the worst
moments, made deterministic with row locks held by the test.

* A worker SIGKILLed while its spend, or its webhook's fulfilment, waits inside the transaction for a
  row lock the test holds: nothing half-written, the audit passes, Stripe's retry credits exactly once.
* A worker SIGKILLed mid-stream, while its story waits to grow its hold: the hold stays reserved (and
  the wallet usable) until it expires, then ``flask credits expire`` gives it back.
* The database connection dropped (a loopback proxy cuts it) in the middle of a spend, a webhook and a
  checkout, and the database unreachable for new requests: 503 (the webhook 503 too, so Stripe
  retries), nothing half-written; when it is back everything resumes.
* Lock wait timeouts and serialization failures (the app configured for them): 503 quickly, or
  retried; every credit still adds up.
* Stripe refusing connections, dropping them, too slow or answering 500 during checkout: a clear 502,
  the purchase row is ``error`` and can never be credited.

``CREDITS_RELIABILITY_SECONDS=N`` repeats the kill and drop scenarios (one round per 30 s of N).
"""

from __future__ import annotations

import functools
import http.client
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from _reliability import (
    COST,
    MARKS,
    SECONDS,
    WAIT,
    FakeStripe,
    Gunicorn,
    Paid,
    Reply,
    Shop,
    Streamed,
    Tally,
    TcpProxy,
    Wallet,
    app_config,
    checkout,
    deliver,
    engine_options,
    report,
    spend,
    stream_story,
    until_not_in_progress,
    via,
)
from helpers import drop_all_tables

from example_app.stories import story_chunks
from flask_credits import testing

ROUNDS = max(1, int(SECONDS // 30))
#: CREDITS_HOLD_TTL of the app under test, in seconds: the mid-stream kill waits it out.
HOLD_TTL = 3
STORY_HOLD = 10  # credits a story reserves; a story is 21 to 23 chunks of 10 words, one credit each
LOST = (OSError, http.client.HTTPException)  # the answer never came: a killed worker

pytestmark = MARKS


@dataclass
class Faults:
    """The app under gunicorn with a proxy between it and the database and another between it and
    the fake Stripe, so a test can cut either line."""

    shop: Shop
    stripe: FakeStripe
    stripe_line: TcpProxy
    db_line: TcpProxy
    server: Gunicorn
    url: str

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def backend(self) -> str:
        return self.shop.backend

    def wallet(self, credits: int, tally: Tally | None = None) -> Wallet:
        (wallet,) = self.shop.wallets(users=1, keys_per_user=1)
        self.shop.grant(wallet, credits, tally or Tally())
        return wallet

    def paid(self, wallet: Wallet, quantity: int = 1, port: int | None = None) -> tuple[Paid, dict[str, Any]]:
        """A checkout through the app, paid at Stripe: the purchase and its completion event."""
        reply = checkout(port or self.port, wallet.secret, quantity)
        assert reply.status == 200, reply.body
        session = self.stripe.pay(reply.body["id"])
        paid = Paid(wallet.name, session["id"], session["payment_intent"], 100 * quantity, 100 * quantity)
        return paid, testing.event("checkout.session.completed", session)

    def worker_behind(self, db_client_port: int) -> int:
        """The gunicorn worker whose database connection the database sees coming from this port."""
        pid = self.server.worker_with_connection(self.db_line.routes[db_client_port], self.db_line.port)
        assert pid is not None, "no worker holds that connection"
        return pid

    def assert_no_bare_500(self) -> None:
        """gunicorn answers a bare 500 when an exception escapes the app itself (e.g. its teardown)."""
        assert "Error handling request" not in self.server.output(), self.server.output()[-5000:]


@pytest.fixture(scope="module")
def faults(database_url: str) -> Iterator[Faults]:
    drop_all_tables(database_url)
    shop = Shop(database_url)
    stripe = FakeStripe()
    stripe_line = TcpProxy(stripe.port)
    db_line = TcpProxy(int(sa.make_url(database_url).port or 0))
    server = None
    try:
        shop.migrate()
        server = Gunicorn(
            app_config(
                via(database_url, db_line.port),
                # A hold whose worker died is waited out (the stories' test); a story streams at once.
                CREDITS_HOLD_TTL=HOLD_TTL,
                STORY_HOLD=STORY_HOLD,
                STORY_WORDS_PER_CREDIT=10,
                STORY_CHUNK_DELAY=0,
            ),
            stripe_api=f"http://127.0.0.1:{stripe_line.port}",
        )
        yield Faults(shop, stripe, stripe_line, db_line, server, database_url)
    finally:
        if server is not None:
            server.close()
        db_line.close()
        stripe_line.close()
        stripe.close()
        shop.close()
        drop_all_tables(database_url)


class InFlight:
    """A request running in a thread; ``result()`` is its Reply or the exception it raised."""

    def __init__(self, request: Callable[[], Reply]) -> None:
        self._outcome: Reply | BaseException | None = None

        def run() -> None:
            try:
                self._outcome = request()
            except BaseException as exc:
                self._outcome = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def done(self) -> Reply | BaseException | None:
        return self._outcome

    def result(self) -> Reply | BaseException:
        self._thread.join(WAIT)
        assert not self._thread.is_alive(), "the request did not end"
        assert self._outcome is not None
        return self._outcome


def answered(outcome: Reply | BaseException, status: int) -> Reply:
    assert isinstance(outcome, Reply), f"expected {status}, the request raised {outcome!r}"
    assert outcome.status == status, (outcome.status, outcome.body)
    return outcome


def assert_unavailable(outcome: Reply | BaseException) -> None:
    """A clear 503 that says when to come back."""
    reply = answered(outcome, 503)
    assert reply.headers.get("retry-after"), reply.headers
    assert reply.body["error"] == "temporarily_unavailable", reply.body


def interrupted(
    faults: Faults, held: tuple[str, int], send: Callable[[], Reply], cut: Callable[[int], object]
) -> Reply | BaseException:
    """Send a request that blocks inside its transaction on the row ``held`` (table, id), locked here;
    while it waits, call ``cut`` with its connection's port through the proxy; return what its client
    got, once the database has let its session go."""
    with faults.shop.holding(*held):
        request = InFlight(send)
        session, client_port = faults.shop.lock_waiter(request.done)
        cut(client_port)
        outcome = request.result()
    faults.shop.wait_gone(session)
    return outcome


def kill_worker(faults: Faults) -> Callable[[int], object]:
    """A ``cut``: SIGKILL the gunicorn worker behind that connection."""
    return lambda client_port: faults.server.kill_worker(faults.worker_behind(client_port))


def cut_database(faults: Faults) -> Callable[[int], object]:
    """A ``cut``: drop every database connection and refuse new ones (``faults.db_line.up()`` undoes)."""
    return lambda _client_port: faults.db_line.down()


# -- a worker SIGKILLed inside its transaction -----------------------------------------------------------


def test_a_worker_killed_mid_spend_leaves_all_or_nothing_and_spending_goes_on(faults):
    shop, tally, seen = faults.shop, Tally(), Counter[str]()
    wallets = []
    for _ in range(ROUNDS):
        wallet = faults.wallet(100, tally)
        wallets.append(wallet)
        outcome = interrupted(
            faults,
            ("lots", shop.lot_ids(wallet)[0]),
            lambda w=wallet: spend(faults.port, w.secret),
            kill_worker(faults),
        )
        assert isinstance(outcome, LOST), outcome
        tally.spent_unknown[wallet.name] += 1
        assert shop.audit() == []
        # The kill came while the debit waited for the lot: it either never happened or happened whole
        # (PostgreSQL's one-statement debit runs to its commit once the lock is free).
        balance = shop.balance(wallet)
        assert balance in (100, 100 - COST)
        seen["committed after the kill" if balance < 100 else "rolled back"] += 1
        assert answered(spend(faults.port, wallet.secret), 200).body["balance"] == balance - COST
        tally.spent_ok[wallet.name] += 1
    shop.check(wallets, tally)
    faults.assert_no_bare_500()
    report(f"worker killed mid-spend {faults.shop.label}", {"rounds": ROUNDS, **seen})


def test_a_worker_killed_mid_fulfilment_commits_nothing_and_the_retried_webhook_credits_once(faults):
    shop, tally = faults.shop, Tally()
    wallets = []
    for _ in range(ROUNDS):
        wallet = faults.wallet(10, tally)
        wallets.append(wallet)
        paid, event = faults.paid(wallet, quantity=2)
        before = shop.snapshot()
        # The fulfilment has recorded the event and claimed the purchase when it asks for the wallet.
        outcome = interrupted(
            faults,
            ("wallets", shop.wallet_id(wallet)),
            lambda e=event: deliver(faults.port, e),
            kill_worker(faults),
        )
        assert isinstance(outcome, LOST), outcome
        assert shop.snapshot() == before  # no event row, purchase still open, not a credit moved
        assert answered(deliver(faults.port, event), 200).body["outcome"] == "fulfilled"  # Stripe retries
        assert answered(deliver(faults.port, event), 200).body["outcome"] == "duplicate"
        assert shop.balance(wallet) == 10 + 200
        tally.paid[paid.session_id] = paid
        tally.events.add(event["id"])
    shop.check(wallets, tally)
    faults.assert_no_bare_500()
    report(f"worker killed mid-fulfilment {faults.shop.label}", {"rounds": ROUNDS})


def test_a_worker_killed_mid_run_with_an_idempotency_key_is_taken_over_or_settled_and_charged_once(faults):
    """A request with an Idempotency-Key whose worker is SIGKILLed while its spend waits for a lot:
    the key stays claimed (``running``), and its spend happened whole or not at all. Either a retry
    gets 409 until the lease (LEASE) is over, then takes the key over and runs, spending under the
    dead run's ledger key; or, after the lease, ``flask credits expire`` returns that spend and frees
    the key, and the retry is a new run. Both ways the wallet pays once for the one answered run."""
    shop, tally, seen = faults.shop, Tally(), Counter[str]()
    wallets = []
    for round_number in range(ROUNDS):
        for fate in ("taken over", "settled"):
            wallet = faults.wallet(100, tally)
            wallets.append(wallet)
            send = functools.partial(spend, faults.port, wallet.secret, key=f"killed-{round_number}")
            outcome = interrupted(faults, ("lots", shop.lot_ids(wallet)[0]), send, kill_worker(faults))
            assert isinstance(outcome, LOST), outcome
            seen["killed run had charged" if shop.balance(wallet) < 100 else "killed run had not"] += 1
            assert [row.status for row in shop.request_rows(wallet)] == ["running"]
            if fate == "settled":
                settled = shop.settle_requests()
                assert (shop.balance(wallet), shop.request_rows(wallet)) == (100, [])
                seen["credits returned by flask credits expire"] += settled["credits returned"]
            reply, in_progress = until_not_in_progress(send)
            seen[f"retries answered 409 before the lease ran out ({fate})"] += in_progress
            ran = answered(reply, 200)
            assert not ran.replayed
            replay = answered(send(), 200)
            assert (replay.replayed, replay.raw) == (True, ran.raw)
            assert ran.body["balance"] == shop.balance(wallet) == 100 - COST
            assert [row.status for row in shop.request_rows(wallet)] == ["done"]
            tally.spent_ok[wallet.name] += 1
    shop.check(wallets, tally)
    faults.assert_no_bare_500()
    report(f"worker killed mid-run with an idempotency key {faults.shop.label}", {"rounds": ROUNDS, **seen})


def story_killed_mid_stream(server: Gunicorn, shop: Shop, wallet: Wallet, seed: str) -> tuple[Streamed, int]:
    """Stream a story from a wallet of two lots while the test locks the second, so that the worker
    waits for it when the hold must grow (chunk 11), mid-stream; SIGKILL that worker there (without
    waiting for its replacement). Returns what the client got, and the dead worker's pid."""
    ports: queue.Queue[int] = queue.Queue()
    outcome: queue.Queue[Streamed] = queue.Queue()
    story = threading.Thread(
        target=lambda: outcome.put(stream_story(server.port, wallet, seed, on_connect=ports.put)), daemon=True
    )
    with shop.holding("lots", shop.lot_ids(wallet)[1]):
        story.start()
        session, _ = shop.lock_waiter(lambda: None if outcome.empty() else outcome.queue[0])
        pid = server.worker_with_connection(server.port, ports.get(timeout=WAIT))
        assert pid is not None, "no worker holds the story's connection"
        server.kill_worker(pid, wait=False)
        story.join(WAIT)
        killed = outcome.get(timeout=WAIT)
    shop.wait_gone(session)  # the dead worker's transaction, rolled back
    return killed, pid


def test_a_worker_killed_mid_stream_leaves_its_hold_reserved_until_flask_credits_expire_releases_it(faults):
    """A story streams from a wallet of two lots: its hold (10) takes the first; at chunk 11 the hold
    must grow from the second, which the test has locked, so the worker waits there, mid-stream, and
    is SIGKILLed. The client's stream breaks after its 10 chunks. Its hold stays reserved, counted out
    of the balance (no settle ran, and the dead worker's growth was rolled back), while the wallet
    keeps serving a spend and a whole story. Once ``CREDITS_HOLD_TTL`` has passed, nothing read the
    wallet, so the hold is still in the database until ``flask credits expire`` releases it
    (``expired``, held 0): the dead stream is charged nothing, every balance adds up, audit passes."""
    shop, server, tally, seen = faults.shop, faults.server, Tally(), Counter[str]()
    wallets = []
    for round_number in range(ROUNDS):
        (wallet,) = shop.wallets(users=1, keys_per_user=1)
        wallets.append(wallet)
        shop.grant(wallet, STORY_HOLD, tally)  # the first lot: the hold
        shop.grant(wallet, 100, tally)  # the second: what the hold grows from
        killed, pid = story_killed_mid_stream(server, shop, wallet, f"killed-{round_number}")
        tally.streams.append(killed)
        assert (killed.status, killed.lost, len(killed.chunks)) == (200, True, STORY_HOLD), killed

        # The hold is reserved as it was placed: the growth died with the worker.
        (hold,) = shop.rows_where("holds", wallet)
        assert (hold.status, hold.amount) == ("held", STORY_HOLD)
        assert (hold.expires_at - hold.created_at).total_seconds() == pytest.approx(HOLD_TTL, abs=0.01)
        assert shop.audit() == []

        # Meanwhile the wallet works: a spend and a whole story, from what is not held.
        answered(spend(server.port, wallet.secret), 200)
        tally.spent_ok[wallet.name] += 1
        seed = f"whole-{round_number}"
        cost = len(list(story_chunks(seed, 10)))  # one credit per chunk of 10 words
        whole = stream_story(server.port, wallet, seed)
        tally.streams.append(whole)
        assert (whole.status, whole.ended, len(whole.chunks)) == (200, True, cost), whole
        dead, done = shop.rows_where("holds", wallet)
        took = datetime.now(timezone.utc) - dead.created_at
        assert dead.status == "held", f"{dead.status} after {took}: was CREDITS_HOLD_TTL too short?"
        assert (done.status, done.settled_amount) == ("settled", cost)
        assert shop.wallet_row(wallet).held == STORY_HOLD
        assert shop.balance(wallet) == 100 - COST - cost
        assert datetime.now(timezone.utc) < dead.expires_at, f"took {took}, past CREDITS_HOLD_TTL"
        seen["slowest kill and requests, seconds"] = max(
            seen["slowest kill and requests, seconds"], round(took.total_seconds(), 2)
        )

        # Past its expiry, nobody read the wallet: the hold is still in the database, until the
        # operator's sweep gives it back.
        server.wait_replaced(pid)
        time.sleep(max(0.0, (dead.expires_at - datetime.now(timezone.utc)).total_seconds()))
        assert shop.rows_where("holds", wallet)[0].status == "held"
        result = shop.cli("credits", "expire")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "checked 0 wallets" not in result.stdout, result.stdout
        expired = shop.rows_where("holds", wallet)[0]
        assert (expired.status, expired.settled_amount, expired.entry_id) == ("expired", None, None)
        row = shop.wallet_row(wallet)
        assert (row.balance, row.held, row.debt) == (STORY_HOLD + 100 - COST - cost, 0, 0)
        seen["chunks streamed by killed workers, not charged"] += len(killed.chunks)
    shop.check(wallets, tally, cli=False)  # audit() here; flask credits audit costs CI seconds
    faults.assert_no_bare_500()
    report(f"worker killed mid-stream {faults.shop.label}", {"rounds": ROUNDS, **seen})


# -- the database connection dropped, the database unreachable ----------------------------------------


def test_connections_dropped_mid_spend_webhook_and_checkout_answer_503_and_write_nothing_half(faults):
    shop, tally, seen = faults.shop, Tally(), Counter[str]()
    wallets = []
    for _ in range(ROUNDS):
        # A spend waiting for a lot when the line is cut.
        wallet = faults.wallet(100, tally)
        wallets.append(wallet)
        outcome = interrupted(
            faults,
            ("lots", shop.lot_ids(wallet)[0]),
            lambda w=wallet: spend(faults.port, w.secret),
            cut_database(faults),
        )
        faults.db_line.up()
        assert_unavailable(outcome)
        tally.spent_unknown[wallet.name] += 1
        balance = shop.balance(wallet)
        assert balance in (100, 100 - COST)
        seen["spend committed although answered 503" if balance < 100 else "spend rolled back"] += 1

        # A webhook whose fulfilment waits for the wallet when the line is cut.
        paid, event = faults.paid(wallet)
        before = shop.snapshot()
        outcome = interrupted(
            faults,
            ("wallets", shop.wallet_id(wallet)),
            lambda e=event: deliver(faults.port, e),
            cut_database(faults),
        )
        faults.db_line.up()
        assert answered(outcome, 503).body["error"] == "temporarily_unavailable"
        assert shop.snapshot() == before
        assert answered(deliver(faults.port, event), 200).body["outcome"] == "fulfilled"
        assert answered(deliver(faults.port, event), 200).body["outcome"] == "duplicate"
        tally.paid[paid.session_id] = paid
        tally.events.add(event["id"])

        # A checkout whose database goes away while Stripe creates the session.
        faults.stripe.on_create = faults.db_line.down
        try:
            outcome = checkout(faults.port, wallet.secret, 1)
        finally:
            faults.stripe.on_create = None
            faults.db_line.up()
        assert_unavailable(outcome)
        stuck = shop.purchases_of(wallet)[-1]
        assert (stuck.status, stuck.session_id) == ("creating", None)  # never sent to the customer
        # Stripe expires the session a day later and says so: the row is closed for good.
        session_object = dict(faults.stripe.by_key[stuck.attempt_key], status="expired")
        expired = testing.event("checkout.session.expired", session_object)
        assert answered(deliver(faults.port, expired), 200).body["outcome"] == "expired"
        assert shop.purchases_of(wallet)[-1].status == "expired"
        tally.events.add(expired["id"])
        tally.unpaid_sessions.add(session_object["id"])

        assert answered(spend(faults.port, wallet.secret), 200)
        tally.spent_ok[wallet.name] += 1
    shop.check(wallets, tally)
    faults.assert_no_bare_500()
    report(f"connection dropped mid-request {faults.shop.label}", {"rounds": ROUNDS, **seen})


def test_a_spend_retried_with_its_idempotency_key_after_a_dropped_connection_is_charged_once(faults):
    """The client's side of the trade-off in docs/ledger.md: a spend cut while it waits for its lot
    answers 503 and may have committed (PostgreSQL's one-statement debit) or not (MariaDB); either way
    a retry with the same Idempotency-Key answers 200 and the wallet pays exactly once. The cut also
    kept the request from ending its lease, so the retry gets 409 until the lease (LEASE) runs out,
    then takes the key over: the view runs once in all (the 503 ran nothing), and a later retry is
    its replay."""
    shop, tally, seen = faults.shop, Tally(), Counter[str]()
    wallets = []
    for round_number in range(ROUNDS):
        wallet = faults.wallet(100, tally)
        wallets.append(wallet)
        send = functools.partial(spend, faults.port, wallet.secret, key=f"retry-{round_number}")
        outcome = interrupted(faults, ("lots", shop.lot_ids(wallet)[0]), send, cut_database(faults))
        faults.db_line.up()
        assert_unavailable(outcome)
        seen["cut spend had committed" if shop.balance(wallet) < 100 else "cut spend had not"] += 1
        reply, in_progress = until_not_in_progress(send)
        seen["retries answered 409 before the lease ran out"] += in_progress
        ran = answered(reply, 200)
        assert not ran.replayed  # the run: the cut request never ran the view
        assert ran.body["balance"] == 100 - COST
        replay = answered(send(), 200)
        assert (replay.replayed, replay.raw) == (True, ran.raw)
        assert shop.balance(wallet) == 100 - COST
        (row,) = shop.request_rows(wallet)
        assert (row.status, bytes(row.response_body)) == ("done", ran.raw)
        tally.spent_ok[wallet.name] += 1
    shop.check(wallets, tally)
    faults.assert_no_bare_500()
    report(f"idempotent retry after a dropped connection {faults.shop.label}", {"rounds": ROUNDS, **seen})


def test_an_unreachable_database_answers_503_to_everything_and_everything_resumes_after(faults):
    shop, tally = faults.shop, Tally()
    wallet = faults.wallet(100, tally)
    paid, event = faults.paid(wallet)
    before, creates = shop.snapshot(), len(faults.stripe.creates)
    faults.db_line.down()
    try:
        began = time.monotonic()
        spent = spend(faults.port, wallet.secret)
        hook = deliver(faults.port, event)
        bought = checkout(faults.port, wallet.secret, 1)
        elapsed = time.monotonic() - began
    finally:
        faults.db_line.up()
    assert_unavailable(spent)
    assert answered(hook, 503).body["error"] == "temporarily_unavailable"  # Stripe will retry
    assert_unavailable(bought)
    assert elapsed < 15
    assert len(faults.stripe.creates) == creates  # nothing reached Stripe
    assert shop.snapshot() == before

    assert answered(deliver(faults.port, event), 200).body["outcome"] == "fulfilled"
    assert answered(spend(faults.port, wallet.secret), 200).body["balance"] == 100 + 100 - COST
    assert answered(checkout(faults.port, wallet.secret, 1), 200).body["url"]
    tally.paid[paid.session_id] = paid
    tally.events.add(event["id"])
    tally.spent_ok[wallet.name] += 1
    shop.check([wallet], tally)
    faults.assert_no_bare_500()
    report(f"database unreachable {faults.shop.label}", {"answered_within_seconds": round(elapsed, 2)})


# -- lock timeouts and serialization failures ---------------------------------------------------------


def lock_timeout_options(backend: str) -> dict[str, Any]:
    if backend == "postgresql":
        return {"options": "-c lock_timeout=300"}
    return {"init_command": "SET SESSION innodb_lock_wait_timeout = 1"}


def test_lock_wait_timeouts_answer_503_quickly_and_write_nothing(faults):
    shop, tally = faults.shop, Tally()
    options = engine_options(**lock_timeout_options(faults.backend))
    server = Gunicorn(
        app_config(faults.url, SQLALCHEMY_ENGINE_OPTIONS=options),
        stripe_api=f"http://127.0.0.1:{faults.stripe.port}",
    )
    try:
        wallet = faults.wallet(100, tally)
        paid, event = faults.paid(wallet, port=server.port)
        before = shop.snapshot()
        with shop.holding("wallets", shop.wallet_id(wallet)):
            began = time.monotonic()
            requests = [
                InFlight(lambda: spend(server.port, wallet.secret)),
                InFlight(lambda: deliver(server.port, event)),
                InFlight(lambda: checkout(server.port, wallet.secret, 1)),
            ]
            spent, hook, bought = (r.result() for r in requests)
            elapsed = time.monotonic() - began
        assert_unavailable(spent)
        assert answered(hook, 503).body["error"] == "temporarily_unavailable"
        assert_unavailable(bought)
        assert elapsed < 20  # MariaDB: 1 s per attempt, and the ledger tries a lock timeout 4 times
        assert shop.snapshot() == before

        assert answered(spend(server.port, wallet.secret), 200)
        assert answered(deliver(server.port, event), 200).body["outcome"] == "fulfilled"
        assert answered(checkout(server.port, wallet.secret, 1), 200)
        log = server.output()
    finally:
        server.close()
    tally.spent_ok[wallet.name] += 1
    tally.paid[paid.session_id] = paid
    tally.events.add(event["id"])
    shop.check([wallet], tally)
    assert "Error handling request" not in log
    report(f"lock wait timeout {faults.shop.label}", {"answered_within_seconds": round(elapsed, 2)})


def test_a_deadlock_victim_is_retried_and_spends_exactly_once(faults):
    """The test and a spend lock the same two rows in opposite orders: the spend holds the wallet and
    waits for a lot the test holds, then the test asks for the wallet. The database breaks the cycle by
    aborting one of them; the test makes sure it is the spend (PostgreSQL aborts the transaction whose
    deadlock check runs first, the one that waited longest; InnoDB the one that wrote less, and the test
    writes a lot first). The ledger retries the victim, which succeeds once the test lets go."""
    shop, tally = faults.shop, Tally()
    wallet = faults.wallet(100, tally)
    events = shop.credits.tables.stripe_events
    log_before = len(faults.server.output())
    with shop.holding("lots", shop.lot_ids(wallet)[0]) as conn:
        ballast = [
            {
                "id": f"evt_ballast_{i}_{wallet.key_id}",
                "type": "ballast",
                "outcome": "ballast",
                "received_at": sa.func.now(),
            }
            for i in range(50)
        ]
        for row in ballast:
            conn.execute(sa.insert(events).values(**row))
        request = InFlight(lambda: spend(faults.port, wallet.secret))
        shop.lock_waiter(request.done)
        w = shop.credits.tables.wallets
        conn.execute(sa.select(w.c.id).where(w.c.id == shop.wallet_id(wallet)).with_for_update()).one()
    reply = answered(request.result(), 200)
    assert reply.body["balance"] == 100 - COST
    tally.spent_ok[wallet.name] += 1
    shop.check([wallet], tally, cli=False)
    log = faults.server.output()[log_before:]
    assert "credits transaction retried" in log, log[-3000:]
    faults.assert_no_bare_500()
    report(f"deadlock {faults.shop.label}", {"retried": log.count("credits transaction retried")})


def serializable_options(backend: str) -> dict[str, Any]:
    if backend == "postgresql":
        return {"options": "-c default_transaction_isolation=serializable"}
    return {"init_command": "SET SESSION TRANSACTION ISOLATION LEVEL SERIALIZABLE"}


def test_serialization_failures_are_retried_and_every_credit_adds_up(faults):
    """Every transaction SERIALIZABLE, 12 clients draining one wallet at once: the database aborts some
    transactions (PostgreSQL: could not serialize; InnoDB: deadlocks), the ledger retries them; a
    request that runs out of retries gets 503 and spent nothing. No 500, and the wallet ends exactly
    empty with one stored spend per 200."""
    shop, tally = faults.shop, Tally()
    options = engine_options(**serializable_options(faults.backend))
    server = Gunicorn(
        app_config(faults.url, SQLALCHEMY_ENGINE_OPTIONS=options),
        stripe_api=f"http://127.0.0.1:{faults.stripe.port}",
    )
    wallet = faults.wallet(300, tally)
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(12, timeout=WAIT)

    def drain() -> None:
        barrier.wait()
        for _ in range(200):
            status = spend(server.port, wallet.secret).status
            with lock:
                statuses[status] += 1
            if status == 402:
                return

    try:
        began = time.monotonic()
        threads = [threading.Thread(target=drain) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        elapsed = time.monotonic() - began
        log = server.output()
    finally:
        server.close()
    assert set(statuses) <= {200, 402, 503}, statuses
    assert statuses[402] == 12  # every client was finally refused: the wallet could not pay any more
    assert statuses[200] == 300 // COST
    tally.spent_ok[wallet.name] = statuses[200]
    shop.check([wallet], tally)
    assert shop.balance(wallet) == 0
    retried = log.count("credits transaction retried")
    if faults.backend == "postgresql":
        assert retried > 0, "no serialization failure happened: the test proved nothing"
    assert "Error handling request" not in log
    report(
        f"serializable isolation {faults.shop.label}",
        {"statuses": dict(statuses), "retried": retried, "seconds": round(elapsed, 1)},
    )


# -- Stripe failing during checkout ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        ("refused", "could not be reached"),
        ("drop", "could not be reached"),
        ("slow", "could not be reached"),
        ("error", "had a problem"),
    ],
)
def test_stripe_failing_during_checkout_is_a_clear_502_and_leaves_no_creditable_purchase(
    faults, failure, message
):
    shop = faults.shop
    tally = Tally()
    wallet = faults.wallet(10, tally)
    # The user's Stripe Customer exists (an earlier checkout made it): what fails is the session. A
    # failure creating the customer is test_customers.py's.
    shop.with_customer(wallet)
    creates = len(faults.stripe.creates)
    if failure == "refused":
        faults.stripe_line.down()
    else:
        faults.stripe.mode = failure
    try:
        began = time.monotonic()
        reply = checkout(faults.port, wallet.secret, 1)
        elapsed = time.monotonic() - began
    finally:
        faults.stripe.mode = "ok"
        faults.stripe_line.up()
    assert reply.status == 502, reply.body
    assert reply.body["error"] == "payment_provider_error"
    assert message in reply.body["message"]
    assert elapsed < 10  # CREDITS_STRIPE_TIMEOUT = 1 s, one retry
    (row,) = shop.purchases_of(wallet)
    assert (row.status, row.session_id) == ("error", None)
    attempts = faults.stripe.creates[creates:]
    if failure == "refused":
        assert attempts == []
    else:  # stripe-python retried once, with the same idempotency key
        assert attempts == [(row.attempt_key, failure)] * 2

    # Even if Stripe did create the session (too late for the app) and it got paid, it is not ours.
    if failure == "slow":
        deadline = time.monotonic() + WAIT
        while row.attempt_key not in faults.stripe.by_key and time.monotonic() < deadline:
            time.sleep(0.05)
        session = faults.stripe.pay(faults.stripe.by_key[row.attempt_key]["id"])
    else:
        session = testing.checkout_session(amount_total=100, client_reference_id=row.attempt_key)
    event = testing.event("checkout.session.completed", session)
    assert answered(deliver(faults.port, event), 200).body["outcome"] == "unknown_session"
    tally.events.add(event["id"])
    assert shop.purchases_of(wallet)[0].status == "error"

    assert answered(checkout(faults.port, wallet.secret, 1), 200).body["url"]  # Stripe is back
    shop.check([wallet], tally, cli=False)
    faults.assert_no_bare_500()
    report(f"stripe {failure} {faults.shop.label}", {"answered_within_seconds": round(elapsed, 2)})
