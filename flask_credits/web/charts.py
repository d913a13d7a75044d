"""The chart of credits spent per day (inline SVG rendered on the server, no JavaScript) and the usage
the credits page and the admin wallet page show with it (``credits/_usage.html``)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime, time, timedelta, timezone
from typing import TYPE_CHECKING, NamedTuple

from markupsafe import Markup

from ..core import usage

if TYPE_CHECKING:
    from ..records import Wallet
    from ..storage.database import Database

#: Days the credits page charts, today (UTC) included.
DAYS = 30

_WIDTH, _HEIGHT, _TOP, _BOTTOM = 600, 150, 18, 20


def last_days(now: datetime, days: int = DAYS) -> tuple[datetime, datetime]:
    """``(since, until)``: from the start of the UTC day ``days - 1`` days ago to the end of today."""
    today = now.astimezone(timezone.utc).date()
    start = datetime.combine(today - timedelta(days=days - 1), time(), timezone.utc)
    return start, datetime.combine(today + timedelta(days=1), time(), timezone.utc)


class Usage(NamedTuple):
    """What ``credits/_usage.html`` shows: the chart, ``(day, credits)`` for every charted day, and
    credits per endpoint (most first; ``None`` for spends made without the decorator)."""

    chart: Markup
    days: list[tuple[date, int]]
    endpoints: dict[str | None, int]


def last_days_usage(db: Database, wallet: Wallet) -> Usage:
    """The wallet's spends over the last :data:`DAYS` UTC days, per day and per endpoint."""
    since, until = last_days(db.now())
    per_day = usage.usage(db, wallet, since=since, until=until, by="day")
    days = every_day(per_day, since)
    # No spends in the period, no second query.
    endpoints = usage.usage(db, wallet, since=since, until=until, by="endpoint") if per_day else {}
    return Usage(spent_per_day(days), days, endpoints)


def every_day(spent: Mapping[date, int], since: datetime, days: int = DAYS) -> list[tuple[date, int]]:
    """``(day, credits)`` for each of the ``days`` days from ``since``, 0 for days without spends."""
    first = since.date()
    return [(d, spent.get(d, 0)) for d in (first + timedelta(days=i) for i in range(days))]


def spent_per_day(days: list[tuple[date, int]]) -> Markup:
    """A bar per day, the highest labelled; its ``<title>`` and ``<desc>`` say what it shows for
    screen readers, and the page gives the numbers in a table too."""
    total = sum(n for _, n in days)
    top = max((n for _, n in days), default=0)
    first, last = days[0][0].isoformat(), days[-1][0].isoformat()
    busiest = max(days, key=lambda d: d[1])[0].isoformat() if top else None
    desc = f"{total} credits spent from {first} to {last}" + (
        f"; the most, {top}, on {busiest}." if busiest else "."
    )
    slot = _WIDTH / len(days)
    plot = _HEIGHT - _TOP - _BOTTOM
    bar = Markup(
        '<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" data-day="{day}" data-credits="{n}">'
        "<title>{day}: {n} credits</title></rect>"
    )
    bars = []
    for i, (day, n) in enumerate(days):
        height = plot * n / top if top else 0
        bars.append(
            bar.format(
                x=i * slot + slot * 0.15,
                y=_TOP + plot - height,
                w=slot * 0.7,
                h=height,
                day=day.isoformat(),
                n=n,
            )
        )
    return Markup(
        '<svg class="credits-chart-svg" viewBox="0 0 {w} {h}" role="img" '
        'aria-labelledby="credits-chart-title credits-chart-desc" data-testid="usage-chart">'
        '<title id="credits-chart-title">Credits spent per day, last {n} days</title>'
        '<desc id="credits-chart-desc">{desc}</desc>'
        '<line x1="0" y1="{base}" x2="{w}" y2="{base}" class="credits-chart-axis"/>'
        "{bars}"
        '<text x="0" y="12" class="credits-chart-label">{top} max</text>'
        '<text x="0" y="{h}" class="credits-chart-label">{first}</text>'
        '<text x="{w}" y="{h}" text-anchor="end" class="credits-chart-label">{last}</text>'
        "</svg>"
    ).format(
        w=_WIDTH,
        h=_HEIGHT - 4,
        base=_HEIGHT - _BOTTOM,
        n=len(days),
        desc=desc,
        bars=Markup("").join(bars),
        top=top,
        first=first,
        last=last,
    )
