"""The app's own error pages: 400, 404, 405 and 500 inside its layout for people, JSON for API clients;
and its icon at ``/favicon.ico``, where browsers look for it.

flask_credits' own errors (402, a refused idempotency key, ...) keep the extension's answers.
"""

from __future__ import annotations

from flask import Flask, jsonify, render_template, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from flask_credits import CreditsError

from .auth import API_KEY_HEADER
from .models import db

#: The heading of each page; the message under it is the error's description.
TITLES = {
    400: "That request could not be understood",
    404: "Page not found",
    405: "That method is not allowed here",
    500: "Something went wrong on our side",
}


def wants_json() -> bool:
    """JSON for the API (its paths, an API key, a JSON body) and for clients that prefer it to HTML;
    the page otherwise (browsers ask for text/html, and ``*/*`` states no preference)."""
    if request.is_json or API_KEY_HEADER in request.headers or request.path.startswith("/api/"):
        return True
    accept = request.accept_mimetypes
    return accept["application/json"] > accept["text/html"]


def error_response(error: HTTPException) -> ResponseReturnValue:
    """``{"error", "message"}`` or the page in the app's layout, with the error's status and headers
    (a 405's ``Allow``)."""
    if isinstance(error, CreditsError):
        return error.get_response()
    code = error.code or 500
    # A 500's description is werkzeug's generic one: nothing of what failed reaches the client.
    message = error.description or ""
    headers = [(name, value) for name, value in error.get_headers() if name.lower() != "content-type"]
    if wants_json():
        slug = (error.name or "error").lower().replace(" ", "_")
        return jsonify(error=slug, message=message), code, headers
    title = TITLES.get(code, error.name)
    return render_template("error.html", code=code, title=title, message=message), code, headers


def server_error(error: HTTPException) -> ResponseReturnValue:
    """The 500 page. The failed request may have left the session's transaction broken, and the layout
    loads the user: roll back first, and should the page itself fail, answer in plain text."""
    try:
        db.session.rollback()
        return error_response(error)
    except Exception:  # the error page must not fail in turn
        return "Internal Server Error", 500, {"Content-Type": "text/plain; charset=utf-8"}


def install(app: Flask) -> None:
    """Register the error pages and ``/favicon.ico`` on ``app``."""
    for code in (400, 404, 405):
        app.register_error_handler(code, error_response)
    app.register_error_handler(500, server_error)

    @app.get("/favicon.ico")
    def favicon() -> ResponseReturnValue:
        """Browsers ask for it on every page that links none (and some even when one does)."""
        return app.send_static_file("favicon.ico")
