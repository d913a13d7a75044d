"""The ``credits`` blueprint: the credits page and its JSON twins."""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    jsonify,
    redirect,
    render_template,
    request,
    stream_with_context,
)
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import SQLAlchemyError

from ..core.inputs import make_wallet
from ..errors import CreditsUnavailable, IdempotencyConflict, InsufficientCredits, InvalidArgument
from ..records import FULFILLABLE
from ..services import auto_top_up, codes, customers, plans, purchases, webhooks
from ..services.stripe_gateway import PaymentProviderError, WebhookError
from . import bodies, charts, exports, responses, throttle, urls
from .responses import UNAVAILABLE, wants_json

if TYPE_CHECKING:
    from ..extension import FlaskCredits
    from ..records import AutoTopUp, Entry, Purchase, Wallet

#: The package folder: the blueprint's templates and static files live there, where apps expect them.
PACKAGE = Path(__file__).resolve().parent.parent

blueprint = Blueprint(
    "credits",
    __name__,
    root_path=str(PACKAGE),
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)


def extension() -> FlaskCredits:
    return cast("FlaskCredits", current_app.extensions["credits"])


def current_wallet_or_401() -> Wallet:
    wallet = extension().current_wallet()
    if wallet is None:
        abort(current_app.make_response(responses.unauthorized()))
    return wallet


def _page_args() -> tuple[int, int | None]:
    size = extension().settings.history_page_size
    try:
        limit = int(request.args.get("limit", size))
        before = request.args.get("before", type=str)
        return limit, None if before in (None, "") else int(before)
    except ValueError:
        abort(400, "limit and before must be whole numbers")


for _error_class in UNAVAILABLE:
    blueprint.register_error_handler(_error_class, responses.database_unavailable)


def _is_webhook() -> bool:
    return request.endpoint == responses.WEBHOOK_ENDPOINT


def body_limit() -> int:
    """The largest body the current route of the blueprint reads: ``CREDITS_WEBHOOK_MAX_BYTES`` on the
    webhook, ``CREDITS_MAX_CONTENT_LENGTH`` elsewhere, and never more than the app's
    ``MAX_CONTENT_LENGTH``."""
    settings = extension().settings
    own = settings.webhook_max_bytes if _is_webhook() else settings.max_content_length
    app_limit = current_app.config["MAX_CONTENT_LENGTH"]
    return own if app_limit is None else min(own, int(app_limit))


# A URL value preprocessor, not before_request, because every URL value preprocessor runs before
# every before_request function of the app: a host's hook that reads the body (Flask-WTF's
# CSRFProtect reads request.form) would otherwise read it first, without our limit.
@blueprint.url_value_preprocessor
def read_body_within_limit(endpoint: str | None, values: dict[str, Any] | None) -> None:
    """Read every body the blueprint gets whole, within :func:`body_limit` (413 beyond it)."""
    bodies.read_body(body_limit())


@blueprint.get("/")
def index() -> ResponseReturnValue:
    """The credits page: balance, the wallet's plan or the plans to subscribe to (when
    ``CREDITS_PLANS`` is set), the purchase forms and the history (keyset-paginated). ``?key_id=``
    naming one of the user's API keys selects it in the forms' "For" (a link such as "Buy credits
    for it"); any other value is ignored."""
    wallet = current_wallet_or_401()
    limit, before = _page_args()
    try:
        after = request.args.get("after", type=str)
        after_id = None if after in (None, "") else int(after)
    except ValueError:
        abort(400, "after must be a whole number")
    try:
        entries = extension().ledger.history(wallet, limit=limit, before=before, after=after_id)
    except InvalidArgument as exc:
        abort(400, str(exc))
    # Whether a page lies beyond each end: one indexed row each way, so no link leads to an empty page.
    older = bool(entries) and bool(extension().ledger.history(wallet, limit=1, before=entries[-1].id))
    newer = bool(entries) and bool(extension().ledger.history(wallet, limit=1, after=entries[0].id))
    return _page(
        wallet,
        entries,
        next_before=entries[-1].id if older else None,
        newer_after=entries[0].id if newer else None,
        # Not the newest page: a link back to it (also from a page past either end, which is empty).
        newest_link=newer or (not entries and (before is not None or after_id is not None)),
        for_key=request.args.get("key_id", type=str),
    )


