"""One Stripe Customer per wallet owner (a user; an API key's wallet uses its user's), created on
first need and passed to every Checkout Session, and the Billing Portal session that manages it.

Creating the customer must give one customer, never two, whatever runs at once:

* The user's row in ``credits_customers`` is inserted first, with a random idempotency key; its unique
  ``user_id`` lets exactly one insert win, so every request of the user, in any process, reads the same
  key.
* Every attempt asks Stripe with that key: within Stripe's 24 hours the same key answers with the same
  customer, so concurrent first checkouts, and a retry after a crash between Stripe's answer and the
  row's update, all get one customer. A request that finds the key still in use at Stripe (409) waits a
  moment and reads the row again.
* The id is stored by a conditional UPDATE (only while the row has none) and read back, so the one that
  stuck is what every caller returns.

When Stripe may have saved a failure under the key (Stripe replays a 500 for 24 hours), or refuses it
because the parameters changed (the app's ``customer_details`` now says something else), the key is
replaced, so the next attempt can succeed; at worst that leaves an unused customer at Stripe, never
two ids for one user here.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .stripe_gateway import PaymentProviderError

if TYPE_CHECKING:
    from sqlalchemy.engine import Row

    from ..extension import FlaskCredits

log = logging.getLogger("flask_credits")

#: Pauses (seconds) between attempts while another request creates the user's customer with the same
#: key (Stripe answers 409 until it finished, usually well within a second).
CONFLICT_PAUSES = (0.25, 0.5, 1.0, 2.0)
#: Failures after which Stripe may have saved its answer under the key, or will refuse the key: the next
#: attempt needs a new one.
NEW_KEY_AFTER = ("stripe", "idempotency")


def stored(ext: FlaskCredits, user_id: str) -> str | None:
    """The user's Stripe Customer id, if one was created; never calls Stripe."""
    row = _row(ext, user_id)
    return None if row is None else row.stripe_customer_id


def customer_id(ext: FlaskCredits, user_id: str) -> str:
    """The user's Stripe Customer id, created at Stripe on first need (with the app's
    ``customer_details`` and ``metadata[userId]``). Raises :class:`PaymentProviderError` when Stripe
    fails; the user's row then keeps no id, only the key the next attempt sends again."""
    row = _row(ext, user_id) or _insert(ext, user_id)
    if row.stripe_customer_id:
        return str(row.stripe_customer_id)
    params = _params(ext, user_id)
    for pause in (*CONFLICT_PAUSES, None):
        try:
            customer = _create(ext, params, row.idempotency_key)
            break
        except PaymentProviderError as exc:
            if exc.kind in NEW_KEY_AFTER:
                _replace_key(ext, user_id, row.idempotency_key)
            if exc.kind != "conflict" or pause is None:
                raise
        time.sleep(pause)
        row = _row(ext, user_id) or row
        if row.stripe_customer_id:  # the request that held the key stored it meanwhile
            return str(row.stripe_customer_id)
    return _store(ext, user_id, str(customer["id"]))


def _params(ext: FlaskCredits, user_id: str) -> dict[str, Any]:
    params: dict[str, Any] = {"metadata": {"userId": user_id}}
    details = ext.customer_details_for(user_id)
    for field in ("email", "name"):
        value = details.get(field)
        if isinstance(value, str) and value.strip():
            params[field] = value.strip()
    return params


def _create(ext: FlaskCredits, params: dict[str, Any], key: str) -> dict[str, Any]:
    """Create the customer. If Stripe refuses the app's details (an email it does not take, say), the
    customer is created without them rather than leaving the user unable to pay, under a key of its own
    so that the refused request's key is not reused with other parameters."""
    try:
        return ext.gateway.create_customer(params, idempotency_key=key)
    except PaymentProviderError as exc:
        if exc.kind != "invalid_request" or params.keys() == {"metadata"}:
            raise
    log.warning(
        "Stripe refused the customer details of user %s: creating the customer without them",
        params["metadata"]["userId"],
    )
    return ext.gateway.create_customer({"metadata": params["metadata"]}, idempotency_key=key + "-bare")


def _store(ext: FlaskCredits, user_id: str, found: str) -> str:
    c = ext.tables.customers
    ext.database.write(
        sa.update(c)
        .where(c.c.user_id == user_id, c.c.stripe_customer_id.is_(None))
        .values(stripe_customer_id=found, updated_at=ext.database.now())
    )
    row = _row(ext, user_id)
    assert row is not None
    assert row.stripe_customer_id is not None
    if row.stripe_customer_id != found:
        # Only after the key was replaced (or Stripe forgot it after 24 hours): the other is unused.
        log.warning("user %s has Stripe customer %s; %s is not used", user_id, row.stripe_customer_id, found)
    return str(row.stripe_customer_id)


def _replace_key(ext: FlaskCredits, user_id: str, old: str) -> None:
    c = ext.tables.customers
    ext.database.write(
        sa.update(c)
        .where(c.c.user_id == user_id, c.c.idempotency_key == old, c.c.stripe_customer_id.is_(None))
        .values(idempotency_key=_new_key(), updated_at=ext.database.now())
    )


def _new_key() -> str:
    return "cus_" + secrets.token_hex(16)


def _insert(ext: FlaskCredits, user_id: str) -> Row[Any]:
    """Insert the user's row, or find the one another request inserted first."""
    now = ext.database.now()
    # A duplicate key means another request of this user inserted it first: use theirs.
    with contextlib.suppress(sa.exc.IntegrityError):
        ext.database.insert(
            sa.insert(ext.tables.customers).values(
                user_id=user_id, idempotency_key=_new_key(), created_at=now, updated_at=now
            )
        )
    row = _row(ext, user_id)
    assert row is not None
    return row


def _row(ext: FlaskCredits, user_id: str) -> Row[Any] | None:
    c = ext.tables.customers
    with ext.database.reader.connect() as conn:
        return conn.execute(sa.select(c).where(c.c.user_id == user_id)).first()


def portal_session(ext: FlaskCredits, user_id: str, *, return_url: str) -> dict[str, Any]:
    """A Billing Portal session for the user's customer (created first if the user has none: the
    portal is where they add a card or see that there are no invoices yet, and their first checkout
    would create the same customer anyway); returns ``{"id", "url"}``."""
    session = ext.gateway.create_portal_session(
        {"customer": customer_id(ext, user_id), "return_url": return_url}
    )
    return {"id": session["id"], "url": session["url"]}
