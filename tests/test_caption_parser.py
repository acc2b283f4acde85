"""Caption analysis (spaCy parse + rules) against hand-annotated captions.

- `caption_dev.jsonl`: 110 captions (two annotators, half long MLLM-style), the set the rules were developed on.
- `caption_test.jsonl`: 55 captions by a third annotator whose errors were never read to write rules (its totals
  were seen during development): the closest to an honest estimate here.
- `caption_heldout2.jsonl`: 40 captions (20 long) written and annotated by a fourth annotator who saw only the guide,
  after the rules of 2026-11-30 evening were written; scored once (its errors not read): before those rules 0.886 /
  0.840 / 0.710, after 0.874 / 0.845 / 0.741; 0.886 / 0.845 / 0.741 after three rules a review found wrong on
  ordinary captions were removed.
- `caption_heldout3.jsonl`: 40 captions (20 long, 115 relations) by a fifth annotator who saw only the guide, written
  2026-12-01; scored at d91e926 (0.872 / 0.861 / 0.761) and after that day's first four parse repairs (stranded
  clause subjects, "holds X steady", garments acted on, "it" after a direct object): 0.878 / 0.865 / 0.772. Its
  totals (never its errors) were seen after each later change that day, like the other held-out sets': 0.885 /
  0.878 / 0.783 at the end of the day.
- `caption_gold.jsonl` / `caption_heldout.jsonl`: the earlier sets (an older convention: no coreference rules), kept
  as regression guards.
Convention: `tests/data/caption_guide.md`. F1 is printed for every set (run with -s to see it) and gated.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from curation import parse_caption
from curation.stages.caption import parser
from curation.stages.caption.parser import parse_captions
from curation.stages.caption.schema import CaptionRecord
from tests.conftest import REPO


def _load(name: str) -> list[dict]:
    rows = [json.loads(line) for line in (REPO / "tests" / "data" / name).read_text().splitlines()]
    return [g for g in rows if "caption" in g]


DEV = _load("caption_dev.jsonl")
TEST = _load("caption_test.jsonl")
GOLD = _load("caption_gold.jsonl")
HELDOUT = _load("caption_heldout.jsonl")
HELDOUT2 = _load("caption_heldout2.jsonl")
HELDOUT3 = _load("caption_heldout3.jsonl")


def _singular(word: str) -> str:
    w = word.lower()
    return w[:-1] if w.endswith("s") and not w.endswith("ss") and len(w) > 3 else w


def _f1(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def evaluate(gold: list[dict]) -> dict[str, tuple[float, float, float]]:
    """Precision, recall, F1 of subjects (name, category), attributes (subject, text) and interactions
    (subject, predicate, object), as multisets per caption."""
    counts = {k: [0, 0, 0] for k in ("subjects", "attributes", "relations")}
    for g, rec in zip(gold, parse_captions(g["caption"] for g in gold), strict=True):
        pred_s = Counter((_singular(s.name), s.category) for s in rec.subjects)
        gold_s = Counter((_singular(s["name"]), s["category"]) for s in g["subjects"])
        pred_a = Counter((_singular(s.name), a.text.lower()) for s in rec.subjects for a in s.attributes)
        gold_a = Counter((_singular(s["name"]), a.lower()) for s in g["subjects"] for a in s["attributes"])
        names = {s.id: _singular(s.name) for s in rec.subjects}
        pred_r = Counter(
            (names[r.subject], r.predicate.lower(), names[r.object]) for r in rec.relations if r.kind == "interaction"
        )
        gold_r = Counter((_singular(a), p.lower(), _singular(b)) for a, p, b in g["relations"])
        for key, pred, want in (
            ("subjects", pred_s, gold_s),
            ("attributes", pred_a, gold_a),
            ("relations", pred_r, gold_r),
        ):
            counts[key][0] += sum((pred & want).values())
            counts[key][1] += sum(pred.values())
            counts[key][2] += sum(want.values())
    return {k: _f1(*v) for k, v in counts.items()}


def _report(name: str, gold: list[dict], record_property: pytest.RecordProperty) -> dict[str, float]:
    scores = evaluate(gold)
    for key, (p, r, f) in scores.items():
        record_property(f"{name}_{key}_f1", round(f, 3))
        print(f"{name:>8} {key:>10}: precision {p:.3f} recall {r:.3f} F1 {f:.3f}  ({len(gold)} captions)")
    return {k: v[2] for k, v in scores.items()}


def test_sets_are_big_enough_and_mostly_long() -> None:
    assert len(DEV) + len(TEST) >= 150
    assert sum(g["style"] == "long" for g in DEV + TEST) * 2 >= len(DEV + TEST)
    assert sum(len(g["relations"]) for g in TEST) >= 100  # enough relations for a stable held-out F1


def test_f1_on_the_development_set(record_property: pytest.RecordProperty) -> None:
    f1 = _report("dev", DEV, record_property)
    assert f1["subjects"] >= 0.93 and f1["attributes"] >= 0.93 and f1["relations"] >= 0.86


def test_f1_on_the_held_out_set(record_property: pytest.RecordProperty) -> None:
    """Its errors never read; the gate guards against regressions (measured 0.88 / 0.81 / 0.67 when written, 0.89 /
    0.85 / 0.73 after the second parse of misread verbs and the auxiliary lemmas, 0.90 / 0.86 / 0.75 on 2026-12-01)."""
    f1 = _report("held-out", TEST, record_property)
    assert f1["subjects"] >= 0.89 and f1["attributes"] >= 0.85 and f1["relations"] >= 0.74


def test_f1_on_the_second_held_out_set(record_property: pytest.RecordProperty) -> None:
    """Another annotator's captions, scored once; the gate guards against regressions only."""
    f1 = _report("held-2", HELDOUT2, record_property)
    assert len(HELDOUT2) == 40 and sum(g["style"] == "long" for g in HELDOUT2) == 20
    assert f1["subjects"] >= 0.87 and f1["attributes"] >= 0.82 and f1["relations"] >= 0.74


