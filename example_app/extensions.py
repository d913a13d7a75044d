"""The extension objects, created once and bound to each app by :func:`example_app.create_app`."""

from __future__ import annotations

from flask_login import LoginManager
from flask_migrate import Migrate
from flask_wtf import CSRFProtect

from flask_credits import FlaskCredits

from .models import db

login_manager = LoginManager()
csrf = CSRFProtect()
migrate = Migrate()
#: ``db=`` defines the credits tables on ``db.metadata`` right away, next to the app's own models.
credits = FlaskCredits(db=db)