def _page(
    wallet: Wallet,
    entries: list[Any],
    *,
    next_before: int | None,
    newer_after: int | None = None,
    newest_link: bool = False,
    error: str | None = None,
    submitted: dict[str, Any] | None = None,
    message: str | None = None,
    for_key: str | None = None,
) -> str:
    ext = extension()
    keys, keys_held = [], {}
    for key_id, label in ext.api_keys(wallet.user_id) if wallet.key_id is None else []:
        key_balance, keys_held[key_id] = _balance_and_held(make_wallet(wallet.user_id, key_id))
        keys.append((key_id, label, key_balance))
    # Only a key listed here can be preselected: another user's, or a made-up id, leaves "my account".
    if not submitted and for_key is not None and any(k == for_key for k, _, _ in keys):
        submitted = {"key_id": for_key}
    balance, held = _balance_and_held(wallet)
    # Spent in the last 30 UTC days, per day (every day charted, 0 without spends) and per endpoint.
    spent = charts.last_days_usage(ext.ledger.db, wallet)
    # No plans, no query: the page of an app that sells only packs is as before plans.
    subscription = plans.current(ext, wallet) if ext.settings.plans else None
    # Each key's live subscription, and the wallets that may subscribe now: (key id or "", name).
    key_subscriptions = (
        {k: plans.current(ext, make_wallet(wallet.user_id, k)) for k, _, _ in keys}
        if (ext.settings.plans)
        else {}
    )
    plan_targets = (
        [] if subscription else [(wallet.key_id or "", "my account" if wallet.key_id is None else "")]
    )
    plan_targets += [(k, f"API key {label}") for k, label, _ in keys if key_subscriptions.get(k) is None]
    # (wallet, key label or None, its auto top-up or None) for the wallet and each of its keys; none
    # while CREDITS_AUTO_TOP_UP turns the feature off.
    auto_top_ups: list[tuple[Wallet, str | None, AutoTopUp | None]] = []
    if ext.settings.auto_top_up:
        named: list[tuple[Wallet, str | None]] = [(wallet, None)]
        named += [(make_wallet(wallet.user_id, k), label) for k, label, _ in keys]
        auto_top_ups = [(w, label, auto_top_up.get(ext, w)) for w, label in named]
    # Checkouts not finished (open or waiting for a delayed payment) of the wallet and its keys.
    pending = purchases.pending(ext, wallet.user_id, [wallet.key_id, *(k for k, _, _ in keys)])
    move_from, move_to = _move_choices(wallet, balance, keys) if wallet.key_id is None else ([], [])
    return render_template(
        "credits/index.html",
        wallet=wallet,
        plans=ext.settings.plans,
        # The wallet's live subscription (None before its checkout completes) and its plan, which is
        # None when the plan was since removed from CREDITS_PLANS.
        subscription=subscription,
        subscription_plan=ext.settings.plan(subscription.plan) if subscription else None,
        key_subscriptions=key_subscriptions,
        plans_by_id={p.id: p for p in ext.settings.plans},
        plan_targets=plan_targets,
        # The user's Stripe Customer (None before their first checkout): "Manage billing" then.
        customer_id=customers.stored(ext, wallet.user_id) if wallet.key_id is None else None,
        balance=balance,
        held=held,
        # (key id, label, balance) as before holds, so that templates apps overrode still unpack it;
        # what each key's holds reserve comes beside it.
        keys=keys,
        keys_held=keys_held,
        auto_top_ups=auto_top_ups,
        pending=pending,
        # "Move credits": (key id or "", name, balance) it may move from, (key id or "", name) to, and
        # the form's idempotency key, new on each render, so that a double submit moves once.
        move_from=move_from,
        move_to=move_to,
        move_token=secrets.token_urlsafe(16),
        # The simulated Stripe's switches for the next automatic payment are offered beside the card.
        simulated=ext.settings.stripe_mode == "simulated",
        entries=entries,
        next_before=next_before,
        # The "Newer entries" link's ?after=, and whether to link to the newest page.
        newer_after=newer_after,
        newest_link=newest_link,
        usage_chart=spent.chart,
        usage_days=spent.days,
        usage_endpoints=spent.endpoints,
        error=error,
        message=message,
        submitted=submitted or {},
    )


