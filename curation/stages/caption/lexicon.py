"""What the dependency parse cannot tell: whether a noun names a person, an animal, a body part, a garment, a place or
an abstraction. Kept as data files (`lexicon/*.txt`, one word per line, `#` comments) so they grow without code."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

DIR = Path(__file__).resolve().parent / "lexicon"

# A noun outside the lists that ends like these names a person (cyclist, musician, mountaineer, fisherman).
PERSON_SUFFIXES = (
    "ist", "ian", "eer", "man", "men", "maker", "keeper", "giver", "worker", "goer", "child", "children", "boarder",
)  # fmt: skip
MIN_SUFFIX_WORD = 6


def _lines(name: str) -> list[list[str]]:
    """A list file's entries: the word, then its tags (`m`, `feature`, `generic:...`, `=synonym`)."""
    out = []
    for n, line in enumerate((DIR / f"{name}.txt").read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        for tag in words[1:]:
            if not (tag in ("m", "f", "feature") or tag.startswith(("generic:", "=")) or "," in tag):
                raise ValueError(f"{name}.txt:{n}: {line!r}: one word per entry, then tags (a phrase is not a noun)")
        out.append(words)
    return out


@dataclass(frozen=True)
class Lexicon:
    person: dict[str, str]  # noun -> "m" | "f" | ""
    alias: dict[str, str]  # person noun -> the noun it is another word for ("dad" -> "father")
    animal: frozenset[str]
    families: tuple[frozenset[str], ...]  # animal nouns that re-mention each other ("retriever", "dog", "puppy")
    any_animal: frozenset[str]  # nouns that re-mention any animal ("the animal", "the pet")
    object_generic: frozenset[str]
    ambiguous: frozenset[str]  # nouns that name a person or a thing ("pitcher", "fan"): context decides
    made_of: frozenset[str]  # material words that make an animal noun a thing ("wooden horse", "plush dinosaur")
    features: frozenset[str]  # body features that describe someone without a modifier ("dreadlocks", "freckles")
    not_person: frozenset[str]  # words with a person ending that are things ("snowman", "ottoman", "checklist")
    acting_thing: frozenset[str]  # things that do things to things ("the tractor tows a plow"): never an agent
    bodypart: frozenset[str]
    clothing: frozenset[str]
    place: frozenset[str]
    abstract: frozenset[str]
    quantity: frozenset[str]
    group: frozenset[str]
    verbs: dict[str, frozenset[str]] = field(default_factory=dict)

    def category(self, lemma: str) -> str | None:
        """person | animal | bodypart | clothing | place | abstract, or None for anything else (a concrete thing)."""
        w = lemma.lower()
        if w in self.person:
            return "person"
        if w in self.animal or w in self.any_animal:
            return "animal"
        for name in ("bodypart", "clothing", "place", "abstract"):
            if w in getattr(self, name):
                return name
        if len(w) >= MIN_SUFFIX_WORD and w.endswith(PERSON_SUFFIXES) and w not in self.not_person:
            return "person"
        return None

    def gender(self, lemma: str) -> str:
        w = lemma.lower()
        if w in self.person:
            return self.person[w]  # a listed noun's gender stands, "" included ("human")
        g = ""
        if w.endswith(("woman", "women")):
            return "f"
        if not g and w.endswith(("man", "men")) and len(w) > 3:
            return "m"
        return g

    def same_kind(self, a: str, b: str) -> bool:
        """Whether animal nouns a and b can name the same animal ("retriever" and "dog")."""
        return a == b or any(a in f and b in f for f in self.families)


@lru_cache(maxsize=1)
def lexicon() -> Lexicon:
    person: dict[str, str] = {}
    alias: dict[str, str] = {}
    for w in _lines("person"):
        noun = w[0].lower()
        person[noun] = next((x for x in w[1:] if x in ("m", "f")), "")
        for x in w[1:]:
            if x.startswith("="):
                alias[noun] = x[1:].lower()
    families, any_animal, animals = [], set(), set()
    for w in _lines("animal"):
        noun = w[0].lower()
        animals.add(noun)
        if len(w) > 1 and w[1].startswith("generic:"):
            kinds = w[1].removeprefix("generic:").split(",")
            if kinds == ["*"]:
                any_animal.add(noun)
            else:
                families.append(frozenset([noun, *kinds]))
                animals.update(kinds)
    verbs = {w[0]: frozenset(w[1].split(",")) for w in _lines("verbs")}
    return Lexicon(
        person=person,
        alias=alias,
        animal=frozenset(animals),
        families=tuple(families),
        any_animal=frozenset(any_animal),
        object_generic=frozenset(w[0].lower() for w in _lines("object_generic")),
        ambiguous=frozenset(w[0].lower() for w in _lines("ambiguous")),
        made_of=frozenset(w[0].lower() for w in _lines("made_of")),
        features=frozenset(w[0].lower() for w in _lines("bodypart") if "feature" in w[1:]),
        not_person=frozenset(w[0].lower() for w in _lines("not_person")),
        acting_thing=frozenset(w[0].lower() for w in _lines("acting_thing")),
        bodypart=frozenset(w[0].lower() for w in _lines("bodypart")),
        clothing=frozenset(w[0].lower() for w in _lines("clothing")),
        place=frozenset(w[0].lower() for w in _lines("place")),
        abstract=frozenset(w[0].lower() for w in _lines("abstract")),
        quantity=frozenset(w[0].lower() for w in _lines("quantity")),
        group=frozenset(w[0].lower() for w in _lines("group")),
        verbs=verbs,
    )
