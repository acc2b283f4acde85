"""`caption`: a dense caption per clip and its subjects, attributes and relations bound to caption spans.

- `embedded` (default): the caption supplied with the input (list-file column, sidecar .txt) parsed by the
  deterministic English parser. A clip without one gets a template caption marked `[template]` that states only
  what is known, never an invented description (`caption_origin = template`).
- `openai`: any OpenAI-compatible endpoint (`vllm serve`, or another server): the caption prompt with the clip's
  frames (one video part by default, `mllm_input`), then the extraction prompt with JSON-schema output. `vllm`: the
  same two prompts on vLLM's offline engine inside the worker (GPU). Answers are validated against the schema; an
  invalid one is repaired or asked again once; what still fails is an `error` row that keeps the raw answer in
  `caption_raw`.
Subjects and relations are stored as JSON (`caption_subjects`, `caption_relations`), which DuckDB queries directly.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from curation.filters import pick
from curation.samples import load_samples
from curation.stage import Resources, Row, Stage, StageConfig, StageContext, is_fatal, operational
from curation.stages.caption.mllm import (
    MLLMError,
    OpenAIClient,
    VLLMEngine,
    extraction_schema,
    image_part,
    parse_record,
    video_part,
)
from curation.stages.caption.parser import parse_caption, parse_captions
from curation.stages.caption.prompts import load_prompt
from curation.stages.caption.schema import CaptionRecord


class CaptionConfig(StageConfig):
    backend: Literal["embedded", "openai", "vllm"] = "embedded"
    use_supplied: bool = Field(True, description="MLLM backends: keep a supplied caption, only extract from it")
    caption_prompt: str = "caption_v1"
    extract_prompt: str = "extract_v1"
    frames: int = Field(6, ge=1, le=32, description="at most this many frames go to the MLLM per clip")
    mllm_input: Literal["video", "images"] = Field(
        "video", description="MLLM backends: the clip as one video (Qwen2.5-VL's temporal modelling) or as images"
    )
    video_fps: float = Field(
        2.0, gt=0, description="video input: at most this many frames per second of clip (Qwen2.5-VL samples at 2)"
    )
    max_pixels: int = Field(448 * 448, ge=28 * 28, description="video input: pixel budget per frame (h x w)")
    openai_server: Literal["vllm", "other"] = Field(
        "vllm",
        description="openai: what serves the endpoint. vllm reads video/jpeg data URLs and mm_processor_kwargs; "
        "other servers (e.g. transformers serve) refuse them: frames go as images",
    )
    endpoint: str | None = operational(None, description="openai: base URL, e.g. http://localhost:8000/v1")
    model: str | None = Field(None, description="openai: served model name; vllm: model path or name")
    api_key_env: str = operational("OPENAI_API_KEY", description="environment variable holding the endpoint's key")
    concurrency: int = operational(8, ge=1)
    timeout_s: float = operational(60.0, gt=0)
    retries: int = operational(2, ge=0)
    max_tokens: int = Field(768, ge=16)

    @model_validator(mode="after")
    def _backend_settings(self) -> CaptionConfig:
        if self.backend == "openai" and not (self.endpoint and self.model):
            raise ValueError("backend openai needs caption.endpoint (e.g. http://localhost:8000/v1) and caption.model")
        if self.backend == "vllm" and not self.model:
            raise ValueError("backend vllm needs caption.model (a Qwen2.5-VL-class model path or name)")
        load_prompt(self.caption_prompt)
        load_prompt(self.extract_prompt)
        return self


def template_caption(row: Row) -> str:
    """What is known without a caption: marked as a template, never a description of the content."""
    facts = []
    dur = row.get("clip_duration_s")
    if dur:
        facts.append(f"{float(dur):.1f} s clip")
    texts = row.get("ocr_texts") or []
    if texts:
        facts.append("on-screen text: " + "; ".join(texts[:3]))
    return "[template] no caption supplied" + (f" ({', '.join(facts)})" if facts else "")


def mllm_content(
    samples: dict[str, Any], fps: float | None, c: CaptionConfig
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A clip's frames as MLLM content parts, and the request fields that go with them.

    video: the samples within `video_fps` x the clip's sampled span (at least 2, at most `frames`), as one video part,
    with the rate they were taken at (`mm_processor_kwargs.fps`, which Qwen2.5-VL turns into time positions).
    images: `frames` evenly spaced samples, one image part each."""
    frames, idx = samples["frames"], samples.get("indices")
    if c.mllm_input == "images" or (c.backend == "openai" and c.openai_server == "other"):
        return [image_part(f) for f in frames[pick(len(frames), c.frames)]], {}
    span = float(idx[-1] - idx[0]) / fps if fps and idx is not None and len(idx) > 1 else 0.0
    n = min(c.frames, len(frames), max(2, math.floor(span * c.video_fps) + 1)) if span > 0 else min(c.frames, 2)
    sel = pick(len(frames), n)
    rate = (len(sel) - 1) / (float(idx[sel[-1]] - idx[sel[0]]) / fps) if span > 0 and len(sel) > 1 else c.video_fps
    # quarter-frame steps: near rates share one value, so vLLM batches clips by processor arguments
    rate = max(0.25, round(rate * 4) / 4)
    return [video_part(frames[sel], c.max_pixels)], {"mm_processor_kwargs": {"fps": rate}}


