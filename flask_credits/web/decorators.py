"""``@requires_credits``: debit before the view runs, give the credits back if it fails, and run it
once per ``Idempotency-Key``."""

from __future__ import annotations

import abc
import functools
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

from flask import current_app, g, has_app_context, request
from flask.typing import ResponseReturnValue
from werkzeug.local import LocalProxy

from ..core.inputs import check_amount
from ..errors import IdempotencyConflict, IdempotentRequestInProgress, InsufficientCredits
from ..services import idempotency
from ..services.holds import MeteredHold
from . import bodies, responses

if TYPE_CHECKING:
    from werkzeug.wrappers import Response

    from ..extension import FlaskCredits
    from ..records import Entry, Wallet

log = logging.getLogger("flask_credits")

F = TypeVar("F", bound=Callable[..., Any])
Cost = int | Callable[[], int]
Reason = str | Callable[[], str | None]
Unsettled = Literal["charge", "release"]


def requires_credits(
    cost: Cost | None = None,
    *,
    hold: Cost | None = None,
    reason: Reason | None = None,
    unsettled: Unsettled | None = None,
) -> Callable[[F], F]:
    """Charge the current wallet for the view: ``cost`` credits before it runs, or, with ``hold``,
    what it reports it used, settled after it ran.

    ``cost`` is a whole number of at least 1, or a callable evaluated per request (it may return 0 for
    a free request). The debit is its own committed transaction. If the view raises, or returns a
    response with a 5xx status, the same credits go back to the same lots (a ``refund`` entry). With
    no wallet (nobody logged in) the login manager's ``unauthorized()`` answers; when the wallet cannot
    pay, the view does not run and :class:`InsufficientCredits` (402) is raised. The spend entry is
    available to the view as ``flask.g.credits_spend``. ``reason`` (the history's "What") defaults to
    the endpoint name; like ``cost`` it may be a callable, called with no arguments per request before
    the charge (so it can read ``flask.request``, e.g. the seed of what is generated). Its text is cut
    to 255 characters; ``None`` or ``""`` means the endpoint name.

    ``hold=N`` (an int of at least 1, or a callable) is for views whose cost is known only afterwards:
    ``N`` credits are reserved before the view runs (402 if they cannot be), and inside it
    :data:`flask_credits.current_hold` offers ``add(n)`` (report usage; the hold grows from the wallet
    when usage passes it, or ``add`` raises :class:`InsufficientCredits`), ``settle(amount=None)`` and
    ``release()``. A view that returns without settling is charged what it reported with ``add``, or,
    if it reported nothing, the whole hold (``unsettled="charge"``, the default of
    ``CREDITS_HOLD_UNSETTLED``) or nothing (``"release"``). A view that raises or answers 5xx is
    charged nothing (a settle it made is refunded). A streamed response keeps the hold open while it
    streams: the generator reports usage with ``current_hold.add(n)`` (wrap it in
    ``flask.stream_with_context``), and when the body ends (before its last bytes go out), is cut by
    a client that left, or breaks on an error, the hold is settled at what was used, exactly once.
    The hold lasts ``CREDITS_HOLD_TTL``, renewed while usage is reported; a worker that dies
    mid-stream leaves it to expire and count again.

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
    if (cost is None) == (hold is None):
        raise TypeError("@requires_credits needs either a cost or hold=..., not both")
    if cost is not None and not callable(cost):
        check_amount(cost, "cost")
    if hold is not None and not callable(hold):
        check_amount(hold, "hold")
    if unsettled not in (None, "charge", "release"):
        raise ValueError(f'unsettled must be "charge" or "release", not {unsettled!r}')

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> ResponseReturnValue:
            ext = _extension()
            wallet = ext.current_wallet()
            if wallet is None:
                return responses.unauthorized()
            charge: _Charge
            if hold is not None:
                amount = hold() if callable(hold) else hold
                check_amount(amount, "hold")
                charge = _Held(ext, wallet, amount, _reason(reason), unsettled or ext.settings.hold_unsettled)
            else:
                assert cost is not None
                amount = cost() if callable(cost) else cost
                if amount != 0 or not callable(cost):
                    check_amount(amount, "cost")
                charge = _Fixed(ext, wallet, amount, _reason(reason))
            key = _idempotency_key()
            run = functools.partial(current_app.ensure_sync(view), *args, **kwargs)
            if key is not None:
                return _run_once(ext, charge, key, run)
            if not charge.amount:
                g.credits_spend = None
                return run()  # type: ignore[no-any-return]
            charge.begin(None)
            return _run_charged(charge, run)

        return cast(F, wrapper)

    return decorator


#: The longest reason the ledger stores.
MAX_REASON_LENGTH = 255


def _reason(reason: Reason | None) -> str | None:
    """This request's reason: a callable's text, cut to what the ledger stores (it may carry what a
    client sent, which must never make a paid request fail)."""
    text = reason() if callable(reason) else reason
    if text is not None and not isinstance(text, str):
        raise TypeError(f"@requires_credits reason must return a string, not {type(text).__name__}")
    return text[:MAX_REASON_LENGTH] if text else None


class _Charge(abc.ABC):
    """How a decorated view is paid for: ``begin`` charges (or reserves) before the view runs,
    ``failed`` gives it back when the view fails, ``done`` ends it once the view answered."""

    def __init__(self, ext: FlaskCredits, wallet: Wallet, amount: int, reason: str | None) -> None:
        self.ext = ext
        self.wallet = wallet
        self.amount = amount
        self.reason = reason or request.endpoint or request.path
        self.metadata: dict[str, Any] = {"endpoint": request.endpoint, "method": request.method}

    @abc.abstractmethod
    def begin(self, ledger_key: str | None) -> None:
        """Charge (or reserve) before the view runs; under ``ledger_key`` for a keyed request."""

    @abc.abstractmethod
    def stale(self) -> bool:
        """After a takeover: the charge found under the ledger key was already ended by the dead run
        (refunded, released), so the run must start afresh under a new key row."""

    @abc.abstractmethod
    def failed(self, why: str) -> bool:
        """Give the charge back; False (logged) when that failed too."""

    @abc.abstractmethod
    def done(self, response: Response) -> int | None:
        """The view answered (not 5xx): end the charge; the id of the spend entry that paid, if any."""


class _Fixed(_Charge):
    """``@requires_credits(cost)``: one spend before the view runs, refunded if it fails."""

    spend: Entry | None = None

    def begin(self, ledger_key: str | None) -> None:
        if ledger_key is not None:
            self.metadata["idempotency_key"] = request.headers.get(self.ext.settings.idempotency_header or "")
        try:
            self.spend = self.ext.ledger.spend(
                self.wallet,
                self.amount,
                reason=self.reason,
                idempotency_key=ledger_key,
                metadata=self.metadata,
            )
        except InsufficientCredits as exc:
            exc.purchase_url = responses.purchase_url()
            raise
        g.credits_spend = self.spend

    def stale(self) -> bool:
        return (
            self.spend is not None
            and self.spend.replayed
            and self.ext.ledger.refund_of(self.spend) is not None
        )

    def failed(self, why: str) -> bool:
        return self.spend is None or _give_back(self.ext, self.spend, why)

    def done(self, response: Response) -> int | None:
        return None if self.spend is None else self.spend.id


class _Held(_Charge):
    """``@requires_credits(hold=N)``: a hold before the view runs, settled at what it used."""

    meter: MeteredHold | None = None

    def __init__(
        self, ext: FlaskCredits, wallet: Wallet, amount: int, reason: str | None, unsettled: Unsettled
    ) -> None:
        super().__init__(ext, wallet, amount, reason)
        self.unsettled = unsettled

    def begin(self, ledger_key: str | None) -> None:
        ttl = self.ext.settings.hold_ttl
        try:
            placed = self.ext.ledger.hold(
                self.wallet, self.amount, ttl=ttl, reason=self.reason, idempotency_key=ledger_key
            )
        except InsufficientCredits as exc:
            exc.purchase_url = responses.purchase_url()
            raise
        # Under an Idempotency-Key the settle's entry takes the run's ledger key too, so a run that
        # died after settling is found (and refunded) like a spend.
        self.meter = MeteredHold(self.ext.ledger, placed, ttl=ttl, reason=self.reason, settle_key=ledger_key)
        g.credits_hold = self.meter
        g.credits_spend = None

    def stale(self) -> bool:
        return self.meter is not None and self.meter.hold.replayed and self.meter.hold.status != "held"

    def failed(self, why: str) -> bool:
        meter = self.meter
        if meter is None:
            return True
        try:
            if meter.entry is not None:
                self.ext.ledger.refund(self.wallet, meter.entry.id, reason=f"returned: {why}")
            elif not meter.ended:
                meter.release()
        except Exception:
            log.exception("could not give back hold %s of %s after %s", meter.id, self.wallet, why)
            return False
        return True

    def done(self, response: Response) -> int | None:
        meter = self.meter
        if meter is None:
            return None
        if response.is_streamed:
            # The body is produced after this returns, outside the request: end the hold as the body
            # ends (before the server sends its last bytes, so a client that reads its balance next
            # sees the charge), is closed early (client gone) or breaks; or, if the server never
            # started it, when it closes the response.
            app = current_app._get_current_object()  # type: ignore[attr-defined]

            def end() -> None:
                with app.app_context():
                    meter.finish(self.unsettled)

            response.response = _then(response.response, end)
            response.call_on_close(end)
            return None
        meter.finish(self.unsettled)
        g.credits_spend = meter.entry
        return None if meter.entry is None else meter.entry.id


def _then(body: Iterable[Any], end: Callable[[], None]) -> Iterator[Any]:
    """``body``, then ``end()`` once it is exhausted, closed early or broken."""
    try:
        yield from body
    finally:
        end()


def _run_charged(charge: _Charge, run: Callable[[], Any]) -> Response:
    """Run the view paid for by ``charge``; give it back if the view raises or answers 5xx."""
    try:
        response = current_app.make_response(run())
    except BaseException:
        charge.failed("the view raised an exception")
        raise
    if response.status_code >= 500:
        charge.failed(f"the view answered {response.status_code}")
        return response
    charge.done(response)
    return response


def _run_once(ext: FlaskCredits, charge: _Charge, key: str, run: Callable[[], Any]) -> Response:
    """The view behind an Idempotency-Key: claim the key, charge, run, store the response."""
    keys = ext.request_keys
    wallet, amount = charge.wallet, charge.amount
    endpoint = request.endpoint or request.path
    # The body is kept for the view. Werkzeug would cut a chunked body at MAX_CONTENT_LENGTH without a
    # word, and a request padded past it would share its first bytes' fingerprint: read it whole or 413.
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    body = request.get_data(cache=True) if limit is None else bodies.read_body(int(limit))
    request_print = idempotency.fingerprint(request.method, request.path, request.query_string, body)
    view_lease = ext.settings.idempotency_lock_timeout
    charge.metadata["idempotency_key"] = key
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
        g.credits_spend = None
        if amount:
            try:
                charge.begin(claim.spend_key)
            except InsufficientCredits:
                _quietly(keys.release, claim)  # nothing was charged: the key is free for a retry
                raise
            except IdempotencyConflict:
                # Taken over from a run charged another cost (the price changed since): return
                # that charge and start afresh under a new key row.
                keys.settle(claim)
                continue
            except BaseException:
                # The database failed under the charge, which may still commit: keep the row, end its
                # lease, and let the retry take it over and charge under the same ledger key.
                _quietly(keys.unlock, claim)
                raise
            if charge.stale():
                # Taken over from a run that failed and gave its charge back but could not free its key.
                keys.settle(claim)
                continue
        break
    else:  # pragma: no cover - a freshly claimed key cannot hold a refunded spend
        raise IdempotentRequestInProgress()
    if amount and not keys.extend(claim, view_lease):
        # Charged too slowly: another request took the key over, charged under the same ledger key
        # (so this charge is its charge) and runs the view. This one must not.
        raise IdempotentRequestInProgress()
    try:
        response = current_app.make_response(run())
    except BaseException:
        _failed(ext, claim, charge, "the view raised an exception")
        raise
    if response.status_code >= 500:
        _failed(ext, claim, charge, f"the view answered {response.status_code}")
        return response
    paid_by = charge.done(response) if amount else None
    keys.finish(claim, response, paid_by, max_bytes=ext.settings.idempotency_max_response_bytes)
    return response


def _current_hold() -> MeteredHold:
    meter = g.get("credits_hold") if has_app_context() else None
    if meter is None:
        raise RuntimeError(
            "current_hold is only set inside a view decorated with @requires_credits(hold=...)"
        )
    return cast(MeteredHold, meter)


#: The hold of the current ``@requires_credits(hold=...)`` view (a :class:`MeteredHold`): ``add(n)``,
#: ``settle(amount=None)``, ``release()``, ``used``, ``amount``, ``remaining``. Inside a streamed
#: response's generator it needs ``flask.stream_with_context`` (or keep
#: ``current_hold._get_current_object()`` in a variable before returning the response).
current_hold: MeteredHold = LocalProxy(_current_hold)  # type: ignore[assignment]


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


def _failed(ext: FlaskCredits, claim: idempotency.Claim, charge: _Charge, why: str) -> None:
    """A keyed run failed: give its charge back and free its key. If the charge could not be given
    back, the key must not be freed (its retry would pay again): its lease is ended instead, so the
    retry takes it over and runs on this run's charge."""
    if charge.failed(why):
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
