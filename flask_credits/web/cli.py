"""``flask credits ...``: look at and adjust wallets from the command line."""

from __future__ import annotations

import functools
import getpass
import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, TypeVar, cast

import click
from flask import current_app
from flask.cli import AppGroup

from ..core.inputs import make_wallet
from ..errors import CreditsError, InsufficientCredits
from ..records import ReconcileReport, Wallet
from ..services import auto_top_up, reconcile
from ..services.stripe_gateway import PaymentProviderError
from ..storage.database import UNAVAILABLE
from . import exports

if TYPE_CHECKING:
    from ..extension import FlaskCredits

T = TypeVar("T")

credits_cli = AppGroup("credits", help="Look at and adjust credit wallets.")

_key = click.option("--key", "key_id", default=None, help="An API key's wallet instead of the user's.")


def _ext() -> FlaskCredits:
    return cast("FlaskCredits", current_app.extensions["credits"])


#: Below the help of every command taking a USER.
USER_HELP = (
    "USER is the user's id, as the app's Flask-Login user_loader reads it (usually str(user.id));"
    " an app that registers @credits.user_lookup also lets you type what it finds users by (a user"
    " name, an email), trying that first."
)


def _user_command(name: str) -> Callable[[Callable[..., None]], click.Command]:
    """A ``flask credits NAME USER ...`` command, with :data:`USER_HELP` below its help."""

    def decorator(function: Callable[..., None]) -> click.Command:
        return credits_cli.command(name, epilog=USER_HELP)(click.argument("user")(function))

    return decorator


def _user(text: str, key_id: str | None) -> str:
    """The id of the user an operator typed as USER (and, with --key, checks the key is theirs), or a
    one-line error: the app's lookup and loader are its own code, and bad input must never end in a
    traceback (a loader doing ``int(user_id)`` raises ``ValueError`` on a user name)."""
    ext = _ext()
    user_id = _ask(text, functools.partial(ext.find_user, text))
    if user_id is None or not _ask(text, functools.partial(ext.wallet_exists, user_id)):
        raise click.ClickException(f"unknown user {text!r}")
    if key_id is not None and not _ask(text, functools.partial(ext.wallet_exists, user_id, key_id)):
        raise click.ClickException(_not_a_live_key(text, user_id, key_id))
    return user_id


def _not_a_live_key(text: str, user_id: str, key_id: str) -> str:
    """Why ``key_id`` is refused: a key whose wallet the ledger has was the user's and is revoked (or
    no longer theirs), and the way to rescue what it holds; any other is not one of their keys."""
    who = text if text == user_id else f"{text} (id {user_id})"
    ledger = _ext().ledger
    if _ask(text, lambda: ledger.wallet_id(make_wallet(user_id, key_id))) is None:
        return f"key {key_id!r} is not one of user {who}'s keys (or it is revoked)"
    left = _ask(text, lambda: ledger.balance(make_wallet(user_id, key_id))) or 0
    rescue = (
        f"; it still holds {left} credits: `flask credits transfer {text} {left} --from-key {key_id}"
        " --reason ...` moves them to the user's account"
        if left
        else ""
    )
    return f"key {key_id!r} of user {who} is revoked (or no longer theirs){rescue}"


def _ask(text: str, question: Callable[[], T]) -> T | None:
    """The app's answer, or ``None`` when its code raises on what was typed; an unreachable database
    is said as such, not passed off as an unknown user."""
    try:
        return question()
    except UNAVAILABLE as exc:
        raise click.ClickException(
            f"could not look up user {text!r}: the database is unavailable ({type(exc).__name__})"
        ) from None
    except Exception:
        return None


def _iso(value: str | None, option: str = "--expires") -> datetime | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 date or time", param_hint=option) from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


@_user_command("balance")
@_key
def balance_command(user: str, key_id: str | None) -> None:
    """Print USER's balance: what can be spent now, then ``(N held)`` when live holds reserve credits."""
    user = _user(user, key_id)
    try:
        # Balance first: it expires what is due, so the held credits read next are the live ones.
        balance = _ext().balance(user, key_id)
        held = _ext().held(user, key_id)
    except CreditsError as exc:
        raise click.ClickException(str(exc)) from None
    # The bare number when nothing is held, as before holds existed: scripts parse it.
    click.echo(f"{balance} ({held} held)" if held else balance)


