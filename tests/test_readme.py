"""The README's Python code runs as written: every fenced ```python block is executed.

How the blocks are run:

- The blocks of the section "Add it to your app" are a complete program: they run first, in order, in
  one fresh namespace, in a temporary directory, with ``DATABASE_URL`` set to an empty database of
  each backend. Its decorated view is then exercised with the test client (401, 402, grant, 200).
- Every other section's blocks run in order in one namespace of their own, which starts as a fresh
  run of "Add it to your app" (so they may use its ``app``, ``db``, ``User`` and ``credits``), inside
  ``app.app_context()``, as code in a view, a job or a shell runs.
- A block right after ``<!-- readme-test: skip (reason) -->`` is not run; skips are for blocks that
  cannot run here (they need a Stripe account, say), each with its reason. Other fences (sh, js) are
  not run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BASE = "Add it to your app"
MARKER = re.compile(r"<!-- readme-test: (.*?) -->")
SKIP = re.compile(r"skip \((.+)\)")
#: Blocks skipped at most: a new skip needs a good reason, and raising this.
MAX_SKIPS = 2


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    section: str
    code: str
    skip: str | None  # the reason


def read_blocks(text: str) -> list[Block]:
    """The README's ```python blocks, each with its section (the heading above it) and skip reason."""
    blocks: list[Block] = []
    lines = text.splitlines()
    section, fence, marker = "", None, None
    for number, line in enumerate(lines, 1):
        if fence is not None:
            if line.startswith("```"):
                start, language, code = fence
                if language == "python":
                    blocks.append(Block(start, section, "\n".join(code), marker))
                elif marker is not None:
                    raise AssertionError(f"README.md:{start}: a readme-test marker before a {language} block")
                fence, marker = None, None
            else:
                fence[2].append(line)
            continue
        if line.startswith("```"):
            fence = (number, line[3:].strip(), [])
            continue
        if marker is not None:
            raise AssertionError(f"README.md:{number - 1}: a readme-test marker not right before a block")
        found = MARKER.search(line)
        if found:
            skip = SKIP.fullmatch(found.group(1))
            assert skip, f"README.md:{number}: unknown marker {found.group(0)!r}"
            marker = skip.group(1)
        elif line.startswith("#"):
            section = line.lstrip("#").strip()
    assert fence is None, f"README.md:{fence[0]}: a code block is never closed"
    return blocks


BLOCKS = read_blocks(README.read_text())
SECTIONS = list(dict.fromkeys(b.section for b in BLOCKS if b.section != BASE and b.skip is None))


def run(block: Block, namespace: dict[str, object]) -> None:
    exec(compile(block.code, f"README.md:{block.line}", "exec"), namespace)


@pytest.fixture
def readme_app(empty_database, tmp_path, monkeypatch):
    """A fresh run of "Add it to your app" (its namespace), in a temporary directory, on an empty
    database; its engine is disposed of afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", empty_database)
    monkeypatch.delenv("SECRET_KEY", raising=False)
    namespace: dict[str, object] = {"__name__": "readme_app"}
    for block in BLOCKS:
        if block.section == BASE:
            run(block, namespace)
    yield namespace
    app, db = namespace.get("app"), namespace.get("db")
    if app is not None and db is not None:
        with app.app_context():  # type: ignore[attr-defined]
            db.engine.dispose()  # type: ignore[attr-defined]


def test_the_readme_blocks_are_found_and_skips_are_rare():
    assert [b for b in BLOCKS if b.section == BASE and b.skip is None]
    skipped = [b for b in BLOCKS if b.skip]
    assert len(skipped) <= MAX_SKIPS, [(b.line, b.skip) for b in skipped]
    assert "Charge for a view" in SECTIONS
    assert "The ledger API" in SECTIONS


def test_a_marker_must_come_right_before_a_python_block():
    with pytest.raises(AssertionError, match="not right before a block"):
        read_blocks("<!-- readme-test: skip (why) -->\n\ntext\n```python\npass\n```\n")
    with pytest.raises(AssertionError, match="unknown marker"):
        read_blocks("<!-- readme-test: maybe -->\n```python\npass\n```\n")
    assert read_blocks("## S\n<!-- readme-test: skip (why) -->\n```python\npass\n```\n") == [
        Block(3, "S", "pass", "why")
    ]


def test_add_it_to_your_app_runs_as_pasted_and_its_view_charges(readme_app):
    app, db, user_model, credits = (readme_app[n] for n in ("app", "db", "User", "credits"))
    with app.app_context():
        db.session.add(user_model(id=7, email="grace@example.com"))
        db.session.commit()
    client = app.test_client()
    json = {"Accept": "application/json"}
    assert client.post("/generate-persona", headers=json).status_code == 401  # nobody logged in

    with client.session_transaction() as session:  # logged in as user 7, as Flask-Login would
        session["_user_id"] = "7"
        session["_fresh"] = True
    refused = client.post("/generate-persona", headers=json)
    assert refused.status_code == 402
    assert (refused.json["required"], refused.json["balance"], refused.json["missing"]) == (5, 0, 5)
    assert [p["id"] for p in refused.json["packs"]] == ["starter"]

    with app.app_context():
        credits.grant("7", 5, reason="test")
    answered = client.post("/generate-persona", headers=json)
    assert answered.status_code == 200
    assert answered.json == {"persona": "Ada", "credits_left": 0}
    with app.app_context():
        assert credits.balance("7") == 0
        assert credits.balance("1") == 100  # the snippet's own grant, once


@pytest.mark.parametrize("section", SECTIONS)
def test_each_sections_python_runs_on_the_app_of_add_it_to_your_app(readme_app, section):
    app = readme_app["app"]
    with app.app_context():  # type: ignore[attr-defined]
        for block in BLOCKS:
            if block.section == section and block.skip is None:
                run(block, readme_app)
