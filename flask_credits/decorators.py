"""``@requires_credits``: debit before the view runs, give the credits back if it fails."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from flask import abort, current_app, g, request
from flask.typing import ResponseReturnValue

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
            spend = ext.ledger.spend(
                wallet,
                amount,
                reason=reason or request.endpoint or request.path,
                metadata={"endpoint": request.endpoint, "method": request.method},
                purchase_url=ext.purchase_url,  # only built when the wallet cannot pay
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
