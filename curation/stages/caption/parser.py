"""A deterministic parser from English captions to subjects, attributes and relations (the embedded backend).

No model, no download: word lists and a small state machine over tokens with character offsets.
- Subjects are noun phrases headed by a person or animal noun, plus the objects of actions ("holding a laptop").
  "the man" / "he" / "his" refer back to an earlier subject; plurals ("two dogs") are one subject with a count.
- Attributes are pre-nominal modifiers of a person/animal ("young woman" -> young) and appearance phrases attached
  with in / wearing / dressed in / with / who wears / possessives ("the girl's red scarf", "her long hair"),
  coordination included ("in a checkered blouse and beige shorts" -> two attributes).
- Relations: subject-has-attribute for every attribute, and subject -verb [particle]-> object for actions.
Everything it cannot place is left out rather than guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from curation.stages.caption.schema import Attribute, CaptionRecord, Category, Relation, Span, Subject

_TOKEN = re.compile(r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*|'s\b|'[A-Za-z]+|[^\sA-Za-z0-9]")

PERSON = {
    "man",
    "woman",
    "boy",
    "girl",
    "child",
    "kid",
    "person",
    "lady",
    "guy",
    "gentleman",
    "baby",
    "toddler",
    "teenager",
    "teen",
    "adult",
    "student",
    "worker",
    "chef",
    "cook",
    "player",
    "athlete",
    "dancer",
    "singer",
    "musician",
    "guitarist",
    "drummer",
    "soldier",
    "officer",
    "policeman",
    "doctor",
    "nurse",
    "farmer",
    "cyclist",
    "rider",
    "skateboarder",
    "surfer",
    "skier",
    "runner",
    "mother",
    "father",
    "mom",
    "dad",
    "son",
    "daughter",
    "grandmother",
    "grandfather",
    "grandma",
    "grandpa",
    "bride",
    "groom",
    "customer",
    "waiter",
    "waitress",
    "teacher",
    "businessman",
    "businesswoman",
    "performer",
    "speaker",
    "host",
    "reporter",
    "driver",
    "pilot",
    "couple",
    "friend",
    "swimmer",
    "climber",
    "hiker",
    "fisherman",
    "vendor",
    "clerk",
    "barista",
    "boxer",
    "wrestler",
    "referee",
    "coach",
    "actor",
    "actress",
    "model",
    "mechanic",
    "artist",
    "painter",
    "photographer",
    "onlooker",
    "spectator",
    "pedestrian",
    "passenger",
    "shopper",
    "tourist",
    "firefighter",
    "gardener",
    "baker",
    "carpenter",
    "scientist",
    "pianist",
    "violinist",
    "cellist",
    "jogger",
    "walker",
    "fan",
    "infant",
}
PERSON_PLURAL = {
    "men": "man",
    "women": "woman",
    "children": "child",
    "people": "person",
    "ladies": "lady",
    "kids": "kid",
    "boys": "boy",
    "girls": "girl",
    "guys": "guy",
    "players": "player",
    "students": "student",
    "dancers": "dancer",
    "workers": "worker",
    "friends": "friend",
    "soldiers": "soldier",
    "teenagers": "teenager",
    "babies": "baby",
}
ANIMAL = {
    "dog",
    "puppy",
    "cat",
    "kitten",
    "bird",
    "parrot",
    "cockatoo",
    "horse",
    "pony",
    "cow",
    "sheep",
    "goat",
    "duck",
    "chicken",
    "hen",
    "fish",
    "rabbit",
    "bear",
    "lion",
    "tiger",
    "elephant",
    "monkey",
    "deer",
    "fox",
    "squirrel",
    "pig",
    "owl",
    "eagle",
    "pigeon",
    "giraffe",
    "zebra",
    "camel",
    "dolphin",
    "whale",
    "turtle",
    "frog",
    "snake",
    "mouse",
    "hamster",
    "goose",
    "swan",
    "wolf",
    "lamb",
    "calf",
    "donkey",
    "penguin",
    "seal",
    "butterfly",
    "retriever",
    "poodle",
    "terrier",
    "labrador",
    "bulldog",
    "husky",
    "beagle",
    "collie",
    "dachshund",
    "goldfish",
    "chihuahua",
    "pug",
    "corgi",
    "kangaroo",
    "koala",
    "panda",
    "crow",
    "seagull",
    "gull",
    "sparrow",
    "chick",
}
ANIMAL_PLURAL = {
    "dogs": "dog",
    "puppies": "puppy",
    "cats": "cat",
    "birds": "bird",
    "horses": "horse",
    "cows": "cow",
    "ducks": "duck",
    "sheep": "sheep",
    "fish": "fish",
    "geese": "goose",
    "mice": "mouse",
}
APPEARANCE = {
    "shirt",
    "t-shirt",
    "tshirt",
    "blouse",
    "jacket",
    "coat",
    "dress",
    "skirt",
    "shorts",
    "pants",
    "jeans",
    "trousers",
    "suit",
    "tuxedo",
    "hat",
    "cap",
    "beanie",
    "helmet",
    "glasses",
    "sunglasses",
    "scarf",
    "tie",
    "bowtie",
    "sweater",
    "hoodie",
    "cardigan",
    "uniform",
    "apron",
    "boots",
    "shoes",
    "sneakers",
    "sandals",
    "heels",
    "hair",
    "beard",
    "mustache",
    "moustache",
    "ponytail",
    "braid",
    "braids",
    "bun",
    "curls",
    "backpack",
    "gloves",
    "vest",
    "top",
    "overalls",
    "collar",
    "fur",
    "feathers",
    "mane",
    "spots",
    "stripes",
    "robe",
    "gown",
    "jersey",
    "leggings",
    "socks",
    "necklace",
    "earrings",
    "bracelet",
    "watch",
    "headband",
    "bandana",
    "mask",
    "makeup",
    "tattoo",
    "tattoos",
    "outfit",
    "costume",
    "kimono",
    "turban",
    "hijab",
    "veil",
    "raincoat",
    "parka",
    "blazer",
    "polo",
    "tank",
    "bikini",
    "swimsuit",
    "wetsuit",
    "leash",
    "harness",
    "crest",
    "beak",
    "tail",
    "ears",
    "eyes",
    "smile",
    "freckles",
    "skin",
    "face",
    "wings",
    "paws",
    "belt",
    "bag",
    "purse",
    "handbag",
    "earphones",
    "headphones",
    "lipstick",
    "wig",
    "crown",
    "cape",
    "pajamas",
    "pyjamas",
    "mittens",
    "goggles",
    "glove",
    "boot",
    "shoe",
    "jumpsuit",
    "sari",
    "poncho",
    "shawl",
    "overcoat",
    "trench",
    "fleece",
    "tunic",
    "onesie",
    "tutu",
    "leotard",
    "bib",
    "diaper",
    "smock",
    "visor",
    "earmuffs",
    "pigtails",
    "dreadlocks",
}
# Body parts: objects of prepositions that are not subjects ("perches on the shoulder of a man").
BODY = {
    "shoulder",
    "arm",
    "hand",
    "head",
    "lap",
    "knee",
    "back",
    "leg",
    "foot",
    "feet",
    "neck",
    "hip",
    "chest",
    "finger",
    "fingers",
    "hands",
    "arms",
    "legs",
    "knees",
    "shoulders",
    "cheek",
    "forehead",
    "wrist",
    "waist",
}
# Words that make a role out of a person noun ("police officer"): part of the name, not an attribute.
ROLE = {
    "police",
    "fire",
    "soccer",
    "basketball",
    "tennis",
    "football",
    "baseball",
    "construction",
    "delivery",
    "security",
    "flight",
    "ballet",
    "street",
    "rock",
    "jazz",
    "pop",
    "office",
    "factory",
    "army",
    "navy",
    "news",
}
# Scenery and surfaces: objects of a preposition that are places, not subjects to ground or reference.
PLACES = {
    "park",
    "street",
    "road",
    "beach",
    "room",
    "kitchen",
    "field",
    "stage",
    "wind",
    "water",
    "snow",
    "grass",
    "sidewalk",
    "city",
    "forest",
    "garden",
    "yard",
    "court",
    "pool",
    "lake",
    "river",
    "sea",
    "ocean",
    "hallway",
    "office",
    "restaurant",
    "bar",
    "background",
    "camera",
    "distance",
    "floor",
    "ground",
    "air",
    "sky",
    "sun",
    "rain",
    "shade",
    "corner",
    "crowd",
    "audience",
    "house",
    "building",
    "store",
    "shop",
    "market",
    "track",
    "trail",
    "path",
    "hill",
    "mountain",
    "desert",
    "studio",
    "classroom",
    "gym",
    "library",
    "church",
    "station",
    "airport",
    "town",
    "village",
    "countryside",
    "sand",
    "mud",
    "dirt",
    "living",
    "bedroom",
    "bathroom",
    "lobby",
    "hall",
    "arena",
    "stadium",
    "plaza",
    "square",
    "alley",
    "bridge",
    "window",
    "door",
    "doorway",
    "wall",
    "side",
    "front",
    "back",
    "middle",
    "center",
    "edge",
    "top",
    "bottom",
    "left",
    "right",
    "way",
    "time",
    "moment",
    "night",
    "day",
    "morning",
    "evening",
    "sunset",
    "sunlight",
    "light",
    "dark",
    "lawn",
    "meadow",
    "porch",
    "balcony",
    "patio",
    "courtyard",
    "parking",
    "lot",
    "highway",
    "lane",
    "crosswalk",
    "intersection",
    "rink",
    "slope",
    "waves",
    "surf",
    "shore",
    "dock",
    "pier",
    "deck",
    "table",
    "counter",
    "barn",
    "farm",
    "ramp",
    "wood",
    "woods",
    "jungle",
    "cafe",
    "bakery",
    "hospital",
    "school",
    "museum",
    "theater",
    "theatre",
    "mall",
}
DETERMINERS = {
    "a",
    "an",
    "the",
    "this",
    "that",
    "these",
    "those",
    "another",
    "some",
    "several",
    "many",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "a few",
    "both",
    "each",
    "every",
}
NUMBERS = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "several": 3,
    "many": 3,
    "both": 2,
    "few": 3,
    "group": 3,
}
POSSESSIVE = {"his": "male", "her": "female", "their": "plural", "its": "neuter"}
PRONOUN = {"he": "male", "she": "female", "they": "plural", "it": "neuter", "him": "male", "them": "plural"}
MALE = {
    "man",
    "boy",
    "guy",
    "gentleman",
    "father",
    "dad",
    "son",
    "grandfather",
    "grandpa",
    "groom",
    "policeman",
    "businessman",
    "waiter",
    "actor",
    "fisherman",
}
FEMALE = {
    "woman",
    "girl",
    "lady",
    "mother",
    "mom",
    "daughter",
    "grandmother",
    "grandma",
    "bride",
    "waitress",
    "businesswoman",
    "actress",
}
VERBS = {
    "hold",
    "ride",
    "play",
    "walk",
    "run",
    "sit",
    "stand",
    "lean",
    "talk",
    "speak",
    "look",
    "watch",
    "hug",
    "kiss",
    "carry",
    "push",
    "pull",
    "throw",
    "catch",
    "kick",
    "eat",
    "drink",
    "cook",
    "read",
    "write",
    "type",
    "use",
    "open",
    "close",
    "wave",
    "point",
    "dance",
    "sing",
    "jump",
    "climb",
    "swim",
    "drive",
    "chase",
    "pet",
    "feed",
    "hand",
    "give",
    "take",
    "show",
    "touch",
    "grab",
    "lift",
    "smile",
    "laugh",
    "wrestle",
    "arm-wrestle",
    "fight",
    "shake",
    "clap",
    "follow",
    "lead",
    "face",
    "greet",
    "interview",
    "fix",
    "repair",
    "paint",
    "draw",
    "cut",
    "wash",
    "clean",
    "brush",
    "comb",
    "film",
    "photograph",
    "cross",
    "enter",
    "leave",
    "approach",
    "hit",
    "stir",
    "pour",
    "chop",
    "slice",
    "strum",
    "lie",
    "kneel",
    "rest",
    "toss",
    "serve",
    "bounce",
    "dribble",
    "shoot",
    "embrace",
    "comfort",
    "help",
    "teach",
    "examine",
    "inspect",
    "adjust",
    "fold",
    "tie",
    "button",
    "zip",
    "peek",
    "stare",
    "glance",
    "gaze",
    "nod",
    "bark",
    "meow",
    "perch",
    "fly",
    "gallop",
    "graze",
    "sniff",
    "lick",
    "jog",
    "skate",
    "surf",
    "ski",
    "row",
    "paddle",
    "hike",
    "browse",
    "scroll",
    "text",
    "call",
    "argue",
    "chat",
    "listen",
    "present",
    "discuss",
    "splash",
    "roll",
    "crawl",
    "sleep",
    "wait",
    "direct",
    "stack",
    "twirl",
    "flip",
    "cheer",
    "skateboard",
    "blow",
    "shine",
    "bake",
    "knit",
    "sew",
    "plant",
    "dig",
    "water",
    "mow",
    "sweep",
    "tickle",
    "cuddle",
}
PARTICLES = {
    "with",
    "at",
    "to",
    "on",
    "onto",
    "over",
    "into",
    "in",
    "toward",
    "towards",
    "across",
    "behind",
    "beside",
    "near",
    "around",
    "through",
    "past",
    "from",
    "up",
    "down",
    "off",
    "out",
    "along",
    "under",
    "next",
    "for",
    "by",
    "against",
    "after",
    "inside",
}
BOUNDARY = {
    ",",
    ".",
    ";",
    "!",
    "?",
    "and",
    "while",
    "as",
    "who",
    "which",
    "that",
    "but",
    "then",
    "where",
    "when",
    "whose",
    "or",
    "(",
    ")",
    '"',
    ":",
}
ATTACH = {"in", "wearing", "wears", "with", "dressed", "sporting", "has", "having"}
STOP_MODIFIERS = {"is", "are", "was", "were", "be", "being", "been", "very", "also", "just", "still", "both"}


@dataclass
class _Tok:
    text: str
    low: str
    start: int
    end: int


@dataclass
class _Subj:
    id: int
    category: Category
    name: str
    head: str
    span: tuple[int, int]
    count: int = 1
    attributes: list[tuple[str, tuple[int, int]]] = field(default_factory=list)

    @property
    def gender(self) -> str:
        if self.count > 1:
            return "plural"
        if self.category == "person":
            return "male" if self.head in MALE else "female" if self.head in FEMALE else "person"
        return "neuter"


def _singular(word: str) -> str | None:
    for suffix, repl in (("ies", "y"), ("ves", "f"), ("es", ""), ("s", "")):
        if word.endswith(suffix) and len(word) > len(suffix) + 2:
            return word[: -len(suffix)] + repl
    return None


def _appearance(word: str) -> bool:
    return word in APPEARANCE or (_singular(word) or "") in APPEARANCE


def _lemma(word: str) -> tuple[str, Category | None, bool]:
    """(lemma, category or None, plural) for a candidate head noun."""
    sing = _singular(word)
    if sing is not None and word not in PERSON and word not in ANIMAL and word not in PERSON_PLURAL:
        if sing in PERSON:
            return sing, "person", True
        if sing in ANIMAL:
            return sing, "animal", True
    if word in PERSON:
        return word, "person", False
    if word in PERSON_PLURAL:
        return PERSON_PLURAL[word], "person", True
    if word in ANIMAL:
        return word, "animal", False
    if word in ANIMAL_PLURAL:
        return ANIMAL_PLURAL[word], "animal", True
    return word, None, False


def _verb(word: str) -> str | None:
    """The base form if `word` is a form of a known action verb (holds, holding, held-like -ed forms)."""
    if word in VERBS:
        return word
    for suffix, repl in (("ing", ""), ("ing", "e"), ("es", ""), ("s", ""), ("ed", ""), ("ed", "e"), ("d", "")):
        if word.endswith(suffix):
            base = word[: -len(suffix)] + repl
            if base in VERBS:
                return base
            if suffix == "ing" and len(base) > 2 and base[-1] == base[-2] and base[:-1] in VERBS:  # running
                return base[:-1]
    return None


class CaptionParser:
    """Stateless: `parse(caption)` returns a validated CaptionRecord."""

    def parse(self, caption: str) -> CaptionRecord:
        toks = [_Tok(m.group(0), m.group(0).lower(), m.start(), m.end()) for m in _TOKEN.finditer(caption)]
        st = _State(caption, toks)
        st.run()
        return st.record()


class _State:
    def __init__(self, caption: str, toks: list[_Tok]) -> None:
        self.caption, self.t = caption, toks
        self.subjects: list[_Subj] = []
        self.relations: list[tuple[int, str, int, tuple[int, int]]] = []
        self.current: _Subj | None = None
        self.last: tuple[_Subj, int] | None = None  # the latest person/animal mention and the index after it

    # -- noun phrases ---------------------------------------------------------------------------------------
    def np(self, i: int) -> tuple[int, int, list[int]] | None:
        """Parse a noun phrase at i: (index after it, head index, modifier indices). Stops at boundaries/verbs."""
        j, mods = i, []
        while j < len(self.t) and (self.t[j].low in DETERMINERS or self.t[j].low in POSSESSIVE):
            j += 1
        head = None
        while j < len(self.t):
            w = self.t[j].low
            if (
                w in BOUNDARY
                or w in PARTICLES
                or w in ATTACH
                or w in PRONOUN
                or w in STOP_MODIFIERS
                or w == "'s"
                or w == "of"
            ):
                break
            if _verb(w) and not (_appearance(w) or _lemma(w)[1]) and j > i and head is not None:
                break
            if not re.match(r"[a-z0-9]", w):
                break
            head = j
            j += 1
            if _appearance(w) or _lemma(w)[1]:
                # a known head noun ends the phrase unless another noun follows ("tank top", "dog leash")
                if j < len(self.t) and _appearance(self.t[j].low):
                    continue
                break
        if head is None:
            return None
        start = i
        while start < head and (self.t[start].low in DETERMINERS or self.t[start].low in POSSESSIVE):
            start += 1
        mods = list(range(start, head))
        return j, head, mods

    def span(self, a: int, b: int) -> tuple[int, int]:
        return self.t[a].start, self.t[b].end

    def subject_at(self, i: int) -> tuple[_Subj, int] | None:
        """A person/animal noun phrase starting at i -> (subject, index after)."""
        parsed = self.np(i)
        if parsed is None:
            return None
        end, head, mods = parsed
        lemma, cat, plural = _lemma(self.t[head].low)
        if cat is None:
            return None
        det = self.t[i].low if i < head else ""
        count = NUMBERS.get(det, 2 if plural else 1) if plural or (det in NUMBERS and det != "one") else 1
        # "the man" after a man was introduced: the same subject
        if det in ("the", "this", "that", "these", "those") or (not mods and det == ""):
            for s in reversed(self.subjects):
                if s.head == lemma and s.category == cat:
                    self.add_modifiers(s, mods)
                    self.last = (s, end)
                    return s, end
        s = _Subj(
            len(self.subjects),
            cat,
            self.t[head].text if not plural else lemma,
            lemma,
            self.span(mods[0] if mods else head, head),
            count,
        )
        self.subjects.append(s)
        self.add_modifiers(s, mods)
        self.last = (s, end)
        return s, end

    def add_modifiers(self, s: _Subj, mods: list[int]) -> None:
        for k in mods:
            w = self.t[k].low
            if w in NUMBERS or w.isdigit() or (w in ROLE and k == mods[-1] and s.category == "person"):
                continue
            self.add_attr(s, k, k)

    def add_attr(self, s: _Subj, a: int, b: int) -> None:
        text = self.caption[self.t[a].start : self.t[b].end]
        if all(text.lower() != x.lower() for x, _ in s.attributes):
            s.attributes.append((text, self.span(a, b)))

    def object_at(self, i: int) -> tuple[_Subj, int] | None:
        """Any noun phrase at i as an interaction object: a person/animal subject or an object."""
        got = self.subject_at(i)
        if got is not None:
            return got
        parsed = self.np(i)
        if parsed is None:
            return None
        end, head, mods = parsed
        w = self.t[head].low
        if _appearance(w) or w in PLACES or w in BODY or w in ("other", "another") or _verb(w):
            return None
        det = self.t[i].low
        if det in ("the", "it", "its") or det in POSSESSIVE:
            for s in reversed(self.subjects):
                if s.category == "object" and s.head == w:
                    return s, end
        s = _Subj(len(self.subjects), "object", self.t[head].text, w, self.span(mods[0] if mods else head, head))
        self.subjects.append(s)
        for k in mods:
            if self.t[k].low not in NUMBERS:
                self.add_attr(s, k, k)
        return s, end

    def pronoun(self, word: str) -> _Subj | None:
        want = PRONOUN.get(word) or POSSESSIVE.get(word)
        for s in reversed(self.subjects):
            g = s.gender
            if want == g or (want in ("male", "female") and g == "person") or (want == "neuter" and g == "neuter"):
                return s
        return self.current

    # -- attributes and actions -----------------------------------------------------------------------------
    def appearance(self, s: _Subj, i: int) -> int:
        """Appearance phrases for s starting at i (after in / wearing / with ...), with coordination."""
        j = i
        while j < len(self.t):
            parsed = self.np(j)
            if parsed is None:
                return j
            end, head, mods = parsed
            first = mods[0] if mods else head
            if end < len(self.t) and self.t[end].low == "'s":  # "a chef's apron": the whole phrase is the attribute
                owned = self.np(end + 1)
                if owned is not None and _appearance(self.t[owned[1]].low):
                    end, head = owned[0], owned[1]
            if not _appearance(self.t[head].low):
                return j
            self.add_attr(s, first, head)
            j = end
            if (j < len(self.t) and self.t[j].low == "and") or (
                j < len(self.t)
                and self.t[j].low == ","
                and j + 1 < len(self.t)
                and self.np(j + 1)
                and _appearance(self.t[self.np(j + 1)[1]].low)
            ):
                nxt = self.np(j + 1)
                if nxt is not None and _appearance(self.t[nxt[1]].low) and self.t[j + 1].low not in POSSESSIVE:
                    j += 1
                    continue
            return j
        return j

    def action(self, s: _Subj, i: int) -> int:
        """A verb at i with s as its agent: relation to its object, if any. Returns the index after."""
        verb = self.t[i].low
        j = i + 1
        preds = [self.t[i].text]
        while j < len(self.t) and self.t[j].low in PARTICLES:
            preds.append(self.t[j].text)
            j += 1
            if self.t[j - 1].low == "next" and j < len(self.t) and self.t[j].low == "to":
                preds.append(self.t[j].text)
                j += 1
        if verb in ("wearing", "wears", "wear") or _verb(verb) == "wear":
            return self.appearance(s, j)
        if j + 1 < len(self.t) and (self.t[j].low, self.t[j + 1].low) in (("each", "other"), ("one", "another")):
            return j + 2
        if j < len(self.t) and self.t[j].low in PRONOUN:
            other = self.pronoun(self.t[j].low)
            if other is not None and other is not s:
                self.relations.append((s.id, " ".join(preds), other.id, self.span(i, j)))
            return j + 1
        if j < len(self.t) and self.t[j].low in POSSESSIVE:
            owner = self.pronoun(self.t[j].low)
            parsed = self.np(j)
            if owner is not None and parsed is not None and _appearance(self.t[parsed[1]].low):
                end, head, mods = parsed
                self.add_attr(owner, mods[0] if mods else head, head)
                return end
        got = self.object_at(j) if j < len(self.t) else None
        if got is None:
            return j
        obj, end = got
        if obj is not s:
            self.relations.append((s.id, " ".join(preds), obj.id, self.span(i, i + len(preds) - 1)))
            # "a man holding a dog in a red collar": appearance of the object
            if end < len(self.t) and self.t[end].low in ("in", "wearing", "with") and obj.category != "object":
                return self.appearance(obj, end + 1)
        return end

    def run(self) -> None:
        t, i = self.t, 0
        while i < len(t):
            w = t[i].low
            if w in ("while", "as", "and", "but", "then", ".", ";", "!", "?") and i + 1 < len(t):
                # a new clause may bring a new agent; keep the current one until a subject appears
                i += 1
                continue
            if w in PRONOUN:
                s = self.pronoun(w)
                if s is not None:
                    self.current = s
                i += 1
                continue
            if w in POSSESSIVE:
                owner = self.pronoun(w)
                parsed = self.np(i)
                if owner is not None and parsed is not None and _appearance(t[parsed[1]].low):
                    end, head, mods = parsed
                    self.add_attr(owner, mods[0] if mods else head, head)
                    i = end
                    continue
            got = self.subject_at(i) if re.match(r"[a-z0-9]", w) and not _verb(w) else None
            if got is not None:
                s, end = got
                self.current = s
                i = end
                if i < len(t) and t[i].low == "'s":  # the girl's red scarf
                    parsed = self.np(i + 1)
                    if parsed is not None and _appearance(t[parsed[1]].low):
                        pend, head, mods = parsed
                        self.add_attr(s, mods[0] if mods else head, head)
                        i = pend
                continue
            s = self.current
            if s is not None and w in ATTACH:
                j = i + 1
                if w == "dressed" and j < len(t) and t[j].low == "in":
                    j += 1
                if w in ("has", "having") and j < len(t) and t[j].low == "on":
                    j += 1
                nxt = self.appearance(s, j)
                if nxt > j:
                    i = nxt
                    continue
                if w == "with" and s is not None:  # "a man with a laptop": possession, as an interaction
                    got = self.object_at(j)
                    if got is not None and got[0] is not s:
                        self.relations.append((s.id, "with", got[0].id, self.span(i, i)))
                        i = got[1]
                        continue
            if w == "who" and self.last is not None:  # "..., the groom, who wears": the nearest mention
                self.current = self.last[0]
                i += 1
                continue
            if s is not None and w in ("is", "are") and i + 1 < len(t):
                i += 1
                continue
            if s is not None and _verb(w) and not (i > 0 and t[i - 1].low in DETERMINERS | set(POSSESSIVE)):
                if w.endswith("ing") and self.last is not None and self.last[1] == i:
                    s = self.current = self.last[0]  # "beside a man pushing a stroller": the man pushes
                i = self.action(s, i)
                continue
            i += 1

    def record(self) -> CaptionRecord:
        subjects, relations = [], []
        for s in self.subjects:
            attrs = [Attribute(text=a, span=Span(start=sp[0], end=sp[1])) for a, sp in s.attributes]
            subjects.append(
                Subject(
                    id=s.id,
                    category=s.category,
                    name=s.name,
                    span=Span(start=s.span[0], end=s.span[1]),
                    count=s.count,
                    attributes=attrs,
                )
            )
            for k, (_, sp) in enumerate(s.attributes):
                relations.append(
                    Relation(
                        kind="attribute", subject=s.id, predicate="has", object=k, span=Span(start=sp[0], end=sp[1])
                    )
                )
        for subj, pred, obj, sp in self.relations:
            relations.append(
                Relation(
                    kind="interaction",
                    subject=subj,
                    predicate=pred.lower(),
                    object=obj,
                    span=Span(start=sp[0], end=sp[1]),
                )
            )
        return CaptionRecord(caption=self.caption, subjects=subjects, relations=relations)


def parse_caption(caption: str) -> CaptionRecord:
    return CaptionParser().parse(caption)
