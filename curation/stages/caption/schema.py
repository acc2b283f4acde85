"""The structured record of a clip's caption: subjects, their attributes and relations, bound to caption spans.

One schema for every caption backend (the embedded parser and the MLLM), validated with pydantic. Spans are
`[start, end)` character offsets into `caption`; `caption[start:end]` is the phrase.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Category = Literal["person", "animal", "object"]


class Span(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: int = Field(ge=0)
    end: int = Field(ge=0)


class Attribute(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    span: Span | None = None


class Subject(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int = Field(ge=0)
    category: Category
    name: str = Field(description="the noun phrase head, e.g. 'woman', 'dog'")
    span: Span | None = Field(None, description="first mention of the subject in the caption")
    count: int = Field(1, ge=1)
    attributes: list[Attribute] = Field(default_factory=list)
    box: list[float] | None = Field(None, description="optional [x0, y0, x1, y1] in [0, 1] on the keyframe")


class Relation(BaseModel):
    """`attribute`: subject has attribute #object. `interaction`: subject -predicate-> subject #object."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["attribute", "interaction"]
    subject: int
    predicate: str
    object: int
    span: Span | None = None


class CaptionRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    caption: str
    subjects: list[Subject] = Field(default_factory=list)
    relations: list[Relation] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> CaptionRecord:
        ids = {s.id for s in self.subjects}
        n = len(self.caption)
        spans = [s.span for s in self.subjects] + [a.span for s in self.subjects for a in s.attributes]
        for sp in spans:
            if sp is not None and not (0 <= sp.start < sp.end <= n):
                raise ValueError(f"span {sp.start}-{sp.end} is outside the caption (length {n})")
        for r in self.relations:
            if r.subject not in ids:
                raise ValueError(f"relation refers to unknown subject {r.subject}")
            if r.kind == "interaction" and r.object not in ids:
                raise ValueError(f"interaction refers to unknown subject {r.object}")
            if r.kind == "attribute":
                subj = next(s for s in self.subjects if s.id == r.subject)
                if not 0 <= r.object < len(subj.attributes):
                    raise ValueError(f"attribute relation refers to missing attribute {r.object} of {r.subject}")
        return self
