"""@requires_credits(hold=N): reserve before the view, charge what it used, meter a streamed response."""

from __future__ import annotations

from datetime import timedelta

import pytest
from flask import Response, g, jsonify, request, stream_with_context

from flask_credits import (
    HoldAlreadySettled,
    InsufficientCredits,
    Wallet,
    current_hold,
    requires_credits,
    signals,
)
from flask_credits.services.idempotency import fingerprint

JSON = {"Accept": "application/json"}


@pytest.fixture
def views(app):
    seen: dict[str, object] = {}

    @app.post("/quiet")
    @requires_credits(hold=10)
    def quiet():
        seen["held"] = current_hold.amount
        return {"ok": True}

    @app.post("/quiet-release")
    @requires_credits(hold=10, unsettled="release")
    def quiet_release():
        return {"ok": True}

    @app.post("/tokens/<int:n>")
    @requires_credits(hold=10)
    def tokens(n):
        current_hold.add(n)
        return {"used": current_hold.used, "reserved": current_hold.amount}

    @app.post("/settle/<int:n>")
    @requires_credits(hold=10, reason="summary")
    def settle(n):
        entry = current_hold.settle(n)
        return {"entry": None if entry is None else entry.id}

    @app.post("/settle-then-fail")
    @requires_credits(hold=10)
    def settle_then_fail():
        current_hold.settle(4)
        raise RuntimeError("crashed after settling")

    @app.post("/boom")
    @requires_credits(hold=10)
    def boom():
        current_hold.add(3)
        raise RuntimeError("model crashed")

    @app.post("/upstream")
    @requires_credits(hold=10)
    def upstream():
        current_hold.add(3)
        return jsonify(error="upstream down"), 502

    @app.post("/sized")
    @requires_credits(hold=lambda: int(request.args["n"]))
    def sized():
        return {"held": current_hold.amount}

    @app.get("/stream/<int:chunks>")
    @requires_credits(hold=4)
    def stream(chunks):
        def generate():
            for i in range(chunks):
                try:
                    current_hold.add(2)
                except InsufficientCredits:
                    yield "[out of credits]\n"
                    return
                yield f"chunk {i}\n"

        return Response(stream_with_context(generate()), mimetype="text/plain")

    @app.get("/file")
    @requires_credits(hold=4)
    def file():
        return Response(iter([b"a", b"b"]), mimetype="application/octet-stream")

    @app.get("/stream-fails")
    @requires_credits(hold=4)
    def stream_fails():
        def generate():
            current_hold.add(1)
            yield "one\n"
            raise RuntimeError("the model went away")

        return Response(stream_with_context(generate()), mimetype="text/plain")

    return seen


def test_a_view_that_reports_nothing_is_charged_the_whole_hold(client, login, credits, views):
    credits.grant("alice", 25, reason="welcome")
    login("alice")
    response = client.post("/quiet")
    assert response.status_code == 200
    assert views["held"] == 10
    assert (credits.balance("alice"), credits.held("alice")) == (15, 0)
    spend = credits.history("alice")[0]
    assert (spend.kind, spend.amount, spend.reason) == ("spend", -10, "quiet")
    assert credits.audit() == []


def test_unsettled_release_charges_nothing_when_the_view_reports_nothing(client, login, credits, views):
    credits.grant("alice", 25, reason="welcome")
    login("alice")
    assert client.post("/quiet-release").status_code == 200
    assert (credits.balance("alice"), credits.held("alice")) == (25, 0)
    assert [e.kind for e in credits.history("alice")] == ["grant"]


@pytest.mark.config(CREDITS_HOLD_UNSETTLED="release")
def test_the_unsettled_default_comes_from_config(client, login, credits, views):
    credits.grant("alice", 25, reason="welcome")
    login("alice")
    assert client.post("/quiet").status_code == 200
    assert credits.balance("alice") == 25


@pytest.mark.parametrize(("used", "balance"), [(0, 25), (3, 22), (10, 15)])
def test_a_view_is_charged_what_it_reported(client, login, credits, views, used, balance):
    credits.grant("alice", 25, reason="welcome")
    login("alice")
    response = client.post(f"/tokens/{used}")
    assert response.json == {"used": used, "reserved": 10}
    assert (credits.balance("alice"), credits.held("alice")) == (balance, 0)
    assert credits.audit() == []


