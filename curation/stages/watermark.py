"""`watermark`: static overlays (logos, channel marks, timestamps) burnt into the picture.

- `embedded`: what stays put across different shots. An overlay is drawn on top of every shot of the video, while
  the scene under it changes from shot to shot, so for each clip (shot) the pixels that are edges in >= `persistence`
  of its samples are found, and an overlay is what is persistent in every one of the video's visually distinct
  shots (shots whose median frames differ by more than `distinct_shots` grey levels). Long straight persistent
  lines (letterbox bars, frame borders) are removed. The score is the largest density of such pixels in a frame
  corner minus the density in the centre. A single shot, or several cut from one fixed camera, is no evidence of an
  overlay (a static background persists too): the score is then 0 and `watermark_distinct_shots` says why.
- `embedded`, inside one shot: what stays put while the camera moves. The camera's motion between the clip's samples
  is tracked (phase correlation, then corners outside the frame's corner zones followed by optical flow, a
  similarity transform fitted with RANSAC, chained between samples); for every pair of samples the camera moved at
  least `min_shift` px between, a pixel *stays* when it differs from the camera-aligned other sample by `stay_level`
  grey levels more than from the unaligned one (the scene moved on, the pixel did not). The stay score is the
  densest patch of pixels that stay in most pairs in a frame corner minus the densest away from the corners (people
  moving on their own and poor camera fits show up all over). Groups of such pixels that reach the frame's edge or
  are bigger than a mark (a quarter of the frame) do not count: a subject the camera follows stays put too. A still
  camera gives no pairs and no evidence; subtitles (`caption` boxes of the `ocr` stage) are left to that stage.
  A half-transparent mark over busy texture lets the scene show through, so it does not stay put; it shows the scene
  passing under it with its contrast cut: over the same pairs, the pixel is a straight-line function of the aligned
  other sample (the scene under it) with a slope of 1 - opacity. Pixels whose fitted slope says a mark of
  `mark_opacity` and whose line explains them (correlation >= 0.9) count as staying too (the scene itself has
  slope 1; water, leaves and people moving on their own fit no line). Each pair's levels are matched first, so an
  exposure change or a fade between samples is not a cut contrast.
- Text marks, whatever the backend: when `ocr` ran before this stage, its `mark` boxes (a clock, a date, a
  copyright or address line, or a name anchored to a side edge of the top or bottom band in the same place in most
  samples) are marks too (`watermark_text_marks`), so a timestamp on a single shot or a fixed camera is found where
  no edge statistic can tell. A graphic mark with no letters on a still camera is left to the reference backend.
- `reference`: the LAION watermark classifier (timm EfficientNet-B3 with a 2-class head, weights
  `watermark_model_v1.pt`), mean probability over the clip's samples.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, field_validator

from curation.errors import require, torch_device
from curation.filters import FilterConfig, SampleFilter, pick
from curation.samples import SAMPLES_COLUMN, cut_sample_paths, median_of
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
    max_stay_score: float = Field(
        0.05, ge=0, description="embedded: reject above this density of pixels that stay put while the camera moves"
    )
    stay_level: float = Field(12.0, gt=0, description="grey levels a staying pixel must beat the aligned scene by")
    min_shift: float = Field(4.0, gt=0, description="camera motion (px at 320 wide) for a pair of samples to count")
    mark_opacity: tuple[float, float] = Field(
        (0.4, 0.85), description="embedded: opacities (low, high) of the half-transparent marks the blend test finds"
    )
    video_frames: int | None = operational(None, description="deprecated (watermark v2), ignored")
    min_change: float | None = operational(None, description="deprecated (watermark v2), ignored")

    @field_validator("mark_opacity")
    @classmethod
    def _opacity_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] < v[1] <= 1:
            raise ValueError(f"watermark.mark_opacity must be two opacities with 0 < low < high <= 1, got {list(v)}")
        return v

    reference_weights: ClassVar[tuple[tuple[str, str], ...]] = (
        ("watermark_model_v1.pt", "github.com/LAION-AI/LAION-5B-WatermarkDetection (release weights)"),
    )


def _video_shots(
    row: Row, own: np.ndarray, shape: tuple[int, int], max_shots: int = 16, greys: dict[str, np.ndarray] | None = None
) -> list[np.ndarray]:
    """Grey samples of every clip of the video's current cut, one array per clip, at a common working size (this
    clip's, `own`, already made from frames of `shape`): the same shots whichever clip asks, so the score is a
    property of the video. Each other clip's greys go into `greys` (by samples path), so that clip's own score,
    which usually comes next, does not grey and resize the same frames again."""
    path = row[SAMPLES_COLUMN]
    shots = []
    paths = cut_sample_paths(row)
    for f in [paths[i] for i in pick(len(paths), max_shots)]:
        if str(f) == str(path):
            shots.append(own)
            continue
        with np.load(f, allow_pickle=False) as z:
            frames = z["frames"]
        if len(frames) and frames.shape[1:3] == shape:  # a shot at another resolution is left out
            g = _work_greys(frames, shape)
            if greys is not None:
                greys[str(f)] = g
            shots.append(g)
    return [g for g in shots if len(g)]


def _work_greys(frames: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Grey samples at the working size (`WORK_WIDTH` wide, for frames of `shape` (h, w))."""
    import cv2

    h, w = shape
    size = (WORK_WIDTH, max(2, round(h * WORK_WIDTH / w)))
    out = [cv2.resize(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), size, interpolation=cv2.INTER_AREA) for x in frames]
    return np.stack(out) if out else np.zeros((0, size[1], size[0]), np.uint8)


