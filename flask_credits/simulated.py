"""An offline Stripe for development and the example app (``CREDITS_STRIPE_MODE = "simulated"``).

Checkout goes to a local page that looks like a checkout and offers pay, pay later (a delayed
payment method), fail and cancel. Each choice builds a Stripe-shaped event, signs it with the webhook
secret and hands it to the same webhook code that real deliveries go through, so nothing of the real
path is skipped but the network. Allowed only while the app is in debug or testing mode.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import TYPE_CHECKING, Any

from flask import abort, current_app, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from . import purchases, testing, webhooks
from .stripe_api import PaymentProviderError, sign
from .urls import external_url
from .views import blueprint, extension, own_purchase

if TYPE_CHECKING:
    from flask import Flask

    from .extension import FlaskCredits
    from .records import Purchase


def check_allowed(app: Flask) -> None:
    if not (app.debug or app.testing):
        raise RuntimeError(
            'CREDITS_STRIPE_MODE = "simulated" fakes payments and is allowed only when the app runs'
            ' in debug or testing mode. Set CREDITS_STRIPE_MODE = "live" and Stripe keys in production.'
        )


def webhook_secret() -> str:
    """The simulated Stripe's signing secret, derived from SECRET_KEY so every worker agrees."""
    key = current_app.config.get("SECRET_KEY")
    if not key:
        raise RuntimeError("the simulated Stripe needs the app's SECRET_KEY to sign its events")
    digest = hashlib.sha256(b"flask-credits-simulated-webhook:" + str(key).encode()).hexdigest()
    return "whsec_simulated_" + digest[:32]


class SimulatedStripe:
    """Stands in for :class:`flask_credits.stripe_api.LiveStripe`; its state is the purchase rows."""

    def __init__(self, ext: FlaskCredits) -> None:
        self.ext = ext

    def create_checkout_session(self, params: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        check_allowed(current_app)
        session_id = "cs_sim_" + secrets.token_hex(12)
        total = 0
        prices = {p.price: p.amount for p in purchases.packs(current_app) if p.price}
        currency = "usd"
        for item in params["line_items"]:
            if "price_data" in item:
                total += int(item["price_data"]["unit_amount"]) * int(item["quantity"])
                currency = item["price_data"]["currency"]
            else:
                total += int(prices.get(item["price"]) or 0) * int(item["quantity"])
        return {
            "id": session_id,
            "url": external_url("credits.simulated_checkout", session_id=session_id),
            "amount_total": total,
            "currency": currency,
        }

    def retrieve_checkout_session(self, session_id: str) -> dict[str, Any]:
        return self._session(self._purchase(session_id))

    def find_checkout_session(self, payment_intent: str) -> dict[str, Any] | None:
        purchase = purchases.find(self.ext, payment_intent=payment_intent)
        return None if purchase is None else self._session(purchase)

    def expire_checkout_session(self, session_id: str) -> dict[str, Any]:
        """As Stripe: only an open session expires, and Stripe then sends ``checkout.session.expired``."""
        purchase = self._purchase(session_id)
        if purchase.status not in ("creating", "open"):
            raise PaymentProviderError("invalid_request", "This Checkout Session is not open.")
        assert purchase.session_id is not None
        session = testing.session_for(purchase.session_id, payment_status="unpaid", status="expired")
        _deliver(self.ext, "checkout.session.expired", session)
        return session

    def _purchase(self, session_id: str) -> Purchase:
        purchase = purchases.find(self.ext, session_id=session_id)
        if purchase is None:
            raise PaymentProviderError("invalid_request", "No such checkout session.")
        return purchase

    def _session(self, purchase: Purchase, payment_status: str | None = None) -> dict[str, Any]:
        """The session as Stripe would report it now, or as an event about to report it (given
        ``payment_status``, the customer has just completed the checkout)."""
        assert purchase.session_id is not None
        paid = payment_status or ("paid" if purchase.status == "fulfilled" else "unpaid")
        status = "complete"
        if payment_status is None and purchase.status in ("creating", "open"):
            status = "open"
        elif payment_status is None and purchase.status in ("expired", "error"):
            status = "expired"
        return testing.session_for(
            purchase.session_id,
            payment_status=paid,
            payment_intent=purchase.payment_intent or "pi_sim_" + secrets.token_hex(12),
            status=status,
        )


def _deliver(ext: FlaskCredits, event_type: str, session: dict[str, Any]) -> None:
    payload = json.dumps(testing.event(event_type, session))
    webhooks.process(ext, payload.encode(), sign(payload, webhook_secret()))


def _own_purchase(session_id: str) -> Purchase:
    if current_app.config["CREDITS_STRIPE_MODE"] != "simulated":
        abort(404)
    check_allowed(current_app)
    return own_purchase(session_id)


@blueprint.route("/simulated-checkout/<session_id>", methods=["GET", "POST"])
def simulated_checkout(session_id: str) -> ResponseReturnValue:
    """The simulated Stripe Checkout page and its buttons."""
    purchase = _own_purchase(session_id)
    if request.method == "GET":
        return render_template("credits/simulated_checkout.html", purchase=purchase)
    ext = extension()
    gateway = SimulatedStripe(ext)
    action = request.form.get("action")
    done = url_for("credits.success", session_id=session_id)
    if action == "cancel":  # back to the cancel URL the checkout was created with, as on Stripe
        row = purchases._row(ext, session_id=session_id)
        assert row is not None
        return redirect(url_for("credits.cancel", attempt=row.attempt_key), 303)
    if action == "pay" and purchase.status == "open":
        _deliver(ext, "checkout.session.completed", gateway._session(purchase, "paid"))
    elif action == "pay_later" and purchase.status == "open":
        _deliver(ext, "checkout.session.completed", gateway._session(purchase, "unpaid"))
    elif action == "settle" and purchase.status == "unpaid":
        _deliver(ext, "checkout.session.async_payment_succeeded", gateway._session(purchase, "paid"))
    elif action == "fail" and purchase.status in ("open", "unpaid"):
        if purchase.status == "open":
            _deliver(ext, "checkout.session.completed", gateway._session(purchase, "unpaid"))
        _deliver(ext, "checkout.session.async_payment_failed", gateway._session(purchase, "unpaid"))
    else:
        abort(400, f"cannot {action!r} a purchase that is {purchase.status}")
    return redirect(done, 303)
