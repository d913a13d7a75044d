"""The example app's own tables: users and their API keys.

flask_credits adds its ``credits_*`` tables to the same ``db.metadata`` when it is set up (see
``example_app.extensions``), so ``flask db migrate`` sees both.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timezone

import sqlalchemy as sa
from flask_login import UserMixin
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from werkzeug.security import check_password_hash, generate_password_hash

#: Names for the constraints the models leave unnamed, so later migrations can drop them by name (SQLite
#: batch migrations need that). No "ck" entry: it would rename flask_credits' named CHECK constraints.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


db = SQLAlchemy(model_class=Base)


def utcnow() -> datetime:
    """Naive UTC: the same in SQLite, PostgreSQL and MariaDB, which do not all keep time zones."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class User(UserMixin, db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    #: Stored lower-case, so uniqueness does not depend on the database's collation.
    username: Mapped[str] = mapped_column(sa.String(32), unique=True)
    password_hash: Mapped[str] = mapped_column(sa.String(255))
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(), default=utcnow)

    api_keys: Mapped[list[ApiKey]] = relationship(
        back_populates="user", order_by="ApiKey.created_at.desc()", lazy="select"
    )

    def set_password(self, password: str) -> None:
        self.password_hash = generate_password_hash(password)

    def check_password(self, password: str) -> bool:
        return check_password_hash(self.password_hash, password)


class ApiKey(db.Model):  # type: ignore[name-defined,misc]
    """A user's API key. Each key has its own credit wallet: ``(str(user_id), key.id)``.

    Only a SHA-256 of the secret is stored (the secret is 256 random bits, so a slow hash adds nothing);
    the secret itself is shown once, when the key is created.
    """

    __tablename__ = "api_keys"

    #: Public id, safe to show and to log: it names the key's wallet in flask_credits.
    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(sa.String(100))
    secret_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    #: The first characters of the secret, to recognise a key in the list.
    prefix: Mapped[str] = mapped_column(sa.String(16))
    created_at: Mapped[datetime] = mapped_column(sa.DateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(sa.DateTime(), default=None)

    user: Mapped[User] = relationship(back_populates="api_keys")

    @staticmethod
    def hash_secret(secret: str) -> str:
        return hashlib.sha256(secret.encode()).hexdigest()

    @classmethod
    def issue(cls, user: User, name: str) -> tuple[ApiKey, str]:
        """A new key for ``user`` (added to the session, not committed) and its secret."""
        secret = "sk_" + secrets.token_urlsafe(32)
        key = cls(
            id="key_" + secrets.token_hex(8),
            user=user,
            name=name,
            secret_hash=cls.hash_secret(secret),
            prefix=secret[:10],
        )
        db.session.add(key)
        return key, secret

    @classmethod
    def find_active(cls, secret: str) -> ApiKey | None:
        """The key with this secret, unless it was revoked."""
        return db.session.scalar(
            sa.select(cls).where(cls.secret_hash == cls.hash_secret(secret), cls.revoked_at.is_(None))
        )

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None
