"""`ocr`: burnt-in text (subtitles, captions, timestamps, channel names, copyright lines), and how much of the
frame any text covers.

Per sample frame, the area of the detected text boxes divided by the frame area; the clip's score is the maximum
over its samples (`ocr_text_area`). Recognised strings and their boxes (normalised to [0, 1]) are recorded too.

Text in the scene (a shop sign, letters on a shirt) is part of the picture; text drawn over it is not, whatever its
size. A box counts as drawn over the picture (`kind` in `ocr_boxes`) from where it sits and what it says, not from
its size, because a small clock is as much an overlay as two lines of subtitles:
- `mark`: in the top or bottom band of the frame (`band`), and either reading as a clock or a date, or anchored to
  the left or right edge (`edge`: the title-safe margin) or in the same place in most samples while reading as a
  copyright / address line, or anchored and in the same place (channel names, credits);
- `caption`: a line of words centred in the bottom band, in at least two samples (subtitles come and go).
The top and bottom bands are contrast-equalised before detection (`lift_bands`): a pale clock on a bright sky is
below what the detector sees as it is. A clip is rejected for text when it has a `mark` or `caption` box, or when
any text covers more than `max_text_area` of a frame (title cards; scene text that fills the picture). Without
recognition (`recognise: false`) only position can tell: marks need the same place in most samples, captions any
text.

- `embedded`: rapidocr with the PP-OCR detection/recognition ONNX models shipped inside its wheel (onnxruntime, CPU).
- `reference`: PaddleOCR (the `gpu` extra), models read from `models_dir`.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from curation.errors import require
from curation.filters import FilterConfig, SampleFilter, pick
from curation.logs import tame_third_party
from curation.stage import Resources, Row, StageContext, operational

log = logging.getLogger(__name__)


class OcrConfig(FilterConfig):
    max_text_area: float = Field(
        0.25,
        ge=0,
        le=1,
        description="reject when text of any kind covers more of a frame than this (title cards; text drawn over the "
        "picture is rejected at any size, see the module docstring)",
    )
    band: float = Field(0.2, gt=0, le=0.5, description="top and bottom bands where overlays sit, share of the height")
    edge: float = Field(
        0.1, ge=0, le=0.5, description="a mark sits within this share of the left or right edge (broadcast title-safe)"
    )
    centre: float = Field(0.06, ge=0, le=0.5, description="a caption line's middle is this close to the frame's")
    reject_overlays: bool = Field(True, description="reject clips with text drawn over the picture (mark, caption)")
    max_frames: int = Field(4, ge=1, le=64)
    min_box_score: float = Field(
        0.85,
        ge=0,
        le=1,
        description="boxes recognised with less confidence are ignored (the recogniser reads "
        "single glyphs into textures at 0.5-0.8; real text scores > 0.9)",
    )
    tall_box: float = Field(
        0.3, gt=0, le=1, description="boxes taller than this share of the frame must read as words to count"
    )
    max_box_height: float | None = operational(None, description="deprecated (ocr v3): see tall_box")
    overlay_frames: float = Field(
        0.75, gt=0, le=1, description="a box in the same place in this share of the sampled frames is overlay-like"
    )
    tall_min_chars: int = Field(
        2, ge=1, description="letters or digits a tall box must read as (the recogniser turns textures into a glyph)"
    )
    detect_side: int = Field(
        384,
        ge=64,
        description="detector input long side; recognition still reads the full-size sample. 384 finds every "
        "text box 512 finds on the labelled media at 40% of the cost; 256 misses subtitles",
    )
    recognise: bool = Field(True, description="also recognise the text (detection alone gives the area)")
    lift_bands: float = Field(
        3.0,
        ge=0,
        description="local contrast equalisation (CLAHE clip limit) of the top and bottom bands before detection, so "
        "a pale clock on a bright sky is found; 0: off",
    )
    threads: int | None = operational(
        None,
        ge=0,
        description="onnxruntime threads per worker; null: a Ray actor's CPUs (resources.cpus rounded up), a thread "
        "per core in-process; 0: a thread per core. Per core cuts one worker's wall by 15% for 80% more CPU, which "
        "parallel workers pay for",
    )
    det_model: str = Field("PP-OCRv5_server_det", description="reference: PaddleOCR 3 text detection model name")
    rec_model: str = Field("PP-OCRv5_server_rec", description="reference: PaddleOCR 3 text recognition model name")
    # > 0: PaddleX reads its thresholds as `value or default`, so a 0 would silently become the default
    det_thresh: float | None = Field(
        None, gt=0, le=1, description="reference: PaddleOCR's text_det_thresh (pixel score); null: its default (0.3)"
    )
    det_box_thresh: float | None = Field(
        None, gt=0, le=1, description="reference: PaddleOCR's text_det_box_thresh (box score); null: its default (0.6)"
    )
    mkldnn: bool = operational(
        False,
        description="reference on a CPU: PaddlePaddle's oneDNN kernels (faster, but paddlepaddle 3.3.0/3.3.1 fail "
        "under them on every PP-OCR model, 'ConvertPirAttribute2RuntimeAttribute not support', Paddle issue 77340; "
        "3.2.2 works)",
    )
    reference_weights: ClassVar[tuple[tuple[str, str], ...]] = (
        ("paddleocr", "PaddleOCR 3's official inference models (huggingface.co/PaddlePaddle/<model name>)"),
    )

    def weights(self) -> tuple[tuple[str, str], ...]:
        """One folder per model, named like the model (what PaddleOCR 3 downloads into ~/.paddlex/official_models)."""
        return tuple(
            (
                f"paddleocr/{m}",
                f"huggingface.co/PaddlePaddle/{m} (or PaddleOCR 3's download), into models_dir/paddleocr",
            )
            for m in (self.det_model, self.rec_model)
        )


Box = list[list[float]]


def _threads(cfg: OcrConfig, ctx: StageContext) -> int:
    """onnxruntime's intra-op thread count (-1: its default, a thread per core)."""
    if cfg.threads is not None:
        return cfg.threads or -1
    return ctx.threads or -1


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def _enum(value: Any) -> str:
    return str(getattr(value, "value", value))


