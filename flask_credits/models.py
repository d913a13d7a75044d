"""The extension's tables (:mod:`flask_credits.storage.tables`) under the name migrations use: a
revision that autogenerate wrote for a ``flask_credits`` table refers to
``flask_credits.models.UtcDateTime``."""

from __future__ import annotations

from .storage.tables import ID_LENGTH, Tables, UtcDateTime, tables_for

__all__ = ["ID_LENGTH", "Tables", "UtcDateTime", "tables_for"]
