"""Harness for the load and fault tests (tests/test_load.py, tests/test_faults.py); not collected.

It runs the example app as it would be deployed, under gunicorn with several workers on loopback, and
everything around it that the tests need to drive and to break it:

* :class:`Gunicorn` starts ``_reliability:wsgi()`` (the example app, configured from a JSON
  environment variable) against a database URL, and finds its workers, including the one that serves a
  given database connection (so a test can SIGKILL exactly the worker stuck inside a transaction), or
  SIGKILLs the whole host (master and workers);
* :class:`TcpProxy` is a loopback TCP proxy put between gunicorn and the database (or Stripe): ``down()``
  cuts every connection and refuses new ones, ``up()`` accepts them again; the real database servers
  are never touched, other tests use them;
* :class:`FakeStripe` is a small Stripe on loopback (the live ``StripeClient`` is pointed at it): it
  creates Checkout Sessions, answers lookups, and can fail on request (500, slow, dropped connection);
  it also makes the off-session PaymentIntents of auto top-up, one per Idempotency-Key, declining the
  cards named in ``declined_cards``, and hands each new one to ``on_intent`` (its webhook);
* :class:`Shop` is the test process's own view of the same database: schema, users, API keys, grants,
  row locks and lock waits, and :meth:`Shop.check`, which compares the database with what the clients
  were told (a :class:`Tally`); :func:`deliver` signs and posts Stripe events.

Every wait is bounded; every process, thread and socket started here is stopped by its ``close()``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import re
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WHSEC = "whsec_reliability_test"
STRIPE_KEY = "sk_test_reliability"
REDIS_URL = "redis://127.0.0.1:6379"
COST = 5  # PERSONA_COST of the app under test
#: Bound on any single HTTP call the clients make.
HTTP_TIMEOUT = 30.0
#: How long each long scenario runs (``CREDITS_RELIABILITY_SECONDS``); 0 is the short version CI runs.
SECONDS = float(os.environ.get("CREDITS_RELIABILITY_SECONDS") or 0)
#: The marks of every load and fault test: slow, on both server databases, a timeout that grows
#: with SECONDS.
MARKS = [
    pytest.mark.slow,
    pytest.mark.parametrize("database_url", ["postgresql", "mariadb"], indirect=True),
    pytest.mark.timeout(240 + 4 * SECONDS),
]
#: Bound on waiting for something to happen (a worker to start, a lock wait to show up...).
WAIT = 30.0
#: CREDITS_IDEMPOTENCY_LOCK_TIMEOUT of the app under test, in seconds: a request with an
#: Idempotency-Key whose worker died (or whose clean-up the database refused) is taken over, or
#: settled by ``flask credits expire``, this soon after it started. Short, so the tests need not wait
#: long; a scenario whose requests may queue longer than this under load sets a longer one.
LEASE = 2.0
#: A crossing not acted on because a later one was acted on first: the request that crossed acts on
#: its crossing right after its debit commits, so the later one's purchase started soon after it.
SUPERSEDED_WITHIN = timedelta(seconds=2)
#: CREDITS_PLANS of the app under test (live mode: these Price ids are the fake Stripe's).
PLANS = {
    "starter": {"price": "price_load_starter", "credits": 500, "name": "Starter"},
    "pro": {"price": "price_load_pro", "credits": 2000, "name": "Pro"},
}


#: CREDITS_PACKS of the app under test: the pack auto top-up buys in the mixed load.
TOP_UP_PACKS = {"refill": {"credits": 50, "amount": 50, "currency": "usd", "name": "Refill"}}
#: The saved cards of auto top-up wallets: the fake Stripe pays with the first and declines the second
#: (as Stripe's test cards ``pm_card_visa`` and ``pm_card_chargeDeclined`` do).
CARD, DECLINED_CARD = "pm_card_visa", "pm_card_chargeDeclined"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def backend_of(url: str) -> str:
    return sa.make_url(url).get_backend_name()


def via(url: str, port: int) -> str:
    """``url`` with its host and port replaced by the loopback ``port`` (a :class:`TcpProxy`)."""
    return sa.make_url(url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)


def engine_options(**connect_args: Any) -> dict[str, Any]:
    """What a deployment should set: a checked pool (pre-ping replaces connections a database restart
    or network cut left dead) and bounded connects."""
    args = {"connect_timeout": 5, **connect_args}
    return {
        "pool_pre_ping": True,
        "pool_size": 5,
        "max_overflow": 5,
        "pool_timeout": 10,
        "connect_args": args,
    }


# -- the app under gunicorn ---------------------------------------------------------------------------


def wsgi() -> Any:
    """gunicorn's entry point (``_reliability:wsgi()``): the example app, configured by the JSON in
    ``FC_RELIABILITY_APP``: ``{"config": {...}, "stripe_api": "http://127.0.0.1:PORT" | null}``."""
    spec = json.loads(os.environ["FC_RELIABILITY_APP"])
    from example_app import create_app

    return create_app({**spec["config"], "CREDITS_STRIPE_API_BASE": spec.get("stripe_api")})


def app_config(database_url: str, **overrides: Any) -> dict[str, Any]:
    """The example app's config for these tests: live Stripe mode (with the fake Stripe behind it), a
    known webhook secret, and CSRF off (clients here are API clients with X-API-Key)."""
    return {
        "SECRET_KEY": "reliability-secret-key",
        # Served outside debug and testing, the app wants a shared store for its login throttle (the
        # clients here use API keys, so nothing is counted in it).
        "RATELIMIT_STORAGE_URI": REDIS_URL,
        "SQLALCHEMY_DATABASE_URI": database_url,
        "SQLALCHEMY_ENGINE_OPTIONS": engine_options(),
        "WTF_CSRF_ENABLED": False,
        "CREDITS_STRIPE_MODE": "live",
        "STRIPE_SECRET_KEY": STRIPE_KEY,
        "STRIPE_WEBHOOK_SECRET": WHSEC,
        "CREDITS_STRIPE_TIMEOUT": 1.0,
        "CREDITS_STRIPE_MAX_RETRIES": 1,
        "PERSONA_COST": COST,
        "CREDITS_IDEMPOTENCY_LOCK_TIMEOUT": LEASE,
        "CREDITS_PLANS": PLANS,
        "CREDITS_PACKS": TOP_UP_PACKS,
        **overrides,
    }


class Gunicorn:
    """``gunicorn _reliability:wsgi()`` on a free loopback port, as a subprocess (gthread workers) in a
    process group of its own, so that :meth:`kill` can take down the master and its workers at once."""

    def __init__(
        self, config: dict[str, Any], *, stripe_api: str | None, workers: int = 3, threads: int = 4
    ) -> None:
        self.port = free_port()
        self.workers = workers
        self.log = tempfile.NamedTemporaryFile(prefix="fc_reliability_", suffix=".log", delete=False)  # noqa: SIM115
        self._final_output: str | None = None  # the log as it was when close() deleted it
        env = {
            **os.environ,
            "FC_RELIABILITY_APP": json.dumps({"config": config, "stripe_api": stripe_api}),
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        for name in ("FLASK_DEBUG", "DATABASE_URL", "CREDITS_STRIPE_MODE"):
            env.pop(name, None)
        self.proc = subprocess.Popen(
            [
                str(BIN / "gunicorn"),
                "--workers",
                str(workers),
                "--threads",
                str(threads),
                "--bind",
                f"127.0.0.1:{self.port}",
                "--chdir",
                str(ROOT),
                "--timeout",
                "60",
                "--graceful-timeout",
                "5",
                "--log-level",
                "warning",
                "_reliability:wsgi()",
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self.wait_ready()
        except BaseException:
            self.close()
            raise

    def wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if (
                    call(self.port, "GET", "/", timeout=5).status == 200
                    and len(self.worker_pids()) == self.workers
                ):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not answer within {WAIT} s:\n{self.output()}")

    def worker_pids(self) -> list[int]:
        """The live workers: children of the gunicorn master."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing parenthesis.
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == self.proc.pid and fields[0] not in ("Z", "X"):
                found.append(int(entry.name))
        return sorted(found)

    def worker_with_connection(self, local_port: int, remote_port: int) -> int | None:
        """The worker holding the TCP connection ``127.0.0.1:local_port -> :remote_port``."""
        inode = socket_inode(local_port, remote_port)
        if inode is None:
            return None
        for pid in self.worker_pids():
            with contextlib.suppress(OSError):
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    with contextlib.suppress(OSError):
                        if os.readlink(fd) == f"socket:[{inode}]":
                            return pid
        return None

    def kill_worker(self, pid: int, *, wait: bool = True) -> None:
        """SIGKILL one worker and (unless ``wait`` is False) wait until the master has replaced it."""
        os.kill(pid, signal.SIGKILL)
        if wait:
            self.wait_replaced(pid)

    def wait_replaced(self, pid: int) -> None:
        """Wait until the master has replaced the dead worker ``pid``."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            pids = self.worker_pids()
            if pid not in pids and len(pids) == self.workers:
                return
            time.sleep(0.05)
        raise RuntimeError(f"gunicorn did not replace worker {pid}:\n{self.output()}")

    def kill(self) -> None:
        """SIGKILL the master and its workers at once (the whole process group), as when a host dies,
        and wait until none of them runs."""
        workers = self.worker_pids()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(WAIT)
        deadline = time.monotonic() + WAIT
        while any(_running(pid) for pid in workers):
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers {workers} of the killed gunicorn still run")
            time.sleep(0.05)

    def output(self) -> str:
        """What gunicorn and the app logged so far (all of it, after :meth:`close`)."""
        if self._final_output is not None:
            return self._final_output
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def close(self) -> None:
        keep = os.environ.get("CREDITS_RELIABILITY_KEEP_LOGS")
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self._final_output = self.output()
        if keep:
            print(f"\ngunicorn log kept: {self.log.name}")
        else:
            with contextlib.suppress(OSError):
                os.unlink(self.log.name)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X")


def socket_inode(local_port: int, remote_port: int) -> int | None:
    """The inode of the established loopback TCP socket with these ports, from /proc/net/tcp."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                local, remote, inode = parts[1], parts[2], int(parts[9])
                if (
                    int(local.rsplit(":", 1)[1], 16) == local_port
                    and int(remote.rsplit(":", 1)[1], 16) == remote_port
                ):
                    return inode
    return None


