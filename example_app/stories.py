"""The second costly operation this app sells: a story, streamed as it is written.

Like :mod:`example_app.personas` it stands in for a language model, deterministic and offline: the
seed's SHA-256 picks every word, so the same seed always gives the same story.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

WORDS = (
    "the", "old", "lighthouse", "keeper", "watched", "a", "storm", "roll", "over", "quiet",
    "harbour", "while", "her", "cat", "slept", "by", "warm", "stove", "and", "ships",
    "far", "away", "sang", "to", "each", "other", "in", "fog", "morning", "came",
)  # fmt: skip
#: Words in every story.
LENGTH = 200


def story_words(seed: str) -> list[str]:
    """The story for ``seed`` as a list of words: always the same for the same seed."""
    words: list[str] = []
    block = 0
    while len(words) < LENGTH:
        digest = hashlib.sha256(f"{block}:{seed}".encode()).digest()
        words += [WORDS[byte % len(WORDS)] for byte in digest]
        block += 1
    return words[:LENGTH]


def story_chunks(seed: str, words_per_chunk: int) -> Iterator[str]:
    """The story for ``seed`` in chunks of ``words_per_chunk`` words (the last may be shorter)."""
    words = story_words(seed)
    for start in range(0, len(words), words_per_chunk):
        yield " ".join(words[start : start + words_per_chunk]) + " "
