"""Load: the example app under gunicorn (3 workers x 4 threads) on PostgreSQL and MariaDB, with many
clients spending from one hot wallet and from many others while they buy credits, and signed webhooks
(purchases, duplicates of them, refunds and disputes) arrive at the same time, in any order.

Afterwards the database must agree with what every client was told (``Shop.check``): no wallet below
zero, ``audit()`` and ``flask credits audit`` pass, every paid purchase credited exactly once and
clawed back exactly as far as its refunds and disputes say, the spends stored are exactly the ones
answered 200, and each balance is what the grants, purchases, plan allowances, spends and claw-backs
leave.

In the mixed load a few wallets also subscribe to a plan (``subscriber``, ``PlanStory``), and Stripe's
events about their subscriptions arrive shuffled, duplicated and concurrent: the checkout's
completion, the first invoice and renewals paid, an upgrade and a downgrade, failed payments,
cancellation, refunds of plan invoices, and an invoice of a subscription the app never created.
``Shop.check`` then wants each paid invoice's allowance credited exactly once, to its wallet, each
upgrade's difference granted once, nothing for the unknown subscription, and the refunds clawed back.

Three more wallets of the mixed load have a saved card and auto top-up on (``auto_top_ups``): one
that crosses its threshold every few tenths of a second, one whose monthly cap allows one pack, one
whose card the fake Stripe declines. The fake Stripe makes one off-session PaymentIntent per
Idempotency-Key and sends its ``payment_intent.*`` event, duplicated, among the others, racing the
app's handling of the call's answer. After the load, ``flask credits top-up --due`` runs once, and
``Shop.check_auto_top_ups`` wants one automatic purchase per crossing acted on (every other crossing
skipped for a reason auto top-up has: one in flight, the cap, turned off by the decline), never two
in flight, within the cap, one PaymentIntent per purchase under its row's key, credited once.

Stories streamed (``storyteller``) from wallets that spenders and grants use at the same time, read
to the end or cut off by their client after a few chunks: each is charged what the server produced,
one credit per chunk, within the bound ``Shop.check_streams`` states, and no hold is left.

A same-key storm (``Storm``) sends each Idempotency-Key from several clients at once, with the same or
different bodies: per key the view runs at most once, the charges are exactly the runs, and every
replay is the run's answer byte for byte.

By default each scenario runs for a few seconds (CI). ``CREDITS_RELIABILITY_SECONDS=N`` runs the
load for N seconds per database (``make reliability``; docs/reliability.md has the figures).
"""

from __future__ import annotations

import http.client
import queue
import random
import secrets
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pytest
from _reliability import (
    CARD,
    COST,
    DECLINED_CARD,
    HTTP_TIMEOUT,
    MARKS,
    PLANS,
    SECONDS,
    WAIT,
    FakeStripe,
    Gunicorn,
    Keyed,
    Paid,
    PaidInvoice,
    Shop,
    Streamed,
    Tally,
    TcpProxy,
    Wallet,
    app_config,
    checkout,
    deliver,
    report,
    spend,
    stream_story,
    subscribe,
    via,
)
from helpers import drop_all_tables

from flask_credits import testing

LOAD_SECONDS = SECONDS or 4.0
TWO_HOSTS_SECONDS = SECONDS or 4.0
CHAOS_SECONDS = SECONDS or 6.0
STORM_SECONDS = SECONDS or 3.0
STORIES_SECONDS = SECONDS or 2.0
#: The story's config in the streaming scenario. The pause between chunks is far longer than a
#: loopback round trip, so the server notices a client that hung up within two writes (the bound
#: ``Shop.check_streams`` checks), and a story (20 chunks) streams for about 0.2 s.
STORY_HOLD = 10
STORY_CONFIG = {"STORY_HOLD": STORY_HOLD, "STORY_WORDS_PER_CREDIT": 10, "STORY_CHUNK_DELAY": 0.01}
STORY_SEEDS = [f"story-{n}" for n in range(6)]
#: Wallets of the mixed load that subscribe to a plan (``subscriber``).
PLAN_WALLETS = 3
#: The mixed load's auto top-up wallets (``auto_top_ups``): name -> (threshold, monthly cap in packs,
#: saved card, spender threads of its own). Each starts at its threshold, so its first spend crosses
#: it. The first (which grants refill too) crosses it again every few tenths of a second: a run of a
#: few seconds buys several packs, a longer one (``make reliability``) reaches its cap; the second
#: reaches its cap with its first pack; the third's card is declined, which turns its auto top-up off
#: after one try.
AUTO_TOP_UPS = {
    "steady": (30, 100, CARD, 2),
    "capped": (30, 1, CARD, 1),
    "declined": (30, 100, DECLINED_CARD, 1),
}
#: Every answer the mixed load without faults may get.
LOAD_STATUSES = {"spend 200", "spend 402", "checkout 200", "subscribe 200", "webhook 200"}
#: Wallets (groups of 4 clients) of the same-key storm, alone and within the load with faults.
STORM_GROUPS, STORM_FAULT_GROUPS = 5, 2

pytestmark = MARKS


@dataclass
class Stack:
    shop: Shop
    stripe: FakeStripe
    url: str

    @property
    def backend(self) -> str:
        return self.shop.backend

    def server(self, database_url: str | None = None, **config: Any) -> Gunicorn:
        url = database_url or self.url
        # The buyers' few wallets stand in for thousands of customers, and a tenth of their
        # checkouts are never paid: the per-wallet cap on unfinished checkouts (test_checkout.py)
        # would refuse most of the load.
        config.setdefault("CREDITS_MAX_OPEN_PURCHASES", 10**6)
        return Gunicorn(app_config(url, **config), stripe_api=f"http://127.0.0.1:{self.stripe.port}")


@pytest.fixture(scope="module")
def stack(database_url: str) -> Iterator[Stack]:
    drop_all_tables(database_url)
    shop = Shop(database_url)
    stripe = FakeStripe()
    try:
        shop.migrate()
        yield Stack(shop, stripe, database_url)
    finally:
        stripe.close()
        shop.close()
        drop_all_tables(database_url)


