"""``python -m bench [--quick] [--db sqlite|postgresql|all] [--write docs/benchmarks.md]``."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
