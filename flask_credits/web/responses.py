"""The one module that turns this extension's errors into HTTP responses: JSON for API clients, HTML
for browsers, never cached.

:class:`~flask_credits.errors.HTTPCreditsError` subclasses carry data only; their ``get_response``
comes here through the extension registered on the app (``FlaskCredits.error_response``), so an app's
own ``@app.errorhandler`` still takes precedence, as for any werkzeug HTTP exception.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from flask import abort, current_app, has_request_context, render_template, request, url_for
from flask.typing import ResponseReturnValue
from markupsafe import escape
from werkzeug.routing import BuildError
from werkzeug.wrappers import Response

from ..errors import (
    BodyTooLarge,
    CreditsUnavailable,
    HTTPCreditsError,
    IdempotencyRefusal,
    InsufficientCredits,
)
from ..storage.database import UNAVAILABLE

if TYPE_CHECKING:
    from ..settings import Pack, Settings

#: The webhook's endpoint: Stripe, its only legitimate client, always gets JSON.
WEBHOOK_ENDPOINT = "credits.stripe_webhook"


def wants_json() -> bool:
    """JSON for API clients; HTML for browsers (they ask for text/html) and for plain form posts.
    Always JSON on the webhook."""
    if not has_request_context() or request.endpoint == WEBHOOK_ENDPOINT:
        return True
    if request.is_json:
        return True
    accept = request.accept_mimetypes
    if any(value == "text/html" for value, _ in accept):
        return accept["application/json"] > accept["text/html"]
    if any(value == "application/json" for value, _ in accept):
        return True
    # No say either way: a submitted form came from a page, anything else is an API client.
    return request.mimetype not in ("application/x-www-form-urlencoded", "multipart/form-data")


def negotiated(
    status: int,
    body: Callable[[], dict[str, Any]],
    html: Callable[[], str],
    headers: dict[str, str] | None = None,
) -> Response:
    """JSON for clients that prefer it, else HTML (only the one asked for is built); never cached."""
    if wants_json():
        response = current_app.response_class(json.dumps(body()), status=status, mimetype="application/json")
    else:
        response = current_app.response_class(html(), status=status, mimetype="text/html")
    response.headers["Cache-Control"] = "no-store"
    response.headers.update(headers or {})
    return response


def _page(status: int, title: str, message: str) -> Callable[[], str]:
    return lambda: (
        f"<!doctype html>\n<title>{status} {escape(title)}</title>\n"
        f"<h1>{escape(title)}</h1>\n<p>{escape(message)}</p>\n"
    )


def purchase_url() -> str | None:
    """Where a user buys credits: the credits page, when inside a request."""
    return url_for("credits.index") if has_request_context() else None


def render(error: HTTPCreditsError) -> Response:
    """The response for one of this extension's HTTP errors."""
    if isinstance(error, InsufficientCredits):
        if error.purchase_url is None:
            error.purchase_url = purchase_url()
        settings: Settings = current_app.extensions["credits"].settings
        covering = packs_covering(settings, error.missing)
        return negotiated(
            402,
            lambda: {**error.to_dict(), "packs": [_pack_dict(p) for p in covering]},
            lambda: _insufficient_page(error, settings, covering),
        )
    if isinstance(error, CreditsUnavailable):
        return negotiated(
            503,
            lambda: {"error": "temporarily_unavailable", "message": error.description},
            _page(503, "Service Unavailable", error.description or ""),
            {"Retry-After": str(error.retry_after)},
        )
    if isinstance(error, BodyTooLarge):
        return negotiated(
            413,
            lambda: {"error": "bad_request", "message": error.description},
            _page(
                413,
                "Content Too Large",
                f"The request is larger than the {error.limit} bytes this page accepts.",
            ),
        )
    if isinstance(error, IdempotencyRefusal):
        code = error.code or 400
        return negotiated(
            code,
            lambda: {"error": error.error, "message": error.description},
            _page(code, error.name, error.description or ""),
            {"Retry-After": "1"} if code == 409 else None,
        )
    return negotiated(
        error.code or 500,
        lambda: {"error": "error", "message": error.description},
        _page(error.code or 500, error.name, error.description or ""),
    )


