"""`watermark`: static overlays (logos, channel marks, timestamps) burnt into the picture.

- `embedded`: what stays put across different shots. An overlay is drawn on top of every shot of the video, while
  the scene under it changes from shot to shot, so for each clip (shot) the pixels that are edges in >= `persistence`
  of its samples are found, and an overlay is what is persistent in every one of the video's visually distinct
  shots (shots whose median frames differ by more than `distinct_shots` grey levels). Long straight persistent
  lines (letterbox bars, frame borders) are removed. The score is the largest density of such pixels in a frame
  corner minus the density in the centre. A single shot, or several cut from one fixed camera, is no evidence of an
  overlay (a static background persists too): the score is then 0 and `watermark_distinct_shots` says why. (Asking
  the same inside one moving shot was tried: busy texture under a slow pan lines up as often as a drawn mark does.)
- Text marks, whatever the backend: when `ocr` ran before this stage, its `mark` boxes (a clock, a date, a
  copyright or address line, or a name anchored to a side edge of the top or bottom band in the same place in most
  samples) are marks too (`watermark_text_marks`), so a timestamp on a single shot or a fixed camera is found where
  no edge statistic can tell. A graphic mark with no letters on a single shot is left to the reference backend.
- `reference`: the LAION watermark classifier (timm EfficientNet-B3 with a 2-class head, weights
  `watermark_model_v1.pt`), mean probability over the clip's samples.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from curation.errors import require, torch_device
from curation.filters import FilterConfig, SampleFilter, pick
from curation.samples import SAMPLES_COLUMN, cut_sample_paths
from curation.stage import Resources, Row, StageContext, operational

WORK_WIDTH = 320


class WatermarkConfig(FilterConfig):
    max_score: float = Field(0.03, ge=0, description="reject above (embedded: corner density of cross-shot edges)")
    max_probability: float = Field(0.5, ge=0, le=1, description="reference backend: reject above this probability")
    persistence: float = Field(0.75, gt=0, le=1, description="share of a shot's samples a pixel must be an edge in")
    corner: float = Field(0.3, gt=0, le=0.5, description="corner zone size, as a fraction of width and height")
    distinct_shots: float = Field(
        12.0, ge=0, description="mean grey difference between two shots' median frames for them to count as distinct"
    )
    max_shots: int = Field(16, ge=2, description="at most this many of the video's clips (evenly spaced) are compared")
    text_marks: bool = Field(True, description="reject clips where the ocr stage (run before this one) found a mark")
    video_frames: int | None = operational(None, description="deprecated (watermark v2), ignored")
    min_change: float | None = operational(None, description="deprecated (watermark v2), ignored")
    reference_weights: ClassVar[tuple[tuple[str, str], ...]] = (
        ("watermark_model_v1.pt", "github.com/LAION-AI/LAION-5B-WatermarkDetection (release weights)"),
    )


def _video_shots(row: Row, own: np.ndarray, max_shots: int = 16) -> list[np.ndarray]:
    """Grey samples of every clip of the video's current cut, one array per clip, at a common working size (this
    clip's from memory): the same shots whichever clip asks, so the score is a property of the video."""
    import cv2

    h, w = own.shape[1:3]
    size = (WORK_WIDTH, max(2, round(h * WORK_WIDTH / w)))
    path = row[SAMPLES_COLUMN]
    shots = []
    paths = cut_sample_paths(row)
    for f in [paths[i] for i in pick(len(paths), max_shots)]:
        if str(f) == str(path):
            frames = own
        else:
            with np.load(f, allow_pickle=False) as z:
                frames = z["frames"]
        greys = [cv2.resize(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), size, interpolation=cv2.INTER_AREA)
                 for x in frames if x.shape[:2] == (h, w)]  # fmt: skip
        if greys:
            shots.append(np.stack(greys))
    return shots