# -- the clients ------------------------------------------------------------------------------------


class Hosts:
    """The app hosts the clients reach, by loopback port. Client ``n`` uses host ``n`` (modulo their
    number) while it is up, else one that is up, as a load balancer's health check would move it;
    ``picked`` counts the requests sent to each."""

    def __init__(self, *ports: int) -> None:
        self.ports, self.up = list(ports), list(ports)
        self.picked: Counter[int] = Counter()
        self._lock = threading.Lock()

    def port(self, client: int) -> int:
        with self._lock:
            home = self.ports[client % len(self.ports)]
            port = home if home in self.up else self.up[client % len(self.up)]
            self.picked[port] += 1
            return port

    def down(self, port: int) -> None:
        with self._lock:
            self.up.remove(port)


class Webhooks:
    """Stripe's side of the webhook: a few threads deliver queued events in whatever order they come,
    and deliver again (later) any event not answered 200, as Stripe retries."""

    def __init__(self, hosts: Hosts, tally: Tally, *, threads: int, faults: bool) -> None:
        self.hosts, self.tally, self.faults = hosts, tally, faults
        self.queue: queue.Queue[tuple[dict[str, Any], int] | None] = queue.Queue()
        self.pending = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def send(self, event: dict[str, Any], copies: int = 1) -> None:
        """Queue ``copies`` deliveries of one event, next to each other: they go out at the same time."""
        with self._lock:
            self.pending += copies
        for _ in range(copies):
            self.queue.put((event, 0))

    def _run(self) -> None:
        rng = random.Random()
        while (item := self.queue.get()) is not None:
            event, attempt = item
            try:
                reply = deliver(self.hosts.port(rng.randrange(1 << 16)), event)  # to any host
                status: int | str = reply.status
            except (OSError, http.client.HTTPException) as exc:  # a killed worker, an outage
                status, reply = type(exc).__name__, None
            self.tally.count("webhook", status)
            with self.tally.lock:
                self.tally.deliveries += 1
            if reply is not None and status == 200:
                with self.tally.lock:
                    self.tally.events.add(event["id"])
                    self.tally.outcomes[f"{event['type']} {reply.body['outcome']}"] += 1
            elif self.faults and attempt < 100 and (status == 503 or isinstance(status, str)):
                time.sleep(0.1)  # Stripe retries later
                self.queue.put((event, attempt + 1))
                continue
            else:
                with self.tally.lock:
                    self.tally.problems.append(f"webhook {event['id']} ({event['type']}) answered {status}")
            with self._lock:
                self.pending -= 1

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.pending == 0:
                    break
            time.sleep(0.05)
        for _ in self._threads:
            self.queue.put(None)
        for t in self._threads:
            t.join(timeout)
        if self.pending:
            self.tally.problems.append(f"{self.pending} webhook deliveries never answered 200")


class Storm:
    """The same-key storm on ``POST /api/personas``: groups of clients, one wallet per group. Each
    round the group's clients send a request with one new Idempotency-Key at the same moment (a
    barrier): all the same request, two requests two by two, or each a request of its own. When every
    answer is in, each sends its request again (the run is over: the replay, 422 for another request,
    or 402), and now and then one of its requests of an earlier round (a retry long after, which may
    take over a run whose worker was killed). The keys are named by round, so each wallet uses the
    same names: a key is per wallet. Every answer goes to ``tally.keyed``; ``Shop.check`` judges."""

    def __init__(
        self,
        port: int,
        wallets: list[Wallet],
        tally: Tally,
        deadline: float,
        *,
        clients: int = 4,
        seed: int = 0,
    ) -> None:
        self.port, self.tally, self.deadline = port, tally, deadline
        self.groups = [_StormGroup(self, w, clients, seed + i) for i, w in enumerate(wallets)]

    def start(self) -> None:
        for group in self.groups:
            for t in group.threads:
                t.start()

    def join(self, timeout: float) -> None:
        for group in self.groups:
            for t in group.threads:
                t.join(timeout)
                if t.is_alive():
                    self.tally.problems.append(f"storm client {t.name} still running")

    def send(self, wallet: Wallet, key: str, seed: str) -> None:
        try:
            reply = spend(self.port, wallet.secret, seed, key=key)
            answer = Keyed(wallet.name, key, seed, reply.status, reply.replayed, reply.error, reply.raw)
        except (OSError, http.client.HTTPException) as exc:  # a killed worker
            answer = Keyed(wallet.name, key, seed, type(exc).__name__)
        self.tally.count("storm", answer.status)
        with self.tally.lock:
            self.tally.keyed.append(answer)


class _StormGroup:
    """The clients of one wallet in the storm, and the round they are in."""

    def __init__(self, storm: Storm, wallet: Wallet, clients: int, seed: int) -> None:
        self.storm, self.wallet, self.seed, self.rng = storm, wallet, seed, random.Random(seed)
        self.round, self.seeds, self.over = 0, [""] * clients, False
        # Each round: `start` (its action picks the round's requests), a volley, `volleyed`, retries.
        wait = 2 * HTTP_TIMEOUT + WAIT
        self.start = threading.Barrier(clients, action=self._next_round, timeout=wait)
        self.volleyed = threading.Barrier(clients, timeout=wait)
        self.threads = [
            threading.Thread(target=self._client, args=(c,), name=f"storm-{wallet.key_id}-{c}", daemon=True)
            for c in range(clients)
        ]

    def _next_round(self) -> None:
        """Runs in one client while the others wait at ``start``."""
        self.round += 1
        self.over = time.monotonic() > self.storm.deadline
        mode = self.rng.choice(("same", "pairs", "each"))
        key = f"storm-{self.round}"
        self.seeds = [
            {"same": key, "pairs": f"{key}-{c % 2}", "each": f"{key}-{c}"}[mode]
            for c in range(len(self.seeds))
        ]

    def _client(self, c: int) -> None:
        rng, sent = random.Random(1000 * self.seed + c), []
        try:
            for _ in range(100_000):
                self.start.wait()
                if self.over:
                    return
                key, seed = f"storm-{self.round}", self.seeds[c]
                self.storm.send(self.wallet, key, seed)
                self.volleyed.wait()
                self.storm.send(self.wallet, key, seed)
                if sent and rng.random() < 0.25:
                    self.storm.send(self.wallet, *rng.choice(sent))
                sent.append((key, seed))
        except Exception as exc:  # a broken barrier, or a bug here: the check must fail, not hang
            with self.storm.tally.lock:
                self.storm.tally.problems.append(f"storm client {c} of {self.wallet.name}: {exc!r}")
            self.start.abort()
            self.volleyed.abort()


