"""The admin console (``CREDITS_ADMIN = True``): its own blueprint under ``{CREDITS_URL_PREFIX}/admin``,
for the people ``@credits.admin_checker`` names. It finds wallets, shows one (balance, holds, debt,
lots, history, purchases, webhook events) and changes it only through the ledger: grants, deductions
and refunds, each recording the admin as its ``actor``. It also lists, makes and disables credit codes.
Every POST carries the host app's CSRF token (``credits/_csrf.html``). A wallet's forms carry a nonce
that becomes the idempotency key, so a double submit changes the wallet once; the code form carries a
new code, so a double submit makes one code."""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from typing import Any

from flask import Blueprint, abort, current_app, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue

from ..core.inputs import make_wallet
from ..errors import CreditsError, EntryNotFound, InsufficientCredits
from ..records import Wallet
from ..services import admin, codes
from . import charts, responses
from .blueprint import extension, read_body_within_limit

blueprint = Blueprint("credits_admin", __name__)
blueprint.url_value_preprocessor(read_body_within_limit)

#: Longest accepted form nonce (a token the page made: 22 characters).
_NONCE_LENGTH = 64


def admin_identity() -> str:
    """Who is asking, by ``admin_checker``: 401 (the login manager's answer) when nobody is logged in,
    403 when the checker says no."""
    ext = extension()
    if ext.current_wallet() is None:
        abort(current_app.make_response(responses.unauthorized()))
    identity = ext.admin_identity()
    if not identity:
        abort(403)
    return identity


@blueprint.before_request
def only_admins() -> None:
    admin_identity()


@blueprint.after_request
def not_cached(response: Any) -> Any:
    response.headers["Cache-Control"] = "no-store"
    return response


@blueprint.get("/")
def index() -> ResponseReturnValue:
    """Find wallets by user id or key id (``?q=``)."""
    query = request.args.get("q", "").strip()
    found = admin.find_wallets(extension(), query) if query else []
    return render_template("credits/admin/index.html", query=query, found=found)


def _wallet_arg(source: Any) -> Wallet:
    try:
        return make_wallet(source.get("user_id", ""), source.get("key_id") or None)
    except CreditsError as exc:
        abort(400, str(exc))


def _entry_id_arg(name: str) -> int | None:
    value = request.args.get(name, "")
    if value == "":
        return None
    if not value.isdigit() or len(value) > 19:
        abort(400, f"{name} must be an entry id")
    return int(value)


def _wallet_page(wallet: Wallet, *, error: str | None = None, status: int = 200) -> ResponseReturnValue:
    ext = extension()
    limit = ext.settings.history_page_size
    before, after = _entry_id_arg("before"), _entry_id_arg("after")
    try:
        entries = ext.ledger.history(wallet, limit=limit, before=before, after=after)
    except CreditsError as exc:
        abort(400, str(exc))
    purchases = admin.purchases_of(ext, wallet)
    refunded = {e.reverses_id for e in entries if e.reverses_id is not None}
    paged = before is not None or (after is not None and len(entries) == limit)
    page = render_template(
        "credits/admin/wallet.html",
        wallet=wallet,
        state=admin.wallet_state(ext, wallet),
        entries=entries,
        refunded=refunded,
        older=entries[-1].id if len(entries) == limit else None,
        newer=entries[0].id if entries and paged else None,
        purchases=purchases,
        events=admin.events(ext, purchase_ids=[int(p.id) for p in purchases]),
        usage=charts.last_days_usage(ext.ledger.db, wallet),
        dashboard_url=lambda stripe_id: admin.dashboard_url(ext, stripe_id),
        when=admin.when,
        nonce=secrets.token_urlsafe(16),
        done=request.args.get("done", type=int),
        error=error,
    )
    return page, status


@blueprint.get("/wallet")
def wallet() -> ResponseReturnValue:
    """One wallet (``?user_id=&key_id=``): state, history (``before``/``after`` an entry id),
    purchases and the webhook events about them, and the forms that change it."""
    return _wallet_page(_wallet_arg(request.args))


def _change(wallet: Wallet, kind: str) -> ResponseReturnValue:
    """Grant or deduct from the form: amount, reason and nonce all required; 400 (nothing changed)
    for any that cannot work."""
    ext = extension()
    actor = admin_identity()
    form = request.form
    amount_text, reason = form.get("amount", "").strip(), form.get("reason", "").strip()
    nonce = form.get("nonce", "")
    if not amount_text.isdigit() or len(amount_text) > 18 or int(amount_text) < 1:
        return _wallet_page(wallet, error="The amount must be a whole number of credits above 0.", status=400)
    if not reason:
        return _wallet_page(wallet, error="Say why: the reason is shown in the wallet's history.", status=400)
    if not nonce or len(nonce) > _NONCE_LENGTH or not nonce.replace("-", "").replace("_", "").isalnum():
        return _wallet_page(wallet, error="The form is stale: load the page again.", status=400)
    if not ext.wallet_exists(wallet.user_id, wallet.key_id):
        abort(404, f"no such wallet: {wallet}")
    change = ext.grant if kind == "grant" else ext.spend
    try:
        entry = change(
            wallet.user_id,
            int(amount_text),
            key_id=wallet.key_id,
            reason=reason,
            idempotency_key=f"admin-{nonce}",
            actor=actor,
        )
    except InsufficientCredits as exc:
        return _wallet_page(wallet, error=f"The wallet cannot pay that: {exc.description}", status=400)
    except CreditsError as exc:
        return _wallet_page(wallet, error=str(exc), status=400)
    return _back(wallet, entry.id)


