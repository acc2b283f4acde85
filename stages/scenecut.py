"""`scenecut`: split each video into clips with PySceneDetect detectors, in the one decode pass per video.

The same pass stores each clip's frame samples, which every frame-based filter reads instead of reopening the video:
`<run>/frames/<video_id>/<clip_id>.npz` with `frames` (uint8 [n, h, w, 3] RGB, display orientation, long side
<= sample_long_side), `indices` (their frame numbers), `pairs` (uint8 [n, 2, dh, dw]: grey frame before + sample
frame at detection size, for optical flow), `pair_valid` (bool [n]) and `fps`. Samples are kept for every clip, even
rejected ones, so a filter can compare a clip with the rest of its video (watermarks persist across cuts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from curation.ingest import clip_id
from curation.manifest import atomic_write_bytes
from curation.stage import Resources, Row, Stage, StageConfig, is_storage_error, register
from curation.video import Segment, scan_video, seconds

DETECTORS = {
    "content": "ContentDetector",
    "adaptive": "AdaptiveDetector",
    "threshold": "ThresholdDetector",
    "histogram": "HistogramDetector",
    "hash": "HashDetector",
}


class ScenecutConfig(StageConfig):
    detector: Literal["content", "adaptive", "threshold", "histogram", "hash"] = "content"
    threshold: float | None = Field(27.0, description="detector threshold (null: the detector's default)")
    min_scene_len: int = Field(15, ge=0, description="frames; PySceneDetect's own minimum scene length")
    detector_args: dict[str, Any] = Field(default_factory=dict, description="extra detector keyword arguments")
    min_clip_s: float = Field(1.0, ge=0, description="shorter clips are rejected (too_short)")
    max_clip_s: float | None = Field(15.0, gt=0, description="longer scenes are split (or rejected if not split_long)")
    split_long: bool = True
    samples_per_clip: int = Field(8, ge=1, le=64)
    sample_long_side: int = Field(512, ge=32)
    decode_threads: int = Field(0, ge=0, description="codec threads; 0 lets FFmpeg choose")


def make_detector(cfg: ScenecutConfig) -> Any:
    import scenedetect

    from curation.video import FastContentDetector

    cls = FastContentDetector if cfg.detector == "content" else getattr(scenedetect, DETECTORS[cfg.detector])
    kwargs: dict[str, Any] = {"min_scene_len": cfg.min_scene_len}
    if cfg.threshold is not None:
        kwargs["threshold"] = cfg.threshold
    kwargs.update(cfg.detector_args)
    if cfg.detector == "adaptive" and "threshold" in kwargs:
        kwargs["adaptive_threshold"] = kwargs.pop("threshold")
    return cls(**kwargs)


@register
class Scenecut(Stage[ScenecutConfig]):
    """Fan-out: one video row in, one row per clip out (or one video-level error row, `clip_id` null)."""

    name = "scenecut"
    version = "2"
    config_class = ScenecutConfig
    resources = Resources(cpus=0.5, batch_size=1, pool_max=2)
    input_key = "video_id"
    output_key = "clip_id"
    fan_out = True
    level = "clip"
    columns: ClassVar[dict[str, str]] = {
        "scenecut_start_frame": "BIGINT",
        "scenecut_end_frame": "BIGINT",
        "scenecut_num_frames": "BIGINT",
        "scenecut_fps": "DOUBLE",
        "scenecut_duration_s": "DOUBLE",
        "scenecut_start_reason": "VARCHAR",
        "scenecut_samples_path": "VARCHAR",
        "scenecut_sample_frames": "BIGINT[]",
        "scenecut_ts_regular": "BOOLEAN",
    }

    def process_batch(self, batch: list[Row]) -> list[Row]:
        out: list[Row] = []
        for r in batch:
            try:
                out.extend(self._one(r))
            except Exception as exc:  # undecodable video: one error row keyed by the video
                if is_storage_error(exc):
                    raise
                out.append(
                    self.row(
                        {"video_id": r["video_id"], "clip_id": None},
                        "error",
                        "exception",
                        f"{type(exc).__name__}: {exc}",
                    )
                )
        return out

    def _one(self, r: Row) -> list[Row]:
        cfg = self.config
        rows: list[Row] = []
        uri = r["uri"]
        frames_dir = (Path(self.workdir) if self.workdir else Path(".")) / "frames" / r["video_id"]
        fps_hint = float(r.get("probe_fps") or 0) or 25.0
        max_len = round(cfg.max_clip_s * fps_hint) if cfg.max_clip_s and cfg.split_long else None

        def on_segment(seg: Segment) -> None:
            rows.append(self._clip_row(r, uri, seg, frames_dir))

        res = scan_video(
            uri,
            make_detector(cfg),
            on_segment,
            samples_per_clip=cfg.samples_per_clip,
            sample_long_side=cfg.sample_long_side,
            max_len_frames=max_len,
            threads=cfg.decode_threads,
        )
        for row in rows:  # per-video facts known only at the end of the pass
            row[self.col("fps")] = res.fps
            row[self.col("start_s")] = seconds(row[self.col("start_frame")], res.fps)
            row[self.col("end_s")] = seconds(row[self.col("end_frame")], res.fps)
            row[self.col("duration_s")] = row[self.col("end_s")] - row[self.col("start_s")]
            row[self.col("video_frames")] = res.frames
            row[self.col("decode_errors")] = res.decode_errors
            row[self.col("rotation")] = res.rotation
            row[self.col("ts_regular")] = res.ts_regular
            self._decide(row)
        return rows

    def _clip_row(self, r: Row, uri: str, seg: Segment, frames_dir: Path) -> Row:
        cid = clip_id(uri, seg.start, seg.end)
        path = None
        if len(seg.samples):
            path = frames_dir / f"{cid}.npz"
            _save_samples(path, seg)
        return self.row(
            {"video_id": r["video_id"], "clip_id": cid},
            "ok",
            start_frame=seg.start,
            end_frame=seg.end,
            num_frames=seg.num_frames,
            start_reason=seg.start_reason,
            sample_frames=seg.sample_frames,
            samples_path=str(path) if path else None,
        )

    def _decide(self, row: Row) -> None:
        cfg, dur = self.config, row[self.col("duration_s")]
        if dur < cfg.min_clip_s:
            row[self.col("status")], row[self.col("reason")] = "reject", "too_short"
        elif cfg.max_clip_s is not None and dur > cfg.max_clip_s + 1e-6:
            row[self.col("status")], row[self.col("reason")] = "reject", "too_long"
        elif not row[self.col("samples_path")]:
            row[self.col("status")], row[self.col("reason")] = "error", "no_samples"


def _save_samples(path: Path, seg: Segment) -> None:
    import io

    buf = io.BytesIO()
    np.savez(
        buf,
        frames=seg.samples,
        indices=np.asarray(seg.sample_frames, np.int64),
        pairs=seg.pairs,
        pair_valid=seg.pair_valid,
    )
    atomic_write_bytes(path, buf.getvalue())


def load_samples(row: Row) -> dict[str, np.ndarray]:
    """A clip's frame samples (what filters read instead of the video): frames, indices, pairs, pair_valid."""
    path = row.get("scenecut_samples_path")
    if not path:
        raise FileNotFoundError("clip has no frame samples (scenecut_samples_path is empty)")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