def overlay_score(
    shots: list[np.ndarray], persistence: float = 0.75, corner: float = 0.3, distinct: float = 12.0
) -> dict[str, Any]:
    """Corner density of the edges that persist in every visually distinct shot (see the module docstring)."""
    import cv2

    usable = [g for g in shots if len(g) >= 3]  # persistence needs a few samples of the shot
    medians = [median_of(list(g)) for g in usable]
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
    zones = {name: persist[box] for name, box in zip(CORNERS, _corner_boxes(h, w, corner), strict=True)}
    centre = float(persist[ch:-ch, cw:-cw].mean()) if h > 2 * ch and w > 2 * cw else 0.0
    where = max(zones, key=lambda k: float(zones[k].mean()))
    score = max(0.0, float(zones[where].mean()) - centre)
    out.update(score=score, corner=where if score > 0 else None, centre_density=centre)
    return out


CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")  # the order `_corner_boxes` gives them in


def _corner_boxes(h: int, w: int, size: float) -> list[tuple[slice, slice]]:
    """The four corner squares of a frame, `size` of its height and width each."""
    ch, cw = max(1, int(h * size)), max(1, int(w * size))
    top, bottom, left, right = slice(0, ch), slice(h - ch, h), slice(0, cw), slice(w - cw, w)
    return [(top, left), (top, right), (bottom, left), (bottom, right)]


def _camera_shifts(greys: np.ndarray) -> list[tuple[float, float]]:
    """The camera's shift between consecutive samples, in full-size px (phase correlation at half size, the frame's
    edges faded out so a mark in a corner does not pull it to 0; (0, 0) where the picture gives no answer)."""
    import cv2

    small = [cv2.resize(g, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA).astype(np.float32) for g in greys]
    window = cv2.createHanningWindow(small[0].shape[::-1], cv2.CV_32F) if small else None
    out = []
    for a, b in itertools.pairwise(small):
        (dx, dy), response = cv2.phaseCorrelate(a, b, window)
        out.append((2 * dx, 2 * dy) if response >= 0.05 else (0.0, 0.0))
    return out


