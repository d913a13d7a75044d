"""migrations/ builds exactly the schema that example_app's models and flask_credits' tables describe,
on SQLite, PostgreSQL and MariaDB, and takes it down again."""

from __future__ import annotations

import flask_migrate
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from example_app import create_app
from example_app.models import db

CREDITS_TABLES = {
    "credits_wallets",
    "credits_entries",
    "credits_lots",
    "credits_draws",
    "credits_holds",
    "credits_hold_draws",
    "credits_purchases",
    "credits_stripe_events",
    "credits_requests",
    "credits_subscriptions",
    "credits_customers",
    "credits_auto_top_ups",
    "credits_codes",
    "credits_code_redemptions",
}
APP_TABLES = {"users", "api_keys"}


@pytest.fixture
def app(empty_database):
    app = create_app({"TESTING": True, "SQLALCHEMY_DATABASE_URI": empty_database})
    with app.app_context():
        yield app
        db.engine.dispose()


def same_server_default(
    context, inspected_column, metadata_column, inspected_default, metadata_default, rendered_metadata_default
):
    """Compare server defaults too (they are part of the schema), with one correction.

    Alembic's SQLite and MySQL/MariaDB comparisons report ``server_default=""`` (credits_wallets.key_id,
    credits_entries.reason) as changed on every run: they strip or add quotes only around a non-empty
    default, so the reflected ``''`` (SQLite: ``('')``) never equals the model's ``""`` (alembic 1.20;
    PostgreSQL asks the database and is right). Answer "same" for exactly that case; ``None`` lets
    alembic compare the rest.
    """
    if rendered_metadata_default == "" and inspected_default in ("''", "('')"):
        return False
    return None


def test_upgrade_creates_every_table_of_the_app_and_the_extension(app):
    flask_migrate.upgrade()
    tables = set(sa.inspect(db.engine).get_table_names())
    assert tables == CREDITS_TABLES | APP_TABLES | {"alembic_version"}


def differences(metadata: sa.MetaData) -> list:
    """What ``flask db migrate`` would still write to bring the database to ``metadata``."""
    with db.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": same_server_default}
        )
        return compare_metadata(context, metadata)


def test_nothing_is_left_to_autogenerate_after_upgrade(app):
    flask_migrate.upgrade()
    assert differences(db.metadata) == []


def test_the_comparison_would_notice_a_missing_migration(app):
    """The check above is not blind: a new column and a changed empty-string default show up."""
    flask_migrate.upgrade()
    changed = sa.MetaData()
    for table in db.metadata.sorted_tables:
        table.to_metadata(changed)
    changed.tables["users"].append_column(sa.Column("nickname", sa.String(32)))
    changed.tables["credits_entries"].c.reason.server_default = sa.DefaultClause("-")
    # compare_metadata gives a tuple per added or removed item, a list of tuples per modified column.
    found = [item for diff in differences(changed) for item in (diff if isinstance(diff, list) else [diff])]
    assert {(kind, table) for kind, _schema, table, *_ in found} == {
        ("add_column", "users"),
        ("modify_default", "credits_entries"),
    }


def test_upgrade_creates_every_check_constraint(app):
    """Autogenerate does not compare CHECK constraints, so look for each one by name (MariaDB adds
    one of its own for each JSON column, hence a subset)."""
    flask_migrate.upgrade()
    inspector = sa.inspect(db.engine)
    for table in db.metadata.sorted_tables:
        expected = {c.name for c in table.constraints if isinstance(c, sa.CheckConstraint)}
        found = {c["name"] for c in inspector.get_check_constraints(table.name)}
        assert expected <= found, table.name
    assert "ck_credits_lots_remaining" in {c["name"] for c in inspector.get_check_constraints("credits_lots")}


def test_the_database_enforces_the_check_constraints(app):
    flask_migrate.upgrade()
    wallets = db.metadata.tables["credits_wallets"]
    row = {"user_id": "1", "created_at": sa.func.now(), "updated_at": sa.func.now()}
    with db.engine.begin() as conn:
        conn.execute(wallets.insert().values(**row))
    # PyMySQL reports MariaDB's failed CHECK (error 4025) as an OperationalError.
    with pytest.raises((sa.exc.IntegrityError, sa.exc.OperationalError)), db.engine.begin() as conn:
        conn.execute(wallets.update().values(balance=-1))


def test_downgrade_to_base_leaves_no_tables(app):
    flask_migrate.upgrade()
    flask_migrate.downgrade(revision="base")
    inspector = sa.inspect(db.engine)
    assert inspector.get_table_names() == ["alembic_version"]  # alembic's own bookkeeping, now empty
    with db.engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT COUNT(*) FROM alembic_version")) == 0
    flask_migrate.upgrade()  # and back up again from nothing
    assert set(sa.inspect(db.engine).get_table_names()) >= CREDITS_TABLES | APP_TABLES
