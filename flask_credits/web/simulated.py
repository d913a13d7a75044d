"""The simulated Stripe Checkout page (``CREDITS_STRIPE_MODE = "simulated"``): its own blueprint,
registered by ``init_app`` only in that mode, under ``CREDITS_URL_PREFIX``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Blueprint, abort, current_app, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from ..services import customers, purchases
from ..services.simulated_mode import check_allowed
from ..services.simulated_stripe import SimulatedStripe
from .blueprint import current_wallet_or_401, extension, own_purchase, read_body_within_limit

if TYPE_CHECKING:
    from ..records import Purchase

blueprint = Blueprint("credits_simulated", __name__)
blueprint.url_value_preprocessor(read_body_within_limit)


def _own_purchase(session_id: str) -> Purchase:
    if extension().settings.stripe_mode != "simulated":
        abort(404)
    check_allowed(current_app)
    return own_purchase(session_id)


@blueprint.route("/simulated-checkout/<session_id>", methods=["GET", "POST"])
def checkout(session_id: str) -> ResponseReturnValue:
    """The simulated Stripe Checkout page and its buttons."""
    purchase = _own_purchase(session_id)
    if request.method == "GET":
        return render_template("credits/simulated_checkout.html", purchase=purchase)
    ext = extension()
    gateway = ext.gateway
    assert isinstance(gateway, SimulatedStripe)
    action = request.form.get("action")
    done = url_for("credits.success", session_id=session_id)
    if action == "cancel":  # back to the cancel URL the checkout was created with, as on Stripe
        attempt = purchases.attempt_key_of(ext, purchase.id)
        return redirect(url_for("credits.cancel", attempt=attempt), 303)
    if action == "pay" and purchase.status == "open":
        gateway.deliver("checkout.session.completed", gateway.session(purchase, "paid"))
    elif action == "pay_later" and purchase.status == "open":
        gateway.deliver("checkout.session.completed", gateway.session(purchase, "unpaid"))
    elif action == "settle" and purchase.status == "unpaid":
        gateway.deliver("checkout.session.async_payment_succeeded", gateway.session(purchase, "paid"))
    elif action == "fail" and purchase.status in ("open", "unpaid"):
        if purchase.status == "open":
            gateway.deliver("checkout.session.completed", gateway.session(purchase, "unpaid"))
        gateway.deliver("checkout.session.async_payment_failed", gateway.session(purchase, "unpaid"))
    else:
        abort(400, f"cannot {action!r} a purchase that is {purchase.status}")
    return redirect(done, 303)


@blueprint.get("/simulated-portal")
def portal() -> ResponseReturnValue:
    """The simulated Billing Portal: the logged-in user's own customer (never one named in the URL)
    and the way back to the credits page."""
    if extension().settings.stripe_mode != "simulated":
        abort(404)
    check_allowed(current_app)
    wallet = current_wallet_or_401()
    customer_id = customers.stored(extension(), wallet.user_id)
    if customer_id is None:
        abort(404)
    return render_template("credits/simulated_portal.html", customer_id=customer_id)
