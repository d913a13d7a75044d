"""The Idempotency-Key header on a @requires_credits view: one run and one charge per key, wallet and
endpoint; the stored response replayed; 422 for the key reused with another request, 409 while the
first runs; a failed or refused run frees its key; dead runs are taken over or settled; on SQLite,
PostgreSQL and MariaDB, with threads at once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import sqlalchemy as sa
from flask import Response, g, jsonify, request
from helpers import logged_in, make_app

from flask_credits import CreditsUnavailable, requires_credits
from flask_credits.core.ledger import Ledger
from flask_credits.services.idempotency import fingerprint

JSON = {"Accept": "application/json"}
HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


class Views:
    """The paid views of these tests, with what each run did."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, object]] = []
        self.fail_next = 0  # how many of the next /flaky runs fail
        self.started = threading.Event()
        self.release = threading.Event()


@pytest.fixture
def views(app):
    return add_views(app, Views())


def add_views(app, v):
    """Register the paid views on ``app``, recording their runs in ``v``."""

    @app.post("/persona")
    @app.put("/persona")
    @requires_credits(5)
    def persona():
        body = request.get_json(silent=True) or {}
        v.runs.append(("persona", body.get("seed")))
        response = jsonify(run=len(v.runs), seed=body.get("seed"), balance=g.credits_spend.balance_after)
        response.status_code = 201
        response.headers["Location"] = f"/persona/{len(v.runs)}"
        response.headers["X-Run"] = str(len(v.runs))
        response.set_cookie("first_run_only", "yes")
        return response

    @app.post("/sized/<int:n>")
    @requires_credits(lambda: int(request.view_args["n"]))
    def sized(n):
        v.runs.append(("sized", n))
        return {"n": n, "run": len(v.runs)}

    @app.post("/free")
    @requires_credits(lambda: 0)
    def free():
        v.runs.append(("free", None))
        return {"run": len(v.runs)}

    @app.post("/flaky")
    @requires_credits(3)
    def flaky():
        v.runs.append(("flaky", None))
        if v.fail_next:
            v.fail_next -= 1
            raise RuntimeError("model crashed")
        return {"run": len(v.runs)}

    @app.post("/upstream")
    @requires_credits(3)
    def upstream():
        v.runs.append(("upstream", None))
        if v.fail_next:
            v.fail_next -= 1
            return jsonify(error="upstream down"), 503
        return {"run": len(v.runs)}

    @app.post("/teapot")
    @requires_credits(3)
    def teapot():
        v.runs.append(("teapot", None))
        return f"short and stout {len(v.runs)}", 418

    @app.post("/slow")
    @requires_credits(2)
    def slow():
        v.runs.append(("slow", request.get_data(as_text=True)))
        v.started.set()
        assert v.release.wait(30), "the test never released the view"
        return {"run": len(v.runs)}

    @app.post("/stream")
    @requires_credits(2)
    def stream():
        v.runs.append(("stream", None))
        return Response((chunk for chunk in (b"one ", b"two")), mimetype="text/plain")

    @app.post("/big")
    @requires_credits(2)
    def big():
        v.runs.append(("big", None))
        return "x" * 101

    return v


def spends(credits, user="alice"):
    return [e for e in credits.history(user) if e.kind == "spend"]


def request_rows(db):
    t = db.metadata.tables["credits_requests"]
    with db.engine.connect() as conn:
        return conn.execute(sa.select(t).order_by(t.c.id)).all()


def post(client, path, key="k", json=None, headers=None, **kwargs):
    sent = {"Idempotency-Key": key, **JSON, **(headers or {})}
    return client.post(path, json=json, headers=sent, **kwargs)


# -- the first request and its replays ----------------------------------------------------------------


