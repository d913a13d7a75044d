"""@requires_credits: debit before the view, 402 when the wallet cannot pay, credits back on failure."""

from __future__ import annotations

import pytest
from flask import abort, g, jsonify

from flask_credits import InsufficientCredits, InvalidAmount, requires_credits

HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


@pytest.fixture
def views(app):
    calls = []

    @app.post("/persona")
    @requires_credits(5)
    def persona():
        calls.append(g.credits_spend.amount)
        return {"persona": "Ada"}

    @app.post("/boom")
    @requires_credits(3)
    def boom():
        raise RuntimeError("model crashed")

    @app.post("/gone")
    @requires_credits(3)
    def gone():
        abort(404)

    @app.post("/unavailable")
    @requires_credits(3)
    def unavailable():
        return jsonify(error="upstream down"), 503

    @app.post("/teapot")
    @requires_credits(3)
    def teapot():
        return "short and stout", 418

    @app.post("/sized/<int:n>")
    @requires_credits(lambda: int(__import__("flask").request.view_args["n"]))
    def sized(n):
        return {"n": n}

    @app.post("/async")
    @requires_credits(2)
    async def async_view():
        return {"ok": True}

    return calls


@pytest.mark.usefixtures("views")
def test_anonymous_request_gets_the_login_managers_401(client, credits):
    response = client.post("/persona")
    assert response.status_code == 401
    assert credits.history("alice") == []


def test_view_runs_after_the_debit(client, login, credits, views):
    credits.grant("alice", 12, reason="welcome")
    login("alice")
    response = client.post("/persona")
    assert response.status_code == 200
    assert response.json == {"persona": "Ada"}
    assert views == [-5]
    assert credits.balance("alice") == 7
    spend = credits.history("alice")[0]
    assert (spend.kind, spend.reason, spend.metadata["endpoint"]) == ("spend", "persona", "persona")


def test_insufficient_credits_is_402_json_for_api_clients_and_the_view_never_runs(
    client, login, credits, views
):
    credits.grant("alice", 4, reason="welcome")
    login("alice")
    response = client.post("/persona", headers={"Accept": "application/json"})
    assert response.status_code == 402
    assert response.json == {
        "error": "insufficient_credits",
        "message": "This needs 5 credits; the wallet holds 4.",
        "required": 5,
        "balance": 4,
        "missing": 1,
        "purchase_url": "/credits/",
        "packs": [],  # no CREDITS_PACKS here
    }
    assert views == []
    assert credits.balance("alice") == 4
    assert len(credits.history("alice")) == 1


def test_insufficient_credits_is_an_html_page_with_a_buy_link_for_browsers(client, login, views):
    login("alice")
    response = client.post("/persona", headers=HTML)
    assert response.status_code == 402
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert 'href="/credits/"' in page
    assert "needs <strong>5</strong>" in page


def test_app_can_override_the_402_response(app, client, login, views):
    @app.errorhandler(InsufficientCredits)
    def handle(error):
        return {"custom": True, "short_by": error.required - error.balance}, 402

    login("alice")
    response = client.post("/persona")
    assert (response.status_code, response.json) == (402, {"custom": True, "short_by": 5})


@pytest.mark.usefixtures("views")
@pytest.mark.parametrize(("path", "status"), [("/boom", 500), ("/gone", 404), ("/unavailable", 503)])
def test_failed_view_gets_its_credits_back(app, client, login, credits, received, path, status):
    app.config["PROPAGATE_EXCEPTIONS"] = False
    credits.grant("alice", 10, reason="welcome")
    login("alice")
    assert client.post(path).status_code == status
    assert credits.balance("alice") == 10
    kinds = [e.kind for e in credits.history("alice")]
    assert kinds == ["refund", "spend", "grant"]
    names = [n for n, _, _ in received]
    assert names.index("credits_spent") < names.index("credits_refunded")
    assert credits.audit() == []


@pytest.mark.usefixtures("views")
def test_a_4xx_answer_other_than_an_exception_keeps_the_debit(client, login, credits):
    credits.grant("alice", 10, reason="welcome")
    login("alice")
    assert client.post("/teapot").status_code == 418
    assert credits.balance("alice") == 7


@pytest.mark.usefixtures("views")
def test_exception_propagates_to_the_app_after_the_refund(client, login, credits):
    credits.grant("alice", 10, reason="welcome")
    login("alice")
    with pytest.raises(RuntimeError, match="model crashed"):
        client.post("/boom")
    assert credits.balance("alice") == 10


@pytest.mark.usefixtures("views")
def test_callable_cost_is_evaluated_per_request(client, login, credits):
    credits.grant("alice", 10, reason="welcome")
    login("alice")
    assert client.post("/sized/3").status_code == 200
    assert client.post("/sized/4").status_code == 200
    assert client.post("/sized/0").status_code == 200  # a free request writes nothing
    assert [e.amount for e in credits.history("alice")] == [-4, -3, 10]


@pytest.mark.usefixtures("views")
def test_async_views_are_charged_too(client, login, credits):
    credits.grant("alice", 10, reason="welcome")
    login("alice")
    assert client.post("/async").json == {"ok": True}
    assert credits.balance("alice") == 8


def test_bad_costs_are_refused_at_decoration_time():
    for bad in (0, -1, 1.5, "5", True):
        with pytest.raises(InvalidAmount):
            requires_credits(bad)


def test_a_callable_returning_a_bad_cost_is_a_server_error_not_a_debit(app, client, login, credits):
    app.config["PROPAGATE_EXCEPTIONS"] = False

    @app.post("/negative")
    @requires_credits(lambda: -2)
    def negative():
        return "never"

    credits.grant("alice", 10, reason="welcome")
    login("alice")
    assert client.post("/negative").status_code == 500
    assert credits.balance("alice") == 10


def test_wallet_loader_chooses_an_api_keys_wallet(app, client, credits):
    @credits.wallet_loader
    def from_header():
        from flask import request

        key = request.headers.get("X-API-Key")
        return ("alice", key) if key == "key-1" else None

    @app.post("/api/persona")
    @requires_credits(2)
    def api_persona():
        return {"ok": True}

    credits.grant("alice", 5, key_id="key-1", reason="key credits")
    credits.grant("alice", 100, reason="user credits")
    assert client.post("/api/persona", headers={"X-API-Key": "key-1"}).status_code == 200
    assert client.post("/api/persona", headers={"X-API-Key": "nope"}).status_code == 401
    assert credits.balance("alice", "key-1") == 3
    assert credits.balance("alice") == 100


def test_decorator_without_the_extension_is_a_clear_error():
    from flask import Flask

    bare = Flask(__name__)

    @bare.get("/x")
    @requires_credits(1)
    def x():
        return "x"

    bare.config["PROPAGATE_EXCEPTIONS"] = True
    with pytest.raises(RuntimeError, match="FlaskCredits"):
        bare.test_client().get("/x")


# The Idempotency-Key header: tests/test_idempotency_key.py.
