"""The extension objects, created once and bound to each app by :func:`example_app.create_app`."""

from __future__ import annotations

from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import LoginManager
from flask_migrate import Migrate
from flask_wtf import CSRFProtect

from flask_credits import FlaskCredits

from .models import db

login_manager = LoginManager()
csrf = CSRFProtect()
migrate = Migrate()
#: Limits only where a view asks for one (the login and sign-up forms); counts in ``RATELIMIT_STORAGE_URI``.
#: Retry-After on a 429; with Redis down, counts in this process rather than a 500 on every login.
#: Flask-Limiter keeps most settings on this object, from the first app's config: one app per process.
limiter = Limiter(get_remote_address, headers_enabled=True, in_memory_fallback_enabled=True)
#: ``db=`` defines the credits tables on ``db.metadata`` right away, next to the app's own models.
credits = FlaskCredits(db=db)
