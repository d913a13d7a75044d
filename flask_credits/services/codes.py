"""Redeemable credit codes: made, listed and disabled by the people who run the app (the CLI), redeemed
by users (``POST /credits/redeem``, :meth:`FlaskCredits.redeem_code`).

How the limits hold, whatever runs at once: a redemption is ONE transaction, the grant's own
(``Ledger.grant(in_tx=...)``). In it, after the entry is written (the wallet row locked), one
conditional UPDATE takes a redemption from the code row (``redeemed < max_redemptions``, not
disabled, not expired), which locks that row until the commit: redemptions of one code are
serialized from there, so the owner's redemptions counted next are exact, and the redemption row
written last commits with the grant. Any refusal raises, which rolls the grant back: nothing changes.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .. import signals
from ..errors import CreditsError, InvalidArgument
from ..records import CreditCode, Entry, Wallet
from ..storage.database import unavailable_on_database_errors

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Row

    from ..extension import FlaskCredits

#: Letters and digits nobody misreads (no 0/O, 1/I/L): generated codes are typed by people.
ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
#: A generated code: 12 characters in groups of 4 (about 59 bits: not guessable at any rate limit).
GROUPS, GROUP = 3, 4
#: The characters a code may have (it goes in URLs, logs and CSV files as it is).
ALLOWED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
MAX_LENGTH = 64
#: The columns are 32-bit integers; credits are BigInteger but JSON clients lose precision past 2**53.
MAX_COUNT, MAX_CREDITS = 2**31 - 1, 2**53 - 1


class BadCode(InvalidArgument):
    """Input that cannot be a code, or a code that cannot be made: HTTP 400 ``bad_request``."""


class CodeRefused(CreditsError):
    """A redemption that was refused: nothing was granted nor counted. ``status`` and ``error`` are
    its HTTP answer; ``code`` is the code as typed (upper-cased)."""

    status = 400
    error = "code_refused"
    message = "This code cannot be redeemed."

    def __init__(self, code: str) -> None:
        self.code = code
        super().__init__(self.message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.code,))


class CodeNotFound(CodeRefused, LookupError):
    """No code is spelled like this: HTTP 404 ``code_not_found``."""

    status = 404
    error = "code_not_found"
    message = "There is no such code. Check how it is spelled."


class CodeExpired(CodeRefused):
    """The code's time is over: HTTP 410 ``code_expired``."""

    status = 410
    error = "code_expired"
    message = "This code has expired."


class CodeDisabled(CodeRefused):
    """The code was disabled: HTTP 410 ``code_disabled``."""

    status = 410
    error = "code_disabled"
    message = "This code is no longer valid."


class CodeExhausted(CodeRefused):
    """Every redemption the code allows was taken: HTTP 409 ``code_exhausted``."""

    status = 409
    error = "code_exhausted"
    message = "This code has been used up."


class CodeAlreadyRedeemed(CodeRefused):
    """The wallet's owner redeemed the code as often as it allows (``per_user``): HTTP 409
    ``code_already_redeemed``."""

    status = 409
    error = "code_already_redeemed"
    message = "You have already redeemed this code."


def normalize(text: object) -> str:
    """The code as stored: upper-case, without surrounding spaces. :class:`BadCode` for anything that
    cannot be one (not a string, empty, too long, other characters)."""
    if not isinstance(text, str):
        raise BadCode("the code must be text")
    # Bounded before any work on it: a client may send megabytes.
    code = text[: MAX_LENGTH + 64].strip().upper()
    if not code or len(code) > MAX_LENGTH or not set(code) <= ALLOWED:
        raise BadCode(f"a code is 1 to {MAX_LENGTH} letters, digits, '-' or '_'")
    return code


def generate() -> str:
    """A random code such as ``K7QX-M3TP-WRN9``."""
    return "-".join("".join(secrets.choice(ALPHABET) for _ in range(GROUP)) for _ in range(GROUPS))


