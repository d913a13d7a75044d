"""Secrets never appear in logs or error pages, on every backend, whatever fails: Stripe refusing or
unreachable, bad webhook signatures, the database failing, a view raising."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import requests
import responses
import sqlalchemy as sa
from helpers import (
    SECRET_KEY,
    WHSEC,
    open_delivery,
    stripe_signature,
)

from flask_credits import testing


def test_secrets_never_appear_in_logs_or_error_pages(shop, caplog):
    app = shop.app
    app.config["PROPAGATE_EXCEPTIONS"] = False  # errors become 500 pages, logged as they would be live

    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="stripe")
    bodies: list[str] = []

    def seen(response: Any) -> Any:
        bodies.append(response.get_data(as_text=True))
        bodies.extend(f"{k}: {v}" for k, v in response.headers.items())
        return response

    alice = shop.client("alice")
    stripe_errors = [
        (402, {"type": "card_error", "code": "card_declined", "message": "Your card was declined."}),
        (401, {"type": "invalid_request_error", "message": "Invalid API Key provided: sk_test_****3Cd"}),
        (429, {"type": "invalid_request_error", "code": "rate_limit", "message": "Too many requests"}),
        (400, {"type": "invalid_request_error", "message": "Invalid currency"}),
        (500, {"type": "api_error", "message": "Something went wrong"}),
    ]
    for status, error in stripe_errors:
        # Not every request need be made: alice's Stripe Customer exists, so it is not created again.
        with responses.RequestsMock(assert_all_requests_are_fired=False) as failing:
            testing.mock_create_session(failing, status=status, error=error)
            assert seen(alice.post("/credits/checkout", json={"quantity": 1})).status_code == 502
            page = alice.post("/credits/checkout", data={"quantity": "1"}, headers={"Accept": "text/html"})
            assert seen(page).status_code == 502  # the browser's error page
    for failure in (requests.exceptions.ConnectionError("down"), requests.exceptions.Timeout("slow")):
        with responses.RequestsMock() as failing:
            failing.add(responses.POST, f"{testing.STRIPE_API}/v1/checkout/sessions", body=failure)
            assert seen(alice.post("/credits/checkout", json={"quantity": 1})).status_code == 502
    with responses.RequestsMock() as failing:  # the success page cannot reach Stripe
        failing.add(responses.GET, re.compile(r".*/v1/checkout/sessions/.*"), status=500, json={"error": {}})
        seen(shop.client("bob").get(f"/credits/success?session_id={shop.open_session}"))

    payload = shop.open_payload
    for headers in (
        {},
        {"Stripe-Signature": "garbage"},
        {"Stripe-Signature": stripe_signature(payload, "whsec_wrong")},
        {"Stripe-Signature": stripe_signature(payload, timestamp=int(time.time()) - 3600)},
    ):
        assert seen(shop.post(payload, headers)).status_code == 400

    def fail_every_statement(conn, cursor, statement, parameters, context, executemany):
        raise sa.exc.OperationalError(statement, parameters, Exception("the database went away"))

    def fail_every_write(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
            fail_every_statement(conn, cursor, statement, parameters, context, executemany)

    for failure in (fail_every_statement, fail_every_write):
        sa.event.listen(shop.db.engine, "before_cursor_execute", failure)
        try:
            assert seen(shop.post(*open_delivery(shop))).status_code == 503
            assert seen(alice.post("/credits/checkout", json={"quantity": 1})).status_code == 503
            seen(alice.get("/credits/balance"))
            seen(alice.get("/credits/", headers={"Accept": "text/html"}))
        finally:
            sa.event.remove(shop.db.engine, "before_cursor_execute", failure)
    assert seen(alice.get("/_boom")).status_code == 500
    seen(alice.get("/credits/", headers={"Accept": "text/html"}))

    # The failures above were logged, with tracebacks, and stripe-python's debug lines were captured.
    assert "Traceback" in caplog.text
    assert "Stripe could not create a checkout session" in caplog.text
    assert any(r.name == "stripe" and r.levelno == logging.DEBUG for r in caplog.records)
    for secret in (SECRET_KEY, WHSEC, SECRET_KEY[8:], WHSEC[6:]):
        assert secret not in caplog.text
        for body in bodies:
            assert secret not in body
