"""Clients for the reference caption backend: any OpenAI-compatible chat endpoint, or vLLM's offline engine.

Both return raw text; `parse_record` validates it against the caption schema (repairing what can be repaired), so a
malformed answer becomes a re-ask or an error row, never a crashed batch.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from pydantic import ValidationError

from curation.errors import ConfigError
from curation.stages.caption.record import Draft, build_record
from curation.stages.caption.schema import CaptionRecord

log = logging.getLogger(__name__)

Message = dict[str, Any]
# (messages, JSON schema or None[, extra request fields such as vLLM's mm_processor_kwargs])
Request = tuple[list[Message], dict[str, Any] | None] | tuple[list[Message], dict[str, Any] | None, dict[str, Any]]


class MLLMError(Exception):
    """The endpoint failed or answered something unusable (recorded on the row, with the raw text)."""

    def __init__(self, message: str, raw: str | None = None) -> None:
        super().__init__(message)
        self.raw = raw


def _jpeg_b64(rgb: np.ndarray, quality: int) -> str:
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise MLLMError("could not encode a frame as JPEG")
    return base64.b64encode(buf).decode()


def fit_pixels(rgb: np.ndarray, max_pixels: int) -> np.ndarray:
    """Scaled down (aspect kept) so that height x width <= max_pixels: the MLLM's per-frame pixel budget."""
    import cv2

    h, w = rgb.shape[:2]
    f = min(1.0, (max_pixels / (h * w)) ** 0.5)
    if f >= 1.0:
        return rgb
    return cv2.resize(rgb, (max(1, int(w * f)), max(1, int(h * f))), interpolation=cv2.INTER_AREA)


def video_part(frames: np.ndarray, max_pixels: int, quality: int = 85) -> dict[str, Any]:
    """A clip as one video content part: its frames as JPEGs in one data URL, base64 frames joined by commas (the
    `video/jpeg` form vLLM's OpenAI server and `LLM.chat` read), each within the pixel budget. Qwen2.5-VL then sees
    a video (temporal patches, time positions) instead of unrelated images."""
    data = ",".join(_jpeg_b64(fit_pixels(f, max_pixels), quality) for f in frames)
    return {"type": "video_url", "video_url": {"url": "data:video/jpeg;base64," + data}}


def image_part(rgb: np.ndarray, max_side: int = 448, quality: int = 85) -> dict[str, Any]:
    """An OpenAI-style image content part (JPEG data URL) from an RGB frame."""
    import cv2

    h, w = rgb.shape[:2]
    f = min(1.0, max_side / max(h, w))
    small = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise MLLMError("could not encode a frame as JPEG")
    return {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(buf).decode()}}


class OpenAIClient:
    """Chat completions over HTTP with a concurrency limit, a timeout and bounded retries with backoff."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 2,
        concurrency: int = 8,
        max_tokens: int = 768,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout_s = model, api_key, timeout_s
        self.retries, self.max_tokens = retries, max_tokens
        self.concurrency = max(1, concurrency)
        self._slots = threading.Semaphore(self.concurrency)

    def chat(
        self, messages: list[Message], json_schema: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
    ) -> str:
        """One chat completion; `extra` goes into the request body as is (e.g. vLLM's `mm_processor_kwargs`)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": 0.0,
            "max_tokens": self.max_tokens,
            **(extra or {}),
        }
        if json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "caption_record", "schema": json_schema},
            }
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(8.0, 0.5 * 2**attempt))
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with self._slots, urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    payload = json.loads(resp.read().decode())
                return str(payload["choices"][0]["message"]["content"])
            except urllib.error.HTTPError as exc:
                last = exc
                if exc.code in (401, 403, 404):  # wrong key, model name or endpoint: every request would fail
                    raise ConfigError(
                        f"caption endpoint {self.url} answered HTTP {exc.code} ({exc.reason}): check caption.endpoint, "
                        "caption.model and the API key variable (caption.api_key_env)"
                    ) from None
                if exc.code < 500 and exc.code != 429:  # a client error will not go away by retrying
                    raise MLLMError(f"endpoint answered HTTP {exc.code}: {exc.read()[:300]!r}") from None
            except (urllib.error.URLError, TimeoutError, OSError, KeyError, IndexError, json.JSONDecodeError) as exc:
                last = exc
            log.info("chat request failed (attempt %d/%d): %s", attempt + 1, self.retries + 1, last)
        raise MLLMError(f"endpoint failed after {self.retries + 1} attempts: {type(last).__name__}: {last}")

    def chat_many(self, requests: Sequence[Request]) -> list[str | MLLMError]:
        """Many chats at once (at most `concurrency` in flight); failures come back as MLLMError values."""

        def one(req: Request) -> str | MLLMError:
            try:
                return self.chat(*req)
            except MLLMError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, requests))