class _RapidOcr:
    def __init__(self, cfg: OcrConfig, ctx: StageContext) -> None:
        RapidOCR = require("rapidocr", "ocr backend embedded", "pip install rapidocr").RapidOCR

        # rapidocr adds a console handler when imported and logs INFO while loading and a WARNING for every frame
        # without text: its records go through the root logger (the run's log file) from here on
        tame_third_party()
        self.engine = RapidOCR(
            params={
                "Det.limit_type": "max",
                "Det.limit_side_len": cfg.detect_side,
                "EngineConfig.onnxruntime.intra_op_num_threads": _threads(cfg, ctx),
            }
        )
        self.cfg = cfg
        # rapidocr's releases change the models they ship (3.10: PP-OCRv6 small): the manifest names them
        det, rec = self.engine.cfg.Det, self.engine.cfg.Rec
        self.name = (
            f"rapidocr-{_version('rapidocr')}:{_enum(det.ocr_version)}-{_enum(det.model_type)}-det"
            f"+{_enum(rec.ocr_version)}-{_enum(rec.model_type)}-rec(onnx)"
        )

    def __call__(self, rgb: np.ndarray) -> list[tuple[Box, str, float]]:
        res = self.engine(rgb, use_cls=False, use_rec=self.cfg.recognise)
        if res.boxes is None:
            return []
        txts = res.txts or ("",) * len(res.boxes)
        scores = res.scores or (1.0,) * len(res.boxes)
        return [(b.tolist(), t, float(s)) for b, t, s in zip(res.boxes, txts, scores, strict=True)]


class _PaddleOcr:
    """PaddleOCR 3: detection + recognition only (the document orientation, unwarping and text-line orientation
    sub-models are off: they are for scanned pages, and they would download at start), models read from
    models_dir/paddleocr/<model name>."""

    def __init__(self, cfg: OcrConfig, gpus: float) -> None:
        PaddleOCR = require("paddleocr", "ocr backend reference").PaddleOCR

        root = f"{cfg.models_dir}/paddleocr"
        self.engine = PaddleOCR(
            text_detection_model_name=cfg.det_model,
            text_detection_model_dir=f"{root}/{cfg.det_model}",
            text_recognition_model_name=cfg.rec_model,
            text_recognition_model_dir=f"{root}/{cfg.rec_model}",
            use_doc_orientation_classify=False,
            use_doc_unwarping=False,
            use_textline_orientation=False,
            device="gpu:0" if gpus > 0 else "cpu",
            enable_mkldnn=cfg.mkldnn,
            **{
                k: v
                for k, v in (("text_det_thresh", cfg.det_thresh), ("text_det_box_thresh", cfg.det_box_thresh))
                if v is not None
            },
        )

    def __call__(self, rgb: np.ndarray) -> list[tuple[Box, str, float]]:
        return paddle_boxes(self.engine.predict(np.ascontiguousarray(rgb[..., ::-1])))


def paddle_boxes(results: Any) -> list[tuple[Box, str, float]]:
    """PaddleOCR 3's `predict` output (one result mapping per image, with `rec_polys`, `rec_texts`, `rec_scores`)
    -> (4-point box, text, score) per recognised line."""
    out = []
    for res in results or []:
        polys, texts, scores = res["rec_polys"], res["rec_texts"], res["rec_scores"]
        for poly, text, score in zip(polys, texts, scores, strict=True):
            out.append(([[float(x), float(y)] for x, y in np.asarray(poly).reshape(-1, 2)], str(text), float(score)))
    return out


