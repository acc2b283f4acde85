"""`probe`: container and stream metadata of each input video, with resolution / fps / duration filters."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field

from curation.stage import Kind, Resources, Row, Stage, StageConfig


class ProbeConfig(StageConfig):
    min_short_side: int = Field(128, ge=1, description="reject videos whose shorter side is below this")
    max_pixels: int = Field(8192 * 8192, ge=1, description="reject absurd declared resolutions")
    min_fps: float = Field(5.0, ge=0)
    max_fps: float = Field(121.0, gt=0)
    min_duration_s: float = Field(0.5, ge=0)
    max_duration_s: float | None = Field(None, gt=0, description="null: no limit")


def _bit_depth(pix_fmt: str | None) -> int | None:
    if not pix_fmt:
        return None
    m = re.search(r"p(\d{2})(le|be)?$", pix_fmt)
    return int(m.group(1)) if m else 8


def probe_file(path: str, max_pixels: int | None = None) -> dict[str, Any]:
    """Read metadata with PyAV and decode the first frame (which also proves the file is decodable).

    A declared size above `max_pixels` is returned without decoding anything (`decoded: False`): a corrupt or
    hostile header must not make us allocate a gigantic frame.
    """
    import av

    if "://" not in path and not Path(path).exists():
        raise FileNotFoundError(f"no such file: {path}")
    with av.open(path) as c:
        if not c.streams.video:
            raise ValueError(f"no video stream (streams: {', '.join(s.type for s in c.streams) or 'none'})")
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
        pix_fmt = cc.pix_fmt if isinstance(cc.pix_fmt, str) else getattr(cc.format, "name", None)
        if max_pixels is not None and cc.width * cc.height > max_pixels:
            return {
                "container": c.format.name,
                "codec": cc.name,
                "pix_fmt": pix_fmt,
                "bit_depth": _bit_depth(pix_fmt),
                "width": cc.width,
                "height": cc.height,
                "display_width": cc.width,
                "display_height": cc.height,
                "rotation": 0,
                "fps": fps,
                "frames": frames,
                "duration_s": duration,
                "audio_streams": len(c.streams.audio),
                "size_bytes": _size(path),
                "decoded": False,
            }
        first = next(c.decode(s), None)
        if first is None:
            raise ValueError("no decodable video frame")
        rotation = int(getattr(first, "rotation", 0) or 0)
        width, height = first.width, first.height
        display = (height, width) if rotation % 180 else (width, height)
        return {
            "container": c.format.name,
            "codec": cc.name,
            "pix_fmt": pix_fmt,
            "bit_depth": _bit_depth(pix_fmt),
            "width": width,
            "height": height,
            "display_width": display[0],
            "display_height": display[1],
            "rotation": rotation,
            "fps": fps,
            "frames": frames,
            "duration_s": duration,
            "audio_streams": len(c.streams.audio),
            "size_bytes": _size(path),
            "decoded": True,
        }


def _size(path: str) -> int | None:
    return Path(path).stat().st_size if "://" not in path else None


class Probe(Stage[ProbeConfig]):
    """Cheap metadata first, so nothing later decodes a file that cannot be used."""

    name = "probe"
    version = "2"
    kind = Kind.VIDEO
    config_class = ProbeConfig
    requires = ("uri",)
    default_resources = Resources(cpus=0.25, batch_size=8, pool_max=2)

    def process(self, r: Row) -> Row:
        meta = probe_file(r["uri"], self.config.max_pixels)  # undecodable input raises: an error row
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