def _move_choices(
    wallet: Wallet, balance: int, keys: list[tuple[str, str, int]]
) -> tuple[list[tuple[str, str, int]], list[tuple[str, str]]]:
    """Where the account's "Move credits" form may move from and to (empty when there is only one
    wallet): the account (holding ``balance``) and its live keys, and as a source also each key no
    longer live whose wallet still holds credits."""
    ext = extension()
    ledger = ext.ledger
    live = [(k, f"API key {label}", b) for k, label, b in keys]
    listed = {k for k, _, _ in keys}
    stranded = []
    for key_id in ledger.key_wallets_holding_credits(wallet.user_id):
        if key_id in listed:
            continue
        key_wallet = make_wallet(wallet.user_id, key_id)
        if ext.owns_key(wallet.user_id, key_id):  # an app with a wallet_checker and no keys_loader
            live.append((key_id, f"API key {key_id}", ledger.balance(key_wallet)))
        elif left := ledger.balance(key_wallet):
            stranded.append((key_id, f"revoked API key {key_id}", left))
    if not live and not stranded:
        return [], []
    sources = [("", "my account", balance), *live, *stranded]
    return sources, [(k, name) for k, name, _ in sources[: len(live) + 1]]


def _balance_and_held(wallet: Wallet) -> tuple[int, int]:
    """What the wallet can spend now, and what its live holds reserve."""
    ledger = extension().ledger
    # Balance first: it expires what is due (holds included), so the held credits read next are live.
    return ledger.balance(wallet), ledger.held(wallet)


@blueprint.get("/balance")
def balance() -> ResponseReturnValue:
    """``{"user_id", "key_id", "balance", "held"}`` for the current wallet: ``balance`` is what it can
    spend now, ``held`` what running requests have reserved (not included in ``balance``)."""
    wallet = current_wallet_or_401()
    spendable, held = _balance_and_held(wallet)
    return jsonify(user_id=wallet.user_id, key_id=wallet.key_id, balance=spendable, held=held)


@blueprint.get("/transactions")
def transactions() -> ResponseReturnValue:
    """``{"transactions": [...], "next_before": id | null}``, newest first; pass ``next_before`` back
    as ``?before=`` for the next page."""
    wallet = current_wallet_or_401()
    limit, before = _page_args()
    try:
        entries = extension().ledger.history(wallet, limit=limit, before=before)
    except InvalidArgument as exc:
        abort(400, str(exc))
    return jsonify(
        transactions=[e.to_dict() for e in entries],
        next_before=entries[-1].id if len(entries) == limit else None,
    )


@blueprint.get("/transactions.csv")
def transactions_csv() -> ResponseReturnValue:
    """The wallet's whole history as CSV, oldest first, streamed (read 500 entries at a time, never
    whole): id, created_at (ISO 8601, UTC), kind, amount, balance_after, reason, endpoint, actor.
    ``key_id`` names one of the user's API keys. Text cells that a spreadsheet would run as a
    formula get a leading ``'``."""
    wallet = requested_wallet(request.args.to_dict())
    if wallet is None:
        return _error(400, "bad_request", "unknown API key")
    lines = exports.csv_lines(extension().ledger.db, wallet)
    return Response(
        stream_with_context(lines),
        mimetype="text/csv",
        headers={
            "Content-Disposition": f'attachment; filename="{exports.filename(wallet)}"',
            "Cache-Control": "no-store",
        },
    )


def _checkout_data() -> dict[str, Any]:
    if request.is_json:
        try:
            data = request.get_json(silent=True)
        except RecursionError:  # absurdly deep nesting: not a checkout request
            data = None
        if not isinstance(data, dict):
            abort(400, "the body must be a JSON object")
        return data
    return request.form.to_dict()