# -- HTTP clients -----------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: Any  # parsed JSON, or the text
    headers: dict[str, str]  # names in lower case
    raw: bytes = b""  # the body as received

    @property
    def replayed(self) -> bool:
        """The stored answer of an earlier request with the same Idempotency-Key."""
        return self.headers.get("idempotent-replayed") == "true"

    @property
    def error(self) -> str | None:
        return self.body.get("error") if isinstance(self.body, dict) else None


def call(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    *,
    timeout: float = HTTP_TIMEOUT,
) -> Reply:
    """One request on a fresh connection. Raises OSError or HTTPException if the connection drops."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, (str, bytes)) or body is None else json.dumps(body)
        sent = dict(headers or {})
        if body is not None and "Content-Type" not in sent:
            sent["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        raw = response.read()
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = raw.decode(errors="replace")
        return Reply(response.status, parsed, {k.lower(): v for k, v in response.getheaders()}, raw)
    finally:
        conn.close()


def spend(port: int, secret: str, seed: str = "reliability", *, key: str | None = None) -> Reply:
    """POST /api/personas with an API key: costs ``COST`` credits (once per ``key``, if given, sent as
    the ``Idempotency-Key`` header)."""
    headers = {"X-API-Key": secret} | ({"Idempotency-Key": key} if key else {})
    return call(port, "POST", "/api/personas", {"seed": seed}, headers)


@dataclass
class Streamed:
    """One ``POST /api/stories`` as its client saw it (the streaming scenario)."""

    wallet: str
    seed: str
    status: int | str  # the HTTP status, or the exception's name when no answer came
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case
    chunks: list[str] = field(default_factory=list)  # the story's chunks read, in order
    ended: bool = False  # the body's last, empty chunk arrived, then the server closed the connection
    out_of_credits: bool = False  # the story stopped with the "[out of credits ...]" line
    left_after: int | None = None  # the client hung up on purpose after reading this many chunks
    arrived: int = 0  # chunks the server had started sending, not read, when the client hung up
    body: Any = None  # the answer when it was not a stream (a 402...)
    broken: str | None = None  # the exception that cut the stream

    @property
    def lost(self) -> bool:
        """No answer, or a stream broken without the client hanging up (a killed worker)."""
        return isinstance(self.status, str) or (
            self.status == 200 and not self.ended and self.left_after is None
        )


class _ChunkedReader:
    """An HTTP/1.1 response read off a socket, one chunk of a chunked body at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise http.client.IncompleteRead(self.buf)
        self.buf += data

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def exactly(self, size: int) -> bytes:
        while len(self.buf) < size:
            self._fill()
        data, self.buf = self.buf[:size], self.buf[size:]
        return data

    def head(self) -> tuple[int, dict[str, str]]:
        status = int(self.line().split()[1])
        headers = {}
        while line := self.line():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    def chunk(self) -> bytes | None:
        """The next chunk's data, or None at the end of the body."""
        size = int(self.line().split(b";")[0], 16)
        if size == 0:
            while self.line():  # trailers, up to the blank line
                pass
            return None
        data = self.exactly(size)
        if self.exactly(2) != b"\r\n":
            raise http.client.HTTPException("a chunk without its CRLF")
        return data

    def body(self, headers: dict[str, str]) -> bytes:
        if headers.get("transfer-encoding") == "chunked":
            return b"".join(iter(self.chunk, None))
        if "content-length" in headers:
            return self.exactly(int(headers["content-length"]))
        self.until_closed()
        return self.buf

    def until_closed(self) -> None:
        """Read on until the server closes the connection."""
        with contextlib.suppress(http.client.IncompleteRead):
            while True:
                self._fill()

    def started_chunks(self) -> int:
        """Chunks the server has started sending that were not read yet (in this buffer or still in
        the socket), counted without reading them; a partial size line counts."""
        pending = self.buf
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            pending += self.sock.recv(1 << 20, socket.MSG_PEEK)
        count, at = 0, 0
        while at < len(pending):
            end = pending.find(b"\r\n", at)
            if end < 0:
                return count + 1
            size = int(pending[at:end].split(b";")[0], 16)
            if size == 0:
                break
            count += 1
            at = end + 2 + size + 2
        return count


#: The line a story ends with when its wallet cannot pay for the next chunk.
OUT_OF_CREDITS = "[out of credits"


