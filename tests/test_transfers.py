"""Transfers between wallets (issue 17, item 2), on every backend: one transaction that keeps lots'
expiry, pays debt first, refuses what it cannot pay without writing anything, replays its idempotency
key, keeps the audit's invariants; under real concurrency; and the credits page's "Move credits"
(``POST /credits/transfer``) and ``flask credits transfer``."""

from __future__ import annotations

import contextlib
import random
import re
from datetime import timedelta

import pytest
import sqlalchemy as sa
from flask_wtf.csrf import CSRFProtect
from helpers import logged_in
from test_concurrency import Workers, race

from flask_credits import (
    IdempotencyConflict,
    InsufficientCredits,
    InvalidAmount,
    InvalidArgument,
    NotRefundable,
    Wallet,
)

ALICE, KEY, BOB = Wallet("alice"), Wallet("alice", "key-1"), Wallet("bob")


def lots_of(credits, wallet):
    """(amount, remaining, expires_at) of each of the wallet's lots, oldest first."""
    t = credits.tables
    with credits.db.engine.connect() as conn:
        return [
            (r.amount, r.remaining, r.expires_at)
            for r in conn.execute(
                sa.select(t.lots.c.amount, t.lots.c.remaining, t.lots.c.expires_at)
                .join(t.wallets, t.wallets.c.id == t.lots.c.wallet_id)
                .where(t.wallets.c.user_id == wallet.user_id, t.wallets.c.key_id == (wallet.key_id or ""))
                .order_by(t.lots.c.id)
            )
        ]


def rows(credits):
    """How many rows each ledger table holds."""
    t = credits.tables
    with credits.db.engine.connect() as conn:
        return {
            table.name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            for table in (t.wallets, t.entries, t.lots, t.draws)
        }


def wallet_row(credits, wallet):
    w = credits.tables.wallets
    with credits.db.engine.connect() as conn:
        return conn.execute(
            sa.select(w).where(w.c.user_id == wallet.user_id, w.c.key_id == (wallet.key_id or ""))
        ).one()


# -- the ledger ------------------------------------------------------------------------------------


def test_a_transfer_moves_credits_and_both_histories_name_the_other_wallet(credits):
    credits.grant("alice", 30, reason="welcome")
    out = credits.transfer(ALICE, BOB, 12, reason="for bob", actor="ops")
    assert (credits.balance("alice"), credits.balance("bob")) == (18, 12)
    [came] = credits.history("bob")
    assert (out.kind, out.amount, out.balance_after, out.reason, out.actor) == (
        "transfer",
        -12,
        18,
        "for bob",
        "ops",
    )
    assert (came.kind, came.amount, came.balance_after, came.reason, came.actor) == (
        "transfer",
        12,
        12,
        "for bob",
        "ops",
    )
    assert out.metadata == {"to": {"user_id": "bob", "key_id": None, "entry_id": came.id}}
    assert came.metadata == {"from": {"user_id": "alice", "key_id": None}}
    assert credits.history("alice")[0] == out
    assert credits.audit() == []


def test_moved_credits_keep_their_expiry_and_expire_in_the_target_when_they_would_have(credits, clock):
    soon, later = clock.now + timedelta(hours=1), clock.now + timedelta(hours=3)
    credits.grant("alice", 10, reason="soon", expires_at=soon)
    credits.grant("alice", 5, reason="never")
    credits.grant("alice", 4, reason="later", expires_at=later)
    credits.transfer(ALICE, KEY, 16, reason="to the key")  # 10 soon, 4 later, 2 of the never-expiring
    assert sorted(lots_of(credits, KEY), key=lambda lot: lot[0]) == [
        (2, 2, None),
        (4, 4, later.replace(tzinfo=lots_of(credits, KEY)[0][2].tzinfo)),
        (10, 10, soon.replace(tzinfo=lots_of(credits, KEY)[0][2].tzinfo)),
    ]
    assert wallet_row(credits, KEY).next_expiry == lots_of(credits, KEY)[0][2]
    assert credits.audit() == []
    clock.advance(hours=2)
    assert credits.balance("alice", "key-1") == 6
    clock.advance(hours=2)
    assert credits.balance("alice", "key-1") == 2
    assert credits.balance("alice") == 3
    assert credits.audit() == []


