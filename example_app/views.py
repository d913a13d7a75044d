"""The pages and the JSON API. Generating a persona costs ``PERSONA_COST`` credits.

The request is checked (who is asking, is the seed valid) *before* ``@requires_credits`` charges, so a
bad request costs nothing: the decorator only gives credits back when the view fails with a 5xx.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import (
    Blueprint,
    Response,
    current_app,
    g,
    jsonify,
    render_template,
    request,
    stream_with_context,
    url_for,
)
from flask.typing import ResponseReturnValue
from flask_login import current_user, login_required

from flask_credits import InsufficientCredits, current_hold, requires_credits

from .extensions import credits, csrf, login_manager
from .forms import PersonaForm
from .personas import generate_persona
from .stories import story_chunks

View = Callable[..., ResponseReturnValue]

main = Blueprint("main", __name__)
api = Blueprint("api", __name__, url_prefix="/api")


def persona_cost() -> int:
    """Read per request, so the price can change with the config."""
    return int(current_app.config["PERSONA_COST"])


def seed_from_form(view: View) -> View:
    """Validate the persona form; pass its seed to ``view`` as ``seed``."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> ResponseReturnValue:
        form = PersonaForm()
        if not form.validate_on_submit():
            return render_template("personas/new.html", form=form, cost=persona_cost()), 400
        return view(*args, seed=form.seed.data, **kwargs)

    return wrapper


def seed_from_json(view: View) -> View:
    """Answer 401 without a wallet and 400/415 without a valid ``{"seed": "..."}`` body; pass the seed
    to ``view`` as ``seed``."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> ResponseReturnValue:
        if credits.current_wallet() is None:
            return login_manager.unauthorized()  # type: ignore[no-any-return]
        if not request.is_json:
            return jsonify(
                error="unsupported_media_type", message="Send Content-Type: application/json."
            ), 415
        body = request.get_json(silent=True)
        seed = body.get("seed") if isinstance(body, dict) else None
        if not isinstance(seed, str) or not seed.strip() or len(seed) > 100:
            return jsonify(error="invalid_seed", message='Send {"seed": "..."}, 1 to 100 characters.'), 400
        return view(*args, seed=seed.strip(), **kwargs)

    return wrapper


def charged() -> dict[str, Any]:
    """What ``@requires_credits`` charged this request, and the balance left (``None`` when free)."""
    spend = g.credits_spend
    if spend is None:  # PERSONA_COST = 0
        return {"cost": 0, "balance": None}
    return {"cost": -spend.amount, "balance": spend.balance_after}


@main.get("/")
def index() -> ResponseReturnValue:
    balance = credits.balance(current_user.get_id()) if current_user.is_authenticated else None
    return render_template("index.html", balance=balance, cost=persona_cost())


@main.get("/personas")
@login_required
def new_persona() -> ResponseReturnValue:
    return render_template("personas/new.html", form=PersonaForm(), cost=persona_cost())


@main.post("/personas")
@login_required
@seed_from_form
@requires_credits(persona_cost, reason="generate persona")
def create_persona(seed: str) -> ResponseReturnValue:
    return render_template(
        "personas/new.html",
        form=PersonaForm(formdata=None, seed=seed),
        persona=generate_persona(seed),
        **charged(),
    )


@api.post("/personas")
# API clients have no CSRF token. A cross-site page cannot send X-API-Key, nor a JSON body with the
# session cookie (that needs a CORS preflight this app never answers), and anything else gets a 415
# before a credit is charged.
@csrf.exempt
@seed_from_json
@requires_credits(persona_cost, reason="generate persona (API)")
def api_create_persona(seed: str) -> ResponseReturnValue:
    return jsonify(persona=generate_persona(seed).to_dict(), **charged())


def story_hold() -> int:
    return int(current_app.config.get("STORY_HOLD", 10))


@api.post("/stories")
@csrf.exempt  # as /api/personas
@seed_from_json
@requires_credits(hold=story_hold, reason="write story (API)")
def api_write_story(seed: str) -> ResponseReturnValue:
    """Stream a story, one credit per chunk of ``STORY_WORDS_PER_CREDIT`` words."""
    words = int(current_app.config.get("STORY_WORDS_PER_CREDIT", 10))
    delay = float(current_app.config.get("STORY_CHUNK_DELAY", 0.05))
    buy = url_for("credits.index", _external=True)

    def generate() -> Iterator[str]:
        for n, chunk in enumerate(story_chunks(seed, words)):
            if n and delay:
                time.sleep(delay)
            try:
                current_hold.add(1)
            except InsufficientCredits:
                yield f"\n[out of credits: buy more at {buy}]\n"
                return
            yield chunk

    response = Response(stream_with_context(generate()), mimetype="text/plain")
    response.headers["X-Accel-Buffering"] = "no"
    response.headers["Cache-Control"] = "no-store"
    return response
