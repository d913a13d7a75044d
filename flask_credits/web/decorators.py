"""``@requires_credits``: debit before the view runs, give the credits back if it fails, and run it
once per ``Idempotency-Key``."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from flask import current_app, g, request
from flask.typing import ResponseReturnValue

from ..core.inputs import check_amount
from ..errors import IdempotencyConflict, IdempotentRequestInProgress, InsufficientCredits
from ..services import idempotency
from . import bodies, responses

if TYPE_CHECKING:
    from werkzeug.wrappers import Response

    from ..extension import FlaskCredits
    from ..records import Entry, Wallet

log = logging.getLogger("flask_credits")

F = TypeVar("F", bound=Callable[..., Any])
Cost = int | Callable[[], int]


def requires_credits(cost: Cost, *, reason: str | None = None) -> Callable[[F], F]:
    """Charge ``cost`` credits to the current wallet before the view runs.

    ``cost`` is a whole number of at least 1, or a callable evaluated per request (it may return 0 for
    a free request). The debit is its own committed transaction. If the view raises, or returns a
    response with a 5xx status, the same credits go back to the same lots (a ``refund`` entry). With
    no wallet (nobody logged in) the login manager's ``unauthorized()`` answers; when the wallet cannot
    pay, the view does not run and :class:`InsufficientCredits` (402) is raised. The spend entry is
    available to the view as ``flask.g.credits_spend``. ``reason`` defaults to the endpoint name.

    A request carrying an ``Idempotency-Key`` header (``CREDITS_IDEMPOTENCY_HEADER``) runs the view
    at most once per key, wallet and endpoint, charged once. Its response (status, headers, body) is
    stored; a retry of the same request (method, path, query and body) gets it back byte for byte
    with ``Idempotent-Replayed: true``, without running the view or charging. The same key with
    another request answers 422 (:class:`IdempotencyKeyReused`); while the first request runs, 409
    with ``Retry-After`` (:class:`IdempotentRequestInProgress`); a response that was streamed or
    larger than ``CREDITS_IDEMPOTENCY_MAX_RESPONSE_BYTES`` cannot be replayed: 409
    (:class:`IdempotentResponseNotStored`). A run that failed (raised or answered 5xx, credits given
    back) or was refused with 402 frees its key. Keys last ``CREDITS_IDEMPOTENCY_TTL``.
    """
    if not callable(cost):
        check_amount(cost, "cost")

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> ResponseReturnValue:
            ext = _extension()
            wallet = ext.current_wallet()
            if wallet is None:
                return responses.unauthorized()
            amount = cost() if callable(cost) else cost
            if amount != 0 or not callable(cost):
                check_amount(amount, "cost")
            key = _idempotency_key()
            run = functools.partial(current_app.ensure_sync(view), *args, **kwargs)
            if key is not None:
                return _run_once(ext, wallet, amount, reason, key, run)
            if amount == 0:
                g.credits_spend = None
                return run()  # type: ignore[no-any-return]
            spend = _spend(
                ext,
                wallet,
                amount,
                reason=reason or request.endpoint or request.path,
                metadata={"endpoint": request.endpoint, "method": request.method},
            )
            return _run_charged(ext, spend, run)

        return cast(F, wrapper)

    return decorator


def _spend(ext: FlaskCredits, wallet: Wallet, amount: int, **kwargs: Any) -> Entry:
    """The ledger's spend; a refusal (402) learns where to buy more credits."""
    try:
        return ext.ledger.spend(wallet, amount, **kwargs)
    except InsufficientCredits as exc:
        exc.purchase_url = responses.purchase_url()
        raise


def _run_charged(ext: FlaskCredits, spend: Entry, run: Callable[[], Any]) -> Response:
    """Run the view paid for by ``spend``; give the credits back if it raises or answers 5xx."""
    g.credits_spend = spend
    try:
        response = current_app.make_response(run())
    except BaseException:
        _give_back(ext, spend, "the view raised an exception")
        raise
    if response.status_code >= 500:
        _give_back(ext, spend, f"the view answered {response.status_code}")
    return response


