"""The one module that turns this extension's errors into HTTP responses: JSON for API clients, HTML
for browsers, never cached.

:class:`~flask_credits.errors.HTTPCreditsError` subclasses carry data only; their ``get_response``
comes here through the extension registered on the app (``FlaskCredits.error_response``), so an app's
own ``@app.errorhandler`` still takes precedence, as for any werkzeug HTTP exception.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NoReturn

from flask import abort, current_app, has_request_context, render_template, request, url_for
from flask.typing import ResponseReturnValue
from markupsafe import escape
from werkzeug.wrappers import Response

from ..errors import (
    BodyTooLarge,
    CreditsUnavailable,
    HTTPCreditsError,
    IdempotencyRefusal,
    InsufficientCredits,
)
from ..storage.database import UNAVAILABLE

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
        return negotiated(
            402, error.to_dict, lambda: render_template("credits/insufficient.html", error=error)
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
