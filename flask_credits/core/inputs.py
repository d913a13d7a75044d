"""What the ledger accepts: amounts, wallet owners, texts. Bad input raises a subclass of
:class:`~flask_credits.errors.InvalidArgument` before anything is written."""

from __future__ import annotations

from ..errors import InvalidAmount, InvalidArgument, InvalidWallet
from ..records import Wallet
from ..storage.tables import ID_LENGTH

#: Largest amount one call may move; keeps every sum far from BIGINT overflow.
MAX_AMOUNT = 10**15
#: Largest row id any backend stores (signed 64-bit).
MAX_ID = 2**63 - 1


def check_amount(amount: object, name: str = "amount", *, minimum: int = 1) -> int:
    """Return ``amount`` if it is a whole number of credits between ``minimum`` and ``MAX_AMOUNT``."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidAmount(f"{name} must be a whole number of credits, not {amount!r}")
    if amount < minimum:
        raise InvalidAmount(f"{name} must be at least {minimum}, not {amount}")
    if amount > MAX_AMOUNT:
        raise InvalidAmount(f"{name} must be at most {MAX_AMOUNT}, not {amount}")
    return amount


def make_wallet(user_id: object, key_id: object = None) -> Wallet:
    """Validate and normalise a wallet's owner: ids are non-empty strings of at most 64 characters."""
    return Wallet(
        _check_id(user_id, "user_id"), None if key_id in (None, "") else _check_id(key_id, "key_id")
    )


def _check_id(value: object, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidWallet(f"{name} must be a string, not {type(value).__name__}")
    text = str(value)
    if not text or len(text) > ID_LENGTH or text != text.strip():
        raise InvalidWallet(
            f"{name} must be 1 to {ID_LENGTH} characters without surrounding spaces, not {text!r}"
        )
    return text


def check_text(value: object, name: str, limit: int, *, optional: bool) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or (not optional and not value) or len(value) > limit:
        raise InvalidArgument(f"{name} must be a non-empty string of at most {limit} characters")
    return value
