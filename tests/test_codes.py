"""Redeemable credit codes: made, listed and disabled from the CLI; redeemed through the API, the JSON
endpoint and the credits page's form; every refusal grants nothing; the limits hold under races."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from helpers import build_example_app, signed_up

from flask_credits import (
    BadCode,
    CodeAlreadyRedeemed,
    CodeDisabled,
    CodeExhausted,
    CodeExpired,
    CodeNotFound,
    CodeRefused,
    CreditCode,
)
from flask_credits.services import codes

HTML = {"Accept": "text/html"}


@pytest.fixture
def cli(app):
    runner = app.test_cli_runner()

    def invoke(*args):
        return runner.invoke(args=["credits", "codes", *args])

    return invoke


def redemptions(credits) -> list[tuple[int, str, int]]:
    r = credits.tables.code_redemptions
    with credits.db.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(sa.select(r.c.code_id, r.c.user_id, r.c.entry_id))]


def entries(credits) -> int:
    with credits.db.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(credits.tables.entries)).scalar_one()


def nothing_changed(credits, code: str, before_entries: int = 0, redeemed: int = 0) -> None:
    assert entries(credits) == before_entries
    found = credits.credit_code(code)
    assert found is None or found.redeemed == redeemed
    assert len(redemptions(credits)) == redeemed
    assert credits.audit() == []


# -- the command line ----------------------------------------------------------------------------------


def test_create_prints_a_random_readable_code_and_stores_it_with_the_os_user(cli, credits, monkeypatch):
    monkeypatch.setattr("getpass.getuser", lambda: "ops-anna")
    result = cli("create", "--credits", "500", "--max-redemptions", "100")
    assert result.exit_code == 0, result.output
    code = result.output.strip()
    assert re.fullmatch(rf"[{codes.ALPHABET}]{{4}}-[{codes.ALPHABET}]{{4}}-[{codes.ALPHABET}]{{4}}", code)
    found = credits.credit_code(code.lower())
    assert found == CreditCode(
        id=found.id,
        code=code,
        credits=500,
        max_redemptions=100,
        redeemed=0,
        per_user=1,
        expires_at=None,
        credits_expire_after=None,
        disabled=False,
        actor="ops-anna",
        created_at=found.created_at,
    )


def test_create_with_every_option_then_list_and_disable(cli, credits):
    result = cli(
        "create",
        "--credits",
        "200",
        "--max-redemptions",
        "3",
        "--per-user",
        "2",
        "--code",
        "welcome-2030",
        "--expires",
        "2099-01-01T00:00:00",
        "--credits-expire-after",
        "3600",
        "--actor",
        "support",
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "WELCOME-2030"
    found = credits.credit_code("WELCOME-2030")
    assert (found.per_user, found.credits_expire_after, found.actor) == (2, 3600, "support")
    assert found.expires_at == datetime(2099, 1, 1, tzinfo=timezone.utc)
    credits.redeem_code("alice", "welcome-2030")

    listed = cli("list")
    assert listed.exit_code == 0
    assert listed.output.splitlines() == [
        "WELCOME-2030\t200 credits\t1/3 redeemed\t2 per user\texpires 2099-01-01T00:00:00+00:00"
    ]
    disabled = cli("disable", "Welcome-2030")
    assert disabled.exit_code == 0, disabled.output
    assert "WELCOME-2030 disabled (1/3 redeemed)" in disabled.output
    assert cli("list").output.rstrip().endswith("\tdisabled")
    with pytest.raises(CodeDisabled):
        credits.redeem_code("bob", "WELCOME-2030")


def test_the_cli_refuses_what_cannot_work(cli, credits):
    assert cli("list").output.strip() == "no codes"
    assert cli("create", "--credits", "5", "--max-redemptions", "1", "--code", "TAKEN").exit_code == 0
    cases = [
        ["--credits", "0", "--max-redemptions", "1"],
        ["--credits", "5", "--max-redemptions", "0"],
        ["--credits", "5", "--max-redemptions", "1", "--per-user", "0"],
        ["--credits", "5", "--max-redemptions", "1", "--expires", "2000-01-01"],
        ["--credits", "5", "--max-redemptions", "1", "--expires", "soon"],
        ["--credits", "5", "--max-redemptions", "1", "--code", "no spaces"],
        ["--credits", "5", "--max-redemptions", "1", "--code", "x" * 65],
        ["--credits", "5", "--max-redemptions", "1", "--code", "taken"],
    ]
    for args in cases:
        result = cli("create", *args)
        assert result.exit_code != 0, (args, result.output)
    assert [c.code for c in credits.credit_codes()] == ["TAKEN"]
    unknown = cli("disable", "NOPE")
    assert unknown.exit_code == 1
    assert "no such code" in unknown.output


# -- redeeming ---------------------------------------------------------------------------------------


def test_redeeming_grants_the_credits_and_records_the_redemption(credits, received):
    code = credits.create_code(credits=500, max_redemptions=10, credits_expire_after=3600)
    entry = credits.redeem_code("alice", code.code.lower())
    assert (entry.amount, entry.kind, entry.balance_after) == (500, "grant", 500)
    assert entry.metadata == {"code_id": code.id}
    assert entry.reason == f"Redeemed code {code.code}"
    assert credits.balance("alice") == 500
    assert redemptions(credits) == [(code.id, "alice", entry.id)]
    assert credits.credit_code(code.code).redeemed == 1
    lots = credits.tables.lots
    with credits.db.engine.connect() as conn:
        expires_at = conn.execute(sa.select(lots.c.expires_at)).scalar_one()
    assert timedelta(minutes=59) < expires_at - entry.created_at <= timedelta(hours=1)
    redeemed = [kw for name, _, kw in received if name == "credits_redeemed"]
    assert redeemed == [{"wallet": entry.wallet, "amount": 500, "entry": entry, "code": code}]
    assert [name for name, _, _ in received] == ["credits_granted", "credits_redeemed"]
    assert credits.audit() == []


def test_a_key_wallet_counts_for_its_owner(credits):
    code = credits.create_code(credits=5, max_redemptions=10, per_user=2)
    credits.redeem_code("alice", code.code, key_id="k1")
    credits.redeem_code("alice", code.code)
    with pytest.raises(CodeAlreadyRedeemed):
        credits.redeem_code("alice", code.code, key_id="k2")
    balances = [credits.balance("alice", key_id) for key_id in ("k1", None, "k2")]
    assert balances == [5, 5, 0]
    assert credits.credit_code(code.code).redeemed == 2


@pytest.mark.parametrize(
    ("refusal", "error"),
    [
        ("unknown", CodeNotFound),
        ("expired", CodeExpired),
        ("disabled", CodeDisabled),
        ("exhausted", CodeExhausted),
        ("per_user", CodeAlreadyRedeemed),
    ],
)
def test_each_refusal_grants_nothing(credits, clock, received, refusal, error):
    code = credits.create_code(
        credits=50, max_redemptions=1, code="SPRING", expires_at=clock.now + timedelta(hours=1)
    )
    done = 0
    if refusal == "expired":
        clock.advance(hours=1)
    elif refusal == "disabled":
        credits.disable_code("spring")
    elif refusal in ("exhausted", "per_user"):
        if refusal == "per_user":  # room for more redemptions, but not by alice
            with credits.db.engine.begin() as conn:
                c = credits.tables.codes
                conn.execute(sa.update(c).values(max_redemptions=5))
        credits.redeem_code("bob" if refusal == "exhausted" else "alice", "SPRING")
        done = 1
    received.clear()
    with pytest.raises(error) as caught:
        credits.redeem_code("alice", "NOSUCH" if refusal == "unknown" else "spring")
    assert isinstance(caught.value, CodeRefused)
    assert received == []
    nothing_changed(credits, code.code, before_entries=done, redeemed=done)
    assert credits.balance("alice") == (0 if refusal != "per_user" else 50)


@pytest.mark.parametrize("bad", ["", "   ", "has space", "ÜMLAUT", "x" * 65, "a" * 100_000, None, 5, ["A"]])
def test_malformed_codes_are_refused_before_the_database(credits, bad):
    credits.create_code(credits=1, max_redemptions=1, code="A")
    with pytest.raises(BadCode):
        credits.redeem_code("alice", bad)
    nothing_changed(credits, "A")


def test_a_code_that_ran_out_while_being_redeemed_is_refused_by_the_conditional_update(credits, monkeypatch):
    """What the code row said when read is not what decides: the UPDATE in the grant's transaction is."""
    code = credits.create_code(credits=7, max_redemptions=1)
    credits.redeem_code("bob", code.code)
    stale = credits.credit_code(code.code)
    real_find = codes.find
    calls = []

    def find_stale_first(ext, text):
        calls.append(text)
        if len(calls) == 1:
            return CreditCode(**{**stale.__dict__, "redeemed": 0})
        return real_find(ext, text)

    monkeypatch.setattr(codes, "find", find_stale_first)
    with pytest.raises(CodeExhausted):
        credits.redeem_code("alice", code.code)
    assert credits.balance("alice") == 0
    nothing_changed(credits, code.code, before_entries=1, redeemed=1)