def test_an_incoming_transfer_pays_the_targets_debt_first(credits):
    credits.grant("bob", 5, reason="start")
    hold = credits.hold("bob", 5, ttl=600)
    credits.settle(hold.id, 8)  # 3 more than the wallet had: debt
    assert wallet_row(credits, BOB).debt == 3
    credits.grant("alice", 10, reason="welcome")
    credits.transfer(ALICE, BOB, 4, reason="help")
    assert (credits.balance("bob"), wallet_row(credits, BOB).debt) == (1, 0)
    debt, came = credits.history("bob")[:2]
    assert (came.kind, came.amount, debt.kind, debt.amount, debt.balance_after) == (
        "transfer",
        4,
        "debt",
        -3,
        1,
    )
    assert credits.audit() == []
    # More debt than the transfer: all of it pays debt, none reaches the balance.
    credits.grant("bob", 2, reason="again")
    hold = credits.hold("bob", 3, ttl=600)
    credits.settle(hold.id, 10)
    assert wallet_row(credits, BOB).debt == 7
    credits.transfer(ALICE, BOB, 6, reason="help")
    assert (credits.balance("bob"), wallet_row(credits, BOB).debt) == (0, 1)
    assert credits.audit() == []


def test_a_source_that_cannot_pay_is_refused_and_nothing_is_written(credits, received):
    credits.grant("alice", 5, reason="welcome")
    before = rows(credits)
    with pytest.raises(InsufficientCredits) as refused:
        credits.transfer(ALICE, BOB, 6, reason="too much")
    assert (refused.value.required, refused.value.balance) == (6, 5)
    with pytest.raises(InsufficientCredits):
        credits.transfer(Wallet("nobody"), ALICE, 1, reason="no wallet")
    assert rows(credits) == before  # not even bob's wallet
    assert [n for n, _, _ in received if n == "credits_transferred"] == []
    assert [kw["required"] for n, _, kw in received if n == "credits_insufficient"] == [6, 1]


def test_credits_held_by_live_holds_cannot_move(credits):
    credits.grant("alice", 10, reason="welcome")
    credits.hold("alice", 7, ttl=600)
    with pytest.raises(InsufficientCredits):
        credits.transfer(ALICE, KEY, 4, reason="held")
    credits.transfer(ALICE, KEY, 3, reason="free")
    assert (credits.balance("alice"), credits.held("alice"), credits.balance("alice", "key-1")) == (0, 7, 3)
    assert credits.audit() == []


def test_expired_lots_expire_first_and_do_not_move(credits, clock):
    credits.grant("alice", 10, reason="soon", expires_at=clock.now + timedelta(hours=1))
    credits.grant("alice", 5, reason="never")
    clock.advance(hours=2)
    with pytest.raises(InsufficientCredits):
        credits.transfer(ALICE, BOB, 6, reason="too much now")
    credits.transfer(ALICE, BOB, 5, reason="what is left")
    assert [e.kind for e in credits.history("alice")] == ["transfer", "expire", "grant", "grant"]
    assert credits.audit() == []


def test_a_replayed_key_returns_the_original_and_another_request_with_it_conflicts(credits, received):
    credits.grant("alice", 20, reason="welcome")
    first = credits.transfer(ALICE, BOB, 5, reason="x", idempotency_key="move-1")
    again = credits.transfer(ALICE, BOB, 5, reason="x", idempotency_key="move-1")
    assert (again.id, again.replayed, first.replayed) == (first.id, True, False)
    with pytest.raises(IdempotencyConflict):
        credits.transfer(ALICE, BOB, 6, reason="x", idempotency_key="move-1")
    with pytest.raises(IdempotencyConflict):
        credits.transfer(ALICE, KEY, 5, reason="x", idempotency_key="move-1")
    with pytest.raises(IdempotencyConflict):
        credits.spend("alice", 5, reason="x", idempotency_key="move-1")
    assert (credits.balance("alice"), credits.balance("bob")) == (15, 5)
    assert [n for n, _, _ in received].count("credits_transferred") == 1


