"""The benchmark app for a real WSGI server: ``gunicorn bench.wsgi:app`` with ``BENCH_DATABASE_URL``."""

from __future__ import annotations

import os

from .app import build_app

app = build_app(os.environ["BENCH_DATABASE_URL"], pool_size=int(os.environ.get("BENCH_POOL_SIZE", "2")))[0]