def test_a_retry_gets_the_stored_response_byte_for_byte_without_running_or_charging(
    client, login, credits, views
):
    credits.grant("alice", 20, reason="seed")
    login("alice")
    first = post(client, "/persona", json={"seed": "alpha"})
    again = post(client, "/persona", json={"seed": "alpha"})
    assert first.status_code == again.status_code == 201
    assert again.get_data() == first.get_data()
    assert again.headers["Content-Type"] == first.headers["Content-Type"] == "application/json"
    assert again.headers["Location"] == first.headers["Location"] == "/persona/1"
    assert again.headers["X-Run"] == "1"
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    # A cookie the first run set is not handed to whoever replays it.
    assert "first_run_only" in first.headers.get("Set-Cookie", "")
    assert "first_run_only" not in " ".join(again.headers.getlist("Set-Cookie"))
    assert views.runs == [("persona", "alpha")]
    assert credits.balance("alice") == 15
    (spend,) = spends(credits)
    assert spend.metadata["idempotency_key"] == "k"
    assert credits.audit() == []


def test_a_key_sent_as_the_drafts_quoted_string_is_the_same_key(client, login, credits, views):
    credits.grant("alice", 20, reason="seed")
    login("alice")
    first = post(client, "/persona", key="job-1", json={"seed": "a"})
    again = post(client, "/persona", key='"job-1"', json={"seed": "a"})
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_data() == first.get_data()
    assert len(views.runs) == 1


def test_an_answer_the_view_gave_below_500_is_stored_and_replayed_too(client, login, credits, views):
    credits.grant("alice", 20, reason="seed")
    login("alice")
    first = post(client, "/teapot")
    again = post(client, "/teapot")
    assert (first.status_code, again.status_code) == (418, 418)
    assert again.get_data() == first.get_data() == b"short and stout 1"
    assert again.headers["Content-Type"].startswith("text/html")
    assert (len(views.runs), credits.balance("alice")) == (1, 17)


def test_a_free_request_with_a_key_runs_once_too(client, login, credits, views):
    login("alice")
    first = post(client, "/free")
    again = post(client, "/free")
    assert again.json == first.json == {"run": 1}
    assert again.headers["Idempotent-Replayed"] == "true"
    assert credits.history("alice") == []


def test_other_keys_wallets_and_endpoints_are_other_requests(client, login, credits, views):
    credits.grant("alice", 50, reason="seed")
    credits.grant("bob", 50, reason="seed")
    login("alice")
    post(client, "/persona", key="k", json={"seed": "a"})
    assert "Idempotent-Replayed" not in post(client, "/persona", key="k2", json={"seed": "a"}).headers
    assert "Idempotent-Replayed" not in post(client, "/sized/5", key="k").headers
    login("bob")
    assert "Idempotent-Replayed" not in post(client, "/persona", key="k", json={"seed": "a"}).headers
    assert len(views.runs) == 4
    assert (credits.balance("alice"), credits.balance("bob")) == (35, 45)


# -- the same key with another request --------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/persona", {"seed": "bravo"}),
        ("POST", "/persona?lang=de", {"seed": "alpha"}),
        ("PUT", "/persona", {"seed": "alpha"}),
        ("POST", "/persona", None),
    ],
    ids=["other body", "other query", "other method", "no body"],
)
def test_the_key_reused_with_another_request_is_422_runs_nothing_and_charges_nothing(
    client, login, credits, views, method, path, body
):
    credits.grant("alice", 20, reason="seed")
    login("alice")
    assert post(client, "/persona", json={"seed": "alpha"}).status_code == 201
    response = client.open(path, method=method, json=body, headers={"Idempotency-Key": "k", **JSON})
    assert response.status_code == 422
    assert response.json["error"] == "idempotency_key_reused"
    assert "new key" in response.json["message"]
    assert response.headers["Cache-Control"] == "no-store"
    assert (views.runs, credits.balance("alice")) == ([("persona", "alpha")], 15)


def test_the_key_reused_on_another_path_of_the_same_endpoint_is_422(client, login, credits, views):
    credits.grant("alice", 20, reason="seed")
    login("alice")
    assert post(client, "/sized/2").status_code == 200
    assert post(client, "/sized/3").status_code == 422
    assert (views.runs, credits.balance("alice")) == ([("sized", 2)], 18)


def test_a_browser_gets_the_422_as_a_page(client, login, credits, views):
    credits.grant("alice", 20, reason="seed")
    login("alice")
    post(client, "/persona", json={"seed": "a"})
    response = client.post("/persona", data={"seed": "b"}, headers={"Idempotency-Key": "k", **HTML})
    assert response.status_code == 422
    assert response.mimetype == "text/html"
    assert b"already used for a different request" in response.data


