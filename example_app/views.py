"""The pages and the JSON API. Generating a persona costs ``PERSONA_COST`` credits; a story is streamed
and charged per chunk as it goes (``STORY_HOLD``, ``STORY_WORDS_PER_CREDIT``).

The request is checked (who is asking, is the seed valid) *before* ``@requires_credits`` charges, so a
bad request costs nothing: the decorator only gives credits back when the view fails with a 5xx.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Mapping
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
from .stories import STORY_WORDS, story_chunks

View = Callable[..., ResponseReturnValue]

main = Blueprint("main", __name__)
api = Blueprint("api", __name__, url_prefix="/api")


def persona_cost() -> int:
    """Read per request, so the price can change with the config."""
    return int(current_app.config["PERSONA_COST"])


def story_hold() -> int:
    """Credits reserved before a story starts: read per request, like the persona's price."""
    return int(current_app.config["STORY_HOLD"])


def persona_reason(suffix: str = "") -> Callable[[], str]:
    """The history's "What" for a persona: which seed it was generated from (read per request, after
    ``seed_from_form`` or ``seed_from_json`` validated it and before anything is charged)."""

    def reason() -> str:
        body = request.get_json(silent=True) if request.is_json else request.form
        seed = body.get("seed") if isinstance(body, Mapping) else None
        return f'generate persona "{str(seed).strip()}"{suffix}'

    return reason


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
@requires_credits(persona_cost, reason=persona_reason())
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
@requires_credits(persona_cost, reason=persona_reason(" (API)"))
def api_create_persona(seed: str) -> ResponseReturnValue:
    return jsonify(persona=generate_persona(seed).to_dict(), **charged())


@main.get("/stories")
@login_required
def new_story() -> ResponseReturnValue:
    """The story page: its script (static/stories.js) posts the seed to ``/api/stories`` and shows the
    story as it streams in."""
    words_per_credit = int(current_app.config["STORY_WORDS_PER_CREDIT"])
    return render_template(
        "stories/new.html",
        form=PersonaForm(),
        hold=story_hold(),
        words_per_credit=words_per_credit,
        about=math.ceil(STORY_WORDS / words_per_credit),
    )


@api.post("/stories")
@csrf.exempt  # as for /api/personas: an API key or a JSON body, neither of which a cross-site page can send
@seed_from_json
@requires_credits(hold=story_hold, reason="write story (API)")
def api_write_story(seed: str) -> ResponseReturnValue:
    """Stream the seed's story as plain text, one credit per ``STORY_WORDS_PER_CREDIT`` words, charged
    as each chunk goes out; a client that leaves mid-story pays for the chunks it was sent."""
    words_per_credit = int(current_app.config["STORY_WORDS_PER_CREDIT"])
    delay = float(current_app.config["STORY_CHUNK_DELAY"])
    buy_more = url_for("credits.index", _external=True)

    def generate() -> Iterator[str]:
        ending = ""
        for number, chunk in enumerate(story_chunks(seed, words_per_credit)):
            if number and delay:
                time.sleep(delay)  # a language model takes its time
            try:
                current_hold.add(1)  # grows the hold from the wallet when the story runs past it
            except InsufficientCredits:
                ending = f"\n[out of credits: buy more at {buy_more}]\n"
                break
            yield chunk
        if ending:
            yield ending
        # No settle here: @requires_credits settles at what was added as the body ends (before its
        # last bytes go out), or when a client that left closes it early.

    response = Response(stream_with_context(generate()), mimetype="text/plain")
    response.headers["X-Accel-Buffering"] = "no"  # nginx would otherwise hold the chunks back
    response.headers["Cache-Control"] = "no-store"
    return response