SPEND_OK = {200, 402}
FAULT_OK = {200, 402, 503}


def spender(
    hosts: Hosts, wallets: list[Wallet], hot: Wallet, tally: Tally, deadline: float, faults: bool, seed: int
) -> None:
    """Spend until the deadline, half the time from the hot wallet."""
    rng = random.Random(seed)
    for n in range(100_000):
        if time.monotonic() > deadline:
            break
        wallet = hot if rng.random() < 0.5 else rng.choice(wallets)
        try:
            reply = spend(hosts.port(seed), wallet.secret, seed=f"s{seed}-{n}")
            status: int | str = reply.status
        except (OSError, http.client.HTTPException) as exc:
            status, reply = type(exc).__name__, None
        tally.count("spend", status)
        with tally.lock:
            if status == 200:
                tally.spent_ok[wallet.name] += 1
                if reply is None or reply.body["cost"] != COST:
                    tally.problems.append(f"spend answered 200 with {reply and reply.body}")
            elif status == 402:
                tally.refused[wallet.name] += 1
                body = reply.body if reply else {}
                if body.get("required") != COST or body.get("balance", -1) < 0:
                    tally.problems.append(f"402 with {body}")
                elif body["balance"] >= COST:
                    # The balance in the answer is read after the refusal: a purchase may have landed
                    # in between. The check looks for the moment the wallet could not pay.
                    tally.late_402.append((wallet.name, datetime.now(timezone.utc)))
            else:
                tally.spent_unknown[wallet.name] += 1
                if not faults or (status not in FAULT_OK and not isinstance(status, str)):
                    tally.problems.append(f"spend answered {status}: {str(reply and reply.body)[:300]}")


def buyer(
    hosts: Hosts,
    stripe: FakeStripe,
    webhooks: Webhooks,
    wallets: list[Wallet],
    tally: Tally,
    deadline: float,
    faults: bool,
    seed: int,
) -> None:
    """Buy credits until the deadline; the customer pays most sessions; Stripe then sends the events:
    the completion (often twice or three times at once), and for some purchases partial then full
    refunds, or a lost dispute."""
    rng = random.Random(seed)
    for _ in range(10_000):
        if time.monotonic() > deadline:
            break
        wallet = rng.choice(wallets)
        quantity = rng.randint(1, 3)
        try:
            reply = checkout(hosts.port(seed), wallet.secret, quantity)
            status: int | str = reply.status
        except (OSError, http.client.HTTPException) as exc:
            status, reply = type(exc).__name__, None
        tally.count("checkout", status)
        if status != 200 or reply is None:
            if not faults or (status not in FAULT_OK and not isinstance(status, str)):
                with tally.lock:
                    tally.problems.append(f"checkout answered {status}: {str(reply and reply.body)[:300]}")
            continue
        session_id = reply.body["id"]
        if rng.random() < 0.1:
            continue  # the customer never pays
        session = stripe.pay(session_id)
        amount = int(session["amount_total"])
        paid = Paid(wallet.name, session_id, session["payment_intent"], 100 * quantity, amount)
        webhooks.send(testing.event("checkout.session.completed", session), copies=rng.choice((1, 2, 3)))
        fate = rng.random()
        if fate < 0.2:
            for refunded in sorted({rng.randint(1, amount), amount} if rng.random() < 0.5 else {amount}):
                refund = testing.charge(paid.payment_intent, amount=amount, amount_refunded=refunded)
                webhooks.send(testing.event("charge.refunded", refund), copies=rng.choice((1, 2)))
                paid.refunded = max(paid.refunded, refunded)
        elif fate < 0.3:
            dispute = testing.dispute(paid.payment_intent, amount=amount, status="lost")
            webhooks.send(testing.event("charge.dispute.closed", dispute), copies=rng.choice((1, 2)))
            paid.disputed = amount
        with tally.lock:
            tally.paid[session_id] = paid
        time.sleep(0.02)  # a purchase is rarer than a spend


PERIOD = 30 * 86400  # a plan's billing period, in seconds
PRICE = {"starter": 900, "pro": 2900}  # what each plan's invoice charges, in cents


#: A webhook delivery to queue: an event, and how many copies go out at once.
Delivery = tuple[dict[str, Any], int]


def subscriber(
    hosts: Hosts, stripe: FakeStripe, webhooks: Webhooks, wallets: list[Wallet], tally: Tally, seed: int
) -> None:
    """Each wallet subscribes to the Starter plan (``POST /credits/subscribe``; the fake Stripe
    answers the session), then Stripe tells the subscription's story (``PlanStory``) in events,
    shuffled, most of them delivered twice or three times at once. Plus an invoice paid for a
    subscription this app never created. The first wallet upgrades; the last one's subscription
    ends (deleted)."""
    rng = random.Random(seed)
    events: list[Delivery] = []
    for wallet in wallets:
        try:
            reply = subscribe(hosts.port(seed), wallet.secret, "starter")
            status: int | str = reply.status
        except (OSError, http.client.HTTPException) as exc:
            status, reply = type(exc).__name__, None
        tally.count("subscribe", status)
        if status != 200 or reply is None:
            with tally.lock:
                tally.problems.append(f"subscribe answered {status}: {str(reply and reply.body)[:300]}")
            continue
        story = PlanStory(wallet, stripe.sessions[reply.body["id"]], rng, tally, stripe)
        events += story.tell(upgrade=wallet is wallets[0], end=wallet is wallets[-1])
    # An invoice paid for a subscription this app never created: recorded, never credited.
    now = int(time.time())
    foreign = testing.invoice(
        subscription="sub_test_" + secrets.token_hex(8),
        price=PLANS["pro"]["price"],
        period_start=now,
        period_end=now + PERIOD,
        amount_paid=PRICE["pro"],
        billing_reason="subscription_create",
        payment_intent="pi_test_" + secrets.token_hex(12),
    )
    events.append((testing.event("invoice.paid", foreign), 2))
    with tally.lock:
        tally.foreign_invoices.add(foreign["id"])
    rng.shuffle(events)
    for event, copies in events:
        webhooks.send(event, copies)
        time.sleep(0.01)