def test_f1_on_the_third_held_out_set(record_property: pytest.RecordProperty) -> None:
    """A fifth annotator's captions, scored once before and once after the rules of 2026-12-01; a regression gate."""
    f1 = _report("held-3", HELDOUT3, record_property)
    assert len(HELDOUT3) == 40 and sum(g["style"] == "long" for g in HELDOUT3) == 20
    assert f1["subjects"] >= 0.87 and f1["attributes"] >= 0.86 and f1["relations"] >= 0.76


def test_f1_on_the_earlier_sets(record_property: pytest.RecordProperty) -> None:
    gold = _report("gold-v1", GOLD, record_property)
    held = _report("held-v1", HELDOUT, record_property)
    assert gold["subjects"] >= 0.9 and gold["attributes"] >= 0.85 and gold["relations"] >= 0.85
    assert held["subjects"] >= 0.9 and held["attributes"] >= 0.8


def test_every_span_indexes_its_text_exactly() -> None:
    sets = DEV + TEST + HELDOUT2 + HELDOUT3
    for g, rec in zip(sets, parse_captions(g["caption"] for g in sets), strict=True):
        CaptionRecord.model_validate(rec.model_dump())  # spans inside the caption, ids consistent
        cap = g["caption"]
        for s in rec.subjects:
            assert s.span is not None
            word = cap[s.span.start : s.span.end]  # the head noun of its first mention: the name, maybe plural
            assert word and " " not in word, word
            assert _singular_lemma(word.lower()) == s.name or word.lower() == s.name, (word, s.name)
            for a in s.attributes:
                assert a.span is not None and cap[a.span.start : a.span.end] == a.text
        for r in rec.relations:
            if r.kind == "interaction":
                assert r.span is not None and cap[r.span.start : r.span.end].split()[0] == r.predicate.split()[0]


def _singular_lemma(word: str) -> str:
    return parser._singular(parser._lemma(word, "NOUN", "NNS"))


def _by_name(caption: str) -> tuple[CaptionRecord, dict[str, list]]:
    rec = parse_caption(caption)
    by: dict[str, list] = {}
    for s in rec.subjects:
        by.setdefault(s.name, []).append(s)
    return rec, by


def _rels(rec: CaptionRecord) -> set[tuple[str, str, str]]:
    names = {s.id: s.name for s in rec.subjects}
    return {(names[r.subject], r.predicate, names[r.object]) for r in rec.relations if r.kind == "interaction"}


def test_apposition_and_pronouns_join_one_subject() -> None:
    rec, by = _by_name(
        "In this video, her uncle, a stocky man in a plaid shirt, lifts a crate. He wears muddy boots. "
        "She laughs. The camera pans slowly."
    )
    assert list(by) == ["uncle", "crate"]  # no "man", no "video" or "camera"
    assert [a.text for a in by["uncle"][0].attributes] == ["stocky", "plaid shirt", "muddy boots"]
    assert _rels(rec) == {("uncle", "lifts", "crate")}


def test_a_hypernym_re_mention_is_the_same_animal() -> None:
    rec, by = _by_name("A spotted dalmatian chews a rope toy. The dog then drops it and barks at a mail carrier.")
    assert by["dalmatian"][0].category == "animal" and "dog" not in by
    assert ("dalmatian", "drops", "toy") in _rels(rec) and ("dalmatian", "barks at", "carrier") in _rels(rec)


