"""Hostile reads of the ledger, on every backend: anonymous requests, another user's entries asked
for every way, out-of-range cursors and bad pages, and random query strings on the pages that read
the ledger: never a 500, never another wallet's entries, nothing written."""

from __future__ import annotations

import pytest
from helpers import (
    JSON_HEADERS,
    fuzz_cases,
    stripe_calls,
)
from hypothesis import given
from hypothesis import strategies as st


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("post", "/credits/checkout", id="checkout"),
        pytest.param("get", "/credits/balance", id="balance"),
        pytest.param("get", "/credits/transactions", id="transactions"),
        pytest.param("get", "/credits/", id="credits page"),
        pytest.param("get", "/credits/success?session_id=cs_x", id="success page"),
        pytest.param("get", "/credits/cancel", id="cancel page"),
    ],
)
def test_anonymous_requests_are_401_and_reach_nothing(shop, method, path):
    before = shop.state()
    response = getattr(shop.client(None), method)(path, json={"quantity": 1} if method == "post" else None)
    assert response.status_code == 401
    assert "alice" not in response.get_data(as_text=True)
    assert stripe_calls(shop) == 0
    assert shop.state() == before


def test_bob_never_sees_alices_entries_whatever_he_asks(shop):
    shop.credits.grant("alice", 7, reason="alice-private-grant")
    shop.credits.spend("alice", 3, reason="alice-private-spend")
    shop.credits.grant("bob", 5, reason="bob-grant")
    alice_ids = {e.id for e in shop.credits.history("alice", limit=1000)}
    bob_ids = {e.id for e in shop.credits.history("bob", limit=1000)}
    bob = shop.client("bob")
    queries = ["", "?limit=1000", "?user_id=alice", "?user_id=alice&key_id=key-1", "?key_id=key-1"]
    queries += [f"?before={i + 1}&limit=1" for i in sorted(alice_ids)]
    for query in queries:
        response = bob.get(f"/credits/transactions{query}")
        assert response.status_code == 200
        entries = response.json["transactions"]
        assert {e["id"] for e in entries} <= bob_ids, query
        assert {e["user_id"] for e in entries} <= {"bob"}, query
        page = bob.get(f"/credits/{query}", headers={"Accept": "text/html"}).get_data(as_text=True)
        assert "alice-private" not in page, query
    # The credits page also walks towards the newest from any id, alice's included.
    for after in sorted(alice_ids | {min(alice_ids) - 1 or 1}):
        page = bob.get(f"/credits/?after={after}&limit=1", headers={"Accept": "text/html"})
        assert page.status_code == 200
        assert "alice-private" not in page.get_data(as_text=True), after
    assert bob.get("/credits/balance?user_id=alice").json == {
        "user_id": "bob",
        "key_id": None,
        "balance": 5,
        "held": 0,
    }


@pytest.mark.parametrize(
    "before",
    [
        pytest.param("99999999999999999999", id="before beyond any 64-bit id"),
        pytest.param("-99999999999999999999", id="before below any 64-bit id"),
        pytest.param("9223372036854775808", id="before one past the largest BIGINT"),
    ],
)
def test_history_with_an_out_of_range_cursor_is_not_a_500(shop, before):
    for path in ("/credits/transactions", "/credits/"):
        response = shop.client("alice").get(f"{path}?before={before}")
        assert response.status_code in (200, 400), (path, response.status_code)
    response = shop.client("alice").get(f"/credits/?after={before}")
    assert response.status_code in (200, 400), response.status_code


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("limit=0", id="zero limit"),
        pytest.param("limit=-1", id="negative limit"),
        pytest.param("limit=100000", id="huge limit"),
        pytest.param("limit=ten", id="limit in words"),
        pytest.param("before=1.5", id="fractional cursor"),
        pytest.param("before=abc", id="cursor in words"),
    ],
)
def test_history_with_a_bad_page_is_400(shop, query):
    assert shop.client("alice").get(f"/credits/transactions?{query}").status_code == 400
    assert shop.client("alice").get(f"/credits/?{query}").status_code == 400


@pytest.mark.parametrize("query", ["after=1.5", "after=abc", "after=-1", "after=1&before=5"])
def test_the_credits_pages_bad_newer_page_is_400(shop, query):
    assert shop.client("alice").get(f"/credits/?{query}").status_code == 400


def test_random_query_strings_on_the_read_endpoints_are_never_a_500(shop, backend):
    """Whatever a logged-in user puts in the query string of the pages that read the ledger, the
    answer is 200, 400 or 404, shows only their own wallet, and nothing is written or asked of Stripe."""
    before = shop.state()
    text = st.one_of(
        st.integers(-(2**70), 2**70).map(str),
        st.sampled_from(["", "0", "-1", "1", "1000", "1001", "1.5", "nan", "inf", "0x10", " 7"]),
        st.sampled_from([str(2**63), str(-(2**63) - 1), "9" * 30, "cs_test_\x00", "\x00", "%00", "'--"]),
        st.text(max_size=30),
    )

    @fuzz_cases(backend, sqlite=200, server=60)
    @given(
        path=st.sampled_from(["/credits/transactions", "/credits/", "/credits/balance", "/credits/success"]),
        query=st.dictionaries(
            st.sampled_from(["limit", "before", "after", "session_id", "user_id", "key_id"]), text, max_size=3
        ),
    )
    def read(path: str, query: dict[str, str]) -> None:
        response = shop.client("bob").get(path, query_string=query, headers=JSON_HEADERS)
        assert response.status_code in (200, 400, 404), response.status_code
        if response.status_code == 200 and path == "/credits/transactions":
            assert {e["user_id"] for e in response.json["transactions"]} <= {"bob"}
        assert stripe_calls(shop, "GET") == 0
        assert shop.state() == before

    read()
