"""Settlement arithmetic, by worked examples: each row is worked out by hand in the comment above it.

Pure functions, so no database: tests/test_webhooks.py and tests/test_properties.py check that the
ledger writes what these compute, on every backend.
"""

from __future__ import annotations

import pytest

from flask_credits.core.settlement import ClawBack, PurchaseLot, Revoked, claw_back, credits_for, debt_payment

# (credits, price, amount of money) -> credits it is worth
CREDITS_FOR = [
    # 100 * 1000 / 1000 = 100
    pytest.param(100, 1000, 1000, 100, id="the full price is worth every credit"),
    # 100 * 250 / 1000 = 25
    pytest.param(100, 1000, 250, 25, id="a quarter of the price is worth a quarter of the credits"),
    # 25 * 100 / 300 = 8.33 -> 8
    pytest.param(25, 300, 100, 8, id="a share that is not whole is rounded down"),
    # 10 * 299 / 300 = 9.97 -> 9: never up, even a cent short of the next credit
    pytest.param(10, 300, 299, 9, id="a share a cent short of a whole credit is still rounded down"),
    # 10 * 29 / 300 = 0.97 -> 0
    pytest.param(10, 300, 29, 0, id="less than one credit's worth is worth none"),
    # 100 * 5000 / 1000 = 500 -> capped at 100
    pytest.param(100, 1000, 5000, 100, id="more than the price is worth no more than the credits bought"),
    pytest.param(100, 1000, 0, 0, id="nothing is worth nothing"),
    pytest.param(100, 1000, -500, 0, id="a negative amount is worth nothing"),
    pytest.param(100, 1000, None, 0, id="a missing amount is worth nothing"),
    pytest.param(100, 1000, True, 0, id="a boolean is not an amount"),
    pytest.param(100, 1000, "1000", 0, id="a string is not an amount"),
    pytest.param(100, 1000, 1000.0, 0, id="a float is not an amount"),
    pytest.param(100, 0, 500, 0, id="any amount of a free purchase is worth nothing"),
]


@pytest.mark.parametrize(("credits", "price", "amount", "worth"), CREDITS_FOR)
def test_money_is_worth_its_share_of_the_credits_rounded_down(
    credits: int, price: int, amount: object, worth: int
) -> None:
    assert credits_for(credits, price, amount) == worth


# (wallet's debt, credits bought) -> credits that pay the debt; the rest go into the new lot
DEBT_PAYMENTS = [
    # no debt: 0 paid, 100 into the lot
    pytest.param(0, 100, 0, id="a first purchase pays no debt and puts every credit in its lot"),
    # 30 owed: 30 paid, 100 - 30 = 70 into the lot, nothing owed
    pytest.param(30, 100, 30, id="a purchase larger than the debt pays all of it and keeps the rest"),
    # 150 owed: all 100 paid, nothing into the lot, 150 - 100 = 50 still owed
    pytest.param(150, 100, 100, id="a purchase smaller than the debt pays part of it with every credit"),
    # 100 owed: 100 paid, an empty lot, nothing owed
    pytest.param(100, 100, 100, id="a purchase of exactly the debt pays it all and keeps nothing"),
]


@pytest.mark.parametrize(("debt", "credits", "paid"), DEBT_PAYMENTS)
def test_a_purchase_pays_the_wallets_debt_first(debt: int, credits: int, paid: int) -> None:
    assert debt_payment(debt, credits) == paid


