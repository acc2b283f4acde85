"""Mask tracks as COCO RLE (pycocotools): compact, exact, and readable by every segmentation tool.

A track is stored as JSON: `{"width", "height", "frames": [clip-relative frame indices], "tracks": {k: [rle...]}}`,
one RLE per frame per subject (`counts` as an ASCII string so it survives JSON), frames aligned with the clip's mp4.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pycocotools import mask as _coco


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """Binary HxW mask -> COCO RLE with a JSON-safe `counts` string."""
    rle = _coco.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (counts as str or bytes) -> HxW uint8 mask of 0/1."""
    counts = rle["counts"]
    return _coco.decode({"size": list(rle["size"]), "counts": counts.encode() if isinstance(counts, str) else counts})


def rle_area(rle: dict[str, Any]) -> int:
    counts = rle["counts"]
    return int(
        _coco.area({"size": list(rle["size"]), "counts": counts.encode() if isinstance(counts, str) else counts})
    )


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight (x1, y1, x2, y2) box of a mask, exclusive ends; None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def box_iou(a: Any, b: Any) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def decode_track(doc: dict[str, Any], k: int | str) -> np.ndarray:
    """One subject's masks as a (frames, height, width) uint8 array."""
    return np.stack([rle_decode(r) for r in doc["tracks"][str(k)]])