def _camera_steps(
    greys: np.ndarray, shifts: list[tuple[float, float]], corner: float, min_inliers: float = 0.5
) -> list[np.ndarray | None]:
    """3x3 similarity transforms taking each sample onto the one before it: corners of the picture outside the
    frame's corner zones (where a mark would sit and, being static, drag the fit) tracked with optical flow from the
    phase-correlation `shifts`, fitted with RANSAC; None where the fit is poor (too few corners, under `min_inliers`
    agreeing)."""
    import cv2

    h, w = greys.shape[1:]
    where = np.full((h, w), 255, np.uint8)
    for rows, cols in _corner_boxes(h, w, corner):
        where[rows, cols] = 0
    out: list[np.ndarray | None] = []
    for (a, b), (dx, dy) in zip(itertools.pairwise(greys), shifts, strict=True):
        pts = cv2.goodFeaturesToTrack(b, 200, 0.01, 8, mask=where)
        m = None
        if pts is not None and len(pts) >= 12:
            guess = (pts - np.float32([dx, dy])).astype(np.float32)
            moved, found, _ = cv2.calcOpticalFlowPyrLK(b, a, pts, guess, winSize=(15, 15), maxLevel=1,
                                                       flags=cv2.OPTFLOW_USE_INITIAL_FLOW)  # fmt: skip
            ok = found.ravel() == 1
            if ok.sum() >= 12:
                fit, inliers = cv2.estimateAffinePartial2D(pts[ok], moved[ok], method=cv2.RANSAC,
                                                           ransacReprojThreshold=1.5)  # fmt: skip
                if fit is not None and float(inliers.mean()) >= min_inliers:
                    m = np.vstack([fit, [0.0, 0.0, 1.0]])
        out.append(m)
    return out


def _pair_transforms(steps: list[np.ndarray | None]) -> Iterator[tuple[int, int, np.ndarray]]:
    """(i, j, transform taking sample j onto sample i) for every i < j the chain of consecutive `steps` reaches
    (it breaks at a poor fit)."""
    for i in range(len(steps) + 1):
        t = np.eye(3)
        for j in range(i + 1, len(steps) + 1):
            step = steps[j - 1]
            if step is None:
                break
            t = t @ step  # j -> j-1 -> ... -> i
            yield i, j, t


