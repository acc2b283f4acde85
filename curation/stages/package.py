"""`package`: cut and encode only the clips that survived every filter, then write WebDataset shards.

Cuts are frame-exact: ffmpeg seeks to just before the clip's first frame and stops after its frame count, and the
encoded frame count is checked against the manifest.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from curation.errors import ConfigError
from curation.manifest import note_written
from curation.runstore import discard, local
from curation.stage import STORAGE_ERRNOS, Resources, Row, Stage, StageConfig, StageContext, operational
from curation.storage import local_file


class PackageConfig(StageConfig):
    codec: Literal["libx264"] = "libx264"
    crf: int = Field(18, ge=0, le=51)
    preset: str = "veryfast"
    max_long_side: int | None = Field(None, ge=16, description="downscale so the long side is at most this")
    shard_size: int = operational(100, ge=1, description="samples per shard")
    shard_max_bytes: int = operational(
        2 * 1024**3, ge=1024, description="a shard is closed before it would exceed this"
    )
    keep_clips: bool = operational(False, description="keep the encoded mp4s under <run>/clips after sharding")
    ffmpeg: str = operational("ffmpeg", description="the ffmpeg executable")


def ffmpeg_cut_cmd(
    cfg: PackageConfig, uri: str, start: int, n: int, fps: float, out: Path, ts_regular: bool = True
) -> list[str]:
    """The ffmpeg command that encodes decoded frames [start, start + n) of `uri` (display orientation, even size).

    With regular timestamps it seeks to half a frame before `start` (fast). Otherwise (VFR, dropped frames, AVI packed
    B-frames) time does not identify a frame, so it selects by decoded-frame number from the start of the file
    (exact, slower) and keeps each frame's own timestamp, so the clip lasts as long as its span in the source.
    """
    limit = cfg.max_long_side or 1_000_000
    scale = f"scale=w='trunc(min(1,{limit}/max(iw,ih))*iw/2)*2':h='trunc(min(1,{limit}/max(iw,ih))*ih/2)*2'"
    cmd = [cfg.ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
    if ts_regular:
        vf = [scale, "setpts=N/FRAME_RATE/TB"]
        if start > 0:
            cmd += ["-ss", f"{(start - 0.5) / fps:.6f}"]
        rate = ["-r", f"{fps:.6f}"]
    else:  # frames by number, each keeping its own timestamp: the clip lasts what the manifest's start/end say
        vf = [f"select='between(n,{start},{start + n - 1})'", scale, "setpts=PTS-STARTPTS"]
        rate = []
    cmd += ["-i", uri, "-map", "0:v:0", "-frames:v", str(n), "-fps_mode", "passthrough", "-an", "-sn", "-dn"]
    cmd += ["-vf", ",".join(vf), *rate]
    cmd += ["-c:v", cfg.codec, "-preset", cfg.preset, "-crf", str(cfg.crf), "-pix_fmt", "yuv420p"]
    cmd += ["-movflags", "+faststart", "-f", "mp4", str(out)]
    return cmd


def _raise_storage_error(stderr: str, returncode: int, path: Path) -> None:
    """ffmpeg reports a full or read-only disk only in its message (or dies of SIGXFSZ at a file-size limit): raise
    it as the OSError it was, so the run ends (every later clip would fail the same way) instead of recording an
    error row per clip."""
    if returncode == -signal.SIGXFSZ:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(path))
    for code in sorted(STORAGE_ERRNOS):
        if os.strerror(code) in stderr:
            raise OSError(code, os.strerror(code), str(path))


class Package(Stage[PackageConfig]):
    name = "package"
    version = "3"
    config_class = PackageConfig
    requires = ("uri", "clip_start_frame", "clip_num_frames", "clip_fps", "clip_ts_regular")
    default_resources = Resources(cpus=0.5, batch_size=2, pool_max=2)

    def setup(self, ctx: StageContext) -> None:
        if shutil.which(self.config.ffmpeg) is None:
            raise ConfigError(
                f"package needs ffmpeg ({self.config.ffmpeg!r} is not on PATH): install it (apt-get install ffmpeg) "
                "or set package.ffmpeg to its path"
            )
        self._out_dir = ctx.path("clips")
        self._out_dir.mkdir(parents=True, exist_ok=True)

    def process(self, r: Row) -> Row:
        import av

        out_dir = self._out_dir
        start, n = int(r["clip_start_frame"]), int(r["clip_num_frames"])
        fps = float(r["clip_fps"])
        final = out_dir / f"{r['clip_id']}.mp4"
        tmp = out_dir / f".{r['clip_id']}.{uuid.uuid4().hex[:8]}.mp4"
        regular = r.get("clip_ts_regular")
        try:
            with local_file(r["uri"]) as src:
                cmd = ffmpeg_cut_cmd(self.config, src, start, n, fps, tmp, ts_regular=regular is not False)
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(120, n))
            if proc.returncode != 0:
                _raise_storage_error(proc.stderr, proc.returncode, tmp)
                return self.row(r, "error", "ffmpeg", proc.stderr.strip()[-2000:] or f"ffmpeg exit {proc.returncode}")
            with av.open(str(tmp)) as c:
                s = c.streams.video[0]
                frames, width, height = int(s.frames), s.codec_context.width, s.codec_context.height
            if frames != n:
                return self.row(r, "error", "frame_count", f"encoded {frames} frames, expected {n}", frames=frames)
            tmp.replace(final)
            note_written(final)
        finally:  # whatever went wrong (an error row, or the end of the run on a full disk), no half-written clip
            tmp.unlink(missing_ok=True)
        return self.row(r, "ok", path=str(final), frames=frames, width=width, height=height, bytes=final.stat().st_size)

    def shard_fields(self, row: Row) -> dict[str, Any]:
        return {"video": {k: row.get(self.col(k)) for k in ("width", "height", "frames")}}

    def shard_members(self, row: Row) -> list[tuple[str, bytes]]:
        return [("mp4", local(row[self.col("path")]).read_bytes())]

    def finalize(self, ctx: StageContext) -> None:
        from curation.shards import write_shards

        def drop_clips(rows: list[Row]) -> None:
            discard([r[self.col("path")] for r in rows])

        cfg = self.config
        write_shards(
            ctx.run_dir, self.name, cfg.shard_size, cfg.shard_max_bytes, None if cfg.keep_clips else drop_clips
        )
