"""`motion`: optical-flow magnitude of the clip, normalised so scores compare across resolutions and frame rates.

Flow is computed on the (frame before, sample) grey pairs the scene-cut pass stored at detection size (~256 px),
so nothing is decoded again. Units: fraction of the frame diagonal per second. A similarity transform fitted to
the flow (RANSAC) separates camera motion (`motion_camera`) from what moves in the scene (`motion_local`).

Mean flow is diluted by a small mover: a few people crossing a static wide shot score like a still picture. So a
clip is near-static only when its flow is low *and* little of the picture changes between its samples, which are
spread over the clip (`motion_moving_area`: the share of pixels whose grey level changes by more than
`change_level` from one sample to the next once the camera's drift between them is taken out, median over
consecutive samples). In 4 s clips (samples ~0.5 s apart) a person a tenth of the frame high who walks changes
0.5-1.4% of the frame; a person standing still, sensor noise and compression < 0.15%. Samples further apart (long
clips) see a walker move further, so its share grows; what stands still stays still.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

import numpy as np
from pydantic import Field

from curation.filters import FilterConfig, SampleFilter, pick
from curation.stage import Resources, Row


class MotionConfig(FilterConfig):
    backend: Literal["embedded"] = "embedded"  # classical optical flow is the real thing here: no model to swap in
    method: Literal["dis", "farneback"] = "dis"
    dis_preset: Literal["ultrafast", "fast", "medium"] = Field(
        "fast", description="OpenCV DIS preset: fast is 5x quicker than medium at ~256 px with the same decisions"
    )
    min_score: float = Field(0.01, ge=0, description="below: near-static (fraction of diagonal per second)")
    max_score: float | None = Field(None, gt=0, description="above: too fast / chaotic (null: no limit)")
    min_moving_area: float = Field(
        0.003, ge=0, le=1, description="a low-flow clip is near-static only if less than this changes between samples"
    )
    change_level: int = Field(20, ge=1, le=255, description="grey-level change that counts a pixel as changed")
    camera_only_ratio: float = Field(0.2, ge=0, le=1, description="local/total below this with motion: camera only")
    reject_camera_only: bool = False


def _flow(a: np.ndarray, b: np.ndarray, method: str, preset: str = "fast") -> np.ndarray:
    """A fresh solver a pair: OpenCV's DIS lowers its own finest scale on a small frame and keeps it for the next.
    DIS also crashes the process (segfault, OpenCV 4.14) on frames under 32 rows that are ~100 or more wide, which
    an ultra-wide panorama gives at detection size (2048x240 -> 256x30): Farneback measures those."""
    import cv2

    if method == "dis" and min(a.shape) >= 32:
        return cv2.DISOpticalFlow_create(getattr(cv2, f"DISOPTICAL_FLOW_PRESET_{preset.upper()}")).calc(a, b, None)
    return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)


def _mean_norm(x: np.ndarray, y: np.ndarray) -> float:
    """numpy rather than cv2.magnitude / cv2.mean: with OpenCV's kernels the same planes gave different last digits
    from call to call (where the arrays sat in memory, it seemed), so a clip scored twice did not score the same."""
    return float(np.sqrt(x * x + y * y).mean(dtype=np.float64))


def motion_scores(
    pairs: np.ndarray, valid: np.ndarray, fps: float, method: str = "dis", preset: str = "fast"
) -> dict[str, Any]:
    """Mean flow magnitude, camera part and local part, in diagonals per second, over the valid pairs.

    The camera part is a similarity transform fitted (RANSAC) to the flow on a coarse grid; the local part is what
    is left of the flow once the camera's is taken away. Norms are taken over float32 planes (numpy's norm over a
    stacked float64 axis was most of the cost)."""
    import cv2

    totals, cameras, locals_ = [], [], []
    grid: tuple[np.ndarray, np.ndarray] | None = None
    for (a, b), ok in zip(pairs, valid, strict=True):
        if not ok:
            continue
        h, w = a.shape
        flow = _flow(a, b, method, preset)
        fx, fy = cv2.split(flow)
        per_sec = fps / math.hypot(h, w)
        step = max(1, min(h, w) // 24)
        ys, xs = np.mgrid[step // 2 : h : step, step // 2 : w : step]
        src = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float32)
        dst = src + flow[step // 2 :: step, step // 2 :: step].reshape(-1, 2)
        model, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=1.0)
        totals.append(_mean_norm(fx, fy) * per_sec)
        if model is None:
            cameras.append(0.0)
            locals_.append(totals[-1])
            continue
        if grid is None or grid[0].shape != (h, w):
            gy, gx = np.indices((h, w), dtype=np.float32)
            grid = (gx, gy)
        gx, gy = grid
        d = (model - np.eye(2, 3)).astype(np.float32)  # the identity taken off in float64: scale is 1 +- 1e-5
        cam_x = d[0, 0] * gx + d[0, 1] * gy + d[0, 2]
        cam_y = d[1, 0] * gx + d[1, 1] * gy + d[1, 2]
        cameras.append(_mean_norm(cam_x, cam_y) * per_sec)
        locals_.append(_mean_norm(fx - cam_x, fy - cam_y) * per_sec)
    if not totals:
        raise ValueError("no frame pair inside the clip to measure motion on")
    return {
        "score": float(np.mean(totals)),
        "camera": float(np.mean(cameras)),
        "local": float(np.mean(locals_)),
        "max": float(np.max(totals)),
        "pairs": len(totals),
        # DIS cannot take frames under 32 px on a side (see `_flow`): pairs measured with Farneback instead
        "farneback_pairs": len(totals) if method == "dis" and min(pairs.shape[2:4]) < 32 else 0,
    }


def moving_area(frames: np.ndarray, size: tuple[int, int], level: int = 20) -> float:
    """Median over consecutive samples of the share of pixels whose grey level changes by more than `level` once the
    later sample is shifted back by the camera's drift between them (phase correlation; a tripod creeping or a slow
    push is not something moving), at `size` (w, h), lightly blurred, one-pixel specks removed; 0 for fewer than
    two samples."""
    import cv2

    greys = [
        cv2.GaussianBlur(cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), size, interpolation=cv2.INTER_AREA), (3, 3), 0)
        for f in frames
    ]
    kernel = np.ones((2, 2), np.uint8)
    h, w = greys[0].shape if greys else (0, 0)
    shares = []
    for a, b in itertools.pairwise(greys):
        (dx, dy), _ = cv2.phaseCorrelate(a.astype(np.float32), b.astype(np.float32))
        back = cv2.warpAffine(b, np.float32([[1, 0, -dx], [0, 1, -dy]]), (w, h), borderMode=cv2.BORDER_REPLICATE)
        changed = cv2.morphologyEx((cv2.absdiff(a, back) > level).astype(np.uint8), cv2.MORPH_OPEN, kernel)
        mx, my = min(w // 2, int(abs(dx)) + 2), min(h // 2, int(abs(dy)) + 2)
        inner = changed[my : h - my, mx : w - mx]  # the strip the shift brought in is not a change
        shares.append(float(inner.mean()) if inner.size else 0.0)
    return float(np.median(shares)) if shares else 0.0


class Motion(SampleFilter):
    """Flags near-static clips and camera-only motion (shake/pan with nothing moving in the scene)."""

    name = "motion"
    version = "5"  # 5: norms over float32 planes (scores as 4 to < 1e-4 relative); Farneback where DIS cannot go
    config_class = MotionConfig
    requires = ("clip_samples_path", "clip_fps")
    default_resources = Resources(cpus=0.5, batch_size=8, pool_max=2)
    score_column = "motion_score"

    @property
    def backend(self) -> str:
        m = self.config.method
        return f"embedded:opencv-{m}-{self.config.dis_preset}" if m == "dis" else f"embedded:opencv-{m}"

    def score(self, row: Row, samples: dict[str, np.ndarray]) -> dict[str, Any]:
        idx = pick(len(samples["pairs"]), self.config.max_frames)
        fps = float(row.get("clip_fps") or 25.0)
        c = self.config
        s = motion_scores(samples["pairs"][idx], samples["pair_valid"][idx], fps, c.method, c.dis_preset)
        h, w = samples["pairs"].shape[2:4]
        s["moving_area"] = moving_area(samples["frames"], (w, h), c.change_level)
        s["camera_only"] = bool(
            s["score"] >= self.config.min_score and s["local"] < self.config.camera_only_ratio * s["score"]
        )
        return s

    def decide(self, s: dict[str, Any]) -> tuple[str, str | None]:
        c = self.config
        if s["score"] < c.min_score and s.get("moving_area", 0.0) < c.min_moving_area:
            return "reject", "static"
        if c.max_score is not None and s["score"] > c.max_score:
            return "reject", "too_fast"
        if c.reject_camera_only and s["camera_only"]:
            return "reject", "camera_only"
        return "ok", None

    def thresholds(self) -> dict[str, list[tuple[float, str]]]:
        lines = [(self.config.min_score, "min")]
        if self.config.max_score is not None:
            lines.append((self.config.max_score, "max"))
        return {self.col("score"): lines}
