"""The databases a run uses (each created for the run and dropped after it) and the machine it ran on."""

from __future__ import annotations

import os
import platform
import secrets
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import sqlalchemy as sa

#: Where the PostgreSQL server is; the run creates ``fc_bench_<hex>`` databases there and drops them.
DEFAULT_POSTGRES_URL = "postgresql+psycopg://root@127.0.0.1:5432/test"
ROOT = Path(__file__).resolve().parent.parent


def postgres_admin_url() -> str:
    return os.environ.get("BENCH_POSTGRES_URL") or os.environ.get(
        "CREDITS_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL
    )


@dataclass
class Target:
    """One fresh database of one backend."""

    backend: str  # "sqlite" or "postgresql"
    url: str  # SQLAlchemy URL of the database
    drop: Callable[[], None]
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def sqlite_path(self) -> str:
        database = sa.make_url(self.url).database
        assert database is not None
        return database

    @property
    def conninfo(self) -> str:
        """The libpq URL of a PostgreSQL target, for the raw driver."""
        return sa.make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)

    def raw_connect(self) -> Any:
        """A new raw DB-API connection (psycopg 3 or sqlite3) in its default transaction mode."""
        if self.backend == "sqlite":
            return sqlite3.connect(self.sqlite_path, timeout=30, check_same_thread=False)
        import psycopg

        return psycopg.connect(self.conninfo)


def create_target(backend: str) -> Target:
    """A new empty database; call ``drop()`` when done (it removes only this database)."""
    if backend == "sqlite":
        folder = tempfile.mkdtemp(prefix="fc_bench_")
        path = os.path.join(folder, "bench.sqlite3")
        target = Target("sqlite", f"sqlite:///{path}", lambda: shutil.rmtree(folder, ignore_errors=True))
        return target
    if backend != "postgresql":
        raise ValueError(f"unknown backend {backend!r}")
    admin_url = sa.make_url(postgres_admin_url())
    name = f"fc_bench_{secrets.token_hex(4)}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()

    return Target("postgresql", admin_url.set(database=name).render_as_string(hide_password=False), drop)


def database_version(target: Target) -> str:
    conn = target.raw_connect()
    try:
        cur = conn.cursor()
        if target.backend == "sqlite":
            cur.execute("PRAGMA journal_mode")
            journal = cur.fetchone()[0]
            cur.execute("PRAGMA synchronous")
            sync = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(cur.fetchone()[0], "?")
            return f"SQLite {sqlite3.sqlite_version} (journal_mode={journal}, synchronous={sync}, local file)"
        cur.execute("SELECT version()")
        version = str(cur.fetchone()[0]).split(" on ")[0]
        parts = []
        for name in ("fsync", "synchronous_commit", "shared_buffers", "max_connections"):
            cur.execute(f"SHOW {name}")
            parts.append(f"{name}={cur.fetchone()[0]}")
        conn.rollback()
        return f"{version} on 127.0.0.1 ({', '.join(parts)})"
    finally:
        conn.close()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git() -> str:
    def out(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)  # noqa: S603, S607
        return done.stdout.strip()

    try:
        head = out("rev-parse", "--short", "HEAD")
        dirty = out("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def machine() -> dict[str, str]:
    """What the report says about where it ran."""
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "cpu": _cpu_model(),
        "memory": _memory(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": ", ".join(
            f"{p} {_version(p)}"
            for p in ("flask", "sqlalchemy", "flask-sqlalchemy", "psycopg", "gunicorn", "stripe")
        ),
        "commit": _git(),
        "load average at start": loadavg(),
    }
