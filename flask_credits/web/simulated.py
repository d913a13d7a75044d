"""The simulated Stripe Checkout page and Billing Portal (``CREDITS_STRIPE_MODE = "simulated"``): its
own blueprint, registered by ``init_app`` only in that mode, under ``CREDITS_URL_PREFIX``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flask import Blueprint, abort, current_app, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from ..services import customers, plans, purchases
from ..services.simulated_mode import check_allowed
from ..services.simulated_stripe import CARDS, SimulatedStripe
from .blueprint import (
    current_wallet_or_401,
    extension,
    own_purchase,
    read_body_within_limit,
    requested_wallet,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Row


blueprint = Blueprint("credits_simulated", __name__)
blueprint.url_value_preprocessor(read_body_within_limit)


def _simulated_gateway() -> SimulatedStripe:
    if extension().settings.stripe_mode != "simulated":
        abort(404)
    check_allowed(current_app)
    gateway = extension().gateway
    assert isinstance(gateway, SimulatedStripe)
    return gateway


def _own_subscription_checkout(session_id: str) -> Row[Any] | None:
    """The current user's subscription whose Checkout Session this is (None: not a plan's checkout)."""
    wallet = current_wallet_or_401()
    if len(session_id) > 255 or not session_id.isascii() or not session_id.replace("_", "").isalnum():
        return None  # own_purchase answers it
    row = plans.stored_row(extension(), checkout_session_id=session_id)
    if row is not None and row.user_id != wallet.user_id:
        abort(404)
    return row


@blueprint.route("/simulated-checkout/<session_id>", methods=["GET", "POST"])
def checkout(session_id: str) -> ResponseReturnValue:
    """The simulated Stripe Checkout page and its buttons."""
    gateway = _simulated_gateway()
    row = _own_subscription_checkout(session_id)
    if row is not None:
        return _subscription_checkout(row)
    purchase = own_purchase(session_id)
    if request.method == "GET":
        return render_template("credits/simulated_checkout.html", purchase=purchase)
    ext = extension()
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


def _subscription_checkout(row: Row[Any]) -> ResponseReturnValue:
    """A plan's checkout: pay (the session completes and the first invoice is paid) or cancel (back
    to the credits page; the session stays open, as at Stripe, until it expires or is expired)."""
    gateway = _simulated_gateway()
    plan = extension().settings.plan(row.plan)
    is_open = row.status == "open" and row.stripe_subscription_id is None
    if request.method == "GET":
        amount = None if plan is None else gateway.plan_amount(plan)
        return render_template(
            "credits/simulated_subscribe.html",
            subscription=row,
            plan=plan,
            amount=amount,
            currency=extension().settings.currency,
            is_open=is_open,
        )
    action = request.form.get("action")
    if action == "pay" and is_open and plan is not None:
        gateway.pay_subscription(row, plan)
    elif action != "cancel":
        abort(400, f"cannot {action!r} a plan checkout that is {row.status}")
    return redirect(url_for("credits.index"), 303)


@blueprint.route("/simulated-setup", methods=["GET", "POST"])
def card_setup() -> ResponseReturnValue:
    """The simulated setup-mode Checkout: save one of the simulated cards for the auto top-up of the
    logged-in user's wallet, or of their API key named by ``?key_id=`` (anyone else's: 404). A card
    completes the session through the real webhook code; both it and Cancel go back to the credits
    page. The credits page posts here too, to re-save a card that makes the next automatic payment
    fail or need 3-D Secure."""
    gateway = _simulated_gateway()
    wallet = requested_wallet(request.args.to_dict())
    if wallet is None:
        abort(404)
    if request.method == "GET":
        return render_template("credits/simulated_setup.html", wallet=wallet, cards=CARDS)
    action = request.form.get("action")
    if action is not None and action in CARDS:
        gateway.save_card(wallet, action)
    elif action != "cancel":
        abort(400, f"unknown action {action!r}")
    return redirect(url_for("credits.index"), 303)


@blueprint.route("/simulated-portal", methods=["GET", "POST"])
def portal() -> ResponseReturnValue:
    """The simulated Billing Portal: the logged-in user's own customer (never one named in the URL),
    the plans of the user's wallets with buttons that act as Stripe would at renewal, on a cancel, a
    failed payment or a plan change, and the way back to the credits page."""
    gateway = _simulated_gateway()
    wallet = current_wallet_or_401()
    ext = extension()
    customer_id = customers.stored(ext, wallet.user_id)
    if customer_id is None:
        abort(404)
    if request.method == "GET":
        return render_template(
            "credits/simulated_portal.html",
            customer_id=customer_id,
            subscriptions=plans.live_rows_of(ext, wallet.user_id),
            plans=ext.settings.plans,
        )
    stripe_id = request.form.get("subscription")
    row = next(
        (r for r in plans.live_rows_of(ext, wallet.user_id) if r.stripe_subscription_id == stripe_id), None
    )
    if row is None:
        abort(404)
    action = request.form.get("action")
    if action == "renew":
        gateway.renew(row)
    elif action == "fail_payment":
        gateway.fail_next_payment(row)
    elif action in ("cancel_at_period_end", "keep"):
        gateway.cancel_at_period_end(row, action == "cancel_at_period_end")
    elif action == "cancel_now":
        gateway.cancel_now(row)
    elif action == "change_plan":
        plan = ext.settings.plan(request.form.get("plan") or "")
        if plan is None or plan.id == row.plan:
            abort(400, "choose another plan")
        gateway.change_plan(row, plan)
    else:
        abort(400, f"unknown action {action!r}")
    return redirect(url_for("credits_simulated.portal"), 303)
