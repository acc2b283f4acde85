"""The reference lane (issue 17): reference backends driven through the stage code by a real pipeline run, on the
CPU, with random weights written in the upstream checkpoint formats (nothing can be downloaded here). It runs in its
own virtualenv, `make test-reference` (PyPI's CUDA torch wheel, which runs on the CPU, with torchvision, open_clip,
timm, sam2 and insightface); in the default venv these tests skip, since those libraries are not installed there.

What it shows: each backend loads its files from `models_dir` in the format users download, scores real clips and
writes its manifest columns, and `curation report` reads the result. What it cannot show: the scores' quality
(random weights) and GPU speed."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.reference
# in the lane itself (`make test-reference` sets this) a missing library is a failure, never a skip
IN_LANE = os.environ.get("CURATION_REFERENCE_LANE") == "torch"


def _need(module: str) -> Any:
    return importlib.import_module(module) if IN_LANE else pytest.importorskip(module)


open_clip = _need("open_clip")
timm = _need("timm")
torch = _need("torch")

from curation.config import load_config  # noqa: E402
from curation.manifest import Manifests  # noqa: E402
from curation.pipeline import Pipeline  # noqa: E402
from tests.conftest import REPO, caption_list, media  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
import random_weights as rw  # noqa: E402


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("reference")
    models = tmp / "models"
    models.mkdir()
    rw.clip_weights(models)
    rw.watermark_weights(models)
    overrides = [
        "runner=local",
        "progress=false",
        "stages=[probe,scenecut,aesthetics,watermark,package]",
        *(f"{s}.{k}" for s in ("aesthetics", "watermark") for k in ("backend=reference", f"models_dir={models}")),
        "aesthetics.resources.gpus=0",  # this torch sees no GPU: run the GPU backends on the CPU on purpose
        "watermark.resources.gpus=0",
        "aesthetics.min_score=1",
    ]
    cfg = load_config(REPO / "configs" / "local.yaml", overrides)
    Pipeline(cfg, tmp / "run").run(media("sam2_01_dog.mp4"))
    return tmp / "run"


def test_aesthetics_and_watermark_reference_score_real_clips(reference_run: Path) -> None:
    m = Manifests(reference_run)
    rows = m.rows(
        "SELECT aesthetics_backend, aesthetics_score, aesthetics_status, watermark_backend, watermark_score, "
        "watermark_probability_max FROM clips WHERE aesthetics_status IS NOT NULL"
    )
    assert rows, "no clip reached the filters"
    for r in rows:
        assert r["aesthetics_backend"] == "reference:laion-aesthetic-v2"
        assert r["watermark_backend"] == "reference:laion-watermark-v1"
        assert r["aesthetics_score"] is not None and abs(r["aesthetics_score"] - 5.0) < 3  # head bias 5, small weights
        assert 0 <= r["watermark_score"] <= 1 and 0 <= r["watermark_probability_max"] <= 1


def test_report_reads_a_reference_run(reference_run: Path) -> None:
    from curation.cli import main

    assert main(["report", str(reference_run), "--out", str(reference_run / "report.html")]) == 0
    assert "aesthetics" in (reference_run / "report.html").read_text()


@pytest.fixture(scope="module")
def subjects_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _need("sam2")
    _need("insightface")
    tmp = tmp_path_factory.mktemp("reference-subjects")
    models = tmp / "models"
    models.mkdir()
    rw.subjects_weights(models)
    rw.crops_weights(models)
    overrides = [
        "runner=local",
        "progress=false",
        "stages=[probe,scenecut,caption,subjects,crops,package]",
        "subjects.backend=reference",
        f"subjects.models_dir={models}",
        "subjects.sam2_config=configs/sam2.1/sam2.1_hiera_t.yaml",
        "subjects.resources.gpus=0",
        "subjects.track_frames=4",  # SAM2 on the CPU: a few frames are enough to show the path runs
        "subjects.box_threshold=0",  # random Grounding DINO: take its best box, whatever its score
        "subjects.text_threshold=0",
        "scenecut.max_clip_s=4",
        *(f"crops.{k}" for k in ("backend=reference", f"models_dir={models}", "resources.gpus=0")),
        "crops.sam2_config=configs/sam2.1/sam2.1_hiera_t.yaml",
        "crops.box_threshold=0",
        "crops.text_threshold=0",
        "crops.min_coverage=0",
    ]
    cfg = load_config(REPO / "configs" / "local.yaml", overrides)
    caption = {"sam2_01_dog.mp4": "A woman in a white top and blue jeans plays with a brown dog on the grass."}
    Pipeline(cfg, tmp / "run").run(str(caption_list(tmp / "list.csv", caption)))
    return tmp / "run"


def test_subjects_reference_runs_sam2_and_insightface_from_their_files(subjects_run: Path) -> None:
    import json

    m = Manifests(subjects_run)
    rows = m.rows(
        "SELECT subjects_backend, subjects_status, subjects_error, subjects_count, subjects_tracks, subjects_frames "
        "FROM clips WHERE subjects_status IS NOT NULL"
    )
    assert rows and all(r["subjects_backend"] == "reference:insightface+sam2" for r in rows)
    assert all(r["subjects_status"] in ("ok", "reject") for r in rows), rows  # no error rows: the path ran
    ok = [r for r in rows if r["subjects_status"] == "ok"]
    assert ok and all(r["subjects_count"] >= 1 for r in ok)
    for r in ok:  # SAM2 propagated a mask to every tracked frame of each kept track
        frames = {str(f) for f in r["subjects_frames"]}
        assert all(set(t["boxes"]) == frames for t in json.loads(r["subjects_tracks"]))
    # Grounding DINO looked for the caption's subject: a track carries its phrase and is linked to it
    every = [t for r in rows for k in ("subjects_tracks",) for t in json.loads(r[k] or "[]")]
    dog = [t for t in every if t.get("grounded_phrase") == "dog"]
    assert dog and all(t["subject_id"] == t["grounded_subject"] and t["link_confidence"] == 0.95 for t in dog)
    from curation.cli import main  # the report draws the reference backend's masks and crops too

    assert main(["report", str(subjects_run), "--out", str(subjects_run / "report.html")]) == 0


def test_crops_reference_grounds_attributes_and_paints_the_plate_with_lama(subjects_run: Path) -> None:
    """Grounding DINO + SAM2's image predictor for the attribute phrases (random weights: the path runs, where a
    phrase is found on the person the crop says so), LaMa for what no frame shows of the background."""
    import json

    rows = Manifests(subjects_run).rows(
        "SELECT crops_status, crops_error, crops_backend, crops_parts FROM clips WHERE crops_status IS NOT NULL"
    )
    assert rows and all(r["crops_status"] == "ok" for r in rows), rows
    assert all(r["crops_backend"] == "reference:grounding-dino-tiny+sam2+median+lama" for r in rows)
    parts = [p for r in rows for p in json.loads(r["crops_parts"])]
    plates = [p for p in parts if p["kind"] == "background"]
    assert plates and all(p["method"] == "temporal-median+lama" for p in plates)
    # random masks may cover whole frames: then the plate is skipped for a reason, never an error
    skips = ("camera_moves", "low_coverage", "background_unseen", "too_few_frames")
    assert all(p["file"] or p["skipped"] in skips for p in plates), [p["skipped"] for p in plates]
    attrs = [p for p in parts if p["kind"] == "attribute"]
    assert attrs and {p["method"] for p in attrs if p["file"]} <= {"grounding+sam2:grounding-dino-tiny", "body-region"}


def test_lama_paints_only_the_hole_and_sam2_keeps_attributes_on_the_person(subjects_run: Path) -> None:
    """The two reference models of crops called directly on a real frame (random weights: what is checked is the
    contract, not the quality): LaMa changes only the hole; a grounded attribute mask lies on the person."""
    import numpy as np

    from curation.stages.crops import CropsConfig
    from curation.stages.crops.reference import AttributeSegmenter, Inpainter
    from curation.video import read_clip_frames

    models = subjects_run.parent / "models"
    frame = read_clip_frames(media("sam2_01_dog.mp4"), 0, [0], long_side=333)[0]  # 333 x 187: not a multiple of 8
    hole = np.zeros(frame.shape[:2], np.uint8)
    hole[40:90, 100:180] = 255
    out = Inpainter(models / "lama" / "big-lama.pt", 0)(frame, hole)
    assert out.shape == frame.shape and out.dtype == np.uint8
    assert np.array_equal(out[hole == 0], frame[hole == 0]) and not np.array_equal(out[hole > 0], frame[hole > 0])
    cfg = CropsConfig(
        backend="reference", models_dir=str(models), sam2_config="configs/sam2.1/sam2.1_hiera_t.yaml",
        box_threshold=0, text_threshold=0,
    )  # fmt: skip
    person = np.zeros(frame.shape[:2], np.uint8)
    person[10:180, 20:320] = 1  # most of the frame: a random model's boxes land on it
    seg = AttributeSegmenter(cfg, 0)
    assert seg._grounder.boxes(frame, "white top", 0, 0)  # the phrase gets boxes to prompt SAM2 with
    m = seg.segment(frame, person, "white top")
    assert m is None or (m.shape == person.shape and not (m.astype(bool) & (person == 0)).any())


@pytest.fixture(scope="module")
def chat_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """`transformers serve` (a real OpenAI-compatible server) with the tiny Qwen2.5-VL preloaded."""
    import json
    import shutil
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    model = tmp_path_factory.mktemp("qwen") / "qwen25vl-tiny"
    rw.tiny_qwen25_vl(model)
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent))
    if exe is None:
        if IN_LANE:
            pytest.fail("transformers serve is not installed in the lane (transformers[serving])")
        pytest.skip("transformers serve is not installed (transformers[serving])")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (model.parent / "serve.log").open("w")
    proc = subprocess.Popen([exe, "serve", str(model), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                    if json.loads(r.read())["data"]:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"transformers serve did not start: {(model.parent / 'serve.log').read_text()[-2000:]}")
        yield url, str(model)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_caption_openai_backend_against_a_real_server(chat_endpoint: tuple[str, str], tmp_path: Path) -> None:
    """The caption stage's OpenAI path end to end: frames as images (a non-vLLM server), the caption prompt, then the
    extraction prompt with response_format, through HTTP to `transformers serve`. A random model writes nonsense,
    so the extraction cannot validate: those rows must be `error` rows that keep the raw answer, and nothing may
    fail at the transport."""
    url, model = chat_endpoint
    overrides = [
        "runner=local",
        "progress=false",
        "stages=[probe,scenecut,caption]",
        "caption.backend=openai",
        f"caption.endpoint={url}",
        f"caption.model={model}",
        "caption.openai_server=other",
        "caption.use_supplied=false",
        "caption.max_tokens=16",
        "caption.frames=2",
        "caption.timeout_s=120",
    ]
    cfg = load_config(REPO / "configs" / "local.yaml", overrides)
    Pipeline(cfg, tmp_path / "run").run(media("sam2_01_dog.mp4"))
    rows = Manifests(tmp_path / "run").rows(
        "SELECT caption_status, caption_reason, caption_error, caption_backend, caption_raw FROM caption"
    )
    assert rows
    for r in rows:
        assert r["caption_backend"] == f"openai:{model}"
        assert "attempts" not in (r["caption_error"] or ""), r  # the server answered every request
        assert r["caption_status"] == "ok" or r["caption_raw"], r  # nonsense is kept for inspection, not dropped


def test_gpu_bench_stages_part_runs_on_the_cpu(tmp_path: Path) -> None:
    """bench/gpu.py's stage part (run once on a lent GPU) on its CPU path: random weights, one captioned video."""
    import json
    import subprocess

    _need("sam2")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), "--part", "stages", "--device", "cpu", "--videos", "1",
         "--track-frames", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu-stages.json").read_text())
    got = {r["stage"]: r for r in res["stages"]}
    assert {"aesthetics", "watermark", "subjects"} <= set(got)
    assert all(r["clips"] >= 1 and r["errors"] == 0 and r["clips_per_s"] > 0 for r in got.values()), got
    assert got["subjects"]["backend"] == "reference" and "| subjects | reference |" in proc.stdout
