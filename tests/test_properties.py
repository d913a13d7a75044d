"""Property-based tests of the ledger (hypothesis, stateful), on every backend.

A random program of grants (with and without expiry, with idempotency keys and their replays), spends
(refused ones and replays included), refunds of spends (repeated, and in the wrong wallet), clock
advances that make lots and holds expire, holds (placed, replayed, extended, settled below, at and
above what they hold, into debt, again, at 0, released, after they expired), and purchases bought
through ``POST /credits/checkout`` (Stripe mocked with ``responses``) then paid, failed, expired,
refunded and disputed through signed webhooks, with replays of those deliveries. A plain Python
model of the documented rules (``docs/ledger.md``, ``docs/stripe.md``) predicts every balance, held
credits, debt, purchase status and webhook outcome; after every step the balances, held credits and
debts must match it, no balance may be negative, and ``credits.audit()`` must be empty. Replays must
return the very entry they replay.

Runs are derandomized, so a failure reproduces on the next run: hypothesis prints the failing
program step by step, and a ``@reproduce_failure`` blob. Shrinking a failing program can take minutes
on these databases, so it is off unless ``CREDITS_FUZZ_SHRINK=1``. ``CREDITS_FUZZ_SCALE=10`` runs ten
times as many programs; ``CREDITS_FUZZ_RANDOM=1`` explores new ones on each run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import responses
import sqlalchemy as sa
from helpers import PHASES, RANDOM, SCALE, clear, fresh_user_per_request, logged_in
from hypothesis import HealthCheck, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from flask_credits import (
    EntryNotFound,
    HoldAlreadySettled,
    IdempotencyConflict,
    InsufficientCredits,
    NotRefundable,
    testing,
)

#: (programs, steps per program) per machine and backend: a step costs ~3x on the server databases.
BUDGET = {
    "LedgerProgram": {"sqlite": (30, 30), "postgresql": (8, 25), "mysql": (8, 25)},
    "HoldProgram": {"sqlite": (30, 30), "postgresql": (8, 25), "mysql": (8, 25)},
    "PurchaseProgram": {"sqlite": (16, 40), "postgresql": (5, 30), "mysql": (5, 30)},
}

WHSEC = "whsec_properties"
START = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)
WALLETS = (("alice", None), ("bob", None), ("alice", "key-1"))
#: Mostly alice's own wallet, so that lots pile up in one wallet; the others prove wallets stay apart.
WALLET = st.sampled_from([WALLETS[0], WALLETS[0], WALLETS[0], WALLETS[1], WALLETS[2]])
KEYS = ("k1", "k2", "k3", "k4", "k5", "k6")
IDEMPOTENCY_KEY = st.one_of(st.none(), st.sampled_from(KEYS))  # half the calls carry a key
HOLD_KEY = st.one_of(st.none(), st.sampled_from(("h1", "h2")))  # holds' keys are their own
HOLD_TTL = st.sampled_from([60, 3600, 86400])
LIFETIME = st.sampled_from([None, 60, 3600, 86400])  # seconds a granted lot lasts
SECONDS = st.sampled_from([1, 30, 60, 61, 3600, 3601, 86400])  # time passing, to the second of expiry
PER_UNIT, UNIT_AMOUNT = 10, 100
PACKS = {"trial": {"credits": 25, "amount": 300, "expires_after": 3600}}
PRODUCTS = ({"quantity": 1}, {"quantity": 2}, {"quantity": 3}, {"pack": "trial"})
PRODUCT = st.sampled_from(PRODUCTS)
FULFILLABLE = ("creating", "open", "unpaid")
MAX_PURCHASES = 6  # per program: enough to pay debts and mix lots, and steps left to refund them
CAP = 5  # CREDITS_MAX_OPEN_PURCHASES (the default): a sixth unfinished checkout of a wallet gets 429


SEEN: Counter[str] = Counter()


def event(label: str) -> None:
    """Count what the programs reached (the test checks the interesting cases were all reached)."""
    SEEN[label] += 1
    hypothesis_event(label)


#: What each machine's SQLite run must have reached at least once.
REACHED = {
    "LedgerProgram": {
        "spend: refused",
        "spend: replayed",
        "grant: replayed",
        "spend: key reused for something else",
        "refund of a spend",
        "refund of a spend after time passed",
        "refund of a spend: repeated",
        "refund of a spend: in another wallet",
    },
    "HoldProgram": {
        "hold: placed",
        "hold: refused",
        "hold: replayed",
        "extend: grown",
        "extend: hold ended",
        "settle: within the hold",
        "settle: overdrawn into debt",
        "settle: an expired hold",
        "settle: replayed",
        "settle: after it ended",
        "release",
        "refund of a settle",
    },
    "PurchaseProgram": {
        "a wallet owed credits after a claw-back",
        "a purchase paid the wallet's debt first",
        "webhook: charge.refunded -> revoked",
        "an older refund total arrived late",
        "webhook: charge.dispute.closed -> reinstated",
        "webhook: checkout.session.completed -> already_fulfilled",
        "webhook: replayed -> duplicate",
    },
}


# -- the model ----------------------------------------------------------------------------------------


@dataclass
class Lot:
    order: int  # creation order, as the lots' ids
    amount: int
    remaining: int
    expires_at: datetime | None
    expired: int = 0  # credits of this lot taken by expiry


@dataclass
class WalletModel:
    lots: list[Lot] = field(default_factory=list)
    debt: int = 0
    #: idempotency key -> (kind, amount, entry id, expiry of a grant)
    keys: dict[str, tuple[str, int, int, datetime | None]] = field(default_factory=dict)
    hold_keys: dict[str, HoldModel] = field(default_factory=dict)

    @property
    def balance(self) -> int:
        return sum(lot.remaining for lot in self.lots)


@dataclass
class HoldModel:
    wallet: tuple[str, str | None]
    hold_id: int
    requested: int
    amount: int
    expires_at: datetime
    draws: list[tuple[Lot, int]]  # the lots its credits came from (one lot may appear twice)
    status: str = "held"
    settled_amount: int | None = None
    entry_id: int | None = None


@dataclass
class SpendModel:
    wallet: tuple[str, str | None]
    entry_id: int
    draws: list[tuple[Lot, int]]
    refund_id: int | None = None
    settle: bool = False  # the spend entry of a settled hold


@dataclass
class PurchaseModel:
    session_id: str
    wallet: tuple[str, str | None]
    credits: int
    amount: int
    expires_after: int | None
    payment_intent: str
    created_at: datetime
    status: str = "open"
    lot: Lot | None = None
    refunded_money: int = 0  # the largest refunded total Stripe has sent
    disputed: int = 0  # credits the dispute claws back: its share while lost, none once won
    # Where each clawed-back credit came from, counted one credit at a time:
    taken: int = 0  # out of the purchase's lot, while the wallet still held it
    covered_by_expiry: int = 0  # matched with one of the lot's expired credits: nothing owed
    owed: int = 0  # spent already, so added to the wallet's debt

    @property
    def refunded(self) -> int:
        return share(self, self.refunded_money)

    @property
    def clawed_back(self) -> int:
        return self.taken + self.covered_by_expiry + self.owed


class Model:
    """The documented rules, written plainly: lots drawn soonest expiry first (no expiry last),
    expired lots emptied, refunds back into the same lots, purchases paying debt first, claw-backs
    covered by the purchase's lot, then by its expired credits, then as debt."""

    def __init__(self) -> None:
        self.wallets = {w: WalletModel() for w in WALLETS}
        self.holds: list[HoldModel] = []
        self.lot_counter = 0
        self.now = START

    def held(self, wallet: tuple[str, str | None]) -> int:
        return sum(h.amount for h in self.holds if h.wallet == wallet and h.status == "held")

    def unhold(self, hold: HoldModel, keep: int) -> list[tuple[Lot, int]]:
        """End a live hold: ``keep`` of its credits are charged, soonest-expiring lots first (returned
        as the charge's draws), the rest go back to the lots they came from."""
        merged: dict[int, tuple[Lot, int]] = {}
        for lot, n in hold.draws:
            merged[lot.order] = (lot, merged.get(lot.order, (lot, 0))[1] + n)
        charged = []
        for lot, n in sorted(merged.values(), key=lambda d: lot_order(d[0])):
            take = min(keep, n)
            keep -= take
            if take:
                charged.append((lot, take))
            lot.remaining += n - take
        hold.draws = []
        return charged

    def new_lot(
        self, wallet: tuple[str, str | None], amount: int, remaining: int, expires: datetime | None
    ) -> Lot:
        self.lot_counter += 1
        lot = Lot(self.lot_counter, amount, remaining, expires)
        self.wallets[wallet].lots.append(lot)
        return lot

    def expire(self) -> None:
        for h in self.holds:  # a hold past its expiry gives its credits back first
            if h.status == "held" and h.expires_at <= self.now:
                self.unhold(h, 0)
                h.status = "expired"
        for w in self.wallets.values():
            for lot in w.lots:
                if lot.expires_at is not None and lot.expires_at <= self.now and lot.remaining:
                    lot.expired += lot.remaining
                    lot.remaining = 0

    def draw(self, wallet: tuple[str, str | None], amount: int) -> list[tuple[Lot, int]]:
        order = sorted((lot for lot in self.wallets[wallet].lots if lot.remaining), key=lot_order)
        draws, need = [], amount
        for lot in order:
            take = min(need, lot.remaining)
            lot.remaining -= take
            draws.append((lot, take))
            need -= take
            if not need:
                break
        assert need == 0
        return draws

    def fulfil(self, p: PurchaseModel) -> None:
        w = self.wallets[p.wallet]
        paid = min(w.debt, p.credits)
        if paid:
            event("a purchase paid the wallet's debt first")
        w.debt -= paid
        expires = None if p.expires_after is None else self.now + timedelta(seconds=p.expires_after)
        p.lot = self.new_lot(p.wallet, p.credits, p.credits - paid, expires)
        p.status = "fulfilled"

    def settle(self, p: PurchaseModel) -> int:
        """Claw back what the purchase's money says, refund and dispute together but never more
        than was bought, one credit at a time; return how many more (fewer: negative) that is."""
        assert p.lot is not None
        w, lot = self.wallets[p.wallet], p.lot
        moved = min(p.credits, p.refunded + p.disputed) - p.clawed_back
        for _ in range(moved):
            if lot.remaining:  # still in the wallet
                lot.remaining -= 1
                p.taken += 1
            elif p.covered_by_expiry < lot.expired:  # never used by the customer
                p.covered_by_expiry += 1
                event("a claw-back covered by expired credits")
            else:  # spent
                p.owed += 1
                w.debt += 1
        for _ in range(-moved):  # given back the other way round
            if p.owed:
                p.owed -= 1
                if w.debt:
                    w.debt -= 1
                else:  # a later purchase paid that debt: the credit comes back
                    event("a claw-back undone after its debt was paid")
                    self.put_back(lot)
            elif p.covered_by_expiry:
                p.covered_by_expiry -= 1
                event("a claw-back undone where expired credits covered it")
            else:
                p.taken -= 1
                self.put_back(lot)
        return moved

    def put_back(self, lot: Lot) -> None:
        """A credit back into a lot, unless it is full (its spent credits were refunded meanwhile)."""
        if lot.remaining < lot.amount:
            lot.remaining += 1
        else:
            event("a credit given back did not fit its lot")


