"""Request Idempotency-Keys: one run of a paid view per key, and its response kept for retries.

Per wallet, endpoint and key there is one row in ``credits_requests``. Whoever inserts it owns the
key (the unique key settles concurrent requests, on every backend and across processes) and runs the
view; retries read the row:

- ``running`` and its lease (``locked_until``) not over: 409, the first request is still at work;
- ``running`` with the lease over: its worker died (or the database failed under it). One retry takes
  the key over by bumping ``attempt`` in a conditional UPDATE and runs the view; it spends under the
  same ledger key as the dead attempt, so a debit that attempt made (or that is still committing) is
  replayed, never made twice;

The lease is short (``CLAIM_LEASE``, 5 s) while the request is being charged, and extended to
``CREDITS_IDEMPOTENCY_LOCK_TIMEOUT`` once the spend is through, just before the view runs: a request
whose spend the database cut (answered 503, maybe committed) is taken over by the retry that waited
its ``Retry-After``, not minutes later; a request that lost its short lease meanwhile learns it from
that extension and never runs the view.
- ``done``: the stored response, replayed; ``unstored``: 409 (the response was streamed or too big);
- a different fingerprint (method, path, query, body): 422.

A run that fails (the view raised or answered 5xx) has its credits returned by the decorator and
deletes its row, so the key is free again; so does a spend refused with 402. ``attempt`` fences a
request that outlived its lease: it can then neither store its response nor delete the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from ..core.ledger import Ledger
from ..errors import (
    CreditsUnavailable,
    HoldAlreadySettled,
    IdempotencyKeyReused,
    IdempotentRequestInProgress,
    IdempotentResponseNotStored,
)
from ..records import Wallet
from ..storage.database import Database, unavailable_on_database_errors
from ..storage.tables import ENDPOINT_LENGTH

if TYPE_CHECKING:
    from werkzeug.wrappers import Response

log = logging.getLogger("flask_credits")

#: Response headers never stored for a replay: they describe one connection or one response's
#: framing, or (cookies) would hand the first request's state to whoever replays it.
UNSTORED_HEADERS = frozenset(
    ["connection", "content-length", "date", "keep-alive", "server", "set-cookie", "transfer-encoding"]
)
#: How long a request owns its key while it is being charged, before ``extend`` (the view's lease):
#: the ``Retry-After`` of a 503, so a client that waits as told after a cut spend finds its key free.
#: Too short costs no money: a request whose spend outlasts it loses the key to a retry and answers 409.
CLAIM_LEASE = timedelta(seconds=CreditsUnavailable.retry_after)
#: How often ``claim`` starts over when the row it collided with changed under it.
_CLAIM_ROUNDS = 4
#: Rows pruned per statement by ``prune``.
_PRUNE_BATCH = 500


@dataclass(frozen=True)
class Claim:
    """This request owns the key: run the view, then :meth:`RequestKeys.finish` or ``abandon``."""

    id: int
    attempt: int
    wallet: Wallet
    #: The ledger idempotency key of the run's spend: the same for every attempt on this row.
    spend_key: str
    #: True when this request took the key over from one whose lease ran out.
    took_over: bool = False


@dataclass(frozen=True)
class StoredResponse:
    """The response of the request that first used the key, to send again."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


def fingerprint(method: str, path: str, query: bytes, body: bytes) -> str:
    """SHA-256 of what makes two requests the same request."""
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode(), query, body):
        # Length-prefixed, so no two different requests run together into the same bytes.
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def scope(endpoint: str) -> str:
    """The endpoint name as stored: long names hashed to fit the column."""
    if len(endpoint) <= ENDPOINT_LENGTH:
        return endpoint
    return "sha256:" + hashlib.sha256(endpoint.encode()).hexdigest()


