"""Registering the extension: one line, app factories, several apps, config, CLI."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_credits import FlaskCredits
from flask_credits.settings import DEFAULTS


def sqlite_app(tmp_path, name="app"):
    app = Flask(name)
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / name}.sqlite3"
    return app


def test_one_line_setup_finds_the_apps_flask_sqlalchemy(tmp_path):
    app = sqlite_app(tmp_path)
    db = SQLAlchemy(app)
    credits = FlaskCredits(app)
    assert app.extensions["credits"] is credits
    assert "credits" in app.blueprints
    assert app.url_map.bind("localhost").build("credits.index") == "/credits/"
    assert "credits_wallets" in db.metadata.tables
    with app.app_context():
        db.create_all()
        credits.grant("alice", 3, reason="x")
        assert credits.balance("alice") == 3


def test_registering_twice_on_one_app_is_an_error(tmp_path):
    app = sqlite_app(tmp_path)
    SQLAlchemy(app)
    credits = FlaskCredits(app)
    with pytest.raises(RuntimeError, match="already been registered"):
        credits.init_app(app)
    with pytest.raises(RuntimeError, match="already been registered"):
        FlaskCredits(app)


def test_without_flask_sqlalchemy_it_says_what_to_do(tmp_path):
    with pytest.raises(RuntimeError, match="Flask-SQLAlchemy"):
        FlaskCredits(sqlite_app(tmp_path))


def test_app_factory_and_several_apps_share_one_instance_but_not_data(tmp_path):
    db = SQLAlchemy()
    credits = FlaskCredits(db=db)
    assert "credits_wallets" in db.metadata.tables  # visible to create_all before init_app
    apps = []
    for name in ("one", "two"):
        app = sqlite_app(tmp_path, name)
        app.config["CREDITS_URL_PREFIX"] = f"/{name}-credits"
        db.init_app(app)
        credits.init_app(app)
        apps.append(app)
    for app, amount in zip(apps, (5, 9), strict=True):
        with app.app_context():
            db.create_all()
            credits.grant("alice", amount, reason="x")
    for app, amount in zip(apps, (5, 9), strict=True):
        with app.app_context():
            assert credits.balance("alice") == amount
    assert apps[1].url_map.bind("localhost").build("credits.index") == "/two-credits/"
    assert not any(isinstance(v, Flask) for v in vars(credits).values())


def test_every_config_key_gets_a_default(tmp_path):
    app = sqlite_app(tmp_path)
    app.config["CREDITS_PER_UNIT"] = 7
    SQLAlchemy(app)
    FlaskCredits(app)
    assert app.config["CREDITS_PER_UNIT"] == 7
    for key, value in DEFAULTS.items():
        if key != "CREDITS_PER_UNIT" and not key.startswith("STRIPE_"):
            assert app.config[key] == value


@pytest.mark.parametrize("prefix", ["STRIPE_SECRET_KEY", "StripeSecretKey"])
def test_stripe_keys_come_from_the_environment_under_either_name(tmp_path, monkeypatch, prefix):
    monkeypatch.delenv("STRIPE_SECRET_KEY", raising=False)
    monkeypatch.delenv("StripeSecretKey", raising=False)
    monkeypatch.setenv(prefix, "sk_test_from_env")
    monkeypatch.setenv("StripeWebhookSecret", "whsec_from_env")
    app = sqlite_app(tmp_path)
    SQLAlchemy(app)
    FlaskCredits(app)
    assert app.config["STRIPE_SECRET_KEY"] == "sk_test_from_env"
    assert app.config["STRIPE_WEBHOOK_SECRET"] == "whsec_from_env"


def test_explicit_config_wins_over_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("STRIPE_SECRET_KEY", "sk_test_env")
    app = sqlite_app(tmp_path)
    app.config["STRIPE_SECRET_KEY"] = "sk_test_config"
    SQLAlchemy(app)
    FlaskCredits(app)
    assert app.config["STRIPE_SECRET_KEY"] == "sk_test_config"


def test_cli_group_is_registered(tmp_path):
    app = sqlite_app(tmp_path)
    SQLAlchemy(app)
    FlaskCredits(app)
    result = app.test_cli_runner().invoke(args=["credits", "--help"])
    assert result.exit_code == 0
    for command in ("balance", "grant", "history", "holds", "audit", "expire"):
        assert command in result.output


def registered(tmp_path, **config):
    app = sqlite_app(tmp_path)
    app.config.update(config)
    SQLAlchemy(app)
    FlaskCredits(app)
    return app


ORIGIN_WARNING = "set CREDITS_SITE_URL"


def test_a_live_app_that_leaves_urls_to_the_host_header_is_warned_at_startup(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="flask_credits"):
        registered(tmp_path)
    (record,) = [r for r in caplog.records if ORIGIN_WARNING in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert "SERVER_NAME" in record.getMessage()
    assert "TRUSTED_HOSTS" in record.getMessage()


@pytest.mark.parametrize(
    "config",
    [
        pytest.param({"CREDITS_SITE_URL": "https://shop.example.com"}, id="CREDITS_SITE_URL"),
        pytest.param({"SERVER_NAME": "shop.example.com"}, id="SERVER_NAME"),
        pytest.param({"TRUSTED_HOSTS": ["shop.example.com"]}, id="TRUSTED_HOSTS"),
        pytest.param({"TESTING": True}, id="testing"),
        pytest.param({"DEBUG": True}, id="debug"),
        pytest.param({"DEBUG": True, "CREDITS_STRIPE_MODE": "simulated"}, id="simulated"),
    ],
)
def test_no_warning_once_the_origin_is_configured_or_outside_production(tmp_path, caplog, config):
    with caplog.at_level(logging.WARNING, logger="flask_credits"):
        registered(tmp_path, **config)
    assert ORIGIN_WARNING not in caplog.text


@pytest.mark.parametrize(
    "url",
    [
        "shop.example.com",
        "ftp://shop.example.com",
        "https://shop.example.com/credits",
        "https://shop.example.com/?next=1",
        "https://shop.example.com#top",
        "https://admin:secret@shop.example.com",
        "https://",
        "https://shop example.com",
        "https://shop.example.com:99999",
        "https://shop.example.com\n",
        ["https://shop.example.com"],
    ],
)
def test_a_bad_site_url_is_refused_at_startup_naming_the_key(tmp_path, url):
    with pytest.raises(RuntimeError, match="CREDITS_SITE_URL"):
        registered(tmp_path, CREDITS_SITE_URL=url)


@pytest.mark.parametrize("url", ["https://shop.example.com", "http://127.0.0.1:8000/", "https://[::1]:8443"])
def test_a_site_url_is_an_origin_with_an_optional_trailing_slash(tmp_path, url):
    app = registered(tmp_path, CREDITS_SITE_URL=url)
    assert "credits" in app.extensions


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("CREDITS_MAX_OPEN_PURCHASES", 0),
        ("CREDITS_MAX_OPEN_PURCHASES", None),
        ("CREDITS_MAX_OPEN_PURCHASES", "5"),
        ("CREDITS_MAX_OPEN_PURCHASES", True),
        ("CREDITS_SUCCESS_CHECK_INTERVAL", 0),
        ("CREDITS_SUCCESS_CHECK_INTERVAL", None),
        ("CREDITS_SUCCESS_CHECK_INTERVAL", 0.5),
        ("CREDITS_SUCCESS_CHECK_INTERVAL", float("nan")),
        ("CREDITS_SUCCESS_CHECK_INTERVAL", timedelta(0)),
    ],
)
def test_checkout_limits_that_cannot_work_are_refused_at_startup(tmp_path, key, value):
    with pytest.raises(RuntimeError, match=key):
        registered(tmp_path, **{key: value})