def test_usage_past_the_hold_grows_it_from_the_wallet(client, login, credits, views):
    credits.grant("alice", 25, reason="welcome")
    login("alice")
    response = client.post("/tokens/17")
    assert response.json == {"used": 17, "reserved": 20}
    assert credits.balance("alice") == 8
    assert credits.history("alice")[0].amount == -17


def test_usage_past_what_the_wallet_can_cover_is_refused_and_nothing_is_charged(
    client, login, credits, views
):
    credits.grant("alice", 12, reason="welcome")
    login("alice")
    response = client.post("/tokens/13", headers=JSON)
    # The view did not catch it: a 402 like a refused debit, and the hold given back.
    assert response.status_code == 402
    assert (credits.balance("alice"), credits.held("alice")) == (12, 0)
    assert credits.audit() == []


def test_a_view_may_settle_itself(client, login, credits, views):
    credits.grant("alice", 25, reason="welcome")
    login("alice")
    response = client.post("/settle/7")
    spend = credits.history("alice")[0]
    assert response.json == {"entry": spend.id}
    assert (spend.amount, spend.reason) == (-7, "summary")
    assert credits.balance("alice") == 18


def test_settling_at_zero_charges_nothing(client, login, credits, views):
    credits.grant("alice", 25, reason="welcome")
    login("alice")
    assert client.post("/settle/0").json == {"entry": None}
    assert credits.balance("alice") == 25


@pytest.mark.parametrize("path", ["/boom", "/upstream"])
def test_a_failed_view_is_charged_nothing(client, login, credits, views, path):
    credits.grant("alice", 25, reason="welcome")
    login("alice")
    if path == "/boom":
        with pytest.raises(RuntimeError):
            client.post(path)
    else:
        assert client.post(path).status_code == 502
    assert (credits.balance("alice"), credits.held("alice")) == (25, 0)
    assert [e.kind for e in credits.history("alice")] == ["grant"]
    assert credits.audit() == []


def test_a_settle_made_before_the_view_failed_is_refunded(client, login, credits, views):
    credits.grant("alice", 25, reason="welcome")
    login("alice")
    with pytest.raises(RuntimeError):
        client.post("/settle-then-fail")
    assert credits.balance("alice") == 25
    assert [e.kind for e in credits.history("alice")] == ["refund", "spend", "grant"]


def test_a_hold_the_wallet_cannot_cover_is_402_and_the_view_never_runs(client, login, credits, views):
    credits.grant("alice", 9, reason="welcome")
    login("alice")
    response = client.post("/quiet", headers=JSON)
    assert response.status_code == 402
    assert response.json["required"] == 10
    assert "held" not in views
    assert credits.balance("alice") == 9


def test_the_hold_may_be_a_callable(client, login, credits, views):
    credits.grant("alice", 25, reason="welcome")
    login("alice")
    assert client.post("/sized?n=6").json == {"held": 6}
    assert credits.balance("alice") == 19


def test_a_finished_stream_is_charged_per_chunk_once_it_closes(client, login, credits, views):
    credits.grant("alice", 25, reason="welcome")
    login("alice")
    response = client.get("/stream/5")
    assert response.get_data(as_text=True) == "".join(f"chunk {i}\n" for i in range(5))
    # Settled as the body ended, before the response was closed.
    assert (credits.balance("alice"), credits.held("alice")) == (15, 0)
    response.close()
    assert (credits.balance("alice"), credits.held("alice")) == (15, 0)
    assert [e.amount for e in credits.history("alice")] == [-10, 25]
    assert credits.audit() == []


def test_signals_of_a_stream_settled_after_the_request_reach_the_apps_receivers(
    app, client, login, credits, views
):
    from flask_credits import signals

    settled = []

    @signals.credits_settled.connect_via(app)
    def on_settled(sender, hold, held, amount, entry, **extra):
        settled.append((sender, held, amount, entry.amount))

    credits.grant("alice", 25, reason="welcome")
    login("alice")
    response = client.get("/stream/3", buffered=False)
    assert b"".join(response.response) == b"chunk 0\nchunk 1\nchunk 2\n"
    response.close()
    assert settled == [(app, 8, 6, -6)]  # the hold of 4 grew by 4 once for the third chunk


