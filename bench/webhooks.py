"""Section 4: signed ``checkout.session.completed`` events through the webhook route, then duplicates."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import responses
from flask import Flask

from flask_credits import FlaskCredits, testing

from .app import WEBHOOK_SECRET
from .settings import Settings
from .timing import Measurement

WEBHOOK = "/credits/stripe-webhook"


@dataclass
class WebhookResult:
    fulfil: Measurement
    duplicate: Measurement
    outcomes: dict[str, int]


def start_purchases(app: Flask, count: int) -> list[str]:
    """``count`` purchases through ``POST /credits/checkout``, Stripe mocked with ``responses``;
    returns their Checkout Session ids."""
    client = app.test_client()
    sessions = []
    # Each buyer's Stripe Customer is created once per database: a later call (the statement counts
    # after the webhook loads) finds them all made already.
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        testing.mock_create_session(rsps)
        for i in range(count):
            response = client.post(
                "/credits/checkout", json={"quantity": 1}, headers={"X-Wallet": f"buyer-{i % 50}"}
            )
            if response.status_code != 200:
                raise RuntimeError(f"checkout answered {response.status_code}: {response.get_data(True)}")
            sessions.append(str(response.get_json()["id"]))
    return sessions


def signed_events(app: Flask, sessions: list[str]) -> list[tuple[bytes, str]]:
    """(body, Stripe-Signature) of a paid ``checkout.session.completed`` for each session, signed
    before the clock starts (the tolerance is 300 s)."""
    out = []
    with app.app_context():
        for session_id in sessions:
            payload = json.dumps(testing.event("checkout.session.completed", testing.session_for(session_id)))
            out.append((payload.encode(), testing.sign(payload, WEBHOOK_SECRET)))
    return out


def deliver(app: Flask, events: list[tuple[bytes, str]]) -> tuple[Measurement, list[str]]:
    client = app.test_client()
    latencies, bodies = [], []
    begin = time.perf_counter()
    for body, signature in events:
        t0 = time.perf_counter()
        response = client.post(
            WEBHOOK, data=body, headers={"Stripe-Signature": signature, "Content-Type": "application/json"}
        )
        latencies.append(time.perf_counter() - t0)
        bodies.append(response.get_data(as_text=True))
    elapsed = time.perf_counter() - begin
    result = Measurement(len(events), elapsed, latencies)
    result.rounds.append(result.throughput)
    return result, bodies


def run(app: Flask, credits: FlaskCredits, settings: Settings) -> WebhookResult:
    events = signed_events(app, start_purchases(app, settings.webhook_events))
    fulfil, first = deliver(app, events)
    duplicate, second = deliver(app, events)
    outcomes: dict[str, int] = {}
    for text in first + second:
        outcome = str(json.loads(text).get("outcome", text[:60]))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    expected = {"fulfilled": len(events), "duplicate": len(events)}
    if outcomes != expected:
        raise RuntimeError(f"webhook outcomes {outcomes}, expected {expected}")
    return WebhookResult(fulfil, duplicate, outcomes)
