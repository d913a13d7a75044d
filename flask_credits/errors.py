"""The exceptions flask_credits raises: one small hierarchy under :class:`CreditsError`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flask import current_app, has_app_context
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment
    from werkzeug.sansio.response import Response

    from .records import Wallet


class CreditsError(Exception):
    """Root of every error this extension raises on purpose."""


class HTTPCreditsError(CreditsError, HTTPException):
    """An error that is also an HTTP answer. It carries data only: the response (JSON for clients
    that prefer it, else HTML; never cached) is made by :mod:`flask_credits.web.responses`, which the
    extension installs on each app it is registered on. Apps replace it with ``@app.errorhandler``."""

    def get_response(  # type: ignore[override]
        self,
        environ: WSGIEnvironment | None = None,
        scope: dict[str, Any] | None = None,
    ) -> Response:
        ext = current_app.extensions.get("credits") if has_app_context() else None
        if ext is None:
            return super().get_response(environ)
        return ext.error_response(self)  # type: ignore[no-any-return]


class InvalidArgument(CreditsError, ValueError):
    """An argument the ledger cannot accept; nothing was written."""


class InvalidAmount(InvalidArgument):
    """A credit amount that is not a positive whole number (bools and floats included)."""


class InvalidWallet(InvalidArgument):
    """A user id or API-key id that cannot name a wallet (empty, too long, wrong type)."""


class IdempotencyConflict(CreditsError):
    """An idempotency key was reused for a different operation (other kind or amount).

    A true replay returns the original entry; a key reused for something else is a bug in the caller,
    and silently returning the first result would hide it.
    """


class EntryNotFound(CreditsError, LookupError):
    """The ledger entry named does not exist in that wallet."""


class NotRefundable(CreditsError):
    """Only a spend can be refunded, and only once."""


class HoldNotFound(CreditsError, LookupError):
    """No hold has that id."""


class HoldAlreadySettled(CreditsError):
    """The hold has ended and cannot become something else: settled already with another amount,
    released and then settled with a charge, settled and then released, or extended after it ended.
    Settling again with the same amount, and releasing twice, are not errors."""


class InsufficientCredits(HTTPCreditsError):
    """The wallet cannot pay: HTTP 402 Payment Required. Nothing was written.

    Attributes: ``required`` (credits asked for), ``balance`` (what the wallet holds now),
    ``missing`` (``required - balance``), ``purchase_url`` (where to buy more, or ``None`` outside a
    request) and ``wallet`` (the :class:`~flask_credits.records.Wallet` that was short, when known).

    The default response is JSON for clients that prefer it::

        {"error": "insufficient_credits", "required": 5, "balance": 2, "missing": 3,
         "purchase_url": "/credits/", "packs": [{"id": "small", "credits": 500, ...}]}

    (``packs``: the ``CREDITS_PACKS`` that would cover what is missing), and otherwise the
    ``credits/insufficient.html`` template. Apps replace both with
    ``@app.errorhandler(InsufficientCredits)``.
    """

    code = 402
    description = "This needs more credits than the wallet holds."

    def __init__(
        self,
        required: int,
        balance: int,
        purchase_url: str | None = None,
        wallet: Wallet | None = None,
    ) -> None:
        self.required = required
        self.balance = balance
        self.purchase_url = purchase_url
        self.wallet = wallet
        super().__init__(
            f"This needs {required} credits; the wallet holds {balance}.",
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.required, self.balance, self.purchase_url, self.wallet))

    @property
    def missing(self) -> int:
        """How many more credits the wallet needs."""
        return max(self.required - self.balance, 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": "insufficient_credits",
            "message": self.description,
            "required": self.required,
            "balance": self.balance,
            "missing": self.missing,
            "purchase_url": self.purchase_url,
        }


class CreditsUnavailable(HTTPCreditsError):
    """The ledger's database could not be reached or gave up (connection refused or dropped, lock
    wait timeout, a deadlock or serialization failure that outlived the retries, pool exhausted):
    HTTP 503 with ``Retry-After``. The operation did not happen, or, when the connection dropped
    while it was committing, may have (on PostgreSQL a spend is one autocommitted statement, so
    that is the whole statement, lock waits included): retry with the same idempotency key to be
    sure it happens once.

    The original error is chained (``__cause__``). The default response is JSON for clients that
    prefer it, ``{"error": "temporarily_unavailable", "message": ...}``, and otherwise werkzeug's
    error page.
    """

    code = 503
    description = "Credits are temporarily unavailable. Please try again in a few seconds."
    #: Seconds a client should wait before trying again (the ``Retry-After`` header).
    retry_after = 5


class BodyTooLarge(HTTPCreditsError, RequestEntityTooLarge):
    """A request body longer than the route accepts: HTTP 413. Nothing was read past the limit, and
    nothing was written. ``limit`` is the largest body accepted, in bytes.

    The default response is JSON for clients that prefer it (always on the webhook),
    ``{"error": "bad_request", "message": "body too large"}``, and otherwise a short HTML page. Apps
    replace both with ``@app.errorhandler(413)``.
    """

    description = "body too large"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__()

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.limit,))


class IdempotencyRefusal(HTTPCreditsError):
    """A request whose ``Idempotency-Key`` cannot be honoured now: the view did not run and nothing
    was charged. JSON ``{"error": <error>, "message": ...}`` for clients that prefer it, else a short
    HTML page; never cached."""

    error = "idempotency_error"

    def __init__(self, description: str | None = None) -> None:
        super().__init__(description)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.description,))


class IdempotencyKeyReused(IdempotencyRefusal):
    """HTTP 422: the request's ``Idempotency-Key`` was first used for a different request (another
    method, path, query or body) on the same endpoint and wallet. Send a new key for a new request."""

    code = 422
    error = "idempotency_key_reused"
    description = (
        "This Idempotency-Key was already used for a different request: use a new key for a new request."
    )


class IdempotentRequestInProgress(IdempotencyRefusal):
    """HTTP 409 with ``Retry-After``: the first request with this ``Idempotency-Key`` is still running.
    Retry later with the same key to get its response."""

    code = 409
    error = "idempotency_request_in_progress"
    description = (
        "A request with this Idempotency-Key is still being processed: retry in a moment with the same key."
    )


class IdempotentResponseNotStored(IdempotencyRefusal):
    """HTTP 409: the request with this ``Idempotency-Key`` ran and was charged, but its response (streamed,
    or larger than ``CREDITS_IDEMPOTENCY_MAX_RESPONSE_BYTES``) was not kept, so it cannot be replayed;
    the view is never run a second time for it."""

    code = 409
    error = "idempotency_response_not_stored"
    description = (
        "The request with this Idempotency-Key already ran, but its response was not stored and cannot"
        " be sent again. Use a new key to run it again."
    )
