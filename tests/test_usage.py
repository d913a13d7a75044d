"""Usage you can see: ``credits.usage()`` (spent per day, reason or endpoint, net of refunds, in one
query), the credits page's chart and endpoint table, and the history as streamed CSV (route and CLI)."""

from __future__ import annotations

import csv
import io
import re
from datetime import date, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from flask import request
from sqlalchemy import event

from flask_credits import InvalidArgument, requires_credits
from flask_credits.core import usage
from flask_credits.core.inputs import make_wallet

HTML = {"Accept": "text/html"}
JAN = datetime(2030, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def search(app):
    """``POST /search/<n>`` costs n credits, recorded with the endpoint ``search``."""

    @app.post("/search/<int:n>")
    @requires_credits(lambda: int(request.view_args["n"]))
    def search(n):
        return {"n": n}


@pytest.fixture
def statements(db):
    """The SQL sent on the app's engine from now on."""
    sent: list[str] = []

    def record(conn, cursor, sql, parameters, context, executemany) -> None:
        sent.append(sql)

    event.listen(db.engine, "before_cursor_execute", record)
    yield sent
    event.remove(db.engine, "before_cursor_execute", record)


@pytest.fixture
def three_days(credits, client, login, clock, search):
    """alice's spends over 1-3 January 2030 (UTC), a refund the same day and one on 4 January, and
    spends of other wallets that must never count. Returns the spend refunded on 4 January."""
    credits.grant("alice", 1_000, reason="start")
    credits.grant("alice", 100, reason="start", key_id="key-1")
    credits.grant("bob", 100, reason="start")
    login("alice")
    # 1 January
    assert client.post("/search/5").status_code == 200
    credits.spend("alice", 7, reason="export")
    assert client.post("/search/2").status_code == 200
    same_day = credits.history("alice", limit=1)[0]
    credits.refund("alice", same_day.id, reason="failed")
    credits.spend("alice", 50, reason="export", key_id="key-1")
    credits.spend("bob", 50, reason="export")
    # 2 January
    clock.advance(days=1)
    assert client.post("/search/10").status_code == 200
    later = credits.history("alice", limit=1)[0]
    credits.spend("alice", 4, reason="export")
    # 3 January, the last moment of the day
    clock.now = datetime(2030, 1, 3, 23, 59, 59, 999_999, tzinfo=timezone.utc)
    credits.spend("alice", 1, reason="late")
    # 4 January: the spend of 2 January is refunded
    clock.advance(hours=1)
    credits.refund("alice", later.id, reason="support")
    return later


def test_usage_by_day_nets_refunds_made_before_until(credits, three_days):
    jan4 = JAN + timedelta(days=3)
    assert credits.usage("alice", since=JAN, until=jan4) == {
        date(2030, 1, 1): 12,  # 5 + 7 + 2, less the 2 refunded that day
        date(2030, 1, 2): 14,  # the refund of 4 January is after the period
        date(2030, 1, 3): 1,
    }
    # Until 5 January the refund counts, against the day of its spend.
    assert credits.usage("alice", since=JAN, until=jan4 + timedelta(days=1), by="day") == {
        date(2030, 1, 1): 12,
        date(2030, 1, 2): 4,
        date(2030, 1, 3): 1,
    }
    # Days are oldest first.
    assert list(credits.usage("alice", since=JAN, until=jan4)) == sorted(
        credits.usage("alice", since=JAN, until=jan4)
    )


def test_usage_by_reason_and_by_endpoint(credits, three_days):
    until = JAN + timedelta(days=4)
    by_reason = credits.usage("alice", since=JAN, until=until, by="reason")
    # The decorator's reason is the endpoint's name; most spent first.
    assert list(by_reason.items()) == [("export", 11), ("search", 5), ("late", 1)]
    by_endpoint = credits.usage("alice", since=JAN, until=until, by="endpoint")
    # Direct credits.spend() calls record no endpoint: None.
    assert list(by_endpoint.items()) == [(None, 12), ("search", 5)]


def test_usage_counts_each_wallet_alone(credits, three_days):
    until = JAN + timedelta(days=4)
    assert credits.usage("alice", "key-1", since=JAN, until=until, by="reason") == {"export": 50}
    assert credits.usage("bob", since=JAN, until=until, by="endpoint") == {None: 50}
    assert credits.usage("nobody", since=JAN, until=until) == {}


def test_usage_ranges_are_half_open(credits, three_days):
    jan2, jan3 = JAN + timedelta(days=1), JAN + timedelta(days=2)
    assert credits.usage("alice", since=jan2, until=jan3) == {date(2030, 1, 2): 14}
    # The spend at 23:59:59.999999 on 3 January is in [3 Jan, 4 Jan) and not in [4 Jan, ...).
    jan4 = JAN + timedelta(days=3)
    assert credits.usage("alice", since=jan3, until=jan4, by="reason") == {"late": 1}
    assert credits.usage("alice", since=jan4, until=jan4 + timedelta(days=1)) == {}
    # Another time zone names the same instants: 2 January 00:00 UTC is 01:00 in UTC+1.
    plus_one = timezone(timedelta(hours=1))
    assert credits.usage("alice", since=jan2.astimezone(plus_one), until=jan3.astimezone(plus_one)) == {
        date(2030, 1, 2): 14
    }


def test_a_group_whose_spends_were_all_refunded_totals_zero(credits, clock):
    credits.grant("alice", 10, reason="start")
    spend = credits.spend("alice", 3, reason="render")
    credits.refund("alice", spend.id)
    assert credits.usage("alice", since=JAN, until=JAN + timedelta(days=1), by="reason") == {"render": 0}


@pytest.mark.parametrize(
    ("since", "until", "by", "message"),
    [
        (JAN.replace(tzinfo=None), JAN + timedelta(days=1), "day", "since must be an aware datetime"),
        (JAN, (JAN + timedelta(days=1)).replace(tzinfo=None), "day", "until must be an aware datetime"),
        ("2030-01-01", JAN + timedelta(days=1), "day", "since must be an aware datetime"),
        (JAN, JAN, "day", "since must be before until"),
        (JAN + timedelta(days=1), JAN, "day", "since must be before until"),
        (JAN, JAN + timedelta(days=1), "month", "by must be one of day, reason, endpoint"),
        (JAN, JAN + timedelta(days=1), None, "by must be one of"),
    ],
)
def test_usage_refuses_bad_ranges_and_groupings(credits, since, until, by, message):
    with pytest.raises(InvalidArgument, match=message):
        credits.usage("alice", since=since, until=until, by=by)


@pytest.mark.parametrize("by", ["day", "reason", "endpoint"])
def test_usage_is_one_query_on_the_wallets_entries(credits, three_days, statements, by):
    credits.usage("alice", since=JAN, until=JAN + timedelta(days=4), by=by)
    assert len(statements) == 1
    sql = statements[0].lower()
    assert sql.lstrip().startswith("select")
    assert "credits_entries" in sql
    assert "credits_wallets" in sql  # the wallet's id as a subquery: the (wallet_id, id) index


# -- the credits page ------------------------------------------------------------------------------


def chart_of(html: str) -> str:
    found = re.search(r'<svg class="credits-chart-svg".*?</svg>', html, re.S)
    assert found, "no chart on the credits page"
    return found.group(0)


def test_the_credits_page_charts_the_last_30_days_with_zero_days(client, login, credits, three_days, clock):
    clock.now = datetime(2030, 1, 10, 9, 0, tzinfo=timezone.utc)
    credits.spend("alice", 3, reason="today")
    html = client.get("/credits/", headers=HTML).get_data(as_text=True)
    svg = chart_of(html)
    bars = re.findall(r'data-day="([\d-]+)" data-credits="(\d+)"', svg)
    assert len(bars) == 30
    assert bars[0] == ("2029-12-12", "0")  # 30 days, today included
    assert bars[-1] == ("2030-01-10", "3")
    spent = dict(bars)
    assert (spent["2030-01-01"], spent["2030-01-02"], spent["2030-01-03"]) == ("12", "4", "1")
    assert spent["2030-01-05"] == "0"
    # The tallest bar is the busiest day; a day without spends has no height.
    heights = dict(re.findall(r'height="([\d.]+)" data-day="([\d-]+)"', svg)[i][::-1] for i in range(30))
    assert float(heights["2030-01-01"]) == max(float(h) for h in heights.values()) > 0
    assert float(heights["2030-01-05"]) == 0
    # Accessible: a named image with a title and a description, and the numbers in a table.
    assert 'role="img"' in svg
    assert 'aria-labelledby="credits-chart-title credits-chart-desc"' in svg
    assert '<title id="credits-chart-title">Credits spent per day, last 30 days</title>' in svg
    assert "20 credits spent from 2029-12-12 to 2030-01-10; the most, 12, on 2030-01-01." in svg
    table = re.search(
        r'<table class="credits-visually-hidden" data-testid="usage-days">.*?</table>', html, re.S
    )
    assert table
    rows = re.findall(r"<tr><td>([\d-]+)</td><td>(\d+)</td></tr>", table.group(0))
    assert rows == bars
    # By endpoint: the decorated view by name, direct spends as "(direct)".
    endpoints = re.search(r'data-testid="usage-endpoints">.*?</table>', html, re.S)
    assert endpoints
    cells = re.findall(r"<tr><td>(.*?)</td><td class=\"credits-amount\">(\d+)</td></tr>", endpoints.group(0))
    assert cells == [("(direct)", "15"), ("<code>search</code>", "5")]
    # No JavaScript needed to see any of it.
    assert "<script" not in svg


def test_the_chart_of_a_wallet_without_spends_is_thirty_empty_days(client, login, credits, clock):
    credits.grant("alice", 5, reason="start")
    login("alice")
    html = client.get("/credits/", headers=HTML).get_data(as_text=True)
    svg = chart_of(html)
    assert re.findall(r'data-credits="(\d+)"', svg) == ["0"] * 30
    assert "0 credits spent from 2029-12-03 to 2030-01-01." in svg
    assert "No credits spent in the last 30 days." in html
    assert 'data-testid="usage-endpoints"' not in html


def test_the_chart_escapes_nothing_it_should_not(client, login, credits, clock):
    # Endpoint names come from the app, but a direct spend's metadata is anyone's text.
    credits.grant("alice", 5, reason="start")
    credits.spend("alice", 1, reason="x", metadata={"endpoint": "<script>alert(1)</script>"})
    login("alice")
    html = client.get("/credits/", headers=HTML).get_data(as_text=True)
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


# -- CSV -------------------------------------------------------------------------------------------


def rows_of(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def test_transactions_csv_is_the_wallets_whole_history(client, login, credits, three_days):
    response = client.get("/credits/transactions.csv")
    assert response.status_code == 200
    assert response.is_streamed
    assert response.mimetype == "text/csv"
    assert response.headers["Content-Disposition"] == 'attachment; filename="credits-alice.csv"'
    rows = rows_of(response.get_data(as_text=True))
    assert rows[0] == ["id", "created_at", "kind", "amount", "balance_after", "reason", "endpoint", "actor"]
    history = list(reversed(credits.history("alice", limit=1000)))
    assert [int(r[0]) for r in rows[1:]] == [e.id for e in history]  # oldest first, nothing else
    first_search = next(r for r in rows[1:] if r[6] == "search")
    assert first_search[1:6] == ["2030-01-01T12:00:00+00:00", "spend", "-5", "995", "search"]
    # 1000 - 5 - 7 - 2 + 2 - 10 - 4 - 1 = 973, then the refund of 10; a refund records no endpoint.
    assert rows[-1][2:7] == ["refund", "10", "983", "support", ""]
    assert rows[1][2:6] == ["grant", "1000", "1000", "start"]
    assert all(r[7] == "" for r in rows[1:])


def test_transactions_csv_needs_a_login_and_the_users_own_key(client, login, credits):
    credits.grant("alice", 1_000, reason="start")
    credits.grant("alice", 100, reason="start", key_id="key-1")
    credits.spend("alice", 50, reason="export", key_id="key-1")
    assert client.get("/credits/transactions.csv").status_code == 401
    login("alice")
    refused = client.get("/credits/transactions.csv?key_id=key-1", headers={"Accept": "application/json"})
    assert (refused.status_code, refused.json["message"]) == (400, "unknown API key")

    @credits.wallet_checker
    def owns(user_id, key_id):
        return (user_id, key_id) in {("alice", None), ("alice", "key-1")}

    assert client.get("/credits/transactions.csv?key_id=key-2").status_code == 400
    response = client.get("/credits/transactions.csv?key_id=key-1")
    assert response.headers["Content-Disposition"] == 'attachment; filename="credits-alice-key-1.csv"'
    rows = rows_of(response.get_data(as_text=True))[1:]
    assert [(r[2], r[3]) for r in rows] == [("grant", "100"), ("spend", "-50")]


def test_transactions_csv_defuses_formulas_and_quotes_text(client, login, credits, db):
    credits.grant("alice", 100, reason='=HYPERLINK("http://evil","x")')
    credits.spend("alice", 1, reason="+1", metadata={"endpoint": "@SUM(A1)"})
    credits.spend("alice", 1, reason='-2, "quoted"\nnext line')
    credits.spend("alice", 1, reason="\tcmd")
    last = credits.spend("alice", 1, reason="plain")
    entries = db.metadata.tables["credits_entries"]
    with db.engine.begin() as conn:
        conn.execute(sa.update(entries).where(entries.c.id == last.id).values(actor="=admin@example.com"))
    login("alice")
    rows = rows_of(client.get("/credits/transactions.csv").get_data(as_text=True))[1:]
    assert [r[5] for r in rows] == [
        '\'=HYPERLINK("http://evil","x")',
        "'+1",
        '\'-2, "quoted"\nnext line',
        "'\tcmd",
        "plain",
    ]
    assert rows[1][6] == "'@SUM(A1)"
    assert rows[4][7] == "'=admin@example.com"  # the actor column, from the row
    assert [r[3] for r in rows] == ["100", "-1", "-1", "-1", "-1"]  # numbers are not text: no quote


@pytest.fixture
def long_history(credits, db):
    """alice's 2,000 entries: a grant, then 1,999 spend rows written straight to the table (the
    ledger would take minutes on three databases; the export only reads them)."""
    credits.grant("alice", 10_000, reason="start")
    wallet_id = credits.ledger.wallet_id(make_wallet("alice"))
    entries = db.metadata.tables["credits_entries"]
    now = datetime(2030, 1, 1, tzinfo=timezone.utc)
    with db.engine.begin() as conn:
        conn.execute(
            entries.insert(),
            [
                {
                    "wallet_id": wallet_id,
                    "amount": -1,
                    "balance_after": 10_000 - i,
                    "kind": "spend",
                    "reason": f"call {i}",
                    "meta": {"endpoint": "search"},
                    "created_at": now + timedelta(seconds=i),
                }
                for i in range(1, 2_000)
            ],
        )
    return 2_000


def test_transactions_csv_streams_a_long_history_page_by_page(client, login, long_history, statements):
    login("alice")
    statements.clear()
    response = client.get("/credits/transactions.csv")
    assert response.is_streamed

    def reads() -> int:
        return sum("credits_entries" in s for s in statements)

    chunks = iter(response.response)
    assert next(chunks).startswith(b"id,created_at,")
    assert reads() == 0  # the header goes before any read
    first_page = next(chunks)
    assert reads() == 1
    assert len(rows_of(first_page.decode())) == usage.PAGE_SIZE
    rest = b"".join(chunks)
    response.close()
    # 2,000 entries: four full pages, then one read that finds no more.
    assert reads() == long_history // usage.PAGE_SIZE + 1
    assert all("limit" in s.lower() for s in statements if "credits_entries" in s)
    rows = rows_of((first_page + rest).decode())
    assert len(rows) == long_history
    ids = [int(r[0]) for r in rows]
    assert ids == sorted(ids)
    assert rows[-1][5:7] == ["call 1999", "search"]


def test_cli_history_csv_writes_the_same_csv(app, client, login, credits, three_days):
    runner = app.test_cli_runner()
    result = runner.invoke(args=["credits", "history", "alice", "--csv"])
    assert result.exit_code == 0, result.output
    route = client.get("/credits/transactions.csv").get_data(as_text=True)
    assert rows_of(result.output) == rows_of(route)
    keyed = runner.invoke(args=["credits", "history", "alice", "--key", "key-1", "--csv"])
    assert [r[2] for r in rows_of(keyed.output)[1:]] == ["grant", "spend"]
    unknown = runner.invoke(args=["credits", "history", "mallory", "--csv"])
    assert unknown.exit_code != 0
    assert "unknown user 'mallory'" in unknown.output


def test_cli_history_csv_streams_page_by_page(app, long_history, statements):
    result = app.test_cli_runner().invoke(args=["credits", "history", "alice", "--csv"])
    assert result.exit_code == 0
    assert len(rows_of(result.output)) == long_history + 1
    reads = [s for s in statements if "credits_entries" in s and "limit" in s.lower()]
    assert len(reads) == long_history // usage.PAGE_SIZE + 1