def test_individuated_plurals_split_and_groups_count() -> None:
    rec, by = _by_name(
        "Two boys sit on a dock. The one on the left wears a red cap, and the other holds a fishing rod. "
        "A pair of swans glide past."
    )
    assert len(by["boy"]) == 2 and all(s.count == 1 for s in by["boy"])
    assert {a.text for s in by["boy"] for a in s.attributes} == {"red cap"}
    assert by["swan"][0].count == 2 and "pair" not in by
    assert ("boy", "holds", "rod") in _rels(rec)


def test_places_body_parts_adverbs_and_framing_are_not_subjects() -> None:
    rec, by = _by_name(
        "The video captures a close-up shot of a nurse who gently rubs her forearms on a bench near the windowsill."
    )
    assert list(by) == ["nurse"] and not _rels(rec)


def test_coordinated_garments_are_separate_attributes() -> None:
    _, by = _by_name("A girl in a cream knit sweater and fuzzy socks reads a comic.")
    assert [a.text for a in by["girl"][0].attributes] == ["cream knit sweater", "fuzzy socks"]


def test_example_from_the_issue() -> None:
    rec, by = _by_name(
        "The man in a light blue shirt holding a laptop, while the woman in a checkered blouse "
        "and beige shorts leans in"
    )
    assert [a.text for a in by["man"][0].attributes] == ["light blue shirt"]
    assert [a.text for a in by["woman"][0].attributes] == ["checkered blouse", "beige shorts"]
    assert _rels(rec) == {("man", "holding", "laptop")}


TRICKY = [
    "",
    "   ",
    "3² dogs run.",
    "999999999999999999999999 birds fly over a lake.",
    "A woman—wearing a red scarf—walks her dog.",
    "Dogs--three of them--chase a ball.",
    "İİ İstanbul: a man in a grey coat walks a dog.",
    "一个女人在厨房里做饭。 A woman cooks.",
    "🐶 A puppy chews a 🦴 bone!!!",
    "A pair of twins, one on the left and the other on the right, hug each other.",
    "A woman holds her baby while her son reads.",
    "A cat sleeps on an ottoman next to a snowman.",
    "They them their it its he she.",
    "A " + "very " * 400 + "tall man lifts a box.",
]


def test_tricky_captions_never_raise_and_spans_stay_exact() -> None:
    for cap in TRICKY:
        rec = parse_caption(cap)
        CaptionRecord.model_validate(rec.model_dump())
        for s in rec.subjects:
            assert 1 <= s.count <= 1000
            for a in s.attributes:
                assert a.span is not None and cap[a.span.start : a.span.end] == a.text
    _, by = _by_name("A woman—wearing a red scarf—walks her dog.")
    assert "woman" in by and "dog" in by  # dashes still split words
    _, by = _by_name("A woman holds her baby while her son reads.")
    assert set(by) >= {"woman", "baby", "son"}  # possessed people are people of their own
    _, by = _by_name("A pair of twins, one on the left and the other on the right, hug each other.")
    assert len(by["twin"]) == 2  # "each other" is no third twin
    _, by = _by_name("A cat sleeps on an ottoman next to a snowman.")
    assert list(by) == ["cat"]


def test_word_lists_keep_subjects_and_non_subjects_apart() -> None:
    """A noun listed both as a person or animal and as a garment, body part, place or abstraction would be decided by
    list order, silently: the lists must not overlap there (person/animal overlaps are deliberate ambiguities)."""
    from curation.stages.caption.lexicon import lexicon

    lex = lexicon()
    subjects = set(lex.person) | set(lex.animal)
    for name in ("bodypart", "clothing", "place", "abstract"):
        assert not subjects & set(getattr(lex, name)), name
    assert set(lex.person) & set(lex.animal) == {"boxer", "kid", "shepherd"}


def test_a_verb_read_as_a_noun_is_parsed_again() -> None:
    """The small model tags present-tense verbs after a garment or an animal as plural nouns ("apron kneads",
    "eagle swoops"), which wrecks the sentence's parse; the sentence is parsed again with the verb in the past tense,
    and the relation's predicate and span are still the caption's own words."""
    cap = "A burly baker in a flour-dusted apron kneads soft dough on a marble counter."
    rec, by = _by_name(cap)
    assert _rels(rec) == {("baker", "kneads", "dough")}
    rel = next(r for r in rec.relations if r.kind == "interaction")
    assert rel.span is not None and cap[rel.span.start : rel.span.end] == "kneads"
    assert [a.text for a in by["dough"][0].attributes] == ["soft"]
    rec, by = _by_name("A golden eagle swoops low over a snowy valley and grabs a fleeing hare.")
    assert by["eagle"][0].category == "animal" and ("eagle", "grabs", "hare") in _rels(rec)