def stay_evidence(
    greys: np.ndarray,
    level: float = 12.0,
    min_shift: float = 4.0,
    corner: float = 0.3,
    opacity: tuple[float, float] = (0.4, 0.85),
) -> tuple[np.ndarray, int]:
    """Per pixel, the share of sample pairs (the camera moved >= `min_shift` px between them) in which the pixel
    stayed put while the scene moved on: its grey level differs from the other sample brought into line with it by
    `level` more than from the other sample as it is (and the same the other way round, by any amount). Pixels seen
    by fewer than 3 such pairs, and a 4 px frame border, get 0; so does everything when the camera does not travel
    `min_shift` px over the samples (a still camera: no evidence). Pixels the blend test (`_blend_fit`) calls a
    half-transparent mark of `opacity` get 1."""
    import cv2

    n, h, w = greys.shape
    share = np.zeros((h, w), np.float32)
    if n < 3:
        return share, 0
    shifts = _camera_shifts(greys)
    path = np.vstack([[0.0, 0.0], np.cumsum(shifts, axis=0)])
    if float(np.ptp(path, axis=0).max()) < min_shift:  # skips the tracking for a still camera
        return share, 0
    probe = np.float64([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1], [w / 2, h / 2, 1]]).T
    # 8-bit images: warps and differences cheaper than on floats, which pays for the blend sums below
    blurred = np.stack([cv2.GaussianBlur(g, (3, 3), 0) for g in greys])
    frame = np.full((h, w), 255, np.uint8)
    corners = np.float64([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]])
    kernel = np.ones((5, 5), np.uint8)
    steps = _camera_steps(greys, shifts, corner)
    stayed = np.zeros((h, w), np.uint16)
    seen = np.zeros((h, w), np.uint16)
    # count, x, y, xx, yy, xy of (aligned other sample, pixel); grey levels centred on 0 keep float32 sums exact
    # enough (8 samples: 56 observations a pixel)
    sums = np.zeros((6, h, w), np.float32)
    grey = blurred.astype(np.float32) - 128.0
    pairs = 0
    for i, j, t in _pair_transforms(steps):
        if float(np.abs(t[:2] @ probe - probe[:2]).max()) < min_shift:
            continue
        # A pixel of i stays when j brought onto i differs from it by `level` more than j as it is. Checked the
        # other way too (i brought onto j, at least no closer than i as it is), because the mark's own image carried
        # by the warp lands beside the mark (a ghost, clear on a flat scene) and differs from i one way only.
        still = cv2.absdiff(blurred[i], blurred[j]).astype(np.int16)
        valid = frame
        stays = np.ones((h, w), bool)
        for a, other, m in ((i, j, t[:2]), (j, i, cv2.invertAffineTransform(t[:2]))):
            aligned = cv2.warpAffine(blurred[other], m, (w, h), flags=cv2.INTER_LINEAR)
            # where the other sample saw this pixel (its frame's outline carried over), 2 px in from the edge
            outline = (corners @ m[:, :2].T + m[:, 2]) * 16
            inside = cv2.erode(cv2.fillConvexPoly(np.zeros((h, w), np.uint8), outline.astype(np.int32), 255, 8, 4),
                               kernel)  # fmt: skip
            valid = cv2.bitwise_and(valid, inside)
            stays &= cv2.absdiff(blurred[a], aligned).astype(np.int16) - still >= (level if a == i else 0.0)
            # The blend test compares levels across samples: an exposure or fade between them would read as a cut
            # contrast everywhere, so the other sample is brought to this one's mean and spread over what both see.
            (mx,), (sx,) = cv2.meanStdDev(aligned, mask=inside)
            (my,), (sy,) = cv2.meanStdDev(blurred[a], mask=inside)
            gain = float(sy[0]) / max(float(sx[0]), 1e-3)
            shift = float(my[0]) - gain * float(mx[0]) - 128.0
            x = cv2.addWeighted(aligned, gain, aligned, 0.0, shift, dtype=cv2.CV_32F)
            cv2.accumulate(inside, sums[0], inside)
            cv2.accumulate(x, sums[1], inside)
            cv2.accumulate(grey[a], sums[2], inside)
            cv2.accumulateSquare(x, sums[3], inside)
            cv2.accumulateSquare(grey[a], sums[4], inside)
            cv2.accumulateProduct(x, grey[a], sums[5], inside)
        stayed += stays & (valid > 0)
        seen += valid > 0
        pairs += 1
    sums[0] /= 255  # `inside` is 255 where seen
    share = np.where(seen >= 3, stayed / np.maximum(seen, 1), 0.0).astype(np.float32)
    share = np.maximum(share, _blend_fit(sums, level, opacity).astype(np.float32))
    b = 4
    share[:b] = 0
    share[-b:] = 0
    share[:, :b] = 0
    share[:, -b:] = 0
    return share, pairs


