"""What ``CREDITS_DATABASE_POOLER = "transaction"`` costs on a direct connection: ``credits.spend()``
with psycopg's server-side prepared statements (the default: a statement is prepared on its 6th use)
and without them (``prepare_threshold = None``: parsed and planned by the server every time), two apps
on one database, taking turns in the same rounds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from flask import Flask

from flask_credits import FlaskCredits

from .app import BIG, build_app
from .env import Target
from .loads import Load, loads
from .settings import Settings
from .timing import Measurement, Worker, compare, run_threads

VARIANTS = {"prepared": {}, "unprepared": {"CREDITS_DATABASE_POOLER": "transaction"}}


@dataclass
class PrepareResult:
    load: Load
    prepared: Measurement
    unprepared: Measurement

    @property
    def ratio(self) -> float:
        return self.unprepared.throughput / self.prepared.throughput


def run(target: Target, settings: Settings) -> list[PrepareResult]:
    apps = {
        name: build_app(target.url, pool_size=settings.threads + 2, **config)
        for name, config in VARIANTS.items()
    }
    app, db, credits = apps["prepared"]
    with app.app_context():
        db.create_all()
        for wallet in {w for load in loads(settings) for w in load.wallets("prep")}:
            credits.grant(wallet, BIG, reason="bench")
    try:
        results = []
        for load in loads(settings):
            timed = compare(
                [(name, _runner(a, c, load, settings)) for name, (a, _, c) in apps.items()], settings.rounds
            )
            results.append(PrepareResult(load, timed["prepared"], timed["unprepared"]))
        return results
    finally:
        for a, d, _ in apps.values():
            with a.app_context():
                d.engine.dispose()


def _runner(app: Flask, credits: FlaskCredits, load: Load, settings: Settings) -> Callable[[], Measurement]:
    wallets = load.wallets("prep")

    def make_worker(index: int) -> Worker:
        context = app.app_context()
        context.push()
        wallet = wallets[index]
        return (lambda: credits.spend(wallet, 1, reason="bench"), context.pop)

    return lambda: run_threads(make_worker, load.threads, settings.duration, settings.warmup)