def _rect(box: dict[str, Any]) -> tuple[float, float, float, float]:
    xs, ys = [p[0] for p in box["box"]], [p[1] for p in box["box"]]
    return min(xs), min(ys), max(xs), max(ys)


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ix, iy = max(0.0, min(a[2], b[2]) - max(a[0], b[0])), max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


MONTHS = r"(jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?"
CLOCK = re.compile(
    r"(?<![\d.])\d{1,2}\s?:\s?\d{2}(\s?:\s?\d{2})?(?![\d.])"  # 12:30, 12:30:07 (colons: "02.45.67" is a phone)
    r"|\d{4}\s?[-/.]\s?\d{1,2}\s?[-/.]\s?\d{1,2}"  # 2023-04-18
    r"|(?<![\d.])\d{1,2}[-/]\d{1,2}[-/](\d{4}|\d{2}\b)|(?<![\d.])\d{1,2}\.\d{1,2}\.\d{4}"  # 18/04/23, 18.04.2023
    rf"|\b{MONTHS}\s?\d{{1,2}},?\s?\d{{4}}|\b\d{{1,2}}\s?{MONTHS}\s?\d{{4}}",  # APR 18 2023, 18 Apr 2023
    re.IGNORECASE,
)
CREDIT = re.compile(r"\(c\)|©|copyright|all rights|photo\s?by|www\.|https?:|\.[a-z]{2,4}\b/?$|^@\w", re.IGNORECASE)


def lift_bands(rgb: np.ndarray, band: float, clip_limit: float) -> np.ndarray:
    """The frame with the lightness of its top and bottom `band` equalised locally (CLAHE): overlays sit there and
    are often pale on a bright sky or dark on shadow, below what the detector sees; the middle is left as it is."""
    if clip_limit <= 0:
        return rgb
    import cv2

    out = rgb.copy()
    h = rgb.shape[0]
    k = max(1, int(h * band))
    clahe = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(8, 2))
    for rows in (slice(0, k), slice(h - k, h)):
        lab = cv2.cvtColor(np.ascontiguousarray(rgb[rows]), cv2.COLOR_RGB2LAB)
        lab[..., 0] = clahe.apply(lab[..., 0])
        out[rows] = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    return out


def classify_overlays(
    boxes: list[dict[str, Any]], n_frames: int, band: float, edge: float, centre: float = 0.06
) -> None:
    """Set each box's `kind`: `mark`, `caption` or None (scene text), from where it sits and what it reads (see the
    module docstring); needs the `overlay` (same place in most samples) flags set first."""
    centred_frames: set[int] = set()
    geo = []
    for b in boxes:
        x0, y0, x1, y1 = _rect(b)
        in_band = y1 <= band or y0 >= 1 - band
        words = len(re.findall(r"\w+", b["text"]))
        # words: recognised words, or any line when nothing was read (detection only)
        centred = in_band and y0 >= 1 - band and abs((x0 + x1) / 2 - 0.5) <= centre and (words >= 2 or not b["text"])
        if centred:
            centred_frames.add(b["frame"])
        geo.append((in_band, x0 <= edge or x1 >= 1 - edge, centred))
    need_captions = 2 if n_frames > 1 else 1
    for b, (in_band, anchored, centred) in zip(boxes, geo, strict=True):
        kind = None
        credit = bool(CREDIT.search(b["text"])) and (anchored or b["overlay"])  # not a web address on a passing van
        if in_band and (CLOCK.search(b["text"]) or credit or (anchored and b["overlay"])):
            kind = "mark"
        elif centred and len(centred_frames) >= need_captions:
            kind = "caption"
        b["kind"] = kind


def _mark_overlays(boxes: list[dict[str, Any]], n_frames: int, share: float) -> float:
    """Mark each box `overlay` when a box covers the same place (IoU >= 0.5) in at least `share` of the sampled
    frames: captions, timestamps and channel names stay put while the picture moves; text on things in the scene
    moves with them (a fixed camera makes both stay put: then this tells nothing). Returns the largest overlay area
    of a frame (normalised box areas summed)."""
    rects = [_rect(b) for b in boxes]
    frames = [b["frame"] for b in boxes]
    need = max(2, round(share * n_frames)) if n_frames > 1 else n_frames + 1
    per_frame: dict[int, float] = {}
    for i, (b, r) in enumerate(zip(boxes, rects, strict=True)):
        seen = {frames[j] for j, q in enumerate(rects) if _iou(r, q) >= 0.5}
        b["overlay"] = len(seen) >= need
        if b["overlay"]:
            per_frame[frames[i]] = per_frame.get(frames[i], 0.0) + (r[2] - r[0]) * (r[3] - r[1])
    return round(max(per_frame.values(), default=0.0), 5)


