"""example_app's streamed story, on every backend: charged one credit per chunk as it streams (over an
API key or the session), 402 before anything streams when the hold cannot be placed, a last line when
the wallet runs dry mid-story, a client that leaves pays for what it received, bad requests pay nothing."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import balance, build_example_app, clear, create_key, grant, signed_up

from example_app.stories import STORY_WORDS, story_chunks, story_words, write_story

SEED = "lighthouse"
CHUNKS = list(story_chunks(SEED, 10))  # the default STORY_WORDS_PER_CREDIT
OUT_OF_CREDITS = "\n[out of credits: buy more at http://localhost/credits/]\n"


@pytest.fixture(scope="module")
def story_app(database_url) -> Iterator[Any]:
    """The example app on this backend, built once per module, as its tables are."""
    from example_app.models import db

    app = build_example_app(database_url)
    with app.app_context():
        db.create_all()
    yield app
    with app.app_context():
        clear(db)
        db.engine.dispose()


@pytest.fixture
def app(story_app, monkeypatch) -> Any:
    """The example app with its tables empty; a test may change its config (``monkeypatch`` puts it back)."""
    from example_app.extensions import limiter
    from example_app.models import db

    with story_app.app_context():
        clear(db)
        limiter.reset()
    for name in ("STORY_HOLD", "STORY_WORDS_PER_CREDIT"):
        monkeypatch.setitem(story_app.config, name, story_app.config[name])
    return story_app


@pytest.fixture
def client(app) -> Any:
    return app.test_client()


def write(
    client: Any,
    secret: str | None = None,
    seed: str = SEED,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> Any:
    """POST /api/stories with ``{"seed": seed}`` (over the API key ``secret`` if given); the response."""
    headers = {**(headers or {}), **({"X-API-Key": secret} if secret is not None else {})}
    return client.post("/api/stories", json={"seed": seed}, headers=headers, **kwargs)


def ledger(app: Any, user: str, key_id: str | None = None) -> dict[str, Any]:
    """What the wallet shows after a story: balance, held, entries (newest first), and the audit."""
    from example_app.extensions import credits

    with app.app_context():
        return {
            "balance": credits.balance(user, key_id),
            "held": credits.held(user, key_id),
            "entries": [(e.kind, e.amount) for e in credits.history(user, key_id)],
            "audit": credits.audit(),
        }


def charged(app: Any, user: str, spent: int, granted: int, key_id: str | None = None) -> dict[str, Any]:
    """The ledger of a wallet granted ``granted`` that paid ``spent`` for one story."""
    entries = [("spend", -spent), ("grant", granted)] if spent else [("grant", granted)]
    return {"balance": granted - spent, "held": 0, "entries": entries, "audit": []}


# -- the story itself ---------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_story_in_chunks_of_n_words():
    words = story_words(SEED)
    assert story_words(SEED) == words
    assert story_words(SEED + "s") != words
    assert abs(len(words) - STORY_WORDS) < STORY_WORDS // 4  # "about 200 words"
    assert len(CHUNKS) == math.ceil(len(words) / 10)
    assert "".join(CHUNKS) == write_story(SEED) == " ".join(words) + "\n"
    assert [len(chunk.split()) for chunk in CHUNKS[:-1]] == [10] * (len(CHUNKS) - 1)
    assert 1 <= len(CHUNKS[-1].split()) <= 10
    with pytest.raises(ValueError, match="at least 1"):
        next(story_chunks(SEED, 0))


# -- streamed and charged per chunk ---------------------------------------------------------------------


def test_a_story_streams_over_an_api_key_and_costs_one_credit_per_chunk(app, client):
    user = signed_up(client)
    key_id, secret = create_key(client)
    grant(app, user, 50, key_id)
    grant(app, user, 7)
    response = write(client, secret)
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.get_data(as_text=True) == write_story(SEED)
    response.close()
    assert ledger(app, user, key_id) == charged(app, user, len(CHUNKS), 50, key_id)
    assert balance(app, user) == 7  # the user's own wallet pays nothing for the key's story
    from example_app.extensions import credits

    with app.app_context():
        spend = credits.history(user, key_id)[0]
    assert spend.reason == "write story (API)"
    assert spend.metadata["amount"] == len(CHUNKS)


def test_a_story_streams_over_the_session(app, client):
    user = signed_up(client)
    grant(app, user, 30)
    response = write(client)
    assert response.get_data(as_text=True) == write_story(SEED)
    response.close()
    assert ledger(app, user) == charged(app, user, len(CHUNKS), 30)


def test_the_charge_is_settled_before_the_stream_ends(app, client):
    """A client that reads its balance as soon as it has the whole story sees what the story cost,
    even though the server closes the response (the decorator's own settle) only later."""
    user = signed_up(client)
    grant(app, user, 30)
    response = write(client, buffered=False)
    assert "".join(chunk.decode() for chunk in response.response) == write_story(SEED)
    assert ledger(app, user) == charged(app, user, len(CHUNKS), 30)  # not yet closed
    response.close()
    assert ledger(app, user) == charged(app, user, len(CHUNKS), 30)


@pytest.mark.parametrize("words_per_credit", [7, 25, 1000])
def test_story_words_per_credit_sets_the_price(app, client, words_per_credit):
    app.config["STORY_WORDS_PER_CREDIT"] = words_per_credit
    user = signed_up(client)
    grant(app, user, 40)
    assert write(client).get_data(as_text=True) == write_story(SEED)
    expected = math.ceil(len(story_words(SEED)) / words_per_credit)  # a shorter last chunk counts whole
    assert ledger(app, user) == charged(app, user, expected, 40)


# -- not enough credits -------------------------------------------------------------------------------


def test_a_hold_the_wallet_cannot_place_is_402_json_and_nothing_streams(app, client):
    app.config["STORY_HOLD"] = 12
    user = signed_up(client)
    key_id, secret = create_key(client)
    grant(app, user, 11, key_id)
    response = write(client, secret)
    assert response.status_code == 402
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert (body["error"], body["required"], body["balance"]) == ("insufficient_credits", 12, 11)
    assert body["purchase_url"] == "/credits/"
    assert ledger(app, user, key_id) == charged(app, user, 0, 11, key_id)


@pytest.mark.parametrize("granted", [10, 15, len(CHUNKS) - 1])
def test_a_wallet_that_runs_dry_mid_story_gets_a_last_line_and_pays_what_it_had(app, client, granted):
    user = signed_up(client)
    grant(app, user, granted)
    response = write(client)
    assert response.status_code == 200
    assert response.get_data(as_text=True) == "".join(CHUNKS[:granted]) + OUT_OF_CREDITS
    response.close()
    assert ledger(app, user) == charged(app, user, granted, granted)  # balance 0, never below


def test_a_story_that_just_fits_has_no_out_of_credits_line(app, client):
    user = signed_up(client)
    grant(app, user, len(CHUNKS))
    assert write(client).get_data(as_text=True) == write_story(SEED)
    assert ledger(app, user) == charged(app, user, len(CHUNKS), len(CHUNKS))


# -- a client that leaves ---------------------------------------------------------------------------


def test_a_client_that_leaves_after_two_chunks_pays_for_two(app, client):
    user = signed_up(client)
    key_id, secret = create_key(client)
    grant(app, user, 50, key_id)
    response = write(client, secret, buffered=False)
    chunks = iter(response.response)
    assert next(chunks).decode() == CHUNKS[0]
    assert next(chunks).decode() == CHUNKS[1]
    from example_app.extensions import credits

    with app.app_context():
        assert credits.held(user, key_id) == 10  # the hold is open while the story streams
    response.close()  # the client went away: the server closes the response
    assert ledger(app, user, key_id) == charged(app, user, 2, 50, key_id)
    response.close()  # closing again charges nothing more
    assert ledger(app, user, key_id) == charged(app, user, 2, 50, key_id)


# -- requests that cost nothing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("send", "status"),
    [
        pytest.param(lambda c: c.post("/api/stories", json={"seed": ""}), 400, id="empty seed"),
        pytest.param(lambda c: c.post("/api/stories", json={"seed": "   "}), 400, id="blank seed"),
        pytest.param(lambda c: c.post("/api/stories", json={"seed": "x" * 101}), 400, id="long seed"),
        pytest.param(lambda c: c.post("/api/stories", json={"seed": 7}), 400, id="number seed"),
        pytest.param(lambda c: c.post("/api/stories", json=[SEED]), 400, id="JSON list"),
        pytest.param(
            lambda c: c.post("/api/stories", data="{", content_type="application/json"), 400, id="broken JSON"
        ),
        pytest.param(lambda c: c.post("/api/stories", data={"seed": SEED}), 415, id="form body"),
        pytest.param(
            lambda c: c.post("/api/stories", data='{"seed": "x"}', content_type="text/plain"), 415, id="text"
        ),
        pytest.param(
            lambda c: c.post("/api/stories", json={"seed": SEED}, headers={"X-API-Key": "sk_unknown"}),
            401,
            id="unknown key",
        ),
        pytest.param(lambda c: c.get("/api/stories"), 405, id="GET"),
    ],
)
def test_a_bad_story_request_is_refused_and_charges_nothing(app, client, send: Callable[..., Any], status):
    user = signed_up(client)
    grant(app, user, 30)
    response = send(client)
    assert response.status_code == status
    if status != 405:
        assert response.mimetype == "application/json"
    assert ledger(app, user) == charged(app, user, 0, 30)


