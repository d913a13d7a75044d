"""A hold in use by one piece of work: usage reported as it goes, the hold grown when usage passes
it, and settled exactly once at what was used (``@requires_credits(hold=...)`` gives one to a view as
``flask_credits.current_hold``)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from datetime import timedelta

from ..core.inputs import check_amount
from ..core.ledger import Ledger
from ..errors import HoldAlreadySettled, InsufficientCredits
from ..records import Entry, Hold

log = logging.getLogger("flask_credits")


class MeteredHold:
    """One hold and the credits used against it so far.

    ``add(n)`` reports usage; when the running total would pass the hold, the hold is extended from
    the wallet first (by at least the first reservation again, else by what is missing), and
    :class:`InsufficientCredits` is raised, nothing counted, when the wallet cannot cover it. Usage
    reported in the second half of the hold's life renews it for ``ttl`` from then, so a long stream
    keeps its hold while it reports usage.
    ``settle(amount=None)`` charges ``amount`` (default: what was used) and releases the rest;
    ``release()`` gives the whole hold back; ``finish()`` ends it for work that is over. Safe to call
    from more than one thread.
    """

    def __init__(
        self,
        ledger: Ledger,
        hold: Hold,
        *,
        ttl: timedelta,
        reason: str | None = None,
        settle_key: str | None = None,
    ) -> None:
        self._ledger = ledger
        self._hold = hold
        self._first = hold.amount
        self._ttl = ttl
        self._reason = reason
        self._settle_key = settle_key
        self._used = 0
        self._reported = False
        self._ended = False
        self._entry: Entry | None = None
        self._lock = threading.RLock()

    @property
    def id(self) -> int:
        return self._hold.id

    @property
    def hold(self) -> Hold:
        """The hold as last seen (its ``amount`` grows when usage passes it)."""
        return self._hold

    @property
    def amount(self) -> int:
        """Credits reserved now."""
        return self._hold.amount

    @property
    def used(self) -> int:
        """Credits reported with :meth:`add` so far."""
        return self._used

    @property
    def reported(self) -> bool:
        """True once :meth:`add` was called (even with 0)."""
        return self._reported

    @property
    def remaining(self) -> int:
        """Credits still reserved beyond what was used."""
        return max(self._hold.amount - self._used, 0)

    @property
    def ended(self) -> bool:
        """True once settled or released."""
        return self._ended

    @property
    def entry(self) -> Entry | None:
        """The spend entry the settle wrote (``None`` before it, or when nothing was charged)."""
        return self._entry

    def add(self, amount: int) -> int:
        """Count ``amount`` more credits used; returns the total used. Raises
        :class:`InsufficientCredits` (nothing counted) when the hold must grow and the wallet cannot
        cover it, and :class:`HoldAlreadySettled` after the hold ended."""
        amount = check_amount(amount, minimum=0)
        with self._lock:
            if self._ended:
                raise HoldAlreadySettled(f"hold {self.id} has ended: usage can no longer be added")
            total = self._used + amount
            missing = total - self._hold.amount
            if missing > 0:
                self._hold = self._grow(missing)
            elif self._hold.expires_at - self._ledger.db.now() < self._ttl / 2:
                # Long work that stays within its hold: keep the hold alive while usage comes in.
                renewed = self._ledger.renew(self.id, ttl=self._ttl)
                if renewed is not None:
                    self._hold = dataclasses.replace(self._hold, expires_at=renewed)
            self._used = total
            self._reported = True
            return total

    def _grow(self, missing: int) -> Hold:
        # Grow in steps of the first reservation, so a long stream pays a round trip per step rather
        # than per chunk; when the wallet cannot cover a step, just what is missing.
        step = max(missing, self._first)
        try:
            return self._ledger.extend(self.id, step, ttl=self._ttl)
        except InsufficientCredits:
            if step == missing:
                raise
        return self._ledger.extend(self.id, missing, ttl=self._ttl)

    def settle(self, amount: int | None = None) -> Entry | None:
        """Charge ``amount`` (default: what was used) and give the rest back. Again with the same
        amount returns the same entry; with another raises :class:`HoldAlreadySettled`."""
        with self._lock:
            charge = self._used if amount is None else amount
            entry = self._ledger.settle(
                self.id, charge, reason=self._reason, idempotency_key=self._settle_key
            )
            self._ended = True
            self._entry = entry
            return entry

    def release(self) -> None:
        """Give the whole hold back (idempotent; :class:`HoldAlreadySettled` once it was charged)."""
        with self._lock:
            self._ledger.release(self.id)
            self._ended = True

    def finish(self, unsettled: str = "charge") -> None:
        """End the hold of work that is over, unless it already ended: settle at what was reported
        with :meth:`add`, or, when nothing was, charge the whole hold (``unsettled="charge"``) or
        release it (``"release"``). For the end of a view, or of a streamed response whatever ended
        it (finished, client gone, error). A failure is logged, not raised: the work is done and
        answered; the hold then expires and its credits count again."""
        with self._lock:
            if self._ended:
                return
            try:
                if self._reported or unsettled != "charge":
                    self.settle(self._used)
                else:
                    self.settle(self._hold.amount)
            except Exception:
                log.exception("could not settle hold %s at %s credits used", self.id, self._used)


__all__ = ["MeteredHold"]