def test_bad_transfers_are_invalid_and_write_nothing(credits):
    credits.grant("alice", 20, reason="welcome")
    before = rows(credits)
    with pytest.raises(InvalidArgument, match="same wallet"):
        credits.transfer(ALICE, Wallet("alice", None), 1, reason="x")
    for amount in (0, -1, 1.5, True, "3", None, 10**16):
        with pytest.raises(InvalidAmount):
            credits.transfer(ALICE, BOB, amount, reason="x")
    with pytest.raises(InvalidArgument):
        credits.transfer(ALICE, BOB, 1, reason="")
    with pytest.raises(InvalidArgument):
        credits.transfer(("alice", None, "x"), BOB, 1, reason="r")
    with pytest.raises(InvalidArgument):
        credits.transfer(ALICE, Wallet(""), 1, reason="r")
    assert rows(credits) == before


def test_a_transfer_cannot_be_refunded(credits):
    credits.grant("alice", 20, reason="welcome")
    out = credits.transfer(ALICE, BOB, 5, reason="x")
    with pytest.raises(NotRefundable):
        credits.refund("alice", out.id)
    with pytest.raises(NotRefundable):
        credits.refund("bob", credits.history("bob")[0].id)


def test_the_signal_carries_both_wallets_and_entries_and_a_transfer_out_is_a_debit(app, credits, received):
    credits.grant("alice", 60, reason="welcome")
    credits.set_low_balance("alice", 50)
    out = credits.transfer(ALICE, KEY, 15, reason="x")
    [sent] = [(s, kw) for n, s, kw in received if n == "credits_transferred"]
    came = credits.history("alice", "key-1")[0]
    assert sent == (
        app,
        {"from_wallet": ALICE, "to_wallet": KEY, "amount": 15, "entry": out, "to_entry": came},
    )
    low = [kw for n, _, kw in received if n == "credits_low"]
    assert low == [{"wallet": ALICE, "balance": 45, "threshold": 50, "entry": out}]


# -- concurrency -----------------------------------------------------------------------------------


def test_opposite_transfers_and_spends_at_once_conserve_every_credit(app, credits, backend):
    if backend == "sqlite":
        pytest.skip("SQLite has one writer at a time: no lock order to get wrong")
    credits.grant("alice", 500, reason="a")
    credits.grant("bob", 500, reason="b")
    rounds = 12

    def body(i: int) -> int:
        spent = 0
        mine = random.Random(i)
        for n in range(rounds):
            source, target = (ALICE, BOB) if (i + n) % 2 else (BOB, ALICE)
            with contextlib.suppress(InsufficientCredits):
                credits.transfer(source, target, mine.randint(1, 40), reason="race")
            if n % 3 == 0:
                try:
                    credits.spend(source.user_id, 1, reason="race")
                    spent += 1
                except InsufficientCredits:
                    pass
        return spent

    spent = sum(race(app, 16, body))
    assert credits.balance("alice") + credits.balance("bob") + spent == 1000
    assert credits.audit() == []
    e = credits.tables.entries
    with credits.db.engine.connect() as conn:
        moved = conn.execute(sa.select(sa.func.sum(e.c.amount)).where(e.c.kind == "transfer")).scalar_one()
        lowest = conn.execute(sa.select(sa.func.min(e.c.balance_after))).scalar_one()
    assert (moved, lowest >= 0) == (0, True)


def test_concurrent_transfers_with_one_key_move_once_and_all_get_the_entry(app, credits, backend):
    credits.grant("alice", 100, reason="welcome")
    count = 6 if backend == "sqlite" else 16
    found = race(app, count, lambda i: credits.transfer(ALICE, BOB, 10, reason="x", idempotency_key="once"))
    assert len({e.id for e in found}) == 1
    assert sum(not e.replayed for e in found) == 1
    assert (credits.balance("alice"), credits.balance("bob")) == (90, 10)
    assert credits.audit() == []


def test_concurrent_transfers_into_a_wallet_in_debt_pay_it_exactly_once(app, credits, backend):
    count = 6 if backend == "sqlite" else 16
    # The givers' wallets first: each transfer locks its source, then waits for the target's row,
    # and must read the target's debt as the previous transfer left it.
    for i in range(count):
        credits.grant(f"giver-{i}", 5, reason="to give")
    credits.grant("bob", 10, reason="start")
    hold = credits.hold("bob", 10, ttl=600)
    credits.settle(hold.id, 60)
    assert wallet_row(credits, BOB).debt == 50
    race(app, count, lambda i: credits.transfer(Wallet(f"giver-{i}"), BOB, 5, reason="help"))
    assert (wallet_row(credits, BOB).debt, credits.balance("bob")) == (
        max(0, 50 - 5 * count),
        max(0, 5 * count - 50),
    )
    assert sum(-e.amount for e in credits.history("bob", limit=100) if e.kind == "debt") == min(50, 5 * count)
    assert credits.audit() == []


