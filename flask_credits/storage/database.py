"""The database as the extension uses it: one engine and its tables, an autocommit reader,
transactions retried when the database picks them as a deadlock victim, and the translation of "the
database cannot answer" into :class:`~flask_credits.errors.CreditsUnavailable` (HTTP 503)."""

from __future__ import annotations

import functools
import json
import logging
import random
import time
from collections import namedtuple
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ..errors import CreditsUnavailable
from .statements import Statements
from .tables import Tables

log = logging.getLogger("flask_credits")

T = TypeVar("T")
P = ParamSpec("P")

#: How often a transaction that lost a deadlock or serialization race is tried at most. InnoDB picks
#: victims among racers inserting one unique key (16 threads granting with one idempotency key into a
#: wallet being created): four tries ran out on a loaded machine, eight (about half a second of pauses at
#: most) did not.
RETRIES = 8


def utcnow() -> datetime:
    """The ledger's clock (tests replace it)."""
    return datetime.now(timezone.utc)


#: What a database that cannot be reached or gave up raises: connection refused or dropped, lock wait
#: timeout, deadlock or serialization failure (after the retries), no connection left in the pool.
UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)


def unavailable_on_database_errors(method: Callable[P, T]) -> Callable[P, T]:
    """Raise :class:`CreditsUnavailable` (HTTP 503) instead of the driver's error when the database
    cannot be reached or gave up; the original error is chained."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except UNAVAILABLE as exc:
            cause = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
            log.warning("credits ledger: the database is unavailable (%s)", type(cause).__name__)
            raise CreditsUnavailable() from exc

    return wrapper


def without_server_side_prepares(engine: Engine) -> None:
    """Make ``engine`` safe behind a transaction pooler (``CREDITS_DATABASE_POOLER = "transaction"``):
    psycopg 3 prepares a statement on the server after 5 uses, and a prepared statement belongs to one
    server connection, which a transaction pooler hands to another client after each transaction
    ("prepared statement ... does not exist" / "already exists"). Its connections are made with
    ``prepare_threshold = None`` (psycopg2 never prepares on the server). Raises ``RuntimeError`` for
    a database or driver this cannot cover."""
    url = engine.url.render_as_string(hide_password=True)
    if engine.dialect.name != "postgresql":
        raise RuntimeError(f'CREDITS_DATABASE_POOLER = "transaction" is for PostgreSQL, not {url}')
    driver = engine.dialect.driver
    if driver == "psycopg2":
        return
    if driver != "psycopg":
        raise RuntimeError(
            f'CREDITS_DATABASE_POOLER = "transaction" needs the psycopg (3) or psycopg2 driver,'
            f" not {driver}: use a postgresql+psycopg:// URL ({url})"
        )
    if not sa.event.contains(engine, "connect", _no_server_side_prepares):
        sa.event.listen(engine, "connect", _no_server_side_prepares)
        engine.dispose()  # a connection opened before this would still prepare
    log.info("credits: server-side prepared statements off on %s (CREDITS_DATABASE_POOLER)", url)


def _no_server_side_prepares(dbapi_connection: Any, connection_record: Any) -> None:
    dbapi_connection.prepare_threshold = None


#: Ports of transaction poolers: PgBouncer's default, Supabase's pooler (Neon's pooled hosts end in
#: "-pooler").
POOLER_PORTS = (6432, 6543)
#: What psycopg 3 gets when a pooler hands its prepared statements' server connection to another
#: client: "prepared statement ... does not exist" and "... already exists".
LOST_PREPARED_STATEMENT = ("26000", "42P05")
ADVICE = 'behind a transaction pooler, set CREDITS_DATABASE_POOLER = "transaction"'


def watch_for_transaction_pooler(engine: Engine) -> None:
    """For an app that has not set ``CREDITS_DATABASE_POOLER``, on psycopg 3: warn at startup when
    the URL looks like a transaction pooler's, and log the setting to use with each error that says
    the engine's prepared statements met one (the app's own queries included)."""
    if engine.dialect.name != "postgresql" or engine.dialect.driver != "psycopg":
        return
    url = engine.url
    if url.port in POOLER_PORTS or "pooler" in (url.host or ""):
        log.warning(
            'credits: %s looks like a connection pooler\'s address; %s (or "session" for a session'
            " pooler), or its queries fail under load with 'prepared statement does not exist'",
            url.render_as_string(hide_password=True),
            ADVICE,
        )
    if not sa.event.contains(engine, "handle_error", _explain_lost_prepared_statement):
        sa.event.listen(engine, "handle_error", _explain_lost_prepared_statement)


def _explain_lost_prepared_statement(context: sa.engine.ExceptionContext) -> None:
    if getattr(context.original_exception, "sqlstate", None) in LOST_PREPARED_STATEMENT:
        log.error("credits: the database lost a prepared statement of this connection: %s", ADVICE)


class Database:
    """One engine and the extension's tables on it. ``clock`` is the time every write records
    (``utcnow`` unless a test gives another)."""

    def __init__(self, engine: Engine, tables: Tables, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.t = tables
        self.clock = clock
        self.returning = bool(engine.dialect.update_returning)
        self.lock_rows = engine.dialect.name != "sqlite"
        self.pg = engine.dialect.name == "postgresql"
        # The one-statement debit is written in the "pyformat" style of psycopg (3 and 2).
        self.one_statement = self.pg and engine.dialect.paramstyle == "pyformat"
        #: The engine for reads and single statements. On PostgreSQL it runs them in autocommit: one
        #: round trip instead of BEGIN, SELECT, ROLLBACK, and no ROLLBACK to make psycopg forget its
        #: prepared statements. Elsewhere it is the engine itself.
        self.reader = engine.execution_options(isolation_level="AUTOCOMMIT") if self.pg else engine
        # The one statements run on the pooled connection's psycopg (3) connection itself (``one``).
        self.direct = self.one_statement and engine.dialect.driver == "psycopg"
        self._row_types: dict[str, Any] = {}
        self.sql = Statements(tables, returning=self.returning, lock_rows=self.lock_rows)
        # The app's JSON serializer if it set one (create_engine(json_serializer=...)); by default
        # strict JSON: NaN and Infinity are not JSON, and PostgreSQL would refuse them.
        self.json: Callable[[Any], str] = getattr(
            engine.dialect, "_json_serializer", None
        ) or functools.partial(json.dumps, allow_nan=False)

    def now(self) -> datetime:
        return self.clock()

    def lock(self, query: sa.Select[Any]) -> sa.Select[Any]:
        """Lock the one row (by primary key) ``query`` reads. SQLite locks the whole database for
        the writer already. Never for range reads: InnoDB would take gap locks that collide with the
        neighbouring wallet's rows."""
        return query.with_for_update() if self.lock_rows else query

    def run(self, tx: Callable[[Connection], T], *, autocommit: bool = False) -> T:
        """Run ``tx`` in one transaction, again if the database chose it as a deadlock victim. With
        ``autocommit`` (PostgreSQL), ``tx`` sends one statement, which is its own transaction."""

        def attempt() -> T:
            if autocommit:
                with self.reader.connect() as conn:
                    return tx(conn)
            with self.engine.begin() as conn:
                return tx(conn)

        return self._retried(attempt)

    def _retried(self, attempt: Callable[[], T]) -> T:
        for tries in range(RETRIES):
            try:
                return attempt()
            except sa.exc.OperationalError as exc:
                if tries == RETRIES - 1 or not retryable(exc):
                    raise
                log.warning("credits transaction retried after %s", type(exc.orig).__name__)
                # Randomised, growing pause so the transactions that collided do not collide again.
                time.sleep(random.uniform(0, min(0.005 * 2**tries, 0.2)))  # noqa: S311 - not cryptography
        raise AssertionError("unreachable")  # pragma: no cover

    def one(self, statement: str, params: dict[str, Any]) -> Any:
        """PostgreSQL: run one of the one statements (``pyformat`` SQL: the ledger's writes, the
        webhook's duplicate check) in autocommit, retried like a transaction; its first row (a named
        tuple) or ``None``. Errors are SQLAlchemy's, as from ``Connection.exec_driver_sql``.

        On psycopg 3 the hot path skips SQLAlchemy's execution layer (the connection switched to and
        from autocommit by the engine, the result object and its metadata built from the cursor's
        description each time): the statement goes to the pooled connection's driver connection,
        which is back in its transaction mode before it returns to the pool. The statement prepares
        on the server as any other does (``prepare_threshold``; ``None`` behind a transaction
        pooler). While anything listens for the engine's ``before_cursor_execute`` or
        ``after_cursor_execute`` (query recorders, tracing, tests counting statements), the statement
        goes through SQLAlchemy, so that they see it. The engine's ``handle_error`` listeners do not
        see the direct path's errors (the advice for a transaction pooler is logged here instead)."""
        dispatch = self.engine.dispatch
        if not self.direct or dispatch.before_cursor_execute or dispatch.after_cursor_execute:

            def tx(conn: Connection) -> Any:
                return conn.exec_driver_sql(statement, params).first()

            return self.run(tx, autocommit=True)
        return self._retried(lambda: self._direct(statement, params))

    def _direct(self, statement: str, params: dict[str, Any]) -> Any:
        dialect = self.engine.dialect
        error = dialect.loaded_dbapi.Error
        try:
            pooled = self.engine.raw_connection()
        except error as exc:  # no connection: wrapped as Engine.connect() wraps it
            raise self._wrapped(exc, None, None, dialect.is_disconnect(exc, None, None)) from exc
        cursor = None
        try:
            conn: Any = pooled.driver_connection
            conn.autocommit = True
            try:
                cursor = conn.cursor()
                cursor.execute(statement, params)
                row = cursor.fetchone()
                if row is None:
                    return None
                make = self._row_types.get(statement)
                if make is None:
                    names = tuple(c[0] for c in cursor.description)
                    make = namedtuple("Row", names, rename=True)._make  # type: ignore[attr-defined]
                    self._row_types[statement] = make
                return make(row)
            finally:
                if cursor is not None:
                    cursor.close()
                if not conn.broken:  # a lost connection cannot change mode; it is invalidated below
                    conn.autocommit = False
        except error as exc:
            disconnected = bool(conn.broken) or dialect.is_disconnect(exc, pooled.dbapi_connection, cursor)
            if disconnected:
                pooled.invalidate(exc)
            if getattr(exc, "sqlstate", None) in LOST_PREPARED_STATEMENT:
                log.error("credits: the database lost a prepared statement of this connection: %s", ADVICE)
            raise self._wrapped(exc, statement, params, disconnected) from exc
        finally:
            pooled.close()

    def _wrapped(
        self, exc: Exception, statement: str | None, params: dict[str, Any] | None, disconnected: bool
    ) -> sa.exc.StatementError:
        """The driver's error as SQLAlchemy raises it (``IntegrityError``, ``OperationalError``...)."""
        dialect = self.engine.dialect
        return sa.exc.DBAPIError.instance(
            statement,
            params,
            exc,
            dialect.loaded_dbapi.Error,
            hide_parameters=self.engine.hide_parameters,
            connection_invalidated=disconnected,
            dialect=dialect,
        )

    def write(self, statement: sa.Executable) -> int:
        """Run one statement as its own transaction (autocommit on PostgreSQL), retried like any
        transaction here; the number of rows it changed."""

        def tx(conn: Connection) -> int:
            return int(conn.execute(statement).rowcount)

        return self.run(tx, autocommit=self.pg)

    def insert(self, statement: sa.Insert) -> int:
        """Run one INSERT like ``write``; the new row's id."""

        def tx(conn: Connection) -> int:
            key = conn.execute(statement).inserted_primary_key
            assert key is not None
            return int(key[0])

        return self.run(tx, autocommit=self.pg)


def sqlstate(exc: sa.exc.DBAPIError) -> str | None:
    """The SQLSTATE of a PostgreSQL error: ``sqlstate`` on psycopg 3, ``pgcode`` on psycopg2."""
    return getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)


def retryable(exc: sa.exc.DBAPIError) -> bool:
    if exc.connection_invalidated:
        return False  # the commit may have happened: never guess
    orig = exc.orig
    if sqlstate(exc) in ("40001", "40P01"):
        return True
    args = getattr(orig, "args", ())
    # MySQL/MariaDB deadlock. Not 1205 (lock wait timeout): the transaction already waited as long as
    # the server allows, and waiting that long again would outlast a web worker's timeout.
    if args and args[0] == 1213:
        return True
    return "database is locked" in str(orig)
