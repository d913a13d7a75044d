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
from typing import TYPE_CHECKING, Any

from flask import current_app, request, url_for

if TYPE_CHECKING:
    from flask import Flask

    from ..settings import Settings

log = logging.getLogger("flask_credits")


def warn_without_origin(app: Flask, settings: Settings) -> None:
    """At ``init_app``: warn when a live app leaves the URLs it sends to Stripe to each request's
    ``Host`` header."""
    if (
        settings.stripe_mode == "live"
        and not (app.debug or app.testing)
        and not (settings.site_url or app.config["SERVER_NAME"] or app.config["TRUSTED_HOSTS"])
    ):
        log.warning(
            "flask_credits: set CREDITS_SITE_URL (e.g. 'https://shop.example.com'), SERVER_NAME or"
            " TRUSTED_HOSTS: until then Stripe's success and cancel URLs are built from each request's"
            " Host header, which the client controls"
        )


def origin() -> str:
    """``scheme://host[:port]`` of the site, as the module docstring decides."""
    config = current_app.config
    configured = current_app.extensions["credits"].settings.site_url
    if configured is not None:
        return str(configured)
    if config["SERVER_NAME"]:
        return f"{config['PREFERRED_URL_SCHEME']}://{config['SERVER_NAME']}"
    return f"{request.scheme}://{request.host}"


def external_url(endpoint: str, **values: Any) -> str:
    """The absolute URL of ``endpoint`` on the site's origin (``values`` as for ``url_for``)."""
    return origin() + url_for(endpoint, **values)