def _error(
    status: int,
    code: str,
    message: str,
    submitted: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> ResponseReturnValue:
    headers = headers or {}
    if wants_json():
        return jsonify(error=code, message=message), status, headers
    wallet = current_wallet_or_401()
    entries = extension().ledger.history(wallet, limit=extension().settings.history_page_size)
    return _page(wallet, entries, next_before=None, error=message, submitted=submitted), status, headers


@blueprint.post("/checkout")
def checkout() -> ResponseReturnValue:
    """Start a Stripe Checkout for ``pack`` or ``quantity``: a browser form gets a 303 redirect to
    Stripe, a JSON client gets ``{"id", "url"}``. A form may name one of the user's API keys in
    ``key_id`` to buy credits for that key's wallet. A wallet with ``CREDITS_MAX_OPEN_PURCHASES``
    unfinished checkouts gets 429 ``too_many_open_checkouts`` with ``Retry-After``."""
    ext = extension()
    data = _checkout_data()
    wallet = requested_wallet(data)
    if wallet is None:
        return _error(400, "bad_request", "unknown API key", data)
    try:
        offer = purchases.offer_for(ext.settings, data)
    except purchases.BadCheckout as exc:
        return _error(400, "bad_request", str(exc), data)
    try:
        session = purchases.start_checkout(
            ext,
            wallet,
            offer,
            success_url=urls.external_url("credits.success"),
            cancel_url=urls.external_url("credits.cancel"),
        )
    except purchases.TooManyOpenCheckouts as exc:
        headers = {"Retry-After": str(exc.retry_after)}
        return _error(429, "too_many_open_checkouts", str(exc), data, headers)
    except PaymentProviderError as exc:
        return _error(502, "payment_provider_error", exc.user_message, data)
    if wants_json():
        return jsonify(id=session["id"], url=session["url"])
    return redirect(session["url"], 303)


def requested_wallet(data: dict[str, Any]) -> Wallet | None:
    """The wallet a checkout, subscribe or auto top-up request (or the simulated card setup page) is
    for: the current one, or one of the user's API keys named in ``key_id`` (None for a key that is not
    the user's)."""
    ext = extension()
    wallet = current_wallet_or_401()
    key_id = data.get("key_id")
    if key_id not in (None, "") and wallet.key_id is None:
        if not isinstance(key_id, str) or not ext.owns_key(wallet.user_id, key_id):
            return None
        wallet = make_wallet(wallet.user_id, key_id)
    return wallet


@blueprint.post("/subscribe")
def subscribe() -> ResponseReturnValue:
    """Subscribe to ``plan`` (one of ``CREDITS_PLANS``) through a Stripe Checkout Session in
    subscription mode: a browser form gets a 303 redirect to Stripe, a JSON client ``{"id", "url"}``.
    ``key_id`` names one of the user's API keys, as for checkout. A wallet with a live subscription
    gets 409 ``already_subscribed``; a browser is sent on to the billing portal (``credits.portal``,
    where plans are changed) with a 307, which repeats the POST there (a 303 would turn it into a GET,
    which the portal route does not answer)."""
    ext = extension()
    data = _checkout_data()
    wallet = requested_wallet(data)
    if wallet is None:
        return _error(400, "bad_request", "unknown API key", data)
    try:
        plan = plans.plan_for(ext.settings, data)
    except plans.BadPlan as exc:
        return _error(400, "bad_request", str(exc), data)
    page = urls.external_url("credits.index")
    try:
        session = plans.start_subscription(ext, wallet, plan, success_url=page, cancel_url=page)
    except plans.AlreadySubscribed as exc:
        if not wants_json() and "credits.portal" in current_app.view_functions:
            return redirect(urls.external_url("credits.portal"), 307)
        return _error(409, "already_subscribed", str(exc), data)
    except PaymentProviderError as exc:
        return _error(502, "payment_provider_error", exc.user_message, data)
    if wants_json():
        return jsonify(id=session["id"], url=session["url"])
    return redirect(session["url"], 303)


@blueprint.post("/portal")
def portal() -> ResponseReturnValue:
    """Send the user to Stripe's Billing Portal for their Stripe Customer (cards, receipts, invoices,
    plans), which links back to the credits page: a browser form gets a 303 redirect, a JSON client
    ``{"url"}``. A user without a customer yet gets one first. The portal manages the account, so a
    request made with an API key's wallet is refused (403)."""
    ext = extension()
    wallet = current_wallet_or_401()
    if wallet.key_id is not None:
        return _error(403, "forbidden", "Billing is managed by the account, not with an API key.")
    try:
        session = customers.portal_session(ext, wallet.user_id, return_url=urls.external_url("credits.index"))
    except PaymentProviderError as exc:
        # Refused requests here almost always mean the portal is not set up in the Stripe Dashboard.
        message = exc.user_message
        if exc.kind == "invalid_request":
            message = "Billing management is not available on this site yet."
        return _error(502, "payment_provider_error", message)
    if wants_json():
        return jsonify(url=session["url"])
    return redirect(session["url"], 303)


@blueprint.post("/redeem")
def redeem() -> ResponseReturnValue:
    """Redeem a credit code (``code``, from a form or JSON) into the current wallet, or into one of the
    user's API keys' named in ``key_id`` (as for checkout). A JSON client gets ``{"entry", "balance"}``,
    a browser the credits page saying what was added. Refused, nothing is granted: 400
    ``bad_request`` (not a code), 404 ``code_not_found``, 410 ``code_expired`` or ``code_disabled``,
    409 ``code_exhausted`` or ``code_already_redeemed``; and 429 ``too_many_attempts`` with
    ``Retry-After`` past ``CREDITS_REDEEM_RATE_LIMIT`` attempts by the user."""
    ext = extension()
    data = _checkout_data()
    wallet = requested_wallet(data)
    if wallet is None:
        return _error(400, "bad_request", "unknown API key", data)
    wait = throttle.redeem_attempt(ext.settings, wallet.user_id)
    if wait is not None:
        message = "Too many attempts at redeeming a code. Please wait a little and try again."
        return _error(429, "too_many_attempts", message, data, {"Retry-After": str(wait)})
    try:
        entry = codes.redeem(ext, wallet, data.get("code"))
    except codes.BadCode as exc:
        return _error(400, "bad_request", str(exc), data)
    except codes.CodeRefused as exc:
        return _error(exc.status, exc.error, str(exc), data)
    if wants_json():
        return jsonify(entry=entry.to_dict(), balance=ext.ledger.balance(wallet))
    # The page of the request's wallet (the account's, when the code went to one of its API keys).
    page_wallet = current_wallet_or_401()
    entries = ext.ledger.history(page_wallet, limit=ext.settings.history_page_size)
    where = "" if wallet == page_wallet else f" to {credits_wallet_name(wallet)}"
    added = f"Code redeemed: {entry.amount} credits added{where}."
    return _page(page_wallet, entries, next_before=None, message=added)


@blueprint.post("/transfer")
def transfer() -> ResponseReturnValue:
    """Move ``amount`` credits between two of the user's wallets: ``from_key_id`` and ``to_key_id``
    name one of the user's API keys, or the account when empty (or JSON ``null``); ``from_key_id``
    may also name a revoked key whose wallet still holds credits (the only way they move on). The
    credits page's form sends a random ``idempotency_key`` rendered into it, so a double submit moves
    once. A JSON client gets ``{"from": entry, "to": entry}`` (the two ``transfer`` entries), a
    browser goes back to the credits page with a flashed message (303). Refused, nothing moves: 400
    ``bad_request`` (amount, the same wallet twice), 402 (the source cannot pay: credits reserved by
    running requests cannot move), 403 ``forbidden`` (a request made with an API key), 404
    ``not_found`` (a wallet that is not the user's), 409 ``idempotency_conflict``."""
    ext = extension()
    data = _checkout_data()
    wallet = current_wallet_or_401()
    if wallet.key_id is not None:
        return _error(403, "forbidden", "Credits are moved by the account, not with an API key.")
    source = _own_wallet(wallet.user_id, data.get("from_key_id"), stranded=True)
    target = _own_wallet(wallet.user_id, data.get("to_key_id"))
    if source is None or target is None:
        return _error(404, "not_found", "No such wallet among yours.", data)
    amount: Any = data.get("amount")
    if isinstance(amount, str) and amount.strip().isdecimal() and len(amount.strip()) <= 16:
        amount = int(amount.strip())
    if source == target:
        return _error(400, "bad_request", "Choose two different wallets to move credits between.", data)
    key = data.get("idempotency_key") or None
    if key is not None and (not isinstance(key, str) or not IDEMPOTENCY_KEY.fullmatch(key)):
        return _error(
            400, "bad_request", "idempotency_key must be 1 to 255 letters, digits, '_', '-', '.' or ':'", data
        )
    # Each history row names the other wallet beside this (credits_entry_detail).
    reason = "moved on the credits page"
    try:
        entry = ext.transfer(source, target, amount, reason=reason, idempotency_key=key)
    except InsufficientCredits as exc:
        if wants_json():
            return responses.render(exc)
        name = credits_wallet_name(source).capitalize()
        message = f"{name} has {exc.balance} credits to move, not {exc.required}."
        return _error(402, "insufficient_credits", message, data)
    except IdempotencyConflict as exc:
        return _error(409, "idempotency_conflict", str(exc), data)
    except InvalidArgument as exc:
        return _error(400, "bad_request", str(exc), data)
    if wants_json():
        # The target's entry is read only for a JSON client: a browser's answer names no entry.
        to_entry = ext.ledger.entry(target, int(entry.metadata["to"]["entry_id"])) if entry.metadata else None
        return jsonify(
            {
                "from": entry.to_dict(),
                "to": None if to_entry is None else to_entry.to_dict(),
                "replayed": entry.replayed,
            }
        )
    done = "Already moved" if entry.replayed else "Moved"
    where = f"from {credits_wallet_name(source)} to {credits_wallet_name(target)}"
    flash(f"{done} {-entry.amount} credits {where}.", "info")
    return redirect(urls.external_url("credits.index"), 303)


#: What ``POST /credits/transfer`` takes as an idempotency key (the form sends ``move-`` and a random
#: token): nothing a database could choke on (PostgreSQL refuses a NUL byte in text).
IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_.:-]{1,255}")


