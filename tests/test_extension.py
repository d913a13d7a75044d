"""Registering the extension: one line, app factories, several apps, config, CLI."""

from __future__ import annotations

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_credits import FlaskCredits
from flask_credits.config import DEFAULTS


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
    for command in ("balance", "grant", "history", "audit", "expire"):
        assert command in result.output
