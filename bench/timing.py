"""Closed-loop load: T threads each run an operation back to back for a fixed time."""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

#: A worker is made inside its thread: (operation, cleanup).
Worker = tuple[Callable[[], object], Callable[[], None]]


@dataclass
class Measurement:
    ops: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, one per operation
    rounds: list[float] = field(default_factory=list)  # throughput of each round

    @property
    def throughput(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        """Latency percentile in milliseconds."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
        return ordered[index] * 1000

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.latencies) * 1000 if self.latencies else float("nan")

    def add(self, other: Measurement) -> None:
        self.ops += other.ops
        self.seconds += other.seconds
        self.latencies.extend(other.latencies)
        self.rounds.append(other.throughput)


def run_threads(
    make_worker: Callable[[int], Worker], threads: int, duration: float, warmup: float
) -> Measurement:
    """Run ``threads`` workers for ``warmup`` then ``duration`` seconds; only the latter is measured.

    Throughput is operations started in the measured window divided by its length; an operation is
    timed from its start to its return."""
    ready = threading.Barrier(threads + 1)
    go = threading.Event()
    window: list[float] = []
    per_thread: list[list[float]] = [[] for _ in range(threads)]
    failures: list[BaseException] = []

    def body(index: int) -> None:
        try:
            op, close = make_worker(index)
        except BaseException as exc:
            failures.append(exc)
            ready.abort()
            return
        try:
            ready.wait()
            go.wait()
            start, end = window
            out = per_thread[index]
            clock = time.perf_counter
            while True:
                t0 = clock()
                if t0 >= end:
                    break
                op()
                if t0 >= start:
                    out.append(clock() - t0)
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:
            failures.append(exc)
        finally:
            close()

    workers = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait()
    now = time.perf_counter()
    window.extend([now + warmup, now + warmup + duration])
    go.set()
    for worker in workers:
        worker.join()
    if failures:
        raise failures[0]
    latencies = [x for lat in per_thread for x in lat]
    result = Measurement(len(latencies), duration, latencies)
    result.rounds.append(result.throughput)
    return result


def compare(
    contenders: Sequence[tuple[str, Callable[[], Measurement]]], rounds: int
) -> dict[str, Measurement]:
    """Run each contender ``rounds`` times, interleaved and in alternating order, so that noise from
    other tenants of the machine falls on all of them alike; returns the pooled measurements."""
    pooled = {name: Measurement() for name, _ in contenders}
    for r in range(rounds):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name, run in order:
            pooled[name].add(run())
    return pooled


def time_calls(op: Callable[[], object], repeat: int) -> Measurement:
    """Call ``op`` ``repeat`` times in this thread (after one untimed call)."""
    op()
    latencies = []
    clock = time.perf_counter
    begin = clock()
    for _ in range(repeat):
        t0 = clock()
        op()
        latencies.append(clock() - t0)
    result = Measurement(repeat, clock() - begin, latencies)
    result.rounds.append(result.throughput)
    return result