def test_auxiliary_verbs_are_lemmatized() -> None:
    """ "has" and "is" are tagged AUX, which the rule lemmatizer leaves as written: "She has curly hair" and "The
    parrot is green" must still give attributes."""
    _, by = _by_name("A fruit vendor stands behind a stall. She has curly black hair. Her parrot is green.")
    assert "curly black hair" in [a.text for a in by["vendor"][0].attributes]
    assert "green" in [a.text for a in by["parrot"][0].attributes]


def test_an_object_pronoun_is_not_the_verbs_own_subject() -> None:
    rec, _ = _by_name("A technician kneels beside a printer. An office manager, a woman with a grey bob, watches him.")
    assert _rels(rec) == {("manager", "watches", "technician")}


def test_a_path_is_not_acted_on_but_a_goal_is() -> None:
    rec, by = _by_name("A grey heron wades through the reeds and snaps up a frog. A baby crawls toward a stuffed bear.")
    assert "reed" not in by
    assert {("heron", "snaps up", "frog"), ("baby", "crawls toward", "bear")} <= _rels(rec)


def test_a_clause_the_parse_hung_on_a_preposition_keeps_its_own_subject() -> None:
    """The small model tags "as"/"while" before a clause as a preposition; the clause's verb must not take the main
    clause's subject."""
    rec, _ = _by_name("A violin teacher listens attentively as a small boy in a bow tie plays a tiny violin.")
    assert _rels(rec) == {("boy", "plays", "violin")}
    rec, _ = _by_name("A couple of kittens nap in a laundry basket as a young woman folds warm towels.")
    assert ("woman", "folds", "towel") in _rels(rec) and ("kitten", "folds", "towel") not in _rels(rec)


def test_garments_acted_on_are_things_but_worn_ones_stay_attributes() -> None:
    rec, by = _by_name("A golden retriever puppy chews on a red sneaker while a man in pajamas watches.")
    assert ("puppy", "chews on", "sneaker") in _rels(rec)
    assert [a.text for a in by["man"][0].attributes] == ["pajamas"]
    for caption in ("A man adjusts his tie.", "A woman puts on a helmet and rides a bike.", "A boy wears a cap."):
        rec, by = _by_name(caption)
        assert not {"tie", "helmet", "cap"} & set(by), caption


def test_an_object_held_steady_and_it_after_a_direct_object() -> None:
    rec, _ = _by_name("The girl holds the bicycle steady while her dad turns a small wrench.")
    assert _rels(rec) == {("girl", "holds", "bicycle"), ("dad", "turns", "wrench")}
    rec, _ = _by_name("A mother pushes a stroller. She takes a paper bag from the stroller and shakes it.")
    assert ("mother", "shakes", "bag") in _rels(rec) and ("mother", "shakes", "stroller") not in _rels(rec)


def test_descriptions_the_parse_reads_as_verbs_or_numbers() -> None:
    _, by = _by_name("A lifeguard waves. He is tanned and muscular. The farmer has deeply tanned arms and a calm look.")
    assert [a.text for a in by["lifeguard"][0].attributes] == ["tanned", "muscular"]
    assert [a.text for a in by["farmer"][0].attributes][:1] == ["deeply tanned arms"]
    _, by = _by_name("A black-and-white sheepdog crouches low. The donkey flicks its ears but seems content.")
    assert [a.text for a in by["sheepdog"][0].attributes] == ["black-and-white"]
    assert [a.text for a in by["donkey"][0].attributes] == ["content"]
    _, by = _by_name("A bearded chef in a black apron slices a ripe tomato on a wooden cutting board.")
    assert [a.text for a in by["chef"][0].attributes] == ["bearded", "black apron"]
    _, by = _by_name("The cup is filled with coffee. A man has painted the fence. She has finished her drink.")
    assert not any(a for s in by.values() for e in s for a in e.attributes)