# Every claw-back example is of a purchase of 100 credits: PurchaseLot(amount, remaining, expired).
# (state before, refund target, dispute target, lot, wallet's debt) -> (state after, taken, debt added)
CLAW_BACKS = [
    # 100 more clawed back; the lot holds 100: all 100 taken from it, nothing owed
    pytest.param(
        Revoked(), 100, None, PurchaseLot(100, 100, 0), 0,
        Revoked(refund=100, from_lot=100), 100, 0,
        id="a full refund of an unspent purchase takes every credit back out of its lot",
    ),
    # 30 more; the lot holds 100: 30 taken
    pytest.param(
        Revoked(), 30, None, PurchaseLot(100, 100, 0), 0,
        Revoked(refund=30, from_lot=30), 30, 0,
        id="a first partial refund takes its share out of the lot",
    ),
    # refund 30 -> 80: 50 more; the lot holds 70: 50 taken
    pytest.param(
        Revoked(refund=30, from_lot=30), 80, None, PurchaseLot(100, 70, 0), 0,
        Revoked(refund=80, from_lot=80), 50, 0,
        id="partial refunds add up: a larger total takes only the difference",
    ),
    # refund stays max(80, 30) = 80: nothing moves
    pytest.param(
        Revoked(refund=80, from_lot=80), 30, None, PurchaseLot(100, 20, 0), 0,
        Revoked(refund=80, from_lot=80), 0, 0,
        id="a late, smaller refund total gives nothing back",
    ),
    # refund min(150, 100) = 100; the lot holds 100: 100 taken
    pytest.param(
        Revoked(), 150, None, PurchaseLot(100, 100, 0), 0,
        Revoked(refund=100, from_lot=100), 100, 0,
        id="a refund target above the credits bought claws back only those",
    ),
    # 60 spent, 40 left: 100 = 40 taken from the lot + 60 owed
    pytest.param(
        Revoked(), 100, None, PurchaseLot(100, 40, 0), 0,
        Revoked(refund=100, from_lot=40, as_debt=60), 40, 60,
        id="a refund after credits were spent takes what is left and owes the rest",
    ),
    # 50 expired, 30 spent, 20 left: 100 = 20 taken + 50 covered by expiry + 30 owed
    pytest.param(
        Revoked(), 100, None, PurchaseLot(100, 20, 50), 0,
        Revoked(refund=100, from_lot=20, as_debt=30), 20, 30,
        id="a refund after credits expired owes nothing for the expired ones",
    ),
    # all 100 expired: 100 = 0 taken + 100 covered by expiry + 0 owed
    pytest.param(
        Revoked(), 100, None, PurchaseLot(100, 0, 100), 0,
        Revoked(refund=100), 0, 0,
        id="a refund of a purchase that all expired records the total and moves nothing",
    ),
    # 70 spent, 30 left: 100 = 30 taken + 70 owed
    pytest.param(
        Revoked(), None, 100, PurchaseLot(100, 30, 0), 0,
        Revoked(dispute=100, from_lot=30, as_debt=70), 30, 70,
        id="a dispute lost after credits were spent takes what is left and owes the rest",
    ),
    # 100 back: the 70 owed first (all 70 still in the wallet's debt: cancelled), then the 30 taken
    # (back into the lot, which has room for 100 - 0 = 100)
    pytest.param(
        Revoked(dispute=100, from_lot=30, as_debt=70), None, 0, PurchaseLot(100, 0, 0), 70,
        Revoked(), -30, -70,
        id="a dispute won cancels its debt and gives the taken credits back",
    ),
    # 100 back: the 70 owed (a later purchase paid it: 0 to cancel, 70 as credits) + the 30 taken
    pytest.param(
        Revoked(dispute=100, from_lot=30, as_debt=70), None, 0, PurchaseLot(100, 0, 0), 0,
        Revoked(), -100, 0,
        id="a dispute won after its debt was paid gives the paid debt back as credits",
    ),
    # 100 back: of the 70 owed, 35 still in the debt (cancelled) and 35 paid (as credits); + 30 taken:
    # 65 credits back
    pytest.param(
        Revoked(dispute=100, from_lot=30, as_debt=70), None, 0, PurchaseLot(100, 0, 0), 35,
        Revoked(), -65, -35,
        id="a dispute won after half its debt was paid cancels the rest and gives back the paid half",
    ),
    # 70 paid debt + 30 taken = 100 credits due back, but a refunded spend put 70 back in the lot:
    # room for 100 - 70 = 30
    pytest.param(
        Revoked(dispute=100, from_lot=30, as_debt=70), None, 0, PurchaseLot(100, 70, 0), 0,
        Revoked(), -30, 0,
        id="a dispute won gives back no more than the purchase's lot can hold",
    ),
    # 100 back, none owed, none taken: all 100 were covered by expiry, which is simply released
    pytest.param(
        Revoked(dispute=100), None, 0, PurchaseLot(100, 0, 100), 0,
        Revoked(), 0, 0,
        id="a dispute won whose credits had expired gives nothing back",
    ),
    # 100 clawed back as 20 taken + 50 covered by expiry + 30 owed; lowered to 50, so 50 back: the 30
    # owed first (cancelled), then 20 of the expiry's cover (nothing moves); the 20 taken stay taken
    pytest.param(
        Revoked(dispute=100, from_lot=20, as_debt=30), None, 50, PurchaseLot(100, 0, 50), 30,
        Revoked(dispute=50, from_lot=20), 0, -30,
        id="a dispute lowered gives back its debt first, then the expiry's cover, the taken credits last",
    ),
    # dispute min(70, 100 - 60) = 40: 40 more; the lot holds 40: 40 taken
    pytest.param(
        Revoked(refund=60, from_lot=60), None, 70, PurchaseLot(100, 40, 0), 0,
        Revoked(refund=60, dispute=40, from_lot=100), 40, 0,
        id="a dispute on top of a refund claws back only what the refund left",
    ),
    # refund 60, dispute squeezed to min(70, 100 - 60) = 40: total 70 -> 100, 30 more; 30 taken
    pytest.param(
        Revoked(dispute=70, from_lot=70), 60, None, PurchaseLot(100, 30, 0), 0,
        Revoked(refund=60, dispute=40, from_lot=100), 30, 0,
        id="a refund after a dispute squeezes the dispute so the total stops at the credits bought",
    ),
    # refund max(100, 100) = 100: the same total, nothing moves
    pytest.param(
        Revoked(refund=100, from_lot=40, as_debt=60), 100, None, PurchaseLot(100, 0, 0), 60,
        Revoked(refund=100, from_lot=40, as_debt=60), 0, 0,
        id="a replayed refund total changes nothing",
    ),
    # dispute min(100, 100 - 0) = 100: the same total, nothing moves
    pytest.param(
        Revoked(dispute=100, from_lot=30, as_debt=70), None, 100, PurchaseLot(100, 0, 0), 70,
        Revoked(dispute=100, from_lot=30, as_debt=70), 0, 0,
        id="a replayed lost dispute changes nothing",
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("before", "refund", "dispute", "lot", "debt", "after", "taken", "debt_added"), CLAW_BACKS
)
def test_a_claw_back_takes_from_the_lot_then_expiry_then_debt_and_gives_back_in_reverse(
    before: Revoked,
    refund: int | None,
    dispute: int | None,
    lot: PurchaseLot,
    debt: int,
    after: Revoked,
    taken: int,
    debt_added: int,
) -> None:
    done = claw_back(before, refund_target=refund, dispute_target=dispute, lot=lot, wallet_debt=debt)
    assert done == ClawBack(after, taken, debt_added, change=after.total - before.total)


@pytest.mark.parametrize(
    ("before", "refund", "dispute", "lot", "debt", "after", "taken", "debt_added"), CLAW_BACKS
)
def test_the_same_targets_again_change_nothing(
    before: Revoked,
    refund: int | None,
    dispute: int | None,
    lot: PurchaseLot,
    debt: int,
    after: Revoked,
    taken: int,
    debt_added: int,
) -> None:
    """A replayed or re-sent event finds the state its first delivery left, and moves nothing."""
    lot_after = PurchaseLot(lot.amount, lot.remaining - taken, lot.expired)
    again = claw_back(
        after, refund_target=refund, dispute_target=dispute, lot=lot_after, wallet_debt=debt + debt_added
    )
    assert again == ClawBack(after, 0, 0, 0)
