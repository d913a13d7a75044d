"""An offline Stripe for development and the example app (``CREDITS_STRIPE_MODE = "simulated"``).

Its state is the purchase rows. Checkout goes to a local page (:mod:`flask_credits.web.simulated`) that
offers pay, pay later (a delayed payment method), fail and cancel. Each choice builds a Stripe-shaped
event, signs it with the simulated webhook secret and hands it to the same webhook code that real
deliveries go through, so nothing of the real path is skipped but the network. Allowed only while the
app is in debug or testing mode.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import current_app

from ..records import Purchase
from . import purchases, stripe_objects, webhooks
from .simulated_mode import check_allowed, webhook_secret
from .stripe_gateway import PaymentProviderError, sign

if TYPE_CHECKING:
    from ..extension import FlaskCredits


class SimulatedStripe:
    """Stands in for :class:`flask_credits.stripe_api.LiveStripe`; its state is the purchase rows."""

    def __init__(
        self, ext: FlaskCredits, page_url: Callable[[str], str], portal_url: Callable[[], str]
    ) -> None:
        self.ext = ext
        #: The absolute URL of the simulated checkout page of a session id (the HTTP layer's).
        self.page_url = page_url
        #: The absolute URL of the simulated Billing Portal (it shows the logged-in user's customer).
        self.portal_url = portal_url

    def create_checkout_session(self, params: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        check_allowed(current_app)
        session_id = "cs_sim_" + secrets.token_hex(12)
        total = 0
        prices = {p.price: p.amount for p in self.ext.settings.packs if p.price}
        currency = "usd"
        for item in params["line_items"]:
            if "price_data" in item:
                total += int(item["price_data"]["unit_amount"]) * int(item["quantity"])
                currency = item["price_data"]["currency"]
            else:
                total += int(prices.get(item["price"]) or 0) * int(item["quantity"])
        return {
            "id": session_id,
            "url": self.page_url(session_id),
            "amount_total": total,
            "currency": currency,
        }

    def create_customer(self, params: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        """As Stripe within its 24 hours: the same key gives the same customer (its id is derived from
        the key), so the real code's handling of concurrent first checkouts runs offline too."""
        check_allowed(current_app)
        digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:24]
        return {"id": "cus_sim_" + digest, "object": "customer", **params}

    def create_portal_session(self, params: dict[str, Any]) -> dict[str, Any]:
        check_allowed(current_app)
        return {
            "id": "bps_sim_" + secrets.token_hex(12),
            "object": "billing_portal.session",
            "customer": params["customer"],
            "return_url": params.get("return_url"),
            "url": self.portal_url(),
        }

    def retrieve_checkout_session(self, session_id: str) -> dict[str, Any]:
        return self.session(self._purchase(session_id))

    def find_checkout_session(self, payment_intent: str) -> dict[str, Any] | None:
        purchase = purchases.find(self.ext, payment_intent=payment_intent)
        return None if purchase is None else self.session(purchase)

    def expire_checkout_session(self, session_id: str) -> dict[str, Any]:
        """As Stripe: only an open session expires, and Stripe then sends ``checkout.session.expired``."""
        purchase = self._purchase(session_id)
        if purchase.status not in ("creating", "open"):
            raise PaymentProviderError("invalid_request", "This Checkout Session is not open.")
        session = stripe_objects.session_of(purchase, payment_status="unpaid", status="expired")
        self.deliver("checkout.session.expired", session)
        return session

    def invoice_payment_intent(self, invoice_id: str) -> str | None:
        return None  # the simulated Stripe's invoices name their PaymentIntent in ``payments``

    def _purchase(self, session_id: str) -> Purchase:
        purchase = purchases.find(self.ext, session_id=session_id)
        if purchase is None:
            raise PaymentProviderError("invalid_request", "No such checkout session.")
        return purchase

    def session(self, purchase: Purchase, payment_status: str | None = None) -> dict[str, Any]:
        """The session as Stripe would report it now, or as an event about to report it (given
        ``payment_status``, the customer has just completed the checkout)."""
        paid = payment_status or ("paid" if purchase.status == "fulfilled" else "unpaid")
        status = "complete"
        if payment_status is None and purchase.status in ("creating", "open"):
            status = "open"
        elif payment_status is None and purchase.status in ("expired", "error"):
            status = "expired"
        return stripe_objects.session_of(
            purchase,
            payment_status=paid,
            payment_intent=purchase.payment_intent or "pi_sim_" + secrets.token_hex(12),
            status=status,
        )

    def deliver(self, event_type: str, session: dict[str, Any]) -> None:
        """Sign an event about ``session`` and hand it to the real webhook code, as Stripe would."""
        payload = json.dumps(stripe_objects.event(event_type, session))
        webhooks.process(self.ext, payload.encode(), sign(payload, webhook_secret()))
