"""Configuration: every key with its default (``DEFAULTS``), and :class:`Settings`, the typed values
``init_app`` parses from an app's config once, refusing to start with a value that cannot work (the
message names the key). ``docs/configuration.md`` is the table for users; a test keeps it in step with
``DEFAULTS``."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

import limits
from flask import Flask

#: Every key this extension reads, with its default. Set with ``app.config.setdefault``.
DEFAULTS: dict[str, Any] = {
    # Where the blueprint is mounted.
    "CREDITS_URL_PREFIX": "/credits",
    # Entries shown per page on the credits page and by ``GET {prefix}/transactions``.
    "CREDITS_HISTORY_PAGE_SIZE": 20,
    # Default product: ``CREDITS_UNIT_AMOUNT`` minor units of ``CREDITS_CURRENCY`` buy
    # ``CREDITS_PER_UNIT`` credits; a checkout may ask for 1 to ``CREDITS_MAX_QUANTITY`` units.
    "CREDITS_PER_UNIT": 100,
    "CREDITS_UNIT_AMOUNT": 100,
    "CREDITS_CURRENCY": "usd",
    "CREDITS_PRODUCT_NAME": "Credits",
    "CREDITS_MAX_QUANTITY": 100,
    # Named packs: {"starter": {"credits": 500, "amount": 400, "currency": "usd", "name": "..."}} or
    # {"pro": {"credits": 5000, "price": "price_123", "amount": 3000, "currency": "usd"}}.
    "CREDITS_PACKS": {},
    # Recurring plans (Stripe subscriptions): {"pro": {"price": "price_123", "credits": 2000,
    # "rollover": False, "name": "Pro"}}. Each paid invoice grants "credits", expiring at the end of
    # the period it pays for (never, with "rollover": True).
    "CREDITS_PLANS": {},
    # Purchased credits expire this long after purchase: seconds, a timedelta, or None (never).
    "CREDITS_PURCHASE_EXPIRES_AFTER": None,
    # "live" calls Stripe; "simulated" runs an offline checkout (only in debug or testing).
    "CREDITS_STRIPE_MODE": "live",
    # The request header whose value makes a @requires_credits request idempotent (None: ignore it).
    "CREDITS_IDEMPOTENCY_HEADER": "Idempotency-Key",
    # How long a key and its stored response are kept (seconds or a timedelta); then the key is free
    # again, and `flask credits expire` deletes it.
    "CREDITS_IDEMPOTENCY_TTL": 24 * 60 * 60,
    # How long a running request owns its key (seconds or a timedelta). Past it, its worker is taken
    # to have died: the next request with the key returns the dead run's credits and runs the view.
    # Keep it above your longest paid view (and your web server's worker timeout).
    "CREDITS_IDEMPOTENCY_LOCK_TIMEOUT": 300,
    # Largest response body stored for replays, in bytes; a larger (or streamed) response is sent
    # once, and a retry with its key gets 409.
    "CREDITS_IDEMPOTENCY_MAX_RESPONSE_BYTES": 1024 * 1024,
    # How long a hold lasts when neither the call nor the decorator says (seconds or a timedelta):
    # past it, its credits count again, and a settle charges what the wallet can spend then.
    "CREDITS_HOLD_TTL": 900,
    # What @requires_credits(hold=...) does when the view returns without settling its hold:
    # "charge" the whole hold, or "release" it (a view that used credits then settles them itself).
    "CREDITS_HOLD_UNSETTLED": "charge",
    # Auto top-up (buy a pack off-session with a saved card when a debit takes a wallet below its
    # threshold): False turns it off for every wallet (the kill switch); wallets keep their settings.
    "CREDITS_AUTO_TOP_UP": True,
    # Let customers enter Stripe promotion codes at Checkout (allow_promotion_codes): a discounted
    # purchase grants its full credits; refunds claw back in proportion to what was paid.
    "CREDITS_ALLOW_PROMOTION_CODES": False,
    # Send credits_low when a debit takes a wallet below this many credits (None: only wallets that
    # set their own threshold, credits.set_low_balance).
    "CREDITS_LOW_BALANCE": None,
    # The admin console under {prefix}/admin (opt-in): needs a @credits.admin_checker callback.
    "CREDITS_ADMIN": False,
    # How many times one user may try to redeem a credit code (POST {prefix}/redeem), right or wrong:
    # a rate limit as Flask-Limiter writes them ("10 per minute", "30/hour"); past it, 429 with
    # Retry-After.
    "CREDITS_REDEEM_RATE_LIMIT": "10 per minute",
    # Where those attempts are counted: a storage URI of the `limits` library ("redis://host:6379",
    # "memcached://..."). None: the app's RATELIMIT_STORAGE_URI (Flask-Limiter's), else "memory://",
    # which counts per process (each worker of a server allows the limit).
    "CREDITS_REDEEM_RATE_LIMIT_STORAGE": None,
    # Largest request body the blueprint's routes read (checkout, JSON endpoints), in bytes; the
    # webhook has CREDITS_WEBHOOK_MAX_BYTES. The app's MAX_CONTENT_LENGTH still applies if smaller.
    "CREDITS_MAX_CONTENT_LENGTH": 64 * 1024,
    # Unfinished checkouts (created at Stripe in the last 24 hours, not paid, expired or cancelled)
    # one wallet may have at once; one more gets 429.
    "CREDITS_MAX_OPEN_PURCHASES": 5,
    # The success page asks Stripe about an unfinished purchase at most once per this many seconds.
    "CREDITS_SUCCESS_CHECK_INTERVAL": 5,
    # The site's public origin, e.g. "https://example.com": success, cancel and simulated-checkout
    # URLs are built on it (else on SERVER_NAME and PREFERRED_URL_SCHEME), never on a request's Host
    # header unless TRUSTED_HOSTS vouches for it.
    "CREDITS_SITE_URL": None,
    # Seconds stripe-python waits for Stripe, and how often it retries a failed network call.
    "CREDITS_STRIPE_TIMEOUT": 20,
    "CREDITS_STRIPE_MAX_RETRIES": 2,
    # Where the Stripe API is (None: Stripe's own); a stand-in such as stripe-mock in tests.
    "CREDITS_STRIPE_API_BASE": None,
    # Oldest webhook signature timestamp accepted, in seconds.
    "CREDITS_WEBHOOK_TOLERANCE": 300,
    # Largest webhook body accepted, in bytes.
    "CREDITS_WEBHOOK_MAX_BYTES": 256 * 1024,
    # "transaction" when the app reaches PostgreSQL through a transaction-pooling pooler (PgBouncer's
    # pool_mode = transaction, Supavisor, Neon's pooled endpoint): server-side prepared statements are
    # turned off on the app's engines (psycopg 3), since the next transaction may run on another server
    # connection. "session": a session pooler (or a direct connection on a pooler's port): prepared
    # statements are kept. None: not said; a URL on a pooler's port (6432, 6543) or host ("pooler")
    # logs a warning at startup, and an error from a lost prepared statement names this key.
    "CREDITS_DATABASE_POOLER": None,
    # Stripe keys. The webhook secret may be a list (or comma-separated) while rotating secrets.
    "STRIPE_SECRET_KEY": None,
    "STRIPE_PUBLISHABLE_KEY": None,
    "STRIPE_WEBHOOK_SECRET": None,
}

#: Config key -> environment variables read when the key is not set, in order: ours, then the
#: names of the TypeScript service this extension generalises.
ENVIRONMENT = {
    "STRIPE_SECRET_KEY": ("STRIPE_SECRET_KEY", "StripeSecretKey"),
    "STRIPE_PUBLISHABLE_KEY": ("STRIPE_PUBLISHABLE_KEY", "StripePublishableKey"),
    "STRIPE_WEBHOOK_SECRET": ("STRIPE_WEBHOOK_SECRET", "StripeWebhookSecret"),
}


def apply_defaults(app: Flask) -> None:
    for name, names in ENVIRONMENT.items():
        if app.config.get(name) is None:
            for env in names:
                if os.environ.get(env):
                    app.config[name] = os.environ[env]
                    break
    for key, value in DEFAULTS.items():
        app.config.setdefault(key, value)


@dataclass(frozen=True)
class Pack:
    """One of ``CREDITS_PACKS``: ``credits`` for a Stripe ``price`` or an ``amount`` in minor units of
    ``currency``, expiring ``expires_after`` seconds after purchase (None: never)."""

    id: str
    name: str
    credits: int
    amount: int | None
    currency: str
    price: str | None
    expires_after: int | None


@dataclass(frozen=True)
class Plan:
    """One of ``CREDITS_PLANS``: a Stripe recurring ``price`` whose every paid invoice grants
    ``credits``, expiring at the end of the period the invoice pays for unless ``rollover``."""

    id: str
    name: str
    price: str
    credits: int
    rollover: bool


@dataclass(frozen=True)
class Settings:
    """The config of one app, checked and typed (see ``DEFAULTS`` for each key's meaning)."""

    url_prefix: str
    history_page_size: int
    per_unit: int
    unit_amount: int
    currency: str
    product_name: str
    max_quantity: int
    packs: tuple[Pack, ...]
    plans: tuple[Plan, ...]
    purchase_expires_after: int | None
    stripe_mode: Literal["live", "simulated"]
    idempotency_header: str | None
    idempotency_ttl: timedelta
    idempotency_lock_timeout: timedelta
    idempotency_max_response_bytes: int
    hold_ttl: timedelta
    hold_unsettled: Literal["charge", "release"]
    auto_top_up: bool
    allow_promotion_codes: bool
    low_balance: int | None
    admin: bool
    #: CREDITS_REDEEM_RATE_LIMIT, checked, and where attempts are counted (a `limits` storage URI).
    redeem_rate_limit: str
    redeem_rate_limit_storage: str
    max_content_length: int
    max_open_purchases: int
    success_check_interval: timedelta
    site_url: str | None
    stripe_timeout: float
    stripe_max_retries: int
    stripe_api_base: str | None
    webhook_tolerance: int
    webhook_max_bytes: int
    database_pooler: Literal["transaction", "session"] | None
    stripe_secret_key: str | None
    stripe_publishable_key: str | None
    #: Several while rotating (a list, or comma-separated).
    stripe_webhook_secrets: tuple[str, ...]

    def pack(self, pack_id: str) -> Pack | None:
        return next((p for p in self.packs if p.id == pack_id), None)

    def plan(self, plan_id: str) -> Plan | None:
        return next((p for p in self.plans if p.id == plan_id), None)

    def plan_for_price(self, price_id: str) -> Plan | None:
        """The plan sold at Stripe Price ``price_id`` (each price belongs to one plan)."""
        return next((p for p in self.plans if p.price == price_id), None)


def parse(config: Mapping[str, Any]) -> Settings:
    """The settings in ``config`` (defaults applied), or a RuntimeError naming the bad key."""
    mode = config["CREDITS_STRIPE_MODE"]
    if mode not in ("live", "simulated"):
        raise RuntimeError('CREDITS_STRIPE_MODE must be "live" or "simulated"')
    header = config["CREDITS_IDEMPOTENCY_HEADER"]
    if header is not None and (not isinstance(header, str) or not header):
        raise RuntimeError(f"CREDITS_IDEMPOTENCY_HEADER must be a header name or None, not {header!r}")
    pooler = config["CREDITS_DATABASE_POOLER"]
    if pooler not in (None, "transaction", "session"):
        raise RuntimeError(
            f'CREDITS_DATABASE_POOLER must be "transaction", "session" or None, not {pooler!r}'
        )
    unsettled = config["CREDITS_HOLD_UNSETTLED"]
    if unsettled not in ("charge", "release"):
        raise RuntimeError(f'CREDITS_HOLD_UNSETTLED must be "charge" or "release", not {unsettled!r}')
    prefix = config["CREDITS_URL_PREFIX"]
    if not isinstance(prefix, str):
        raise RuntimeError(f"CREDITS_URL_PREFIX must be a path such as '/credits', not {prefix!r}")
    return Settings(
        url_prefix=prefix,
        history_page_size=_whole(config, "CREDITS_HISTORY_PAGE_SIZE", 1, 1000),
        per_unit=_whole(config, "CREDITS_PER_UNIT", 1),
        unit_amount=_whole(config, "CREDITS_UNIT_AMOUNT", 0),
        currency=_currency(config["CREDITS_CURRENCY"], "CREDITS_CURRENCY"),
        product_name=str(config["CREDITS_PRODUCT_NAME"]),
        max_quantity=_whole(config, "CREDITS_MAX_QUANTITY", 1),
        packs=_packs(config),
        plans=_plans(config),
        purchase_expires_after=_seconds(
            config["CREDITS_PURCHASE_EXPIRES_AFTER"], "CREDITS_PURCHASE_EXPIRES_AFTER"
        ),
        stripe_mode=mode,
        idempotency_header=header,
        idempotency_ttl=_duration(config, "CREDITS_IDEMPOTENCY_TTL"),
        idempotency_lock_timeout=_duration(config, "CREDITS_IDEMPOTENCY_LOCK_TIMEOUT"),
        idempotency_max_response_bytes=_whole(config, "CREDITS_IDEMPOTENCY_MAX_RESPONSE_BYTES", 0),
        hold_ttl=_duration(config, "CREDITS_HOLD_TTL", minimum=1),
        hold_unsettled=unsettled,
        auto_top_up=_flag(config, "CREDITS_AUTO_TOP_UP"),
        allow_promotion_codes=_flag(config, "CREDITS_ALLOW_PROMOTION_CODES"),
        admin=_flag(config, "CREDITS_ADMIN"),
        low_balance=None
        if config["CREDITS_LOW_BALANCE"] is None
        else _whole(config, "CREDITS_LOW_BALANCE", 0),
        redeem_rate_limit=_rate_limit(config, "CREDITS_REDEEM_RATE_LIMIT"),
        redeem_rate_limit_storage=str(
            config["CREDITS_REDEEM_RATE_LIMIT_STORAGE"] or config.get("RATELIMIT_STORAGE_URI") or "memory://"
        ),
        max_content_length=_whole(config, "CREDITS_MAX_CONTENT_LENGTH", 1),
        max_open_purchases=_whole(config, "CREDITS_MAX_OPEN_PURCHASES", 1),
        success_check_interval=_duration(config, "CREDITS_SUCCESS_CHECK_INTERVAL", minimum=1),
        site_url=site_origin(config["CREDITS_SITE_URL"]),
        stripe_timeout=_number(config, "CREDITS_STRIPE_TIMEOUT"),
        stripe_max_retries=_whole(config, "CREDITS_STRIPE_MAX_RETRIES", 0),
        stripe_api_base=str(config["CREDITS_STRIPE_API_BASE"]) if config["CREDITS_STRIPE_API_BASE"] else None,
        webhook_tolerance=_whole(config, "CREDITS_WEBHOOK_TOLERANCE", 1),
        webhook_max_bytes=_whole(config, "CREDITS_WEBHOOK_MAX_BYTES", 1),
        database_pooler=pooler,
        stripe_secret_key=str(config["STRIPE_SECRET_KEY"]) if config["STRIPE_SECRET_KEY"] else None,
        stripe_publishable_key=(
            str(config["STRIPE_PUBLISHABLE_KEY"]) if config["STRIPE_PUBLISHABLE_KEY"] else None
        ),
        stripe_webhook_secrets=_secrets(config["STRIPE_WEBHOOK_SECRET"]),
    )


def _whole(config: Mapping[str, Any], key: str, minimum: int, maximum: int | None = None) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RuntimeError(f"{key} must be a whole number of at least {minimum}, not {value!r}")
    if maximum is not None and value > maximum:
        raise RuntimeError(f"{key} must be at most {maximum}, not {value!r}")
    return value


def _rate_limit(config: Mapping[str, Any], key: str) -> str:
    value = config[key]
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        limits.parse(value)
    except ValueError:
        raise RuntimeError(f'{key} must be a rate limit such as "10 per minute", not {value!r}') from None
    return value


def _flag(config: Mapping[str, Any], key: str) -> bool:
    value = config[key]
    if not isinstance(value, bool):
        raise RuntimeError(f"{key} must be True or False, not {value!r}")
    return value


def _number(config: Mapping[str, Any], key: str) -> float:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise RuntimeError(f"{key} must be a number of seconds above 0, not {value!r}")
    return float(value)


def _duration(config: Mapping[str, Any], key: str, *, minimum: float = 0) -> timedelta:
    """A number of seconds or a timedelta, more than ``minimum`` seconds (at least it, when not 0)."""
    value = config[key]
    if isinstance(value, timedelta):
        found = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        found = timedelta(seconds=value)
    else:
        raise RuntimeError(f"{key} must be a number of seconds or a timedelta, not {value!r}")
    seconds = found.total_seconds()
    if seconds <= 0 or seconds < minimum:
        raise RuntimeError(
            f"{key} must be at least {max(minimum, 0)} seconds (and more than 0), not {value!r}"
        )
    return found


def _seconds(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = int(value.total_seconds())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RuntimeError(f"{name} must be a number of seconds >= 1, a timedelta, or None")
    return value


def _currency(value: object, where: str) -> str:
    currency = str(value).lower()
    if len(currency) != 3 or not currency.isalpha() or not currency.isascii():
        raise RuntimeError(f"{where} must be a three-letter ISO code, not {value!r}")
    return currency


def _secrets(configured: object) -> tuple[str, ...]:
    if isinstance(configured, str):
        return tuple(s.strip() for s in configured.split(",") if s.strip())
    if configured is None:
        return ()
    if not isinstance(configured, (list, tuple)):
        raise RuntimeError("STRIPE_WEBHOOK_SECRET must be a string, a list of strings, or None")
    return tuple(str(s) for s in configured if s)


def _packs(config: Mapping[str, Any]) -> tuple[Pack, ...]:
    """``CREDITS_PACKS`` checked and in order; a misconfigured pack is a RuntimeError naming it."""
    result = []
    configured = config["CREDITS_PACKS"] or {}
    if not isinstance(configured, Mapping):
        raise RuntimeError("CREDITS_PACKS must be a dict of pack id -> pack")
    default_currency = config["CREDITS_CURRENCY"]
    for pack_id, spec in configured.items():
        where = f"CREDITS_PACKS[{pack_id!r}]"
        if not isinstance(spec, Mapping):
            raise RuntimeError(f"{where} must be a dict")
        credits = spec.get("credits")
        if isinstance(credits, bool) or not isinstance(credits, int) or not 1 <= credits <= 10**15:
            raise RuntimeError(
                f"{where}['credits'] must be a whole number of credits from 1, not {credits!r}"
            )
        price, amount = spec.get("price"), spec.get("amount")
        if price is None and amount is None:
            raise RuntimeError(f"{where} needs a Stripe 'price' id or an 'amount' in minor units")
        if amount is not None and (isinstance(amount, bool) or not isinstance(amount, int) or amount < 0):
            raise RuntimeError(f"{where}['amount'] must be a whole number of minor units")
        result.append(
            Pack(
                id=str(pack_id),
                name=str(spec.get("name") or f"{credits} credits"),
                credits=credits,
                amount=amount,
                currency=_currency(spec.get("currency", default_currency), f"{where}['currency']"),
                price=price,
                expires_after=_seconds(
                    spec.get("expires_after", config["CREDITS_PURCHASE_EXPIRES_AFTER"]),
                    f"{where}['expires_after']",
                ),
            )
        )
    return tuple(result)


def _plans(config: Mapping[str, Any]) -> tuple[Plan, ...]:
    """``CREDITS_PLANS`` checked and in order; a misconfigured plan is a RuntimeError naming it."""
    configured = config["CREDITS_PLANS"] or {}
    if not isinstance(configured, Mapping):
        raise RuntimeError("CREDITS_PLANS must be a dict of plan id -> plan")
    result: list[Plan] = []
    for plan_id, spec in configured.items():
        where = f"CREDITS_PLANS[{plan_id!r}]"
        # The plan id travels in forms, JSON and Stripe metadata, and is stored in a 64-character column.
        if not isinstance(plan_id, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", plan_id):
            raise RuntimeError(f"{where}: a plan id is 1 to 64 letters, digits, '_', '.' or '-'")
        if not isinstance(spec, Mapping):
            raise RuntimeError(f"{where} must be a dict")
        unknown = set(spec) - {"price", "credits", "rollover", "name"}
        if unknown:
            raise RuntimeError(f"{where} has unknown keys {sorted(unknown)}")
        credits = spec.get("credits")
        if isinstance(credits, bool) or not isinstance(credits, int) or not 1 <= credits <= 10**15:
            raise RuntimeError(
                f"{where}['credits'] must be a whole number of credits from 1, not {credits!r}"
            )
        price = spec.get("price")
        if not isinstance(price, str) or not price.startswith("price_") or len(price) > 255:
            raise RuntimeError(f"{where}['price'] must be the id of a recurring Stripe Price (price_...)")
        if any(p.price == price for p in result):
            raise RuntimeError(f"{where}['price'] is already the price of another plan")
        rollover = spec.get("rollover", False)
        if not isinstance(rollover, bool):
            raise RuntimeError(f"{where}['rollover'] must be True or False")
        result.append(
            Plan(
                id=plan_id,
                name=str(spec.get("name") or plan_id),
                price=price,
                credits=credits,
                rollover=rollover,
            )
        )
    return tuple(result)


#: A host name or IPv4 address (urlsplit lower-cases it), or an IPv6 address without its brackets.
_HOST = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?|[0-9a-f:.]*:[0-9a-f:.]*")


def site_origin(value: object) -> str | None:
    """``CREDITS_SITE_URL`` checked and without its trailing slash (None when unset); anything but a
    bare ``http(s)://host[:port]`` origin is a RuntimeError naming the key."""
    if value in (None, ""):
        return None
    problem = _origin_problem(value)
    if problem is not None:
        raise RuntimeError(f"CREDITS_SITE_URL {problem}, not {str(value)[:200]!r}")
    assert isinstance(value, str)
    return value.rstrip("/")


def _origin_problem(value: object) -> str | None:
    if not isinstance(value, str) or not value.isascii() or not value.isprintable():
        return "must be a string such as 'https://shop.example.com'"
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
    except ValueError:
        return "has a port that is not a number from 0 to 65535"
    if parts.scheme not in ("http", "https"):
        return "must start with https:// or http://"
    if "@" in parts.netloc or not _HOST.fullmatch(parts.hostname or ""):
        return "must name a host (letters, digits, dots and hyphens, or an IP address), and no user"
    if parts.path not in ("", "/") or "?" in value or "#" in value:
        return "must be an origin only: no path, query or fragment"
    return None
