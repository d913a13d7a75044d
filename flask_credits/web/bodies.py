"""Request bodies: read whole within a byte limit, and JSON that cannot exhaust the stack.

The blueprint reads every body through :func:`read_body`; a host app may use it too (the example app
does, for all of its routes), and may install :class:`SafeJSONProvider` as its ``app.json``.
"""

from __future__ import annotations

from typing import Any

from flask import request
from flask.json.provider import DefaultJSONProvider

from ..errors import BodyTooLarge


def read_body(limit: int) -> bytes:
    """Read the request body into memory, never more than ``limit + 1`` bytes of it, and return it.

    Raises :class:`BodyTooLarge` (a 413) when the body is longer than ``limit``: at once, without
    reading, when ``Content-Length`` says so, and otherwise (``Transfer-Encoding: chunked``) as soon as
    byte ``limit + 1`` arrives. The body is kept, so ``request.form``, ``request.get_json()`` and
    ``request.get_data()`` parse it afterwards without touching the network again. Call it before
    anything else reads the body (Flask-WTF's ``CSRFProtect`` reads ``request.form``, for one); called
    again, it checks the kept body against the new limit.
    """
    length = request.content_length  # None when the body is chunked, whatever Content-Length says
    if length is not None and length > limit:
        raise BodyTooLarge(limit)
    # Werkzeug (3.1) stops reading a chunked body at ``max_content_length`` and returns what it has
    # read, without a 413: the body is silently cut, and a JSON document or form padded past the limit
    # parses as its first ``limit`` bytes. So let it read one byte more, which tells "exactly the
    # limit" from "longer". (With a Content-Length, it reads that many bytes and no more.)
    request.max_content_length = limit + 1
    body = request.get_data()
    request.max_content_length = limit
    if len(body) > limit:
        raise BodyTooLarge(limit)
    return body


class SafeJSONProvider(DefaultJSONProvider):
    """Flask's default JSON provider, except that a document nested too deep to parse (``[`` a
    hundred thousand times) is a ``ValueError``, as any other malformed document is, instead of a
    ``RecursionError``: so ``request.get_json()`` answers 400 (or ``None`` with ``silent=True``), not
    500. Install it with ``app.json = SafeJSONProvider(app)``."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("the JSON document is nested too deeply") from None
