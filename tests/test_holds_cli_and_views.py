"""Holds where operators and users see them: ``flask credits holds``, ``balance`` and ``expire``, the
credits page and ``/credits/balance``."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa


@pytest.fixture
def cli(app):
    runner = app.test_cli_runner()

    def invoke(*args):
        return runner.invoke(args=["credits", *args])

    return invoke


def lines(result):
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def stored_hold(db, credits, hold_id):
    h = credits.tables.holds
    with db.engine.connect() as conn:
        return conn.execute(sa.select(h.c.status, h.c.amount).where(h.c.id == hold_id)).one()


def stored_wallet(db, credits, user_id="alice"):
    w = credits.tables.wallets
    with db.engine.connect() as conn:
        return conn.execute(sa.select(w.c.balance, w.c.held).where(w.c.user_id == user_id)).one()


# -- flask credits holds -------------------------------------------------------------------------------


def test_cli_holds_lists_live_holds_soonest_expiry_first_then_their_total(cli, credits, clock):
    credits.grant("alice", 100, reason="x")
    later = credits.hold("alice", 30, ttl=600, reason="render the report")
    sooner = credits.hold("alice", 20, ttl=60, reason="llm answer")
    settled = credits.hold("alice", 5, ttl=10)
    credits.settle(settled.id, 5)
    released = credits.hold("alice", 7, ttl=10)
    credits.release(released.id)

    out = lines(cli("holds", "alice"))

    assert out == [
        f"{sooner.id}\t2030-01-01T12:00:00+00:00\t2030-01-01T12:01:00+00:00\t20\tllm answer",
        f"{later.id}\t2030-01-01T12:00:00+00:00\t2030-01-01T12:10:00+00:00\t30\trender the report",
        "50 credits held by 2 live holds",
    ]


def test_cli_holds_of_an_api_key_are_the_keys_own(cli, credits):
    credits.grant("alice", 10, key_id="k1", reason="x")
    credits.grant("alice", 10, reason="x")
    on_key = credits.hold("alice", 4, key_id="k1", reason="stream")

    key_lines = lines(cli("holds", "alice", "--key", "k1"))
    assert [line.split("\t")[0] for line in key_lines[:-1]] == [str(on_key.id)]
    assert key_lines[-1] == "4 credits held by 1 live holds"
    assert lines(cli("holds", "alice")) == ["no live holds"]


def test_cli_holds_of_a_user_without_a_wallet_is_empty(cli):
    assert lines(cli("holds", "bob")) == ["no live holds"]


def test_cli_holds_leaves_out_a_hold_past_its_expiry_before_any_sweep(cli, credits, clock, db):
    credits.grant("alice", 50, reason="x")
    gone = credits.hold("alice", 10, ttl=60)
    kept = credits.hold("alice", 15, ttl=600)
    clock.advance(minutes=2)

    out = lines(cli("holds", "alice"))

    assert [line.split("\t")[0] for line in out[:-1]] == [str(kept.id)]
    assert out[-1] == "15 credits held by 1 live holds"
    assert stored_hold(db, credits, gone.id).status == "held"  # listing is a read: no sweep happened


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["holds", "mallory"], "unknown user 'mallory'"),
        (["holds", "alice", "--key", " k1"], "key_id must be 1 to"),
        (["holds", "alice", "--key", "k" * 65], "key_id must be 1 to"),
        (["holds"], "Missing argument 'USER'"),
        (["balance", "alice", "--key", " k1"], "key_id must be 1 to"),
    ],
)
def test_cli_holds_refuses_bad_input_with_a_message_not_a_traceback(cli, credits, args, message):
    credits.grant("alice", 10, reason="x")
    credits.hold("alice", 3)

    result = cli(*args)

    assert result.exit_code != 0
    assert message in result.output
    assert isinstance(result.exception, SystemExit)  # click's error exit, not an uncaught exception
    assert "Traceback" not in result.output
    assert (credits.balance("alice"), credits.held("alice")) == (7, 3)


# -- flask credits balance and expire ------------------------------------------------------------------


def test_cli_balance_shows_held_credits_only_while_there_are_some(cli, credits):
    credits.grant("alice", 100, reason="x")
    assert lines(cli("balance", "alice")) == ["100"]

    hold = credits.hold("alice", 30)
    assert lines(cli("balance", "alice")) == ["70 (30 held)"]

    credits.release(hold.id)
    assert lines(cli("balance", "alice")) == ["100"]


def test_cli_balance_after_a_settle_shows_the_charge_and_no_hold(cli, credits):
    credits.grant("alice", 100, reason="x")
    hold = credits.hold("alice", 30)
    credits.settle(hold.id, 12)
    assert lines(cli("balance", "alice")) == ["88"]


def test_cli_balance_counts_an_expired_hold_as_spendable_again(cli, credits, clock):
    credits.grant("alice", 100, reason="x")
    credits.hold("alice", 30, ttl=60)
    credits.hold("alice", 5, ttl=600)
    clock.advance(minutes=2)
    assert lines(cli("balance", "alice")) == ["95 (5 held)"]


def test_cli_expire_releases_expired_holds_in_the_database(cli, credits, clock, db):
    credits.grant("alice", 40, reason="x")
    credits.grant("bob", 40, reason="x")
    expired = credits.hold("alice", 25, ttl=60)
    live = credits.hold("bob", 25, ttl=600)
    clock.advance(minutes=2)

    out = lines(cli("expire"))

    assert out[0] == "checked 1 wallets with expired credits or holds"
    assert stored_hold(db, credits, expired.id).status == "expired"
    assert tuple(stored_wallet(db, credits, "alice")) == (40, 0)
    assert stored_hold(db, credits, live.id).status == "held"
    assert tuple(stored_wallet(db, credits, "bob")) == (15, 25)
    assert credits.history("alice")[0].kind == "grant"  # a released hold leaves no entry behind
    assert lines(cli("audit"))[-1].startswith("audit passed")


def test_cli_expire_releases_a_hold_and_expires_the_lot_it_drew_on(cli, credits, clock, db):
    credits.grant("alice", 10, reason="trial", expires_at=clock.now + timedelta(minutes=5))
    credits.grant("alice", 10, reason="paid")
    hold = credits.hold("alice", 8, ttl=3600)  # from the trial lot, which expires first
    clock.advance(minutes=10)
    assert lines(cli("expire"))[0] == "checked 1 wallets with expired credits or holds"
    clock.advance(hours=1)

    out = lines(cli("expire"))

    assert out[0] == "checked 1 wallets with expired credits or holds"
    assert stored_hold(db, credits, hold.id).status == "expired"
    assert tuple(stored_wallet(db, credits, "alice")) == (10, 0)
    assert [e.kind for e in credits.history("alice")] == ["expire", "expire", "grant", "grant"]
    assert lines(cli("audit"))[-1].startswith("audit passed")


# -- the credits page and /credits/balance -------------------------------------------------------------


def test_json_balance_adds_held_and_leaves_it_out_of_the_balance(client, login, credits):
    credits.grant("alice", 100, reason="x")
    login("alice")
    assert client.get("/credits/balance").json == {
        "user_id": "alice",
        "key_id": None,
        "balance": 100,
        "held": 0,
    }
    hold = credits.hold("alice", 30)
    assert client.get("/credits/balance").json == {
        "user_id": "alice",
        "key_id": None,
        "balance": 70,
        "held": 30,
    }
    credits.settle(hold.id, 45)
    body = client.get("/credits/balance").json
    assert (body["balance"], body["held"]) == (55, 0)


def test_json_balance_of_a_user_without_a_wallet_holds_nothing(client, login):
    login("bob")
    assert client.get("/credits/balance").json == {"user_id": "bob", "key_id": None, "balance": 0, "held": 0}


def test_json_balance_stops_counting_a_hold_once_it_expired(client, login, credits, clock):
    credits.grant("alice", 100, reason="x")
    credits.hold("alice", 30, ttl=60)
    login("alice")
    clock.advance(minutes=2)
    body = client.get("/credits/balance").json
    assert (body["balance"], body["held"]) == (100, 0)


def test_credits_page_shows_credits_reserved_by_running_requests(client, login, credits):
    credits.grant("alice", 100, reason="x")
    login("alice")
    page = client.get("/credits/").get_data(as_text=True)
    assert 'data-testid="balance">100<' in page
    assert "reserved" not in page

    credits.hold("alice", 30, reason="llm answer")
    page = client.get("/credits/").get_data(as_text=True)
    assert 'data-testid="balance">70<' in page
    assert '<span data-testid="held">30</span> credits reserved by running requests' in page


def test_credits_page_shows_what_each_api_keys_holds_reserve_only_when_some_do(client, login, credits):
    @credits.keys_loader
    def keys(user_id):
        return [("key-1", "laptop"), ("key-2", "ci")] if user_id == "alice" else []

    credits.grant("alice", 10, key_id="key-1", reason="x")
    login("alice")
    page = client.get("/credits/", headers={"Accept": "text/html"}).get_data(as_text=True)
    assert "Reserved" not in page
    assert 'data-testid="key-held-' not in page

    hold = credits.hold("alice", 4, key_id="key-1")
    page = client.get("/credits/", headers={"Accept": "text/html"}).get_data(as_text=True)
    assert 'data-testid="key-balance-key-1">6<' in page
    assert 'data-testid="key-held-key-1">4<' in page
    assert 'data-testid="key-held-key-2">0<' in page
    assert "credits reserved by running requests" not in page  # the user's own wallet holds nothing

    credits.release(hold.id)
    page = client.get("/credits/", headers={"Accept": "text/html"}).get_data(as_text=True)
    assert 'data-testid="key-held-' not in page


@pytest.mark.parametrize("first", ["spend", "settle of another hold"])
def test_settle_with_an_idempotency_key_another_entry_used_is_a_conflict(credits, first):
    from flask_credits.errors import IdempotencyConflict

    credits.grant("alice", 100, reason="x")
    if first == "spend":
        credits.spend("alice", 5, reason="s", idempotency_key="K")
    else:
        credits.settle(credits.hold("alice", 10).id, 5, idempotency_key="K")
    hold = credits.hold("alice", 10)

    with pytest.raises(IdempotencyConflict):
        credits.settle(hold.id, 5, idempotency_key="K")
    assert (credits.balance("alice"), credits.held("alice")) == (85, 10)  # 5 spent, 10 held, nothing else
