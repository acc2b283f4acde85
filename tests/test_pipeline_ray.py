"""The whole spine through the Ray runner on ../shared/media/video: every input accounted for, shards readable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import webdataset as wds

from curation.config import DEFAULT_STAGES, build_config
from curation.manifest import Manifests
from curation.pipeline import Pipeline
from tests.conftest import VIDEOS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory: pytest.TempPathFactory, ray_cluster: None, ffmpeg: str) -> Path:
    run = tmp_path_factory.mktemp("ray_run")
    cfg = build_config(
        {
            "runner": "ray",
            "progress": False,
            "ray": {"streaming": True},  # what auto does on this one CPU-only machine (with the CPU stages fused)
            "package": {"shard_size": 8},
            "subjects": {"track_frames": 4},
        }
    )
    reports = Pipeline(cfg, run).run(str(VIDEOS))
    assert [r.name for r in reports] == DEFAULT_STAGES
    return run


def test_every_input_video_has_a_row(ray_run: Path) -> None:
    m = Manifests(ray_run)
    files = sorted(str(p) for p in VIDEOS.iterdir() if p.is_file() and p.suffix != ".md")
    videos = {r["uri"]: r for r in m.rows("SELECT * FROM videos")}
    assert sorted(videos) == files
    assert all(v["status"] in ("ok", "reject", "error") for v in videos.values())
    trunc = videos[str(VIDEOS / "robustness_hamilton_clip_truncated_1MiB.mp4")]
    assert trunc["status"] == "error" and trunc["probe_status"] == "error"
    assert "moov atom not found" in trunc["probe_error"] or "Invalid data" in trunc["probe_error"]
    tiny = videos[str(VIDEOS / "decord_video_90.mov")]  # 3 frames: rejected with its score recorded
    assert (tiny["probe_status"], tiny["probe_reason"]) == ("reject", "duration")
    assert tiny["probe_duration_s"] == pytest.approx(0.1, abs=0.02) and tiny["probe_rotation"] == -90
    vp9 = videos[str(VIDEOS / "derived_transcodes_bedroom_vp9.webm")]
    # the vp9 webm is a transcode of sam2_bedroom.mp4: decodes fine, and dedup keeps the mp4's clip instead
    assert vp9["probe_codec"] == "vp9" and (vp9["status"], vp9["reason"]) == ("reject", "no_clip_kept")
    readable = [v for v in videos.values() if v["probe_status"] == "ok"]
    dups = {
        r["video_id"] for r in Manifests(ray_run).rows("SELECT video_id FROM clips WHERE dedup_reason = 'duplicate'")
    }
    assert vp9["video_id"] in dups
    ok = sum(v["status"] == "ok" for v in readable)
    # 11 kept a clip before dedup (vtest's small walkers are not near-static since motion v4; the meeting since
    # subjects v11, whose face-first tracks make 6 subjects of its five people where there were 9); 5 had none
    assert len(readable) == 16 and ok + len(dups) == 11
    for v in readable:  # ok only with a clip that survived every stage; otherwise it says why not
        assert (v["status"] == "ok") == (v["n_clips_kept"] > 0), v["uri"]
        if v["status"] != "ok":
            assert (v["status"], v["reason"]) in (("reject", "scenecut:no_usable_clips"), ("reject", "no_clip_kept"))


def test_clip_statuses_and_cuts(ray_run: Path) -> None:
    m = Manifests(ray_run)
    rows = m.rows("SELECT * FROM clips")
    assert len({r["clip_id"] for r in rows}) == len(rows)  # no duplicate clips
    assert all("." not in r["clip_id"] for r in rows)
    ham = [r for r in rows if r["uri"].endswith("face_recognition_short_hamilton_clip.mp4")]
    assert sorted((r["scenecut_start_frame"], r["scenecut_end_frame"]) for r in ham) == [
        (0, 20),
        (20, 82),
        (82, 211),
        (211, 275),
    ]
    first = next(r for r in ham if r["scenecut_start_frame"] == 0)
    assert (first["status"], first["reason"]) == ("reject", "scenecut:too_short")  # 20 frames < 1 s
    assert first["scenecut_duration_s"] == pytest.approx(20 / 29.97, rel=1e-3)
    kept = [r for r in rows if r["status"] == "ok"]
    assert kept and all(r["package_status"] == "ok" and r["shard"] for r in kept)
    # filters reject with their stage and reason, scores recorded
    subs = [r for r in rows if r["uri"].endswith("subtitles_rapidvideocr_1.mp4") and r["scenecut_status"] == "ok"]
    assert subs and all(r["status"] == "reject" for r in subs)
    assert {r["reason"].split(":")[0] for r in subs} <= {"motion", "watermark", "ocr"}
    static = [r for r in rows if "S001C001" in r["uri"]]
    assert [(r["status"], r["reason"]) for r in static] == [("reject", "motion:static")]
    assert static[0]["motion_score"] < 0.01
    assert all(r["status"] in ("ok", "reject", "error") for r in rows)
    # long static scenes are split at max_clip_s (15 s): the 23 s traffic camera gives two clips
    traffic = sorted(
        (r["scenecut_start_frame"], r["scenecut_start_reason"])
        for r in rows
        if r["uri"].endswith("dvr_scan_traffic_camera.mp4")
    )
    assert traffic == [(0, "start"), (375, "split")]


def test_shards_read_back_with_webdataset(ray_run: Path) -> None:
    m = Manifests(ray_run)
    kept = {r["clip_id"]: r for r in m.rows("SELECT * FROM clips WHERE status = 'ok'")}
    shards = sorted((ray_run / "shards").glob("shard-*.tar"))
    assert [p.name for p in shards] == [f"shard-{i:06d}.tar" for i in range(len(shards))]
    seen = {}
    for sample in wds.WebDataset([str(p) for p in shards], shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        assert sample["__key__"] == meta["clip_id"]
        assert sample["mp4"][4:8] == b"ftyp"
        seen[meta["clip_id"]] = meta
    assert set(seen) == set(kept)
    index = {r["clip_id"]: r["shard"] for r in m.rows("SELECT * FROM shards")}
    assert set(index) == set(kept)
    some = next(iter(seen.values()))
    row = kept[some["clip_id"]]
    assert some["clip"]["start_frame"] == row["scenecut_start_frame"]
    assert some["video"]["frames"] == row["scenecut_num_frames"]
    assert set(some["provenance"]) >= set(DEFAULT_STAGES)
    assert some["provenance"]["aesthetics"]["backend"] == "embedded:quality-proxy"
    assert {"motion_score", "aesthetics_score", "watermark_score", "ocr_text_area"} <= set(some["scores"])


def test_streamed_stages_leave_nothing_to_redo(ray_run: Path) -> None:
    """On Ray the ungrouped stages ran as streaming chains (probe..nsfw, caption+subjects, package alone after
    identity). The fingerprints the workers computed between stages equal the driver's query, so a rerun finds
    nothing missing or stale in any stage."""
    cfg = build_config(
        {"runner": "ray", "progress": False, "ray": {"streaming": True}, "subjects": {"track_frames": 4}}
    )
    pipe = Pipeline(cfg, ray_run)
    runner = pipe.runner()
    assert pipe.segments(runner) == [
        ["probe", "scenecut", "motion", "aesthetics", "ocr", "watermark", "nsfw"],
        ["dedup"],
        ["caption", "subjects"],
        ["identity"],
        ["crops", "package"],
    ]
    modes = {r["stage"]: r["mode"] for r in Manifests(ray_run).rows("SELECT stage, mode FROM stage_runs")}
    assert modes == {n: "streaming" if n not in ("dedup", "identity") else "stage" for n in DEFAULT_STAGES}
    for name in DEFAULT_STAGES:
        assert pipe.inputs(name) == [], name  # a fingerprint that differed would make the row count as missing


def test_a_chain_whose_later_stage_reads_an_earlier_ones_columns_runs_on_a_fresh_run(
    tmp_path: Path, ray_cluster: None
) -> None:
    """Without dedup and identity in `stages`, every stage streams in one chain on a fresh run: crops reads caption's
    and subjects' columns, which no manifest holds before the chain runs (this stopped the run with a config
    error)."""
    stages = ["probe", "scenecut", "caption", "subjects", "crops", "package"]
    overrides = {"stages": stages, "subjects": {"track_frames": 3}}
    cfg = build_config({"runner": "ray", "progress": False, "ray": {"streaming": True}, **overrides})
    pipe = Pipeline(cfg, tmp_path / "run")
    assert pipe.segments(pipe.runner()) == [stages]  # one chain: no grouped stage between them
    reports = pipe.run(str(VIDEOS / "sam2_01_dog.mp4"))
    assert [r.name for r in reports] == stages
    m = Manifests(tmp_path / "run")
    (crop,) = m.rows("SELECT crops_status, subjects_status FROM clips WHERE scenecut_status = 'ok'")
    assert crop["subjects_status"] == "ok" and crop["crops_status"] in ("ok", "reject"), crop
    modes = {r["stage"]: r["mode"] for r in m.rows("SELECT stage, mode FROM stage_runs")}
    assert modes["crops"] == "streaming", modes
