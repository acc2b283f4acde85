"""Body regions of a person from its mask and face box: where an attribute such as "blue jeans" or "long black hair"
can be seen, without a detector for the attribute itself (the embedded backend).

Heights are measured in head heights from the chin: a standing adult is about 7-8 heads tall, the torso ends about
2.5 heads below the chin and the legs take the rest. Without a face the head height is the mask's height over 7.5,
which only holds for a whole, upright person, so a person cut by the frame's bottom edge and seen without a face
gets no region that depends on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from curation.masks import mask_box

REGIONS = ("head", "upper", "lower", "feet", "hands", "full")
_WORDS = Path(__file__).resolve().parent / "regions.txt"


@lru_cache(maxsize=1)
def region_words() -> dict[str, str]:
    """word -> region, from `regions.txt` (data, so the list grows without code)."""
    out: dict[str, str] = {}
    for n, line in enumerate(_WORDS.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        region, _, words = line.partition(":")
        region = region.strip()
        if region not in REGIONS:
            raise ValueError(f"regions.txt:{n}: unknown region {region!r} (one of {', '.join(REGIONS)})")
        for w in words.split():
            out[w.lower()] = region
    return out


def attribute_region(phrase: str) -> str | None:
    """The region an attribute phrase shows: its last word that the list knows ("red baseball cap" -> head)."""
    words = region_words()
    for w in reversed(re.findall(r"[a-z][a-z-]*", phrase.lower())):
        if w in words:
            return words[w]
        if w.endswith("s") and w[:-1] in words:
            return words[w[:-1]]
    return None


@dataclass(frozen=True)
class Body:
    """A person's mask box and head geometry on one frame, in the mask's pixels (whatever its size)."""

    box: tuple[int, int, int, int]
    chin: float
    head: float  # head height
    face: tuple[float, float, float, float] | None
    cut_below: bool  # the mask reaches the frame's bottom edge: legs/feet may be out of view


def body(mask: np.ndarray, face: tuple[float, float, float, float] | None) -> Body | None:
    b = mask_box(mask)
    if b is None:
        return None
    _, y0, _, y1 = b
    cut_below = y1 >= mask.shape[0] - 2
    if face is not None:
        head = (face[3] - face[1]) * 1.15
        chin = face[3]
    else:
        if cut_below:  # no face and no feet: nothing to measure the body by
            return Body(b, float("nan"), float("nan"), None, cut_below)
        head = (y1 - y0) / 7.5
        chin = y0 + head
    return Body(b, float(chin), float(head), face, cut_below)


def region_mask(mask: np.ndarray, bd: Body, region: str) -> np.ndarray | None:
    """The part of the person's mask that shows `region`, or None when that part is not in view."""
    _, y0, _, y1 = bd.box
    h, chin = bd.head, bd.chin
    if np.isnan(h):
        return None
    rows = np.arange(mask.shape[0])[:, None]
    cols = np.arange(mask.shape[1])[None, :]
    if region == "head":
        lo, hi = y0, chin + 0.1 * h
        band = (rows >= lo) & (rows < hi)
        if bd.face is not None:  # hair and hats reach past the face's sides, not across the whole mask
            fw = bd.face[2] - bd.face[0]
            band = band & (cols >= bd.face[0] - 0.8 * fw) & (cols < bd.face[2] + 0.8 * fw)
    elif region == "upper":
        lo, hi = chin, chin + 2.7 * h
        band = (rows >= lo) & (rows < hi)
    elif region == "hands":  # where hands hang or hold things: the band from the chest to the thighs
        lo, hi = chin + 1.5 * h, chin + 4.0 * h
        band = (rows >= lo) & (rows < hi)
    elif region == "full":
        lo, hi = chin, y1 + 1
        band = rows >= lo
    elif region == "lower":
        lo, hi = chin + 2.4 * h, y1 + 1
        if hi - lo < 1.0 * h:
            return None
        band = rows >= lo
    elif region == "feet":
        if bd.cut_below or (y1 - chin) < 5.0 * h:  # feet out of view, or the legs are not all there
            return None
        lo, hi = y1 - 0.8 * h, y1 + 1
        band = rows >= lo
    else:
        raise ValueError(f"unknown region {region!r}")
    out = (mask > 0) & band
    need = max(64, int(0.03 * (mask > 0).sum()))
    return out.astype(np.uint8) if int(out.sum()) >= need else None
