import logging
from logging.config import fileConfig

from flask import current_app

from alembic import context
from alembic.operations import ops
from flask_credits.models import UtcDateTime

# this is the Alembic Config object, which provides
# access to the values within the .ini file in use.
config = context.config

# Interpret the config file for Python logging, unless the process already set logging up (pytest, or
# an app running its migrations on start): fileConfig would replace its handlers and levels. Keep the
# loggers that exist already (flask_credits, the app's own) working either way.
if not logging.getLogger().handlers:
    fileConfig(config.config_file_name, disable_existing_loggers=False)
logger = logging.getLogger('alembic.env')


def render_item(type_, obj, autogen_context):
    """Render flask_credits' UtcDateTime columns with the import they need.

    Alembic writes a custom type as ``flask_credits.models.UtcDateTime()`` but does not add the import;
    other items keep alembic's default rendering (``False``).
    """
    if type_ == "type" and isinstance(obj, UtcDateTime):
        autogen_context.imports.add("import flask_credits.models")
        return "flask_credits.models.UtcDateTime()"
    return False


def get_engine():
    # Flask-SQLAlchemy 3: the template's db.get_engine() is deprecated (a DeprecationWarning, which the
    # test suite turns into an error).
    return current_app.extensions['migrate'].db.engine


def get_engine_url():
    return get_engine().url.render_as_string(hide_password=False).replace('%', '%%')


# add your model's MetaData object here
# for 'autogenerate' support
# from myapp import mymodel
# target_metadata = mymodel.Base.metadata
config.set_main_option('sqlalchemy.url', get_engine_url())
target_db = current_app.extensions['migrate'].db

# other values from the config, defined by the needs of env.py,
# can be acquired:
# my_important_option = config.get_main_option("my_important_option")
# ... etc.


def get_metadata():
    if hasattr(target_db, 'metadatas'):
        return target_db.metadatas[None]
    return target_db.metadata


def drop_tables_with_their_indexes(migration_ops):
    """Leave out the drop_index that autogenerate writes before each drop_table: the index goes with
    its table anyway, and MariaDB/MySQL refuse to drop an index that a foreign key relies on (such as
    ix_credits_purchases_wallet_id for credits_purchases.wallet_id)."""
    dropped = {op.table_name for op in migration_ops.ops if isinstance(op, ops.DropTableOp)}
    for op in migration_ops.ops:
        if isinstance(op, ops.ModifyTableOps) and op.table_name in dropped:
            op.ops = [o for o in op.ops if not isinstance(o, ops.DropIndexOp)]
    migration_ops.ops = [
        op for op in migration_ops.ops if not (isinstance(op, ops.ModifyTableOps) and not op.ops)
    ]


def run_migrations_offline():
    """Run migrations in 'offline' mode.

    This configures the context with just a URL
    and not an Engine, though an Engine is acceptable
    here as well.  By skipping the Engine creation
    we don't even need a DBAPI to be available.

    Calls to context.execute() here emit the given string to the
    script output.

    """
    url = config.get_main_option("sqlalchemy.url")
    context.configure(
        url=url, target_metadata=get_metadata(), literal_binds=True
    )

    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online():
    """Run migrations in 'online' mode.

    In this scenario we need to create an Engine
    and associate a connection with the context.

    """

    # this callback is used to prevent an auto-migration from being generated
    # when there are no changes to the schema
    # reference: http://alembic.zzzcomputing.com/en/latest/cookbook.html
    def process_revision_directives(context, revision, directives):
        if getattr(config.cmd_opts, 'autogenerate', False):
            script = directives[0]
            if script.upgrade_ops.is_empty():
                directives[:] = []
                logger.info('No changes in schema detected.')
            else:
                drop_tables_with_their_indexes(script.upgrade_ops)
                drop_tables_with_their_indexes(script.downgrade_ops)

    conf_args = current_app.extensions['migrate'].configure_args
    if conf_args.get("process_revision_directives") is None:
        conf_args["process_revision_directives"] = process_revision_directives
    conf_args.setdefault("render_item", render_item)

    connectable = get_engine()

    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=get_metadata(),
            **conf_args
        )

        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
