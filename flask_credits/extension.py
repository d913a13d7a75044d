"""The FlaskCredits extension object: registration, the current wallet, and the ledger methods."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from flask import Flask, current_app
from werkzeug.wrappers import Response

from . import settings
from .core import usage as usage_report
from .core.audit import audit
from .core.inputs import make_wallet
from .core.ledger import Ledger
from .errors import HTTPCreditsError, InsufficientCredits, InvalidArgument, InvalidWallet
from .records import AutoTopUp, CreditCode, Entry, Hold, ReconcileReport, Subscription, Wallet
from .services import auto_top_up, codes, customers, plans, reconcile, webhooks
from .services.idempotency import RequestKeys
from .services.simulated_mode import check_allowed
from .services.simulated_stripe import SimulatedStripe
from .services.stripe_gateway import Gateway, LiveStripe, PaymentProviderError
from .storage.database import Database, utcnow, watch_for_transaction_pooler, without_server_side_prepares
from .storage.tables import Tables, tables_for
from .web import admin, blueprint, cli, responses, simulated, urls

if TYPE_CHECKING:
    from blinker import NamedSignal
    from flask_sqlalchemy import SQLAlchemy
    from sqlalchemy.engine import Engine

log = logging.getLogger("flask_credits")

WalletLoader = Callable[[], "tuple[Any, Any] | Wallet | None"]
WalletChecker = Callable[[str, "str | None"], bool]
KeysLoader = Callable[[str], "Iterable[tuple[str, str]]"]
CustomerDetailsLoader = Callable[[str], "Mapping[str, Any] | None"]
AdminChecker = Callable[[], "str | None"]
UserLookup = Callable[[str], "str | None"]
F = TypeVar("F", bound=Callable[..., Any])


class FlaskCredits:
    """Prepaid credits for a Flask app: a ledger, a blueprint, signals and a CLI.

    ``FlaskCredits(app)`` is enough when the app already has Flask-SQLAlchemy; pass ``db=`` to name the
    instance explicitly, or to call :meth:`init_app` later from an app factory. One instance may serve
    several apps. The extension's tables are defined on ``db.metadata``, so ``db.create_all()`` and the
    host's ``flask db migrate`` include them.

    Config keys (each set with ``setdefault``, then parsed once into :attr:`settings`; see
    ``docs/configuration.md``): ``CREDITS_URL_PREFIX``, ``CREDITS_HISTORY_PAGE_SIZE``,
    ``CREDITS_PER_UNIT``, ``CREDITS_UNIT_AMOUNT``, ``CREDITS_CURRENCY``, ``CREDITS_PRODUCT_NAME``,
    ``CREDITS_MAX_QUANTITY``, ``CREDITS_PACKS``, ``CREDITS_PLANS``,
    ``CREDITS_PURCHASE_EXPIRES_AFTER``,
    ``CREDITS_STRIPE_MODE``, ``CREDITS_IDEMPOTENCY_HEADER``, ``CREDITS_IDEMPOTENCY_TTL``,
    ``CREDITS_IDEMPOTENCY_LOCK_TIMEOUT``, ``CREDITS_IDEMPOTENCY_MAX_RESPONSE_BYTES``,
    ``CREDITS_HOLD_TTL``, ``CREDITS_HOLD_UNSETTLED``, ``CREDITS_AUTO_TOP_UP``, ``CREDITS_LOW_BALANCE``,
    ``CREDITS_ALLOW_PROMOTION_CODES``, ``CREDITS_ADMIN``,
    ``CREDITS_REDEEM_RATE_LIMIT``, ``CREDITS_REDEEM_RATE_LIMIT_STORAGE``,
    ``CREDITS_MAX_CONTENT_LENGTH``, ``CREDITS_MAX_OPEN_PURCHASES``, ``CREDITS_SUCCESS_CHECK_INTERVAL``,
    ``CREDITS_SITE_URL``, ``CREDITS_DATABASE_POOLER``, ``CREDITS_STRIPE_TIMEOUT``,
    ``CREDITS_STRIPE_MAX_RETRIES``, ``CREDITS_STRIPE_API_BASE``, ``CREDITS_WEBHOOK_TOLERANCE``,
    ``CREDITS_WEBHOOK_MAX_BYTES``,
    ``STRIPE_SECRET_KEY``, ``STRIPE_PUBLISHABLE_KEY``, ``STRIPE_WEBHOOK_SECRET`` (the last three also from
    environment variables of those names or ``StripeSecretKey``, ``StripePublishableKey``,
    ``StripeWebhookSecret``). A value that cannot work stops ``init_app`` with a ``RuntimeError`` naming
    its key.
    """

    def __init__(self, app: Flask | None = None, *, db: SQLAlchemy | None = None) -> None:
        self._db = db
        self._wallet_loader: WalletLoader | None = None
        self._wallet_checker: WalletChecker | None = None
        self._keys_loader: KeysLoader | None = None
        self._customer_details: CustomerDetailsLoader | None = None
        self._admin_checker: AdminChecker | None = None
        self._user_lookup: UserLookup | None = None
        self._engines: weakref.WeakKeyDictionary[Engine, _OnEngine] = weakref.WeakKeyDictionary()
        self._settings: weakref.WeakKeyDictionary[Flask, settings.Settings] = weakref.WeakKeyDictionary()
        #: The time every write records; tests give a fake clock (a callable returning an aware UTC
        #: datetime).
        self.clock: Callable[[], datetime] = utcnow
        #: Stripe event type -> handler, for this instance: the built-in ones, and the app's own added
        #: with :meth:`webhook_handler`.
        self.webhook_handlers: dict[str, webhooks.Handler] = dict(webhooks.BUILT_IN)
        self._gateways: dict[tuple[str, float, int, str | None], Gateway] = {}
        if db is not None:
            tables_for(db.metadata)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register on ``app``: config defaults, ``app.extensions["credits"]``, the ``credits``
        blueprint and the ``flask credits`` commands. Raises ``RuntimeError`` if already registered
        on this app, if no Flask-SQLAlchemy instance can be found, or naming a config key whose value
        cannot work. Logs a warning when a live app sets none of ``CREDITS_SITE_URL``,
        ``SERVER_NAME`` and ``TRUSTED_HOSTS``."""
        if "credits" in app.extensions:
            raise RuntimeError(
                "A 'FlaskCredits' instance has already been registered on this Flask app."
                " Import and use that instance instead."
            )
        db = self._db if self._db is not None else app.extensions.get("sqlalchemy")
        if db is None:
            raise RuntimeError(
                "FlaskCredits needs Flask-SQLAlchemy: call db.init_app(app) before"
                " FlaskCredits(app), or pass FlaskCredits(app, db=db)."
            )
        tables_for(db.metadata)
        settings.apply_defaults(app)
        parsed = settings.parse(app.config)
        if parsed.stripe_mode == "simulated":
            check_allowed(app)
        urls.warn_without_origin(app, parsed)
        with app.app_context():  # every bind: the app's own queries share the pooler too
            for engine in db.engines.values():
                if parsed.database_pooler == "transaction":
                    without_server_side_prepares(engine)
                elif parsed.database_pooler is None:
                    watch_for_transaction_pooler(engine)
        self._settings[app] = parsed
        app.extensions["credits"] = self
        app.register_blueprint(blueprint.blueprint, url_prefix=parsed.url_prefix)
        if parsed.stripe_mode == "simulated":
            app.register_blueprint(simulated.blueprint, url_prefix=parsed.url_prefix)
        if parsed.admin:
            app.register_blueprint(admin.blueprint, url_prefix=f"{parsed.url_prefix.rstrip('/')}/admin")
            # The checker is usually decorated after init_app: checked at each request (cheap), so the
            # app refuses its very first one without it.
            app.before_request(self._require_admin_checker)
        app.cli.add_command(cli.credits_cli)
        _exempt_webhook_from_csrf(app)

    # -- wallets -----------------------------------------------------------------------------------

    def wallet_loader(self, callback: F) -> F:
        """Decorate a function returning the request's wallet as ``(user_id, key_id_or_None)`` (or
        ``None`` for no wallet). Without one, the wallet is the Flask-Login user's own."""
        self._wallet_loader = callback
        return callback

    def wallet_checker(self, callback: F) -> F:
        """Decorate a function ``(user_id, key_id) -> bool`` telling whether that wallet's owner exists;
        the CLI refuses unknown ones. Without one, the Flask-Login ``user_loader`` decides users."""
        self._wallet_checker = callback
        return callback

    def user_lookup(self, callback: F) -> F:
        """Decorate a function ``(text) -> user_id | None`` finding the user an operator means by
        what they type as the CLI's ``USER`` (a user name, an email). When it returns ``None``, the
        text is taken as the user id itself. Without one, ``USER`` is always the user id."""
        self._user_lookup = callback
        return callback

    def find_user(self, text: str) -> str:
        """The user id an operator means by ``text``: what ``user_lookup`` finds, else ``text``
        itself. Whether that user exists is :meth:`wallet_exists`'s question."""
        found = self._user_lookup(text) if self._user_lookup is not None else None
        return text if found is None else str(found)

    def keys_loader(self, callback: F) -> F:
        """Decorate a function ``(user_id) -> [(key_id, label), ...]`` listing the user's live API
        keys: the credits page then shows each key's balance and can buy credits for it."""
        self._keys_loader = callback
        return callback

    def customer_details(self, callback: F) -> F:
        """Decorate a function ``(user_id) -> {"email": ..., "name": ...} | None`` giving what the
        user's Stripe Customer is created with (each key optional; others are ignored). Without one,
        the customer has no email until the user types one at Stripe Checkout."""
        self._customer_details = callback
        return callback

    def admin_checker(self, callback: F) -> F:
        """Decorate a function ``() -> str | None`` returning the identity of the current request's
        admin (an email, a user name: recorded as the ``actor`` of every change they make) or ``None``
        for anyone else (403). Required when ``CREDITS_ADMIN`` is on."""
        self._admin_checker = callback
        return callback

    def admin_identity(self) -> str | None:
        """The current request's admin identity by ``admin_checker`` (at most 255 characters), or
        ``None``."""
        if self._admin_checker is None:
            self._require_admin_checker()
        assert self._admin_checker is not None
        identity = self._admin_checker()
        if identity is None or identity == "":
            return None
        return str(identity)[:255]

    def _require_admin_checker(self) -> None:
        if self._admin_checker is None:
            raise RuntimeError(
                "CREDITS_ADMIN is True but no @credits.admin_checker callback is registered: decorate"
                " a function returning the admin's identity (or None) with it, or turn CREDITS_ADMIN off."
            )

    def customer_details_for(self, user_id: str) -> Mapping[str, Any]:
        """What ``customer_details`` says about the user (empty without a loader)."""
        if self._customer_details is None:
            return {}
        return self._customer_details(user_id) or {}

    def customer_id(self, user_id: str) -> str:
        """The user's Stripe Customer id (``cus_...``), shared by all their wallets (their API keys'
        too): the stored one, or created at Stripe now with ``customer_details`` and
        ``metadata[userId]``. Safe to call concurrently: one customer per user, never two. Raises
        :class:`PaymentProviderError` when Stripe fails."""
        return customers.customer_id(self, user_id)

    def api_keys(self, user_id: str) -> list[tuple[str, str]]:
        """The user's API keys as ``(key_id, label)``, from ``keys_loader`` (none without one)."""
        if self._keys_loader is None:
            return []
        return [(str(key_id), str(label)) for key_id, label in self._keys_loader(user_id)]

    def owns_key(self, user_id: str, key_id: str) -> bool:
        """Whether ``key_id`` is one of the user's API keys, by ``keys_loader`` or else
        ``wallet_checker``. Without either the app has not said it sells credits for keys: no."""
        if self._keys_loader is not None:
            return key_id in dict(self.api_keys(user_id))
        if self._wallet_checker is None:
            return False
        return bool(self._wallet_checker(user_id, key_id))

    def current_wallet(self) -> Wallet | None:
        """The wallet of the current request, or ``None`` when nobody is logged in."""
        if self._wallet_loader is not None:
            found = self._wallet_loader()
            if found is None:
                return None
            return make_wallet(*found)
        if not hasattr(current_app, "login_manager"):
            return None
        from flask_login import current_user

        if current_user is None or not current_user.is_authenticated:
            return None
        return make_wallet(current_user.get_id())

    def wallet_exists(self, user_id: str, key_id: str | None = None) -> bool:
        """Whether the app knows this user (and key): used by the CLI to refuse typos."""
        if self._wallet_checker is not None:
            return bool(self._wallet_checker(user_id, key_id))
        manager = getattr(current_app, "login_manager", None)
        callback = getattr(manager, "user_callback", None)
        if callback is None:
            return True
        return callback(user_id) is not None

    # -- plans -------------------------------------------------------------------------------------

    def subscription(self, user_id: str, key_id: str | None = None) -> Subscription | None:
        """The wallet's live subscription to one of ``CREDITS_PLANS`` (its plan, status, current
        period end and whether it ends then), or ``None``: none, ended, or its checkout not completed
        yet."""
        return plans.current(self, make_wallet(user_id, key_id))

    # -- auto top-up and low balance ---------------------------------------------------------------

    def auto_top_up(self, user_id: str, key_id: str | None = None) -> AutoTopUp | None:
        """The wallet's auto top-up settings and state (threshold, what it buys, the monthly cap and
        what was bought this month, the saved card, why it was turned off), or None if it has none."""
        return auto_top_up.get(self, make_wallet(user_id, key_id))

    def set_auto_top_up(
        self,
        user_id: str,
        key_id: str | None = None,
        *,
        enabled: bool,
        threshold: int,
        monthly_cap: int,
        pack: str | None = None,
        quantity: int | None = None,
    ) -> AutoTopUp:
        """Buy ``pack`` (or ``quantity`` units) off-session with the wallet's saved card whenever a debit
        takes it below ``threshold`` credits, at most ``monthly_cap`` (minor units of the currency) a
        calendar month. Raises ``InvalidArgument`` for settings that cannot work and ``CardRequired``
        to turn it on without a saved card (``POST /credits/auto-top-up/card`` saves one)."""
        return auto_top_up.configure(
            self,
            make_wallet(user_id, key_id),
            enabled=enabled,
            threshold=threshold,
            monthly_cap=monthly_cap,
            pack=pack,
            quantity=quantity,
        )

    def set_low_balance(self, user_id: str, threshold: int | None, key_id: str | None = None) -> None:
        """The wallet's own threshold for ``credits_low`` (None: ``CREDITS_LOW_BALANCE``)."""
        auto_top_up.set_low_balance(self, make_wallet(user_id, key_id), threshold)

    # -- credit codes ------------------------------------------------------------------------------

    def create_code(
        self,
        *,
        credits: int,
        max_redemptions: int,
        per_user: int = 1,
        expires_at: datetime | None = None,
        code: str | None = None,
        credits_expire_after: int | None = None,
        actor: str | None = None,
    ) -> CreditCode:
        """Make a redeemable code granting ``credits`` each time, at most ``max_redemptions`` times in
        all and ``per_user`` times per user, until ``expires_at`` (aware datetime; None: never). The
        credits granted expire ``credits_expire_after`` seconds after each redemption (None: never).
        ``code`` is stored upper-case (codes are case-insensitive); without it a random readable one
        is made. ``actor`` records who made it. Raises ``BadCode`` (an ``InvalidArgument``) for values
        that cannot work or a code that exists."""
        return codes.create(
            self,
            credits=credits,
            max_redemptions=max_redemptions,
            per_user=per_user,
            expires_at=expires_at,
            code=code,
            credits_expire_after=credits_expire_after,
            actor=actor,
        )

    def credit_codes(self) -> list[CreditCode]:
        """Every credit code, newest first (``flask credits codes list``)."""
        return codes.all_codes(self)

    def credit_code(self, code: str) -> CreditCode | None:
        """The credit code spelled ``code`` (any case), or None."""
        return codes.find(self, code)

    def disable_code(self, code: str) -> CreditCode:
        """Stop ``code`` from being redeemed; redemptions made stay. Raises ``CodeNotFound``."""
        return codes.disable(self, code)

    def redeem_code(self, user_id: str, code: str, key_id: str | None = None) -> Entry:
        """Grant ``code``'s credits to the wallet, as one redemption by ``user_id``: the grant and the
        redemption commit together, and the code's limits (in all, per user, expiry, disabled) hold
        under any concurrency. Raises, having changed nothing: ``BadCode`` (not a code),
        ``CodeNotFound``, ``CodeExpired``, ``CodeDisabled``, ``CodeExhausted``,
        ``CodeAlreadyRedeemed`` (each a ``CodeRefused`` with its HTTP ``status`` and ``error``).
        Sends ``credits_redeemed`` and ``credits_granted``."""
        return codes.redeem(self, make_wallet(user_id, key_id), code)

    # -- the ledger --------------------------------------------------------------------------------

    def balance(self, user_id: str, key_id: str | None = None) -> int:
        """Credits the wallet can spend now: expired lots no longer count, and credits reserved by
        live holds (:meth:`held`) are not included."""
        return self.ledger.balance(make_wallet(user_id, key_id))

    def held(self, user_id: str, key_id: str | None = None) -> int:
        """Credits reserved by the wallet's live holds: still the wallet's, but not spendable until
        the holds are settled, released or expire."""
        return self.ledger.held(make_wallet(user_id, key_id))

    def holds(self, user_id: str, key_id: str | None = None) -> list[Hold]:
        """The wallet's live holds, soonest expiry first (``flask credits holds USER``)."""
        return self.ledger.holds(make_wallet(user_id, key_id))

    def get_hold(self, hold_id: int) -> Hold:
        """The hold with this id, live or ended; :class:`HoldNotFound` if there is none."""
        return self.ledger.get_hold(hold_id)

    def hold(
        self,
        user_id: str,
        amount: int,
        *,
        key_id: str | None = None,
        ttl: timedelta | float | None = None,
        reason: str = "",
        idempotency_key: str | None = None,
    ) -> Hold:
        """Reserve ``amount`` credits for work whose cost is known only afterwards: they stay in the
        wallet but cannot be spent or held again until :meth:`settle` charges what the work cost,
        :meth:`release` gives them back, or ``ttl`` (a ``timedelta`` or seconds; default
        ``CREDITS_HOLD_TTL``) passes, after which they count again. Drawn from the lots as a spend
        would be (soonest expiry first). Raises :class:`InsufficientCredits` (402), writing nothing,
        when the wallet cannot cover it. Replaying ``idempotency_key`` returns the same hold. Sends
        ``credits_held`` (or ``credits_insufficient``)."""
        try:
            return self.ledger.hold(
                make_wallet(user_id, key_id),
                amount,
                ttl=self._hold_ttl(ttl),
                reason=reason,
                idempotency_key=idempotency_key,
            )
        except InsufficientCredits as exc:
            exc.purchase_url = self.purchase_url()
            raise

    def settle(
        self,
        hold_id: int,
        amount: int,
        *,
        reason: str | None = None,
        idempotency_key: str | None = None,
    ) -> Entry | None:
        """Charge ``amount`` credits for a hold and give the rest back, in one transaction; one spend
        entry records the charge and is returned. ``amount`` may exceed the hold: the excess comes
        from what the wallet can still spend, and what it cannot cover becomes debt (the next purchase
        pays it first; ``credits_overdrawn``). A hold past its expiry is settled from what the wallet
        can spend now, the rest as debt. Settling again with the same amount returns the same entry;
        with another raises :class:`HoldAlreadySettled`. ``settle(hold_id, 0)`` is a release and
        returns ``None`` (as does a settle whose whole charge became debt). Sends
        ``credits_settled`` (``credits_released`` for 0)."""
        return self.ledger.settle(hold_id, amount, reason=reason, idempotency_key=idempotency_key)

    def release(self, hold_id: int) -> None:
        """Give a hold's credits back. Idempotent; raises :class:`HoldAlreadySettled` for a settled
        hold. Sends ``credits_released``."""
        self.ledger.release(hold_id)

    def extend_hold(self, hold_id: int, amount: int, *, ttl: timedelta | float | None = None) -> Hold:
        """Reserve ``amount`` more credits for a live hold, which then lasts at least ``ttl`` from now
        (default ``CREDITS_HOLD_TTL``). Raises :class:`InsufficientCredits` when the wallet cannot
        cover it (the hold is unchanged) and :class:`HoldAlreadySettled` when the hold has ended."""
        try:
            return self.ledger.extend(hold_id, amount, ttl=self._hold_ttl(ttl))
        except InsufficientCredits as exc:
            exc.purchase_url = self.purchase_url()
            raise

    def _hold_ttl(self, ttl: timedelta | float | None) -> timedelta:
        if ttl is None:
            return self.settings.hold_ttl
        if isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
            ttl = timedelta(seconds=ttl)
        if not isinstance(ttl, timedelta) or not timedelta(0) < ttl <= timedelta(days=366):
            raise InvalidArgument(
                f"ttl must be a timedelta or seconds, above 0 and at most a year, not {ttl!r}"
            )
        return ttl

    def grant(
        self,
        user_id: str,
        amount: int,
        *,
        key_id: str | None = None,
        reason: str,
        expires_at: datetime | None = None,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        actor: str | None = None,
    ) -> Entry:
        """Add ``amount`` credits as a new lot, expiring at ``expires_at`` (aware datetime) or never.
        Atomic and committed on return. Replaying a committed ``idempotency_key`` returns the original
        entry and writes nothing. ``actor`` records who made the change by hand (shown in history).
        Sends ``credits_granted``."""
        return self.ledger.grant(
            make_wallet(user_id, key_id),
            amount,
            reason=reason,
            expires_at=expires_at,
            idempotency_key=idempotency_key,
            metadata=metadata,
            actor=actor,
        )

    def spend(
        self,
        user_id: str,
        amount: int,
        *,
        key_id: str | None = None,
        reason: str,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        actor: str | None = None,
    ) -> Entry:
        """Debit ``amount`` credits, drawing the soonest-expiring lots first. Atomic and committed on
        return. Raises :class:`InsufficientCredits` (HTTP 402) when the wallet cannot pay, writing
        nothing, so the same ``idempotency_key`` may succeed later. ``actor`` records who made the
        change by hand. Sends ``credits_spent`` or ``credits_insufficient``."""
        try:
            return self.ledger.spend(
                make_wallet(user_id, key_id),
                amount,
                reason=reason,
                idempotency_key=idempotency_key,
                metadata=metadata,
                actor=actor,
            )
        except InsufficientCredits as exc:
            exc.purchase_url = self.purchase_url()
            raise

    def transfer(
        self,
        from_wallet: Wallet,
        to_wallet: Wallet,
        amount: int,
        *,
        reason: str,
        idempotency_key: str | None = None,
        actor: str | None = None,
    ) -> Entry:
        """Move ``amount`` credits from one wallet to another (``Wallet(user_id, key_id=None)``), in
        one transaction: the source pays as a spend does (soonest-expiring lots first; credits held
        by live holds cannot move), the target gets them with their expiry kept and pays its debt
        with them first, as a purchase would. Each wallet's history gets a ``transfer`` entry naming
        the other (``metadata["to"]`` / ``metadata["from"]``). Makes the target wallet if it does not
        exist. Returns the source's entry; replaying a committed ``idempotency_key`` returns it and
        writes nothing (the key with another amount or target: :class:`IdempotencyConflict`).
        Raises :class:`InsufficientCredits` (HTTP 402) when the source cannot pay, writing nothing,
        and :class:`InvalidArgument` for the same wallet on both sides. ``actor`` records who made
        the change by hand. Sends ``credits_transferred`` (a transfer out is a debit: it may also
        send ``credits_low`` or start an auto top-up, as a spend does)."""
        for name, wallet in (("from_wallet", from_wallet), ("to_wallet", to_wallet)):
            if not isinstance(wallet, tuple) or not 1 <= len(wallet) <= 2:
                raise InvalidWallet(f"{name} must be a Wallet(user_id, key_id=None), not {wallet!r}")
        source, target = make_wallet(*from_wallet), make_wallet(*to_wallet)
        try:
            return self.ledger.transfer(
                source, target, amount, reason=reason, idempotency_key=idempotency_key, actor=actor
            )
        except InsufficientCredits as exc:
            exc.purchase_url = self.purchase_url()
            raise

    def refund(
        self,
        user_id: str,
        entry_id: int,
        *,
        key_id: str | None = None,
        reason: str = "refund",
        actor: str | None = None,
    ) -> Entry:
        """Return a spend's credits to the lots it drew from. Refunding the same spend again returns
        the first refund. ``actor`` records who made the change by hand. Sends ``credits_refunded``."""
        return self.ledger.refund(make_wallet(user_id, key_id), entry_id, reason=reason, actor=actor)

    def history(
        self,
        user_id: str,
        key_id: str | None = None,
        *,
        limit: int = 50,
        before: int | None = None,
    ) -> list[Entry]:
        """The wallet's entries, newest first. Pass the last entry's ``id`` as ``before`` for the next
        page (keyset pagination: a page costs the same however long the history)."""
        return self.ledger.history(make_wallet(user_id, key_id), limit=limit, before=before)

    def usage(
        self,
        user_id: str,
        key_id: str | None = None,
        *,
        since: datetime,
        until: datetime,
        by: usage_report.UsageBy = "day",
    ) -> dict[Any, int]:
        """Credits the wallet spent in ``[since, until)`` (aware datetimes), net of the refunds of
        those spends made before ``until``, grouped ``by``: ``"day"`` (UTC ``date`` keys, oldest
        first, days without spends left out), ``"reason"`` or ``"endpoint"`` (the view's endpoint the
        :func:`requires_credits` decorator records; ``None`` for direct :meth:`spend` calls), most
        spent first. One query on the wallet's entries. Raises :class:`InvalidArgument` for a range
        that is empty or not aware, or another ``by``."""
        return usage_report.usage(
            self.ledger.db, make_wallet(user_id, key_id), since=since, until=until, by=by
        )

    def expire(self) -> int:
        """Expire the due lots and release the expired holds of every wallet (spends and balances
        also do it lazily); returns how many wallets were visited. Run it from cron with
        ``flask credits expire``, which also runs :meth:`prune_request_keys`."""
        return self.ledger.expire_all()

    def prune_request_keys(self) -> tuple[int, int]:
        """Delete the ``Idempotency-Key`` records older than ``CREDITS_IDEMPOTENCY_TTL``, and settle
        requests whose worker died before they finished (their lease,
        ``CREDITS_IDEMPOTENCY_LOCK_TIMEOUT``, is over): their credits are returned and their key
        freed. Returns (keys deleted, runs whose credits were returned)."""
        return self.request_keys.prune(lock_timeout=self.settings.idempotency_lock_timeout)

    def reconcile(self, since: timedelta, *, dry_run: bool = False) -> ReconcileReport:
        """Ask Stripe how the Checkout Sessions and plans' paid invoices created in the last ``since``
        (and the automatic purchases started then) stand, and do what their lost webhooks should have
        done, through the webhooks' own exactly-once paths: credit paid checkouts, grant the allowance
        of paid plan invoices, mark expired checkouts, apply missed refunds and disputes, settle
        automatic purchases. Safe while webhooks arrive and when run twice
        at once. Sends ``purchase_reconciled`` for each fix. ``dry_run`` changes nothing and reports
        what it would do. Raises PaymentProviderError when Stripe cannot be reached (run it from cron
        as ``flask credits reconcile``)."""
        return reconcile.reconcile(self, since, dry_run=dry_run)

    def audit(self) -> list[str]:
        """Check every wallet: balance = sum of entries = credits left in lots, and more. Returns one
        line per problem (empty when all is well)."""
        return audit(self.database)

    def purchase_url(self) -> str | None:
        """Where a user buys credits: the credits page, when inside a request."""
        return responses.purchase_url()

    def webhook_handler(self, *event_types: str) -> Callable[[webhooks.Handler], webhooks.Handler]:
        """Decorate a function ``(ext, data_object, record) -> outcome`` handling these Stripe event
        types on this instance (replacing a built-in one for the same type). It runs after the
        signature was checked and only for an event id not seen before; the event is recorded as seen
        with the outcome returned (see ``flask_credits.services.webhooks.Handler``). An exception
        answers 5xx, so Stripe delivers the event again."""

        def register(handler: webhooks.Handler) -> webhooks.Handler:
            for event_type in event_types:
                self.webhook_handlers[event_type] = handler
            return handler

        return register

    def error_response(self, error: HTTPCreditsError) -> Response:
        """The response of one of this extension's HTTP errors (what their ``get_response`` gives)."""
        return responses.render(error)

    def now(self) -> datetime:
        """The extension's clock (:attr:`clock`) now."""
        return self.clock()

    # -- plumbing ----------------------------------------------------------------------------------

    @property
    def settings(self) -> settings.Settings:
        """The current app's settings, parsed from its config by :meth:`init_app`."""
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        try:
            return self._settings[app]
        except KeyError:
            raise RuntimeError("FlaskCredits is not initialised on this app") from None

    @property
    def db(self) -> SQLAlchemy:
        """The Flask-SQLAlchemy instance of the current app."""
        db: SQLAlchemy | None = self._db or current_app.extensions.get("sqlalchemy")
        if db is None:
            raise RuntimeError("FlaskCredits is not initialised on this app")
        return db

    @property
    def tables(self) -> Tables:
        return tables_for(self.db.metadata)

    @property
    def gateway(self) -> Gateway:
        """Stripe for the current app: live (``StripeClient`` with the configured key, timeout and
        retries) or the simulated one."""
        found = self.settings
        if found.stripe_mode == "simulated":
            check_allowed(current_app._get_current_object())  # type: ignore[attr-defined]
            return SimulatedStripe(
                self,
                page_url=lambda session_id: urls.external_url(
                    "credits_simulated.checkout", session_id=session_id
                ),
                portal_url=lambda: urls.external_url("credits_simulated.portal"),
                setup_url=lambda key_id: urls.external_url("credits_simulated.card_setup", key_id=key_id),
            )
        if not found.stripe_secret_key:
            log.error("STRIPE_SECRET_KEY is not set: checkout is unavailable")
            raise PaymentProviderError("auth", "Payments are not configured on this site yet.")
        options = (
            found.stripe_secret_key,
            found.stripe_timeout,
            found.stripe_max_retries,
            found.stripe_api_base,
        )
        gateway = self._gateways.get(options)
        if gateway is None:
            gateway = self._gateways[options] = LiveStripe(
                options[0], timeout=options[1], max_network_retries=options[2], api_base=options[3]
            )
        return gateway

    def _on_engine(self) -> _OnEngine:
        db = self.db
        engine = db.engine
        found = self._engines.get(engine)
        if found is None:
            database = Database(engine, tables_for(db.metadata), clock=self.now)
            ledger = Ledger(database, self.emit)
            ledger.on_debit = lambda wallet, entry, limits: auto_top_up.debited(self, wallet, entry, limits)
            found = self._engines[engine] = _OnEngine(database, ledger, RequestKeys(database, ledger))
        return found

    @property
    def database(self) -> Database:
        """The current app's database as the extension uses it (one per engine)."""
        return self._on_engine().database

    @property
    def ledger(self) -> Ledger:
        """The ledger of the current app's database (one per engine)."""
        return self._on_engine().ledger

    @property
    def request_keys(self) -> RequestKeys:
        """The Idempotency-Keys of ``@requires_credits`` requests in the current app's database."""
        return self._on_engine().request_keys

    def emit(self, signal: NamedSignal, **kwargs: Any) -> None:
        """Send ``signal`` from the current app to each receiver in turn, awaiting async ones as Flask
        does. A receiver that raises is logged: the ledger change it reports is already committed and
        must stay so."""
        if not signal.receivers:
            return
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        for receiver in signal.receivers_for(app):
            try:
                # As Flask sends its own signals: an async receiver is awaited (app.ensure_sync).
                app.ensure_sync(receiver)(app, **kwargs)
            except Exception:
                log.exception("receiver %r of signal %s failed", receiver, signal.name)


@dataclass(frozen=True)
class _OnEngine:
    database: Database
    ledger: Ledger
    request_keys: RequestKeys


def _exempt_webhook_from_csrf(app: Flask) -> None:
    """Stripe cannot send a CSRF token: exempt the webhook from Flask-WTF's CSRFProtect, whether it
    was set up before this extension or after it (``exempt`` is idempotent)."""

    def exempt() -> None:
        csrf = app.extensions.get("csrf")
        if csrf is not None:
            csrf.exempt(blueprint.stripe_webhook)

    exempt()
    # CSRFProtect set up later checks requests in a before_request hook registered after this one.
    app.before_request(exempt)
