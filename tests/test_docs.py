"""The documentation cannot drift from the code: every config key, with its default, in the tables of
docs/configuration.md and the README, and in FlaskCredits' docstring."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flask_credits import FlaskCredits
from flask_credits.settings import DEFAULTS, ENVIRONMENT

ROOT = Path(__file__).resolve().parent.parent
TABLES = {"docs/configuration.md": ROOT / "docs" / "configuration.md", "README.md": ROOT / "README.md"}


def table(path: Path) -> dict[str, str]:
    """key -> the default column of the config table in ``path``."""
    rows = re.findall(r"^\| `([A-Z_]+)` \| ([^|]*) \|", path.read_text(), re.MULTILINE)
    keys = [key for key, _ in rows]
    assert len(keys) == len(set(keys)), f"a key is listed twice in {path.name}"
    return {key: default.strip() for key, default in rows}


def shown(value: object) -> str:
    """A default as the tables write it."""
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`"


@pytest.mark.parametrize("name", list(TABLES))
def test_every_config_key_is_in_the_table_with_its_default(name):
    rows = table(TABLES[name])
    assert set(rows) == set(DEFAULTS), (
        f"{name}: missing {set(DEFAULTS) - set(rows)}, unknown {set(rows) - set(DEFAULTS)}"
    )
    for key, value in DEFAULTS.items():
        if key in ENVIRONMENT:  # read from the environment when unset: the table says so
            assert rows[key].startswith("env"), (name, key, rows[key])
        else:
            assert rows[key] == shown(value), (name, key, rows[key], shown(value))


def test_the_extensions_docstring_names_every_config_key():
    doc = FlaskCredits.__doc__ or ""
    assert [key for key in DEFAULTS if f"``{key}``" not in doc] == []