@pytest.fixture(scope="module")
def workers():
    pool = Workers(4)
    yield pool
    pool.close()


def test_processes_transferring_both_ways_at_once_conserve_every_credit_and_move_a_key_once(
    app, credits, database_url, backend, workers
):
    if backend == "sqlite":
        pytest.skip("SQLite has one writer at a time: no lock order to get wrong")
    credits.grant("alice", 300, reason="a")
    credits.grant("bob", 300, reason="b")
    moves = [["alice", "bob", 7, None], ["bob", "alice", 11, None], ["alice", "bob", 5, "same-for-all"]] * 8
    outcomes = workers.run({"url": database_url, "transfers": moves})

    keyed = [m for o in outcomes for m in o["moved"] if m[1] == 5]  # only the keyed transfer moves 5
    assert len({entry_id for entry_id, _, _ in keyed}) == 1
    assert [replayed for _, _, replayed in keyed].count(False) == 1
    assert credits.balance("alice") + credits.balance("bob") == 600
    assert credits.audit() == []
    e = credits.tables.entries
    with credits.db.engine.connect() as conn:
        lowest = conn.execute(sa.select(sa.func.min(e.c.balance_after))).scalar_one()
    assert lowest >= 0


# -- the credits page ------------------------------------------------------------------------------


@pytest.fixture
def keys(credits):
    @credits.keys_loader
    def alices_keys(user_id):
        return [("key-1", "laptop"), ("key-2", "server")] if user_id == "alice" else [("key-b", "bobs")]


def move(client, **data):
    return client.post("/credits/transfer", data=data)


def test_the_page_offers_the_move_form_with_revoked_keys_holding_credits_as_sources(app, credits, keys):
    credits.grant("alice", 10, reason="welcome")
    credits.grant("alice", 7, reason="old", key_id="key-gone")
    page = logged_in(app).get("/credits/").get_data(as_text=True)
    form = page[page.index('data-testid="move-form"') :]
    form = form[: form.index("</form>")]
    sources = re.findall(r'<option value="([^"]*)"', form[: form.index('name="to_key_id"')])
    targets = re.findall(r'<option value="([^"]*)"', form[form.index('name="to_key_id"') :])
    assert sources == ["", "key-1", "key-2", "key-gone"]
    assert targets == ["", "key-1", "key-2"]
    assert "revoked API key key-gone (7 credits)" in form
    assert re.search(r'name="idempotency_key" value="move-[\w-]{20,}"', form)


def test_a_form_moves_credits_and_goes_back_to_the_page_saying_so(app, credits, keys):
    credits.grant("alice", 10, reason="welcome")
    client = logged_in(app)
    response = move(client, from_key_id="", to_key_id="key-1", amount="4", idempotency_key="move-a")
    assert (response.status_code, response.headers["Location"]) == (303, "http://localhost/credits/")
    page = client.get("/credits/").get_data(as_text=True)
    assert "Moved 4 credits from your account to API key laptop." in page
    assert "to API key laptop" in page  # the history row says where they went
    assert (credits.balance("alice"), credits.balance("alice", "key-1")) == (6, 4)


def test_a_double_submit_of_the_form_moves_once(app, credits, keys):
    credits.grant("alice", 10, reason="welcome")
    client = logged_in(app)
    token = re.search(
        r'name="idempotency_key" value="([^"]+)"', client.get("/credits/").get_data(as_text=True)
    )
    form = {"from_key_id": "", "to_key_id": "key-1", "amount": "4", "idempotency_key": token.group(1)}
    assert move(client, **form).status_code == 303
    assert move(client, **form).status_code == 303
    assert "Already moved 4 credits" in client.get("/credits/").get_data(as_text=True)
    assert (credits.balance("alice"), credits.balance("alice", "key-1")) == (6, 4)