# -- while the first request runs -------------------------------------------------------------------


def test_the_key_is_409_with_retry_after_while_its_first_request_runs(app, login, credits, views):
    credits.grant("alice", 20, reason="seed")
    first_client, second_client = logged_in(app), logged_in(app)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, first_client, "/slow", data="job")
        assert views.started.wait(30)
        during = [post(second_client, "/slow", data="job") for _ in range(3)]
        other_body = post(second_client, "/slow", data="another job")
        views.release.set()
        assert first.result().status_code == 200
    for response in during:
        assert response.status_code == 409
        assert response.json["error"] == "idempotency_request_in_progress"
        assert response.headers["Retry-After"] == "1"
    assert other_body.status_code == 422
    after = post(second_client, "/slow", data="job")
    assert after.json == {"run": 1}
    assert after.headers["Idempotent-Replayed"] == "true"
    assert (len(views.runs), credits.balance("alice")) == (1, 18)


# -- a first attempt that failed or was refused -------------------------------------------------------


def test_a_first_run_that_raised_frees_the_key_and_the_retry_runs_and_is_charged_once(
    app, client, login, credits, views
):
    app.config["PROPAGATE_EXCEPTIONS"] = False
    credits.grant("alice", 20, reason="seed")
    login("alice")
    views.fail_next = 1
    assert post(client, "/flaky").status_code == 500
    assert credits.balance("alice") == 20  # given back
    retry = post(client, "/flaky")
    assert retry.status_code == 200
    assert "Idempotent-Replayed" not in retry.headers
    assert post(client, "/flaky").headers["Idempotent-Replayed"] == "true"
    assert len(views.runs) == 2
    assert credits.balance("alice") == 17
    assert [e.kind for e in credits.history("alice")] == ["spend", "refund", "spend", "grant"]
    assert credits.audit() == []


def test_a_failed_run_whose_credits_could_not_be_given_back_keeps_its_key_and_the_retry_pays_once(
    app, client, login, credits, views, monkeypatch
):
    """Found by the reliability work: freeing the key after a failed give-back let the retry pay again.
    The key is unlocked instead, and the retry runs on the first run's charge."""
    app.config["PROPAGATE_EXCEPTIONS"] = False
    credits.grant("alice", 20, reason="seed")
    login("alice")
    refund = Ledger.refund

    def refused(self, *args, **kwargs):
        monkeypatch.setattr(Ledger, "refund", refund)
        raise CreditsUnavailable()

    monkeypatch.setattr(Ledger, "refund", refused)
    views.fail_next = 1
    assert post(client, "/flaky").status_code == 500
    assert credits.balance("alice") == 17  # the give-back failed: the first run's credits are spent
    retry = post(client, "/flaky")
    assert retry.status_code == 200
    assert (len(views.runs), credits.balance("alice"), len(spends(credits))) == (2, 17, 1)
    assert credits.audit() == []


def test_a_first_run_that_answered_5xx_frees_the_key(client, login, credits, views):
    credits.grant("alice", 20, reason="seed")
    login("alice")
    views.fail_next = 2
    assert post(client, "/upstream").status_code == 503
    assert post(client, "/upstream").status_code == 503
    assert post(client, "/upstream").status_code == 200
    assert post(client, "/upstream").headers["Idempotent-Replayed"] == "true"
    assert (len(views.runs), credits.balance("alice")) == (3, 17)
    assert credits.audit() == []


def test_a_first_request_refused_with_402_consumes_nothing(client, login, credits, views):
    credits.grant("alice", 3, reason="seed")
    login("alice")
    refused = post(client, "/persona", json={"seed": "a"})
    assert refused.status_code == 402
    assert refused.json["error"] == "insufficient_credits"
    # The key is free: even another request may use it now.
    assert post(client, "/persona", json={"seed": "b"}).status_code == 402
    credits.grant("alice", 10, reason="top-up")
    paid = post(client, "/persona", json={"seed": "a"})
    assert paid.status_code == 201
    assert (views.runs, credits.balance("alice")) == ([("persona", "a")], 8)


