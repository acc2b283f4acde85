"""One way to turn extracted subjects and relations into a `CaptionRecord`, for every caption backend: phrases bound to
caption spans (given by the parser's tokens, or found in the caption for an MLLM's answer), attribute relations
derived, and the record validated."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from curation.stages.caption.schema import Attribute, CaptionRecord, Relation, Span, Subject


@dataclass
class Draft:
    """A subject before binding: spans may be missing (an MLLM's answer) or known (the parser's tokens)."""

    name: str
    category: str
    count: int = 1
    span: tuple[int, int] | None = None
    attributes: list[tuple[str, tuple[int, int] | None]] = field(default_factory=list)


def find_span(caption: str, phrase: str, start: int = 0) -> tuple[int, int] | None:
    """Where `phrase` occurs in the caption (case-insensitive), preferring the first occurrence at or after `start`."""
    if not phrase:
        return None
    pattern = re.compile(re.escape(phrase), re.IGNORECASE)  # on the caption itself: lower() can change lengths
    m = pattern.search(caption, start) or (pattern.search(caption) if start else None)
    return (m.start(), m.end()) if m else None


def build_record(
    caption: str, drafts: list[Draft], interactions: list[tuple[int, str, int, tuple[int, int] | None]]
) -> CaptionRecord:
    """Subjects (ids = positions in `drafts`) with their attributes bound to spans, an attribute relation per
    attribute, and the interactions (subject index, predicate, object index, predicate span). A bound phrase is
    the caption's own text at its span, so `caption[span] == text` holds exactly."""
    subjects: list[Subject] = []
    relations: list[Relation] = []
    for k, d in enumerate(drafts):
        span = d.span or find_span(caption, d.name)
        attrs = []
        for text, a_span in d.attributes:
            a_span = a_span or find_span(caption, text, span[0] if span else 0)
            exact = caption[a_span[0] : a_span[1]] if a_span else text
            attrs.append(Attribute(text=exact, span=Span(start=a_span[0], end=a_span[1]) if a_span else None))
        subjects.append(
            Subject(
                id=k,
                category=d.category,  # type: ignore[arg-type]
                name=d.name,
                span=Span(start=span[0], end=span[1]) if span else None,
                count=max(1, d.count),
                attributes=attrs,
            )
        )
        relations += [
            Relation(kind="attribute", subject=k, predicate="has", object=i, span=a.span) for i, a in enumerate(attrs)
        ]
    for s, pred, o, p_span in interactions:
        p_span = p_span or find_span(caption, pred)
        relations.append(
            Relation(
                kind="interaction",
                subject=s,
                predicate=pred,
                object=o,
                span=Span(start=p_span[0], end=p_span[1]) if p_span else None,
            )
        )
    return CaptionRecord(caption=caption, subjects=subjects, relations=relations)
