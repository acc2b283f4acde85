"""`probe`: container and stream metadata of each input video, with resolution / fps / duration filters."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field

from curation.stage import Kind, Resources, Row, Stage, StageConfig
from curation.storage import local_file


class ProbeConfig(StageConfig):
    min_short_side: int = Field(128, ge=1, description="reject videos whose shorter side is below this")
    max_pixels: int = Field(8192 * 8192, ge=1, description="reject absurd declared resolutions")
    min_fps: float = Field(5.0, ge=0)
    max_fps: float = Field(121.0, gt=0)
    min_duration_s: float = Field(0.5, ge=0)
    max_duration_s: float | None = Field(None, gt=0, description="null: no limit")
    count_limit: int = Field(
        2_000_000, ge=1, description="a file that declares no duration has its packets counted, at most this many"
    )


def _bit_depth(pix_fmt: str | None) -> int | None:
    if not pix_fmt:
        return None
    m = re.search(r"p(\d{2})(le|be)?$", pix_fmt)
    return int(m.group(1)) if m else 8


def _count_packets(path: str, fps: float, limit: int) -> tuple[int, float]:
    """(frames, duration) by reading the video stream's packets (no decoding), for files whose header declares
    neither; at most `limit` packets. A raw stream's packets carry no times: duration is then frames / fps."""
    import av

    n, lo, hi = 0, None, None
    with av.open(path) as c:
        s = c.streams.video[0]
        for packet in c.demux(s):
            if packet.size == 0:
                continue
            n += 1
            if packet.pts is not None and s.time_base is not None:
                t = float(packet.pts * s.time_base)
                lo, hi = (t if lo is None else min(lo, t)), (t if hi is None else max(hi, t))
            if n >= limit:
                break
    step = 1 / fps if fps else 0.0
    duration = (hi - lo + step) if lo is not None and hi is not None and hi > lo else n * step
    return n, duration


class NotAVideo(ValueError):
    """Not a video: FFmpeg cannot read the file (`unreadable`: a document, a truncated file) or it holds no video
    stream (`not_video`: audio only). A reason of its own in the manifest."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def probe_file(path: str, max_pixels: int | None = None, count_limit: int = 2_000_000) -> dict[str, Any]:
    """Read metadata with PyAV and decode the first frame (which also proves the file is decodable).

    A declared size above `max_pixels` is returned without decoding anything (`decoded: False`): a corrupt or
    hostile header must not make us allocate a gigantic frame.
    """
    import av

    if "://" not in path and not Path(path).exists():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        container = av.open(path)
    except (av.error.InvalidDataError, av.error.EOFError) as exc:  # a document, a truncated file
        raise NotAVideo("unreadable", f"{type(exc).__name__}: {exc}") from None
    with container as c:
        if not c.streams.video:
            raise NotAVideo("not_video", f"no video stream (streams: {', '.join(s.type for s in c.streams) or 'none'})")
        s = c.streams.video[0]
        cc = s.codec_context
        rate = s.average_rate or s.guessed_rate
        fps = float(rate) if rate else 0.0
        if s.duration is not None and s.time_base is not None:
            duration = float(s.duration * s.time_base)
        elif c.duration is not None:
            duration = c.duration / 1_000_000
        else:
            duration = 0.0
        frames = int(s.frames or 0) or round(duration * fps)
        duration_from = "container"
        if duration <= 0 or frames <= 0:  # raw streams, some WebM / live MKV: count what the file holds
            frames, duration = _count_packets(path, fps, count_limit)
            duration_from = "packets"
        pix_fmt = cc.pix_fmt if isinstance(cc.pix_fmt, str) else getattr(cc.format, "name", None)
        meta: dict[str, Any] = {
            "container": c.format.name,
            "codec": cc.name,
            "pix_fmt": pix_fmt,
            "bit_depth": _bit_depth(pix_fmt),
            "fps": fps,
            "frames": frames,
            "duration_s": duration,
            "duration_from": duration_from,
            "audio_streams": len(c.streams.audio),
            "size_bytes": _size(path),
        }
        if max_pixels is not None and cc.width * cc.height > max_pixels:
            size = {"width": cc.width, "height": cc.height, "display_width": cc.width, "display_height": cc.height}
            return {**meta, **size, "rotation": 0, "decoded": False}
        first = next(c.decode(s), None)
        if first is None:
            raise ValueError("no decodable video frame")
        rotation = int(getattr(first, "rotation", 0) or 0)
        width, height = first.width, first.height
        display = (height, width) if rotation % 180 else (width, height)
        size = {"width": width, "height": height, "display_width": display[0], "display_height": display[1]}
        return {**meta, **size, "rotation": rotation, "decoded": True}


def _size(path: str) -> int | None:
    return Path(path).stat().st_size if "://" not in path else None


class Probe(Stage[ProbeConfig]):
    """Cheap metadata first, so nothing later decodes a file that cannot be used."""

    name = "probe"
    version = "3"
    kind = Kind.VIDEO
    config_class = ProbeConfig
    requires = ("uri",)
    default_resources = Resources(cpus=0.25, batch_size=8, pool_max=2)

    def process(self, r: Row) -> Row:
        try:
            with local_file(r["uri"]) as path:  # a remote object: this worker's copy
                meta = probe_file(path, self.config.max_pixels, self.config.count_limit)  # other failures: error rows
        except NotAVideo as exc:
            return self.row(r, "error", exc.reason, str(exc))
        status, reason = self._decide(meta)
        return self.row(r, status, reason, **meta)

    def shard_fields(self, row: Row) -> dict[str, Any]:
        return {"source_video": {k: row.get(self.col(k)) for k in ("codec", "width", "height", "fps", "rotation")}}

    def _decide(self, m: dict[str, Any]) -> tuple[str, str | None]:
        c = self.config
        if min(m["width"], m["height"]) < c.min_short_side or m["width"] * m["height"] > c.max_pixels:
            return "reject", "resolution"
        if not (c.min_fps <= m["fps"] <= c.max_fps):
            return "reject", "fps"
        if m["duration_s"] < c.min_duration_s or (c.max_duration_s is not None and m["duration_s"] > c.max_duration_s):
            return "reject", "duration"
        return "ok", None
