"""example_app served in production: the config it refuses to serve without, security headers, ProxyFix,
the login throttle (in memory, and in the real Redis of every machine here) and the health check."""

from __future__ import annotations

import base64
import hashlib
import html
import os
import re
import secrets
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import click
import flask_migrate
import pytest
import redis
from flask import render_template_string, request
from helpers import PASSWORD, UNREACHABLE, build_example_app, create_key, signed_up

from example_app import create_app
from example_app.deployment import DEVELOPMENT_SECRET_KEY
from example_app.models import db

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379"
#: Everything a deployment sets (the Stripe keys as flask_credits reads them, from config or environment).
SERVING = {
    "SECRET_KEY": "a3f1c9e07b5d42c8a6e1f0b9d7c3a5e2",
    "STRIPE_SECRET_KEY": "sk_test_production",
    "STRIPE_WEBHOOK_SECRET": "whsec_production",
    "RATELIMIT_STORAGE_URI": REDIS_URL,
}
ENVIRONMENT = (
    "FLASK_DEBUG",
    "SECRET_KEY",
    "STRIPE_SECRET_KEY",
    "StripeSecretKey",
    "STRIPE_WEBHOOK_SECRET",
    "StripeWebhookSecret",
    "RATELIMIT_STORAGE_URI",
    "CREDITS_STRIPE_MODE",
    "SESSION_COOKIE_SECURE",
    "PROXY_FIX_X_FOR",
    "PROXY_FIX_X_PROTO",
)