def test_a_client_that_leaves_mid_stream_pays_for_what_was_produced(client, login, credits, views):
    credits.grant("alice", 25, reason="welcome")
    login("alice")
    response = client.get("/stream/8", buffered=False)
    chunks = iter(response.response)
    assert next(chunks) == b"chunk 0\n"
    assert next(chunks) == b"chunk 1\n"
    # Mid-stream the hold is still open (both chunks fit in its 4 credits); nothing is charged yet.
    assert credits.held("alice") == 4
    response.close()  # the client went away: the server closes the response
    assert (credits.balance("alice"), credits.held("alice")) == (21, 0)
    response.close()  # closing again charges nothing more
    assert credits.balance("alice") == 21
    assert len(credits.history("alice")) == 2


def test_a_stream_closed_after_its_context_is_gone_settles_and_signals_from_its_own_app(app, build_app):
    """A WSGI server closes a streamed response after ``stream_with_context`` let go of the request's
    context (here only another app's is current, as in a process serving several apps): the settle
    still runs, and ``credits_settled`` goes out from the app that served the stream."""
    served, _, served_credits = build_app()

    @served.get("/story")
    @requires_credits(hold=4)
    def story():
        def generate():
            for i in range(3):
                current_hold.add(1)
                yield f"chunk {i}\n"

        return Response(stream_with_context(generate()), mimetype="text/plain")

    settled = []
    with served.app_context():
        served_credits.grant("alice", 25, reason="welcome")
    client = served.test_client()
    assert client.post("/_login/alice").status_code == 200
    with signals.credits_settled.connected_to(
        lambda sender, **kw: settled.append(kw["amount"]), sender=served
    ):
        response = client.get("/story", buffered=False)
        assert b"".join(response.response) == b"chunk 0\nchunk 1\nchunk 2\n"
        response.close()
    assert settled == [3]
    with served.app_context():
        assert (served_credits.balance("alice"), served_credits.held("alice")) == (22, 0)


def test_a_stream_that_runs_out_of_credits_ends_with_a_final_message(client, login, credits, views):
    credits.grant("alice", 7, reason="welcome")
    login("alice")
    response = client.get("/stream/10")
    assert response.get_data(as_text=True).splitlines() == [
        "chunk 0",
        "chunk 1",
        "chunk 2",
        "[out of credits]",
    ]
    response.close()
    assert (credits.balance("alice"), credits.held("alice")) == (1, 0)


def test_a_stream_that_reports_nothing_is_charged_the_whole_hold_when_it_closes(
    client, login, credits, views
):
    credits.grant("alice", 25, reason="welcome")
    login("alice")
    response = client.get("/file")
    assert response.get_data() == b"ab"
    response.close()
    assert (credits.balance("alice"), credits.held("alice")) == (21, 0)


def test_a_stream_broken_by_an_error_is_charged_what_it_produced(client, login, credits, views):
    credits.grant("alice", 25, reason="welcome")
    login("alice")
    response = client.get("/stream-fails", buffered=False)
    with pytest.raises(RuntimeError):
        b"".join(response.response)
    response.close()
    assert (credits.balance("alice"), credits.held("alice")) == (24, 0)


def test_keyed_requests_with_a_hold_run_once_and_are_charged_once(client, login, credits, views):
    credits.grant("alice", 25, reason="welcome")
    login("alice")
    first = client.post("/tokens/6", headers={"Idempotency-Key": "abc"})
    again = client.post("/tokens/6", headers={"Idempotency-Key": "abc"})
    assert first.status_code == again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_data() == first.get_data()
    assert credits.balance("alice") == 19
    assert [e.amount for e in credits.history("alice")] == [-6, 25]


def test_a_keyed_request_that_fails_frees_its_key_and_is_charged_nothing(client, login, credits, views):
    credits.grant("alice", 25, reason="welcome")
    login("alice")
    assert client.post("/upstream", headers={"Idempotency-Key": "k"}).status_code == 502
    assert client.post("/upstream", headers={"Idempotency-Key": "k"}).status_code == 502
    assert credits.balance("alice") == 25


