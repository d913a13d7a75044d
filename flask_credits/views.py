"""The ``credits`` blueprint: the credits page and its JSON twins."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from flask import (
    Blueprint,
    abort,
    current_app,
    has_request_context,
    jsonify,
    render_template,
    request,
)
from flask.typing import ResponseReturnValue

from .errors import InvalidArgument

if TYPE_CHECKING:
    from .extension import FlaskCredits
    from .records import Wallet

blueprint = Blueprint("credits", __name__, template_folder="templates")


def wants_json() -> bool:
    """JSON for API clients; HTML only for clients that ask for it (browsers always do)."""
    if not has_request_context():
        return True
    if request.is_json:
        return True
    accept = request.accept_mimetypes
    explicit_html = any(value == "text/html" for value, _ in accept)
    return not explicit_html or accept["application/json"] > accept["text/html"]


def extension() -> FlaskCredits:
    return cast("FlaskCredits", current_app.extensions["credits"])


def current_wallet_or_401() -> Wallet:
    wallet = extension().current_wallet()
    if wallet is None:
        manager = getattr(current_app, "login_manager", None)
        if manager is not None:
            abort(manager.unauthorized())
        abort(401)
    return wallet


def _page_args() -> tuple[int, int | None]:
    size = current_app.config["CREDITS_HISTORY_PAGE_SIZE"]
    try:
        limit = int(request.args.get("limit", size))
        before = request.args.get("before", type=str)
        return limit, None if before in (None, "") else int(before)
    except ValueError:
        abort(400, "limit and before must be whole numbers")


@blueprint.get("/")
def index() -> ResponseReturnValue:
    """The credits page: balance, history (keyset-paginated) and the purchase form."""
    wallet = current_wallet_or_401()
    limit, before = _page_args()
    ledger = extension().ledger
    try:
        entries = ledger.history(wallet, limit=limit, before=before)
    except InvalidArgument as exc:
        abort(400, str(exc))
    return render_template(
        "credits/index.html",
        wallet=wallet,
        balance=ledger.balance(wallet),
        entries=entries,
        next_before=entries[-1].id if len(entries) == limit else None,
    )


@blueprint.get("/balance")
def balance() -> ResponseReturnValue:
    """``{"user_id", "key_id", "balance"}`` for the current wallet."""
    wallet = current_wallet_or_401()
    return jsonify(user_id=wallet.user_id, key_id=wallet.key_id, balance=extension().ledger.balance(wallet))


@blueprint.get("/transactions")
def transactions() -> ResponseReturnValue:
    """``{"transactions": [...], "next_before": id | null}``, newest first; pass ``next_before`` back
    as ``?before=`` for the next page."""
    wallet = current_wallet_or_401()
    limit, before = _page_args()
    try:
        entries = extension().ledger.history(wallet, limit=limit, before=before)
    except InvalidArgument as exc:
        abort(400, str(exc))
    return jsonify(
        transactions=[e.to_dict() for e in entries],
        next_before=entries[-1].id if len(entries) == limit else None,
    )
