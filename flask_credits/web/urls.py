"""The URLs this extension hands to Stripe (success, cancel) and to the browser (the simulated checkout).

A customer follows them straight from Stripe, so their host must be the site's own, never whatever a
request's ``Host`` header said: a forged header would send the customer, with their session id, to a
host of the attacker's choosing. The origin comes from configuration:

1. ``CREDITS_SITE_URL``, e.g. ``"https://shop.example.com"``;
2. else ``SERVER_NAME`` with ``PREFERRED_URL_SCHEME``;
3. else the request's own scheme and host. That is safe when Flask's ``TRUSTED_HOSTS`` is set (Flask
   3.1 refuses any other ``Host`` with 400 before a view runs) and harmless in debug, testing and the
   simulated mode; a live app with none of the three set is warned about once, at ``init_app``, and
   keeps working as before.

The path keeps the request's script root (``url_for`` without ``_external``), so an app mounted under
a prefix gets its own URLs.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from flask import current_app, request, url_for

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger("flask_credits")

#: A host name or IPv4 address (urlsplit lower-cases it), or an IPv6 address without its brackets.
_HOST = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|[0-9a-f:.]*:[0-9a-f:.]*")


def site_origin(value: object) -> str | None:
    """``CREDITS_SITE_URL`` checked and without its trailing slash (None when unset); anything but a
    bare ``http(s)://host[:port]`` origin is a RuntimeError naming the key."""
    if value in (None, ""):
        return None
    problem = _origin_problem(value)
    if problem is not None:
        raise RuntimeError(f"CREDITS_SITE_URL {problem}, not {str(value)[:200]!r}")
    assert isinstance(value, str)
    return value.rstrip("/")


def _origin_problem(value: object) -> str | None:
    if not isinstance(value, str) or not value.isascii() or not value.isprintable():
        return "must be a string such as 'https://shop.example.com'"
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
    except ValueError:
        return "has a port that is not a number from 0 to 65535"
    if parts.scheme not in ("http", "https"):
        return "must start with https:// or http://"
    if "@" in parts.netloc or not _HOST.fullmatch(parts.hostname or ""):
        return "must name a host (letters, digits, dots and hyphens, or an IP address), and no user"
    if parts.path not in ("", "/") or "?" in value or "#" in value:
        return "must be an origin only: no path, query or fragment"
    return None


def check(app: Flask) -> None:
    """At ``init_app``: refuse a malformed ``CREDITS_SITE_URL``, and warn when a live app leaves the
    URLs it sends to Stripe to each request's ``Host`` header."""
    site_origin(app.config["CREDITS_SITE_URL"])
    if (
        app.config["CREDITS_STRIPE_MODE"] == "live"
        and not (app.debug or app.testing)
        and not (app.config["CREDITS_SITE_URL"] or app.config["SERVER_NAME"] or app.config["TRUSTED_HOSTS"])
    ):
        log.warning(
            "flask_credits: set CREDITS_SITE_URL (e.g. 'https://shop.example.com'), SERVER_NAME or"
            " TRUSTED_HOSTS: until then Stripe's success and cancel URLs are built from each request's"
            " Host header, which the client controls"
        )


def origin() -> str:
    """``scheme://host[:port]`` of the site, as the module docstring decides."""
    config = current_app.config
    configured = site_origin(config["CREDITS_SITE_URL"])
    if configured is not None:
        return configured
    if config["SERVER_NAME"]:
        return f"{config['PREFERRED_URL_SCHEME']}://{config['SERVER_NAME']}"
    return f"{request.scheme}://{request.host}"


def external_url(endpoint: str, **values: Any) -> str:
    """The absolute URL of ``endpoint`` on the site's origin (``values`` as for ``url_for``)."""
    return origin() + url_for(endpoint, **values)