def overlay_score(
    shots: list[np.ndarray], persistence: float = 0.75, corner: float = 0.3, distinct: float = 12.0
) -> dict[str, Any]:
    """Corner density of the edges that persist in every visually distinct shot (see the module docstring)."""
    import cv2

    usable = [g for g in shots if len(g) >= 3]  # persistence needs a few samples of the shot
    medians = [np.median(g, axis=0) for g in usable]
    keep: list[int] = []
    for i, med in enumerate(medians):
        if all(float(np.abs(med - medians[j]).mean()) > distinct for j in keep):
            keep.append(i)
    out: dict[str, Any] = {
        "score": 0.0,
        "corner": None,
        "centre_density": 0.0,
        "shots": len(shots),
        "distinct_shots": len(keep),
        "frames": int(sum(len(g) for g in shots)),
    }
    if len(keep) < 2:
        return out
    h, w = usable[0].shape[1:]
    persist = np.ones((h, w), np.uint8)
    for i in keep:
        edges = np.stack([cv2.dilate(cv2.Canny(g, 80, 160), np.ones((3, 3), np.uint8)) > 0 for g in usable[i]])
        persist &= (edges.mean(0) >= persistence).astype(np.uint8)
    lines = cv2.morphologyEx(persist, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (w // 4, 1)))
    lines |= cv2.morphologyEx(persist, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (1, h // 4)))
    persist &= 1 - cv2.dilate(lines, np.ones((5, 5), np.uint8))
    ch, cw = max(1, int(h * corner)), max(1, int(w * corner))
    zones = {
        "top_left": persist[:ch, :cw],
        "top_right": persist[:ch, w - cw :],
        "bottom_left": persist[h - ch :, :cw],
        "bottom_right": persist[h - ch :, w - cw :],
    }
    centre = float(persist[ch:-ch, cw:-cw].mean()) if h > 2 * ch and w > 2 * cw else 0.0
    where = max(zones, key=lambda k: float(zones[k].mean()))
    score = max(0.0, float(zones[where].mean()) - centre)
    out.update(score=score, corner=where if score > 0 else None, centre_density=centre)
    return out


def text_marks(boxes_json: str | None) -> list[str]:
    """The texts of the `mark` boxes the ocr stage recorded for the clip (none without ocr)."""
    if not boxes_json:
        return []
    return [str(b.get("text") or "") for b in json.loads(boxes_json) if b.get("kind") == "mark"]


class _LaionWatermark:
    """Reference backend (imported lazily from the `gpu` extra)."""

    def __init__(self, cfg: WatermarkConfig, gpus: float) -> None:
        timm = require("timm", "watermark backend reference")
        torch = require("torch", "watermark backend reference")

        self.torch = torch
        self.device = torch_device(torch, gpus, "watermark")
        model = timm.create_model("efficientnet_b3", pretrained=False, num_classes=2)
        model.classifier = torch.nn.Sequential(
            torch.nn.Linear(in_features=1536, out_features=625),
            torch.nn.ReLU(),
            torch.nn.Dropout(p=0.3),
            torch.nn.Linear(in_features=625, out_features=256),
            torch.nn.ReLU(),
            torch.nn.Linear(in_features=256, out_features=2),
        )
        model.load_state_dict(torch.load(f"{cfg.models_dir}/watermark_model_v1.pt", map_location=self.device))
        self.model = model.to(self.device).eval()

    def __call__(self, frames: np.ndarray) -> dict[str, Any]:
        import cv2

        torch = self.torch
        x = np.stack([cv2.resize(f, (256, 256), interpolation=cv2.INTER_AREA) for f in frames]).astype(np.float32)
        x = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
        with torch.no_grad():
            t = torch.from_numpy(x.transpose(0, 3, 1, 2)).float().to(self.device)
            prob = torch.softmax(self.model(t), dim=1)[:, 0].cpu().numpy()
        # `score` is the headline column for every backend (the report and `select` read it)
        return {"score": float(prob.mean()), "probability": float(prob.mean()), "probability_max": float(prob.max())}


class Watermark(SampleFilter):
    name = "watermark"
    version = "4"
    config_class = WatermarkConfig
    requires = ("clip_samples_path",)
    optional_requires = ("ocr_boxes",)
    default_resources = Resources(cpus=0.5, batch_size=8, pool_max=2)
    gpu_backends: ClassVar[dict[str, float]] = {"reference": 0.25}
    backend_names: ClassVar[dict[str, str]] = {"embedded": "edge-persistence", "reference": "laion-watermark-v1"}
    score_column = "watermark_score"

    def setup(self, ctx: StageContext) -> None:
        self._ref = _LaionWatermark(self.config, self.resources().gpus) if self.config.backend == "reference" else None
        self._cache: dict[tuple[str, ...], dict[str, Any]] = {}

    def score(self, row: Row, samples: dict[str, np.ndarray]) -> dict[str, Any]:
        marks = text_marks(row.get("ocr_boxes"))
        found = {"text_marks": sorted({m for m in marks if m}), "text_mark_boxes": len(marks)}
        return {**self._visual(row, samples), **found}

    def _visual(self, row: Row, samples: dict[str, np.ndarray]) -> dict[str, Any]:
        if self._ref is not None:
            return self._ref(samples["frames"][pick(len(samples["frames"]), self.config.max_frames)])
        # The score is a property of the whole video's samples: computed once per video, not once per clip.
        key = tuple(str(p) for p in cut_sample_paths(row))
        if key not in self._cache:
            c = self.config
            shots = _video_shots(row, samples["frames"], c.max_shots)
            if len(self._cache) >= 32:  # inputs come in clip-id order, videos interleaved: keep several
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = overlay_score(shots, c.persistence, c.corner, c.distinct_shots)
        return dict(self._cache[key])

    def decide(self, s: dict[str, Any]) -> tuple[str, str | None]:
        if self.config.text_marks and s.get("text_mark_boxes"):
            return "reject", "watermark"
        if "probability" in s:
            return ("reject", "watermark") if s["probability"] > self.config.max_probability else ("ok", None)
        return ("reject", "watermark") if s["score"] > self.config.max_score else ("ok", None)

    def thresholds(self) -> dict[str, list[tuple[float, str]]]:
        c = self.config
        return {self.col("score"): [(c.max_probability if c.backend == "reference" else c.max_score, "max")]}