class Caption(Stage[CaptionConfig]):
    name = "caption"
    version = "4"  # 3: the embedded parser works on a dependency parse; 4: verbs misparsed as singular nouns
    config_class = CaptionConfig
    default_resources = Resources(cpus=0.25, batch_size=16, pool_max=2)
    gpu_backends: ClassVar[dict[str, float]] = {"vllm": 1.0}  # one engine per GPU
    columns: ClassVar[dict[str, str]] = {"caption_text": "VARCHAR", "caption_subjects": "VARCHAR"}  # crops reads them

    @property
    def backend(self) -> str:
        c = self.config
        return {"embedded": "embedded:caption-parser", "openai": f"openai:{c.model}", "vllm": f"vllm:{c.model}"}[
            c.backend
        ]

    @property
    def prompt_hash(self) -> str:
        return "+".join(load_prompt(p)[1] for p in (self.config.caption_prompt, self.config.extract_prompt))

    def hash_extra(self) -> str:
        return self.prompt_hash  # a changed prompt makes the rows that used it stale

    def fusible(self) -> bool:
        return self.config.backend == "embedded"  # openai: concurrent requests a batch, keep its own pool

    def setup(self, ctx: StageContext) -> None:
        c = self.config
        self._client: OpenAIClient | VLLMEngine | None = None
        if c.backend == "openai":
            self._client = OpenAIClient(
                c.endpoint or "",
                c.model or "",
                os.environ.get(c.api_key_env),
                c.timeout_s,
                c.retries,
                c.concurrency,
                c.max_tokens,
            )
        elif c.backend == "vllm":
            self._client = VLLMEngine(
                c.model or "", images_per_prompt=c.frames, max_tokens=c.max_tokens, video=c.mllm_input == "video"
            )

    def _out(self, r: Row, rec: CaptionRecord, origin: str, raw: str | None = None) -> Row:
        return self.row(
            r,
            "ok",
            text=rec.caption,
            origin=origin,
            n_subjects=len(rec.subjects),
            subjects=json.dumps([s.model_dump() for s in rec.subjects], ensure_ascii=False),
            relations=json.dumps([x.model_dump() for x in rec.relations], ensure_ascii=False),
            prompt_hash=self.prompt_hash if self.config.backend != "embedded" else None,
            raw=raw,
        )

    def process(self, r: Row) -> Row:
        if self._client is not None:
            return self._mllm([r])[0]
        text = (r.get("given_caption") or "").strip()
        origin = "supplied" if text else "template"
        rec = parse_caption(text) if text else CaptionRecord(caption=template_caption(r))
        return self._out(r, rec, origin)

    def process_batch(self, batch: list[Row]) -> list[Row]:
        """MLLM backends send the whole batch at once (the endpoint batches); the parser takes the batch's captions
        through spaCy together, and falls back to row by row (each failure its own row) if that fails."""
        if self._client is not None:
            return self._mllm(batch)
        texts = [(r.get("given_caption") or "").strip() for r in batch]
        try:
            records = dict(
                zip([i for i, t in enumerate(texts) if t], parse_captions(t for t in texts if t), strict=True)
            )
        except Exception as exc:
            if is_fatal(exc):
                raise
            return super().process_batch(batch)
        return [
            self._out(r, records[i], "supplied") if i in records
            else self._out(r, CaptionRecord(caption=template_caption(r)), "template")
            for i, r in enumerate(batch)
        ]  # fmt: skip

    def shard_fields(self, row: Row) -> dict[str, Any]:
        text = row.get(self.col("text"))
        return {
            "caption": text or row.get("given_caption"),
            "caption_origin": row.get(self.col("origin")) or ("supplied" if row.get("given_caption") else None),
            "subjects": json.loads(row[self.col("subjects")]) if row.get(self.col("subjects")) else [],
            "relations": json.loads(row[self.col("relations")]) if row.get(self.col("relations")) else [],
        }

    def describe(self, row: Row) -> str | None:
        subjects = json.loads(row.get(self.col("subjects")) or "[]")
        names = ", ".join(
            f"{s['name']} ({', '.join(a['text'] for a in s['attributes'])})" if s["attributes"] else s["name"]
            for s in subjects
        )
        text = row.get(self.col("text")) or row.get("given_caption") or ""
        return f"{text} | subjects: {names or '-'}"

    def _mllm(self, batch: list[Row]) -> list[Row]:
        assert self._client is not None
        c = self.config
        cap_prompt, _ = load_prompt(c.caption_prompt)
        ext_prompt, _ = load_prompt(c.extract_prompt)
        captions: dict[int, str] = {}
        origin: dict[int, str] = {}
        errors: dict[int, Row] = {}
        to_caption = []
        for i, r in enumerate(batch):
            supplied = (r.get("given_caption") or "").strip()
            if supplied and c.use_supplied:
                captions[i], origin[i] = supplied, "supplied"
                continue
            try:
                samples = load_samples(r)
            except Exception as exc:  # no samples: an error row
                errors[i] = self.error_row(r, exc)
                continue
            parts, extra = mllm_content(samples, r.get("clip_fps") or r.get("probe_fps"), c)
            msg = [{"role": "user", "content": [*parts, {"type": "text", "text": cap_prompt}]}]
            to_caption.append((i, (msg, None, extra)))
        answers = self._client.chat_many([req for _, req in to_caption])
        for (i, _), ans in zip(to_caption, answers, strict=True):
            if isinstance(ans, MLLMError) or not ans.strip():
                errors[i] = self.row(
                    batch[i],
                    "error",
                    "mllm",
                    str(ans) if isinstance(ans, MLLMError) else "empty caption",
                    raw=getattr(ans, "raw", None),
                )
            else:
                captions[i], origin[i] = ans.strip(), "mllm"
        schema = extraction_schema()

        def ask(idx: list[int], hint: str = "") -> dict[int, str | MLLMError]:
            reqs = [
                ([{"role": "user", "content": ext_prompt.replace("{caption}", captions[i]) + hint}], schema)
                for i in idx
            ]
            return dict(zip(idx, self._client.chat_many(reqs), strict=True))  # type: ignore[union-attr]

        pending = sorted(captions)
        results: dict[int, Row] = {}
        first = ask(pending)
        retry = []
        for i, ans in first.items():
            try:
                if isinstance(ans, MLLMError):
                    raise ans
                results[i] = self._out(batch[i], parse_record(captions[i], ans), origin[i])
            except MLLMError as exc:
                retry.append((i, exc))
        if retry:  # one re-ask, telling the model what was wrong
            second = ask([i for i, _ in retry], "\n\nYour previous answer was rejected: return only the JSON object.")
            for i, exc in retry:
                ans = second[i]
                try:
                    if isinstance(ans, MLLMError):
                        raise ans
                    results[i] = self._out(batch[i], parse_record(captions[i], ans), origin[i])
                except MLLMError as exc2:
                    raw = exc2.raw or exc.raw
                    results[i] = self.row(
                        batch[i],
                        "error",
                        "invalid_answer",
                        str(exc2),
                        text=captions[i],
                        origin=origin[i],
                        raw=raw,
                        prompt_hash=self.prompt_hash,
                    )
        return [errors.get(i) or results[i] for i in range(len(batch))]