def test_json_answers_both_entries_and_a_revoked_keys_credits_come_back(app, credits, keys):
    credits.grant("alice", 7, reason="old", key_id="key-gone")
    client = logged_in(app)
    response = client.post(
        "/credits/transfer", json={"from_key_id": "key-gone", "to_key_id": None, "amount": 7}
    )
    assert response.status_code == 200
    body = response.json
    assert (body["from"]["amount"], body["from"]["key_id"], body["to"]["amount"], body["to"]["key_id"]) == (
        -7,
        "key-gone",
        7,
        None,
    )
    assert body["replayed"] is False
    assert (credits.balance("alice"), credits.balance("alice", "key-gone")) == (7, 0)


def test_a_source_that_cannot_pay_is_402_and_moves_nothing(app, credits, keys):
    credits.grant("alice", 3, reason="welcome")
    client = logged_in(app)
    response = client.post("/credits/transfer", json={"from_key_id": "", "to_key_id": "key-1", "amount": 5})
    assert response.status_code == 402
    assert (response.json["required"], response.json["balance"]) == (5, 3)
    page = move(client, from_key_id="", to_key_id="key-1", amount="5")
    assert page.status_code == 402
    assert "Your account has 3 credits to move, not 5." in page.get_data(as_text=True)
    assert (credits.balance("alice"), credits.balance("alice", "key-1")) == (3, 0)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"from_key_id": "key-b", "to_key_id": ""}, id="another user's key as the source"),
        pytest.param({"from_key_id": "", "to_key_id": "key-b"}, id="another user's key as the target"),
        pytest.param({"from_key_id": "", "to_key_id": "key-gone"}, id="a revoked key as the target"),
        pytest.param({"from_key_id": "made-up", "to_key_id": ""}, id="a made-up key"),
        pytest.param({"from_key_id": ["key-1"], "to_key_id": ""}, id="not a string"),
    ],
)
def test_a_wallet_that_is_not_the_users_is_404(app, credits, keys, data):
    credits.grant("bob", 5, reason="bob's", key_id="key-b")
    credits.grant("alice", 5, reason="old", key_id="key-gone")
    credits.grant("alice", 5, reason="welcome")
    before = rows(credits)
    response = logged_in(app).post("/credits/transfer", json={**data, "amount": 1})
    assert (response.status_code, response.json["error"]) == (404, "not_found")
    assert rows(credits) == before


@pytest.mark.parametrize("amount", [0, -3, "", "two", "1.5", 1.5, True, None, "9" * 30, [1]])
def test_a_bad_amount_is_400(app, credits, keys, amount):
    credits.grant("alice", 5, reason="welcome")
    client = logged_in(app)
    response = client.post(
        "/credits/transfer", json={"from_key_id": "", "to_key_id": "key-1", "amount": amount}
    )
    assert (response.status_code, response.json["error"]) == (400, "bad_request")
    if not isinstance(amount, list):
        page = move(client, from_key_id="", to_key_id="key-1", amount=str(amount))
        assert page.status_code == 400
    assert credits.balance("alice") == 5


@pytest.mark.parametrize("key", ["", "a\x00b", "x" * 256, "sp ace", 5, ["k"]])
def test_a_bad_idempotency_key_is_400(app, credits, keys, key):
    credits.grant("alice", 5, reason="welcome")
    body = {"from_key_id": "", "to_key_id": "key-1", "amount": 1, "idempotency_key": key}
    response = logged_in(app).post("/credits/transfer", json=body)
    assert response.status_code == (200 if key == "" else 400)  # empty: no key
    assert credits.balance("alice") == (4 if key == "" else 5)


def test_a_nul_byte_in_a_key_id_is_404_not_a_database_error(app, credits, keys):
    credits.grant("alice", 5, reason="welcome")
    response = logged_in(app).post(
        "/credits/transfer", json={"from_key_id": "k\x00", "to_key_id": "", "amount": 1}
    )
    assert response.status_code == 404