def _own_wallet(user_id: str, key_id: object, *, stranded: bool = False) -> Wallet | None:
    """The user's account (``key_id`` empty) or the wallet of one of their live API keys; with
    ``stranded``, also a key wallet of theirs that still holds credits though its key is no longer
    live (revoked). None for anything else."""
    if key_id in (None, ""):
        return make_wallet(user_id)
    if not isinstance(key_id, str):
        return None
    ext = extension()
    if ext.owns_key(user_id, key_id):
        return make_wallet(user_id, key_id)
    if stranded and key_id in ext.ledger.key_wallets_holding_credits(user_id):
        return make_wallet(user_id, key_id)
    return None


# -- auto top-up -----------------------------------------------------------------------------------------

#: Currencies without minor units (Stripe's zero-decimal currencies): their amounts are whole units.
ZERO_DECIMAL = frozenset(
    [
        "bif",
        "clp",
        "djf",
        "gnf",
        "jpy",
        "kmf",
        "krw",
        "mga",
        "pyg",
        "rwf",
        "ugx",
        "vnd",
        "vuv",
        "xaf",
        "xof",
        "xpf",
    ]
)


def _minor_units(text: object, currency: str) -> object:
    """A form's amount in major units ("50", "50.00") as minor units; anything else as it came."""
    if not isinstance(text, str):
        return text
    value = text.strip()
    exponent = 0 if currency in ZERO_DECIMAL else 2
    whole, _, fraction = value.partition(".")
    if not whole.isdecimal() or len(whole) > 12 or (fraction and not fraction.isdecimal()):
        return value
    if len(fraction) > exponent:
        return value
    return int(whole) * 10**exponent + int((fraction or "0").ljust(exponent, "0") or 0)


