"""What an app can plug in: webhook handlers for more event types (per extension instance), async
signal receivers, and the simulated checkout pages only where that mode is on."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from helpers import make_app

from flask_credits import signals, testing

WHSEC = "whsec_extension_points"


def invoice(event_id: str | None = None) -> dict[str, object]:
    return testing.event("invoice.paid", {"id": "in_test_1", "object": "invoice"}, event_id=event_id)


def test_a_webhook_handler_for_another_event_type_runs_once_per_event(database_url):
    app, db, credits = make_app(database_url, STRIPE_WEBHOOK_SECRET=WHSEC)
    seen = []

    @credits.webhook_handler("invoice.paid")
    def invoice_paid(ext, obj, record):
        assert ext is credits
        seen.append(obj["id"])
        return "handled"

    with app.app_context():
        db.create_all()
        try:
            event = invoice()
            first = testing.post_event(app.test_client(), event)
            again = testing.post_event(app.test_client(), event)
            assert (first.json["outcome"], again.json["outcome"]) == ("handled", "duplicate")
            assert seen == ["in_test_1"]
            events = db.metadata.tables["credits_stripe_events"]
            with db.engine.connect() as conn:
                row = conn.execute(sa.select(events).where(events.c.id == event["id"])).one()
            assert (row.type, row.outcome) == ("invoice.paid", "handled")
        finally:
            db.drop_all()
            db.engine.dispose()


def test_a_webhook_handler_belongs_to_its_extension_instance_only(database_url, credits):
    _, _, other = make_app(database_url, STRIPE_WEBHOOK_SECRET=WHSEC)
    other.webhook_handler("invoice.upcoming")(lambda ext, obj, record: "handled")
    assert "invoice.upcoming" in other.webhook_handlers
    assert "invoice.upcoming" not in credits.webhook_handlers
    # The built-in handlers are on every instance, and a copy each.
    assert (
        other.webhook_handlers["checkout.session.completed"]
        is credits.webhook_handlers["checkout.session.completed"]
    )
    assert other.webhook_handlers is not credits.webhook_handlers


def test_async_signal_receivers_are_awaited(app, credits):
    got = []

    async def receiver(sender, **kwargs):
        await asyncio.sleep(0)
        got.append((sender, kwargs["amount"]))

    signals.credits_granted.connect(receiver)
    try:
        credits.grant("alice", 7, reason="async")
    finally:
        signals.credits_granted.disconnect(receiver)
    assert got == [(app, 7)]


def test_the_simulated_checkout_pages_exist_only_in_simulated_mode(database_url):
    live, _, _ = make_app(database_url)
    simulated, _, _ = make_app(database_url, CREDITS_STRIPE_MODE="simulated")

    def pages(app):
        return [rule.rule for rule in app.url_map.iter_rules() if "simulated" in rule.rule]

    assert pages(live) == []
    assert sorted(pages(simulated)) == [
        "/credits/simulated-checkout/<session_id>",
        "/credits/simulated-portal",
        "/credits/simulated-setup",
    ]
