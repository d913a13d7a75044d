"""Configuration keys and their defaults. ``docs/configuration.md`` is the table for users."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from flask import Flask

#: Every key this extension reads, with its default. Set with ``app.config.setdefault``.
DEFAULTS: dict[str, Any] = {
    # Where the blueprint is mounted.
    "CREDITS_URL_PREFIX": "/credits",
    # Entries shown per page on the credits page and by ``GET {prefix}/transactions``.
    "CREDITS_HISTORY_PAGE_SIZE": 20,
    # Default product: ``CREDITS_UNIT_AMOUNT`` minor units of ``CREDITS_CURRENCY`` buy
    # ``CREDITS_PER_UNIT`` credits; a checkout may ask for 1 to ``CREDITS_MAX_QUANTITY`` units.
    "CREDITS_PER_UNIT": 100,
    "CREDITS_UNIT_AMOUNT": 100,
    "CREDITS_CURRENCY": "usd",
    "CREDITS_PRODUCT_NAME": "Credits",
    "CREDITS_MAX_QUANTITY": 100,
    # Named packs: {"starter": {"credits": 500, "amount": 400, "currency": "usd", "name": "..."}} or
    # {"pro": {"credits": 5000, "price": "price_123", "amount": 3000, "currency": "usd"}}.
    "CREDITS_PACKS": {},
    # Purchased credits expire this long after purchase: seconds, a timedelta, or None (never).
    "CREDITS_PURCHASE_EXPIRES_AFTER": None,
    # "live" calls Stripe; "simulated" runs an offline checkout (only in debug or testing).
    "CREDITS_STRIPE_MODE": "live",
    # The request header whose value makes a @requires_credits request idempotent (None: ignore it).
    "CREDITS_IDEMPOTENCY_HEADER": "Idempotency-Key",
    # How long a key and its stored response are kept (seconds or a timedelta); then the key is free
    # again, and `flask credits expire` deletes it.
    "CREDITS_IDEMPOTENCY_TTL": 24 * 60 * 60,
    # How long a running request owns its key (seconds or a timedelta). Past it, its worker is taken
    # to have died: the next request with the key returns the dead run's credits and runs the view.
    # Keep it above your longest paid view (and your web server's worker timeout).
    "CREDITS_IDEMPOTENCY_LOCK_TIMEOUT": 300,
    # Largest response body stored for replays, in bytes; a larger (or streamed) response is sent
    # once, and a retry with its key gets 409.
    "CREDITS_IDEMPOTENCY_MAX_RESPONSE_BYTES": 1024 * 1024,
    # Largest request body the blueprint's routes read (checkout, JSON endpoints), in bytes; the
    # webhook has CREDITS_WEBHOOK_MAX_BYTES. The app's MAX_CONTENT_LENGTH still applies if smaller.
    "CREDITS_MAX_CONTENT_LENGTH": 64 * 1024,
    # Unfinished checkouts (created at Stripe in the last 24 hours, not paid, expired or cancelled)
    # one wallet may have at once; one more gets 429.
    "CREDITS_MAX_OPEN_PURCHASES": 5,
    # The success page asks Stripe about an unfinished purchase at most once per this many seconds.
    "CREDITS_SUCCESS_CHECK_INTERVAL": 5,
    # The site's public origin, e.g. "https://example.com": success, cancel and simulated-checkout
    # URLs are built on it (else on SERVER_NAME and PREFERRED_URL_SCHEME), never on a request's Host
    # header unless TRUSTED_HOSTS vouches for it.
    "CREDITS_SITE_URL": None,
    # Seconds stripe-python waits for Stripe, and how often it retries a failed network call.
    "CREDITS_STRIPE_TIMEOUT": 20,
    "CREDITS_STRIPE_MAX_RETRIES": 2,
    # Where the Stripe API is (None: Stripe's own); a stand-in such as stripe-mock in tests.
    "CREDITS_STRIPE_API_BASE": None,
    # Oldest webhook signature timestamp accepted, in seconds.
    "CREDITS_WEBHOOK_TOLERANCE": 300,
    # Largest webhook body accepted, in bytes.
    "CREDITS_WEBHOOK_MAX_BYTES": 256 * 1024,
    # Stripe keys. The webhook secret may be a list (or comma-separated) while rotating secrets.
    "STRIPE_SECRET_KEY": None,
    "STRIPE_PUBLISHABLE_KEY": None,
    "STRIPE_WEBHOOK_SECRET": None,
}

#: Config key -> environment variables read when the key is not set, in order: ours, then the
#: names of the TypeScript service this extension generalises.
ENVIRONMENT = {
    "STRIPE_SECRET_KEY": ("STRIPE_SECRET_KEY", "StripeSecretKey"),
    "STRIPE_PUBLISHABLE_KEY": ("STRIPE_PUBLISHABLE_KEY", "StripePublishableKey"),
    "STRIPE_WEBHOOK_SECRET": ("STRIPE_WEBHOOK_SECRET", "StripeWebhookSecret"),
}


def apply_defaults(app: Flask) -> None:
    for name, names in ENVIRONMENT.items():
        if app.config.get(name) is None:
            for env in names:
                if os.environ.get(env):
                    app.config[name] = os.environ[env]
                    break
    for key, value in DEFAULTS.items():
        app.config.setdefault(key, value)


def duration(app: Flask, key: str) -> timedelta:
    """``app.config[key]``, a number of seconds or a timedelta, as a positive timedelta; a
    RuntimeError naming the key otherwise."""
    value = app.config[key]
    if isinstance(value, timedelta):
        found = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        found = timedelta(seconds=value)
    else:
        raise RuntimeError(f"{key} must be a number of seconds or a timedelta, not {value!r}")
    if found <= timedelta(0):
        raise RuntimeError(f"{key} must be more than 0 seconds, not {value!r}")
    return found


def whole_number(app: Flask, key: str, minimum: int = 0) -> int:
    """``app.config[key]`` as an int of at least ``minimum``; a RuntimeError naming the key otherwise."""
    value = app.config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RuntimeError(f"{key} must be a whole number of at least {minimum}, not {value!r}")
    return value


def check(app: Flask) -> None:
    """Refuse to start with a setting that would only fail later, under traffic."""
    duration(app, "CREDITS_IDEMPOTENCY_TTL")
    duration(app, "CREDITS_IDEMPOTENCY_LOCK_TIMEOUT")
    whole_number(app, "CREDITS_IDEMPOTENCY_MAX_RESPONSE_BYTES")
