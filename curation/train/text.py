"""Caption tokenisation with character offsets, so caption spans (subjects, attributes) map to token indices.

`ByteTokenizer` (the tiny config: UTF-8 bytes, no vocabulary file, nothing to download) and `HFTokenizer` (the
pretrained config: umT5's tokenizer from the Wan folder, whose fast tokenizer reports offsets) share one interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass
class Encoded:
    ids: list[int]  # exactly `length` ids, padded
    valid: list[bool]  # real token (not padding)
    offsets: list[tuple[int, int]]  # [start, end) character range of each token; (0, 0) for special/padding


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str, length: int) -> Encoded: ...


class ByteTokenizer:
    """One token per UTF-8 byte (ids 2..257), then EOS (1), then padding (0)."""

    pad_id, eos_id, offset = 0, 1, 2
    vocab_size = 258

    def encode(self, text: str, length: int) -> Encoded:
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for i, ch in enumerate(text):
            for b in ch.encode("utf-8"):
                ids.append(b + self.offset)
                offsets.append((i, i + 1))
        ids, offsets = ids[: length - 1], offsets[: length - 1]
        ids.append(self.eos_id)
        offsets.append((0, 0))
        n = len(ids)
        pad = length - n
        return Encoded(ids + [self.pad_id] * pad, [True] * n + [False] * pad, offsets + [(0, 0)] * pad)


class HFTokenizer:
    """A transformers fast tokenizer loaded from a folder (umT5's for Wan2.1)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self._tok: Any = AutoTokenizer.from_pretrained(path)
        if not getattr(self._tok, "is_fast", False):
            raise ValueError(f"the tokenizer in {path} is not a fast tokenizer: caption spans need its offsets")
        self.vocab_size = len(self._tok)

    def encode(self, text: str, length: int) -> Encoded:
        enc = self._tok(
            text,
            max_length=length,
            truncation=True,
            padding="max_length",
            return_offsets_mapping=True,
            add_special_tokens=True,
        )
        valid = [bool(m) for m in enc["attention_mask"]]
        offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
        return Encoded(list(enc["input_ids"]), valid, offsets)


def span_tokens(enc: Encoded, spans: list[tuple[int, int]]) -> torch.Tensor:
    """[L] bool: tokens whose character range overlaps any of `spans` ([start, end) character offsets)."""
    out = torch.zeros(len(enc.ids), dtype=torch.bool)
    for i, (a, b) in enumerate(enc.offsets):
        if b <= a or not enc.valid[i]:
            continue
        out[i] = any(a < e and s < b for s, e in spans if e > s)
    return out


def subject_spans(subject: dict[str, Any]) -> list[tuple[int, int]]:
    """Character spans of a caption subject: its mention and each of its attributes."""
    spans = []
    if subject.get("span"):
        spans.append((int(subject["span"]["start"]), int(subject["span"]["end"])))
    for a in subject.get("attributes") or []:
        if a.get("span"):
            spans.append((int(a["span"]["start"]), int(a["span"]["end"])))
    return spans
