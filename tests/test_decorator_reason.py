"""``@requires_credits(..., reason=...)``: a string or a callable read per request, shown as the
history's "What" (issue 17, item 9); the example app names the persona's seed."""

from __future__ import annotations

import pytest
from flask import request
from helpers import create_key, grant, signed_up

from example_app.extensions import credits as example_credits
from flask_credits import current_hold, requires_credits
from flask_credits.web.decorators import MAX_REASON_LENGTH

HTML = {"Accept": "text/html"}


@pytest.fixture
def views(app):
    @app.post("/persona")
    @requires_credits(2, reason=lambda: f"persona {request.form['seed']}")
    def persona():
        return {"ok": True}

    @app.post("/long")
    @requires_credits(1, reason=lambda: "x" * (MAX_REASON_LENGTH + 50))
    def long():
        return {"ok": True}

    @app.post("/unnamed")
    @requires_credits(1, reason=lambda: None)
    def unnamed():
        return {"ok": True}

    @app.post("/wrong")
    @requires_credits(1, reason=lambda: 42)  # type: ignore[arg-type, return-value]
    def wrong():
        return {"ok": True}

    @app.post("/metered")
    @requires_credits(hold=5, reason=lambda: f"summary of {request.form['doc']}")
    def metered():
        current_hold.settle(3)
        return {"ok": True}


@pytest.mark.usefixtures("views")
def test_a_callable_reason_names_what_the_request_made_in_the_history(client, login, credits):
    credits.grant("alice", 10, reason="welcome")
    login("alice")
    assert client.post("/persona", data={"seed": "ada"}).status_code == 200
    spend = credits.history("alice")[0]
    assert (spend.kind, spend.amount, spend.reason) == ("spend", -2, "persona ada")
    assert spend.metadata["endpoint"] == "persona"
    page = client.get("/credits/", headers=HTML).get_data(as_text=True)
    assert "Spend: persona ada" in page  # the "What" column


@pytest.mark.usefixtures("views")
def test_a_reason_from_client_input_is_escaped_and_cut_to_what_the_ledger_stores(client, login, credits):
    credits.grant("alice", 10, reason="welcome")
    login("alice")
    assert client.post("/persona", data={"seed": "<script>x</script>"}).status_code == 200
    page = client.get("/credits/", headers=HTML).get_data(as_text=True)
    assert "persona &lt;script&gt;x&lt;/script&gt;" in page
    assert "<script>x</script>" not in page
    assert client.post("/long").status_code == 200
    assert credits.history("alice")[0].reason == "x" * MAX_REASON_LENGTH


@pytest.mark.usefixtures("views")
def test_a_reason_callable_returning_none_means_the_endpoint_and_a_non_string_is_a_bug(
    app, client, login, credits
):
    credits.grant("alice", 10, reason="welcome")
    login("alice")
    assert client.post("/unnamed").status_code == 200
    assert credits.history("alice")[0].reason == "unnamed"
    app.config["PROPAGATE_EXCEPTIONS"] = False
    assert client.post("/wrong").status_code == 500
    assert credits.balance("alice") == 9  # nothing charged for the broken one


@pytest.mark.usefixtures("views")
def test_a_held_views_callable_reason_names_its_settled_spend(client, login, credits):
    credits.grant("alice", 10, reason="welcome")
    login("alice")
    assert client.post("/metered", data={"doc": "report.pdf"}).status_code == 200
    spend = credits.history("alice")[0]
    assert (spend.kind, spend.amount, spend.reason) == ("spend", -3, "summary of report.pdf")


# -- the example app: the persona's seed -------------------------------------------------------------


def test_the_example_apps_history_names_each_personas_seed(example):
    client = example.test_client()
    user_id = signed_up(client)
    assert grant(example, user_id, 20).exit_code == 0
    assert client.post("/personas", data={"seed": " lighthouse "}, headers=HTML).status_code == 200
    key_id, secret = create_key(client)
    assert grant(example, user_id, 5, key_id=key_id).exit_code == 0
    answer = client.post("/api/personas", json={"seed": "ada"}, headers={"X-API-Key": secret})
    assert answer.status_code == 200
    with example.app_context():
        assert example_credits.history(user_id)[0].reason == 'generate persona "lighthouse"'
        assert example_credits.history(user_id, key_id)[0].reason == 'generate persona "ada" (API)'
    page = client.get("/credits/", headers=HTML).get_data(as_text=True)
    assert "Spend: generate persona &#34;lighthouse&#34;" in page