def test_second_review_counterexamples_stay_right() -> None:
    """Captions an independent review of the 2026-12-01 rules found wrong (each broke a rule of that day)."""
    cases = {
        "A girl feeds a carrot to the rabbit and strokes it gently.": {("girl", "strokes", "rabbit")},
        "A boy dressed as a knight swings a cardboard sword.": {("boy", "swings", "sword")},
        "A young man who works as a lifeguard watches the swimmers.": {("man", "watches", "swimmer")},
        "A woman clips a leash onto the puppy and leads it outside.": {("woman", "leads", "puppy")},
    }
    for caption, want in cases.items():
        rec, _ = _by_name(caption)
        assert want <= _rels(rec), (caption, _rels(rec))
    for caption in (
        "A young woman in a yellow raincoat walks along the pier. She pulls the raincoat tighter around her body.",
        "A woman wraps a scarf around her neck.",
        "A man pulls on a jacket and leaves.",
        "A woman changes into a swimsuit.",
        "A cat curls up on a sweater.",
        "A man checks the watch on his wrist.",
    ):
        rec, by = _by_name(caption)
        assert all(s.category != "object" for s in rec.subjects), (caption, list(by))


def test_an_unknown_noun_that_acts_on_something_is_an_agent() -> None:
    rec, by = _by_name("A stevedore hoists a crate onto a truck. A wombat digs a burrow with its claws.")
    assert by["stevedore"][0].category == "person" and by["wombat"][0].category == "animal"
    assert {("stevedore", "hoists", "crate"), ("wombat", "digs", "burrow")} <= _rels(rec)
    rec, by = _by_name("The tractor tows a rusty plow. The desk lamp casts sharp shadows. Dust rises into the sky.")
    assert not any(s.category in ("person", "animal") for s in rec.subjects), list(by)


def test_third_review_counterexamples_stay_right() -> None:
    """A review of the unknown-agent and description rules: pictures and signs that show things are not people, a
    passive action is not a description, a second clause keeps its own adjectives, "has worn boots" wears boots."""
    for caption in ("The photo shows a man.", "A sign warns hikers about bears.", "The windmill turns its blades."):
        rec, by = _by_name(caption)
        assert not {"photo", "sign", "windmill"} & set(by), (caption, list(by))
    for caption in ("A toddler is being fed.", "A baby is carried.", "A man is seated and the boy is startled."):
        rec, _ = _by_name(caption)
        assert not any(s.attributes for s in rec.subjects), caption
    _, by = _by_name("The man has worn boots.")
    assert [a.text for a in by["man"][0].attributes] == ["boots"]
    _, by = _by_name("A man in a black apron slices a tomato.")
    assert [a.text for a in by["man"][0].attributes] == ["black apron"]


def test_numpy_matmul_parses_as_the_stock_model_does() -> None:
    """The pipeline runs its matrix products through numpy instead of thinc's BLIS (faster here): the parse must be
    the one the model gives as shipped."""
    import spacy

    ours = parser.nlp()
    name = next(n for n in parser.MODELS if spacy.util.is_package(n))
    stock = spacy.load(name, exclude=["ner", "attribute_ruler", "lemmatizer"])
    # captions without hyphens, where the two tokenize alike (ours keeps hyphenated words whole)
    plain = [g["caption"] for g in DEV if "-" not in g["caption"]][:40]
    assert len(plain) >= 10
    for a, b in zip(ours.pipe(plain), stock.pipe(plain), strict=True):
        assert [(t.text, t.tag_, t.dep_, t.head.i) for t in a] == [(t.text, t.tag_, t.dep_, t.head.i) for t in b]


def test_scrambled_captions_never_raise_and_spans_stay_exact() -> None:
    """Word soups from the dev captions (shuffled words, so odd parses and many second parses): every caption gives a
    valid record whose spans index it."""
    import random

    rng = random.Random(7)
    words = [w for g in DEV for w in g["caption"].split()]
    soups = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) for _ in range(300)]
    for cap, rec in zip(soups, parse_captions(soups), strict=True):
        CaptionRecord.model_validate(rec.model_dump())
        for s in rec.subjects:
            assert s.span is not None and cap[s.span.start : s.span.end]
            for a in s.attributes:
                assert a.span is not None and cap[a.span.start : a.span.end] == a.text
        for r in rec.relations:
            assert r.span is None or cap[r.span.start : r.span.end]


def test_review_counterexamples_stay_right() -> None:
    """Ordinary captions a reviewer found mis-read by rules of the same day (since removed): an animal name at the end
    of a word does not make an animal, a food word does not re-mention the newest thing, and "onto" after a verb of
    motion can still be an action."""
    rec, by = _by_name("A dog catches a frisbee. A woman sketches a landscape on a canvas.")
    assert by["frisbee"][0].category == "object" and by["landscape"][0].category == "object"
    rec, by = _by_name("A man holds grapes and a bottle, and he eats the fruit.")
    assert ("man", "eats", "bottle") not in _rels(rec)
    rec, _ = _by_name("A woman steps onto the scale.")
    assert _rels(rec) == {("woman", "steps onto", "scale")}