def _back(wallet: Wallet, entry_id: int) -> ResponseReturnValue:
    return redirect(
        url_for(".wallet", user_id=wallet.user_id, key_id=wallet.key_id or None, done=entry_id), 303
    )


@blueprint.post("/wallet/grant")
def grant() -> ResponseReturnValue:
    return _change(_wallet_arg(request.form), "grant")


@blueprint.post("/wallet/deduct")
def deduct() -> ResponseReturnValue:
    return _change(_wallet_arg(request.form), "deduct")


@blueprint.post("/wallet/refund")
def refund() -> ResponseReturnValue:
    """Return a spend's credits (the ledger refunds a spend at most once)."""
    wallet = _wallet_arg(request.form)
    actor = admin_identity()
    entry_id, reason = request.form.get("entry_id", ""), request.form.get("reason", "").strip()
    if not entry_id.isdigit() or len(entry_id) > 19:
        return _wallet_page(wallet, error="Choose a spend to refund.", status=400)
    if not reason:
        return _wallet_page(wallet, error="Say why: the reason is shown in the wallet's history.", status=400)
    try:
        entry = extension().refund(
            wallet.user_id, int(entry_id), key_id=wallet.key_id, reason=reason, actor=actor
        )
    except EntryNotFound:
        abort(404, f"no entry {entry_id} in the wallet of {wallet}")
    except CreditsError as exc:
        return _wallet_page(wallet, error=str(exc), status=400)
    return _back(wallet, entry.id)


@blueprint.get("/events")
def events() -> ResponseReturnValue:
    """The Stripe webhook events received, newest first (``?page=``)."""
    page = request.args.get("page", "1")
    if not page.isdigit() or not 1 <= int(page) <= 100_000:
        abort(400, "page must be a whole number from 1")
    ext = extension()
    found = admin.events(ext, page=int(page))
    return render_template(
        "credits/admin/events.html",
        events=found,
        page=int(page),
        more=len(found) == admin.PAGE,
        dashboard_url=lambda stripe_id: admin.dashboard_url(ext, stripe_id),
        when=admin.when,
    )


@blueprint.get("/audit")
def audit() -> ResponseReturnValue:
    """The result of ``credits.audit()``: every wallet checked against its entries and lots."""
    return render_template("credits/admin/audit.html", problems=extension().audit())


def _codes_page(*, error: str | None = None, form: Any = None, status: int = 200) -> ResponseReturnValue:
    page = render_template(
        "credits/admin/codes.html",
        codes=extension().credit_codes(),
        # A new code in the form: submitting the same form twice is refused the second time
        # (codes are unique), so a double click makes one code.
        form=form or {"code": codes.generate(), "per_user": "1"},
        when=admin.when,
        error=error,
        # After a change, which code it was (the redirect says it; the page only echoes it, escaped).
        created=request.args.get("created", "")[: codes.MAX_LENGTH],
        disabled=request.args.get("disabled", "")[: codes.MAX_LENGTH],
    )
    return page, status


def _whole(text: str, name: str, maximum: int) -> int:
    if not text.isdigit() or len(text) > len(str(maximum)) or not 1 <= int(text) <= maximum:
        raise codes.BadCode(f"{name} must be a whole number from 1 to {maximum}")
    return int(text)


def _expiry(text: str) -> datetime | None:
    """An ISO 8601 time (``datetime-local`` inputs send ``2026-12-31T23:59``), UTC without a zone."""
    if not text:
        return None
    try:
        if len(text) > 40:
            raise ValueError(text)
        when = datetime.fromisoformat(text)
    except ValueError:
        raise codes.BadCode(f"expires must be an ISO 8601 date or time, not {text[:40]!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


@blueprint.get("/codes")
def codes_list() -> ResponseReturnValue:
    """Every credit code, newest first, and the form that makes one."""
    return _codes_page()


@blueprint.post("/codes")
def create_code() -> ResponseReturnValue:
    """Make a code from the form (credits, max_redemptions, per_user, expires, code), the admin as its
    actor; 400 (nothing made) for values that cannot work or a code that exists already."""
    actor = admin_identity()
    form = request.form
    fields = {
        k: form.get(k, "").strip() for k in ("credits", "max_redemptions", "per_user", "expires", "code")
    }
    try:
        made = extension().create_code(
            credits=_whole(fields["credits"], "credits", codes.MAX_CREDITS),
            max_redemptions=_whole(fields["max_redemptions"], "max_redemptions", codes.MAX_COUNT),
            per_user=_whole(fields["per_user"] or "1", "per_user", codes.MAX_COUNT),
            expires_at=_expiry(fields["expires"]),
            code=fields["code"] or None,
            actor=actor,
        )
    except CreditsError as exc:
        return _codes_page(error=str(exc), form=fields, status=400)
    return redirect(url_for(".codes_list", created=made.code), 303)


@blueprint.post("/codes/disable")
def disable_code() -> ResponseReturnValue:
    """Stop a code from being redeemed (redemptions made stay)."""
    admin_identity()
    try:
        found = extension().disable_code(request.form.get("code", ""))
    except codes.CodeNotFound as exc:
        abort(404, f"no code {exc.code}")
    except CreditsError as exc:
        return _codes_page(error=str(exc), status=400)
    return redirect(url_for(".codes_list", disabled=found.code), 303)
