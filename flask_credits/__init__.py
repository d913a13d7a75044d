"""flask_credits: sell prepaid credits through Stripe Checkout and spend them on costly endpoints."""

from __future__ import annotations

from . import signals
from .errors import (
    BodyTooLarge,
    CreditsError,
    CreditsUnavailable,
    EntryNotFound,
    HoldAlreadySettled,
    HoldNotFound,
    IdempotencyConflict,
    IdempotencyKeyReused,
    IdempotentRequestInProgress,
    IdempotentResponseNotStored,
    InsufficientCredits,
    InvalidAmount,
    InvalidArgument,
    InvalidWallet,
    NotRefundable,
)
from .extension import FlaskCredits
from .records import AutoTopUp, CreditCode, Entry, Hold, Reconciled, ReconcileReport, Subscription, Wallet
from .services.auto_top_up import CardRequired
from .services.codes import (
    BadCode,
    CodeAlreadyRedeemed,
    CodeDisabled,
    CodeExhausted,
    CodeExpired,
    CodeNotFound,
    CodeRefused,
)
from .services.holds import MeteredHold
from .web.bodies import SafeJSONProvider, read_body
from .web.decorators import current_hold, requires_credits

__version__ = "0.1.0"

__all__ = [
    "AutoTopUp",
    "BadCode",
    "BodyTooLarge",
    "CardRequired",
    "CodeAlreadyRedeemed",
    "CodeDisabled",
    "CodeExhausted",
    "CodeExpired",
    "CodeNotFound",
    "CodeRefused",
    "CreditCode",
    "CreditsError",
    "CreditsUnavailable",
    "Entry",
    "EntryNotFound",
    "FlaskCredits",
    "Hold",
    "HoldAlreadySettled",
    "HoldNotFound",
    "IdempotencyConflict",
    "IdempotencyKeyReused",
    "IdempotentRequestInProgress",
    "IdempotentResponseNotStored",
    "InsufficientCredits",
    "InvalidAmount",
    "InvalidArgument",
    "InvalidWallet",
    "MeteredHold",
    "NotRefundable",
    "ReconcileReport",
    "Reconciled",
    "SafeJSONProvider",
    "Subscription",
    "Wallet",
    "current_hold",
    "read_body",
    "requires_credits",
    "signals",
]
