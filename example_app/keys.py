"""The API keys page: create (the secret is shown once), list, revoke.

Each key spends from its own credit wallet, separate from the user's: grant it credits with
``flask --app example_app credits grant USERNAME 50 --reason ... --key KEY_ID`` (the user id, shown
on the credits page, works too).
"""

from __future__ import annotations

import sqlalchemy as sa
from flask import Blueprint, abort, flash, make_response, redirect, render_template, url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user, login_required

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
    key: ApiKey | None = db.session.get(ApiKey, key_id)
    if key is None or key.user_id != current_user.id:
        abort(404)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        db.session.commit()
        flash(f"Revoked the key {key.name!r} ({key.id}). Requests with it now get 401.", "info")
    return redirect(url_for("keys.index"))
