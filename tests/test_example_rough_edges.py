"""Issue 17's rough edges in the example app: "Buy credits for it" preselects the new key, error pages
in the app's layout (JSON for API clients), a favicon, and persona bios that read well."""

from __future__ import annotations

import itertools
import re

import pytest
from helpers import create_key, signed_up
from werkzeug.exceptions import InternalServerError

from example_app.personas import (
    CITIES,
    FIRST_NAMES,
    HOBBIES,
    OCCUPATIONS,
    TRAITS,
    generate_persona,
    write_bio,
)

HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}  # as a browser sends it
JSON = {"Accept": "application/json"}


@pytest.fixture
def app(example):
    return example


@pytest.fixture
def client(app):
    return app.test_client()


def selected_for(page: str, field_id: str) -> str:
    """The value of the selected option of the "For" select ``field_id`` ("" for my account)."""
    select = re.search(rf'<select id="{field_id}" name="key_id">(.*?)</select>', page, re.S)
    assert select is not None, field_id
    chosen = re.findall(r'<option value="([^"]*)" selected>', select.group(1))
    assert len(chosen) <= 1
    return chosen[0] if chosen else ""


FOR_FIELDS = ("credits-pack-for", "credits-quantity-for", "credits-code-for")


# -- 5: "Buy credits for it" -------------------------------------------------------------------------


def test_buy_credits_for_a_new_key_preselects_it_in_every_for_select(client):
    signed_up(client)
    create_key(client, "first")
    response = client.post("/keys/", data={"name": "second"})
    key_id = re.search(r'data-testid="key-id">([^<]+)<', response.get_data(as_text=True)).group(1)
    link = re.search(r'href="([^"]+)" data-testid="buy-for-key"', response.get_data(as_text=True)).group(1)
    assert link == f"/credits/?key_id={key_id}"

    page = client.get(link, headers=HTML).get_data(as_text=True)
    assert [selected_for(page, field) for field in FOR_FIELDS] == [key_id] * 3
    # The simulated plans' "For" too.
    plans = page.split('id="credits-plans-title"')[1]
    assert f'<option value="{key_id}" selected>API key second</option>' in plans
    # Without the parameter, the forms are for the account, as before.
    page = client.get("/credits/", headers=HTML).get_data(as_text=True)
    assert [selected_for(page, field) for field in FOR_FIELDS] == [""] * 3


def test_a_key_id_that_is_not_the_users_is_ignored(app):
    alice, mallory = app.test_client(), app.test_client()
    signed_up(alice, "alice")
    alices_key, _ = create_key(alice)
    signed_up(mallory, "mallory")
    create_key(mallory)
    for key_id in (alices_key, "made-up", "<script>"):
        response = mallory.get("/credits/", query_string={"key_id": key_id}, headers=HTML)
        assert response.status_code == 200
        page = response.get_data(as_text=True)
        assert [selected_for(page, field) for field in FOR_FIELDS] == [""] * 3
        assert alices_key not in page
        assert "<script>" not in page


# -- 8: error pages and the favicon -------------------------------------------------------------------


def assert_error_page(response, status: int, title: str) -> str:
    assert response.status_code == status
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert f'<h1 data-testid="error-title">{title}</h1>' in page
    assert 'href="/static/style.css"' in page  # the app's layout
    assert 'rel="icon"' in page
    return page


def test_unknown_urls_get_a_page_in_the_layout_or_json(client):
    page = assert_error_page(client.get("/no/such/page", headers=HTML), 404, "Page not found")
    assert "Log in" in page  # the layout's navigation, for someone logged out
    signed_up(client)
    page = assert_error_page(client.get("/no/such/page", headers=HTML), 404, "Page not found")
    assert "Log out" in page

    response = client.get("/no/such/page", headers=JSON)
    assert response.status_code == 404
    assert response.get_json()["error"] == "not_found"
    # The API's paths answer JSON whatever the client accepts.
    response = client.get("/api/nothing-here", headers=HTML)
    assert (response.status_code, response.get_json()["error"]) == (404, "not_found")