class PlanStory:
    """Stripe's events about one subscription, as a list of deliveries (in the order Stripe lived
    them; the caller shuffles): the checkout's completion, the first invoice paid, one to three
    renewals paid (new invoices), sometimes an upgrade to Pro in a period and later a downgrade back,
    sometimes a renewal whose payment failed first (then paid, or never: then the subscription is
    deleted), sometimes the subscription deleted after its last paid renewal, and refunds of some
    paid invoices. What the credits should be goes to the tally: each paid invoice
    (``tally.invoices``) and each upgrade's difference (``tally.upgraded``).

    Refunds go out with the rest, in any order: one that overtakes its invoice's ``invoice.paid``
    makes the app ask (the fake) Stripe for the invoice, credit it, then claw back. Plan changes
    carry the plan before (``previous_attributes``) and Stripe's time: in any order, each period's
    upgrade grants its difference once, and the subscription ends on the newest change's plan."""

    def __init__(
        self, wallet: Wallet, session: dict[str, Any], rng: random.Random, tally: Tally, stripe: FakeStripe
    ) -> None:
        self.wallet, self.session, self.rng, self.tally, self.stripe = wallet, session, rng, tally, stripe
        self.meta = dict(session["metadata"])
        self.sub_id = "sub_test_" + secrets.token_hex(8)
        self.customer = "cus_test_" + secrets.token_hex(7)
        self.start = int(time.time())
        self.clock = self.start  # Stripe's time of the latest subscription event
        self.events: list[Delivery] = []

    def copies(self) -> int:
        return self.rng.choice((1, 2, 2, 3))

    def tell(self, *, upgrade: bool, end: bool) -> list[Delivery]:
        rng = self.rng
        with self.tally.lock:
            self.tally.subscriptions += 1
        completed = testing.subscription_session(
            self.session["id"],
            subscription=self.sub_id,
            client_reference_id=self.session["client_reference_id"],
            amount_total=PRICE["starter"],
            customer=self.customer,
            metadata=self.meta,
        )
        self.events.append((testing.event("checkout.session.completed", completed), self.copies()))
        plan = "starter"
        self.paid(plan, 0)
        renewals = rng.randint(1, 3)
        upgraded = set()  # the periods with an upgrade: its difference is granted once per period
        for k in range(1, renewals + 1):
            # In period k - 1: no change, one, or two (there and back): an upgrade grants the
            # difference at once, a downgrade applies from the next invoice on.
            changes = rng.choice((0, 1, 1, 2))
            if upgrade and k == 1:
                changes = max(changes, 1)
            for _ in range(changes):
                before, plan = plan, "pro" if plan == "starter" else "starter"
                self.updated(plan, k - 1, before=before)
                if plan == "pro":
                    upgraded.add(k - 1)
            fate = rng.random()
            if fate < 0.15:  # the renewal is never paid: Stripe gives up and deletes the subscription
                self.failed(plan, k)
                self.updated(plan, k, "canceled")
                break
            self.paid(plan, k, self.failed(plan, k) if fate < 0.35 else None)  # perhaps after a failure
        else:
            if end or rng.random() < 0.3:
                self.updated(plan, renewals, "canceled")
        with self.tally.lock:
            self.tally.upgraded[self.wallet.name] += len(upgraded) * (
                PLANS["pro"]["credits"] - PLANS["starter"]["credits"]
            )
            self.tally.plans[self.sub_id] = plan
        return self.events

    def period(self, k: int) -> tuple[int, int]:
        return self.start + k * PERIOD, self.start + (k + 1) * PERIOD

    def updated(self, plan: str, k: int, status: str = "active", *, before: str | None = None) -> None:
        """``customer.subscription.updated`` on plan ``plan`` in period ``k`` (``deleted`` when
        ``status`` is ``canceled``); ``before``: the plan it changed from, which Stripe puts in the
        event's ``previous_attributes``. Each event is a second newer than the last (``created``)."""
        begin, end = self.period(k)

        def on(plan: str) -> dict[str, Any]:
            return testing.subscription(
                self.sub_id,
                price=PLANS[plan]["price"],
                period_start=begin,
                period_end=end,
                status=status,
                metadata=self.meta,
                customer=self.customer,
            )

        kind = "deleted" if status == "canceled" else "updated"
        previous = None if before is None else {"items": on(before)["items"]}
        self.clock += 1
        event = testing.event(
            f"customer.subscription.{kind}", on(plan), created=self.clock, previous_attributes=previous
        )
        self.events.append((event, self.copies()))

    def paid(self, plan: str, k: int, invoice_id: str | None = None) -> None:
        """``invoice.paid`` for period ``k`` on ``plan``; sometimes refunds of it follow."""
        begin, end = self.period(k)
        intent = "pi_test_" + secrets.token_hex(12)
        invoice = testing.invoice(
            invoice_id,
            subscription=self.sub_id,
            price=PLANS[plan]["price"],
            period_start=begin,
            period_end=end,
            amount_paid=PRICE[plan],
            payment_intent=intent,
            metadata=self.meta,
            billing_reason="subscription_create" if k == 0 else "subscription_cycle",
            customer=self.customer,
        )
        inv = PaidInvoice(self.wallet.name, invoice["id"], intent, int(PLANS[plan]["credits"]), PRICE[plan])
        self.events.append((testing.event("invoice.paid", invoice), self.copies()))
        self.stripe.add_invoice(invoice, intent)  # what Stripe answers a refund that overtakes it
        if self.rng.random() < 0.3:
            full = inv.amount
            amounts = sorted({self.rng.randint(1, full), full}) if self.rng.random() < 0.5 else [full]
            for refunded in amounts:
                charge = testing.charge(intent, amount=full, amount_refunded=refunded)
                self.events.append((testing.event("charge.refunded", charge), self.copies()))
            inv.refunded = amounts[-1]
        with self.tally.lock:
            self.tally.invoices[invoice["id"]] = inv

    def failed(self, plan: str, k: int) -> str:
        """``invoice.payment_failed`` for period ``k``; returns the invoice's id."""
        begin, end = self.period(k)
        invoice = testing.invoice(
            subscription=self.sub_id,
            price=PLANS[plan]["price"],
            period_start=begin,
            period_end=end,
            amount_paid=PRICE[plan],
            status="open",
            metadata=self.meta,
            customer=self.customer,
        )
        self.events.append((testing.event("invoice.payment_failed", invoice), self.copies()))
        return str(invoice["id"])


