"""Small synthetic videos made with ffmpeg's test sources, so `curation run` can be tried on a fresh machine."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from curation.errors import CurationError

W, H, FPS = 640, 360, 25

SAMPLES: dict[str, list[str]] = {
    # three hard cuts between unrelated moving scenes
    "three_scenes": ["testsrc2", "mandelbrot", "rgbtestsrc"],
    # one long moving scene
    "one_scene": ["testsrc2"],
    # a still image (near-static clip)
    "static": ["smptehdbars"],
}


def concat_sources(
    path: Path,
    sources: list[str],
    seconds: float,
    size: str = f"{W}x{H}",
    fps: int = FPS,
    ffmpeg: str = "ffmpeg",
    codec_args: list[str] | None = None,
) -> Path:
    """Encode `seconds` of each ffmpeg test source one after the other: hard cuts at multiples of seconds * fps.

    `codec_args` replaces the default H.264 settings (e.g. a 10-bit pixel format, a faster preset).
    """
    inputs: list[str] = []
    for src in sources:
        inputs += ["-t", f"{seconds:.3f}", "-f", "lavfi", "-i", f"{src}=size={size}:rate={fps}"]
    n = len(sources)
    graph = "".join(f"[{i}:v]format=yuv420p,setsar=1[v{i}];" for i in range(n))
    graph += "".join(f"[v{i}]" for i in range(n)) + f"concat=n={n}:v=1:a=0[out]"
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *inputs, "-filter_complex", graph]
    codec = codec_args or ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p"]
    cmd += ["-map", "[out]", *codec, str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CurationError(f"ffmpeg failed making {path}: {proc.stderr.strip()[-500:]}")
    return path


def make_samples(out: Path, seconds: float = 4.0, ffmpeg: str = "ffmpeg") -> list[Path]:
    """Write the sample videos into `out`, each with a sidecar caption; returns their paths."""
    if shutil.which(ffmpeg) is None:
        raise CurationError("making samples needs ffmpeg on PATH: apt-get install ffmpeg")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, sources in SAMPLES.items():
        each = seconds if len(sources) == 1 else max(1.2, seconds / len(sources) * 1.5)
        path = concat_sources(out / f"{name}.mp4", sources, each, ffmpeg=ffmpeg)
        (out / f"{name}.txt").write_text(f"A synthetic test pattern video named {name.replace('_', ' ')}.\n")
        paths.append(path)
    return paths