@blueprint.get("/auto-top-up")
def auto_top_up_settings() -> ResponseReturnValue:
    """The wallet's auto top-up as JSON (``key_id`` names one of the user's API keys): its settings,
    the saved card and why it was turned off, or ``{"auto_top_up": null}``."""
    wallet = requested_wallet(request.args.to_dict())
    if wallet is None:
        return _error(400, "bad_request", "unknown API key")
    found = auto_top_up.get(extension(), wallet)
    return jsonify(auto_top_up=None if found is None else found.to_dict())


@blueprint.post("/auto-top-up")
def set_auto_top_up() -> ResponseReturnValue:
    """Change the wallet's auto top-up: ``enabled``, ``threshold`` (credits), ``pack`` or ``quantity``,
    and ``monthly_cap`` (minor units; a form may send ``monthly_cap_amount`` in major units, "50.00").
    400 for settings that cannot work, 409 ``card_required`` to turn it on without a saved card. A
    browser form goes back to the credits page (303), a JSON client gets the settings."""
    ext = extension()
    data = _checkout_data()
    wallet = requested_wallet(data)
    if wallet is None:
        return _error(400, "bad_request", "unknown API key", data)
    enabled = data.get("enabled", False)
    if not request.is_json:
        enabled = str(enabled).lower() in ("1", "true", "on", "yes")
    cap = data.get("monthly_cap")
    if cap in (None, "") and "monthly_cap_amount" in data:
        # The cap is in the currency of what it buys: the pack's own, else CREDITS_CURRENCY.
        pack = ext.settings.pack(str(data.get("pack") or ""))
        currency = pack.currency if pack is not None else ext.settings.currency
        cap = _minor_units(data.get("monthly_cap_amount"), currency)
    try:
        found = auto_top_up.configure(
            ext,
            wallet,
            enabled=enabled,
            threshold=data.get("threshold"),
            monthly_cap=cap,
            pack=data.get("pack") or None,
            quantity=data.get("quantity") or None,
        )
    except auto_top_up.BadAutoTopUp as exc:
        return _error(400, "bad_request", str(exc), data)
    except auto_top_up.CardRequired as exc:
        return _error(409, "card_required", str(exc), data)
    if wants_json():
        return jsonify(auto_top_up=found.to_dict())
    return redirect(urls.external_url("credits.index"), 303)


