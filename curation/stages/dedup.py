"""`dedup`: near-duplicate clips across the run (the same footage re-encoded, rescaled, re-uploaded or cut again).

Each clip's frame samples get a 64-bit perceptual hash (DCT of the 32x32 grey frame, the 8x8 lowest frequencies
against their median): re-encoding and rescaling change a few bits, different footage about half. Two clips are
duplicates when at least `min_matched` of the shorter clip's sampled frames have a frame in the other clip within
`max_bits` bits, which also catches a clip cut again with other start and end points. Clips are visited best first
(source pixels, then length, then the aesthetics score when that stage ran); a clip that duplicates one already
kept is rejected as `duplicate`, with the kept clip in `dedup_kept_clip`. Candidate pairs come from 16-bit bands of
the hashes: a clip is compared only with kept clips that share a band value with one of its frames.

Clips of one source video are not compared with each other: the scene cut makes them disjoint in time, and a static
camera's two halves are different footage. The stage sees the whole run at once (`group_by = "run"`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from curation.filters import pick
from curation.samples import SAMPLES_COLUMN, load_samples
from curation.stage import Kind, Resources, Row, Stage, StageConfig

BANDS = 4  # 4 x 16-bit bands: two frames within 12 bits share at least one band unless the flips spread evenly


class DedupConfig(StageConfig):
    max_frames: int = Field(8, ge=2, le=64, description="samples hashed per clip")
    max_bits: int = Field(10, ge=0, le=32, description="two frames match within this many differing hash bits")
    min_matched: float = Field(
        0.6, gt=0, le=1, description="duplicate when this share of the shorter clip's frames match the other clip"
    )


def phash(rgb: np.ndarray) -> int:
    """64-bit DCT perceptual hash of an RGB frame."""
    import cv2

    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def _bits(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def matched_share(a: list[int], b: list[int], max_bits: int) -> float:
    """Share of the shorter list's hashes with a hash in the other list within `max_bits`."""
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    if not short:
        return 0.0
    return sum(1 for h in short if any(_bits(h, g) <= max_bits for g in long_)) / len(short)


class Dedup(Stage[DedupConfig]):
    name = "dedup"
    version = "1"
    kind = Kind.CLIP
    config_class = DedupConfig
    requires = (SAMPLES_COLUMN, "video_id")
    default_resources = Resources(cpus=0.5, batch_size=1, pool_max=1)
    score_column = "dedup_matched"
    not_scores = ("kept_clip",)
    columns: ClassVar[dict[str, str]] = {"dedup_matched": "DOUBLE", "dedup_kept_clip": "VARCHAR"}
    group_by = "run"

    @property
    def backend(self) -> str:
        return "embedded:phash64"

    def process(self, row: Row) -> Row:
        return self.process_group([row])[0]

    def process_group(self, rows: list[Row]) -> list[Row]:
        c = self.config
        hashes: dict[int, list[int]] = {}
        out: dict[int, Row] = {}
        for i, r in enumerate(rows):
            try:
                frames = load_samples(r)["frames"]
                hashes[i] = [phash(frames[j]) for j in pick(len(frames), c.max_frames)]
            except Exception as exc:  # a clip whose samples are gone is an error row, not the run's end
                out[i] = self.error_row(r, exc)
        order = sorted(hashes, key=lambda i: _preference(rows[i]))
        bands: dict[tuple[int, int], set[int]] = defaultdict(set)  # (band, value) -> kept clips
        for i in order:
            cands: set[int] = set()
            for h in hashes[i]:
                for b in range(BANDS):
                    cands |= bands.get((b, (h >> (16 * b)) & 0xFFFF), set())
            best, share = None, 0.0
            for j in sorted(cands, key=lambda j: _preference(rows[j])):
                if rows[j].get("video_id") == rows[i].get("video_id"):
                    continue
                s = matched_share(hashes[i], hashes[j], c.max_bits)
                if s > share:
                    best, share = j, s
            if best is not None and share >= c.min_matched:
                out[i] = self.row(
                    rows[i], "reject", "duplicate", matched=round(share, 3), kept_clip=rows[best]["clip_id"]
                )
                continue
            out[i] = self.row(rows[i], "ok", matched=round(share, 3), kept_clip=None)
            for h in hashes[i]:
                for b in range(BANDS):
                    bands[(b, (h >> (16 * b)) & 0xFFFF)].add(i)
        return [out[i] for i in range(len(rows))]

    def thresholds(self) -> dict[str, list[tuple[float, str]]]:
        return {"dedup_matched": [(self.config.min_matched, "max")]}


def _preference(r: Row) -> tuple[Any, ...]:
    """Which copy to keep: more source pixels, then longer, then the better `aesthetics` score when that stage ran
    before (a low-bitrate re-encode scores lower), then fewer decode errors, then the id (stable)."""
    pixels = float(r.get("probe_width") or 0) * float(r.get("probe_height") or 0)
    return (
        -pixels,
        -float(r.get("clip_duration_s") or 0),
        -float(r.get("aesthetics_score") or 0),
        float(r.get("scenecut_decode_errors") or 0),
        str(r.get("clip_id")),
    )