@_user_command("grant")
@click.argument("amount", type=int)
@click.option("--reason", required=True, help="Shown in the user's history.")
@click.option("--expires", default=None, help="ISO 8601 time the credits expire (UTC if no zone).")
@click.option("--idempotency-key", default=None, help="Run twice, grant once.")
@click.option("--actor", default=None, help="Who grants, shown in the history (default: the OS user).")
@_key
def grant_command(
    user: str,
    amount: int,
    reason: str,
    expires: str | None,
    idempotency_key: str | None,
    actor: str | None,
    key_id: str | None,
) -> None:
    """Give USER AMOUNT credits, recording who did it (--actor or the OS user)."""
    user = _user(user, key_id)
    try:
        entry = _ext().grant(
            user,
            amount,
            key_id=key_id,
            reason=reason,
            expires_at=_iso(expires),
            idempotency_key=idempotency_key,
            actor=actor or _os_user(),
        )
    except CreditsError as exc:
        raise click.ClickException(str(exc)) from None
    if entry.replayed:  # the same --idempotency-key again: nothing was granted this time
        click.echo(f"already granted {entry.amount} credits (entry {entry.id}); nothing changed")
        return
    click.echo(f"granted {entry.amount} credits (entry {entry.id}); balance {entry.balance_after}")


@_user_command("transfer")
@click.argument("amount", type=int)
@click.option(
    "--from-key",
    default=None,
    help="Move from this API key's wallet instead of the user's; a revoked key's too (its credits"
    " are otherwise stranded).",
)
@click.option("--to-key", default=None, help="Move to this live API key's wallet instead of the user's.")
@click.option("--reason", required=True, help="Shown in both wallets' histories.")
@click.option("--idempotency-key", default=None, help="Run twice, move once.")
@click.option("--actor", default=None, help="Who moves them, shown in the history (default: the OS user).")
def transfer_command(
    user: str,
    amount: int,
    from_key: str | None,
    to_key: str | None,
    reason: str,
    idempotency_key: str | None,
    actor: str | None,
) -> None:
    """Move AMOUNT of USER's credits from one of their wallets to another: from the user's own (or
    --from-key's) to --to-key's (or the user's own). Lots keep their expiry; credits held by live
    holds stay."""
    user_id = _user(user, to_key)
    ext = _ext()
    if from_key is not None and not _ask(user, functools.partial(ext.wallet_exists, user_id, from_key)):
        # A revoked key's wallet may still be moved out of: that is how its credits are rescued.
        known = _ask(user, lambda: ext.ledger.wallet_id(make_wallet(user_id, from_key)))
        if known is None:
            who = user if user == user_id else f"{user} (id {user_id})"
            raise click.ClickException(f"key {from_key!r} is not one of user {who}'s keys")
    source, target = Wallet(user_id, from_key), Wallet(user_id, to_key)
    try:
        entry = ext.transfer(
            source,
            target,
            amount,
            reason=reason,
            idempotency_key=idempotency_key,
            actor=actor or _os_user(),
        )
    except InsufficientCredits as exc:
        raise click.ClickException(
            f"{_wallet_name(source)} has {exc.balance} credits that can move, not {exc.required}"
            " (credits reserved by running requests stay)"
        ) from None
    except CreditsError as exc:
        raise click.ClickException(str(exc)) from None
    where = f"from {_wallet_name(source)} to {_wallet_name(target)}"
    if entry.replayed:
        click.echo(f"already moved {-entry.amount} credits {where} (entry {entry.id}); nothing changed")
        return
    click.echo(
        f"moved {-entry.amount} credits {where} (entry {entry.id});"
        f" {entry.balance_after} left in {_wallet_name(source)}"
    )


def _wallet_name(wallet: Wallet) -> str:
    return "the user's account" if wallet.key_id is None else f"key {wallet.key_id!r}"


@_user_command("history")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--before", type=int, default=None, help="Entries older than this entry id.")
@click.option(
    "--csv",
    "as_csv",
    is_flag=True,
    help="The whole history as CSV, oldest first, streamed (as GET /credits/transactions.csv); "
    "--limit and --before do not apply.",
)
@_key
def history_command(user: str, limit: int, before: int | None, as_csv: bool, key_id: str | None) -> None:
    """List USER's entries, newest first (a change made by hand ends with who made it)."""
    user = _user(user, key_id)
    try:
        if as_csv:
            for chunk in exports.csv_lines(_ext().ledger.db, make_wallet(user, key_id)):
                click.echo(chunk, nl=False)
            return
        entries = _ext().history(user, key_id, limit=limit, before=before)
    except CreditsError as exc:
        raise click.ClickException(str(exc)) from None
    for e in entries:
        click.echo(
            f"{e.id}\t{e.created_at.isoformat(timespec='seconds')}\t{e.kind}\t{e.amount:+d}"
            f"\t{e.balance_after}\t{e.reason}" + (f"\tby {e.actor}" if e.actor else "")
        )