# -- responses that cannot be stored ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/stream", "/big"], ids=["streamed", "larger than the cap"])
@pytest.mark.config(CREDITS_IDEMPOTENCY_MAX_RESPONSE_BYTES=100)
def test_a_response_that_cannot_be_stored_makes_a_replay_409_and_never_a_second_run(
    app, client, login, credits, views, path
):
    credits.grant("alice", 20, reason="seed")
    login("alice")
    first = post(client, path)
    assert first.status_code == 200
    assert first.get_data() in (b"one two", b"x" * 101)
    again = post(client, path)
    assert again.status_code == 409
    assert again.json["error"] == "idempotency_response_not_stored"
    assert (len(views.runs), credits.balance("alice")) == (1, 18)


# -- expiry, dead workers and the database failing ----------------------------------------------------


@pytest.mark.config(CREDITS_IDEMPOTENCY_TTL=timedelta(hours=1))
def test_keys_expire_after_the_ttl_and_flask_credits_expire_prunes_them(
    app, client, login, credits, views, db, clock
):
    credits.grant("alice", 20, reason="seed")
    login("alice")
    post(client, "/persona", json={"seed": "a"})
    clock.advance(minutes=59)
    assert post(client, "/persona", json={"seed": "a"}).headers["Idempotent-Replayed"] == "true"
    post(client, "/persona", key="other", json={"seed": "a"})
    clock.advance(minutes=2)
    # The first key is a new key again: the request runs and is charged.
    renewed = post(client, "/persona", json={"seed": "b"})
    assert renewed.status_code == 201
    assert "Idempotent-Replayed" not in renewed.headers
    assert len(request_rows(db)) == 2
    clock.advance(hours=2)
    result = app.test_cli_runner().invoke(args=["credits", "expire"])
    assert result.exit_code == 0, result.output
    assert "deleted 2 expired idempotency keys" in result.output
    assert request_rows(db) == []
    assert (len(views.runs), credits.balance("alice")) == (3, 5)


def dead_run(app, credits, *, path, body, amount, spent=True, user="alice", ttl=timedelta(days=1)):
    """What a worker killed in the middle of a paid view leaves behind: the key claimed, and (with
    ``spent``) the run's spend committed."""
    from flask_credits import Wallet

    wallet = Wallet(user)
    endpoint = app.url_map.bind("localhost").match(path, method="POST")[0]
    claim = credits.request_keys.claim(
        wallet,
        endpoint,
        "k",
        fingerprint("POST", path, b"", body),
        lease=timedelta(seconds=300),
        ttl=ttl,
    )
    if spent:
        credits.ledger.spend(wallet, amount, reason="dead run", idempotency_key=claim.spend_key)
    return claim


def test_a_run_whose_worker_died_is_taken_over_after_its_lease_without_a_second_charge(
    app, client, login, credits, views, clock
):
    credits.grant("alice", 20, reason="seed")
    login("alice")
    dead_run(app, credits, path="/flaky", body=b"", amount=3)
    assert credits.balance("alice") == 17
    assert post(client, "/flaky").status_code == 409  # the lease still holds
    clock.advance(seconds=301)
    taken = post(client, "/flaky")
    assert taken.status_code == 200
    assert "Idempotent-Replayed" not in taken.headers
    assert post(client, "/flaky").headers["Idempotent-Replayed"] == "true"
    assert (len(views.runs), credits.balance("alice"), len(spends(credits))) == (1, 17, 1)
    assert credits.audit() == []


def test_a_dead_run_that_had_not_charged_yet_is_charged_by_the_run_that_takes_over(
    app, client, login, credits, views, clock
):
    credits.grant("alice", 20, reason="seed")
    login("alice")
    dead_run(app, credits, path="/flaky", body=b"", amount=3, spent=False)
    clock.advance(seconds=301)
    assert post(client, "/flaky").status_code == 200
    assert (len(views.runs), credits.balance("alice")) == (1, 17)