def test_current_hold_outside_a_hold_view_says_so(app):
    with app.test_request_context(), pytest.raises(RuntimeError, match="requires_credits\\(hold"):
        current_hold.add(1)


def test_cost_and_hold_are_exclusive_and_checked_at_decoration_time():
    with pytest.raises(TypeError):
        requires_credits(3, hold=4)
    with pytest.raises(TypeError):
        requires_credits()
    with pytest.raises(ValueError, match="hold must be at least 1"):
        requires_credits(hold=0)
    with pytest.raises(ValueError, match="unsettled"):
        requires_credits(hold=5, unsettled="maybe")  # type: ignore[arg-type]


def test_usage_after_the_settle_is_refused(app, client, login, credits):
    @app.post("/late")
    @requires_credits(hold=5)
    def late():
        current_hold.settle(2)
        with pytest.raises(HoldAlreadySettled):
            current_hold.add(1)
        g.checked = True
        return {"ok": True}

    credits.grant("alice", 25, reason="welcome")
    login("alice")
    assert client.post("/late").status_code == 200
    assert credits.balance("alice") == 23


def test_a_keyed_hold_run_whose_worker_died_is_taken_over_on_the_same_hold(
    app, client, login, credits, views, clock
):
    """The dead run placed its hold under the run's ledger key; the retry after the lease finds that
    very hold (no second reservation) and settles it at what it used."""
    credits.grant("alice", 25, reason="welcome")
    login("alice")
    claim = _dead_hold_run(app, credits, "/tokens/4")
    assert (credits.balance("alice"), credits.held("alice")) == (15, 10)
    clock.advance(seconds=301)
    response = client.post("/tokens/4", headers={"Idempotency-Key": "k"})
    assert response.status_code == 200
    assert (credits.balance("alice"), credits.held("alice")) == (21, 0)
    assert credits.ledger.find_hold(Wallet("alice"), claim.spend_key).status == "settled"
    assert credits.audit() == []


def test_flask_credits_expire_releases_the_hold_of_a_dead_keyed_run(app, credits, views, clock):
    credits.grant("alice", 25, reason="welcome")
    _dead_hold_run(app, credits, "/tokens/4")
    clock.advance(seconds=301)
    result = app.test_cli_runner().invoke(args=["credits", "expire"])
    assert "returned the credits of 1 unfinished requests" in result.output, result.output
    assert (credits.balance("alice"), credits.held("alice")) == (25, 0)
    assert credits.audit() == []


def _dead_hold_run(app, credits, path):
    """A request to ``path`` with Idempotency-Key "k" whose worker died after placing its hold."""
    endpoint = app.url_map.bind("localhost").match(path, method="POST")[0]
    wallet = Wallet("alice")
    claim = credits.request_keys.claim(
        wallet,
        endpoint,
        "k",
        fingerprint("POST", path, b"", b""),
        lease=timedelta(seconds=300),
        ttl=timedelta(days=1),
    )
    credits.ledger.hold(
        wallet, 10, ttl=timedelta(seconds=900), reason=endpoint, idempotency_key=claim.spend_key
    )
    return claim


def test_a_stream_that_reports_usage_outlives_its_first_ttl(app, client, login, credits, clock):
    """Five chunks 400 s apart (2,000 s, past the 900 s hold TTL) within the hold: usage reported in
    the second half of the hold's life renews it, so it never expires mid-stream."""

    @app.get("/slow-stream")
    @requires_credits(hold=10)
    def slow_stream():
        def generate():
            for i in range(5):
                clock.advance(seconds=400)
                current_hold.add(1)
                held.append(credits.held("alice"))
                yield f"chunk {i}\n"

        return Response(stream_with_context(generate()), mimetype="text/plain")

    held = []
    credits.grant("alice", 25, reason="welcome")
    login("alice")
    response = client.get("/slow-stream")
    assert response.get_data(as_text=True).count("chunk") == 5
    assert held == [10] * 5  # never expired under the stream
    response.close()
    hold = credits.get_hold(credits.history("alice")[0].metadata["hold_id"])
    assert (hold.status, credits.balance("alice"), credits.held("alice")) == ("settled", 20, 0)
    assert [e.kind for e in credits.history("alice")] == ["spend", "grant"]
    assert credits.audit() == []