# -- the endpoint ------------------------------------------------------------------------------------


def test_json_redemption_answers_the_entry_and_the_balance(client, login, credits):
    code = credits.create_code(credits=300, max_redemptions=2)
    login("alice")
    answer = client.post("/credits/redeem", json={"code": f"  {code.code.lower()} "})
    assert answer.status_code == 200, answer.get_json()
    body = answer.get_json()
    assert body["balance"] == 300
    assert (body["entry"]["amount"], body["entry"]["kind"]) == (300, "grant")
    again = client.post("/credits/redeem", json={"code": code.code})
    assert again.status_code == 409
    assert again.get_json()["error"] == "code_already_redeemed"
    assert credits.balance("alice") == 300


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"code": "NOSUCH"}, 404, "code_not_found"),
        ({"code": "OLD"}, 410, "code_expired"),
        ({"code": "OFF"}, 410, "code_disabled"),
        ({"code": "GONE"}, 409, "code_exhausted"),
        ({"code": "bad code!"}, 400, "bad_request"),
        ({"code": "A" * 60_000}, 400, "bad_request"),
        ({"code": 12}, 400, "bad_request"),
        ({}, 400, "bad_request"),
        ({"code": "LIVE", "key_id": "not-alices"}, 400, "bad_request"),
    ],
)
def test_json_refusals(client, login, credits, clock, body, status, error):
    credits.create_code(credits=1, max_redemptions=1, code="OLD", expires_at=clock.now + timedelta(minutes=1))
    credits.create_code(credits=1, max_redemptions=1, code="OFF")
    credits.disable_code("OFF")
    credits.create_code(credits=1, max_redemptions=1, code="GONE")
    credits.redeem_code("bob", "GONE")
    credits.create_code(credits=1, max_redemptions=1, code="LIVE")
    clock.advance(minutes=2)
    login("alice")
    answer = client.post("/credits/redeem", json=body)
    assert answer.status_code == status
    assert answer.get_json()["error"] == error
    assert credits.balance("alice") == 0
    assert len(redemptions(credits)) == 1
    assert credits.audit() == []