def packs_covering(settings: Settings, missing: int) -> list[Pack]:
    """The ``CREDITS_PACKS`` that bring at least ``missing`` credits, fewest credits first."""
    return sorted((p for p in settings.packs if p.credits >= missing), key=lambda p: p.credits)


def _pack_dict(pack: Pack) -> dict[str, Any]:
    return {
        "id": pack.id,
        "name": pack.name,
        "credits": pack.credits,
        "amount": pack.amount,
        "currency": pack.currency,
    }


#: A refused form post is offered back ("Try again") only within these bounds: it is re-rendered
#: into the 402 page, whose size a client must not be able to blow up.
MAX_KEPT_FIELDS = 50
MAX_KEPT_CHARACTERS = 16 * 1024


def _insufficient_page(error: InsufficientCredits, settings: Settings, covering: list[Pack]) -> str:
    """The 402 page: how many credits are missing, one-click checkouts that cover them (for the wallet
    that was short), and, for a refused form post, the same post again once credits are bought."""
    wallet = current_app.extensions["credits"].current_wallet()
    # The wallet that was short, when it is one the checkout takes for the current user; else none.
    buyable = wallet is not None and (error.wallet is None or error.wallet.user_id == wallet.user_id)
    units = math.ceil(error.missing / settings.per_unit) if error.missing else 0
    return render_template(
        "credits/insufficient.html",
        error=error,
        packs=covering if buyable else [],
        units=units if buyable and 0 < units <= settings.max_quantity else None,
        per_unit=settings.per_unit,
        unit_amount=settings.unit_amount,
        currency=settings.currency,
        key_id=(error.wallet.key_id if error.wallet else None) or "",
        kept=_kept_form(),
    )


def _kept_form() -> tuple[str, list[tuple[str, str]]] | None:
    """(URL, fields) to post the refused form again, or None: not a form post, a file upload (it
    cannot be carried), or too many or too long fields. The CSRF token is left out: the page adds a
    fresh one."""
    if request.method != "POST" or request.mimetype not in (
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ):
        return None
    if request.files or request.endpoint is None:
        return None
    skip = {"csrf_token", current_app.config.get("WTF_CSRF_FIELD_NAME", "csrf_token")}
    fields = [(name, value) for name, value in request.form.items(multi=True) if name not in skip]
    query = request.query_string.decode("latin-1")
    size = len(query) + sum(len(name) + len(value) for name, value in fields)
    if len(fields) > MAX_KEPT_FIELDS or size > MAX_KEPT_CHARACTERS:
        return None
    try:  # built from the route, never from what the client sent as its path or Host
        url = url_for(request.endpoint, **(request.view_args or {}))
    except BuildError:
        return None
    return (f"{url}?{query}" if query else url), fields


def refuse(status: int, error: str, message: str, headers: dict[str, str] | None = None) -> NoReturn:
    """Stop the request with ``status``: ``{"error", "message"}`` for JSON clients, a short page
    otherwise."""
    name = Response(status=status).status.partition(" ")[2]
    abort(
        negotiated(
            status, lambda: {"error": error, "message": message}, _page(status, name, message), headers
        )
    )


def unauthorized() -> ResponseReturnValue:
    """No wallet (nobody logged in): the Flask-Login manager's answer if the app has one, else 401."""
    manager = getattr(current_app, "login_manager", None)
    if manager is not None:
        return manager.unauthorized()  # type: ignore[no-any-return]
    abort(401)


def database_unavailable(exc: Exception) -> Response:
    """The blueprint's own queries when the database cannot answer: the 503 with ``Retry-After`` of
    :class:`CreditsUnavailable`."""
    current_app.logger.warning("credits: the database is unavailable (%s)", type(exc).__name__)
    return render(CreditsUnavailable())


__all__ = [
    "UNAVAILABLE",
    "database_unavailable",
    "negotiated",
    "refuse",
    "render",
    "unauthorized",
    "wants_json",
]