@pytest.fixture(autouse=True)
def no_deployment_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test passes configures the app, whatever the shell running the tests exports."""
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


def serving_app(tmp_path: Path, **config: Any) -> Any:
    """The example app as gunicorn would build it: not debug, not testing, on SQLite in ``tmp_path``."""
    values = {**SERVING, "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'app.db'}", **config}
    return create_app({key: value for key, value in values.items() if value is not None})


@pytest.fixture
def example(tmp_path: Path) -> Any:
    """The example app in testing (login throttle in memory), its schema built by the migrations."""
    app = build_example_app(f"sqlite:///{tmp_path / 'example.db'}")
    with app.app_context():
        flask_migrate.upgrade()
    return app


def csp_hash(script: str) -> str:
    return f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"


# -- what serving needs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", [None, "", DEVELOPMENT_SECRET_KEY, "short"], ids=["unset", "empty", "dev", "short"]
)
def test_serving_without_a_real_secret_key_is_refused(tmp_path, key):
    with pytest.raises(RuntimeError, match="Set SECRET_KEY"):
        serving_app(tmp_path, SECRET_KEY=key)


@pytest.mark.parametrize("missing", ["STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET"])
def test_serving_live_stripe_without_its_keys_is_refused(tmp_path, missing):
    with pytest.raises(RuntimeError, match=f"Set {missing} "):
        serving_app(tmp_path, **{missing: None})


def test_serving_the_simulated_stripe_outside_debug_and_testing_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="simulated"):
        serving_app(
            tmp_path, CREDITS_STRIPE_MODE="simulated", STRIPE_SECRET_KEY=None, STRIPE_WEBHOOK_SECRET=None
        )


@pytest.mark.parametrize("storage", [None, "memory://"])
def test_serving_with_per_process_throttle_counts_is_refused(tmp_path, storage):
    with pytest.raises(RuntimeError, match="Set RATELIMIT_STORAGE_URI"):
        serving_app(tmp_path, RATELIMIT_STORAGE_URI=storage)


def test_serving_reads_the_keys_from_the_environment(tmp_path, monkeypatch):
    for name, value in SERVING.items():
        monkeypatch.setenv(name, value)
    app = create_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'app.db'}"})
    assert app.config["SECRET_KEY"] == SERVING["SECRET_KEY"]
    assert app.config["SESSION_COOKIE_SECURE"] is True


def test_a_cli_command_other_than_run_needs_no_keys_and_never_gets_the_development_key(tmp_path):
    with click.Context(click.Command("upgrade"), info_name="upgrade"):
        app = serving_app(tmp_path, SECRET_KEY=None, STRIPE_SECRET_KEY=None, RATELIMIT_STORAGE_URI=None)
    assert app.config["SECRET_KEY"] not in (None, DEVELOPMENT_SECRET_KEY)
    with (
        click.Context(click.Command("run"), info_name="run"),
        pytest.raises(RuntimeError, match="SECRET_KEY"),
    ):
        serving_app(tmp_path, SECRET_KEY=None)


def flask_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if name not in ENVIRONMENT}
    env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'cli.db'}"
    return subprocess.run(
        [str(Path(sys.executable).parent / "flask"), "--app", "example_app", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_flask_db_upgrade_runs_without_keys_and_flask_run_without_debug_refuses_to_start(tmp_path):
    upgrade = flask_cli(tmp_path, "db", "upgrade")
    assert upgrade.returncode == 0, upgrade.stderr
    run = flask_cli(tmp_path, "run", "--port", "9")  # refused before it binds anything
    assert run.returncode != 0
    assert "RuntimeError: Set SECRET_KEY" in run.stderr


def test_debug_and_testing_need_no_keys(tmp_path):
    for mode in ({"DEBUG": True}, {"TESTING": True}):
        app = serving_app(
            tmp_path, SECRET_KEY=None, STRIPE_SECRET_KEY=None, RATELIMIT_STORAGE_URI=None, **mode
        )
        assert app.config["SECRET_KEY"] == DEVELOPMENT_SECRET_KEY
        assert app.config["SESSION_COOKIE_SECURE"] is False


# -- headers, cookies, proxies ------------------------------------------------------------------------


def test_every_response_carries_the_security_headers(example):
    client = example.test_client()
    signed_up(client)
    create_key(client)
    pages = {
        "/": 200,
        "/personas": 200,
        "/credits/": 200,
        "/keys/": 200,
        "/healthz": 200,
        "/nowhere": 404,
    }
    for path, status in pages.items():
        response = client.get(path)
        assert response.status_code == status, path
        headers = response.headers
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], path
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "same-origin"
        assert "Strict-Transport-Security" not in headers  # plain HTTP: HSTS would be ignored anyway
    api = client.post("/api/personas", json={}, headers={"X-API-Key": "sk_unknown"})
    assert api.status_code == 401
    assert "Content-Security-Policy" in api.headers


def test_the_pages_run_under_their_content_security_policy(example):
    """No inline <script> or <style> or style attribute, and every inline event handler allowed by its
    hash (flask_credits' purchase button, for templates that use it): the pages work under the policy."""
    client = example.test_client()
    signed_up(client)
    pages = {
        path: client.get(path) for path in ["/", "/login", "/signup", "/personas", "/credits/", "/keys/"]
    }
    policy = pages["/"].headers["Content-Security-Policy"]
    with example.test_request_context("/"):
        button = render_template_string('{% import "credits/macros.html" as ui %}{{ ui.purchase_button() }}')
    texts = [response.get_data(as_text=True) for response in pages.values()] + [button]
    for page in texts:
        assert not re.search(r"<script(?![^>]*\bsrc=)|<style|\sstyle=", page)
        for handler in re.findall(r'\son[a-z]+="([^"]*)"', page):
            assert csp_hash(html.unescape(handler)) in policy, handler
    assert re.search(r"\sonsubmit=", button)  # the hash was checked against the macro as it is


def test_hsts_only_over_https(example):
    response = example.test_client().get("/login", base_url="https://localhost")
    assert response.headers["Strict-Transport-Security"] == "max-age=31536000"


def test_proxy_fix_trusts_forwarded_headers_only_when_configured(tmp_path):
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    direct = serving_app(tmp_path).test_client().get("/healthz", headers=forwarded)
    assert "Strict-Transport-Security" not in direct.headers  # a client cannot claim HTTPS

    app = serving_app(tmp_path, PROXY_FIX_X_FOR="1", PROXY_FIX_X_PROTO="1")
    seen = {}

    @app.get("/_addr")
    def addr() -> str:
        seen["addr"] = request.remote_addr
        return "ok"

    behind = app.test_client().get("/_addr", headers=forwarded)
    assert behind.headers["Strict-Transport-Security"] == "max-age=31536000"
    assert seen["addr"] == "203.0.113.9"
    with pytest.raises(RuntimeError, match="PROXY_FIX_X_FOR must be"):
        serving_app(tmp_path, PROXY_FIX_X_FOR="yes")


def test_the_session_cookie_is_secure_when_serving_unless_turned_off(tmp_path, monkeypatch):
    assert serving_app(tmp_path).config["SESSION_COOKIE_SECURE"] is True
    monkeypatch.setenv("SESSION_COOKIE_SECURE", "0")  # plain HTTP on a private network
    assert serving_app(tmp_path).config["SESSION_COOKIE_SECURE"] is False


# -- the login throttle -------------------------------------------------------------------------------


def log_in(client: Any, username: str, password: str = "wrong password") -> Any:
    return client.post("/login", data={"username": username, "password": password})


def test_six_wrong_passwords_for_one_username_are_throttled_whatever_the_address(example):
    signed_up(example.test_client(), "ada")
    for attempt in range(5):
        client = example.test_client()
        address = {"REMOTE_ADDR": f"198.51.100.{attempt}"}  # a botnet: one guess per address
        assert (
            client.post("/login", data={"username": "ada", "password": "x"}, environ_base=address).status_code
            == 400
        )
    response = example.test_client().post(
        "/login",
        data={"username": " ADA ", "password": PASSWORD},
        environ_base={"REMOTE_ADDR": "198.51.100.99"},
    )
    assert response.status_code == 429
    assert "Too many attempts" in response.get_data(as_text=True)
    assert int(response.headers["Retry-After"]) > 0
    assert log_in(example.test_client(), "grace").status_code == 400  # other names are not locked


def test_one_address_trying_many_usernames_is_throttled(example):
    client = example.test_client()
    for n in range(10):
        assert log_in(client, f"user{n}").status_code == 400
    assert log_in(client, "user10").status_code == 429
    assert client.get("/login").status_code == 200  # only posts count: the page still shows
    other = example.test_client().post(
        "/login", data={"username": "user11", "password": "x"}, environ_base={"REMOTE_ADDR": "198.51.100.7"}
    )
    assert other.status_code == 400


def test_sign_up_posts_are_throttled_too(example):
    client = example.test_client()
    statuses = [
        client.post("/signup", data={"username": f"new{n}", "password": "short"}).status_code
        for n in range(11)
    ]
    assert statuses == [400] * 10 + [429]


def test_the_throttle_counts_in_redis_when_serving(tmp_path):
    """The real Redis at 127.0.0.1:6379 (on every machine and in CI): counts shared by every worker."""
    store = redis.Redis.from_url(REDIS_URL)
    try:
        store.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis is not answering at {REDIS_URL} ({exc}): start it (redis-server) and run again")
    # A name and an address of this run alone: Redis outlives the test, and other runs share it.
    username = f"ada-{uuid.uuid4().hex}"
    address = {"REMOTE_ADDR": f"198.18.{secrets.randbelow(256)}.{secrets.randbelow(256)}"}
    app = serving_app(tmp_path, WTF_CSRF_ENABLED=False, SESSION_COOKIE_SECURE=False)
    with app.app_context():
        flask_migrate.upgrade()
    try:
        statuses = [
            app.test_client().post(
                "/login", data={"username": username, "password": "x"}, environ_base=address
            )
            for _ in range(6)
        ]
        assert [response.status_code for response in statuses] == [400] * 5 + [429]
        assert store.keys(f"*{username}*")  # the counts are in Redis, not in this process
    finally:
        for pattern in (f"*{username}*", f"*{address['REMOTE_ADDR']}*"):
            for key in store.scan_iter(pattern):
                store.delete(key)
        with app.app_context():
            db.engine.dispose()


def test_logins_go_on_when_redis_is_down(tmp_path):
    """The counts fall back to this process's memory rather than turn every login into a 500."""
    app = serving_app(tmp_path, RATELIMIT_STORAGE_URI="redis://127.0.0.1:9", WTF_CSRF_ENABLED=False)
    with app.app_context():
        flask_migrate.upgrade()
    try:
        statuses = [log_in(app.test_client(), "ada").status_code for _ in range(6)]
        assert statuses == [400] * 5 + [429]
    finally:
        with app.app_context():
            db.engine.dispose()


# -- the health check ---------------------------------------------------------------------------------


def test_health_is_ok_without_login_session_or_throttle(empty_database):
    app = build_example_app(empty_database)
    client = app.test_client()
    try:
        for _ in range(20):
            response = client.get("/healthz")
            assert response.status_code == 200
            assert response.json == {"status": "ok"}
            assert response.headers["Cache-Control"] == "no-store"
            assert "Set-Cookie" not in response.headers
    finally:
        with app.app_context():
            db.engine.dispose()


@pytest.mark.parametrize("backend", sorted(UNREACHABLE))
def test_health_is_503_when_the_database_cannot_answer(backend):
    app = build_example_app(UNREACHABLE[backend])
    response = app.test_client().get("/healthz")
    assert response.status_code == 503
    assert response.json == {"status": "unavailable"}
    assert "Set-Cookie" not in response.headers
