"""The PaddleOCR lane (issue 17): the `ocr` stage's reference backend, PaddleOCR 3 on paddlepaddle, driven through a
real pipeline run on the CPU with random PP-OCRv5 server models written in PaddleOCR's own inference format
(`bench/random_paddleocr.py`: PaddleX's architectures, exported with `paddle.jit.save`). It runs in its own
virtualenv (`make test-reference` builds `.venv-paddle`: paddlepaddle's OpenMP and paddlex's GUI OpenCV clash with
torch's and ours); in the other venvs it skips.

What it shows: the backend finds its model folders under `models_dir`, PaddleOCR 3 loads them, detects and
recognises on real frames, and the stage turns its results into the manifest's boxes and texts; `curation report`
reads the run. What it cannot show: quality (random weights) and GPU speed."""

from __future__ import annotations

import json
import os
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.reference
IN_LANE = os.environ.get("CURATION_REFERENCE_LANE") == "paddle"  # `make test-reference` sets it for this file
if IN_LANE:
    import paddle  # noqa: F401  (in the lane a missing library is a failure, never a skip)
    import paddleocr  # noqa: F401
else:
    pytest.importorskip("paddle")  # the `gpu` extra has paddleocr without paddlepaddle
    pytest.importorskip("paddleocr")

from curation.config import load_config  # noqa: E402
from curation.manifest import Manifests  # noqa: E402
from curation.pipeline import Pipeline  # noqa: E402
from tests.conftest import REPO, media  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
import random_paddleocr  # noqa: E402


@pytest.fixture(scope="module")
def ocr_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("paddle")
    models = tmp / "models"
    random_paddleocr.paddleocr_models(models)
    overrides = [
        "runner=local",
        "progress=false",
        "stages=[probe,scenecut,ocr,package]",
        "ocr.backend=reference",
        f"ocr.models_dir={models}",
        "ocr.resources.gpus=0",  # paddlepaddle from PyPI is the CPU build
        # random weights: a pixel map around 0.6 and recognition scores around 0.03, so keep what they give
        "ocr.det_thresh=0.5",
        "ocr.det_box_thresh=0.01",
        "ocr.min_box_score=0.0",
        "ocr.max_frames=2",
        "ocr.max_text_area=1.0",  # and let the clip on to the shards whatever the random boxes cover
        "ocr.reject_overlays=false",
    ]
    Pipeline(load_config(REPO / "configs" / "local.yaml", overrides), tmp / "run").run(media("sam2_01_dog.mp4"))
    return tmp / "run"


def test_paddleocr_reference_reads_its_model_folders_and_scores_real_clips(ocr_run: Path) -> None:
    rows = Manifests(ocr_run).rows(
        "SELECT clip_id, ocr_backend, ocr_status, ocr_error, ocr_boxes, ocr_text_area, ocr_texts, package_status "
        "FROM clips WHERE ocr_status IS NOT NULL"
    )
    assert rows, "no clip reached ocr"
    allowed = {chr(c) for c in range(33, 127)} | {" "}
    boxes = []
    for r in rows:
        assert r["ocr_backend"] == "reference:paddleocr" and r["ocr_status"] == "ok", r
        assert r["ocr_error"] is None and 0 <= r["ocr_text_area"] <= 1
        assert r["package_status"] == "ok", r
        boxes += json.loads(r["ocr_boxes"])
    assert any(r["ocr_text_area"] > 0 and r["ocr_texts"] for r in rows), rows
    assert boxes, "PaddleOCR found no box in any sample"
    for b in boxes:
        assert len(b["box"]) == 4 and all(0 <= x <= 1 and 0 <= y <= 1 for x, y in b["box"]), b
        assert set(b["text"]) <= allowed and 0 <= b["score"] <= 1, b  # the random recogniser's character set
    assert any(b["text"] for b in boxes)
    # what rapidocr's trained recogniser would never give: the random one is unsure of everything
    assert max(b["score"] for b in boxes) < 0.5, sorted(b["score"] for b in boxes)[-3:]
    # the clip's shard member carries the ocr scores
    shards = sorted((ocr_run / "shards").rglob("*.tar"))
    assert shards
    with tarfile.open(shards[0]) as tar:
        metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    assert metas and all("ocr_text_area" in m["scores"] for m in metas), metas[:1]
    assert all(m["provenance"]["ocr"]["backend"] == "reference:paddleocr" for m in metas)


def test_report_reads_a_paddleocr_run(ocr_run: Path) -> None:
    from curation.cli import main

    assert main(["report", str(ocr_run), "--out", str(ocr_run / "report.html")]) == 0
    assert "ocr_text_area" in (ocr_run / "report.html").read_text()