@_user_command("holds")
@_key
def holds_command(user: str, key_id: str | None) -> None:
    """List USER's live holds, soonest expiry first: id, created, expires, credits, reason."""
    user = _user(user, key_id)
    try:
        holds = _ext().holds(user, key_id)
    except CreditsError as exc:
        raise click.ClickException(str(exc)) from None
    for h in holds:
        click.echo(
            f"{h.id}\t{h.created_at.isoformat(timespec='seconds')}\t{h.expires_at.isoformat(timespec='seconds')}"
            f"\t{h.amount}\t{h.reason}"
        )
    # The sum of the lines above, not the wallet's counter: a hold past its expiry is neither listed
    # nor counted, even before an expiry sweep has given its credits back.
    total = sum(h.amount for h in holds)
    click.echo(f"{total} credits held by {len(holds)} live holds" if holds else "no live holds")


@credits_cli.command("plans")
def plans_command() -> None:
    """List ``CREDITS_PLANS``: id, name, credits per period, Stripe Price, and whether unused credits
    roll over or expire at the end of each period."""
    plans = _ext().settings.plans
    for p in plans:
        kept = "rollover" if p.rollover else "expire at period end"
        click.echo(f"{p.id}\t{p.name}\t{p.credits} credits per period\t{p.price}\t{kept}")
    if not plans:
        click.echo("no plans configured (CREDITS_PLANS)")


@_user_command("subscription")
@_key
def subscription_command(user: str, key_id: str | None) -> None:
    """Show the live subscription of USER's wallet: plan, status, renewal (or end) date, allowance."""
    user = _user(user, key_id)
    try:
        found = _ext().subscription(user, key_id)
    except CreditsError as exc:
        raise click.ClickException(str(exc)) from None
    if found is None:
        click.echo("no live subscription")
        return
    plan = _ext().settings.plan(found.plan)
    # A plan removed from CREDITS_PLANS since: its id, and no allowance to show.
    line = [found.plan if plan is None else f"{plan.name} ({plan.id})", found.status]
    if found.current_period_end is not None:
        ends = "ends" if found.cancel_at_period_end else "renews"
        line.append(f"{ends} {found.current_period_end.date().isoformat()}")
    if plan is not None:
        line.append(f"{plan.credits} credits per period")
    click.echo("\t".join(line))


@credits_cli.command("audit")
def audit_command() -> None:
    """Check every wallet's balance against its entries and lots; exit 1 on any mismatch."""
    problems = _ext().audit()
    for line in problems:
        click.echo(line, err=True)
    if problems:
        raise SystemExit(1)
    click.echo("audit passed: every balance equals its entries and its lots")


@credits_cli.command("expire")
def expire_command() -> None:
    """Expire every lot whose time has passed and give back the credits of every hold past its expiry
    (spends and balances do both lazily; run this from cron), delete expired Idempotency-Keys, and
    return the credits of paid requests whose worker died before finishing."""
    click.echo(f"checked {_ext().expire()} wallets with expired credits or holds")
    deleted, returned = _ext().prune_request_keys()
    click.echo(
        f"deleted {deleted} expired idempotency keys; returned the credits of {returned} unfinished requests"
    )


@_user_command("auto-top-up")
@_key
def auto_top_up_command(user: str, key_id: str | None) -> None:
    """Show USER's wallet's auto top-up: on or off (and why), threshold, what it buys, the month's cap
    and what was bought, the saved card."""
    user = _user(user, key_id)
    try:
        found = _ext().auto_top_up(user, key_id)
    except CreditsError as exc:
        raise click.ClickException(str(exc)) from None
    if found is None:
        click.echo("no auto top-up")
        return
    buys = f"pack {found.pack}" if found.pack else f"{found.quantity} units"
    line = [
        "on" if found.enabled else "off",
        f"below {found.threshold} credits",
        f"buys {buys} ({found.credits} credits for {found.amount} {found.currency})",
        f"{found.spent_this_month} of {found.monthly_cap} {found.currency} this month",
        f"card {found.card_brand} {found.card_last4}" if found.has_card else "no card",
    ]
    if found.in_flight:
        line.append("a purchase in flight")
    if found.failure:
        line.append(f"turned off: {found.failure}")
    click.echo("\t".join(line))