def _blend_fit(sums: np.ndarray, level: float, opacity: tuple[float, float], min_corr: float = 0.9) -> np.ndarray:
    """Where the pixel (y) follows the scene under it (x, the other sample brought into line) as a mark of `opacity`
    drawn over it makes it: y = o * mark + (1 - o) * x, a line of slope 1 - o. Over at least 6 (pixel, aligned
    sample) observations where the scene under the pixel varied by `level` grey levels or more (a flat scene cannot
    show a blend), the least-squares slope must say an opacity in the range and the line must explain the pixel
    (correlation >= `min_corr`). The scene has slope 1; things that move on their own, and a still camera's
    misalignment, fit no line; a mark too opaque to let the scene through is the stay test's."""
    count, sx, sy, sxx, syy, sxy = sums
    k = 1 / np.maximum(count, 1)
    mx, my = sx * k, sy * k
    vx, vy, cxy = sxx * k - mx * mx, syy * k - my * my, sxy * k - mx * my
    low, high = 1 - opacity[1], 1 - opacity[0]
    # slope = cxy / vx in [low, high], written without the division (vx > 0 where it counts)
    in_range = (cxy >= low * vx) & (cxy <= high * vx)
    fits = cxy * cxy >= min_corr**2 * vx * np.maximum(vy, 1e-6)
    return (count >= 6) & (vx >= level**2) & in_range & fits


