"""`watermark`: static overlays (logos, channel marks, timestamps) burnt into the picture.

- `embedded`: temporal persistence of edges. An overlay keeps its edges in place while the picture around it
  changes, so over the samples of the clip *and of the other clips of the same video* (overlays survive cuts) the
  fraction of frames in which each pixel is an edge is computed; pixels that are edges in >= `persistence` of the
  frames are "persistent". Long straight persistent lines (letterbox bars, frame borders) are removed. The score is
  the largest persistent-edge density found in a frame corner whose surroundings do change (median temporal
  standard deviation of its non-persistent pixels >= `min_change`), minus the density in the frame centre. A static
  camera makes its background persistent too, but nothing around it changes, so it does not count. If the frames
  barely change at all, nothing can be told apart and the score is 0 with `watermark_static` set.
- `reference`: the LAION watermark classifier (timm EfficientNet-B3 with a 2-class head, weights
  `watermark_model_v1.pt`), mean probability over the clip's samples.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from curation.errors import require
from curation.filters import FilterConfig, SampleFilter, pick
from curation.samples import SAMPLES_COLUMN, cut_sample_paths
from curation.stage import Resources, Row, StageContext

WORK_WIDTH = 320


class WatermarkConfig(FilterConfig):
    max_score: float = Field(0.03, ge=0, description="reject above (embedded: corner persistent-edge density)")
    max_probability: float = Field(0.5, ge=0, le=1, description="reference backend: reject above this probability")
    persistence: float = Field(0.9, gt=0, le=1, description="fraction of frames a pixel must be an edge in")
    corner: float = Field(0.3, gt=0, le=0.5, description="corner zone size, as a fraction of width and height")
    video_frames: int = Field(48, ge=2, description="samples used across the whole video")
    min_change: float = Field(10.0, ge=0, description="grey-level std the picture around an overlay must show")
    reference_weights: ClassVar[tuple[tuple[str, str], ...]] = (
        ("watermark_model_v1.pt", "github.com/LAION-AI/LAION-5B-WatermarkDetection (release weights)"),
    )


def _video_frames(row: Row, own: np.ndarray, limit: int) -> np.ndarray:
    """The samples of every clip of the video's current cut (this clip's from memory), in clip-id order, at a
    common size: the same frames whichever clip asks, so the score is a property of the video."""
    import cv2

    frames: list[np.ndarray] = []
    path = row[SAMPLES_COLUMN]
    for f in cut_sample_paths(row):
        if str(f) == str(path):
            frames.extend(own)
        else:
            with np.load(f, allow_pickle=False) as z:
                frames.extend(z["frames"])
    h, w = own.shape[1:3]
    size = (WORK_WIDTH, max(2, round(h * WORK_WIDTH / w)))
    keep = [frames[i] for i in pick(len(frames), limit)]
    return np.stack(
        [
            cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), size, interpolation=cv2.INTER_AREA)
            for f in keep
            if f.shape[:2] == (h, w)
        ]
    )


def persistence_score(
    greys: np.ndarray, persistence: float = 0.9, corner: float = 0.3, min_change: float = 10.0
) -> dict[str, Any]:
    import cv2

    n, h, w = greys.shape
    change = float(np.abs(np.diff(greys.astype(np.int16), axis=0)).mean()) if n > 1 else 0.0
    edges = np.stack([cv2.dilate(cv2.Canny(g, 80, 160), np.ones((3, 3), np.uint8)) > 0 for g in greys])
    persist = (edges.mean(0) >= persistence).astype(np.uint8)
    lines = cv2.morphologyEx(persist, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (w // 4, 1)))
    lines |= cv2.morphologyEx(persist, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (1, h // 4)))
    persist &= 1 - cv2.dilate(lines, np.ones((5, 5), np.uint8))
    std = greys.astype(np.float32).std(0)
    ch, cw = max(1, int(h * corner)), max(1, int(w * corner))
    zones = {
        "top_left": (slice(0, ch), slice(0, cw)),
        "top_right": (slice(0, ch), slice(w - cw, w)),
        "bottom_left": (slice(h - ch, h), slice(0, cw)),
        "bottom_right": (slice(h - ch, h), slice(w - cw, w)),
    }
    centre = float(persist[ch:-ch, cw:-cw].mean()) if h > 2 * ch and w > 2 * cw else 0.0
    density, around = {}, {}
    for k, z in zones.items():
        p, s = persist[z], std[z]
        around[k] = float(np.median(s[p == 0])) if (p == 0).any() else 0.0
        density[k] = float(p.mean()) if around[k] >= min_change else 0.0
    where = max(density, key=density.get)
    static = change < 1.0
    score = 0.0 if static else max(0.0, density[where] - centre)
    return {
        "score": score,
        "corner": where if score > 0 else None,
        "centre_density": centre,
        "corner_change": around[where],
        "frames": int(n),
        "change": change,
        "static": static,
    }


class _LaionWatermark:
    """Reference backend (imported lazily from the `gpu` extra)."""

    def __init__(self, cfg: WatermarkConfig) -> None:
        timm = require("timm", "watermark backend reference")
        torch = require("torch", "watermark backend reference")

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model = timm.create_model("efficientnet_b3a", pretrained=False, num_classes=2)
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
    version = "2"
    config_class = WatermarkConfig
    requires = ("clip_samples_path",)
    default_resources = Resources(cpus=0.5, batch_size=8, pool_max=2)
    gpu_backends: ClassVar[dict[str, float]] = {"reference": 0.25}
    backend_names: ClassVar[dict[str, str]] = {"embedded": "edge-persistence", "reference": "laion-watermark-v1"}
    score_column = "watermark_score"

    def setup(self, ctx: StageContext) -> None:
        self._ref = _LaionWatermark(self.config) if self.config.backend == "reference" else None
        self._cache: dict[tuple[str, ...], dict[str, Any]] = {}

    def score(self, row: Row, samples: dict[str, np.ndarray]) -> dict[str, Any]:
        if self._ref is not None:
            return self._ref(samples["frames"][pick(len(samples["frames"]), self.config.max_frames)])
        # The score is a property of the whole video's samples: computed once per video, not once per clip.
        key = tuple(str(p) for p in cut_sample_paths(row))
        if key not in self._cache:
            greys = _video_frames(row, samples["frames"], self.config.video_frames)
            self._cache = {
                key: persistence_score(greys, self.config.persistence, self.config.corner, self.config.min_change)
            }
        return dict(self._cache[key])

    def decide(self, s: dict[str, Any]) -> tuple[str, str | None]:
        if "probability" in s:
            return ("reject", "watermark") if s["probability"] > self.config.max_probability else ("ok", None)
        return ("reject", "watermark") if s["score"] > self.config.max_score else ("ok", None)