def test_flask_credits_expire_returns_the_credits_of_a_dead_run_and_frees_its_key(
    app, client, login, credits, views, db, clock
):
    credits.grant("alice", 20, reason="seed")
    login("alice")
    dead_run(app, credits, path="/flaky", body=b"", amount=3)
    dead_run(app, credits, path="/upstream", body=b"", amount=3, spent=False)
    assert credits.balance("alice") == 17
    runner = app.test_cli_runner()
    assert "returned the credits of 0 unfinished requests" in runner.invoke(args=["credits", "expire"]).output
    clock.advance(seconds=301)
    result = runner.invoke(args=["credits", "expire"])
    assert "returned the credits of 1 unfinished requests" in result.output, result.output
    assert credits.balance("alice") == 20
    assert request_rows(db) == []
    assert post(client, "/flaky").status_code == 200  # a new run, charged once
    assert (credits.balance("alice"), credits.audit()) == (17, [])


def test_a_dead_run_whose_key_expired_is_settled_and_the_key_is_new_again(
    app, client, login, credits, views, db, clock
):
    """Nobody ran `flask credits expire`: the key is past its TTL while its dead run still holds it.
    The next request with the key is a new request (even another one), and the dead run's credits
    are returned first."""
    credits.grant("alice", 20, reason="seed")
    login("alice")
    dead_run(app, credits, path="/flaky", body=b"", amount=3, ttl=timedelta(seconds=600))
    clock.advance(seconds=601)
    fresh = post(client, "/flaky", json={"another": "request"})
    assert fresh.status_code == 200
    assert (len(views.runs), credits.balance("alice")) == (1, 17)  # 3 returned, 3 charged
    assert [e.kind for e in credits.history("alice")][:2] == ["spend", "refund"]
    assert len(request_rows(db)) == 1
    assert credits.audit() == []


def test_a_spend_cut_by_the_database_lets_the_retry_take_over_and_charges_once(
    client, login, credits, views, monkeypatch
):
    """The database failed while the spend committed (the client saw 503): the retry must not pay
    again, and must not wait for the lease."""
    credits.grant("alice", 20, reason="seed")
    login("alice")
    original = Ledger.spend

    def committed_then_cut(self, *args, **kwargs):
        original(self, *args, **kwargs)
        monkeypatch.setattr(Ledger, "spend", original)
        raise CreditsUnavailable()

    monkeypatch.setattr(Ledger, "spend", committed_then_cut)
    cut = post(client, "/flaky")
    assert cut.status_code == 503
    assert credits.balance("alice") == 17
    retry = post(client, "/flaky")
    assert retry.status_code == 200
    assert (len(views.runs), credits.balance("alice"), len(spends(credits))) == (1, 17, 1)


def test_a_spend_refused_by_the_database_frees_nothing_twice(client, login, credits, views, monkeypatch):
    """The database failed before the spend: the retry takes over and pays once."""
    credits.grant("alice", 20, reason="seed")
    login("alice")
    original = Ledger.spend

    def cut(self, *args, **kwargs):
        monkeypatch.setattr(Ledger, "spend", original)
        raise CreditsUnavailable()

    monkeypatch.setattr(Ledger, "spend", cut)
    assert post(client, "/flaky").status_code == 503
    assert post(client, "/flaky").status_code == 200
    assert (len(views.runs), credits.balance("alice")) == (1, 17)


def test_a_cut_spend_whose_key_could_not_be_unlocked_is_taken_over_seconds_later(
    client, login, credits, views, monkeypatch, clock
):
    """The database went away under the spend and stayed away for the clean-up too: the key keeps
    only its short claim lease (not CREDITS_IDEMPOTENCY_LOCK_TIMEOUT), and the retry after it runs the
    view once, without paying twice."""
    from flask_credits.services.idempotency import CLAIM_LEASE, RequestKeys

    credits.grant("alice", 20, reason="seed")
    login("alice")
    original = Ledger.spend

    def committed_then_cut(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise CreditsUnavailable()

    def database_still_down(self, claim):
        raise CreditsUnavailable()

    monkeypatch.setattr(Ledger, "spend", committed_then_cut)
    monkeypatch.setattr(RequestKeys, "unlock", database_still_down)
    assert post(client, "/flaky").status_code == 503
    monkeypatch.setattr(Ledger, "spend", original)
    early = post(client, "/flaky")
    assert early.status_code == 409
    assert early.headers["Retry-After"] == "1"
    clock.advance(seconds=CLAIM_LEASE.total_seconds() + 1)
    assert post(client, "/flaky").status_code == 200
    assert (len(views.runs), credits.balance("alice"), len(spends(credits))) == (1, 17, 1)


def test_a_request_charged_so_slowly_that_its_key_was_taken_over_never_runs_the_view(
    app, client, login, credits, views, monkeypatch, clock
):
    """Its short claim lease ran out while the spend waited (a busy wallet): a retry took the key over,
    paid under the same ledger key and ran the view. The slow one then finds its lease gone: 409, and
    the one charge is the retry's."""
    from flask_credits.services.idempotency import CLAIM_LEASE

    credits.grant("alice", 20, reason="seed")
    login("alice")
    other = logged_in(app)
    original = Ledger.spend
    overtaken = []

    def slow_spend(self, *args, **kwargs):
        monkeypatch.setattr(Ledger, "spend", original)
        clock.advance(seconds=CLAIM_LEASE.total_seconds() + 1)
        overtaken.append(post(other, "/flaky"))  # the retry, while this spend "waits"
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Ledger, "spend", slow_spend)
    slow = post(client, "/flaky")
    assert overtaken[0].status_code == 200
    assert slow.status_code == 409
    assert slow.json["error"] == "idempotency_request_in_progress"
    assert (len(views.runs), credits.balance("alice"), len(spends(credits))) == (1, 17, 1)
    assert post(client, "/flaky").headers["Idempotent-Replayed"] == "true"


