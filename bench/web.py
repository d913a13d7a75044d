"""Section 3: a trivial view with and without ``@requires_credits(1)``, in process and through gunicorn."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from flask import Flask

from .env import ROOT, Target
from .settings import Settings
from .timing import Measurement, Worker, compare, run_threads


@dataclass
class WebResult:
    where: str
    free: Measurement
    paid: Measurement
    limit: Measurement  # the hand-written debit at the same concurrency, in the same rounds
    concurrency: int
    floor: Measurement | None = None  # the one-statement floor (PostgreSQL), same concurrency and rounds

    @property
    def reference(self) -> Measurement:
        return self.floor or self.limit

    @property
    def ratio(self) -> float:
        return self.paid.throughput / self.free.throughput

    @property
    def added_ms(self) -> float:
        """Added latency per request: mean decorated minus mean undecorated."""
        return self.paid.mean_ms - self.free.mean_ms

    @property
    def target_ratio(self) -> float:
        """Decorated throughput over that of "undecorated plus the reference's own cost": per-request
        time of the undecorated view plus that of one reference debit (the one-statement floor on
        PostgreSQL, else the hand-written limit) at the same concurrency."""
        expected = 1 / (1 / self.free.throughput + 1 / self.reference.throughput)
        return self.paid.throughput / expected


def in_process(
    app: Flask,
    settings: Settings,
    limit: Callable[[], Measurement],
    floor: Callable[[], Measurement] | None = None,
) -> WebResult:
    """One thread, ``app.test_client()``: the whole Flask request cycle without a socket; ``limit`` and
    ``floor`` (one connection) take turns with the two views."""

    def worker(path: str) -> Callable[[], Measurement]:
        def make(_: int) -> Worker:
            client = app.test_client()
            headers = {"X-Wallet": "web-0"}

            def request() -> None:
                response = client.post(path, headers=headers)
                if response.status_code != 200:
                    raise RuntimeError(f"{path} answered {response.status_code}")

            return request, lambda: None

        return lambda: run_threads(make, 1, settings.duration, settings.warmup)

    references = [("limit", limit)] + ([("floor", floor)] if floor is not None else [])
    pooled = compare([("free", worker("/free")), ("paid", worker("/paid")), *references], settings.rounds)
    return WebResult(
        "in process (test client, 1 thread)",
        pooled["free"],
        pooled["paid"],
        pooled["limit"],
        1,
        pooled.get("floor"),
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """gunicorn serving ``bench.wsgi:app`` on loopback, as a subprocess."""

    def __init__(self, target: Target, workers: int) -> None:
        self.port = _free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="fc_bench_gunicorn_", suffix=".log", delete=False)  # noqa: SIM115
        env = dict(os.environ, BENCH_DATABASE_URL=target.url, BENCH_POOL_SIZE="2")
        self.proc = subprocess.Popen(  # noqa: S603
            [
                sys.executable,
                "-m",
                "gunicorn",
                "--workers",
                str(workers),
                "--worker-class",
                "sync",
                "--bind",
                f"127.0.0.1:{self.port}",
                "--chdir",
                str(ROOT),
                "--log-level",
                "warning",
                "bench.wsgi:app",
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.workers = workers

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.output()}")
            try:
                status = post(self.port, "/free", None)
            except OSError:
                time.sleep(0.1)
                continue
            if status == 200:
                return
        raise RuntimeError(f"gunicorn did not answer within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def post(port: int, path: str, wallet: str | None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, headers={"X-Wallet": wallet} if wallet else {})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def fire(port: int, path: str, clients: int, total: int) -> Measurement:
    """``clients`` threads send ``total`` requests in all, each on a new connection (gunicorn's sync
    workers close it after every response)."""
    per_client = total // clients
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[str] = []

    def client(index: int) -> None:
        out = latencies[index]
        wallet = f"web-{index}"
        for _ in range(per_client):
            t0 = time.perf_counter()
            status = post(port, path, wallet)
            out.append(time.perf_counter() - t0)
            if status != 200:
                failures.append(f"{path} answered {status}")
                return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - begin
    if failures:
        raise RuntimeError(failures[0])
    flat = [x for lat in latencies for x in lat]
    result = Measurement(len(flat), elapsed, flat)
    result.rounds.append(result.throughput)
    return result


def through_server(
    target: Target,
    settings: Settings,
    limit: Callable[[], Measurement],
    floor: Callable[[], Measurement] | None = None,
) -> WebResult:
    """``settings.threads`` clients on their own wallets; ``limit`` and ``floor`` (as many threads and
    wallets) take turns with the two views."""
    server = Server(target, settings.server_workers)
    try:
        server.wait_ready()
        clients = settings.threads
        warm = max(clients * 2, settings.server_requests // 10)
        fire(server.port, "/free", clients, warm)
        fire(server.port, "/paid", clients, warm)
        pooled = compare(
            [
                ("free", lambda: fire(server.port, "/free", clients, settings.server_requests)),
                ("paid", lambda: fire(server.port, "/paid", clients, settings.server_requests)),
                ("limit", limit),
                *([("floor", floor)] if floor is not None else []),
            ],
            max(2, settings.rounds) if not settings.quick else 1,
        )
    finally:
        server.stop()
    where = f"gunicorn, {settings.server_workers} sync workers, {clients} client threads, loopback"
    return WebResult(where, pooled["free"], pooled["paid"], pooled["limit"], clients, pooled.get("floor"))