@blueprint.post("/auto-top-up/card")
def auto_top_up_card() -> ResponseReturnValue:
    """Save a card for the wallet's auto top-up through a Stripe Checkout Session in ``setup`` mode
    (``key_id`` as for checkout): a browser form gets a 303 redirect to Stripe, a JSON client
    ``{"id", "url"}``. Stripe's ``checkout.session.completed`` keeps the card."""
    ext = extension()
    data = _checkout_data()
    wallet = requested_wallet(data)
    if wallet is None:
        return _error(400, "bad_request", "unknown API key", data)
    page = urls.external_url("credits.index")
    try:
        session = auto_top_up.start_card_setup(ext, wallet, success_url=page, cancel_url=page)
    except PaymentProviderError as exc:
        return _error(502, "payment_provider_error", exc.user_message, data)
    if wants_json():
        return jsonify(id=session["id"], url=session["url"])
    return redirect(session["url"], 303)


@blueprint.post("/stripe-webhook")
def stripe_webhook() -> ResponseReturnValue:
    """Stripe's webhook endpoint: no login, no CSRF; the signature is the authentication."""
    # Read already, within CREDITS_WEBHOOK_MAX_BYTES, by read_body_within_limit.
    payload = request.get_data()
    try:
        answer = webhooks.process(extension(), payload, request.headers.get("Stripe-Signature"))
    except WebhookError as exc:
        return jsonify(error="bad_request", message=str(exc)), 400
    except PaymentProviderError as exc:
        return jsonify(error="payment_provider_error", message=exc.user_message), 502
    except (SQLAlchemyError, CreditsUnavailable):
        current_app.logger.exception("Stripe webhook failed; Stripe will retry it")
        return jsonify(error="temporarily_unavailable", message="try again later"), 503
    return jsonify(answer)


def own_purchase(session_id: str | None) -> Purchase:
    """The current user's purchase with this Checkout Session id, or 400/401/404."""
    wallet = current_wallet_or_401()
    if not session_id or len(session_id) > 255:
        abort(400, "session_id is missing or too long")
    if not session_id.replace("_", "").isalnum() or not session_id.isascii():
        abort(404)  # no Checkout Session id looks like this (and a NUL byte would upset PostgreSQL)
    purchase = purchases.find(extension(), session_id=session_id)
    if purchase is None or purchase.wallet.user_id != wallet.user_id:
        abort(404)
    return purchase


@blueprint.get("/success")
def success() -> ResponseReturnValue:
    """Where Stripe sends the customer back: fulfils at once (the webhook may be late), idempotently,
    from the session fetched afresh from Stripe, then shows what happened. Stripe is asked at most
    once per purchase per ``CREDITS_SUCCESS_CHECK_INTERVAL``; loads in between show the purchase as
    stored."""
    ext = extension()
    purchase = own_purchase(request.args.get("session_id"))
    problem = None
    if purchase.status in FULFILLABLE and purchases.claim_stripe_check(ext, purchase.id):
        try:
            assert purchase.session_id is not None
            purchases.fulfil(ext, ext.gateway.retrieve_checkout_session(purchase.session_id))
        except PaymentProviderError as exc:
            problem = exc.user_message
        found = purchases.find(ext, id=purchase.id)
        assert found is not None
        purchase = found
    if wants_json():
        return jsonify(purchase=purchase.to_dict(), balance=ext.ledger.balance(purchase.wallet))
    return render_template(
        "credits/result.html",
        purchase=purchase,
        balance=ext.ledger.balance(purchase.wallet),
        problem=problem,
    )


@blueprint.get("/cancel")
def cancel() -> ResponseReturnValue:
    """Where Stripe sends a customer who gave up: nothing was charged. ``?attempt=`` names the
    checkout (the cancel URL it was created with carries it); the owner's open checkout is expired at
    Stripe so it no longer counts against ``CREDITS_MAX_OPEN_PURCHASES``."""
    wallet = current_wallet_or_401()
    attempt = request.args.get("attempt")
    purchase = purchases.cancel(extension(), wallet.user_id, attempt) if attempt else None
    if wants_json():
        return jsonify(status="cancelled", purchase=purchase.to_dict() if purchase else None)
    return render_template("credits/cancel.html")