def test_a_run_that_outlived_its_lease_cannot_store_over_the_run_that_took_over(
    app, client, login, credits, views, clock
):
    credits.grant("alice", 20, reason="seed")
    login("alice")
    claim = dead_run(app, credits, path="/flaky", body=b"", amount=3)
    clock.advance(seconds=301)
    assert post(client, "/flaky").status_code == 200
    late = app.response_class(b"late", status=200)
    assert credits.request_keys.finish(claim, late, None, max_bytes=1000) is False
    assert post(client, "/flaky").json == {"run": 1}


# -- bad keys and configuration ------------------------------------------------------------------------


def test_a_chunked_body_past_max_content_length_is_413_not_fingerprinted_as_its_first_bytes(
    app, client, login, credits, views, db
):
    """Werkzeug cuts a chunked body at MAX_CONTENT_LENGTH without a 413: a padded request would then
    share the fingerprint of its first bytes (and replay their response). It is refused instead."""
    import io

    app.config["MAX_CONTENT_LENGTH"] = 100
    credits.grant("alice", 20, reason="seed")
    login("alice")
    body = b'{"seed": "alpha"}'
    assert (
        post(client, "/persona", data=body, headers={"Content-Type": "application/json"}).status_code == 201
    )
    padded = body + b" " * 200
    response = client.post(
        "/persona",
        headers={
            "Idempotency-Key": "k",
            "Content-Type": "application/json",
            "Transfer-Encoding": "chunked",
            **JSON,
        },
        environ_overrides={"wsgi.input": io.BytesIO(padded), "wsgi.input_terminated": True},
    )
    assert response.status_code == 413
    assert (len(views.runs), credits.balance("alice"), len(request_rows(db))) == (1, 15, 1)


@pytest.mark.parametrize(
    "key", ["", "x" * 201, "caf\u00e9", "tab\there"], ids=["empty", "too long", "non-ASCII", "control"]
)
def test_an_unusable_idempotency_key_is_400_and_charges_nothing(client, login, credits, views, key):
    credits.grant("alice", 20, reason="seed")
    login("alice")
    response = post(client, "/persona", key=key, json={"seed": "a"})
    assert response.status_code == 400
    assert "Idempotency-Key" in response.json["message"]
    assert (views.runs, credits.balance("alice")) == ([], 20)


@pytest.mark.config(CREDITS_IDEMPOTENCY_HEADER=None)
def test_the_idempotency_header_can_be_renamed_or_ignored(client, login, credits, views, build_app):
    credits.grant("alice", 20, reason="seed")
    login("alice")
    post(client, "/persona", json={"seed": "a"})
    post(client, "/persona", json={"seed": "a"})
    assert credits.balance("alice") == 10
    renamed, _, _ = build_app(CREDITS_IDEMPOTENCY_HEADER="X-Request-Id")
    add_views(renamed, views)
    renamed_client = logged_in(renamed)
    renamed_client.post("/persona", json={"seed": "a"}, headers={"X-Request-Id": "r"})
    renamed_client.post("/persona", json={"seed": "a"}, headers={"X-Request-Id": "r"})
    assert (credits.balance("alice"), len(views.runs)) == (5, 3)