def test_an_anonymous_story_request_is_401_json(app, client):
    response = write(client)
    assert response.status_code == 401
    assert response.get_json()["error"] == "unauthorized"
    page = client.get("/stories", headers={"Accept": "text/html"})
    assert page.status_code == 302
    assert page.headers["Location"].startswith("/login?next=")


def test_a_story_retried_with_its_idempotency_key_is_not_charged_twice(app, client):
    user = signed_up(client)
    grant(app, user, 60)
    headers = {"Idempotency-Key": "story-1"}
    first = write(client, headers=headers)
    assert first.get_data(as_text=True) == write_story(SEED)
    first.close()
    again = write(client, headers=headers)
    # A streamed answer is not stored, so it cannot be replayed; the retry is refused, not run again.
    assert again.status_code == 409
    assert ledger(app, user) == charged(app, user, len(CHUNKS), 60)


# -- the page -------------------------------------------------------------------------------------------


def test_the_story_page_loads_its_script_from_this_site_under_the_csp(app, client):
    signed_up(client)
    index = client.get("/").get_data(as_text=True)
    assert '<a href="/stories">Write a story</a>' in index
    page = client.get("/stories")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert 'data-api="/api/stories"' in html
    assert 'data-balance="/credits/balance"' in html
    assert '<script src="/static/stories.js" defer></script>' in html
    assert "<script>" not in html  # no inline script: the CSP would refuse it
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert "'unsafe-inline'" not in policy
    script = client.get("/static/stories.js")
    assert script.status_code == 200
    assert "getReader()" in script.get_data(as_text=True)
    script.close()