def storyteller(port: int, wallet: Wallet, tally: Tally, deadline: float, seed: int) -> None:
    """Stream stories from one wallet, one after the other, until the deadline: the first cut off after
    0 to 3 chunks (far less than its hold), the second read to the end, then either, at random (two
    in five cut off after 0 to 12 chunks)."""
    rng = random.Random(seed)
    for n in range(100_000):
        if n > 1 and time.monotonic() > deadline:
            break
        if n < 2:
            leave = rng.randint(0, 3) if n == 0 else None
        else:
            leave = rng.randint(0, 12) if rng.random() < 0.4 else None
        seen: Streamed = stream_story(port, wallet, rng.choice(STORY_SEEDS), leave_after=leave)
        tally.count("story", seen.status)
        with tally.lock:
            tally.streams.append(seen)
            if seen.lost or seen.status not in (200, 402):
                tally.problems.append(f"story answered {seen.status} ({seen.broken}): {str(seen.body)[:300]}")
            elif seen.status == 402 and seen.body.get("required") != STORY_HOLD:
                tally.problems.append(f"story refused with {seen.body}")
        if seen.status == 402:
            time.sleep(0.01)  # pace the refusals: the grants come every 50 ms


def granter(
    shop: Shop, wallets: list[Wallet], tally: Tally, deadline: float, seed: int, pause: float = 0.05
) -> None:
    """Grant a few credits to one of the wallets every ``pause`` seconds until the deadline, the first
    after ``pause``."""
    rng = random.Random(seed)
    while time.monotonic() + pause < deadline:
        time.sleep(pause)
        shop.grant(rng.choice(wallets), rng.randint(5, 40), tally)


