"""Who is asking: accounts (sign up, log in, log out) and which credit wallet a request spends from.

A request pays from

* the wallet of the API key in its ``X-API-Key`` header, if it sends one: ``(str(user.id), key.id)``. An
  unknown or revoked key means no wallet at all, even with a logged-in session, so the request is
  refused (401) rather than silently charged to someone else;
* otherwise the logged-in user's own wallet: ``(str(user.id), None)``.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

import sqlalchemy as sa
from flask import Blueprint, current_app, flash, jsonify, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from flask_login import current_user, login_required, login_url, login_user, logout_user
from werkzeug.wrappers import Response

from .extensions import credits, limiter, login_manager
from .forms import LoginForm, SignupForm
from .models import ApiKey, User, db

API_KEY_HEADER = "X-API-Key"
_MAX_USER_ID = 2**31 - 1  # the largest INTEGER id on every backend

bp = Blueprint("auth", __name__)


@login_manager.user_loader
def load_user(user_id: str) -> User | None:
    """The user with this id, written exactly as ``str(user.id)`` (wallets are named by that string)."""
    if not (user_id.isascii() and user_id.isdigit()) or int(user_id) > _MAX_USER_ID:
        return None
    user: User | None = db.session.get(User, int(user_id))
    return user if user is not None and str(user.id) == user_id else None


@login_manager.unauthorized_handler
def unauthorized() -> Response:
    """401 JSON for API clients; the login page for people."""
    if request.blueprint == "api" or API_KEY_HEADER in request.headers or request.is_json:
        response = jsonify(
            error="unauthorized", message=f"Send a valid {API_KEY_HEADER} header, or log in first."
        )
        response.status_code = 401
        return response
    flash("Please log in to see this page.", "info")
    return redirect(login_url("auth.login", next_url=request.url))


@credits.wallet_loader
def request_wallet() -> tuple[str, str | None] | None:
    """The wallet this request spends from (see the module docstring)."""
    secret = request.headers.get(API_KEY_HEADER)
    wallet = None
    if secret is not None:
        key = ApiKey.find_active(secret.strip())
        wallet = (str(key.user_id), key.id) if key is not None else None
    elif current_user.is_authenticated:
        wallet = (current_user.get_id(), None)
    # End the lookup's transaction before the ledger takes a connection of its own: behind a
    # transaction pooler an open transaction holds a server connection, and N requests holding the N
    # server connections while each waits for one more would wait for ever (docs/deployment.md).
    db.session.rollback()
    return wallet


@credits.user_lookup
def user_by_name(text: str) -> str | None:
    """``flask credits grant ada 50 ...``: the CLI's USER may be a user name (any case, as stored
    lower-case) as well as an id; ``None`` lets the text be tried as the id."""
    user_id = db.session.scalar(sa.select(User.id).where(User.username == text.strip().lower()))
    return None if user_id is None else str(user_id)


@credits.wallet_checker
def wallet_exists(user_id: str, key_id: str | None) -> bool:
    """For ``flask credits grant`` and friends: the user exists and, for a key's wallet, the key is
    theirs and not revoked."""
    user = load_user(user_id)
    if user is None:
        return False
    if key_id is None:
        return True
    key: ApiKey | None = db.session.get(ApiKey, key_id)
    return key is not None and key.user_id == user.id and not key.revoked


def admin_usernames() -> set[str]:
    """``ADMIN_USERNAMES`` (a list, or comma-separated from the environment), lower-case as stored."""
    names = current_app.config["ADMIN_USERNAMES"]
    if isinstance(names, str):
        names = names.split(",")
    return {name.strip().lower() for name in names if name.strip()}


@bp.app_template_global("is_admin")
def is_admin() -> bool:
    """Whether the logged-in user (not an API key) is one of ``ADMIN_USERNAMES``."""
    return (
        API_KEY_HEADER not in request.headers
        and current_user.is_authenticated
        and current_user.username in admin_usernames()
    )


@credits.admin_checker
def credits_admin() -> str | None:
    """The credits admin console is for ``ADMIN_USERNAMES``: their user name is recorded on each
    change they make."""
    return str(current_user.username) if is_admin() else None


@credits.keys_loader
def live_keys(user_id: str) -> list[tuple[str, str]]:
    """The user's keys that still work, as ``(key_id, name)``: the credits page shows their balances
    and sells credits for them."""
    user = load_user(user_id)
    if user is None:
        return []
    keys = db.session.scalars(
        sa.select(ApiKey)
        .where(ApiKey.user_id == user.id, ApiKey.revoked_at.is_(None))
        .order_by(ApiKey.created_at)
    )
    return [(key.id, key.name) for key in keys]


def _username() -> str:
    """The throttle's key for the name tried, as the forms compare it (case-insensitive, stripped)."""
    return "username:" + str(request.form.get("username", "")).strip().lower()[:100]


def _throttled(view: Callable[[], ResponseReturnValue]) -> Callable[[], ResponseReturnValue]:
    """At most ``LOGIN_LIMIT_PER_IP`` posts from one address and ``LOGIN_LIMIT_PER_USERNAME`` for one
    name (password guessing spread over many addresses), then 429. Only POSTs count; the form is free."""
    per_ip = limiter.limit(lambda: current_app.config["LOGIN_LIMIT_PER_IP"], methods=["POST"])
    per_name = limiter.limit(
        lambda: current_app.config["LOGIN_LIMIT_PER_USERNAME"], key_func=_username, methods=["POST"]
    )
    return per_ip(per_name(view))


def _safe_next(target: str | None) -> str:
    """Only redirect to a path on this site after logging in (never to another host)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc:
            return target
    return url_for("main.index")


@bp.route("/signup", methods=["GET", "POST"])
@_throttled
def signup() -> ResponseReturnValue:
    form = SignupForm()
    if form.validate_on_submit():
        taken = db.session.scalar(sa.select(User.id).where(User.username == form.username.data))
        if taken is None:
            user = User(username=form.username.data)
            user.set_password(form.password.data)
            db.session.add(user)
            try:
                db.session.commit()
            except sa.exc.IntegrityError:  # someone took the name in the meantime
                db.session.rollback()
            else:
                login_user(user)
                flash(f"Welcome, {user.username}! Your account is ready.", "success")
                return redirect(url_for("main.index"))
        form.username.errors.append("That username is taken.")
    return render_template("auth/signup.html", form=form), 400 if form.errors else 200


@bp.route("/login", methods=["GET", "POST"])
@_throttled
def login() -> ResponseReturnValue:
    form = LoginForm()
    if form.validate_on_submit():
        user = db.session.scalar(sa.select(User).where(User.username == form.username.data))
        if user is not None and user.check_password(form.password.data):
            login_user(user)
            flash(f"Logged in as {user.username}.", "success")
            return redirect(_safe_next(request.args.get("next")))
        form.password.errors.append("Wrong username or password.")
    return render_template("auth/login.html", form=form), 400 if form.errors else 200


@bp.post("/logout")
@login_required
def logout() -> ResponseReturnValue:
    logout_user()
    flash("Logged out.", "info")
    return redirect(url_for("main.index"))
