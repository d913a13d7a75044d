"""An offline Stripe for development and the example app (``CREDITS_STRIPE_MODE = "simulated"``).

Its state is the purchase and subscription rows (in the database, so every worker process agrees).
Checkout goes to a local page (:mod:`flask_credits.web.simulated`) that offers pay, pay later (a delayed
payment method), fail and cancel; a plan's checkout offers pay and cancel, and the simulated Billing
Portal renews, cancels, fails a payment or changes the plan. Each choice builds a Stripe-shaped event,
signs it with the simulated webhook secret and hands it to the same webhook code that real deliveries go
through, so nothing of the real path is skipped but the network. Allowed only while the app is in debug
or testing mode.

A simulated subscription's periods are :data:`PERIOD` long; its ids are derived from its Checkout
Session (the subscription) and from the subscription and period (each invoice), so a button pressed
twice, or in two workers at once, repeats the same invoice, which the webhook credits once.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from flask import current_app, has_request_context

from ..records import Purchase, Wallet
from . import auto_top_up, customers, plans, purchases, stripe_objects, webhooks
from .simulated_mode import check_allowed, webhook_secret
from .stripe_gateway import PaymentProviderError, sign

if TYPE_CHECKING:
    from sqlalchemy.engine import Row

    from ..extension import FlaskCredits
    from ..settings import Plan

#: The length of a simulated subscription's billing period.
PERIOD = timedelta(days=30)

#: The simulated cards a setup-mode checkout can save (by their PaymentMethod id), after Stripe's own
#: test cards: one that pays, one that is declined, one whose bank asks for 3-D Secure (which an
#: off-session payment cannot do).
CARDS = {
    "pm_sim_visa": ("visa", "4242", "succeeded"),
    "pm_sim_declined": ("visa", "0002", "declined"),
    "pm_sim_authentication": ("visa", "3184", "requires_action"),
}


def _derived(prefix: str, *parts: object) -> str:
    return prefix + hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:24]


def subscription_id_of(session_id: str) -> str:
    """The Stripe subscription a simulated subscription checkout creates when paid."""
    return _derived("sub_sim_", session_id)


class SimulatedStripe:
    """Stands in for :class:`flask_credits.stripe_api.LiveStripe`; its state is the purchase rows."""

    def __init__(
        self,
        ext: FlaskCredits,
        page_url: Callable[[str], str],
        portal_url: Callable[[], str],
        setup_url: Callable[[str | None], str],
    ) -> None:
        self.ext = ext
        #: The absolute URL of the simulated checkout page of a session id (the HTTP layer's).
        self.page_url = page_url
        #: The absolute URL of the simulated Billing Portal (it shows the logged-in user's customer).
        self.portal_url = portal_url
        #: The absolute URL of the simulated page that saves a card for a wallet (by its key id, None
        #: for the account's own); the page acts for the logged-in user only.
        self.setup_url = setup_url

    def create_checkout_session(self, params: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        check_allowed(current_app)
        if params.get("mode") == "setup":
            # No card yet: the page names the card chosen in the id of the session it completes.
            key_id = (params.get("metadata") or {}).get("keyId") or None
            return {
                "id": "cs_sim_setup_" + secrets.token_hex(12),
                "object": "checkout.session",
                "mode": "setup",
                "url": self.setup_url(key_id),
            }
        session_id = "cs_sim_" + secrets.token_hex(12)
        total = 0
        prices = {p.price: p.amount for p in self.ext.settings.packs if p.price}
        prices.update({p.price: self.plan_amount(p) for p in self.ext.settings.plans})
        currency = "usd" if params.get("mode") != "subscription" else self.ext.settings.currency
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
        """As Stripe: an open session's ``url`` is where it is paid, here the simulated page (whose
        address needs the request's host; outside a request, as from the CLI, it is None)."""
        session = self.session(self._purchase(session_id))
        is_open = session["status"] == "open" and has_request_context()
        return {**session, "url": self.page_url(session_id) if is_open else None}

    def find_checkout_session(self, payment_intent: str) -> dict[str, Any] | None:
        purchase = purchases.find(self.ext, payment_intent=payment_intent)
        return None if purchase is None else self.session(purchase)

    def expire_checkout_session(self, session_id: str) -> dict[str, Any]:
        """As Stripe: only an open session expires, and Stripe then sends ``checkout.session.expired``."""
        row = plans.stored_row(self.ext, checkout_session_id=session_id)
        if row is not None:
            if row.status not in plans.PENDING or row.stripe_subscription_id is not None:
                raise PaymentProviderError("invalid_request", "This Checkout Session is not open.")
            session = self.subscription_session(row, payment_status="unpaid", status="expired")
            self.deliver("checkout.session.expired", session)
            return session
        purchase = self._purchase(session_id)
        if purchase.status not in ("creating", "open"):
            raise PaymentProviderError("invalid_request", "This Checkout Session is not open.")
        session = stripe_objects.session_of(purchase, payment_status="unpaid", status="expired")
        self.deliver("checkout.session.expired", session)
        return session

    def create_payment_intent(self, params: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
        """An off-session payment with a simulated card: as Stripe, the same idempotency key gives the
        same PaymentIntent (its id is derived from the key), and the outcome is the card's. A paid one
        is also told through the real webhook code (``payment_intent.succeeded``), as Stripe would."""
        check_allowed(current_app)
        _, _, outcome = CARDS.get(str(params.get("payment_method")), ("", "", "declined"))
        intent: dict[str, Any] = {
            "id": _derived("pi_sim_", idempotency_key),
            "object": "payment_intent",
            "amount": params["amount"],
            "amount_received": params["amount"] if outcome == "succeeded" else 0,
            "currency": params["currency"],
            "customer": params.get("customer"),
            "payment_method": params.get("payment_method"),
            "metadata": dict(params.get("metadata") or {}),
            "status": outcome if outcome != "declined" else "requires_payment_method",
            "last_payment_error": None,
        }
        if outcome == "declined":
            intent["last_payment_error"] = {
                "type": "card_error",
                "code": "card_declined",
                "decline_code": "generic_decline",
                "message": "Your card was declined.",
            }
            self.deliver("payment_intent.payment_failed", intent)
        elif outcome == "requires_action":
            self.deliver("payment_intent.requires_action", intent)
        else:
            self.deliver("payment_intent.succeeded", intent)
        return intent

    def setup_card(self, session_id: str) -> dict[str, Any] | None:
        """The simulated setup page names the card it saved in the session id
        (``cs_sim_setup_<payment method>_...``)."""
        for payment_method, (brand, last4, _) in CARDS.items():
            if session_id.startswith(f"cs_sim_setup_{payment_method}_"):
                return {"payment_method": payment_method, "brand": brand, "last4": last4, "customer": None}
        return None

    def save_card(self, wallet: Wallet, payment_method: str) -> None:
        """The customer saved the simulated card ``payment_method`` (one of :data:`CARDS`) for the
        wallet's auto top-up: its setup-mode Checkout Session completes, as Stripe tells it."""
        if payment_method not in CARDS:
            raise PaymentProviderError("invalid_request", "No such simulated card.")
        metadata = {
            "userId": wallet.user_id,
            "keyId": wallet.key_id or "",
            "purpose": auto_top_up.SETUP_PURPOSE,
        }
        session = stripe_objects.setup_session(
            f"cs_sim_setup_{payment_method}_{secrets.token_hex(12)}",
            customer=customers.stored(self.ext, wallet.user_id),
            metadata=metadata,
        )
        self.deliver("checkout.session.completed", session)

    def invoice_payment_intent(self, invoice_id: str) -> str | None:
        return None  # the simulated Stripe's invoices name their PaymentIntent in ``payments``

    def find_invoice(self, payment_intent: str) -> dict[str, Any] | None:
        # The simulated Stripe delivers an invoice's ``invoice.paid`` as it pays it, before anything
        # can refund it: a payment it does not know of as a purchase paid no invoice of its.
        return None

    def list_checkout_sessions(self, created_since: int) -> list[dict[str, Any]]:
        """The sessions of the checkouts (not automatic purchases) started since, newest first, as
        :meth:`session` reports them: the rows are the simulated Stripe's state, so they agree."""
        p = self.ext.tables.purchases
        since = datetime.fromtimestamp(created_since, timezone.utc)
        with self.ext.database.reader.connect() as conn:
            ids = conn.execute(
                sa.select(p.c.id)
                .where(p.c.session_id.is_not(None), p.c.automatic.is_(False), p.c.created_at >= since)
                .order_by(p.c.id.desc())
            ).scalars()
            found = [purchases.find(self.ext, id=purchase_id) for purchase_id in ids]
        return [self.session(purchase) for purchase in found if purchase is not None]

    def list_paid_invoices(self, created_since: int) -> list[dict[str, Any]]:
        """The invoices the simulated Stripe paid since (each delivered as it was paid, so each has its
        purchase row), newest first, rebuilt from those rows."""
        p, s = self.ext.tables.purchases, self.ext.tables.subscriptions
        since = datetime.fromtimestamp(created_since, timezone.utc)
        with self.ext.database.reader.connect() as conn:
            found = conn.execute(
                sa.select(
                    p.c.invoice_id, p.c.pack, p.c.payment_intent, p.c.created_at, s.c.checkout_session_id
                )
                .join(s, s.c.id == p.c.subscription_id)
                .where(p.c.invoice_id.is_not(None), p.c.created_at >= since)
                .order_by(p.c.id.desc())
            ).all()
        invoices = []
        for invoice_id, plan_id, payment_intent, created_at, session_id in found:
            row = plans.stored_row(self.ext, checkout_session_id=session_id)
            plan = self.ext.settings.plan(plan_id)
            if row is None or plan is None or row.stripe_subscription_id is None:
                continue
            first = invoice_id == self._invoice_id(row.stripe_subscription_id, "create")
            reason = "subscription_create" if first else "subscription_cycle"
            invoices.append(
                self._invoice(
                    row,
                    row.stripe_subscription_id,
                    plan,
                    created_at,
                    reason,
                    paid_as=(invoice_id, payment_intent),
                )
            )
        return invoices

    def retrieve_payment_intent(self, payment_intent: str) -> dict[str, Any]:
        """The PaymentIntent of a purchase, as its row says it went; the simulated Stripe never
        refunds, so its charge has nothing refunded and no dispute."""
        purchase = purchases.find(self.ext, payment_intent=payment_intent)
        if purchase is None:
            raise PaymentProviderError("invalid_request", "No such payment intent.")
        status = {"fulfilled": "succeeded", "failed": "requires_payment_method"}.get(
            purchase.status, "processing"
        )
        metadata = {"userId": purchase.wallet.user_id, auto_top_up.PURCHASE: str(purchase.id)}
        if purchase.wallet.key_id:
            metadata["keyId"] = purchase.wallet.key_id
        intent = stripe_objects.payment_intent(
            payment_intent,
            amount=purchase.amount,
            currency=purchase.currency,
            status=status,
            metadata=metadata,
        )
        if status == "succeeded":
            intent["latest_charge"] = stripe_objects.charge(
                payment_intent, amount=purchase.amount, currency=purchase.currency
            )
        return intent

    def list_disputes(self, payment_intent: str) -> list[dict[str, Any]]:
        return []

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

    def deliver(
        self, event_type: str, obj: dict[str, Any], previous_attributes: dict[str, Any] | None = None
    ) -> None:
        """Sign an event about ``obj`` and hand it to the real webhook code, as Stripe would."""
        payload = json.dumps(stripe_objects.event(event_type, obj, previous_attributes=previous_attributes))
        webhooks.process(self.ext, payload.encode(), sign(payload, webhook_secret()))

    # -- subscriptions (their rows are :mod:`flask_credits.services.plans`') ----------------------------

    def plan_amount(self, plan: Plan) -> int:
        """What the simulated Stripe charges for one period of ``plan``: what its credits cost as a
        one-off purchase (a Stripe Price has its own amount; ``CREDITS_PLANS`` names only its id)."""
        settings = self.ext.settings
        return -(-plan.credits * settings.unit_amount // settings.per_unit)

    def subscription_session(
        self, row: Row[Any], *, payment_status: str = "unpaid", status: str = "open"
    ) -> dict[str, Any]:
        """The subscription-mode Checkout Session of a stored subscription row."""
        plan = self.ext.settings.plan(row.plan)
        complete = status == "complete"
        session = stripe_objects.subscription_session(
            row.checkout_session_id,
            subscription=subscription_id_of(row.checkout_session_id) if complete else None,
            client_reference_id=row.attempt_key,
            amount_total=0 if plan is None else self.plan_amount(plan),
            currency=self.ext.settings.currency,
            payment_status=payment_status,
            status=status,
            customer=customers.stored(self.ext, row.user_id),
            metadata=self._metadata(row),
        )
        if complete:
            session["invoice"] = self._invoice_id(subscription_id_of(row.checkout_session_id), "create")
        return session

    def pay_subscription(self, row: Row[Any], plan: Plan) -> None:
        """The customer paid a plan's checkout: the session completes and its first invoice is paid."""
        stripe_id = subscription_id_of(row.checkout_session_id)
        start = self.ext.database.now()
        self.deliver(
            "checkout.session.completed",
            self.subscription_session(row, payment_status="paid", status="complete"),
        )
        invoice = self._invoice(row, stripe_id, plan, start, "subscription_create", invoice_key="create")
        self.deliver("invoice.paid", invoice)

    def renew(self, row: Row[Any]) -> None:
        """The period ended (now, on request): the next period's invoice is paid and the subscription
        moves on to that period; or, when it was cancelled at period end, the subscription ends."""
        if row.cancel_at_period_end:
            self.cancel_now(row)
            return
        plan = self._plan(row)
        start = self._next_period_start(row)
        self.deliver("invoice.paid", self._invoice(row, row.stripe_subscription_id, plan, start))
        self.deliver("customer.subscription.updated", self._subscription(row, status="active", start=start))

    def fail_next_payment(self, row: Row[Any]) -> None:
        """The next period's invoice could not be charged (renewing later pays that same invoice)."""
        start = self._next_period_start(row)
        invoice = self._invoice(row, row.stripe_subscription_id, self._plan(row), start, status="open")
        self.deliver("invoice.payment_failed", invoice)

    def cancel_at_period_end(self, row: Row[Any], cancel: bool = True) -> None:
        """Cancel at the period's end (``cancel`` False: no longer)."""
        self.deliver("customer.subscription.updated", self._subscription(row, cancel_at_period_end=cancel))

    def cancel_now(self, row: Row[Any]) -> None:
        self.deliver("customer.subscription.deleted", self._subscription(row, status="canceled"))

    def change_plan(self, row: Row[Any], plan: Plan) -> None:
        """Switch the subscription's item to ``plan``'s price, as the portal does."""
        before = self._subscription(row)["items"]
        self.deliver(
            "customer.subscription.updated",
            self._subscription(row, price=plan.price),
            previous_attributes={"items": before},
        )

    def _plan(self, row: Row[Any]) -> Plan:
        plan = self.ext.settings.plan(row.plan)
        if plan is None:
            raise PaymentProviderError("invalid_request", f"plan {row.plan!r} is not in CREDITS_PLANS")
        return plan

    def _next_period_start(self, row: Row[Any]) -> datetime:
        return row.current_period_end or self.ext.database.now()

    def _metadata(self, row: Row[Any]) -> dict[str, str]:
        """The subscription's metadata, as :func:`flask_credits.services.plans.start_subscription` set it."""
        metadata = {"userId": row.user_id, "plan": row.plan, plans.REFERENCE: row.attempt_key}
        if row.wallet_key_id:
            metadata["keyId"] = row.wallet_key_id
        return metadata

    @staticmethod
    def _invoice_id(stripe_id: str, key: object) -> str:
        return _derived("in_sim_", stripe_id, key)

    def _invoice(
        self,
        row: Row[Any],
        stripe_id: str,
        plan: Plan,
        start: datetime,
        billing_reason: str = "subscription_cycle",
        *,
        status: str = "paid",
        invoice_key: object = None,
        paid_as: tuple[str, str | None] | None = None,
    ) -> dict[str, Any]:
        """The invoice for the period from ``start``; one id per subscription and period (or, given
        ``paid_as``, the invoice id and PaymentIntent a purchase row recorded)."""
        begins = int(start.timestamp())
        invoice_id = self._invoice_id(stripe_id, begins if invoice_key is None else invoice_key)
        # Stripe names it in ``payments``; so the webhook need not ask for it.
        payment_intent = "pi_sim_" + secrets.token_hex(12) if status == "paid" else None
        if paid_as is not None:
            invoice_id, payment_intent = paid_as
        return stripe_objects.invoice(
            invoice_id,
            subscription=stripe_id,
            price=plan.price,
            period_start=begins,
            period_end=int((start + PERIOD).timestamp()),
            amount_paid=self.plan_amount(plan),
            currency=self.ext.settings.currency,
            billing_reason=billing_reason,
            status=status,
            payment_intent=payment_intent,
            metadata=self._metadata(row),
            customer=customers.stored(self.ext, row.user_id),
        )

    def _subscription(
        self,
        row: Row[Any],
        *,
        status: str | None = None,
        start: datetime | None = None,
        price: str | None = None,
        cancel_at_period_end: bool | None = None,
    ) -> dict[str, Any]:
        """The subscription as it is now, or with the changes given (``start``: the period from it)."""
        if start is None:
            end = row.current_period_end or self.ext.database.now() + PERIOD
            start = end - PERIOD
        return stripe_objects.subscription(
            row.stripe_subscription_id,
            price=price or self._plan(row).price,
            period_start=int(start.timestamp()),
            period_end=int((start + PERIOD).timestamp()),
            status=status or row.status,
            cancel_at_period_end=row.cancel_at_period_end
            if cancel_at_period_end is None
            else cancel_at_period_end,
            metadata=self._metadata(row),
            customer=customers.stored(self.ext, row.user_id),
        )