def stream_story(
    port: int,
    wallet: Wallet,
    seed: str,
    *,
    leave_after: int | None = None,
    on_connect: Callable[[int], object] | None = None,
    timeout: float = HTTP_TIMEOUT,
) -> Streamed:
    """POST /api/stories with the wallet's API key and read the streamed story chunk by chunk, to the
    end (the last chunk, then the server closing the connection), or hang up (close the socket) after
    ``leave_after`` chunks. ``on_connect`` gets the client's
    local port once connected. A dropped connection is recorded in the result (``lost``), not raised.
    Each socket operation is bounded by ``timeout``."""
    payload = json.dumps({"seed": seed}).encode()
    head = (
        f"POST /api/stories HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-API-Key: {wallet.secret}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    seen = Streamed(wallet.name, seed, "ConnectionError")
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as exc:
        seen.status = type(exc).__name__
        return seen
    try:
        if on_connect is not None:
            on_connect(sock.getsockname()[1])
        sock.sendall(head.encode() + payload)
        reader = _ChunkedReader(sock)
        status, seen.headers = reader.head()
        seen.status = status
        if status != 200:
            raw = reader.body(seen.headers)
            try:
                seen.body = json.loads(raw)
            except ValueError:
                seen.body = raw.decode(errors="replace")
            return seen
        while True:
            if leave_after is not None and len(seen.chunks) >= leave_after:
                seen.left_after, seen.arrived = len(seen.chunks), reader.started_chunks()
                return seen  # the socket is closed below, with whatever the server sent unread
            data = reader.chunk()
            if data is None:
                # Asked for "Connection: close", the server closes the socket after it closed the
                # response, so once the socket is closed the story's hold has been settled.
                reader.until_closed()
                seen.ended = True
                return seen
            text = data.decode()
            if OUT_OF_CREDITS in text:
                seen.out_of_credits = True
            else:
                seen.chunks.append(text)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if isinstance(seen.status, int):
            seen.broken = type(exc).__name__
        else:
            seen.status = type(exc).__name__
        return seen
    finally:
        sock.close()


def until_not_in_progress(send: Callable[[], Reply]) -> tuple[Reply, int]:
    """Send, and send again after ``Retry-After`` while the answer is 409 "still in progress", as a
    client with an Idempotency-Key should; for at most LEASE + WAIT seconds. Returns the last answer
    and how many 409s came before it."""
    deadline = time.monotonic() + LEASE + WAIT
    for waited in range(1000):
        reply = send()
        if reply.error != "idempotency_request_in_progress" or time.monotonic() > deadline:
            return reply, waited
        time.sleep(float(reply.headers["retry-after"]))
    raise AssertionError("still in progress after 1000 tries")


def checkout(port: int, secret: str, quantity: int) -> Reply:
    return call(port, "POST", "/credits/checkout", {"quantity": quantity}, {"X-API-Key": secret})


def subscribe(port: int, secret: str, plan: str) -> Reply:
    return call(port, "POST", "/credits/subscribe", {"plan": plan}, {"X-API-Key": secret})


def deliver(port: int, event: dict[str, Any], *, timeout: float = HTTP_TIMEOUT) -> Reply:
    """Post a Stripe event to the webhook, signed with the app's secret, as Stripe would."""
    from flask_credits import testing

    payload = json.dumps(event)
    headers = {"Stripe-Signature": testing.sign(payload, WHSEC), "Content-Type": "application/json"}
    return call(port, "POST", "/credits/stripe-webhook", payload, headers, timeout=timeout)


# -- a TCP proxy that can cut the line ----------------------------------------------------------------


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target``. ``down()`` closes every open connection and
    the listening socket (new connections are refused); ``up()`` listens on the same port again. One
    thread with a selector does all the work; the other methods hand it commands."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.accepted = 0
        self.cuts = 0
        #: Local port of each upstream connection -> port of the client it serves: the database sees
        #: the first, :meth:`Gunicorn.worker_with_connection` needs the second.
        self.routes: dict[int, int] = {}
        self._listener: socket.socket | None = None
        self._peers: dict[socket.socket, socket.socket] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._commands: queue.Queue[tuple[Callable[[], None], threading.Event]] = queue.Queue()
        self._closed = False
        self._listen()
        self._thread = threading.Thread(target=self._loop, name=f"proxy-{self.port}", daemon=True)
        self._thread.start()

    def down(self) -> None:
        self._do(self._cut)

    def up(self) -> None:
        self._do(self._listen)

    def close(self) -> None:
        if self._thread.is_alive():
            self._do(self._shutdown)
            self._thread.join(WAIT)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _do(self, command: Callable[[], None]) -> None:
        done = threading.Event()
        self._commands.put((command, done))
        self._wake_w.send(b"!")
        if not done.wait(WAIT):
            raise RuntimeError("the proxy thread did not answer")

    def _listen(self) -> None:
        if self._listener is not None:
            return
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.setblocking(False)
        self._selector.register(listener, selectors.EVENT_READ)
        self._listener = listener

    def _cut(self) -> None:
        if self._listener is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
        for sock in list(self._peers):
            self._drop(sock)
        self.cuts += 1

    def _shutdown(self) -> None:
        self._cut()
        self._closed = True

    def _drop(self, sock: socket.socket) -> None:
        peer = self._peers.pop(sock, None)
        for s in (sock, peer):
            if s is not None:
                self._peers.pop(s, None)
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(s)
                s.close()

    def _loop(self) -> None:
        while not self._closed:
            for key, _ in self._selector.select(timeout=1.0):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._wake_r:
                    sock.recv(1024)
                    while not self._commands.empty():
                        command, done = self._commands.get()
                        command()
                        done.set()
                    break  # the sockets of this round may be closed now
                if sock is self._listener:
                    self._accept()
                elif sock in self._peers:
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        self._drop(sock)
                        continue
                    try:
                        self._peers[sock].sendall(data)
                    except OSError:
                        self._drop(sock)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setblocking(True)
            s.settimeout(10)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._selector.register(s, selectors.EVENT_READ)
        self._peers[client], self._peers[upstream] = upstream, client
        self.routes[upstream.getsockname()[1]] = client.getpeername()[1]
        self.accepted += 1


# -- a Stripe on loopback -----------------------------------------------------------------------------


class FakeStripe:
    """Enough of Stripe's API for flask_credits: create customers; create, retrieve and list Checkout
    Sessions; find the paid invoice of a PaymentIntent (``add_invoice``) and retrieve it.

    ``mode`` decides how ``POST /v1/checkout/sessions`` answers: ``"ok"``, ``"error"`` (500 with a
    Stripe error body), ``"slow"`` (answers after ``slow_seconds``, past the app's timeout) or
    ``"drop"`` (closes the connection without an answer). ``on_create`` runs before a session is
    created (a test cuts the database there). Every create request is kept in ``creates`` as
    ``(idempotency key, mode)``.

    ``POST /v1/payment_intents`` (auto top-up's off-session payments, ``confirm=true``) makes one
    PaymentIntent per Idempotency-Key, as Stripe keeps keys: a request with a key already used gets
    the first answer again. It succeeds, or is declined (402 ``card_error`` naming the PaymentIntent,
    as Stripe answers) when its payment method is one of ``declined_cards``. Every request is kept in
    ``intent_requests`` as ``(idempotency key, params)``, every PaymentIntent in ``intents`` by key;
    ``on_intent(event type, intent)`` gets each new one before it is answered (Stripe sends its
    ``payment_intent.*`` event whatever happens to the answer).
    """

    def __init__(self) -> None:
        self.mode = "ok"
        self.slow_seconds = 3.0
        self.on_create: Callable[[], None] | None = None
        self.sessions: dict[str, dict[str, Any]] = {}
        self.by_key: dict[str, dict[str, Any]] = {}  # Idempotency-Key -> session, as Stripe keeps them
        self.creates: list[tuple[str | None, str]] = []
        self.customers: dict[str, dict[str, Any]] = {}  # Idempotency-Key -> customer (mode ignored)
        self.invoices: dict[str, dict[str, Any]] = {}  # id -> a paid invoice
        self.invoice_of: dict[str, str] = {}  # PaymentIntent -> the invoice it paid
        self.declined_cards: set[str] = {DECLINED_CARD}
        self.on_intent: Callable[[str, dict[str, Any]], None] | None = None
        self.intent_requests: list[tuple[str | None, dict[str, str]]] = []
        self.intents: dict[str, tuple[int, dict[str, Any]]] = {}  # Idempotency-Key -> (status, body)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        stripe = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                if urlsplit(self.path).path == "/v1/customers":  # one per key, as Stripe keeps them
                    with stripe._lock:
                        key = self.headers.get("Idempotency-Key") or secrets.token_hex(8)
                        customer = stripe.customers.setdefault(
                            key, {"id": "cus_test_" + secrets.token_hex(7), "object": "customer"}
                        )
                    return self.reply(200, customer)
                if urlsplit(self.path).path == "/v1/payment_intents":
                    return self.reply(*stripe._payment_intent(self.headers.get("Idempotency-Key"), form))
                if urlsplit(self.path).path != "/v1/checkout/sessions":
                    return self.reply(404, {"error": {"type": "invalid_request_error", "message": "no"}})
                return stripe._create(self, form)

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if parts.path == "/v1/checkout/sessions":
                    intent = parse_qs(parts.query).get("payment_intent", [""])[0]
                    with stripe._lock:
                        found = [s for s in stripe.sessions.values() if s["payment_intent"] == intent]
                    return self.reply(200, {"object": "list", "data": found[:1], "has_more": False})
                if parts.path == "/v1/invoice_payments":
                    intent = parse_qs(parts.query).get("payment[payment_intent]", [""])[0]
                    with stripe._lock:
                        invoice_id = stripe.invoice_of.get(intent)
                    payments = (
                        [
                            {
                                "id": "inpay_" + invoice_id,
                                "object": "invoice_payment",
                                "invoice": invoice_id,
                                "payment": {"type": "payment_intent", "payment_intent": intent},
                                "status": "paid",
                            }
                        ]
                        if invoice_id
                        else []
                    )
                    return self.reply(200, {"object": "list", "data": payments, "has_more": False})
                if parts.path.startswith("/v1/invoices/"):
                    with stripe._lock:
                        invoice = stripe.invoices.get(parts.path.rsplit("/", 1)[-1])
                    if invoice is None:
                        return self.reply(
                            404, {"error": {"type": "invalid_request_error", "message": "none"}}
                        )
                    return self.reply(200, invoice)
                session_id = parts.path.rsplit("/", 1)[-1]
                with stripe._lock:
                    session = stripe.sessions.get(session_id)
                if session is None:
                    return self.reply(404, {"error": {"type": "invalid_request_error", "message": "none"}})
                return self.reply(200, session)

            def reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Request-Id", "req_" + secrets.token_hex(6))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that timed out and left is expected here

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,), daemon=True)
        self._thread.start()

    def add_invoice(self, invoice: dict[str, Any], payment_intent: str) -> None:
        """Stripe knows ``invoice`` as paid by ``payment_intent``."""
        with self._lock:
            self.invoices[invoice["id"]] = invoice
            self.invoice_of[payment_intent] = invoice["id"]

    def _create(self, handler: Any, form: dict[str, str]) -> None:
        mode = self.mode
        key = handler.headers.get("Idempotency-Key")
        with self._lock:
            self.creates.append((key, mode))
        if self.on_create is not None:
            self.on_create()
        if mode == "error":
            return handler.reply(500, {"error": {"type": "api_error", "message": "Something went wrong."}})
        if mode == "drop":
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return None
        if mode == "slow":
            self._closing.wait(self.slow_seconds)
        with self._lock:
            if key in self.by_key:  # a retry: Stripe answers with the session it created the first time
                return handler.reply(200, self.by_key[key])
        from flask_credits import testing

        unit = int(form.get("line_items[0][price_data][unit_amount]", "0"))
        session = testing.checkout_session(
            "cs_test_" + secrets.token_hex(12),
            amount_total=unit * int(form.get("line_items[0][quantity]", "1")),
            currency=form.get("line_items[0][price_data][currency]", "usd"),
            payment_status="unpaid",
            status="open",
            client_reference_id=form.get("client_reference_id"),
            metadata={k[9:-1]: v for k, v in form.items() if k.startswith("metadata[")},
        )
        session["payment_intent"] = None
        with self._lock:
            self.sessions[session["id"]] = session
            if key:
                self.by_key[key] = session
        return handler.reply(200, session)

    def _payment_intent(self, key: str | None, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """An off-session PaymentIntent, confirmed at once: ``(HTTP status, body)``."""
        from flask_credits import testing

        with self._lock:
            self.intent_requests.append((key, form))
            if key is not None and key in self.intents:  # a retry: the first answer, nothing charged
                return self.intents[key]
            declined = form.get("payment_method") in self.declined_cards
            intent = testing.payment_intent(
                amount=int(form["amount"]),
                currency=form["currency"],
                status="requires_payment_method" if declined else "succeeded",
                metadata={k[9:-1]: v for k, v in form.items() if k.startswith("metadata[")},
                payment_method=form.get("payment_method"),
                customer=form.get("customer"),
                decline_code="generic_decline" if declined else None,
            )
            answer: tuple[int, dict[str, Any]] = (200, intent)
            if declined:
                error = {
                    "type": "card_error",
                    "code": "card_declined",
                    "decline_code": "generic_decline",
                    "message": "Your card was declined.",
                    "payment_intent": intent,
                }
                answer = (402, {"error": error})
            self.intents[key or intent["id"]] = answer
        if self.on_intent is not None:
            self.on_intent(
                "payment_intent.payment_failed" if declined else "payment_intent.succeeded", intent
            )
        return answer

    def payment_intents_of(
        self, users: set[str]
    ) -> tuple[list[tuple[str | None, dict[str, str]]], dict[str, tuple[int, dict[str, Any]]]]:
        """The PaymentIntent requests and PaymentIntents whose ``metadata[userId]`` is one of ``users``."""
        with self._lock:
            requests = [r for r in self.intent_requests if r[1].get("metadata[userId]") in users]
            intents = {
                key: answer
                for key, answer in self.intents.items()
                if _intent(answer[1])["metadata"].get("userId") in users
            }
        return requests, intents

    def pay(self, session_id: str) -> dict[str, Any]:
        """The customer paid: the session is complete and has a payment intent. Returns a copy."""
        with self._lock:
            session = self.sessions[session_id]
            session.update(status="complete", payment_status="paid", url=None)
            session["payment_intent"] = "pi_test_" + secrets.token_hex(12)
            return dict(session)

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(WAIT)


# -- the test process's side: setup and checks -------------------------------------------------------


@dataclass
class Wallet:
    user_id: str
    key_id: str
    secret: str

    @property
    def name(self) -> str:
        return f"{self.user_id}/{self.key_id}"


@dataclass
class Paid:
    """A purchase the customer paid, and what Stripe later took back."""

    wallet: str
    session_id: str
    payment_intent: str
    credits: int
    amount: int
    refunded: int = 0  # highest cumulative amount_refunded sent
    disputed: int = 0  # amount of a lost dispute sent


@dataclass
class PaidInvoice:
    """A paid invoice of a plan (the first or a renewal): its allowance, and what a refund took back."""

    wallet: str
    invoice_id: str
    payment_intent: str
    credits: int  # the allowance of the plan the invoice charged for
    amount: int
    refunded: int = 0  # highest cumulative amount_refunded sent


@dataclass
class AutoTopUpWallet:
    """A wallet with auto top-up on in the load: its settings, as set before it started."""

    wallet: str
    threshold: int
    credits: int  # what its pack buys
    amount: int  # what its pack costs, in cents
    cap: int  # the monthly cap, in cents
    card: str  # the saved payment method: the fake Stripe declines DECLINED_CARD

    @property
    def declines(self) -> bool:
        return self.card == DECLINED_CARD


#: The error code of each answer a request with an Idempotency-Key may get instead of a run or replay.
EXPECTED_ERRORS = {
    402: "insufficient_credits",
    409: "idempotency_request_in_progress",
    422: "idempotency_key_reused",
}


@dataclass(frozen=True)
class Keyed:
    """One answer to ``POST /api/personas`` sent with an Idempotency-Key (the same-key storm)."""

    wallet: str
    key: str
    seed: str  # what the request asked for: requests with one key and one seed are the same request
    status: int | str  # the HTTP status, or the exception's name when the answer was lost
    replayed: bool = False
    error: str | None = None
    raw: bytes = b""

    @property
    def ran(self) -> bool:
        """The view ran for this request: 200 and not a replay."""
        return self.status == 200 and not self.replayed

    @property
    def lost(self) -> bool:
        """No answer (a killed worker) or 503: the request may or may not have run and spent."""
        return isinstance(self.status, str) or self.status == 503


@dataclass
class Tally:
    """What the clients were told, to compare with the database afterwards."""

    granted: Counter[str] = field(default_factory=Counter)
    spent_ok: Counter[str] = field(default_factory=Counter)  # 200 answers, per wallet
    spent_unknown: Counter[str] = field(default_factory=Counter)  # dropped or 5xx: may or may not have spent
    refused: Counter[str] = field(default_factory=Counter)  # 402 answers
    late_402: list[tuple[str, datetime]] = field(default_factory=list)  # 402 showing a payable balance
    statuses: Counter[str] = field(default_factory=Counter)  # "route status" -> count
    paid: dict[str, Paid] = field(default_factory=dict)  # session id -> purchase
    unpaid_sessions: set[str] = field(default_factory=set)
    # Plans: every paid invoice of a subscription the app created (invoice id -> it), the invoices
    # paid for subscriptions it did not create (recorded, never credited), and per wallet the credits
    # its upgrades grant (the difference in allowance for the rest of the period).
    invoices: dict[str, PaidInvoice] = field(default_factory=dict)
    foreign_invoices: set[str] = field(default_factory=set)
    upgraded: Counter[str] = field(default_factory=Counter)
    subscriptions: int = 0
    plans: dict[str, str] = field(default_factory=dict)  # Stripe subscription id -> its plan at the end
    events: set[str] = field(default_factory=set)  # every event id acknowledged with 200
    deliveries: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    keyed: list[Keyed] = field(default_factory=list)  # every answer of the same-key storm
    # Every story streamed. A wallet's stories come from one client, one after the other, so its
    # holds in id order are its stories answered 200, in order (``Shop.check_streams``).
    streams: list[Streamed] = field(default_factory=list)
    # Auto top-up: the wallets it is on for (by name), the most automatic purchases seen in flight at
    # once per wallet, what ``flask credits top-up --due`` said afterwards, and what the fake Stripe
    # was asked about these wallets: every PaymentIntent request ``(Idempotency-Key, params)`` and
    # every PaymentIntent it made (key -> its answer, ``(status, body)``).
    auto: dict[str, AutoTopUpWallet] = field(default_factory=dict)
    in_flight_seen: Counter[str] = field(default_factory=Counter)
    sweep: str = ""
    intent_requests: list[tuple[str | None, dict[str, str]]] = field(default_factory=list)
    intents: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, route: str, status: int | str) -> None:
        with self.lock:
            self.statuses[f"{route} {status}"] += 1