def _count(value: object, name: str, maximum: int = MAX_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise BadCode(f"{name} must be a whole number from 1 to {maximum}")
    return value


def _record(row: Row[Any]) -> CreditCode:
    return CreditCode(
        id=int(row.id),
        code=row.code,
        credits=int(row.credits),
        max_redemptions=int(row.max_redemptions),
        redeemed=int(row.redeemed),
        per_user=int(row.per_user),
        expires_at=row.expires_at,
        credits_expire_after=(
            None if row.credits_expire_after_seconds is None else int(row.credits_expire_after_seconds)
        ),
        disabled=bool(row.disabled),
        actor=row.actor,
        created_at=row.created_at,
    )


@unavailable_on_database_errors
def create(
    ext: FlaskCredits,
    *,
    credits: int,
    max_redemptions: int,
    per_user: int = 1,
    expires_at: datetime | None = None,
    code: str | None = None,
    credits_expire_after: int | None = None,
    actor: str | None = None,
) -> CreditCode:
    """Make a code (a random readable one when ``code`` is None). :class:`BadCode` for values that
    cannot work, or a code that exists already."""
    credits = _count(credits, "credits", MAX_CREDITS)
    max_redemptions = _count(max_redemptions, "max_redemptions")
    per_user = _count(per_user, "per_user")
    if credits_expire_after is not None:
        credits_expire_after = _count(credits_expire_after, "credits_expire_after", 100 * 366 * 86400)
    now = ext.database.now()
    if expires_at is not None and (not isinstance(expires_at, datetime) or expires_at.tzinfo is None):
        raise BadCode("expires_at must be a timezone-aware datetime")
    if expires_at is not None and expires_at <= now:
        raise BadCode(f"expires_at {expires_at.isoformat()} is not in the future")
    if actor is not None and (not isinstance(actor, str) or len(actor) > 255):
        raise BadCode("actor must be text of at most 255 characters")
    c = ext.tables.codes
    # A generated code that collides (about one in 10**17) gets another; a chosen one is refused.
    for _ in range(1 if code is not None else 5):
        text = normalize(code) if code is not None else generate()
        try:
            ext.database.insert(
                sa.insert(c).values(
                    code=text,
                    credits=credits,
                    max_redemptions=max_redemptions,
                    redeemed=0,
                    per_user=per_user,
                    expires_at=expires_at,
                    credits_expire_after_seconds=credits_expire_after,
                    disabled=False,
                    actor=actor,
                    created_at=now,
                    updated_at=now,
                )
            )
        except sa.exc.IntegrityError:
            continue
        found = find(ext, text)
        assert found is not None
        return found
    raise BadCode(f"the code {text} exists already")


@unavailable_on_database_errors
def find(ext: FlaskCredits, code: str) -> CreditCode | None:
    """The code spelled ``code`` (any case), or None."""
    c = ext.tables.codes
    with ext.database.reader.connect() as conn:
        row = conn.execute(sa.select(c).where(c.c.code == normalize(code))).first()
    return None if row is None else _record(row)


@unavailable_on_database_errors
def all_codes(ext: FlaskCredits) -> list[CreditCode]:
    """Every code, newest first."""
    c = ext.tables.codes
    with ext.database.reader.connect() as conn:
        rows = conn.execute(sa.select(c).order_by(c.c.id.desc())).all()
    return [_record(row) for row in rows]


@unavailable_on_database_errors
def disable(ext: FlaskCredits, code: str) -> CreditCode:
    """Stop the code from being redeemed (redemptions already made stay). Idempotent;
    :class:`CodeNotFound` for an unknown code."""
    text = normalize(code)
    c = ext.tables.codes
    ext.database.write(
        sa.update(c).where(c.c.code == text).values(disabled=True, updated_at=ext.database.now())
    )
    found = find(ext, text)
    if found is None:
        raise CodeNotFound(text)
    return found


def _refusal(found: CreditCode, now: datetime) -> CodeRefused | None:
    """Why the code, as read, cannot be redeemed by anyone now (None: it can)."""
    if found.disabled:
        return CodeDisabled(found.code)
    if found.expires_at is not None and found.expires_at <= now:
        return CodeExpired(found.code)
    if found.redeemed >= found.max_redemptions:
        return CodeExhausted(found.code)
    return None


class _Taken(Exception):
    """The conditional UPDATE found the code no longer redeemable (raised to roll the grant back)."""


def redeem(ext: FlaskCredits, wallet: Wallet, code: object) -> Entry:
    """Grant the code's credits to ``wallet``, counting one redemption by its owner, in one
    transaction; or raise a :class:`CodeRefused` (or :class:`BadCode`) having changed nothing. Sends
    ``credits_redeemed`` (and ``credits_granted``)."""
    text = normalize(code)
    found = find(ext, text)
    if found is None:
        raise CodeNotFound(text)
    now = ext.database.now()
    refused = _refusal(found, now)
    if refused is not None:
        raise refused
    c, r = ext.tables.codes, ext.tables.code_redemptions
    take = (
        sa.update(c)
        .where(
            c.c.id == found.id,
            sa.not_(c.c.disabled),
            c.c.redeemed < c.c.max_redemptions,
            sa.or_(c.c.expires_at.is_(None), c.c.expires_at > now),
        )
        .values(redeemed=c.c.redeemed + 1, updated_at=now)
    )
    mine = sa.select(r.c.id).where(r.c.code_id == found.id, r.c.user_id == wallet.user_id)
    if ext.database.lock_rows:
        # A locking read, so that MariaDB's REPEATABLE READ reads the rows committed since this
        # transaction's snapshot (a redemption by the same owner into another of their wallets). Its
        # gap locks are taken only while this code's row is held, so redemptions of one code never
        # collide on them; one of a neighbouring code's may, rarely: Database.run retries the loser.
        mine = mine.with_for_update()

    def in_tx(conn: Connection, entry: Entry) -> None:
        if conn.execute(take).rowcount != 1:
            raise _Taken()
        if len(conn.execute(mine.limit(found.per_user)).all()) >= found.per_user:
            raise CodeAlreadyRedeemed(text)
        e = ext.tables.entries
        wallet_id = conn.execute(sa.select(e.c.wallet_id).where(e.c.id == entry.id)).scalar_one()
        conn.execute(
            sa.insert(r).values(
                code_id=found.id,
                user_id=wallet.user_id,
                wallet_id=wallet_id,
                entry_id=entry.id,
                created_at=now,
            )
        )

    expires_at = (
        None if found.credits_expire_after is None else now + timedelta(seconds=found.credits_expire_after)
    )
    try:
        entry = ext.ledger.grant(
            wallet,
            found.credits,
            reason=f"Redeemed code {text}",
            kind="grant",
            expires_at=expires_at,
            metadata={"code_id": found.id},
            in_tx=in_tx,
        )
    except _Taken:
        # Someone took the last redemption, or the code was disabled, since it was read: say which.
        again = find(ext, text)
        why = None if again is None else _refusal(again, ext.database.now())
        raise (why or CodeExhausted(text)) from None
    ext.emit(signals.credits_redeemed, wallet=wallet, amount=entry.amount, entry=entry, code=found)
    return entry