class RequestKeys:
    """The ``credits_requests`` table of one ledger's database."""

    def __init__(self, db: Database, ledger: Ledger) -> None:
        self.db = db
        self.ledger = ledger
        self.t = db.t.requests

    @unavailable_on_database_errors
    def claim(
        self,
        wallet: Wallet,
        endpoint: str,
        key: str,
        fingerprint: str,
        *,
        lease: timedelta,
        ttl: timedelta,
    ) -> Claim | StoredResponse:
        """Own ``key`` for ``lease`` (then :meth:`extend` it), or get the response of the request that
        owned it.

        Raises :class:`IdempotencyKeyReused` (another request used the key),
        :class:`IdempotentRequestInProgress` (its request is still running) or
        :class:`IdempotentResponseNotStored`.
        """
        r = self.t
        where = (
            r.c.user_id == wallet.user_id,
            r.c.key_id == (wallet.key_id or ""),
            r.c.endpoint == scope(endpoint),
            r.c.idempotency_key == key,
        )
        for _ in range(_CLAIM_ROUNDS):
            now = self.db.now()
            values = {
                "user_id": wallet.user_id,
                "key_id": wallet.key_id or "",
                "endpoint": scope(endpoint),
                "idempotency_key": key,
                "fingerprint": fingerprint,
                "status": "running",
                "attempt": 1,
                "locked_until": now + lease,
                "created_at": now,
                "expires_at": now + ttl,
            }
            try:
                claimed = self.db.insert(sa.insert(r).values(values))
            except sa.exc.IntegrityError:
                pass
            else:
                return Claim(int(claimed), 1, wallet, _spend_key(int(claimed)))
            with self.db.reader.connect() as conn:
                row = conn.execute(
                    sa.select(
                        r.c.id,
                        r.c.fingerprint,
                        r.c.status,
                        r.c.attempt,
                        r.c.locked_until,
                        r.c.expires_at,
                        r.c.response_status,
                        r.c.response_headers,
                        r.c.response_body,
                    ).where(*where)
                ).first()
            if row is None:
                continue  # freed meanwhile: try to take it again
            if row.expires_at <= now:
                # An expired key is a new key: remove the old row (if still that one; a run that never
                # finished is settled first, its credits returned) and start over.
                if row.status == "running":
                    self._settle_dead(int(row.id), int(row.attempt), wallet, now, lease)
                else:
                    self.db.write(sa.delete(r).where(r.c.id == row.id, r.c.expires_at <= now))
                continue
            if row.fingerprint != fingerprint:
                raise IdempotencyKeyReused()
            if row.status == "done":
                return StoredResponse(
                    int(row.response_status),
                    [(str(name), str(value)) for name, value in row.response_headers or []],
                    bytes(row.response_body or b""),
                )
            if row.status == "unstored":
                raise IdempotentResponseNotStored()
            if row.locked_until > now:
                raise IdempotentRequestInProgress()
            if self._take_over(int(row.id), int(row.attempt), now, now + lease):
                log.warning(
                    "Idempotency-Key request %s: attempt %s never finished; attempt %s takes over",
                    row.id,
                    row.attempt,
                    row.attempt + 1,
                )
                return Claim(int(row.id), int(row.attempt) + 1, wallet, _spend_key(int(row.id)), True)
        raise IdempotentRequestInProgress()

    def _settle_dead(self, row_id: int, attempt: int, wallet: Wallet, now: datetime, lease: timedelta) -> int:
        """Settle a run whose lease is over (see :meth:`settle`); 1 when credits went back. The key is
        taken over first, as a retry would: a retry arriving meanwhile gets 409 instead of running on
        the spend refunded here."""
        if not self._take_over(row_id, attempt, now, now + lease):
            return 0
        return int(self.settle(Claim(row_id, attempt + 1, wallet, _spend_key(row_id))))

    @unavailable_on_database_errors
    def settle(self, claim: Claim) -> bool:
        """End a run that will never finish, whose key this request holds: return its credits (if it
        was charged and they were not returned yet; a hold it still had is released) and free the
        key. True when credits went back."""
        returned = False
        # The hold first: if it is settled meanwhile, its spend entry (under the same ledger key) is
        # then found below and refunded.
        held = self.ledger.find_hold(claim.wallet, claim.spend_key)
        if held is not None and held.status == "held":
            with contextlib.suppress(HoldAlreadySettled):
                self.ledger.release(held.id)
                returned = True
        spend = self.ledger.find_by_key(claim.wallet, claim.spend_key)
        if spend is not None and self.ledger.refund_of(spend) is None:
            reason = "returned: the request with this Idempotency-Key never finished"
            self.ledger.refund(claim.wallet, spend.id, reason=reason)
            returned = True
        self.release(claim)
        return returned

    def _take_over(self, row_id: int, attempt: int, now: datetime, until: datetime) -> bool:
        """Take a running key whose lease is over from ``attempt`` (one conditional UPDATE: whoever
        changes the row won it), holding it ``until``."""
        r = self.t
        taken = self.db.write(
            sa.update(r)
            .where(r.c.id == row_id, r.c.attempt == attempt, r.c.status == "running", r.c.locked_until <= now)
            .values(attempt=attempt + 1, locked_until=until)
        )
        return taken == 1

    @unavailable_on_database_errors
    def extend(self, claim: Claim, lease: timedelta) -> bool:
        """Hold the key ``lease`` from now (the view is about to run). False when this request lost
        it: its short claim lease ran out and another request took it over, and runs the view."""
        r = self.t
        changed = self.db.write(
            sa.update(r)
            .where(r.c.id == claim.id, r.c.attempt == claim.attempt, r.c.status == "running")
            .values(locked_until=self.db.now() + lease)
        )
        return changed == 1

    @unavailable_on_database_errors
    def finish(self, claim: Claim, response: Response, spend_id: int | None, *, max_bytes: int) -> bool:
        """Store ``response`` for replays (or mark it unstored when it is streamed or larger than
        ``max_bytes``). False when this request had lost the key to a takeover."""
        r = self.t
        values: dict[str, Any] = {"spend_id": spend_id}
        if response.is_streamed or response.direct_passthrough:
            values["status"] = "unstored"
        else:
            body = response.get_data()
            if len(body) > max_bytes:
                values["status"] = "unstored"
            else:
                values.update(
                    status="done",
                    response_status=response.status_code,
                    response_headers=[list(h) for h in _stored_headers(response.headers.items())],
                    response_body=body,
                )
        done = self.db.write(
            sa.update(r)
            .where(r.c.id == claim.id, r.c.attempt == claim.attempt, r.c.status == "running")
            .values(values)
        )
        if done != 1:
            log.warning(
                "Idempotency-Key request %s: attempt %s finished after its lease ran out and another"
                " request took the key over; its response was not stored",
                claim.id,
                claim.attempt,
            )
            return False
        return True

    @unavailable_on_database_errors
    def release(self, claim: Claim) -> None:
        """Free the key: the run failed and charged nothing (or its credits were returned)."""
        r = self.t
        self.db.write(sa.delete(r).where(r.c.id == claim.id, r.c.attempt == claim.attempt))

    @unavailable_on_database_errors
    def unlock(self, claim: Claim) -> None:
        """End the lease now, keeping the row: the run's spend may or may not have committed (the
        database failed under it). The next request with the key takes it over and spends under the
        same ledger key, so that spend, if it happened, is replayed rather than made again."""
        r = self.t
        now = self.db.now()
        self.db.write(
            sa.update(r)
            .where(r.c.id == claim.id, r.c.attempt == claim.attempt, r.c.status == "running")
            .values(locked_until=now)
        )

    @unavailable_on_database_errors
    def prune(self, *, lock_timeout: timedelta, now: datetime | None = None) -> tuple[int, int]:
        """Delete expired keys, and settle requests whose worker died (lease over, never finished):
        their spend, if any, is refunded and their key freed. Returns (keys deleted, runs whose
        credits were returned)."""
        r = self.t
        now = now or self.db.now()
        returned = 0
        with self.db.reader.connect() as conn:
            dead = conn.execute(
                sa.select(r.c.id, r.c.attempt, r.c.user_id, r.c.key_id)
                .where(r.c.status == "running", r.c.locked_until <= now)
                .order_by(r.c.id)
                .limit(_PRUNE_BATCH)
            ).all()
        for row in dead:
            wallet = Wallet(row.user_id, row.key_id or None)
            returned += self._settle_dead(int(row.id), int(row.attempt), wallet, now, lock_timeout)
        deleted = 0
        while True:
            with self.db.reader.connect() as conn:
                ids = (
                    conn.execute(
                        sa.select(r.c.id)
                        .where(r.c.expires_at <= now, r.c.status != "running")
                        .limit(_PRUNE_BATCH)
                    )
                    .scalars()
                    .all()
                )
            if not ids:
                break
            deleted += self.db.write(sa.delete(r).where(r.c.id.in_(ids), r.c.expires_at <= now))
        return deleted, returned


def _spend_key(row_id: int) -> str:
    return f"request:{row_id}"


def _stored_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(name, value) for name, value in headers if name.lower() not in UNSTORED_HEADERS]