def test_the_success_page_with_a_missing_bad_or_foreign_session_id(app):
    alice, mallory = app.test_client(), app.test_client()
    signed_up(alice, "alice")
    session_id = alice.post("/credits/checkout", json={"quantity": 1}).get_json()["id"]
    signed_up(mallory, "mallory")

    path = "/credits/success"
    page = assert_error_page(mallory.get(path, headers=HTML), 400, "That request could not be understood")
    assert "session_id is missing or too long" in page
    assert_error_page(mallory.get(f"{path}?session_id=not-an-id!", headers=HTML), 404, "Page not found")
    assert_error_page(mallory.get(f"{path}?session_id={session_id}", headers=HTML), 404, "Page not found")
    response = mallory.get(f"{path}?session_id={session_id}", headers=JSON)
    assert (response.status_code, response.get_json()["error"]) == (404, "not_found")
    response = mallory.get(path, headers=JSON)
    assert response.status_code == 400
    assert response.get_json() == {"error": "bad_request", "message": "session_id is missing or too long"}
    # Its owner still sees it.
    assert alice.get(f"{path}?session_id={session_id}", headers=HTML).status_code == 200


def test_a_wrong_method_keeps_its_allow_header(client):
    response = client.delete("/personas", headers=HTML)
    assert_error_page(response, 405, "That method is not allowed here")
    assert set(response.headers["Allow"].split(", ")) >= {"GET", "POST"}
    response = client.get("/api/personas")
    assert (response.status_code, response.get_json()["error"]) == (405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_a_server_error_is_a_page_in_the_layout_that_tells_nothing_of_the_failure(app, client):
    app.config["PROPAGATE_EXCEPTIONS"] = False

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret detail")

    page = assert_error_page(client.get("/boom", headers=HTML), 500, "Something went wrong on our side")
    assert "secret detail" not in page
    response = client.get("/boom", headers=JSON)
    assert response.status_code == 500
    assert response.get_json() == {
        "error": "internal_server_error",
        "message": InternalServerError.description,
    }


def test_flask_credits_errors_keep_their_own_answers(client):
    signed_up(client)
    response = client.post("/api/personas", json={"seed": "x"})
    assert response.status_code == 402
    assert response.get_json()["error"] == "insufficient_credits"


def test_the_favicon_is_linked_and_served_at_favicon_ico(client):
    page = client.get("/", headers=HTML).get_data(as_text=True)
    href = re.search(r'<link rel="icon" href="([^"]+)"', page).group(1)
    with client.get(href) as icon:
        assert icon.status_code == 200
        assert icon.data[:4] == b"\x00\x00\x01\x00"  # an ICO file
    with client.get("/favicon.ico") as response:
        assert response.status_code == 200
        assert response.mimetype in ("image/vnd.microsoft.icon", "image/x-icon")
        assert response.data == icon.data


# -- 12: persona bios ---------------------------------------------------------------------------------

#: What the bio must never say: a hobby that is not something one does ("spends most weekends competitive
#: chess"), "a" before a vowel sound, "1 years", doubled words or spaces.
BAD = [
    re.compile(r"spends most weekends (?!\w+ing\b)\w+"),
    re.compile(r"\ba [aeiou]", re.I),
    re.compile(r"\b1 years\b"),
    re.compile(r"\b(\w+) \1\b"),
    re.compile(r"  |\s[.,]"),
]


def bad_patterns(bio: str) -> list[str]:
    return [pattern.pattern for pattern in BAD if pattern.search(bio)]


def test_the_bad_patterns_catch_the_old_bio():
    assert bad_patterns("Ada is a curious nurse. Away from work, Ada spends most weekends competitive chess.")
    assert bad_patterns("Ada is a eager nurse who has lived in Osaka for 1 years.")


def test_every_combination_of_a_bio_reads_well():
    for trait, occupation, hobby in itertools.product(TRAITS, OCCUPATIONS, HOBBIES):
        for years in (1, 2):
            bio = write_bio(FIRST_NAMES[0], trait, occupation, CITIES[0], years, hobby)
            assert not bad_patterns(bio), bio
    for city in CITIES:
        assert not bad_patterns(write_bio("Ada", TRAITS[0], OCCUPATIONS[0], city, 3, HOBBIES[0]))


def test_generated_bios_read_well_and_use_every_hobby():
    hobbies = set()
    for n in range(3000):
        bio = generate_persona(f"seed {n}").bio
        assert not bad_patterns(bio), bio
        hobbies.update(h for h in HOBBIES if bio.endswith(f"spends most weekends {h}."))
    assert hobbies == set(HOBBIES)