@blueprint.get("/resume")
def resume() -> ResponseReturnValue:
    """Back to the Checkout of the user's own open purchase named by ``?attempt=`` (its "Resume" link
    on the credits page): a 303 to the session's url, which Stripe is asked for once, on this click
    only; a JSON client gets ``{"url"}``. A checkout no longer open is 409 ``checkout_not_open`` (a
    browser gets the credits page saying so); an attempt that is not the user's, 404."""
    ext = extension()
    wallet = current_wallet_or_401()
    purchase = purchases.own_attempt(ext, wallet.user_id, request.args.get("attempt") or "")
    if purchase is None:
        abort(404)
    try:
        url = purchases.resume_url(ext, purchase)
    except PaymentProviderError as exc:
        return _error(502, "payment_provider_error", exc.user_message)
    if url is None:
        message = "That checkout is no longer open: it was paid, cancelled or has expired."
        return _error(409, "checkout_not_open", message)
    if wants_json():
        return jsonify(url=url)
    return redirect(url, 303)


@blueprint.app_template_global("format_money")
def format_money(amount: int, currency: str) -> str:
    """``format_money(1250, "usd")`` -> ``"12.50 USD"`` (minor units, as Stripe counts them)."""
    code = currency.upper()
    if currency.lower() in ZERO_DECIMAL:
        return f"{amount} {code}"
    return f"{amount // 100}.{amount % 100:02d} {code}"


@blueprint.app_template_global("format_amount")
def format_amount(amount: int, currency: str) -> str:
    """``format_amount(5000, "usd")`` -> ``"50.00"``: an amount as a form field takes it back."""
    return format_money(amount, currency).rsplit(" ", 1)[0]


@blueprint.app_template_global("credits_packs")
def credits_packs() -> list[Any]:
    """The configured packs (``CREDITS_PACKS``), checked, for purchase forms."""
    return list(extension().settings.packs)


@blueprint.app_template_global("credits_balance")
def credits_balance() -> int | None:
    """The current wallet's balance, or ``None`` when nobody is logged in (for a balance badge)."""
    wallet = extension().current_wallet()
    return None if wallet is None else extension().ledger.balance(wallet)


@blueprint.app_template_global("credits_wallet_name")
def credits_wallet_name(wallet: Wallet) -> str:
    """``"your account"`` or ``"API key <label>"`` (the label from ``keys_loader``)."""
    if wallet.key_id is None:
        return "your account"
    labels = dict(extension().api_keys(wallet.user_id))
    return f"API key {labels.get(wallet.key_id, wallet.key_id)}"


@blueprint.app_template_global("credits_entry_detail")
def credits_entry_detail(entry: Entry, key_name: str | None = None) -> str:
    """What tells one history row from the next beyond its kind and reason, joined by " · ": the
    request that paid (``POST personas.create``, from the metadata ``@requires_credits`` records,
    unless the reason already is the endpoint), the API key that paid (``key_name``, for a key's
    wallet), the wallet a transfer went to or came from, the entry a refund gives back, and who made
    a change by hand."""
    meta = entry.metadata or {}
    parts = []
    endpoint, method = meta.get("endpoint"), meta.get("method")
    if isinstance(endpoint, str) and endpoint != entry.reason:
        parts.append(f"{method} {endpoint}" if isinstance(method, str) else endpoint)
    if key_name and entry.kind == "spend":
        parts.append(key_name)
    if entry.kind == "transfer":  # where the credits went, or came from
        for side, word in (("to", "to"), ("from", "from")):
            other = meta.get(side)
            if isinstance(other, dict) and isinstance(other.get("user_id"), str):
                there = make_wallet(other["user_id"], other.get("key_id"))
                if there.user_id == entry.wallet.user_id:
                    parts.append(f"{word} {credits_wallet_name(there)}")
                else:  # another user's wallet (an app's own transfer between users)
                    parts.append(
                        f"{word} user {there.user_id}" + (f" key {there.key_id}" if there.key_id else "")
                    )
    if entry.reverses_id is not None:
        parts.append(f"of entry {entry.reverses_id}")
    if entry.actor:
        parts.append(f"by {entry.actor}")
    return " · ".join(parts)