@credits_cli.command("top-up")
@click.option(
    "--due",
    is_flag=True,
    required=True,
    help="Do what is due: required, so that running it is never an accident.",
)
def top_up_command(due: bool) -> None:
    """Auto top-up's sweep (run it from cron, like `expire`): make the Stripe call of every automatic
    purchase a dead worker left (with the same idempotency key, so Stripe charges once), give up on
    those older than Stripe keeps a key, and start the purchases of crossings nobody acted on."""
    counts = auto_top_up.sweep(_ext())
    if not _ext().settings.auto_top_up:
        click.echo("auto top-up is off (CREDITS_AUTO_TOP_UP = False): nothing done")
        return
    if not counts:
        click.echo("nothing due")
        return
    click.echo(", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())))


codes_cli = AppGroup("codes", help="Make, list and disable redeemable credit codes.")
credits_cli.add_command(codes_cli)


def _os_user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment (a container without one)
        return None


@codes_cli.command("create")
@click.option("--credits", "amount", type=int, required=True, help="Credits each redemption grants.")
@click.option("--max-redemptions", type=int, required=True, help="Redemptions allowed in all.")
@click.option("--per-user", type=int, default=1, show_default=True, help="Redemptions per user.")
@click.option("--expires", default=None, help="ISO 8601 time the code stops working (UTC if no zone).")
@click.option("--code", default=None, help="The code itself (any case); a random readable one if absent.")
@click.option(
    "--credits-expire-after", type=int, default=None, help="Granted credits expire after this many seconds."
)
@click.option("--actor", default=None, help="Who makes it (default: the OS user).")
def codes_create_command(
    amount: int,
    max_redemptions: int,
    per_user: int,
    expires: str | None,
    code: str | None,
    credits_expire_after: int | None,
    actor: str | None,
) -> None:
    """Make a credit code and print it."""
    try:
        found = _ext().create_code(
            credits=amount,
            max_redemptions=max_redemptions,
            per_user=per_user,
            expires_at=_iso(expires),
            code=code,
            credits_expire_after=credits_expire_after,
            actor=actor or _os_user(),
        )
    except CreditsError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(found.code)


@codes_cli.command("list")
def codes_list_command() -> None:
    """List the codes, newest first: code, credits, redeemed/max, per user, expires, disabled."""
    found = _ext().credit_codes()
    for c in found:
        expires = "never" if c.expires_at is None else c.expires_at.isoformat(timespec="seconds")
        click.echo(
            f"{c.code}\t{c.credits} credits\t{c.redeemed}/{c.max_redemptions} redeemed"
            f"\t{c.per_user} per user\texpires {expires}" + ("\tdisabled" if c.disabled else "")
        )
    if not found:
        click.echo("no codes")


@codes_cli.command("disable")
@click.argument("code")
def codes_disable_command(code: str) -> None:
    """Stop CODE from being redeemed (what was redeemed stays)."""
    try:
        found = _ext().disable_code(code)
    except CreditsError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{found.code} disabled ({found.redeemed}/{found.max_redemptions} redeemed)")


_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> timedelta:
    found = re.fullmatch(r"([1-9][0-9]{0,5})([dhm])", value.strip())
    if found is None:
        raise click.BadParameter(f"{value!r} is not a duration like 3d, 12h or 30m")
    return timedelta(**{_UNITS[found[2]]: int(found[1])})


@credits_cli.command("reconcile")
@click.option(
    "--since",
    default="3d",
    show_default=True,
    callback=_duration,
    help="How far back to look: 3d, 12h, 30m (Checkout Sessions and invoices created since then).",
)
@click.option("--dry-run", is_flag=True, help="Change nothing; say what would be done.")
def reconcile_command(since: timedelta, dry_run: bool) -> None:
    """Do what lost Stripe webhooks should have done: ask Stripe about this app's Checkout Sessions
    and plans' paid invoices created since then and credit the paid ones never credited, mark expired
    checkouts, apply missed refunds and disputes, and settle automatic purchases whose PaymentIntent
    finished. Prints a line per purchase fixed and a summary; exits 1 if Stripe could not be reached.
    Safe to run while webhooks arrive, and from cron."""
    report = ReconcileReport(since=_ext().database.now() - since, dry_run=dry_run)
    try:
        reconcile.run(_ext(), report)
    except PaymentProviderError as exc:
        _print(report)
        raise click.ClickException(f"Stripe could not be reached ({exc.kind}): {exc.user_message}") from None
    _print(report)


def _print(report: ReconcileReport) -> None:
    for fix in report.fixes:
        owner = fix.wallet.user_id + (f" key {fix.wallet.key_id}" if fix.wallet.key_id else "")
        verb = "would be " if report.dry_run else ""
        purchase = "new" if fix.purchase_id is None else fix.purchase_id  # a dry run's plan invoice
        click.echo(f"purchase {purchase}\t{fix.reference}\t{owner}\t{verb}{fix.action}: {fix.detail}")
    click.echo(report.summary())
