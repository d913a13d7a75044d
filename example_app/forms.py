"""The app's forms. Each one carries a CSRF token (Flask-WTF)."""

from __future__ import annotations

from flask_wtf import FlaskForm
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired, EqualTo, Length, Regexp


def _strip(value: str | None) -> str | None:
    return value.strip() if value else value


def _username(value: str | None) -> str | None:
    return value.strip().lower() if value else value


class SignupForm(FlaskForm):  # type: ignore[misc]
    username = StringField(
        "Username",
        filters=[_username],
        validators=[
            DataRequired(),
            Length(min=3, max=32),
            Regexp(r"^[a-z0-9_.-]+$", message="Use letters, digits, '.', '_' or '-'."),
        ],
        description="3 to 32 letters, digits, '.', '_' or '-'.",
    )
    password = PasswordField(
        "Password", validators=[DataRequired(), Length(min=8, max=200)], description="At least 8 characters."
    )
    confirm = PasswordField(
        "Repeat the password", validators=[DataRequired(), EqualTo("password", message="Passwords differ.")]
    )


class LoginForm(FlaskForm):  # type: ignore[misc]
    username = StringField("Username", filters=[_username], validators=[DataRequired(), Length(max=32)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=200)])


class PersonaForm(FlaskForm):  # type: ignore[misc]
    seed = StringField(
        "Seed word",
        filters=[_strip],
        validators=[DataRequired(), Length(max=100)],
        description="The same seed always gives the same persona.",
    )


class ApiKeyForm(FlaskForm):  # type: ignore[misc]
    name = StringField(
        "Name",
        filters=[_strip],
        validators=[DataRequired(), Length(max=100)],
        description="Where you use it.",
    )
