"""The API keys page: create (the secret is shown once), list, revoke (a key holding credits after
asking, moving them to the user's account).

Each key spends from its own credit wallet, separate from the user's: grant it credits with
``flask --app example_app credits grant USERNAME 50 --reason ... --key KEY_ID`` (the user id, shown
on the credits page, works too).
"""

from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, abort, flash, make_response, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user, login_required

from flask_credits import IdempotencyConflict, InsufficientCredits, Wallet

from .extensions import credits
from .forms import ApiKeyForm
from .models import ApiKey, db, utcnow

bp = Blueprint("keys", __name__, url_prefix="/keys")


@bp.before_request
@login_required
def require_login() -> None:
    """Every page here is about the logged-in user's own keys."""


def _page(form: ApiKeyForm, status: int = 200) -> ResponseReturnValue:
    user_id = current_user.get_id()
    keys = db.session.scalars(
        sa.select(ApiKey).where(ApiKey.user_id == current_user.id).order_by(ApiKey.created_at.desc())
    ).all()
    balances = {key.id: credits.balance(user_id, key.id) for key in keys}
    return render_template("keys/index.html", form=form, keys=keys, balances=balances), status


@bp.get("/")
def index() -> ResponseReturnValue:
    return _page(ApiKeyForm())


@bp.post("/")
def create() -> ResponseReturnValue:
    form = ApiKeyForm()
    if not form.validate_on_submit():
        return _page(form, 400)
    key, secret = ApiKey.issue(current_user, form.name.data)
    db.session.commit()
    response = make_response(render_template("keys/created.html", key=key, secret=secret))
    response.headers["Cache-Control"] = "no-store"  # the only time the secret is shown
    return response


@bp.post("/<key_id>/revoke")
def revoke(key_id: str) -> ResponseReturnValue:
    """Revoke one of the user's keys. A key whose wallet holds credits is revoked only once the user
    confirms (``confirm=yes``, from the page this answers first): its credits then move to the
    user's account in the same click, with an idempotency key per key, so a retried or doubled
    confirm moves them once. Credits reserved by its running requests stay with the key."""
    key: ApiKey | None = db.session.get(ApiKey, key_id)
    if key is None or key.user_id != current_user.id:
        abort(404)
    user_id = current_user.get_id()
    left = credits.balance(user_id, key.id)
    confirmed = request.form.get("confirm") == "yes"
    if left and not confirmed:
        held = credits.held(user_id, key.id)
        return render_template("keys/revoke.html", key=key, left=left, held=held)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        db.session.commit()
        flash(f"Revoked the key {key.name!r} ({key.id}). Requests with it now get 401.", "info")
    if left:
        flash(_move_to_account(user_id, key, left), "info")
    return redirect(url_for("keys.index"))


def _move_to_account(user_id: str, key: ApiKey, amount: int) -> str:
    """Move a revoked key's credits to the user's account; what to tell the user."""
    source, account = Wallet(user_id, key.id), Wallet(user_id)
    try:
        entry = credits.transfer(
            source,
            account,
            amount,
            reason=f"the key {key.name} was revoked",
            idempotency_key=f"revoke-{key.id}",
        )
    except (InsufficientCredits, IdempotencyConflict):
        # A concurrent confirm moved them, or the key's running requests spent some meanwhile:
        # whatever is left can still be moved from the credits page.
        return (
            f"The credits of the key {key.name!r} were moved already, or changed meanwhile: see your"
            " credits page, where any left can be moved."
        )
    moved = f"Moved {-entry.amount} credits from it to your account"
    held = credits.held(user_id, key.id)
    if held:
        moved += (
            f"; {held} credits reserved by its running requests stay with the key (move what they"
            " give back from your credits page)"
        )
    return moved + "."