def test_a_body_past_the_limit_is_refused_unread(client, login, credits):
    credits.create_code(credits=1, max_redemptions=1, code="LIVE")
    login("alice")
    answer = client.post("/credits/redeem", json={"code": "LIVE", "pad": "x" * 70_000})
    assert answer.status_code == 413
    assert credits.balance("alice") == 0


def test_nobody_logged_in_is_refused(client, credits):
    credits.create_code(credits=1, max_redemptions=1, code="LIVE")
    assert client.post("/credits/redeem", json={"code": "LIVE"}).status_code == 401
    assert credits.credit_code("LIVE").redeemed == 0


def test_the_page_has_an_accessible_code_form_that_redeems(client, login, credits):
    credits.create_code(credits=40, max_redemptions=5, code="PAGE")
    login("alice")
    page = client.get("/credits/", headers=HTML).get_data(as_text=True)
    form = re.search(r'<form method="post" action="/credits/redeem".*?</form>', page, re.S)
    assert form is not None
    assert "<legend>Have a code?</legend>" in form.group(0)
    assert '<label for="credits-code">' in form.group(0)
    assert 'id="credits-code"' in form.group(0)
    assert 'name="code"' in form.group(0)

    done = client.post("/credits/redeem", data={"code": "page"}, headers=HTML)
    assert done.status_code == 200
    html = done.get_data(as_text=True)
    assert "Code redeemed: 40 credits added." in html
    assert '<strong data-testid="balance">40</strong>' in html

    refused = client.post("/credits/redeem", data={"code": "page"}, headers=HTML)
    assert refused.status_code == 409
    html = refused.get_data(as_text=True)
    assert 'class="credits-error" role="alert">You have already redeemed this code.' in html
    assert 'value="page"' in html  # the form shows what was typed
    assert credits.balance("alice") == 40