def stay_score(
    share: np.ndarray,
    corner: float = 0.2,
    apart: float = 0.35,
    window: float = 0.08,
    most: float = 0.7,
    max_size: float = 0.25,
) -> dict[str, Any]:
    """Densest `window`-wide patch (a fraction of the width) of pixels that stayed in `most` of their pairs inside a
    frame corner (`corner` of height and width), minus the densest one away from the corners (beyond `apart`).
    Groups of such pixels that reach the frame's edge, or are taller or wider than `max_size` of the frame, are not
    counted: a mark is small and drawn inset, while a subject the camera follows is bigger or further in, and
    foreground it carries along (a bonnet, a pillar) reaches in from the edge."""
    import cv2

    h, w = share.shape
    strong = cv2.morphologyEx((share >= most).astype(np.uint8), cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
    # grouped with their neighbours within a few px, so the pieces of one object are judged as the object
    _, labels, stats, _ = cv2.connectedComponentsWithStats(cv2.dilate(strong, np.ones((7, 7), np.uint8)))
    x, y, bw, bh = stats[:, 0] + 3, stats[:, 1] + 3, stats[:, 2] - 6, stats[:, 3] - 6  # the group's own extent
    m = 5  # px: the zeroed 4 px border and the first px or two inside it
    drop = (x <= m) | (y <= m) | (x + bw >= w - m) | (y + bh >= h - m) | (bh > max_size * h) | (bw > max_size * w)
    drop[0] = True  # the background label
    strong[drop[labels]] = 0
    k = max(3, round(window * w))
    density = cv2.boxFilter(strong.astype(np.float32), -1, (k, k), borderType=cv2.BORDER_CONSTANT)
    peaks = {name: float(density[box].max()) for name, box in zip(CORNERS, _corner_boxes(h, w, corner), strict=True)}
    elsewhere = density.copy()
    for box in _corner_boxes(h, w, apart):
        elsewhere[box] = 0
    where = max(peaks, key=lambda z: peaks[z])
    score = max(0.0, peaks[where] - float(elsewhere.max()))
    return {"stay_score": score, "stay_corner": where if score > 0 else None}


def _caption_mask(boxes_json: str | None, shape: tuple[int, int]) -> np.ndarray | None:
    """Where the ocr stage read subtitles (`caption` boxes): they come and go in place, and they are judged there.
    Other text it did not call a mark is left in: scene text moves with the scene, and overlay text ocr could not
    place is what this check is for."""
    import cv2

    boxes = [b for b in json.loads(boxes_json) if b.get("kind") == "caption"] if boxes_json else []
    if not boxes:
        return None
    h, w = shape
    mask = np.zeros((h, w), np.uint8)
    for b in boxes:
        pts = np.array([[x * w, y * h] for x, y in b["box"]], np.int32)
        cv2.fillPoly(mask, [pts], 1)
    return cv2.dilate(mask, np.ones((5, 5), np.uint8)) > 0


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
    version = "6"
    config_class = WatermarkConfig
    requires = ("clip_samples_path",)
    optional_requires = ("ocr_boxes",)
    default_resources = Resources(cpus=0.5, batch_size=8, pool_max=2)
    gpu_backends: ClassVar[dict[str, float]] = {"reference": 0.25}
    backend_names: ClassVar[dict[str, str]] = {
        "embedded": "edge-persistence+camera-stay",
        "reference": "laion-watermark-v1",
    }
    score_column = "watermark_score"

    def setup(self, ctx: StageContext) -> None:
        self._ref = _LaionWatermark(self.config, self.resources().gpus) if self.config.backend == "reference" else None
        self._cache: dict[tuple[str, ...], dict[str, Any]] = {}
        self._greys: dict[str, np.ndarray] = {}  # other clips' greys made while gathering a video's shots

    def score(self, row: Row, samples: dict[str, np.ndarray]) -> dict[str, Any]:
        marks = text_marks(row.get("ocr_boxes"))
        found = {"text_marks": sorted({m for m in marks if m}), "text_mark_boxes": len(marks)}
        frames = samples["frames"]
        frames = frames[pick(len(frames), self.config.max_frames)]  # the cap both backends honour
        if self._ref is not None:
            stay = {"stay_score": None, "stay_corner": None, "stay_pairs": None}
            return {**self._ref(frames), **stay, **found}
        greys = self._own_greys(row, samples["frames"])  # once, for both checks
        return {**self._visual(row, greys, frames.shape[1:3]), **self._stay(row, greys), **found}

    def _own_greys(self, row: Row, frames: np.ndarray) -> np.ndarray:
        """This clip's scored samples in grey at the working size: taken from what another clip of the video made
        of the same file when it gathered the video's shots (greying is per frame, so the values are the same)."""
        idx = pick(len(frames), self.config.max_frames)
        done = self._greys.pop(str(row[SAMPLES_COLUMN]), None)
        if done is not None and len(done) == len(frames):
            return done[idx]
        return _work_greys(frames[idx], frames.shape[1:3])

    def _stay(self, row: Row, greys: np.ndarray) -> dict[str, Any]:
        c = self.config
        share, pairs = stay_evidence(greys, c.stay_level, c.min_shift, c.corner, c.mark_opacity)
        captions = _caption_mask(row.get("ocr_boxes"), share.shape)
        if captions is not None:
            share[captions] = 0
        return {**stay_score(share), "stay_pairs": pairs}

    def _visual(self, row: Row, greys: np.ndarray, shape: tuple[int, int]) -> dict[str, Any]:
        # The score is a property of the whole video's samples: computed once per video, not once per clip.
        key = tuple(str(p) for p in cut_sample_paths(row))
        if key not in self._cache:
            c = self.config
            shots = _video_shots(row, greys, shape, c.max_shots, self._greys)
            if len(self._cache) >= 32:  # inputs come in clip-id order, videos interleaved: keep several
                self._cache.pop(next(iter(self._cache)))
            while len(self._greys) > 64:  # a clip that never comes to this worker: bounded, oldest out
                self._greys.pop(next(iter(self._greys)))
            self._cache[key] = overlay_score(shots, c.persistence, c.corner, c.distinct_shots)
        return dict(self._cache[key])

    def decide(self, s: dict[str, Any]) -> tuple[str, str | None]:
        if self.config.text_marks and s.get("text_mark_boxes"):
            return "reject", "watermark"
        if "probability" in s:
            return ("reject", "watermark") if s["probability"] > self.config.max_probability else ("ok", None)
        visual = s["score"] > self.config.max_score or (s.get("stay_score") or 0.0) > self.config.max_stay_score
        return ("reject", "watermark") if visual else ("ok", None)

    def thresholds(self) -> dict[str, list[tuple[float, str]]]:
        c = self.config
        if c.backend == "reference":
            return {self.col("score"): [(c.max_probability, "max")]}
        return {self.col("score"): [(c.max_score, "max")], self.col("stay_score"): [(c.max_stay_score, "max")]}