def _run_once(
    ext: FlaskCredits,
    wallet: Wallet,
    amount: int,
    reason: str | None,
    key: str,
    run: Callable[[], Any],
) -> Response:
    """The view behind an Idempotency-Key: claim the key, charge, run, store the response."""
    keys = ext.request_keys
    endpoint = request.endpoint or request.path
    # The body is kept for the view. Werkzeug would cut a chunked body at MAX_CONTENT_LENGTH without a
    # word, and a request padded past it would share its first bytes' fingerprint: read it whole or 413.
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    body = request.get_data(cache=True) if limit is None else bodies.read_body(int(limit))
    request_print = idempotency.fingerprint(request.method, request.path, request.query_string, body)
    view_lease = ext.settings.idempotency_lock_timeout
    for _ in range(2):
        found = keys.claim(
            wallet,
            endpoint,
            key,
            request_print,
            # Free requests have no charge to be cut half-way: the view's lease at once.
            lease=min(idempotency.CLAIM_LEASE, view_lease) if amount else view_lease,
            ttl=ext.settings.idempotency_ttl,
        )
        if isinstance(found, idempotency.StoredResponse):
            replay = current_app.response_class(found.body, status=found.status, headers=found.headers)
            replay.headers["Idempotent-Replayed"] = "true"
            return replay
        claim = found
        spend = None
        if amount:
            try:
                spend = _spend(
                    ext,
                    wallet,
                    amount,
                    reason=reason or endpoint,
                    idempotency_key=claim.spend_key,
                    metadata={"endpoint": request.endpoint, "method": request.method, "idempotency_key": key},
                )
            except InsufficientCredits:
                _quietly(keys.release, claim)  # nothing was charged: the key is free for a retry
                raise
            except IdempotencyConflict:
                # Taken over from a run charged another cost (the price changed since): return
                # that charge and start afresh under a new key row.
                keys.settle(claim)
                continue
            except BaseException:
                # The database failed under the spend, which may still commit: keep the row, end its
                # lease, and let the retry take it over and spend under the same ledger key.
                _quietly(keys.unlock, claim)
                raise
            if spend.replayed and ext.ledger.refund_of(spend) is not None:
                # Taken over from a run that failed and was refunded but could not free its key.
                keys.settle(claim)
                continue
        break
    else:  # pragma: no cover - a freshly claimed key cannot hold a refunded spend
        raise IdempotentRequestInProgress()
    if amount and not keys.extend(claim, view_lease):
        # Charged too slowly: another request took the key over, spent under the same ledger key (so
        # this charge is its charge) and runs the view. This one must not.
        raise IdempotentRequestInProgress()
    g.credits_spend = spend
    try:
        response = current_app.make_response(run())
    except BaseException:
        _failed(ext, claim, spend, "the view raised an exception")
        raise
    if response.status_code >= 500:
        _failed(ext, claim, spend, f"the view answered {response.status_code}")
        return response
    keys.finish(
        claim,
        response,
        None if spend is None else spend.id,
        max_bytes=ext.settings.idempotency_max_response_bytes,
    )
    return response


#: Longest Idempotency-Key header value accepted.
MAX_KEY_LENGTH = 200
# An RFC 8941 sf-string, as the IETF draft writes the key: "..." with \" and \\ escapes.
_SF_STRING = re.compile(r'"((?:[^"\\]|\\["\\])*)"')


def _idempotency_key() -> str | None:
    """The client's Idempotency-Key (unquoted if sent as the IETF draft's quoted string), or None
    without the header; 400 for a key that is not 1 to 200 printable ASCII characters."""
    header = _extension().settings.idempotency_header
    value = request.headers.get(header) if header else None
    if value is None:
        return None
    quoted = _SF_STRING.fullmatch(value)
    if quoted:
        value = re.sub(r"\\(.)", r"\1", quoted.group(1))
    if not 0 < len(value) <= MAX_KEY_LENGTH or not value.isascii() or not value.isprintable():
        responses.refuse(
            400, "bad_request", f"{header} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters"
        )
    return value


def _failed(ext: FlaskCredits, claim: idempotency.Claim, spend: Entry | None, why: str) -> None:
    """A keyed run failed: give its credits back and free its key. If the credits could not be given
    back, the key must not be freed (its retry would pay again): its lease is ended instead, so the
    retry takes it over and runs on this run's charge."""
    if spend is None or _give_back(ext, spend, why):
        _quietly(ext.request_keys.release, claim)
    else:
        _quietly(ext.request_keys.unlock, claim)


def _quietly(step: Callable[[idempotency.Claim], None], claim: idempotency.Claim) -> None:
    """A clean-up after a failure: the failure is what the client must see. If this fails too, the
    key's lease runs out and the next retry (or ``flask credits expire``) settles it."""
    try:
        step(claim)
    except Exception:
        log.exception("could not %s Idempotency-Key request %s", step.__name__, claim.id)


def _extension() -> FlaskCredits:
    try:
        return cast("FlaskCredits", current_app.extensions["credits"])
    except KeyError:
        raise RuntimeError("@requires_credits needs FlaskCredits registered on this app") from None


def _give_back(ext: FlaskCredits, spend: Entry, why: str) -> bool:
    """Return a failed view's credits; False (logged) when that failed too."""
    try:
        ext.ledger.refund(spend.wallet, spend.id, reason=f"returned: {why}")
    except Exception:
        # The view's own failure is what the client must see; the spend stays recorded, so an
        # operator can still return it with FlaskCredits.refund().
        log.exception("could not return spend %s to %s after %s", spend.id, spend.wallet, why)
        return False
    return True
