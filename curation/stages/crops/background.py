"""Background plates: the scene without its subjects, for generators that take the background as a reference.

Embedded: the per-pixel temporal median of the clip's tracked frames, each frame's subjects masked out (their masks
dilated, so soft edges and shadows next to a subject stay out too). A pixel no frame shows free of subjects is painted
from its surroundings (OpenCV's Telea inpainting; the reference backend: LaMa) and counts against `coverage`. The
plate only means something when the camera holds still: `residual` (the median over frames of the mean absolute
difference between a frame and the plate where that frame shows background, in 8-bit levels) is small then, and
large for a moving camera.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from curation.samples import masked_median_of


@dataclass(frozen=True)
class Plate:
    image: np.ndarray  # BGR uint8
    coverage: float  # share of pixels seen free of subjects in at least one frame
    residual: float  # median over frames of the mean |frame - plate| on that frame's background, 8-bit levels
    usable: int  # frames that show enough background (5%) to measure the residual on; fewer than 3: inf


MIN_FRAMES = 3  # with one or two frames the median is (nearly) the frame itself: no evidence the camera holds still


def subject_free(masks: list[np.ndarray], dilate_px: int) -> np.ndarray:
    """True where no subject is, for one frame (masks at frame size)."""
    import cv2

    if not masks:
        return np.ones((0, 0), bool)
    union = np.zeros(masks[0].shape, np.uint8)
    for m in masks:
        union |= (m > 0).astype(np.uint8)
    if dilate_px > 0:
        k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1, 2 * dilate_px + 1))
        union = cv2.dilate(union, k)
    return union == 0


def telea(bgr: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Fill `hole` (uint8, 255 = fill) from its surroundings (OpenCV's Telea method): the embedded fill."""
    import cv2

    return cv2.inpaint(bgr, hole, 5, cv2.INPAINT_TELEA)


def median_plate(
    frames: list[np.ndarray], free: list[np.ndarray], fill: Callable[[np.ndarray, np.ndarray], np.ndarray] = telea
) -> Plate:
    """The plate from frames (BGR, one size) and where each shows background (bool, frame size); `fill` paints
    what no frame shows (the reference backend passes an inpainting model)."""
    import cv2

    seen = np.logical_or.reduce(free)
    med = masked_median_of(frames, free)  # NaN where no frame shows background: filled below
    med = np.nan_to_num(med, nan=0.0).clip(0, 255).astype(np.uint8)
    if not seen.all():
        hole = (~seen).astype(np.uint8) * 255
        med = fill(med, hole)
    diffs = []
    grey = cv2.cvtColor(med, cv2.COLOR_BGR2GRAY).astype(np.float32)
    for f, m in zip(frames, free, strict=True):
        if m.sum() < 0.05 * m.size:
            continue
        g = cv2.cvtColor(f, cv2.COLOR_BGR2GRAY).astype(np.float32)
        diffs.append(float(np.abs(g - grey)[m].mean()))
    residual = float(np.median(diffs)) if len(diffs) >= MIN_FRAMES else float("inf")
    return Plate(med, float(seen.mean()), residual, len(diffs))