# -- at once ------------------------------------------------------------------------------------------


def clients(app, count, user="alice"):
    return [logged_in(app, user) for _ in range(count)]


def test_concurrent_requests_with_one_key_run_the_view_once_and_charge_once(app, credits, views, backend):
    credits.grant("alice", 100, reason="seed")
    count = 12
    barrier = threading.Barrier(count)

    def one(c):
        barrier.wait(30)
        return post(c, "/persona", json={"seed": "same"})

    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(one, clients(app, count)))
    ran = [a for a in answers if a.status_code == 201 and "Idempotent-Replayed" not in a.headers]
    replayed = [a for a in answers if a.headers.get("Idempotent-Replayed") == "true"]
    in_progress = [a for a in answers if a.status_code == 409]
    assert len(ran) == 1
    assert len(replayed) + len(in_progress) == count - 1
    assert all(a.get_data() == ran[0].get_data() for a in replayed)
    assert all(a.json["error"] == "idempotency_request_in_progress" for a in in_progress)
    assert (len(views.runs), credits.balance("alice"), len(spends(credits))) == (1, 95, 1)
    assert credits.audit() == []


def test_concurrent_requests_with_one_key_and_different_bodies_buy_one_run(app, credits, views, backend):
    """The attack of issue 10: one debit, many different views. Now one run; the rest 409 or 422."""
    credits.grant("alice", 5, reason="seed")
    count = 10
    barrier = threading.Barrier(count)

    def one(args):
        c, seed = args
        barrier.wait(30)
        return post(c, "/persona", key="same", json={"seed": seed})

    seeds = [f"seed-{i}" for i in range(count)]
    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(one, zip(clients(app, count), seeds, strict=True)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(201) == 1
    assert set(statuses) <= {201, 409, 422}
    assert len(views.runs) == 1
    assert (credits.balance("alice"), len(spends(credits))) == (0, 1)
    assert credits.audit() == []


def test_a_blocked_first_run_makes_every_concurrent_retry_409(app, credits, views, backend):
    credits.grant("alice", 100, reason="seed")
    first, *others = clients(app, 9)
    with ThreadPoolExecutor(9) as pool:
        running = pool.submit(post, first, "/slow", data="job")
        assert views.started.wait(30)
        barrier = threading.Barrier(len(others))

        def retry(c):
            barrier.wait(30)
            return post(c, "/slow", data="job")

        answers = list(pool.map(retry, others))
        views.release.set()
        assert running.result().status_code == 200
    assert [a.status_code for a in answers] == [409] * len(others)
    assert (len(views.runs), credits.balance("alice")) == (1, 98)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("CREDITS_IDEMPOTENCY_TTL", 0),
        ("CREDITS_IDEMPOTENCY_TTL", "1 day"),
        ("CREDITS_IDEMPOTENCY_LOCK_TIMEOUT", timedelta(seconds=-1)),
        ("CREDITS_IDEMPOTENCY_LOCK_TIMEOUT", True),
        ("CREDITS_IDEMPOTENCY_MAX_RESPONSE_BYTES", -1),
        ("CREDITS_IDEMPOTENCY_MAX_RESPONSE_BYTES", 1.5),
    ],
)
def test_a_bad_idempotency_setting_refuses_to_start_naming_the_key(tmp_path, key, value):
    with pytest.raises(RuntimeError, match=key):
        make_app(f"sqlite:///{tmp_path / 'x.sqlite3'}", **{key: value})


def test_spend_tells_its_caller_whether_it_replayed(credits):
    credits.grant("alice", 10, reason="seed")
    first = credits.spend("alice", 2, reason="job", idempotency_key="job-1")
    again = credits.spend("alice", 2, reason="job", idempotency_key="job-1")
    assert (first.replayed, again.replayed) == (False, True)
    assert again == first  # the same entry
    granted = credits.grant("alice", 1, reason="gift", idempotency_key="gift-1")
    assert credits.grant("alice", 1, reason="gift", idempotency_key="gift-1").replayed
    assert not granted.replayed
