"""A wallet's history as CSV, for ``GET /credits/transactions.csv`` and ``flask credits history --csv``."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from datetime import timezone

from ..core import usage
from ..records import Wallet
from ..storage.database import Database

HEADER = ("id", "created_at", "kind", "amount", "balance_after", "reason", "endpoint", "actor")

# Spreadsheets run a cell that starts with one of these as a formula (CSV injection).
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def safe(text: object) -> str:
    """A text cell a spreadsheet will not run: a leading formula character gets a ``'`` before it."""
    value = "" if text is None else str(text)
    return "'" + value if value.startswith(_FORMULA) else value


def csv_lines(db: Database, wallet: Wallet) -> Iterator[str]:
    """The header, then one line per entry, oldest first, read :data:`usage.PAGE_SIZE` entries at a
    time: the history is never in memory whole."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")

    def line(cells: tuple[object, ...]) -> str:
        out.seek(0)
        out.truncate()
        writer.writerow(cells)
        return out.getvalue()

    yield line(HEADER)
    for page in usage.pages(db, wallet):
        yield "".join(
            line(
                (
                    e.id,
                    e.created_at.astimezone(timezone.utc).isoformat(),
                    e.kind,
                    e.amount,
                    e.balance_after,
                    safe(e.reason),
                    safe((e.metadata or {}).get("endpoint") if isinstance(e.metadata, dict) else None),
                    safe(actor),
                )
            )
            for e, actor in page
        )


def filename(wallet: Wallet) -> str:
    """``credits-<user>[-<key>].csv``, with anything but letters, digits, ``.``, ``_`` and ``-``
    replaced: the ids are the app's, not always safe in a header."""
    name = wallet.user_id + (f"-{wallet.key_id}" if wallet.key_id else "")
    return f"credits-{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.csv"
