"""Per-user rate limits of the blueprint's routes that invite guessing (redeeming a credit code).

Counted with `limits` (Flask-Limiter's engine, so the same rate strings and storage URIs), not with a
Flask-Limiter instance of our own: one would apply the host's ``RATELIMIT_DEFAULT`` and application
limits to every route a second time. The storage is ``CREDITS_REDEEM_RATE_LIMIT_STORAGE``, else the
host's ``RATELIMIT_STORAGE_URI``, so that several workers share one count.
"""

from __future__ import annotations

import math
import time
import weakref

import limits
from flask import Flask, current_app
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from ..settings import Settings

_limiters: weakref.WeakKeyDictionary[Flask, tuple[MovingWindowRateLimiter, limits.RateLimitItem]] = (
    weakref.WeakKeyDictionary()
)

#: The namespace of the counts in a storage the host's own Flask-Limiter may share.
NAMESPACE = "flask-credits/redeem"


def _limiter(settings: Settings) -> tuple[MovingWindowRateLimiter, limits.RateLimitItem]:
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    found = _limiters.get(app)
    if found is None:
        storage = storage_from_string(settings.redeem_rate_limit_storage)
        found = _limiters[app] = (MovingWindowRateLimiter(storage), limits.parse(settings.redeem_rate_limit))
    return found


def redeem_attempt(settings: Settings, user_id: str) -> int | None:
    """Count one attempt by ``user_id`` at redeeming a code. None if it is allowed, else the seconds
    to wait (``Retry-After``); a refused attempt is not counted. Counting and checking are one step
    in the storage, so concurrent attempts cannot pass the limit together."""
    limiter, item = _limiter(settings)
    if limiter.hit(item, NAMESPACE, user_id):
        return None
    reset = limiter.get_window_stats(item, NAMESPACE, user_id).reset_time
    return max(1, math.ceil(reset - time.time()))
