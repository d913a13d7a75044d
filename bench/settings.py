"""How long and how big: the full run and the ``--quick`` smoke test."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    quick: bool
    threads: int = 8  # N for the concurrent loads
    duration: float = 3.0  # seconds measured per contender and round
    warmup: float = 0.5
    rounds: int = 3  # interleaved rounds per comparison
    server_workers: int = 4  # gunicorn sync workers
    server_requests: int = 1600  # requests per variant and round through gunicorn
    webhook_events: int = 1000
    entry_steps: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    wallet_steps: tuple[int, ...] = (1_000, 10_000, 100_000)
    emptied_lots: int = 1_000  # older lots, all emptied, of the wallet spend() is timed on (scale)
    scale_repeat: int = 300  # timed calls per operation and size
    scale_budget: float = 5.0  # seconds at most per operation and size (slow cells get fewer calls)
    query_repeat: int = 10  # calls per operation when counting statements
    profile: bool = False


FULL = Settings(quick=False)
QUICK = Settings(
    quick=True,
    duration=0.2,
    warmup=0.05,
    rounds=1,
    server_workers=2,
    server_requests=48,
    webhook_events=16,
    entry_steps=(1_000, 10_000),
    wallet_steps=(100, 1_000),
    scale_repeat=20,
    scale_budget=0.5,
    query_repeat=3,
)