class Ocr(SampleFilter):
    name = "ocr"
    version = "7"
    config_class = OcrConfig
    requires = ("clip_samples_path",)
    default_resources = Resources(cpus=0.5, batch_size=4, pool_max=2)
    gpu_backends: ClassVar[dict[str, float]] = {"reference": 0.5}
    backend_names: ClassVar[dict[str, str]] = {"embedded": "rapidocr-ppocr-onnx", "reference": "paddleocr"}
    score_column = "ocr_text_area"
    columns: ClassVar[dict[str, str]] = {"ocr_boxes": "VARCHAR"}  # watermark reads them

    def setup(self, ctx: StageContext) -> None:
        ref = self.config.backend == "reference"
        self._engine = _PaddleOcr(self.config, self.resources().gpus) if ref else _RapidOcr(self.config, ctx)

    @property
    def backend(self) -> str:
        """The embedded backend names the rapidocr release and the models it loaded once set up."""
        name = getattr(getattr(self, "_engine", None), "name", None)
        return f"{self.config.backend}:{name}" if name else super().backend

    def hash_extra(self) -> str:
        # a rapidocr release that ships other models gives other boxes: `--rerun stale` redoes the clips
        return f"rapidocr=={_version('rapidocr')}" if self.config.backend == "embedded" else ""

    def score(self, row: Row, samples: dict[str, np.ndarray]) -> dict[str, Any]:
        import cv2

        idx = pick(len(samples["frames"]), self.config.max_frames)
        areas, texts, boxes_out = [], [], []
        for i in idx:
            rgb = lift_bands(samples["frames"][i], self.config.band, self.config.lift_bands)
            h, w = rgb.shape[:2]
            found = [b for b in self._engine(rgb) if b[2] >= self.config.min_box_score and self._is_text(b, h)]
            mask = np.zeros((h, w), np.uint8)  # union of boxes, so overlapping detections are not counted twice
            for box, text, sc in found:
                cv2.fillPoly(mask, [np.round(np.asarray(box)).astype(np.int32)], 1)
                boxes_out.append(
                    {
                        "frame": int(samples["indices"][i]),
                        "text": text,
                        "score": round(sc, 4),
                        "box": [[round(x / w, 4), round(y / h, 4)] for x, y in box],
                    }
                )
                if text:
                    texts.append(text)
            areas.append(float(mask.mean()))
        overlay_area = _mark_overlays(boxes_out, len(idx), self.config.overlay_frames)
        classify_overlays(boxes_out, len(idx), self.config.band, self.config.edge, self.config.centre)
        return {
            "text_area": float(max(areas)),
            "text_area_mean": float(np.mean(areas)),
            "frames_with_text": int(sum(a > 0 for a in areas)),
            "texts": sorted(set(texts)),
            "overlay_area": overlay_area,
            "overlay_texts": sorted({b["text"] for b in boxes_out if b["overlay"] and b["text"]}),
            "marks": sorted({b["text"] for b in boxes_out if b["kind"] == "mark" and b["text"]}),
            "mark_boxes": sum(b["kind"] == "mark" for b in boxes_out),
            "caption_boxes": sum(b["kind"] == "caption" for b in boxes_out),
            "boxes": json.dumps(boxes_out, ensure_ascii=False),
        }

    def _is_text(self, box: tuple[Box, str, float], h: int) -> bool:
        """Big titles are text; a tall box read as a single glyph is a texture (no size ceiling drops big text)."""
        if np.ptp(np.asarray(box[0])[:, 1]) <= self.config.tall_box * h or not self.config.recognise:
            return True
        return sum(ch.isalnum() for ch in box[1]) >= self.config.tall_min_chars

    def decide(self, s: dict[str, Any]) -> tuple[str, str | None]:
        drawn = bool(s.get("mark_boxes")) or bool(s.get("caption_boxes"))
        if s["text_area"] > self.config.max_text_area or (self.config.reject_overlays and drawn):
            return "reject", "text"
        return "ok", None

    def draw(self, row: Row, frame: int, image: Any) -> None:
        import cv2

        h, w = image.shape[:2]
        for box in json.loads(row.get(self.col("boxes")) or "[]"):
            if box.get("frame") == frame:
                pts = np.array([[x * w, y * h] for x, y in box["box"]], np.int32)
                cv2.polylines(image, [pts], True, (0, 0, 255), 2)

    def thresholds(self) -> dict[str, list[tuple[float, str]]]:
        return {self.col("text_area"): [(self.config.max_text_area, "max")]}
