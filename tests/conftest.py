"""Shared fixtures: the real media beside the checkout, a local Ray cluster, and an ERROR-log guard."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MEDIA = Path(os.environ.get("CURATION_MEDIA", REPO.parent / "shared" / "media")).resolve()
VIDEOS = MEDIA / "video"


def media(name: str) -> str:
    path = VIDEOS / name
    if not path.is_file():
        pytest.fail(
            f"missing test media {path}: the tests read ../shared/media beside the checkout (or set CURATION_MEDIA)"
        )
    return str(path)


@pytest.fixture(autouse=True)
def no_unexpected_error_logs(caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test if the project logged at ERROR, unless it is marked `allow_error_logs`."""
    caplog.set_level(logging.WARNING)
    yield
    if request.node.get_closest_marker("allow_error_logs"):
        return
    bad = [
        r
        for r in caplog.get_records("call")
        if r.levelno >= logging.ERROR and r.name.split(".")[0] in ("curation", "stages")
    ]
    assert not bad, f"unexpected ERROR logs: {[r.getMessage() for r in bad]}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_error_logs: the test expects the project to log at ERROR")


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests are deselected by default (addopts); a `-m` that selects them anyway (e.g. `-m "not slow"`
    replaces the default) skips them with the reason where no CUDA device exists."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu and not _cuda():
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device and the gpu extra"))


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray cluster for the session, sized like this machine (fractional actors keep it deadlock-free)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        pytest.fail("ffmpeg is not installed: apt-get install ffmpeg (.ci/run does this)")
    return exe


def make_video(
    path: Path,
    *,
    src: str = "testsrc2",
    seconds: float = 2.0,
    size: str = "320x240",
    fps: int = 25,
    extra: list[str] | None = None,
) -> Path:
    """A synthetic clip from an ffmpeg test source (in addition to, never instead of, the real media)."""
    from curation.synthetic import concat_sources

    return concat_sources(path, [src], seconds, size=size, fps=fps, codec_args=extra)


def make_audio(path: Path, seconds: float = 1.0) -> Path:
    """An audio-only file (a sine tone): a valid media file with no video stream."""
    subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440",
            "-t",
            str(seconds),
            str(path),
        ],
        check=True,
    )
    return path


def make_cut_video(path: Path, sources: list[str], seconds: float = 1.6, size: str = "320x240", fps: int = 25) -> Path:
    """Hard cuts between unrelated test sources, at known frames (multiples of seconds * fps)."""
    from curation.synthetic import concat_sources

    return concat_sources(path, sources, seconds, size=size, fps=fps)


def caption_list(path: Path, captions: dict[str, str]) -> Path:
    """A CSV input list (`path`, `caption`) over shared media files: how tests give real videos their captions."""
    import csv

    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "caption"])
        for name, cap in captions.items():
            w.writerow([media(name), cap])
    return path


# Captions for the tiny overfit set the trainer tests train on (real media; written for these clips by hand).
OVERFIT_CAPTIONS = {
    "sam2_01_dog.mp4": "A woman in a white top and blue jeans plays with a dog in a paved courtyard.",
    "sam2_bedroom.mp4": "A girl in a blue skirt and a boy in a white shirt jump on a bed.",
    "imageio_cockatoo_yuv420.mp4": "A white cockatoo with a yellow crest turns its head.",
}


@pytest.fixture(scope="session")
def overfit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole default pipeline (embedded profile, local runner) over three captioned real videos: a run
    directory whose shards/ the trainer tests read (4 clips with subjects, masks and reference crops)."""
    from curation.config import load_config
    from curation.pipeline import Pipeline

    tmp = tmp_path_factory.mktemp("overfit")
    lst = caption_list(tmp / "list.csv", OVERFIT_CAPTIONS)
    cfg = load_config(REPO / "configs" / "local.yaml", ["runner=local", "progress=false"])
    Pipeline(cfg, tmp / "run").run(str(lst))
    return tmp / "run"
