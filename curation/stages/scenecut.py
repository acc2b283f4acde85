"""`scenecut`: split each video into clips with PySceneDetect detectors, in the one decode pass per video.

The same pass stores each clip's frame samples (`curation.samples`), which every frame-based filter reads instead of
reopening the video. Samples are kept for every clip, even rejected ones, so a filter can compare a clip with the
rest of its video (watermarks persist across cuts). A rerun that cuts differently stores them under a new cut folder
and removes the video's older cut folders.
"""

from __future__ import annotations

import math
import shutil
from typing import Any, ClassVar, Literal

from pydantic import Field

from curation.ingest import clip_id
from curation.samples import cut_dir, save_samples
from curation.stage import Kind, Resources, Row, Stage, StageConfig, operational
from curation.storage import local_file

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
    decode_threads: int = operational(0, ge=0, description="codec threads; 0 lets FFmpeg choose")


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


class Scenecut(Stage[ScenecutConfig]):
    """One video row in, one row per clip out (or one video-level error row, `clip_id` null)."""

    name = "scenecut"
    version = "4"
    kind = Kind.SPLIT
    config_class = ScenecutConfig
    requires = ("uri",)
    default_resources = Resources(cpus=0.5, batch_size=1, pool_max=2)
    columns: ClassVar[dict[str, str]] = {"scenecut_start_reason": "VARCHAR", "scenecut_sample_frames": "BIGINT[]"}

    def process(self, r: Row) -> list[Row]:
        from curation.video import Segment, scan_video

        cfg = self.config
        rows: list[Row] = []
        uri = r["uri"]
        cut = f"{self.version}-{self.config_hash}"  # same settings, same cuts, same folder
        frames_dir = cut_dir(self.ctx.run_dir, r["video_id"], cut)
        fps_hint = float(r.get("probe_fps") or 0) or 25.0
        # floor, not round: at 29.97 fps 15 s is 449.55 frames, and 450 frames would be 15.015 s, over the limit
        max_len = math.floor(cfg.max_clip_s * fps_hint + 1e-6) if cfg.max_clip_s and cfg.split_long else None

        def on_segment(seg: Segment) -> None:
            rows.append(self._clip_row(r, uri, seg, frames_dir))

        with local_file(uri) as path:  # a remote object: this worker's copy (clip ids keep the URI)
            res = scan_video(
                path,
                make_detector(cfg),
                on_segment,
                samples_per_clip=cfg.samples_per_clip,
                sample_long_side=cfg.sample_long_side,
                max_len_frames=max_len,
                threads=cfg.decode_threads,
            )
        for old in frames_dir.parent.iterdir() if frames_dir.parent.is_dir() else ():
            if old != frames_dir and old.is_dir():  # an earlier cut's samples: superseded by this attempt
                shutil.rmtree(old, ignore_errors=True)
        for row in rows:  # per-video facts known only at the end of the pass
            row[self.col("fps")] = res.fps
            # from the decoded timestamps: right for variable frame rates and dropped frames too
            row[self.col("start_s")] = res.time_of(row[self.col("start_frame")])
            row[self.col("end_s")] = res.time_of(row[self.col("end_frame")])
            row[self.col("duration_s")] = row[self.col("end_s")] - row[self.col("start_s")]
            row[self.col("video_frames")] = res.frames
            row[self.col("decode_errors")] = res.decode_errors
            row[self.col("rotation")] = res.rotation
            row[self.col("ts_regular")] = res.ts_regular
            self._decide(row, max_len)
        return rows

    def _clip_row(self, r: Row, uri: str, seg: Any, frames_dir: Any) -> Row:
        cid = clip_id(uri, seg.start, seg.end)
        path = None
        if len(seg.samples):
            path = frames_dir / f"{cid}.npz"
            save_samples(path, seg.samples, seg.sample_frames, seg.pairs, seg.pair_valid)
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

    def _decide(self, row: Row, max_len: int | None) -> None:
        """Length limits. A piece the splitter cut to `max_len` frames is never too long: at a variable frame rate
        its timestamps may span a little more than `max_clip_s`, and that is no reason to drop it."""
        cfg, dur = self.config, row[self.col("duration_s")]
        sized = bool(max_len and row[self.col("num_frames")] <= max_len)
        if dur < cfg.min_clip_s:
            row[self.col("status")], row[self.col("reason")] = "reject", "too_short"
        elif cfg.max_clip_s is not None and dur > cfg.max_clip_s + 1e-6 and not sized:
            row[self.col("status")], row[self.col("reason")] = "reject", "too_long"
        elif not row[self.col("samples_path")]:
            row[self.col("status")], row[self.col("reason")] = "error", "no_samples"

    def shard_fields(self, row: Row) -> dict[str, Any]:
        fields = ("start_frame", "end_frame", "num_frames", "start_s", "end_s", "duration_s", "fps", "start_reason")
        return {"clip": {k: row.get(self.col(k)) for k in fields}}