def lot_order(lot: Lot) -> tuple[bool, datetime, int]:
    """Spends and holds draw soonest expiry first, lots that never expire last, then the oldest."""
    return (lot.expires_at is None, lot.expires_at or START, lot.order)


def share(p: PurchaseModel, money: int) -> int:
    """The credits ``money`` pays for, out of the purchase's price, rounded down."""
    return min(p.credits, p.credits * money // p.amount) if money > 0 else 0


def moved(change: int) -> str:
    return "revoked" if change > 0 else "reinstated" if change < 0 else "unchanged"


# -- the state machines -----------------------------------------------------------------------------


class Program(RuleBasedStateMachine):
    """What both machines share: granting, spending, the model, and the checks after every step.
    ``bind`` hands the class the test's app; each program starts from empty tables."""

    app: Any
    db: Any
    credits: Any
    clock: Any

    @classmethod
    def bind(cls, app: Any, db: Any, credits: Any, clock: Any) -> type[Program]:
        cls.app, cls.db, cls.credits, cls.clock = app, db, credits, clock
        return cls

    def __init__(self) -> None:
        super().__init__()
        clear(self.db)
        self.clock.now = START
        self.model = Model()
        self.clients: dict[str, Any] = {}
        self.spends: list[SpendModel] = []
        self.grants: list[tuple[tuple[str, str | None], int]] = []
        self.purchases: list[PurchaseModel] = []
        self.delivered: list[dict[str, Any]] = []

    # -- helpers

    def wallet(self, wallet: tuple[str, str | None]) -> WalletModel:
        return self.model.wallets[wallet]

    def advance(self, seconds: int) -> None:
        if seconds:
            self.clock.advance(seconds=seconds)
            self.model.now = self.clock.now
            self.model.expire()

    def pick(self, items: list[Any], index: int) -> Any:
        return items[index % len(items)]

    def call_grant(self, wallet: Any, amount: int, expires: datetime | None, key: str | None) -> Any:
        return self.credits.grant(
            wallet[0], amount, key_id=wallet[1], reason="p", expires_at=expires, idempotency_key=key
        )

    def call_spend(self, wallet: Any, amount: int, key: str | None) -> Any:
        return self.credits.spend(wallet[0], amount, key_id=wallet[1], reason="p", idempotency_key=key)

    def key_reused(self, wallet: Any, kind: str, amount: int, key: str | None, call: Any) -> bool:
        """A key this wallet used before: for something else it is refused and nothing changes; for
        the same kind and amount the original entry comes back (and nothing changes)."""
        if key is None or key not in self.wallet(wallet).keys:
            return False
        was_kind, was_amount, entry_id, _ = self.wallet(wallet).keys[key]
        if (was_kind, was_amount) != (kind, amount):
            with pytest.raises(IdempotencyConflict):
                call()
            event(f"{kind}: key reused for something else")
        else:
            assert call().id == entry_id
            event(f"{kind}: replayed")
        return True

    # -- grants and spends (the machines below make rules of them)

    def grant(self, wallet: Any, amount: int, lifetime: int | None, key: str | None) -> None:
        expires = None if lifetime is None else self.clock.now + timedelta(seconds=lifetime)
        if self.key_reused(
            wallet, "grant", amount, key, lambda: self.call_grant(wallet, amount, expires, key)
        ):
            return
        entry = self.call_grant(wallet, amount, expires, key)
        assert (entry.kind, entry.amount) == ("grant", amount)
        self.model.new_lot(wallet, amount, amount, expires)
        self.grants.append((wallet, entry.id))
        if key is not None:
            self.wallet(wallet).keys[key] = ("grant", amount, entry.id, expires)

    def spend(self, wallet: Any, eighths: int, key: str | None) -> None:
        """Spend some eighths of a wallet's balance: 9 or 10 eighths, or anything from an empty wallet,
        is refused. Up to 8 eighths go to a wallet that has credits, if any has."""
        if eighths <= 8 and not self.wallet(wallet).balance:
            wallet = next((w for w in WALLETS if self.wallet(w).balance), wallet)
        w = self.wallet(wallet)
        amount = max(1, w.balance * eighths // 8)
        if self.key_reused(wallet, "spend", amount, key, lambda: self.call_spend(wallet, amount, key)):
            return
        if w.balance < amount:
            with pytest.raises(InsufficientCredits) as refused:
                self.call_spend(wallet, amount, key)
            assert (refused.value.required, refused.value.balance) == (amount, w.balance)
            event("spend: refused")
            return  # nothing written: the key stays free
        entry = self.call_spend(wallet, amount, key)
        after = w.balance - amount + self.model.held(wallet)  # an entry's balance_after counts held credits
        assert (entry.kind, entry.amount, entry.balance_after) == ("spend", -amount, after)
        self.spends.append(SpendModel(wallet, entry.id, self.model.draw(wallet, amount)))
        if key is not None:
            w.keys[key] = ("spend", amount, entry.id, None)

    # -- after every step

    @invariant()
    def balances_debts_and_statuses_match_the_model(self) -> None:
        for (user, key), w in self.model.wallets.items():
            balance = self.credits.balance(user, key)
            assert balance >= 0
            assert balance == w.balance, (user, key)
        t = self.credits.tables
        with self.db.engine.connect() as conn:
            debts = {
                (r.user_id, r.key_id or None): r.debt
                for r in conn.execute(sa.select(t.wallets.c.user_id, t.wallets.c.key_id, t.wallets.c.debt))
            }
            purchases = {
                r.session_id: (r.status, r.refund_revoked, r.dispute_revoked)
                for r in conn.execute(sa.select(t.purchases))
            }
        assert {w: d for w, d in debts.items() if d} == {
            w: m.debt for w, m in self.model.wallets.items() if m.debt
        }
        # Refunds only add up and a dispute takes what they leave: the purchase's row says so.
        assert purchases == {
            p.session_id: (p.status, p.refunded, p.clawed_back - p.refunded) for p in self.purchases
        }
        if any(debts.values()):
            event("a wallet owed credits after a claw-back")

    @invariant()
    def audit_finds_nothing(self) -> None:
        assert self.credits.audit() == []


class LedgerProgram(Program):
    """The ledger alone: lots, expiry, idempotency keys and refunds of spends."""

    @rule(wallet=WALLET, amount=st.integers(1, 40), lifetime=LIFETIME, key=IDEMPOTENCY_KEY)
    def a_grant(self, wallet: Any, amount: int, lifetime: int | None, key: str | None) -> None:
        self.grant(wallet, amount, lifetime, key)

    @rule(wallet=WALLET, eighths=st.integers(1, 10), key=IDEMPOTENCY_KEY)
    def a_spend(self, wallet: Any, eighths: int, key: str | None) -> None:
        self.spend(wallet, eighths, key)

    @rule(seconds=SECONDS)
    def time_passes(self, seconds: int) -> None:
        self.advance(seconds)

    @initialize(amount=st.integers(1, 40), lifetime=LIFETIME)
    def a_welcome_grant(self, amount: int, lifetime: int | None) -> None:
        self.grant(WALLETS[0], amount, lifetime, None)

    def keyed(self) -> list[tuple[Any, str]]:
        return [(wallet, key) for wallet, w in self.model.wallets.items() for key in w.keys]

    @precondition(lambda self: self.keyed())
    @rule(index=st.integers(0, 50))
    def replay_a_call_with_its_idempotency_key(self, index: int) -> None:
        wallet, key = self.pick(self.keyed(), index)
        kind, amount, _, expires = self.wallet(wallet).keys[key]
        if kind == "spend":
            assert self.key_reused(wallet, kind, amount, key, lambda: self.call_spend(wallet, amount, key))
        elif expires is None or expires > self.clock.now:  # a past expiry is refused as invalid first
            assert self.key_reused(
                wallet, kind, amount, key, lambda: self.call_grant(wallet, amount, expires, key)
            )

    @rule(wallet=WALLET, eighths=st.integers(1, 8), seconds=st.sampled_from([61, 3601, 86401]))
    def spend_then_time_passes(self, wallet: Any, eighths: int, seconds: int) -> None:
        """What tells which lots a spend drew from: the soonest-expiring ones must have gone first."""
        self.spend(wallet, eighths, None)
        self.advance(seconds)

    @precondition(lambda self: self.spends)
    @rule(
        index=st.integers(0, 50),
        advance=st.sampled_from([0, 0, 3601]),
        which=st.sampled_from(["spend", "spend", "spend", "spend in another wallet", "grant"]),
    )
    def refund_a_spend(self, index: int, advance: int, which: str) -> None:
        """Refund a spend (again, maybe), or try to refund what cannot be: a spend named in another
        wallet (not found there) or a grant (not refundable). Nothing changes for those."""
        self.advance(advance)  # its lots may be due, and not yet expired, when the credits go back
        spend = self.pick(self.spends, index)
        if which == "spend in another wallet":
            stranger = next(w for w in WALLETS if w != spend.wallet)
            with pytest.raises(EntryNotFound):
                self.credits.refund(stranger[0], spend.entry_id, key_id=stranger[1])
            event("refund of a spend: in another wallet")
            return
        if which == "grant" and self.grants:
            wallet, entry_id = self.pick(self.grants, index)
            with pytest.raises(NotRefundable):
                self.credits.refund(wallet[0], entry_id, key_id=wallet[1])
            event("refund of a grant: refused")
            return
        entry = self.credits.refund(spend.wallet[0], spend.entry_id, key_id=spend.wallet[1])
        if spend.refund_id is not None:
            assert entry.id == spend.refund_id  # refunded once; a repeat returns that refund
            event("refund of a spend: repeated")
            return
        assert (entry.kind, entry.reverses_id) == ("refund", spend.entry_id)
        spend.refund_id = entry.id
        event("refund of a spend" + (" after time passed" if advance else ""))
        if spend.settle:
            event("refund of a settle")
        for lot, amount in spend.draws:
            lot.remaining += amount
        self.model.expire()  # credits back in an expired lot expire again at once


class HoldProgram(Program):
    """Holds beside grants, spends, expiry and refunds: placed (refused, replayed, a key reused),
    extended, settled at 0, below, at and above what they hold and into debt, settled again, released,
    and expired; a settle's spend refunded."""

    a_welcome_grant = LedgerProgram.a_welcome_grant
    a_grant = LedgerProgram.a_grant
    another_grant = LedgerProgram.a_grant  # twice as many grants: enough credits to hold
    a_spend = LedgerProgram.a_spend
    time_passes = LedgerProgram.time_passes
    refund_a_spend = LedgerProgram.refund_a_spend

    def pick_hold(self, index: int) -> HoldModel:
        """A live hold for an even index (if any is live), any hold for an odd one."""
        live = [h for h in self.model.holds if h.status == "held"]
        return self.pick(live if live and index % 2 == 0 else self.model.holds, index // 2)

    @rule(wallet=WALLET, eighths=st.integers(1, 9), ttl=HOLD_TTL, key=HOLD_KEY)
    def a_hold(self, wallet: Any, eighths: int, ttl: int, key: str | None) -> None:
        """Hold some eighths of a wallet's balance (9 eighths are refused). A key the wallet
        used before is replayed (whatever became of its hold since), or, for odd eighths, reused for
        another amount."""
        if eighths <= 8 and not self.wallet(wallet).balance:
            wallet = next((w for w in WALLETS if self.wallet(w).balance), wallet)
        w = self.wallet(wallet)
        amount = max(1, w.balance * eighths // 8)
        if key is not None and key in w.hold_keys and eighths % 2 == 0:
            amount = w.hold_keys[key].requested

        def call() -> Any:
            return self.credits.hold(wallet[0], amount, key_id=wallet[1], ttl=ttl, idempotency_key=key)

        if key is not None and key in w.hold_keys:
            prior = w.hold_keys[key]
            if prior.requested != amount:
                with pytest.raises(IdempotencyConflict):
                    call()
                event("hold: key reused for another amount")
            else:
                again = call()
                assert (again.id, again.replayed) == (prior.hold_id, True)
                event("hold: replayed")
            return
        if w.balance < amount:
            with pytest.raises(InsufficientCredits) as refused:
                call()
            assert (refused.value.required, refused.value.balance) == (amount, w.balance)
            event("hold: refused")
            return
        hold = call()
        expires_at = self.clock.now + timedelta(seconds=ttl)
        assert (hold.amount, hold.expires_at, hold.status) == (amount, expires_at, "held")
        assert not hold.replayed
        h = HoldModel(wallet, hold.id, amount, amount, expires_at, self.model.draw(wallet, amount))
        self.model.holds.append(h)
        if key is not None:
            w.hold_keys[key] = h
        event("hold: placed")

    @precondition(lambda self: self.model.holds)
    @rule(index=st.integers(0, 50), eighths=st.integers(1, 10), ttl=HOLD_TTL)
    def extend_a_hold(self, index: int, eighths: int, ttl: int) -> None:
        h = self.pick_hold(index)
        w = self.wallet(h.wallet)
        amount = max(1, w.balance * eighths // 8)

        def call() -> Any:
            return self.credits.extend_hold(h.hold_id, amount, ttl=ttl)

        if h.status != "held":
            with pytest.raises(HoldAlreadySettled):
                call()
            event("extend: hold ended")
        elif w.balance < amount:
            with pytest.raises(InsufficientCredits):
                call()
            event("extend: refused")
        else:
            grown = call()
            h.draws += self.model.draw(h.wallet, amount)
            h.amount += amount
            h.expires_at = max(h.expires_at, self.clock.now + timedelta(seconds=ttl))
            assert (grown.id, grown.amount, grown.expires_at) == (h.hold_id, h.amount, h.expires_at)
            event("extend: grown")

    @precondition(lambda self: self.model.holds)
    @rule(
        index=st.integers(0, 50),
        how=st.sampled_from(["0", "less", "all", "more", "debt", "again", "release"]),
        key=IDEMPOTENCY_KEY,
    )
    def settle_a_hold(self, index: int, how: str, key: str | None) -> None:
        """Settle a hold at 0, below, at or above what it holds, beyond what the wallet can pay, or
        again at what a hold was settled before; with an idempotency key half the time. Or release
        it."""
        if how == "release":
            self.release(index)
            return
        ended = [h for h in self.model.holds if h.settled_amount is not None]
        h = self.pick(ended, index) if how == "again" and ended else self.pick_hold(index)
        w = self.wallet(h.wallet)
        amount = {
            "0": 0,
            "less": max(0, h.amount - 1),
            "all": h.amount,
            "more": h.amount + 1 + w.balance // 2,
            "debt": h.amount + w.balance + 3,
            "again": h.amount if h.settled_amount is None else h.settled_amount,
        }[how]

        def call() -> Any:
            return self.credits.settle(h.hold_id, amount, idempotency_key=key)

        if h.status == "settled" or (h.status == "released" and h.settled_amount is not None):
            if amount != h.settled_amount:
                with pytest.raises(HoldAlreadySettled):
                    call()
                event("settle: after it ended")
            else:
                entry = call()
                assert (None if entry is None else (entry.id, entry.replayed)) == (
                    None if h.entry_id is None else (h.entry_id, True)
                )
                event("settle: replayed")
            return
        if h.status == "released" or (h.status == "expired" and not amount):
            if amount:
                with pytest.raises(HoldAlreadySettled):
                    call()
                event("settle: after it ended")
            else:
                assert call() is None
            return
        held = h.amount if h.status == "held" else 0
        from_hold = min(amount, held)
        extra = min(amount - from_hold, w.balance)
        debt = amount - from_hold - extra
        charge = from_hold + extra
        if charge and key is not None and key in w.keys:
            with pytest.raises(IdempotencyConflict):
                call()
            event("settle: key used by another entry")
            return
        entry = call()
        if h.status == "expired":
            event("settle: an expired hold")
        event(
            "settle: overdrawn into debt" if debt else "settle: more" if extra else "settle: within the hold"
        )
        charged = self.model.unhold(h, from_hold) if held else []
        if extra:
            charged += self.model.draw(h.wallet, extra)
        w.debt += debt
        h.status, h.settled_amount = ("settled" if amount else "released"), amount
        if not charge:
            assert entry is None
        else:
            metadata = {"hold_id": h.hold_id, "held": held, "amount": amount}
            if debt:
                metadata["debt"] = debt
            after = w.balance + self.model.held(h.wallet)  # before credits back in expired lots expire
            assert (entry.kind, entry.amount, entry.balance_after) == ("spend", -charge, after)
            assert entry.metadata == metadata
            h.entry_id = entry.id
            self.spends.append(SpendModel(h.wallet, entry.id, charged, settle=True))
            if key is not None:
                w.keys[key] = ("spend", charge, entry.id, None)
        self.model.expire()  # credits given back to a lot that expired while held expire now

    def release(self, index: int) -> None:
        h = self.pick_hold(index)
        if h.status == "settled":
            with pytest.raises(HoldAlreadySettled):
                self.credits.release(h.hold_id)
            return
        assert self.credits.release(h.hold_id) is None
        if h.status == "held":
            self.model.unhold(h, 0)
            h.status = "released"
            self.model.expire()
            event("release")

    @invariant()
    def held_credits_match_the_model(self) -> None:
        for user, key in WALLETS:
            assert self.credits.held(user, key) == self.model.held((user, key)), (user, key)


class PurchaseProgram(Program):
    """Purchases through checkout and signed webhooks, with spends, expiry, refunds and disputes."""

    def client(self, user: str = "stripe") -> Any:
        """One test client per user, logged in once per program."""
        if user not in self.clients:
            self.clients[user] = self.app.test_client() if user == "stripe" else logged_in(self.app, user)
        return self.clients[user]

    def deliver(self, stripe_event: dict[str, Any]) -> str:
        response = testing.post_event(self.client(), stripe_event)
        assert response.status_code == 200, response.get_data(as_text=True)
        event(f"webhook: {stripe_event['type']} -> {response.json['outcome']}")
        self.delivered.append(stripe_event)
        return str(response.json["outcome"])

    def session_event(self, p: PurchaseModel, event_type: str, **kwargs: Any) -> dict[str, Any]:
        session = testing.session_for(p.session_id, payment_intent=p.payment_intent, **kwargs)
        return testing.event(event_type, session)

    def checkout(self, wallet: Any, product: dict[str, Any]) -> PurchaseModel | None:
        """Buy through the checkout; None when the wallet already has CAP unfinished checkouts
        (created less than a day ago), which must be refused with 429."""
        body = dict(product, **({"key_id": wallet[1]} if wallet[1] else {}))
        response = self.client(wallet[0]).post("/credits/checkout", json=body)
        unfinished = [
            p
            for p in self.purchases
            if p.wallet == wallet and p.status == "open" and p.created_at > self.clock.now - timedelta(days=1)
        ]
        if len(unfinished) >= CAP:
            assert response.status_code == 429, response.json
            event("checkout -> too_many_open_checkouts")
            return None
        assert response.status_code == 200, response.json
        if "pack" in product:
            pack = PACKS[product["pack"]]
            credits, amount, lifetime = pack["credits"], pack["amount"], pack["expires_after"]
        else:
            credits, amount, lifetime = (
                PER_UNIT * product["quantity"],
                UNIT_AMOUNT * product["quantity"],
                None,
            )
        sid = response.json["id"]
        purchase = PurchaseModel(sid, wallet, credits, amount, lifetime, f"pi_{sid}", self.clock.now)
        self.purchases.append(purchase)
        return purchase

    def fulfilled(self) -> list[PurchaseModel]:
        return [p for p in self.purchases if p.status == "fulfilled"]

    @initialize(wallet=WALLET, product=PRODUCT, eighths=st.integers(0, 8), second=st.booleans())
    def a_purchase_was_paid_and_partly_spent(
        self, wallet: Any, product: dict[str, Any], eighths: int, second: bool
    ) -> None:
        """Every program starts with a paid purchase, some of it spent, so that refunds and disputes
        have something to claw back and may leave debt; maybe with a second purchase still open."""
        p = self.checkout(wallet, product)
        assert p is not None  # the program's first checkout
        assert self.deliver(self.session_event(p, "checkout.session.completed")) == "fulfilled"
        self.model.fulfil(p)
        if eighths:
            self.spend(wallet, eighths, None)
        if second:
            self.checkout(wallet, product)  # not paid yet: it pays the debt first when it is

    @precondition(lambda self: len(self.purchases) < MAX_PURCHASES)
    @rule(wallet=WALLET, product=PRODUCT)
    def buy(self, wallet: Any, product: dict[str, Any]) -> None:
        self.checkout(wallet, product)

    @rule(
        what=st.sampled_from(["spend", "spend", "spend", "grant", "time"]),
        wallet=WALLET,
        amount=st.integers(1, 40),
        eighths=st.integers(1, 10),
        lifetime=LIFETIME,
        seconds=SECONDS,
    )
    def meanwhile(
        self, what: str, wallet: Any, amount: int, eighths: int, lifetime: int | None, seconds: int
    ) -> None:
        """The customer spends, an operator grants, or time passes (one rule, so that Stripe's events
        keep their share of the steps)."""
        if what == "spend":
            self.spend(wallet, eighths, None)
        elif what == "grant":
            self.grant(wallet, amount, lifetime, None)
        else:
            self.advance(seconds)

    #: What Stripe tells the app next, weighted: payments first, then money going back.
    STRIPE_NEWS = (
        *("completed",) * 3,
        *("async_succeeded", "unpaid", "failed", "expired"),
        *("refund",) * 3,
        "an older refund total, late",
        *("funds_withdrawn", "lost", "funds_reinstated", "won", "warning_closed"),
        *("the same event again",) * 2,
    )

    @precondition(lambda self: self.purchases)
    @rule(
        news=st.sampled_from(STRIPE_NEWS),
        index=st.integers(0, 50),
        money=st.integers(0, 400),
        advance=st.sampled_from([0, 0, 3601]),
    )
    def stripe_sends_an_event(self, news: str, index: int, money: int, advance: int) -> None:
        """One rule for every delivery, so that swarm testing cannot switch a kind of event off on its
        own: a session paid (or not) on a waiting purchase, a refund or a dispute on a paid one (after
        ``advance`` seconds, so its lot may be due), or a delivery again."""
        self.advance(advance)
        waiting = [p for p in self.purchases if p.status in ("open", "unpaid")]
        if news == "the same event again":
            if self.delivered:
                again = self.pick(self.delivered, index)
                response = testing.post_event(self.client(), again)
                assert (response.status_code, response.json["outcome"]) == (200, "duplicate")
                event("webhook: replayed -> duplicate")
        elif news in ("completed", "async_succeeded", "unpaid", "failed", "expired"):
            if not waiting and len(self.purchases) < MAX_PURCHASES:  # the customer buys again
                earlier = self.pick(self.purchases, index)
                again = self.checkout(earlier.wallet, PRODUCTS[index % len(PRODUCTS)])
                assert again is not None  # nothing was waiting, so nothing counts against the cap
                waiting = [again]
            self.session_news(self.pick(waiting or self.purchases, index), news)
        elif self.fulfilled():
            p = self.pick(self.fulfilled(), index)
            if news == "refund":
                self.refund_news(p, money)
            elif news == "an older refund total, late":
                self.late_refund_news(p, money)
            else:
                self.dispute_news(p, news, parts=1 + money % 2)
        self.model.expire()

    def session_news(self, p: PurchaseModel, how: str) -> None:
        if how in ("completed", "async_succeeded"):
            kind = "completed" if how == "completed" else "async_payment_succeeded"
            outcome = self.deliver(self.session_event(p, f"checkout.session.{kind}"))
            if p.status in FULFILLABLE:
                expected = "fulfilled"
                self.model.fulfil(p)
            else:
                expected = "already_fulfilled" if p.status == "fulfilled" else "not_fulfillable"
        elif how == "unpaid":  # a delayed payment method: completed, not yet paid
            outcome = self.deliver(
                self.session_event(p, "checkout.session.completed", payment_status="unpaid")
            )
            expected = "awaiting_payment"
            if p.status in ("creating", "open"):
                p.status = "unpaid"
        elif how == "failed":
            outcome = self.deliver(self.session_event(p, "checkout.session.async_payment_failed"))
            expected = "failed" if p.status in FULFILLABLE else "unchanged"
            if p.status in FULFILLABLE:
                p.status = "failed"
        else:
            stripe_event = self.session_event(
                p, "checkout.session.expired", status="expired", payment_status="unpaid"
            )
            outcome = self.deliver(stripe_event)
            expected = "expired" if p.status in ("creating", "open") else "unchanged"
            if p.status in ("creating", "open"):
                p.status = "expired"
        assert outcome == expected, (how, p)

    def refund_news(self, p: PurchaseModel, more: int) -> None:
        p.refunded_money = min(p.amount, p.refunded_money + more)  # cumulative, and never lower
        charge = testing.charge(p.payment_intent, amount=p.amount, amount_refunded=p.refunded_money)
        outcome = self.deliver(testing.event("charge.refunded", charge))
        if p.lot is not None and p.lot.expires_at is not None and p.lot.expires_at <= self.clock.now:
            event("claw-back from a purchase whose credits expired")
        change = self.model.settle(p)
        assert outcome == moved(change)

    def late_refund_news(self, p: PurchaseModel, money: int) -> None:
        """Stripe does not promise the order of deliveries: the event of an earlier, smaller refund
        total may come after a larger one, and must not give credits back."""
        older = p.refunded_money - money % (p.refunded_money + 1)
        charge = testing.charge(p.payment_intent, amount=p.amount, amount_refunded=older)
        outcome = self.deliver(testing.event("charge.refunded", charge))
        assert (self.model.settle(p), outcome) == (0, "unchanged")
        if older < p.refunded_money:
            event("an older refund total arrived late")

    def dispute_news(self, p: PurchaseModel, what: str, parts: int) -> None:
        disputed = p.amount // parts
        if what in ("funds_withdrawn", "funds_reinstated"):
            event_type, status = f"charge.dispute.{what}", "needs_response"
        else:
            event_type, status = "charge.dispute.closed", what
        outcome = self.deliver(
            testing.event(event_type, testing.dispute(p.payment_intent, amount=disputed, status=status))
        )
        if what == "warning_closed":
            assert outcome == "ignored"
            return
        lost = what in ("funds_withdrawn", "lost")
        p.disputed = share(p, disputed) if lost else 0
        change = self.model.settle(p)
        assert outcome == moved(change)
        if change < 0 and self.wallet(p.wallet).debt == 0:
            event("a dispute won after its debt was paid")


# -- the tests ----------------------------------------------------------------------------------------


def run(machine: type[Program], backend: str) -> None:
    programs, steps = BUDGET[machine.__name__][backend]
    SEEN.clear()
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=max(1, int(programs * SCALE)),
            stateful_step_count=steps,
            deadline=None,
            derandomize=not RANDOM,
            database=None,
            print_blob=True,
            phases=PHASES,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )
    if backend == "sqlite" and not RANDOM and SCALE >= 1:
        # The generator must keep reaching the cases that matter, or these tests prove little.
        assert set(SEEN) >= REACHED[machine.__name__], sorted(SEEN.items())


def test_random_ledger_programs_match_the_model_and_keep_the_audit_clean(app, db, credits, clock, backend):
    run(LedgerProgram.bind(app, db, credits, clock), backend)


def test_random_hold_programs_match_the_model_and_keep_the_audit_clean(app, db, credits, clock, backend):
    run(HoldProgram.bind(app, db, credits, clock), backend)


@pytest.mark.config(
    STRIPE_SECRET_KEY="sk_test_properties",
    STRIPE_WEBHOOK_SECRET=WHSEC,
    CREDITS_STRIPE_MAX_RETRIES=0,
    CREDITS_PER_UNIT=PER_UNIT,
    CREDITS_UNIT_AMOUNT=UNIT_AMOUNT,
    CREDITS_PACKS=PACKS,
)
def test_random_purchase_programs_match_the_model_and_keep_the_audit_clean(app, db, credits, clock, backend):
    fresh_user_per_request(app)

    @credits.wallet_checker
    def owns(user_id: str, key_id: str | None) -> bool:
        return (user_id, key_id) in WALLETS

    with responses.RequestsMock(assert_all_requests_are_fired=False) as stripe:
        testing.mock_create_session(stripe)  # a new open session for each checkout
        run(PurchaseProgram.bind(app, db, credits, clock), backend)
