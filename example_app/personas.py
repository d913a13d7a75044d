"""The costly operation this app sells: generating a persona.

It stands in for a call to a language model. Here it is deterministic and offline: the seed's SHA-256
picks every detail, so the same seed always gives the same persona.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

FIRST_NAMES = (
    "Ada", "Bruno", "Chiara", "Dmitri", "Esther", "Farid", "Grace", "Hiro",
    "Ines", "Jonas", "Kemi", "Luca", "Mei", "Nils", "Olga", "Priya",
)  # fmt: skip
LAST_NAMES = (
    "Abara", "Berg", "Costa", "Dubois", "Eriksen", "Fischer", "García", "Haddad",
    "Ito", "Jensen", "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov",
)  # fmt: skip
OCCUPATIONS = (
    "nurse", "software developer", "baker", "civil engineer", "librarian", "bus driver",
    "marine biologist", "accountant", "carpenter", "high-school teacher", "sommelier", "pharmacist",
)  # fmt: skip
CITIES = ("Lisbon", "Osaka", "Lagos", "Montréal", "Tromsø", "Valparaíso", "Tbilisi", "Adelaide")
# Each starts with a consonant sound: the bio says "a {trait} {occupation}".
TRAITS = ("patient", "curious", "meticulous", "cheerful", "stubborn", "soft-spoken", "restless", "witty")
# Each is what someone does, starting with a verb ending in -ing: the bio says "spends most weekends
# {hobby}", which needs one ("spends most weekends competitive chess" does not read).
HOBBIES = (
    "restoring old bicycles", "birdwatching", "playing competitive chess", "baking sourdough",
    "running mountain trails", "learning Icelandic", "growing chillies", "building model trains",
)  # fmt: skip


@dataclass(frozen=True)
class Persona:
    seed: str
    name: str
    age: int
    occupation: str
    bio: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generate_persona(seed: str) -> Persona:
    """The persona for ``seed``: always the same for the same seed."""
    digest = hashlib.sha256(seed.encode()).digest()

    def pick(options: Sequence[str], slot: int) -> str:
        return options[int.from_bytes(digest[2 * slot : 2 * slot + 2], "big") % len(options)]

    first, last = pick(FIRST_NAMES, 0), pick(LAST_NAMES, 1)
    occupation, city = pick(OCCUPATIONS, 2), pick(CITIES, 3)
    trait, hobby = pick(TRAITS, 4), pick(HOBBIES, 5)
    age = 18 + digest[12] % 60
    years = 1 + digest[13] % max(1, age - 17)
    return Persona(
        seed=seed,
        name=f"{first} {last}",
        age=age,
        occupation=occupation,
        bio=write_bio(first, trait, occupation, city, years, hobby),
    )


def write_bio(first: str, trait: str, occupation: str, city: str, years: int, hobby: str) -> str:
    """The persona's two sentences, from one pick of each list."""
    return (
        f"{first} is a {trait} {occupation} who has lived in {city} for {years} "
        f"year{'s' if years != 1 else ''}. Away from work, {first} spends most weekends {hobby}."
    )