@pytest.mark.config(CREDITS_REDEEM_RATE_LIMIT="3 per minute")
def test_attempts_are_rate_limited_per_user(app, client, login, credits):
    credits.create_code(credits=9, max_redemptions=5, code="REAL")
    login("alice")
    for guess in ("GUESS1", "GUESS2", "GUESS3"):
        assert client.post("/credits/redeem", json={"code": guess}).status_code == 404
    limited = client.post("/credits/redeem", json={"code": "REAL"})
    assert limited.status_code == 429
    assert limited.get_json()["error"] == "too_many_attempts"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    page = client.post("/credits/redeem", data={"code": "REAL"}, headers=HTML)
    assert page.status_code == 429
    assert "Too many attempts" in page.get_data(as_text=True)
    assert credits.balance("alice") == 0
    # Another user has attempts of their own.
    other = app.test_client()
    assert other.post("/_login/bob").status_code == 200
    assert other.post("/credits/redeem", json={"code": "real"}).status_code == 200
    assert credits.balance("bob") == 9


def test_a_rate_limit_that_cannot_work_stops_the_app(build_app):
    with pytest.raises(RuntimeError, match="CREDITS_REDEEM_RATE_LIMIT"):
        build_app(CREDITS_REDEEM_RATE_LIMIT="lots")
    with pytest.raises(RuntimeError, match="CREDITS_REDEEM_RATE_LIMIT"):
        build_app(CREDITS_REDEEM_RATE_LIMIT=10)


# -- races -------------------------------------------------------------------------------------------


def race(app, credits, jobs):
    """Run every (user_id, key_id) redemption at once; the outcome of each: an entry or the refusal."""
    barrier = threading.Barrier(len(jobs))

    def redeem(job):
        user_id, key_id, code = job
        with app.app_context():
            barrier.wait()
            try:
                return credits.redeem_code(user_id, code, key_id=key_id)
            except CodeRefused as exc:
                return type(exc)

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(redeem, jobs))


def test_a_hundred_users_at_once_get_exactly_the_maximum(app, credits, backend):
    if backend == "sqlite":
        pytest.skip("SQLite runs one writer at a time: nothing to race")
    code = credits.create_code(credits=25, max_redemptions=10, per_user=1)
    outcomes = race(app, credits, [(f"user-{i}", None, code.code) for i in range(100)])
    granted = [o for o in outcomes if not isinstance(o, type)]
    assert len(granted) == 10
    assert [o for o in outcomes if isinstance(o, type)] == [CodeExhausted] * 90
    assert credits.credit_code(code.code).redeemed == 10
    assert sorted(r[2] for r in redemptions(credits)) == sorted(e.id for e in granted)
    assert entries(credits) == 10
    assert credits.audit() == []


def test_one_user_racing_from_several_wallets_gets_exactly_per_user(app, credits, backend):
    if backend == "sqlite":
        pytest.skip("SQLite runs one writer at a time: nothing to race")
    code = credits.create_code(credits=25, max_redemptions=100, per_user=2)
    wallets = [None, "k1", "k2"]
    outcomes = race(app, credits, [("alice", wallets[i % 3], code.code) for i in range(30)])
    granted = [o for o in outcomes if not isinstance(o, type)]
    assert len(granted) == 2
    assert [o for o in outcomes if isinstance(o, type)] == [CodeAlreadyRedeemed] * 28
    assert sum(credits.balance("alice", k) for k in wallets) == 50
    assert credits.credit_code(code.code).redeemed == 2
    assert len(redemptions(credits)) == 2 == entries(credits)
    assert credits.audit() == []


# -- CSRF, in the example app ------------------------------------------------------------------------


def test_the_code_form_needs_the_csrf_token(empty_database):
    from example_app.models import db

    app = build_example_app(empty_database, WTF_CSRF_ENABLED=True)
    ext = app.extensions["credits"]
    try:
        with app.app_context():
            db.create_all()
            ext.create_code(credits=60, max_redemptions=1, code="CSRF")
        client = app.test_client()
        user = signed_up(client, "ada")
        page = client.get("/credits/").get_data(as_text=True)
        form = re.search(r'<form method="post" action="/credits/redeem".*?</form>', page, re.S)
        assert form is not None
        token = re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', form.group(0))
        assert token is not None
        assert client.post("/credits/redeem", data={"code": "csrf"}).status_code == 400
        with app.app_context():
            assert ext.balance(user) == 0
        answer = client.post("/credits/redeem", data={"code": "csrf", "csrf_token": token.group(1)})
        assert answer.status_code == 200
        assert "Code redeemed: 60 credits added." in answer.get_data(as_text=True)
        with app.app_context():
            assert ext.balance(user) == 60
            assert ext.audit() == []
    finally:
        with app.app_context():
            db.engine.dispose()