class Shop:
    """The test process's own app on the same database (direct, no proxy)."""

    def __init__(self, database_url: str) -> None:
        from example_app import create_app

        self.url = database_url
        self.backend = backend_of(database_url)
        #: For reports: this project runs MariaDB behind SQLAlchemy's "mysql" dialect.
        self.label = "mariadb" if self.backend == "mysql" else self.backend
        self.app = create_app(app_config(database_url))

    def migrate(self) -> None:
        import flask_migrate

        with self.app.app_context():
            flask_migrate.upgrade()

    def close(self) -> None:
        from example_app.models import db

        with self.app.app_context():
            db.engine.dispose()

    @property
    def credits(self) -> Any:
        return self.app.extensions["credits"]

    @property
    def engine(self) -> sa.Engine:
        with self.app.app_context():
            return self.app.extensions["sqlalchemy"].engine  # type: ignore[no-any-return]

    def wallets(self, users: int, keys_per_user: int) -> list[Wallet]:
        """New users, each with API keys; returns the keys' wallets."""
        from example_app.models import ApiKey, User, db

        found = []
        with self.app.app_context():
            for _ in range(users):
                user = User(username="u" + secrets.token_hex(6))
                user.password_hash = "-"  # nobody logs in: the clients use API keys
                db.session.add(user)
                issued = [ApiKey.issue(user, f"key {k}") for k in range(keys_per_user)]
                db.session.commit()
                found += [Wallet(str(user.id), key.id, secret) for key, secret in issued]
        return found

    def grant(self, wallet: Wallet, amount: int, tally: Tally) -> None:
        with self.app.app_context():
            self.credits.grant(wallet.user_id, amount, key_id=wallet.key_id, reason="reliability stock")
        tally.granted[wallet.name] += amount

    def with_customer(self, wallet: Wallet) -> None:
        """Give the wallet's user a Stripe Customer, as their first checkout would have."""
        now = datetime.now(timezone.utc)
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(self.credits.tables.customers).values(
                    user_id=wallet.user_id,
                    stripe_customer_id="cus_test_" + secrets.token_hex(7),
                    idempotency_key="cus_" + secrets.token_hex(16),
                    created_at=now,
                    updated_at=now,
                )
            )

    def auto_top_up(
        self, wallet: Wallet, tally: Tally, *, threshold: int, packs_a_month: int, card: str = CARD
    ) -> None:
        """Save ``card`` for the wallet (as a setup-mode Checkout Session would) and turn auto top-up
        on: buy TOP_UP_PACKS' pack when a debit takes it below ``threshold``, at most
        ``packs_a_month`` of them a month. The wallet's user gets a Stripe Customer first."""
        from flask_credits import Wallet as CreditsWallet
        from flask_credits.services import auto_top_up

        ((pack_id, pack),) = TOP_UP_PACKS.items()
        cap = packs_a_month * int(pack["amount"])
        self.with_customer(wallet)
        with self.app.app_context():
            owner = CreditsWallet(wallet.user_id, wallet.key_id)
            auto_top_up.save_card(self.credits, owner, payment_method=card, brand="visa", last4="4242")
            self.credits.set_auto_top_up(
                wallet.user_id,
                wallet.key_id,
                enabled=True,
                threshold=threshold,
                monthly_cap=cap,
                pack=pack_id,
            )
        tally.auto[wallet.name] = AutoTopUpWallet(
            wallet.name, threshold, int(pack["credits"]), int(pack["amount"]), cap, card
        )

    def in_flight(self, wallets: list[Wallet]) -> Counter[str]:
        """Automatic purchases in flight (``creating`` or ``open``) per wallet, in one statement: one
        snapshot of the database."""
        p, w = self.credits.tables.purchases, self.credits.tables.wallets
        query = (
            sa.select(w.c.user_id, w.c.key_id, sa.func.count())
            .join(p, p.c.wallet_id == w.c.id)
            .where(
                p.c.automatic.is_(True),
                p.c.status.in_(["creating", "open"]),
                w.c.key_id.in_([x.key_id for x in wallets]),
            )
            .group_by(w.c.user_id, w.c.key_id)
        )
        with self.engine.connect() as conn:
            return Counter({f"{u}/{k}": int(n) for u, k, n in conn.execute(query)})

    def top_up_due(self, stripe: FakeStripe, tally: Tally) -> None:
        """What cron does after the load: ``flask credits top-up --due`` once, through the CLI, with
        the app's config as served (its Stripe is the fake one), to finish any automatic purchase a
        killed or slow worker left, and act on any crossing nobody acted on. Then takes what the fake
        Stripe was asked about the tally's auto top-up wallets into the tally."""
        env = {
            **os.environ,
            "FC_RELIABILITY_APP": json.dumps(
                {"config": app_config(self.url), "stripe_api": f"http://127.0.0.1:{stripe.port}"}
            ),
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        }
        for name in ("FLASK_DEBUG", "DATABASE_URL", "CREDITS_STRIPE_MODE"):
            env.pop(name, None)
        result = subprocess.run(
            [str(BIN / "flask"), "--app", "_reliability:wsgi()", "credits", "top-up", "--due"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            tally.problems.append(f"flask credits top-up --due exited {result.returncode}: {result.stderr}")
        tally.sweep = result.stdout.strip()
        tally.intent_requests, tally.intents = stripe.payment_intents_of(
            {name.split("/", 1)[0] for name in tally.auto}
        )

    def balance(self, wallet: Wallet) -> int:
        with self.app.app_context():
            return int(self.credits.balance(wallet.user_id, wallet.key_id))

    def audit(self) -> list[str]:
        with self.app.app_context():
            return list(self.credits.audit())

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``flask --app example_app ARGS``, the operator's command, as a process of its own."""
        env = {**os.environ, "DATABASE_URL": self.url, "CREDITS_STRIPE_MODE": "live"}
        env.pop("FLASK_DEBUG", None)
        return subprocess.run(
            [str(BIN / "flask"), "--app", "example_app", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def rows(self, table: str) -> list[Any]:
        t = self.credits.tables
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(getattr(t, table))).all())

    def wallet_id(self, wallet: Wallet) -> int:
        w = self.credits.tables.wallets
        with self.engine.connect() as conn:
            query = sa.select(w.c.id).where(w.c.user_id == wallet.user_id, w.c.key_id == wallet.key_id)
            return int(conn.execute(query).scalar_one())

    def lot_ids(self, wallet: Wallet) -> list[int]:
        lt = self.credits.tables.lots
        with self.engine.connect() as conn:
            query = sa.select(lt.c.id).where(lt.c.wallet_id == self.wallet_id(wallet)).order_by(lt.c.id)
            return [int(i) for i in conn.execute(query).scalars()]

    def request_rows(self, wallet: Wallet) -> list[Any]:
        """The wallet's Idempotency-Key requests (``credits_requests``), oldest first."""
        r = self.credits.tables.requests
        with self.engine.connect() as conn:
            query = (
                sa.select(r)
                .where(r.c.user_id == wallet.user_id, r.c.key_id == wallet.key_id)
                .order_by(r.c.id)
            )
            return list(conn.execute(query).all())

    def rows_where(self, table: str, wallet: Wallet) -> list[Any]:
        """The wallet's rows of a credits table with a ``wallet_id`` (holds, lots...), by id."""
        t = getattr(self.credits.tables, table)
        with self.engine.connect() as conn:
            query = sa.select(t).where(t.c.wallet_id == self.wallet_id(wallet)).order_by(t.c.id)
            return list(conn.execute(query).all())

    def wallet_row(self, wallet: Wallet) -> Any:
        """The wallet's row as stored (no lazy expiry runs)."""
        w = self.credits.tables.wallets
        with self.engine.connect() as conn:
            return conn.execute(sa.select(w).where(w.c.id == self.wallet_id(wallet))).one()

    def purchases_of(self, wallet: Wallet) -> list[Any]:
        p = self.credits.tables.purchases
        with self.engine.connect() as conn:
            query = sa.select(p).where(p.c.wallet_id == self.wallet_id(wallet)).order_by(p.c.id)
            return list(conn.execute(query).all())

    @contextlib.contextmanager
    def holding(self, table: str, row_id: int) -> Iterator[sa.Connection]:
        """Hold ``SELECT ... FOR UPDATE`` on one row of a credits table until the block ends (then roll
        back): a writer of that row waits inside its transaction meanwhile. Yields the connection."""
        t = getattr(self.credits.tables, table)
        with self.engine.connect() as conn:
            tx = conn.begin()
            try:
                conn.execute(sa.select(t.c.id).where(t.c.id == row_id).with_for_update()).one()
                yield conn
            finally:
                tx.rollback()

    def lock_waiter(self, ended: Callable[[], object] | None = None) -> tuple[int, int]:
        """The database session waiting for a row lock in this database: ``(session id, its client
        port)``. Waits up to ``WAIT`` seconds for exactly one to show up; fails at once, showing it, if
        ``ended()`` returns something (the request that should be waiting answered instead)."""
        if self.backend == "postgresql":
            query = (
                "SELECT pid, client_port FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        else:
            query = (
                "SELECT p.ID, p.HOST FROM information_schema.INNODB_TRX t"
                " JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id"
                " WHERE t.trx_state = 'LOCK WAIT' AND p.DB = DATABASE()"
            )
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            with self.engine.connect() as conn:  # a new transaction each time: fresh statistics
                rows = conn.execute(sa.text(query)).all()
            if len(rows) == 1:
                session, client = rows[0]
                return int(session), int(str(client).rsplit(":", 1)[-1])
            if len(rows) > 1:
                raise AssertionError(f"more than one session waits for a lock: {rows}")
            outcome = ended() if ended is not None else None
            if outcome is not None:
                raise AssertionError(f"the request ended instead of waiting for the lock: {outcome!r}")
            # InnoDB refreshes INNODB_TRX only when nobody read it for 0.1 s: poll slower than that.
            time.sleep(0.02 if self.backend == "postgresql" else 0.15)
        with self.engine.connect() as conn:
            if self.backend == "postgresql":
                sessions = conn.execute(
                    sa.text("SELECT * FROM pg_stat_activity WHERE datname = current_database()")
                )
            else:
                sessions = conn.execute(
                    sa.text("SELECT * FROM information_schema.PROCESSLIST WHERE DB = DATABASE()")
                )
            seen = "\n".join(str(tuple(r)) for r in sessions)
            if self.backend != "postgresql":
                trx = conn.execute(
                    sa.text("SELECT trx_state, trx_mysql_thread_id FROM information_schema.INNODB_TRX")
                )
                seen += f"\ninnodb transactions: {trx.all()}"
        raise AssertionError(f"no session waited for the lock within {WAIT} s; sessions:\n{seen}")

    def wait_gone(self, session: int) -> None:
        """Wait until the database has ended this session (a killed client's transaction is rolled back
        or, for a statement already running in autocommit, finished)."""
        if self.backend == "postgresql":
            query = "SELECT count(*) FROM pg_stat_activity WHERE pid = :id"
        else:
            query = "SELECT count(*) FROM information_schema.PROCESSLIST WHERE ID = :id"
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            with self.engine.connect() as conn:
                if conn.execute(sa.text(query), {"id": session}).scalar_one() == 0:
                    return
            time.sleep(0.02)
        raise AssertionError(f"database session {session} still there after {WAIT} s")

    def counts(self) -> dict[str, int]:
        """Rows per credits table: "nothing was written" compares two of these."""
        t = self.credits.tables
        with self.engine.connect() as conn:
            return {
                name: int(conn.execute(sa.select(sa.func.count()).select_from(getattr(t, name))).scalar_one())
                for name in ("wallets", "entries", "lots", "draws", "purchases", "stripe_events")
            }

    def snapshot(self) -> dict[str, Any]:
        """Every row that changes when credits move (row counts, balances, lots, purchase statuses)."""
        t = self.credits.tables
        with self.engine.connect() as conn:
            return {
                "counts": self.counts(),
                "wallets": sorted(
                    tuple(r)
                    for r in conn.execute(sa.select(t.wallets.c.id, t.wallets.c.balance, t.wallets.c.debt))
                ),
                "lots": sorted(tuple(r) for r in conn.execute(sa.select(t.lots.c.id, t.lots.c.remaining))),
                "purchases": sorted(
                    tuple(r)
                    for r in conn.execute(
                        sa.select(t.purchases.c.id, t.purchases.c.status, t.purchases.c.session_id)
                    )
                ),
            }

    def check(self, wallets: list[Wallet], tally: Tally, *, cli: bool = True) -> dict[str, Any]:
        """Compare the database with what the clients were told; raise AssertionError listing every
        violation. Returns figures for the report."""
        problems = list(tally.problems)
        audit = self.audit()
        problems += [f"audit: {line}" for line in audit]
        t = self.credits.tables
        with self.engine.connect() as conn:
            wallet_rows = {
                (r.user_id, r.key_id): r
                for r in conn.execute(
                    sa.select(
                        t.wallets.c.id,
                        t.wallets.c.user_id,
                        t.wallets.c.key_id,
                        t.wallets.c.balance,
                        t.wallets.c.held,
                        t.wallets.c.debt,
                    )
                )
            }
            by_id = {r.id: f"{r.user_id}/{r.key_id}" for r in wallet_rows.values()}
            entries = conn.execute(
                sa.select(
                    t.entries.c.id,
                    t.entries.c.wallet_id,
                    t.entries.c.kind,
                    t.entries.c.amount,
                    t.entries.c.reverses_id,
                    t.entries.c.balance_after,
                    t.entries.c.meta,
                    t.entries.c.created_at,
                )
            ).all()
            # When each wallet placed its first hold: entries' balance_after counts held credits.
            first_hold = {
                by_id[r.wallet_id]: r.first
                for r in conn.execute(
                    sa.select(t.holds.c.wallet_id, sa.func.min(t.holds.c.created_at).label("first")).group_by(
                        t.holds.c.wallet_id
                    )
                )
            }
            purchase_rows = conn.execute(sa.select(t.purchases)).all()
            plan_of: dict[str, str] = dict(
                conn.execute(
                    sa.select(t.subscriptions.c.stripe_subscription_id, t.subscriptions.c.plan)
                ).all()
            )
            purchases = {r.session_id: r for r in purchase_rows if r.session_id}
            by_invoice = {r.invoice_id: r for r in purchase_rows if r.invoice_id}
            creating = conn.execute(
                sa.select(sa.func.count()).select_from(t.purchases).where(t.purchases.c.status == "creating")
            ).scalar_one()
            recorded = set(conn.execute(sa.select(t.stripe_events.c.id)).scalars())
        negative = [r for r in wallet_rows.values() if r.balance < 0 or r.debt < 0]
        problems += [
            f"wallet {r.user_id}/{r.key_id} below zero: {r.balance}, debt {r.debt}" for r in negative
        ]

        # Every paid purchase credited exactly once, and taken back exactly as far as Stripe said.
        credited = Counter(e.meta["purchase_id"] for e in entries if e.kind == "purchase")
        clawed = Counter[str]()
        purchased = Counter[str]()
        for session_id, paid in tally.paid.items():
            row = purchases.get(session_id)
            if row is None:
                problems.append(f"paid session {session_id} has no purchase row")
                continue
            if row.status != "fulfilled" or credited[row.id] != 1:
                problems.append(
                    f"paid purchase {row.id}: status {row.status}, credited {credited[row.id]} times"
                )
            refund = paid.credits * paid.refunded // paid.amount
            dispute = paid.credits * paid.disputed // paid.amount
            if (row.refund_revoked, row.dispute_revoked) != (refund, dispute):
                problems.append(
                    f"purchase {row.id}: clawed back {row.refund_revoked}+{row.dispute_revoked},"
                    f" expected {refund}+{dispute}"
                )
            purchased[paid.wallet] += paid.credits
            clawed[paid.wallet] += refund + dispute
        for session_id in tally.unpaid_sessions:
            row = purchases.get(session_id)
            if row is not None and (row.status == "fulfilled" or credited[row.id]):
                problems.append(f"unpaid purchase {row.id} was credited")
        ours = {w.name for w in wallets}
        credited_here = {
            e.meta["purchase_id"] for e in entries if e.kind == "purchase" and by_id[e.wallet_id] in ours
        }
        # Plans: every paid invoice of a subscription the app created credited its plan's allowance
        # exactly once, to the subscribing wallet, and clawed back as far as its refunds say; an
        # invoice of a subscription the app did not create credited nothing.
        allowances = Counter[str]()
        for invoice_id, inv in tally.invoices.items():
            row = by_invoice.get(invoice_id)
            if row is None:
                problems.append(f"paid invoice {invoice_id} has no purchase row")
                continue
            if row.status != "fulfilled" or credited[row.id] != 1 or by_id[row.wallet_id] != inv.wallet:
                problems.append(
                    f"invoice {invoice_id} (purchase {row.id}) of {inv.wallet}: status {row.status},"
                    f" credited {credited[row.id]} times to {by_id[row.wallet_id]}"
                )
            if row.credits != inv.credits:
                problems.append(
                    f"invoice {invoice_id}: an allowance of {row.credits}, expected {inv.credits}"
                )
            refund = inv.credits * inv.refunded // inv.amount
            if (row.refund_revoked, row.dispute_revoked) != (refund, 0):
                problems.append(
                    f"invoice {invoice_id}: clawed back {row.refund_revoked}+{row.dispute_revoked},"
                    f" expected {refund}+0"
                )
            allowances[inv.wallet] += inv.credits
            clawed[inv.wallet] += refund
        for invoice_id in tally.foreign_invoices:
            row = by_invoice.get(invoice_id)
            if row is not None:
                problems.append(
                    f"invoice {invoice_id} of an unknown subscription: purchase {row.id} {row.status}"
                )
        upgrades = Counter[str]()
        for e in entries:
            if e.kind == "grant" and "previous" in (e.meta or {}):
                upgrades[by_id[e.wallet_id]] += e.amount
        problems += [
            f"wallet {name}: upgrades granted {upgrades[name]}, expected {tally.upgraded[name]}"
            for name in set(upgrades) | set(tally.upgraded)
            if name in ours and upgrades[name] != tally.upgraded[name]
        ]
        # Each subscription ends on the plan of the newest change, in whatever order they came.
        problems += [
            f"subscription {sub}: plan {plan_of.get(sub)}, expected {plan}"
            for sub, plan in tally.plans.items()
            if plan_of.get(sub) != plan
        ]
        # Auto top-up: one automatic purchase per crossing acted on, none charged twice.
        auto_problems, auto_figures, auto_added, auto_paid = self.check_auto_top_ups(tally)
        problems += auto_problems
        explained = {purchases[s].id for s in tally.paid if s in purchases} | auto_paid
        explained |= {by_invoice[i].id for i in tally.invoices if i in by_invoice}
        unexplained = credited_here - explained
        problems += [f"purchase {p} credited but never paid" for p in sorted(unexplained)]
        missing = tally.events - recorded
        problems += [f"event {e} acknowledged but not recorded" for e in sorted(missing)]

        # The same-key storm: each key's answers against its charges and its stored request.
        keyed_problems, keyed_figures, keyed_ok, keyed_unknown = self.check_keyed(tally)
        problems += keyed_problems

        # The settles of holds (stories) are spends of any amount: ``check_streams`` judges them.
        stream_problems, stream_figures, stories = self.check_streams(tally)
        problems += stream_problems
        settles = {e.id for e in entries if e.kind == "spend" and "hold_id" in (e.meta or {})}
        story_charged = Counter[str]()
        totals = Counter[str]()
        for e in entries:
            totals[by_id[e.wallet_id]] += e.amount
            if e.id in settles or e.reverses_id in settles:
                story_charged[by_id[e.wallet_id]] += -e.amount
        for name, charged in story_charged.items():
            if name in stories and stories[name] != charged:
                problems.append(
                    f"wallet {name}: its settle entries charge {charged}, its holds {stories[name]}"
                )

        # Spends: the database holds exactly the spends the clients were told about (plus, at most, the
        # ones whose answer was lost), and every balance is what the grants, purchases, spends, stories
        # and claw-backs leave.
        spends = Counter[str]()
        for e in entries:
            if e.kind in ("spend", "refund") and e.id not in settles and e.reverses_id not in settles:
                spends[by_id[e.wallet_id]] += -e.amount // COST
        for w in wallets:
            row = wallet_rows.get((w.user_id, w.key_id))
            if row is None:
                problems.append(f"wallet {w.name} missing")
                continue
            ok = tally.spent_ok[w.name] + keyed_ok[w.name]
            unknown = tally.spent_unknown[w.name] + keyed_unknown[w.name]
            db_spends = spends[w.name]
            if not ok <= db_spends <= ok + unknown:
                problems.append(
                    f"wallet {w.name}: {db_spends} spends stored, clients saw {ok} (+{unknown} unknown)"
                )
            expected = (
                tally.granted[w.name]
                + purchased[w.name]
                + allowances[w.name]
                + tally.upgraded[w.name]
                + auto_added[w.name]
                - COST * db_spends
                - story_charged[w.name]
                - clawed[w.name]
            )
            if row.balance - row.debt != expected:
                problems.append(f"wallet {w.name}: balance {row.balance} - debt {row.debt} != {expected}")
            if row.held:
                problems.append(f"wallet {w.name}: {row.held} credits still held after the run")
            if row.balance + row.held != totals[w.name]:
                problems.append(
                    f"wallet {w.name}: balance {row.balance} + held {row.held} != entries {totals[w.name]}"
                )
        # A 402 whose answer showed enough credits: the wallet must have been unable to pay at some
        # moment before the answer (the credits shown arrived after the refusal).
        first_low: dict[str, datetime] = {}
        for e in entries:
            name = by_id[e.wallet_id]
            if e.balance_after < COST and (name not in first_low or e.created_at < first_low[name]):
                first_low[name] = e.created_at
        for name, answered in tally.late_402:
            if name in first_hold and first_hold[name] <= answered + timedelta(seconds=1):
                continue  # balance_after counts held credits: the wallet may have been short then
            if name not in first_low or first_low[name] > answered + timedelta(seconds=1):
                problems.append(f"wallet {name} refused at {answered} but was never below {COST} before")
        if cli:
            result = self.cli("credits", "audit")
            if result.returncode != 0 or "audit passed" not in result.stdout:
                problems.append(
                    f"flask credits audit exited {result.returncode}: {result.stdout}{result.stderr}"
                )
        if problems:
            raise AssertionError(f"{len(problems)} violations:\n" + "\n".join(problems[:50]))
        return {
            "wallets": len(wallet_rows),
            "entries": len(entries),
            "purchases": len(purchases),
            "invoices_credited": sum(1 for i in tally.invoices if i in by_invoice),
            "allowance_credits": sum(allowances.values()) + sum(v for n, v in upgrades.items() if n in ours),
            "creating": int(creating),
            "events": len(recorded),
            "spends": sum(spends.values()),
            **keyed_figures,
            **stream_figures,
            **auto_figures,
        }

    def check_keyed(self, tally: Tally) -> tuple[list[str], dict[str, int], Counter[str], Counter[str]]:
        """The same-key storm (``tally.keyed``): per wallet and Idempotency-Key, the view ran at most
        once and was charged exactly as often as it ran (a charge is a spend with that key not
        refunded), except that a run whose answer was lost (killed worker, 503) may have been charged
        or not; a key charged has its answer stored (``done``), a key not charged has none (no key
        is left ``running``); every replay is byte for byte the run's answer and the stored one, and
        answers only the request that ran; 409 only "in progress", 422 only for another request.

        Returns the problems, figures, and per wallet the keys surely charged and the keys maybe
        charged (for the balance check)."""
        problems: list[str] = []
        ok, unknown = Counter[str](), Counter[str]()
        if not tally.keyed:
            return problems, {}, ok, unknown
        t = self.credits.tables
        with self.engine.connect() as conn:
            names = {
                r.id: f"{r.user_id}/{r.key_id}"
                for r in conn.execute(sa.select(t.wallets.c.id, t.wallets.c.user_id, t.wallets.c.key_id))
            }
            entries = conn.execute(
                sa.select(
                    t.entries.c.id,
                    t.entries.c.wallet_id,
                    t.entries.c.kind,
                    t.entries.c.reverses_id,
                    t.entries.c.meta,
                ).where(t.entries.c.kind.in_(["spend", "refund"]))
            ).all()
            requests = conn.execute(sa.select(t.requests)).all()
        refunded = {e.reverses_id for e in entries if e.kind == "refund"}
        charges = Counter[tuple[str, str]]()
        for e in entries:
            key = (e.meta or {}).get("idempotency_key")
            if e.kind == "spend" and key is not None and e.id not in refunded:
                charges[names[e.wallet_id], key] += 1
        stored = {(f"{r.user_id}/{r.key_id}", r.idempotency_key): r for r in requests}
        answers: dict[tuple[str, str], list[Keyed]] = {}
        for a in tally.keyed:
            answers.setdefault((a.wallet, a.key), []).append(a)
        ours = {wallet for wallet, _ in answers}
        problems += [f"{k} charged, never sent" for k in charges if k[0] in ours and k not in answers]
        problems += [
            f"{k} still running" for k, r in stored.items() if k[0] in ours and r.status == "running"
        ]
        for (wallet, key), seen in answers.items():
            where = f"wallet {wallet} key {key}"
            runs = [a for a in seen if a.ran]
            lost = [a for a in seen if a.lost]
            charged = charges[wallet, key]
            row = stored.get((wallet, key))
            if len(runs) > 1:
                problems.append(f"{where}: the view ran {len(runs)} times")
            if charged > 1:
                problems.append(f"{where}: charged {charged} times")
            if charged > len(runs) + len(lost):
                problems.append(f"{where}: charged {charged} times for {len(runs)} runs")
            if runs and not lost and charged != 1:
                problems.append(f"{where}: the view ran, charged {charged} times")
            if (row is not None and row.status == "done") != (charged == 1):
                problems.append(f"{where}: charged {charged} times, stored {row and row.status}")
            if runs and not lost:
                ok[wallet] += 1
            elif runs or lost:
                unknown[wallet] += 1
            first = runs[0] if runs else None
            refused = any(a.status == 402 for a in seen)
            kept = None if row is None else (row.response_status, bytes(row.response_body or b""))
            for a in seen:
                if a.ran and json.loads(a.raw)["persona"]["seed"] != a.seed:
                    problems.append(f"{where}: a run for {a.seed!r} answered {a.raw[:200]!r}")
                elif a.replayed and (a.status, a.raw) != kept:
                    problems.append(f"{where}: replay {a.status} {a.raw[:200]!r} is not the stored answer")
                elif a.replayed and first is not None and (a.raw, a.seed) != (first.raw, first.seed):
                    problems.append(f"{where}: {a.seed!r} got {a.raw[:200]!r}, the run was {first.seed!r}")
                elif a.status in (402, 409, 422) and a.error != EXPECTED_ERRORS[a.status]:
                    problems.append(f"{where}: {a.status} {a.error}")
                elif a.status == 422 and first is not None and not refused and a.seed == first.seed:
                    problems.append(f"{where}: 422 for {a.seed!r}, the request that ran")
                elif a.status not in (200, 402, 409, 422) and not a.lost:
                    problems.append(f"{where}: answered {a.status} {a.raw[:300]!r}")
        statuses = Counter(a.status for a in tally.keyed)
        figures = {
            "keyed_requests": len(tally.keyed),
            "keys": len(answers),
            "runs": sum(1 for a in tally.keyed if a.ran),
            "charges": sum(n for k, n in charges.items() if k in answers),
            "replays": sum(1 for a in tally.keyed if a.replayed),
            "in_progress_409": statuses[409],
            "reused_422": statuses[422],
            "refused_402": statuses[402],
            "lost": sum(1 for a in tally.keyed if a.lost),
        }
        return problems, figures, ok, unknown

    def check_auto_top_ups(self, tally: Tally) -> tuple[list[str], dict[str, Any], Counter[str], set[int]]:
        """The auto top-up wallets (``tally.auto``), after ``top_up_due``. A crossing is a debit entry
        with ``balance_after < threshold <= balance_after - amount``. Per wallet:

        * every automatic purchase's attempt key names a crossing entry of the wallet, a distinct one
          for each (the chain of ``crossing_entry_id``), and the settings row ends on the last;
        * a crossing with no purchase was one auto top-up may skip: a purchase of an earlier crossing
          was still in flight at it (not credited before it), or had failed (which turned auto
          top-up off), or the month's cap had no room for another pack, or a later crossing was acted
          on first (its purchase started within SUPERSEDED_WITHIN of the crossing: while the request
          that crossed was on its way to act on it); and never more than one automatic purchase in
          flight at once (``in_flight_seen``, watched during the load) nor left in flight;
        * the month's automatic purchases stay within the cap, and the row's ``month_spent`` is theirs;
        * each one's PaymentIntent was asked of Stripe under exactly one Idempotency-Key, the one
          derived from its row, and Stripe made exactly one PaymentIntent for it, of its amount, with
          the saved card, off-session (nothing charged twice); no PaymentIntent names anything else;
        * a paid one is ``fulfilled`` by that PaymentIntent and credited its pack exactly once (one
          purchase entry); a declined card's is ``failed``, credited nothing, and auto top-up is off
          with the reason (so it is the wallet's only one).

        Returns the problems, figures, per wallet the credits its automatic purchases added, and the
        ids of those purchases (explained: Stripe was paid for them)."""
        from flask_credits.services import auto_top_up

        problems: list[str] = []
        added, paid_for = Counter[str](), set[int]()
        if not tally.auto:
            return problems, {}, added, paid_for
        if tally.sweep != "nothing due":  # the load has no faults: every call ended, every crossing seen
            problems.append(f"flask credits top-up --due found work after the load: {tally.sweep!r}")
        problems += [
            f"wallet {name}: {n} automatic purchases in flight at once"
            for name, n in tally.in_flight_seen.items()
            if n > 1
        ]
        t = self.credits.tables
        e, p, a, w = t.entries, t.purchases, t.auto_top_ups, t.wallets
        skipped = Counter[str]()
        counts = Counter[str]()
        intents_of = Counter[str]()  # purchase id -> PaymentIntents Stripe made for it
        for _, body in tally.intents.values():
            intents_of[_intent(body)["metadata"].get(auto_top_up.PURCHASE, "")] += 1
        keys_of: dict[str, set[str | None]] = {}
        for key, params in tally.intent_requests:
            keys_of.setdefault(params.get(f"metadata[{auto_top_up.PURCHASE}]", ""), set()).add(key)
        ours: set[str] = set()
        with self.engine.connect() as conn:
            for name, auto in tally.auto.items():
                user_id, key_id = name.split("/", 1)
                wallet = conn.execute(sa.select(w).where(w.c.user_id == user_id, w.c.key_id == key_id)).one()
                entries = conn.execute(
                    sa.select(e.c.id, e.c.kind, e.c.amount, e.c.balance_after, e.c.meta, e.c.created_at)
                    .where(e.c.wallet_id == wallet.id)
                    .order_by(e.c.id)
                ).all()
                bought = conn.execute(
                    sa.select(p).where(p.c.wallet_id == wallet.id, p.c.automatic.is_(True)).order_by(p.c.id)
                ).all()
                settings = conn.execute(sa.select(a).where(a.c.wallet_id == wallet.id)).one()
                crossings = [x for x in entries if auto_top_up.crossed(x, auto.threshold)]
                credited = Counter(x.meta["purchase_id"] for x in entries if x.kind == "purchase")
                credited_by = {x.meta["purchase_id"]: x for x in entries if x.kind == "purchase"}
                counts["crossings"] += len(crossings)
                counts["automatic_purchases"] += len(bought)
                if wallet.debt:
                    problems.append(f"wallet {name}: debt {wallet.debt} (nothing here makes any)")
                acted: dict[int, Any] = {}  # crossing entry id -> its purchase
                prefix = f"auto_{wallet.id}_"
                crossing_ids = {x.id for x in crossings}
                for x in bought:
                    where = f"wallet {name} automatic purchase {x.id}"
                    ours.add(str(x.id))
                    named = x.attempt_key[len(prefix) :] if x.attempt_key.startswith(prefix) else ""
                    entry_id = int(named) if named.isdecimal() else None
                    if entry_id not in crossing_ids:
                        problems.append(f"{where}: its attempt key {x.attempt_key} names no crossing entry")
                    elif entry_id in acted:
                        problems.append(f"{where}: crossing {entry_id} bought twice ({acted[entry_id].id})")
                    else:
                        acted[entry_id] = x
                    expected = "failed" if auto.declines else "fulfilled"
                    counts[f"automatic_{x.status}"] += 1
                    if x.status != expected or credited[x.id] != (x.status == "fulfilled"):
                        problems.append(f"{where}: {x.status}, credited {credited[x.id]} times")
                    if x.status == "fulfilled" and credited_by[x.id].amount != auto.credits:
                        problems.append(
                            f"{where}: credited {credited_by[x.id].amount}, its pack {auto.credits}"
                        )
                    if (x.credits, x.amount, x.currency) != (auto.credits, auto.amount, "usd"):
                        problems.append(f"{where}: {x.credits} credits for {x.amount} {x.currency}")
                    # Stripe: one key, the row's; one PaymentIntent; the purchase's amount and card.
                    key = auto_top_up.idempotency_key(x.attempt_key)
                    if keys_of.get(str(x.id)) != {key}:
                        problems.append(
                            f"{where}: asked of Stripe with keys {keys_of.get(str(x.id))}, not {key}"
                        )
                    if intents_of[str(x.id)] != 1:
                        problems.append(f"{where}: Stripe made {intents_of[str(x.id)]} PaymentIntents for it")
                        continue
                    status, body = tally.intents.get(key, (0, {}))
                    intent = _intent(body) if body else {}
                    if (intent.get("amount"), intent.get("payment_method")) != (x.amount, auto.card):
                        problems.append(f"{where}: its PaymentIntent {intent}")
                    if x.status == "fulfilled" and (status, intent.get("id")) != (200, x.payment_intent):
                        problems.append(
                            f"{where}: paid by {x.payment_intent}, Stripe answered {status} {intent}"
                        )
                    wanted = {
                        "amount": str(x.amount),
                        "currency": "usd",
                        "payment_method": auto.card,
                        "off_session": "true",
                        "confirm": "true",
                        "metadata[userId]": user_id,
                        "metadata[keyId]": key_id,
                    }
                    for k, params in tally.intent_requests:
                        if k == key and {f: params.get(f) for f in wanted} != wanted:
                            problems.append(f"{where}: asked Stripe for {params}")
                    if x.status == "fulfilled":
                        added[name] += auto.credits
                        paid_for.add(int(x.id))
                # Each crossing not acted on: why auto top-up could skip it.
                order = sorted(acted.items())
                for c in crossings:
                    if c.id in acted:
                        continue
                    earlier = [x for entry_id, x in order if entry_id < c.id]
                    bought_before = sum(1 for x in earlier if x.status != "failed")
                    if any(x.status == "failed" for x in earlier):
                        skipped["off after a decline"] += 1
                    elif any(x.id not in credited_by or credited_by[x.id].id > c.id for x in earlier):
                        skipped["one in flight"] += 1
                    elif (bought_before + 1) * auto.amount > auto.cap:
                        skipped["capped"] += 1
                    elif any(
                        entry_id > c.id and x.created_at <= c.created_at + SUPERSEDED_WITHIN
                        for entry_id, x in order
                    ):
                        skipped["a later crossing first"] += 1
                    else:
                        problems.append(
                            f"wallet {name}: crossing entry {c.id} ({c.balance_after - c.amount} -> "
                            f"{c.balance_after}) bought nothing: nothing in flight, room under the cap"
                        )
                # The month's total within the cap, and the settings row where the purchases left it.
                months = Counter[str]()
                for x in bought:
                    if x.status != "failed":
                        months[x.created_at.strftime("%Y-%m")] += int(x.amount)
                problems += [
                    f"wallet {name}: {total} spent on automatic purchases in {month}, over the cap {auto.cap}"
                    for month, total in months.items()
                    if total > auto.cap
                ]
                counts["cap_reached"] += any(total + auto.amount > auto.cap for total in months.values())
                if settings.purchase_id is not None or (
                    bought and settings.month_spent != months[settings.month]
                ):
                    problems.append(
                        f"wallet {name}: left in flight {settings.purchase_id}, month_spent"
                        f" {settings.month_spent}, its purchases {dict(months)}"
                    )
                if acted and settings.crossing_entry_id != max(acted):
                    problems.append(
                        f"wallet {name}: crossing_entry_id {settings.crossing_entry_id},"
                        f" the last acted on {max(acted)}"
                    )
                if auto.declines and (settings.enabled or not settings.failure or len(bought) > 1):
                    problems.append(
                        f"wallet {name}: declined card, {len(bought)} automatic purchases, still"
                        f" {'on' if settings.enabled else 'off'} ({settings.failure!r})"
                    )
                if not auto.declines and not settings.enabled:
                    problems.append(f"wallet {name}: auto top-up turned off ({settings.failure!r})")
        problems += [
            f"Stripe made a PaymentIntent for {purchase!r}, no automatic purchase of these wallets"
            for purchase in intents_of
            if purchase not in ours
        ]
        figures = {
            **{k: counts[k] for k in ("crossings", "automatic_purchases", "cap_reached")},
            "automatic_statuses": {
                k[10:]: v
                for k, v in sorted(counts.items())
                if k.startswith("automatic_") and k != "automatic_purchases"
            },
            "crossings_skipped": dict(sorted(skipped.items())),
            "most_in_flight": max(tally.in_flight_seen.values(), default=0),
            "payment_intent_requests": len(tally.intent_requests),
            "payment_intents": len(tally.intents),
            "top_up_sweep": tally.sweep,
        }
        return problems, figures, added, paid_for

    def check_streams(self, tally: Tally) -> tuple[list[str], dict[str, Any], Counter[str]]:
        """The stories (``tally.streams``) against their holds. A wallet's stories come from one
        client in turn, so its holds in id order are its stories answered 200. Per story:

        * every hold ended: ``settled`` at what it charged or ``released`` (charged nothing), none
          left ``held``; ``expired`` only for a story whose worker died (``lost``), charged nothing;
        * a story read to its end is charged exactly its chunks, one credit each;
        * a story its client hung up on after reading ``r`` chunks, when ``a`` more had started to
          arrive unread, is charged ``r <= charged <= r + a + 2``: each chunk is counted before it is
          sent, and the server notices the client is gone at the latest on its second write after the
          close (the first may still be accepted, the peer then answers RST, the next fails) — so
          never a full hold for the few chunks of a partial story;
        * the settle's spend entry charges what the hold says, and names the hold;
        * every story of a seed is the same text (a partial one a prefix of it), and each answer 200
          is a stream (chunked ``text/plain``, ``X-Accel-Buffering: no``, ``Cache-Control: no-store``).

        Returns the problems, figures, and per wallet what its holds charged."""
        problems: list[str] = []
        charged_by = Counter[str]()
        if not tally.streams:
            return problems, {}, charged_by
        t = self.credits.tables
        with self.engine.connect() as conn:
            names = {
                r.id: f"{r.user_id}/{r.key_id}"
                for r in conn.execute(sa.select(t.wallets.c.id, t.wallets.c.user_id, t.wallets.c.key_id))
            }
            holds = conn.execute(sa.select(t.holds).order_by(t.holds.c.id)).all()
            settle_entries = {
                r.id: r
                for r in conn.execute(
                    sa.select(t.entries.c.id, t.entries.c.amount, t.entries.c.meta).where(
                        t.entries.c.id.in_([h.entry_id for h in holds if h.entry_id is not None] or [-1])
                    )
                )
            }
        by_wallet: dict[str, list[Any]] = {}
        for h in holds:
            by_wallet.setdefault(names[h.wallet_id], []).append(h)
        streams: dict[str, list[Streamed]] = {}
        for s in tally.streams:
            streams.setdefault(s.wallet, []).append(s)
        over = Counter[int]()  # charged - read, for the stories their clients hung up on
        fates = Counter[str]()
        for wallet, seen in streams.items():
            answered = [s for s in seen if s.status == 200]
            placed = by_wallet.get(wallet, [])
            if len(placed) != len(answered):
                problems.append(
                    f"wallet {wallet}: {len(placed)} holds for {len(answered)} stories answered 200"
                )
            for s, h in zip(answered, placed, strict=False):
                where = f"wallet {wallet} hold {h.id} ({s.seed!r}, {len(s.chunks)} chunks read)"
                charged = int(h.settled_amount or 0)
                charged_by[wallet] += charged
                read = len(s.chunks)
                if h.status not in ("settled", "released", "expired"):
                    problems.append(f"{where}: left {h.status}")
                elif h.status == "expired" and not s.lost:
                    problems.append(f"{where}: expired, but its stream ended")
                elif (h.status == "settled") != (charged > 0):
                    problems.append(f"{where}: {h.status} having charged {charged}")
                if h.entry_id is not None:
                    entry = settle_entries[h.entry_id]
                    if -entry.amount != charged or (entry.meta or {}).get("hold_id") != h.id:
                        problems.append(f"{where}: charged {charged}, its entry {entry.amount} {entry.meta}")
                elif charged:
                    problems.append(f"{where}: charged {charged} without an entry")
                if s.lost:
                    fates["lost"] += 1
                    if h.status == "settled" and charged < read:
                        problems.append(f"{where}: a broken stream charged {charged}")
                elif s.left_after is None:
                    fates["out of credits" if s.out_of_credits else "read to the end"] += 1
                    if charged != read:
                        problems.append(f"{where}: read to the end, charged {charged}")
                else:
                    fates["hung up"] += 1
                    fates["hung up, charged less than the hold"] += charged < h.requested
                    over[charged - read] += 1
                    if not read <= charged <= read + s.arrived + 2:
                        problems.append(f"{where}: hung up with {s.arrived} more arriving, charged {charged}")
                headers = (
                    s.headers.get("transfer-encoding"),
                    s.headers.get("content-type", "").split(";")[0],
                    s.headers.get("x-accel-buffering"),
                    s.headers.get("cache-control"),
                )
                if headers != ("chunked", "text/plain", "no", "no-store"):
                    problems.append(f"{where}: answered with headers {s.headers}")
        stories = {}
        for s in tally.streams:
            if s.ended and not s.out_of_credits:
                text = "".join(s.chunks)
                if stories.setdefault(s.seed, text) != text:
                    problems.append(f"two stories for {s.seed!r}: {stories[s.seed][:80]!r}, {text[:80]!r}")
        for s in tally.streams:
            if s.seed in stories and not stories[s.seed].startswith("".join(s.chunks)):
                problems.append(f"a story for {s.seed!r} is not the start of the others: {s.chunks[:3]}")
        statuses = Counter(str(s.status) for s in tally.streams)
        figures = {
            "stories": len(tally.streams),
            "story_statuses": dict(sorted(statuses.items())),
            "story_fates": dict(sorted(fates.items())),
            "story_chunks_read": sum(len(s.chunks) for s in tally.streams),
            "story_credits_charged": sum(charged_by.values()),
            "hung_up_charged_minus_read": dict(sorted(over.items())),
        }
        return problems, figures, charged_by

    def settle_requests(self) -> dict[str, int]:
        """What an operator does after workers died: wait until the lease of every request left
        running is over, then run ``flask credits expire`` (which returns their credits and frees
        their keys); again while any is left. Bounded by LEASE + WAIT. Returns how many requests were
        left running, and how many of them had their credits returned."""
        r = self.credits.tables.requests
        settled = Counter({"running": 0, "credits returned": 0})
        deadline = time.monotonic() + LEASE + WAIT
        for _ in range(10):
            with self.engine.connect() as conn:
                leases = (
                    conn.execute(sa.select(r.c.locked_until).where(r.c.status == "running")).scalars().all()
                )
            if not leases:
                break
            wait = (max(leases) - datetime.now(timezone.utc)).total_seconds()
            if time.monotonic() + wait > deadline:
                raise AssertionError(f"a lease runs {wait:.1f} s more, past LEASE = {LEASE} s")
            time.sleep(max(0.0, wait))  # a lease is a time: nothing to wait for but the clock
            result = self.cli("credits", "expire")
            found = re.search(r"returned the credits of (\d+) unfinished", result.stdout)
            if result.returncode != 0 or found is None:
                raise AssertionError(
                    f"flask credits expire exited {result.returncode}: {result.stdout}{result.stderr}"
                )
            settled["running"] += len(leases)
            settled["credits returned"] += int(found.group(1))
        else:
            raise AssertionError("requests still running after 10 rounds of flask credits expire")
        return dict(settled)


def _intent(body: dict[str, Any]) -> dict[str, Any]:
    """The PaymentIntent of a Stripe answer: the body, or the one a ``card_error`` names."""
    found = body["error"]["payment_intent"] if "error" in body else body
    return found  # type: ignore[no-any-return]


def report(name: str, figures: dict[str, Any]) -> None:
    """Print the figures (shown with ``pytest -s``) and append them to ``CREDITS_RELIABILITY_REPORT``."""
    line = json.dumps({"scenario": name, **figures}, sort_keys=True, default=str)
    print(f"\n{line}")
    path = os.environ.get("CREDITS_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
