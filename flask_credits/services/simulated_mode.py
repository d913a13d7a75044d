"""The simulated Stripe mode (``CREDITS_STRIPE_MODE = "simulated"``): the guard that keeps it out of
production, and the secret its events are signed with."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from flask import current_app

if TYPE_CHECKING:
    from flask import Flask


def check_allowed(app: Flask) -> None:
    if not (app.debug or app.testing):
        raise RuntimeError(
            'CREDITS_STRIPE_MODE = "simulated" fakes payments and is allowed only when the app runs'
            ' in debug or testing mode. Set CREDITS_STRIPE_MODE = "live" and Stripe keys in production.'
        )


def webhook_secret() -> str:
    """The simulated Stripe's signing secret, derived from SECRET_KEY so every worker agrees."""
    key = current_app.config.get("SECRET_KEY")
    if not key:
        raise RuntimeError("the simulated Stripe needs the app's SECRET_KEY to sign its events")
    digest = hashlib.sha256(b"flask-credits-simulated-webhook:" + str(key).encode()).hexdigest()
    return "whsec_simulated_" + digest[:32]