class VLLMEngine:
    """vLLM's offline engine (`vllm.LLM.chat`) with JSON-schema guided decoding; imported lazily (GPU extra)."""

    def __init__(
        self,
        model: str,
        max_model_len: int = 16384,
        images_per_prompt: int = 8,
        gpu_memory_utilization: float = 0.9,
        max_tokens: int = 768,
        video: bool = False,
    ) -> None:
        from curation.errors import require

        LLM = require("vllm", "caption backend vllm").LLM
        self.llm = LLM(
            model=model,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            limit_mm_per_prompt={"video": 1, "image": 0} if video else {"image": images_per_prompt},
        )
        self.max_tokens = max_tokens

    def _params(self, json_schema: dict[str, Any] | None) -> Any:
        from vllm import SamplingParams

        kwargs: dict[str, Any] = {"temperature": 0.0, "max_tokens": self.max_tokens}
        if json_schema is not None:
            try:  # vLLM >= 0.10
                from vllm.sampling_params import StructuredOutputsParams

                kwargs["structured_outputs"] = StructuredOutputsParams(json=json_schema)
            except ImportError:  # older releases
                from vllm.sampling_params import GuidedDecodingParams

                kwargs["guided_decoding"] = GuidedDecodingParams(json=json_schema)
        return SamplingParams(**kwargs)

    def chat_many(self, requests: Sequence[Request]) -> list[str | MLLMError]:
        out: list[str | MLLMError] = []
        by_schema: dict[str, list[int]] = {}  # one engine call per (schema, processor kwargs)
        for i, req in enumerate(requests):
            schema, extra = req[1], (req[2] if len(req) > 2 else None) or {}
            key = json.dumps([schema, extra.get("mm_processor_kwargs")], sort_keys=True)
            by_schema.setdefault(key, []).append(i)
        results: dict[int, str | MLLMError] = {}
        for key, idx in by_schema.items():
            schema, mm_kwargs = json.loads(key)
            params = self._params(schema)
            try:
                kw = {"mm_processor_kwargs": mm_kwargs} if mm_kwargs else {}
                gens = self.llm.chat([requests[i][0] for i in idx], sampling_params=params, use_tqdm=False, **kw)
                for i, g in zip(idx, gens, strict=True):
                    results[i] = g.outputs[0].text
            except Exception as exc:  # one bad batch: every request in it becomes an error value
                for i in idx:
                    results[i] = MLLMError(f"vLLM generation failed: {exc}")
        out = [results[i] for i in range(len(requests))]
        return out


# -- answers -> CaptionRecord ------------------------------------------------------------------------------------
def extraction_schema() -> dict[str, Any]:
    """The JSON the extraction prompt asks for (no spans: those are located in the caption afterwards)."""
    return {
        "type": "object",
        "properties": {
            "subjects": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer"},
                        "category": {"enum": ["person", "animal", "object"]},
                        "name": {"type": "string"},
                        "count": {"type": "integer"},
                        "attributes": {"type": "array", "items": {"type": "string"}},
                    },
                    "required": ["id", "category", "name", "attributes"],
                },
            },
            "relations": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "kind": {"enum": ["interaction"]},
                        "subject": {"type": "integer"},
                        "predicate": {"type": "string"},
                        "object": {"type": "integer"},
                    },
                    "required": ["subject", "predicate", "object"],
                },
            },
        },
        "required": ["subjects", "relations"],
    }


def _json_block(text: str) -> Any:
    """Parse JSON, or repair the usual damage: code fences, prose around one object, trailing commas."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    m = re.search(r"\{.*\}", text, flags=re.S)
    if not m:
        raise MLLMError("answer holds no JSON object", raw=text)
    block = re.sub(r",\s*([}\]])", r"\1", m.group(0))
    try:
        return json.loads(block)
    except json.JSONDecodeError as exc:
        raise MLLMError(f"answer is not valid JSON ({exc})", raw=text) from None


def parse_record(caption: str, answer: str) -> CaptionRecord:
    """Validate an extraction answer against the schema and bind its phrases to caption spans (the same binding and
    validation as the embedded parser's, `record.build_record`)."""
    data = _json_block(answer)
    if not isinstance(data, dict):
        raise MLLMError("answer is not a JSON object", raw=answer)
    try:
        raw = list(data.get("subjects") or [])
        index = {int(s.get("id", k)): k for k, s in enumerate(raw)}
        drafts = [
            Draft(
                name=str(s["name"]),
                category=str(s["category"]),
                count=int(s.get("count") or 1),
                attributes=[(str(a), None) for a in s.get("attributes") or []],
            )
            for s in raw
        ]
        interactions = [
            (index[int(r["subject"])], str(r["predicate"]), index[int(r["object"])], None)
            for r in data.get("relations") or []
        ]
        return build_record(caption, drafts, interactions)
    except (ValidationError, KeyError, TypeError, ValueError) as exc:
        raise MLLMError(f"answer does not fit the schema: {str(exc).splitlines()[0]}", raw=answer) from None