def test_the_same_wallet_twice_is_400_and_an_api_key_request_is_403(app, credits, keys):
    credits.grant("alice", 5, reason="welcome")
    response = logged_in(app).post(
        "/credits/transfer", json={"from_key_id": "key-1", "to_key_id": "key-1", "amount": 1}
    )
    assert response.status_code == 400

    @credits.wallet_loader
    def as_a_key():
        return ("alice", "key-1")

    response = app.test_client().post(
        "/credits/transfer", json={"from_key_id": "", "to_key_id": "key-2", "amount": 1}
    )
    assert (response.status_code, response.json["error"]) == (403, "forbidden")
    assert credits.balance("alice") == 5


def test_the_form_needs_a_csrf_token(app, credits, keys):
    app.config["WTF_CSRF_ENABLED"] = False
    CSRFProtect(app)
    credits.grant("alice", 5, reason="welcome")
    client = logged_in(app)  # the test's login route has no form
    app.config["WTF_CSRF_ENABLED"] = True
    assert move(client, from_key_id="", to_key_id="key-1", amount="1").status_code == 400
    page = client.get("/credits/").get_data(as_text=True)
    form = page[page.index('data-testid="move-form"') :]
    token = re.search(r'name="csrf_token" value="([^"]+)"', form)
    assert token is not None
    assert (
        move(client, from_key_id="", to_key_id="key-1", amount="1", csrf_token=token.group(1)).status_code
        == 303
    )
    assert credits.balance("alice", "key-1") == 1


# -- the command line ------------------------------------------------------------------------------


@pytest.fixture
def cli(app):
    runner = app.test_cli_runner()
    return lambda *args: runner.invoke(args=["credits", *args])


@pytest.fixture
def alices_keys(credits):
    @credits.wallet_checker
    def owns(user_id, key_id):
        return (user_id, key_id) in {("alice", None), ("bob", None), ("alice", "key-1")}


def test_the_cli_moves_a_revoked_keys_credits_and_says_a_replay_changed_nothing(cli, credits, alices_keys):
    credits.grant("alice", 9, reason="old", key_id="key-old")
    refused = cli("grant", "alice", "1", "--reason", "r", "--key", "key-old")
    assert refused.exit_code == 1
    assert refused.output.strip() == (
        "Error: key 'key-old' of user alice is revoked (or no longer theirs); it still holds 9 credits:"
        " `flask credits transfer alice 9 --from-key key-old --reason ...` moves them to the user's account"
    )
    args = [
        "transfer",
        "alice",
        "9",
        "--from-key",
        "key-old",
        "--reason",
        "rescue",
        "--idempotency-key",
        "r1",
    ]
    moved = cli(*args, "--actor", "ops")
    entry_id = credits.history("alice", "key-old")[0].id
    assert (moved.exit_code, moved.output.strip()) == (
        0,
        f"moved 9 credits from key 'key-old' to the user's account (entry {entry_id});"
        " 0 left in key 'key-old'",
    )
    again = cli(*args)
    assert again.output.strip().startswith("already moved 9 credits from key 'key-old' to the user's account")
    assert (credits.balance("alice"), credits.history("alice")[0].actor) == (9, "ops")


def test_the_cli_refuses_clearly(cli, credits, alices_keys):
    credits.grant("alice", 3, reason="welcome")
    cases = [
        (
            ["transfer", "alice", "5", "--to-key", "key-1", "--reason", "r"],
            "Error: the user's account has 3 credits that can move, not 5",
        ),
        (["transfer", "alice", "1", "--to-key", "key-9", "--reason", "r"], "is not one of user alice's keys"),
        (
            ["transfer", "alice", "1", "--from-key", "key-9", "--reason", "r"],
            "is not one of user alice's keys",
        ),
        (["transfer", "alice", "1", "--reason", "r"], "same wallet"),
        (["transfer", "mallory", "1", "--reason", "r"], "unknown user 'mallory'"),
        (["transfer", "alice", "0", "--to-key", "key-1", "--reason", "r"], "amount must be at least 1"),
        (
            ["transfer", "alice", "1", "--from-key", "k" * 300, "--reason", "r"],
            "is not one of user alice's keys",
        ),
        (["grant", "alice", "1", "--key", "k" * 300, "--reason", "r"], "is not one of user alice's keys"),
    ]
    for args, said in cases:
        result = cli(*args)
        assert result.exit_code == 1, args
        assert "Traceback" not in result.output
        assert said in result.output, (args, result.output)
    assert credits.balance("alice") == 3
