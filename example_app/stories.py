"""The app's second costly operation: a short story about a seed's persona, streamed as it is written.

It stands in for a language model that streams its answer, charged per chunk as it arrives. Like
:mod:`example_app.personas` it is deterministic and offline: the seed's SHA-256 picks every word, so the
same seed always gives the same story, and the same chunks.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, Sequence
from typing import TypeVar

from .personas import generate_persona

_T = TypeVar("_T")

#: About how many words a story has (the story page quotes its price from it).
STORY_WORDS = 200

# The story's arc, in order: {name} is the persona's first name, the other slots are picked per seed.
SENTENCES = (
    "One {time}, {name} found {thing} on the doorstep, wrapped in {material} and tied with string.",
    "Nobody in the neighbourhood had seen anything like it, and {name} felt {feeling} just holding it.",
    "So {name} carried the {noun} through {place}, past the {crowd}, asking whose it was.",
    "By noon {name} was {feeling2}, and the {noun} seemed to grow heavier with every step.",
    "At the far end of {place2}, an old {trade} sat on a folding chair, mending {mending}.",
    "The old {trade} turned the {noun} over twice, held it up to the light, and began to laugh.",
    "It belongs to no one, the {trade} said at last, and it has been waiting for you all along.",
    "The way back ran along {path}, and {name} walked it slowly, thinking about {thought}.",
    "That night the {noun} sat on the windowsill, catching the {light} as the city went to sleep.",
    "In the morning the {noun} was gone, and in its place lay {thing2}, wrapped in {material2}.",
    "{name} smiled, picked it up, and went out again to find whoever it might belong to.",
)
#: (the thing, what it is called afterwards)
THINGS = (
    ("a brass compass", "compass"), ("a blue glass bottle", "bottle"), ("a pocket watch", "watch"),
    ("a folded map", "map"), ("a small wooden bird", "bird"), ("a tin of old buttons", "tin"),
    ("a key with no lock", "key"), ("a music box", "music box"),
)  # fmt: skip
MATERIALS = ("brown paper", "a silk scarf", "yesterday's newspaper", "oilcloth", "a faded tea towel")
TIMES = ("Tuesday morning", "rainy evening", "long weekend", "winter afternoon", "quiet Sunday")
PLACES = (
    "the covered market", "the harbour", "the old library", "the railway station",
    "the botanical garden", "the night bakery", "the tram depot", "the flea market",
)  # fmt: skip
CROWDS = ("street sellers", "fishermen", "students", "pigeons", "taxi drivers", "tourists")
FEELINGS = ("curious", "uneasy", "oddly happy", "a little afraid", "wide awake", "lighter than air")
TRADES = ("clockmaker", "bookbinder", "cobbler", "umbrella seller", "locksmith", "sailmaker")
MENDING = ("a fishing net", "a torn kite", "somebody's shoes", "an umbrella", "a birdcage")
PATHS = ("the river", "the tram tracks", "the sea wall", "a row of shuttered shops", "the park fence")
THOUGHTS = (
    "lost things and the people who lose them",
    "the first time it snowed in the city",
    "a letter never sent",
    "how small the world looks from a rooftop",
    "a song half remembered from school",
)
LIGHTS = ("moonlight", "glow of the street lamps", "first light", "lighthouse beam")


def _numbers(seed: str) -> Iterator[int]:
    """An endless, reproducible stream of 16-bit numbers: SHA-256 of the seed, then of the seed and a
    counter, two bytes at a time (a persona needs 32 bytes; a story needs more)."""
    for counter in itertools.count():
        digest = hashlib.sha256(seed.encode() if counter == 0 else f"{counter}:{seed}".encode()).digest()
        for start in range(0, len(digest), 2):
            yield int.from_bytes(digest[start : start + 2], "big")


def story_words(seed: str) -> list[str]:
    """The story for ``seed`` as a list of words (about 200, depending on the words picked)."""
    persona = generate_persona(seed)
    numbers = _numbers(seed)

    def pick(options: Sequence[_T]) -> _T:
        return options[next(numbers) % len(options)]

    (thing, noun), (thing2, _) = pick(THINGS), pick(THINGS)
    slots = {
        "name": persona.name.split()[0],
        "thing": thing,
        "noun": noun,
        "thing2": thing2,
        "time": pick(TIMES),
        "material": pick(MATERIALS),
        "material2": pick(MATERIALS),
        "feeling": pick(FEELINGS),
        "feeling2": pick(FEELINGS),
        "place": pick(PLACES),
        "place2": pick(PLACES),
        "crowd": pick(CROWDS),
        "trade": pick(TRADES),
        "mending": pick(MENDING),
        "path": pick(PATHS),
        "thought": pick(THOUGHTS),
        "light": pick(LIGHTS),
    }
    opening = f"{persona.name} was a {persona.occupation} of {persona.age} who thought nothing ever happened."
    return [word for sentence in (opening, *SENTENCES) for word in sentence.format(**slots).split()]


def story_chunks(seed: str, words_per_chunk: int) -> Iterator[str]:
    """The story for ``seed`` in chunks of ``words_per_chunk`` words (the last may be shorter).

    Joined, the chunks are the story's words separated by spaces, ending with a newline: each chunk
    after the first starts with the space that separates it from the one before."""
    if words_per_chunk < 1:
        raise ValueError(f"words_per_chunk must be at least 1, not {words_per_chunk}")
    words = story_words(seed)
    for start in range(0, len(words), words_per_chunk):
        text = " ".join(words[start : start + words_per_chunk])
        end = "\n" if start + words_per_chunk >= len(words) else ""
        yield (" " if start else "") + text + end


def write_story(seed: str) -> str:
    """The whole story for ``seed``, as :func:`story_chunks` streams it."""
    return " ".join(story_words(seed)) + "\n"