def run_stories(stack: Stack, port: int, seconds: float) -> tuple[list[Wallet], Tally, float]:
    """Four storytellers, each on a wallet of its own, and on the same four wallets four spenders
    (half of their spends from the first) and a granter, for ``seconds``."""
    shop, tally = stack.shop, Tally()
    wallets = shop.wallets(users=1, keys_per_user=4)
    for w in wallets:
        shop.grant(w, 60, tally)
    begin = time.monotonic()
    deadline = begin + seconds
    threads = [
        threading.Thread(target=storyteller, args=(port, w, tally, deadline, 300 + i))
        for i, w in enumerate(wallets)
    ]
    threads += [
        threading.Thread(
            target=spender, args=(Hosts(port), wallets, wallets[0], tally, deadline, False, 400 + i)
        )
        for i in range(4)
    ]
    threads.append(threading.Thread(target=granter, args=(shop, wallets, tally, deadline, 500)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    return wallets, tally, time.monotonic() - begin


def watch_in_flight(shop: Shop, wallets: list[Wallet], tally: Tally, deadline: float) -> None:
    """Until the deadline, every 20 ms: how many automatic purchases each auto top-up wallet has in
    flight, read in one statement; the most seen goes to the tally (``Shop.check_auto_top_ups`` wants
    at most one)."""
    while time.monotonic() < deadline:
        seen = shop.in_flight(wallets)
        with tally.lock:
            for name, n in seen.items():
                tally.in_flight_seen[name] = max(tally.in_flight_seen[name], n)
        time.sleep(0.02)


def auto_top_ups(stack: Stack, webhooks: Webhooks, tally: Tally) -> list[Wallet]:
    """Three wallets with auto top-up on (``AUTO_TOP_UPS``: the threshold, the cap in packs, the card),
    at their thresholds, each of a user of its own with a Stripe Customer; the fake Stripe's events about the
    PaymentIntents it makes go out through ``webhooks``, most of them two or three times at once."""
    shop, rng = stack.shop, random.Random(600)
    wallets = [w for _ in AUTO_TOP_UPS for w in shop.wallets(users=1, keys_per_user=1)]
    for w, (threshold, packs, card, _) in zip(wallets, AUTO_TOP_UPS.values(), strict=True):
        shop.grant(w, threshold, tally)
        shop.auto_top_up(w, tally, threshold=threshold, packs_a_month=packs, card=card)

    def on_intent(kind: str, intent: dict[str, Any]) -> None:
        webhooks.send(testing.event(kind, intent), copies=rng.choice((1, 2, 2, 3)))

    stack.stripe.on_intent = on_intent
    return wallets


def run_load(
    stack: Stack,
    port: int | Hosts,
    seconds: float,
    *,
    faults: bool = False,
    chaos: Any = None,
    storm: int = 0,
    plans: int = 0,
    auto: bool = False,
    tally: Tally | None = None,
) -> tuple[list[Wallet], Tally, float]:
    """Many spenders and a few buyers for ``seconds``, spread over the ``Hosts`` if given, webhooks
    delivered meanwhile, ``plans`` of the wallets subscribing to a plan (``subscriber``: renewals,
    plan changes, failed payments, cancellations and refunds), and a same-key storm on ``storm``
    wallets of its own (on the first host); with ``auto``, wallets with auto top-up on
    (``auto_top_ups``) that spenders of their own drain and a granter refills, while
    ``watch_in_flight`` counts their automatic purchases in flight;
    ``chaos(deadline)`` runs in a thread of its own when given. Returns the wallets, the tally and the
    elapsed time."""
    shop, tally = stack.shop, tally if tally is not None else Tally()
    hosts = port if isinstance(port, Hosts) else Hosts(port)
    wallets = shop.wallets(users=4, keys_per_user=2)
    hot = wallets[0]
    for w in wallets:
        shop.grant(w, 50 if w is hot else 100, tally)  # the hot one runs dry at once
    storm_wallets = shop.wallets(users=1, keys_per_user=storm) if storm else []
    for w in storm_wallets:
        shop.grant(w, 100_000, tally)
    webhooks = Webhooks(hosts, tally, threads=3, faults=faults)
    topped = auto_top_ups(stack, webhooks, tally) if auto else []
    begin = time.monotonic()
    deadline = begin + seconds
    threads = [
        threading.Thread(target=spender, args=(hosts, wallets, hot, tally, deadline, faults, i))
        for i in range(8)
    ]
    if topped:  # each its own spenders
        threads += [
            threading.Thread(target=spender, args=(hosts, [w], w, tally, deadline, faults, 600 + 10 * i + n))
            for i, (w, (*_, spenders)) in enumerate(zip(topped, AUTO_TOP_UPS.values(), strict=True))
            for n in range(spenders)
        ]
        # Grants for the first only (the others' first spend must cross), and slow: auto top-up, not
        # the grants, keeps it above its threshold.
        threads.append(threading.Thread(target=granter, args=(shop, topped[:1], tally, deadline, 700, 0.5)))
        threads.append(threading.Thread(target=watch_in_flight, args=(shop, topped, tally, deadline)))
    threads += [
        threading.Thread(
            target=buyer, args=(hosts, stack.stripe, webhooks, wallets, tally, deadline, faults, 100 + i)
        )
        for i in range(2)
    ]
    if plans:
        subscribing = wallets[1 : 1 + plans]  # not the hot one: it must run dry
        threads.append(
            threading.Thread(target=subscriber, args=(hosts, stack.stripe, webhooks, subscribing, tally, 200))
        )
    if chaos is not None:
        threads.append(threading.Thread(target=chaos, args=(deadline,)))
    storming = Storm(hosts.ports[0], storm_wallets, tally, deadline)
    storming.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    storming.join(120)
    if topped:  # the automatic purchases the last spends started: their Stripe calls end
        settled = time.monotonic() + WAIT
        while shop.in_flight(topped) and time.monotonic() < settled:
            time.sleep(0.05)
        stack.stripe.on_intent = None
    webhooks.drain(120)
    elapsed = time.monotonic() - begin
    paid = set(tally.paid)
    keys = {w.key_id for w in wallets}
    tally.unpaid_sessions = {
        sid for sid, s in list(stack.stripe.sessions.items()) if s["metadata"].get("keyId") in keys
    } - paid
    if tally.refused[hot.name] == 0:
        tally.problems.append("the hot wallet was never refused: the load did not drain it")
    return wallets + storm_wallets + topped, tally, elapsed


def figures(tally: Tally, stored: dict[str, Any], elapsed: float) -> dict[str, Any]:
    requests = sum(tally.statuses.values())
    return {
        "seconds": round(elapsed, 1),
        "requests": requests,
        "requests_per_second": round(requests / elapsed),
        "statuses": dict(sorted(tally.statuses.items())),
        "spends_ok": sum(tally.spent_ok.values()),
        "spends_refused": sum(tally.refused.values()),
        "spends_unknown": sum(tally.spent_unknown.values()),
        "purchases_paid": len(tally.paid),
        "refunded": sum(1 for p in tally.paid.values() if p.refunded),
        "disputed": sum(1 for p in tally.paid.values() if p.disputed),
        "subscriptions": tally.subscriptions,
        "plan_invoices_paid": len(tally.invoices),
        "plan_invoices_refunded": sum(1 for i in tally.invoices.values() if i.refunded),
        "upgrade_credits": sum(tally.upgraded.values()),
        "distinct_events": len(tally.events),
        "deliveries": tally.deliveries,
        "outcomes": dict(sorted(tally.outcomes.items())),
        "db": stored,
    }


def assert_plans_ran(tally: Tally) -> None:
    """The plan events the load promises were delivered (``Shop.check`` judged their credits)."""
    assert tally.subscriptions == PLAN_WALLETS, tally.statuses
    assert len(tally.invoices) > tally.subscriptions  # renewals too
    assert sum(tally.upgraded.values()) > 0
    kinds = {outcome.split()[0] for outcome in tally.outcomes}
    assert kinds >= {
        "checkout.session.completed",
        "invoice.paid",
        "invoice.payment_failed",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "charge.refunded",
    }, tally.outcomes
    assert tally.outcomes["invoice.paid unknown_subscription"] > 0, tally.outcomes


def assert_top_ups_ran(stored: dict[str, Any], tally: Tally) -> None:
    """What the auto top-up wallets promise happened (``Shop.check_auto_top_ups`` judged it), however
    slow the run (each of "capped" and "declined" crosses its threshold with its first spend): the
    small cap reached with a pack bought and paid, the declined card tried once, and Stripe's event
    about each paid PaymentIntent delivered and finding its purchase, to credit or already credited
    by the call's answer (its copies: duplicates)."""
    fulfilled = stored["automatic_statuses"].get("fulfilled", 0)
    assert fulfilled >= 1, stored
    assert stored["automatic_statuses"].get("failed") == 1, stored
    assert stored["cap_reached"] >= 1, stored
    assert stored["payment_intents"] == stored["automatic_purchases"], stored
    found = sum(tally.outcomes[f"payment_intent.succeeded {o}"] for o in ("fulfilled", "already_fulfilled"))
    assert found == fulfilled, tally.outcomes


# -- the tests --------------------------------------------------------------------------------------


def test_many_clients_spending_buying_and_webhooks_at_once_leave_every_credit_exact(stack):
    server = stack.server()
    try:
        wallets, tally, elapsed = run_load(stack, server.port, LOAD_SECONDS, plans=PLAN_WALLETS, auto=True)
    finally:
        server.close()
    stack.shop.top_up_due(stack.stripe, tally)
    stored = stack.shop.check(wallets, tally)
    assert stored["creating"] == 0  # no checkout left half-done
    assert set(tally.statuses) <= LOAD_STATUSES, tally.statuses
    assert sum(tally.spent_ok.values()) > 0
    assert len(tally.paid) > 0
    assert tally.deliveries > len(tally.events)  # duplicates were delivered
    assert_plans_ran(tally)
    assert_top_ups_ran(stored, tally)
    report(f"load {stack.shop.label}", figures(tally, stored, elapsed))


def test_the_same_load_through_pgbouncer_in_transaction_mode_leaves_every_credit_exact(
    stack, through_pgbouncer
):
    """Every worker's connections through PgBouncer (pool_mode = transaction, 4 server connections):
    each transaction may run on another server connection, as with many app hosts behind a pooler."""
    if stack.backend != "postgresql":
        pytest.skip("PgBouncer pools PostgreSQL connections")
    server = stack.server(through_pgbouncer, CREDITS_DATABASE_POOLER="transaction")
    try:
        wallets, tally, elapsed = run_load(stack, server.port, LOAD_SECONDS, plans=PLAN_WALLETS, auto=True)
    finally:
        server.close()
    stack.shop.top_up_due(stack.stripe, tally)
    stored = stack.shop.check(wallets, tally)
    assert stored["creating"] == 0
    assert set(tally.statuses) <= LOAD_STATUSES, tally.statuses
    assert sum(tally.spent_ok.values()) > 0
    assert len(tally.paid) > 0
    assert_plans_ran(tally)
    assert_top_ups_ran(stored, tally)
    report(f"load {stack.shop.label} through PgBouncer", figures(tally, stored, elapsed))


def test_two_hosts_behind_pgbouncer_share_the_load_and_losing_one_loses_nothing(stack, through_pgbouncer):
    """Two app hosts (two gunicorn masters on their own ports, the same SECRET_KEY) on one database
    through PgBouncer in transaction mode: spenders and buyers spread over both, and Stripe delivers
    each event and its duplicates to either. Halfway, one host dies: its master and workers are
    SIGKILLed at once. Its clients move to the survivor; the answers lost with it count as "unknown",
    as in the load with faults, and webhooks not answered are delivered again, to the survivor."""
    if stack.backend != "postgresql":
        pytest.skip("PgBouncer pools PostgreSQL connections")
    servers: list[Gunicorn] = []
    tally = Tally()
    at_kill: dict[str, Any] = {}

    def chaos(deadline: float) -> None:
        time.sleep(max(0.0, deadline - TWO_HOSTS_SECONDS / 2 - time.monotonic()))
        dead = servers[1]
        with tally.lock:
            at_kill["spends_ok"] = sum(tally.spent_ok.values())
        at_kill["picked"] = [hosts.picked[s.port] for s in servers]
        hosts.down(dead.port)  # the load balancer takes it out as it dies
        dead.kill()

    try:
        for _ in range(2):
            servers.append(stack.server(through_pgbouncer, CREDITS_DATABASE_POOLER="transaction"))
        hosts = Hosts(*(s.port for s in servers))
        wallets, _, elapsed = run_load(
            stack, hosts, TWO_HOSTS_SECONDS, faults=True, chaos=chaos, tally=tally, plans=PLAN_WALLETS
        )
    finally:
        for server in servers:
            server.close()
    stored = stack.shop.check(wallets, tally)
    assert servers[1].proc.returncode == -signal.SIGKILL
    assert min(at_kill["picked"]) > 0, at_kill  # both hosts took requests before the kill
    assert sum(tally.spent_ok.values()) > at_kill["spends_ok"], at_kill  # the survivor kept serving
    assert not any(status.endswith(" 500") for status in tally.statuses), tally.statuses
    assert len(tally.paid) > 0
    assert tally.deliveries > len(tally.events)  # duplicates were delivered
    report(
        f"two hosts through PgBouncer, one killed, {stack.shop.label}",
        {
            **figures(tally, stored, elapsed),
            "requests_per_host_before_kill": at_kill["picked"],
            "requests_per_host": [hosts.picked[s.port] for s in servers],
        },
    )


def test_one_event_delivered_fifty_times_at_once_credits_once(stack):
    shop = stack.shop
    tally = Tally()
    (wallet,) = shop.wallets(users=1, keys_per_user=1)
    server = stack.server()
    try:
        reply = checkout(server.port, wallet.secret, 2)
        assert reply.status == 200, reply.body
        session = stack.stripe.pay(reply.body["id"])
        event = testing.event("checkout.session.completed", session)
        barrier = threading.Barrier(50, timeout=30)
        answers: list[Any] = []

        def post() -> None:
            barrier.wait()
            try:
                answers.append(deliver(server.port, event))
            except OSError as exc:
                answers.append(exc)

        threads = [threading.Thread(target=post) for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        server.close()
    outcomes = Counter(
        a.body["outcome"] if not isinstance(a, Exception) and a.status == 200 else repr(a) for a in answers
    )
    assert outcomes["fulfilled"] == 1, outcomes
    assert outcomes["fulfilled"] + outcomes["duplicate"] + outcomes["already_fulfilled"] == 50, outcomes
    assert shop.balance(wallet) == 200
    tally.paid[session["id"]] = Paid(wallet.name, session["id"], session["payment_intent"], 200, 200)
    tally.events.add(event["id"])
    shop.check([wallet], tally, cli=False)
    report(f"duplicate storm {stack.shop.label}", {"deliveries": 50, "outcomes": dict(outcomes)})


def test_a_same_key_storm_runs_the_view_once_per_key_and_charges_exactly_the_runs(stack):
    """Groups of clients send one Idempotency-Key at the same moment, with the same or different
    bodies, then again once the run is over (``Storm``): each key's view runs at most once, the
    charges are exactly the runs (200 without ``Idempotent-Replayed``), every replay is the run's
    answer byte for byte, everything else is 409, 422, or 402 once the small wallet ran dry."""
    shop, tally = stack.shop, Tally()
    wallets = shop.wallets(users=1, keys_per_user=STORM_GROUPS)
    for i, w in enumerate(wallets):
        shop.grant(w, 2 * COST if i == 0 else 1_000_000, tally)  # the first runs dry: 402s too
    # A lease no request here can outlive: two runs of one key would be a bug, not a takeover.
    server = stack.server(CREDITS_IDEMPOTENCY_LOCK_TIMEOUT=2 * HTTP_TIMEOUT + WAIT)
    began = time.monotonic()
    try:
        storm = Storm(server.port, wallets, tally, began + STORM_SECONDS)
        storm.start()
        storm.join(STORM_SECONDS + 120)
        elapsed = time.monotonic() - began
    finally:
        server.close()
    stored = shop.check(wallets, tally, cli=False)
    assert set(tally.statuses) <= {"storm 200", "storm 402", "storm 409", "storm 422"}, tally.statuses
    assert stored["runs"] == stored["charges"] > 0
    seen = [stored[k] for k in ("replays", "in_progress_409", "reused_422", "refused_402")]
    assert min(seen) > 0, stored  # every outcome happened
    requests = stored["keyed_requests"]
    report(
        f"same-key storm {stack.shop.label}",
        {
            "seconds": round(elapsed, 1),
            "requests_per_second": round(requests / elapsed),
            **{k: v for k, v in stored.items() if k not in ("purchases", "creating", "events")},
        },
    )


def test_load_with_database_outages_and_killed_workers_loses_nothing(stack):
    """The same load, with the database cut off (every connection dropped, new ones refused) for a
    second and a worker SIGKILLed, in turns, every couple of seconds. Answers lost with a killed
    worker or cut off by the outage count as "unknown": the spend may or may not have happened, and the
    check allows exactly that much; webhooks are retried until answered 200. A same-key storm runs
    too: a key is charged at most once and at most as often as it ran or lost its answer; once the
    lease of every run left behind by a killed worker is over, ``flask credits expire`` settles them,
    and no key is left running."""
    proxy = TcpProxy(int(stack.shop.engine.url.port or 0))
    server = stack.server(via(stack.url, proxy.port))
    faults: Counter[str] = Counter()

    def chaos(deadline: float) -> None:
        rng = random.Random(7)
        for n in range(10_000):
            if time.monotonic() + 1.5 > deadline:
                break
            time.sleep(1.0)
            if n % 2 == 0:
                proxy.down()
                time.sleep(rng.uniform(0.3, 1.0))
                proxy.up()
                faults["database outages"] += 1
            else:
                server.kill_worker(rng.choice(server.worker_pids()))
                faults["workers killed"] += 1

    try:
        wallets, tally, elapsed = run_load(
            stack, server.port, CHAOS_SECONDS, faults=True, chaos=chaos, storm=STORM_FAULT_GROUPS
        )
    finally:
        server.close()
        proxy.close()
    settled = stack.shop.settle_requests()  # the runs of killed workers: after their lease
    stored = stack.shop.check(wallets, tally)
    assert faults["database outages"] >= 1, faults
    assert faults["workers killed"] >= 1, faults
    assert not any(status.endswith(" 500") for status in tally.statuses), tally.statuses
    assert stored["runs"] > 0
    report(
        f"load with faults {stack.shop.label}",
        {**figures(tally, stored, elapsed), "faults": dict(faults), "settled": settled},
    )


@pytest.mark.parametrize("route", ["direct", "pgbouncer"])
def test_stories_streamed_and_cut_off_amid_spends_and_grants_are_charged_what_was_produced(
    stack, route, request
):
    """Stories streamed from wallets that spenders and grants use at the same time, some read to the
    end, some cut off by their client after a few chunks (``run_stories``), directly and through
    PgBouncer in transaction mode. Afterwards (``Shop.check``, ``Shop.check_streams``): a story read
    to the end is charged its chunks, one cut off between what its client read and that plus what
    was in flight (never the whole hold for a few chunks); every hold ended when its response closed
    (none left held), each balance is what the grants, spends and stories leave, balance + held equals
    the entries, ``audit()`` passes, no 500."""
    if route == "pgbouncer":
        if stack.backend != "postgresql":
            pytest.skip("PgBouncer pools PostgreSQL connections")
        server = stack.server(
            request.getfixturevalue("through_pgbouncer"),
            CREDITS_DATABASE_POOLER="transaction",
            **STORY_CONFIG,
        )
    else:
        server = stack.server(**STORY_CONFIG)
    try:
        wallets, tally, elapsed = run_stories(stack, server.port, STORIES_SECONDS)
    finally:
        server.close()
    log = server.output()
    stored = stack.shop.check(wallets, tally, cli=False)  # audit() in this process: CI time
    assert set(tally.statuses) <= {"story 200", "story 402", "spend 200", "spend 402"}, tally.statuses
    assert "Error handling request" not in log, log[-5000:]
    assert "Traceback" not in log, log[-5000:]
    fates = stored["story_fates"]
    assert fates.get("read to the end", 0) > 0, fates
    assert fates.get("hung up", 0) > 0, fates
    assert fates.get("hung up, charged less than the hold", 0) > 0, fates
    assert sum(tally.spent_ok.values()) > 0
    name = f"stories {stack.shop.label}" + (" through PgBouncer" if route == "pgbouncer" else "")
    report(
        name,
        {
            "seconds": round(elapsed, 1),
            "requests_per_second": round(sum(tally.statuses.values()) / elapsed),
            "statuses": dict(sorted(tally.statuses.items())),
            **{k: v for k, v in stored.items() if k not in ("purchases", "creating", "events")},
        },
    )
