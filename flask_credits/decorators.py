"""``@requires_credits``: debit before the view runs, give the credits back if it fails."""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

from flask import abort, current_app, g, jsonify, request
from flask.typing import ResponseReturnValue

from .errors import IdempotencyConflict
from .ledger import check_amount

if TYPE_CHECKING:
    from .extension import FlaskCredits
    from .records import Entry

log = logging.getLogger("flask_credits")

F = TypeVar("F", bound=Callable[..., Any])
Cost = int | Callable[[], int]


def requires_credits(cost: Cost, *, reason: str | None = None) -> Callable[[F], F]:
    """Charge ``cost`` credits to the current wallet before the view runs.

    ``cost`` is a whole number of at least 1, or a callable evaluated per request (it may return 0 for
    a free request). The debit is its own committed transaction. If the view raises, or returns a
    response with a 5xx status, the same credits go back to the same lots (a ``refund`` entry). With
    no wallet (nobody logged in) the login manager's ``unauthorized()`` answers; when the wallet cannot
    pay, the view does not run and :class:`InsufficientCredits` (402) is raised. The spend entry is
    available to the view as ``flask.g.credits_spend``. ``reason`` defaults to the endpoint name.

    A request carrying an ``Idempotency-Key`` header (``CREDITS_IDEMPOTENCY_HEADER``) is charged once
    per key, wallet and endpoint: a retry with the same key (after a lost answer or a 503) runs the
    view again without a second debit. A key whose request failed, so that its credits were given
    back, answers 409 on reuse, as does a key reused for another cost.
    """
    if not callable(cost):
        check_amount(cost, "cost")

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> ResponseReturnValue:
            ext = _extension()
            wallet = ext.current_wallet()
            if wallet is None:
                manager = getattr(current_app, "login_manager", None)
                if manager is not None:
                    return cast(ResponseReturnValue, manager.unauthorized())
                abort(401)
            amount = cost() if callable(cost) else cost
            if amount == 0 and callable(cost):
                g.credits_spend = None
                return current_app.ensure_sync(view)(*args, **kwargs)  # type: ignore[no-any-return]
            check_amount(amount, "cost")
            key = _idempotency_key()
            try:
                spend = ext.ledger.spend(
                    wallet,
                    amount,
                    reason=reason or request.endpoint or request.path,
                    idempotency_key=key,
                    metadata={"endpoint": request.endpoint, "method": request.method},
                    purchase_url=ext.purchase_url,  # only built when the wallet cannot pay
                )
            except IdempotencyConflict:
                _refuse(409, "idempotency_conflict", "This key was used for a request with another cost.")
            if key is not None and ext.ledger.refund_of(spend) is not None:
                _refuse(
                    409,
                    "idempotency_conflict",
                    "The request with this key failed and its credits were returned: send a new key.",
                )
            g.credits_spend = spend
            try:
                response = current_app.make_response(current_app.ensure_sync(view)(*args, **kwargs))
            except BaseException:
                _give_back(ext, spend, "the view raised an exception")
                raise
            if response.status_code >= 500:
                _give_back(ext, spend, f"the view answered {response.status_code}")
            return response

        return cast(F, wrapper)

    return decorator


#: Longest Idempotency-Key header value accepted.
MAX_KEY_LENGTH = 200


def _idempotency_key() -> str | None:
    """The ledger's idempotency key for this request: the client's key, scoped to the endpoint (a key
    reused on another endpoint is another request), or None without the header."""
    header = current_app.config["CREDITS_IDEMPOTENCY_HEADER"]
    value = request.headers.get(header) if header else None
    if value is None:
        return None
    if not 0 < len(value) <= MAX_KEY_LENGTH or not value.isascii() or not value.isprintable():
        _refuse(400, "bad_request", f"{header} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters")
    endpoint = request.endpoint or request.path
    if len(endpoint) > 40:
        endpoint = hashlib.sha256(endpoint.encode()).hexdigest()[:16]
    return f"request:{endpoint}:{value}"


def _refuse(status: int, error: str, message: str) -> NoReturn:
    """Stop the request with ``status``: JSON for clients that prefer it, werkzeug's page otherwise."""
    from .views import wants_json

    if wants_json():
        response = jsonify(error=error, message=message)
        response.status_code = status
        abort(response)
    abort(status, message)


def _extension() -> FlaskCredits:
    try:
        return cast("FlaskCredits", current_app.extensions["credits"])
    except KeyError:
        raise RuntimeError("@requires_credits needs FlaskCredits registered on this app") from None


def _give_back(ext: FlaskCredits, spend: Entry, why: str) -> None:
    try:
        ext.ledger.refund(spend.wallet, spend.id, reason=f"returned: {why}")
    except Exception:
        # The view's own failure is what the client must see; the spend stays recorded, so an
        # operator can still return it with FlaskCredits.refund().
        log.exception("could not return spend %s to %s after %s", spend.id, spend.wallet, why)
