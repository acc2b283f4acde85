"""Commit records of a run directory on object storage (`curation.runstore`), on fsspec's in-memory filesystem (a
real fsspec implementation; the S3 server runs in tests/test_s3.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec

from curation.runstore import RunStore


def _new_uri() -> str:
    return f"memory://bucket-{uuid.uuid4().hex[:8]}/run"


def _write(root: Path, rel: str, data: bytes) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def test_push_commits_and_a_fresh_staging_folder_pulls_the_same_files(tmp_path: Path) -> None:
    uri = _new_uri()
    a = RunStore(uri, tmp_path / "a")
    _write(a.staging, "manifests/probe/part-1.parquet", b"part one")
    _write(a.staging, "frames/v1/cut/c1.npz", b"samples")
    _write(a.staging, "tmp/inputs-x/input-0.parquet", b"driver scratch")  # never goes up
    _write(a.staging, "manifests/probe/.part-2.parquet.ab12.tmp", b"half written")  # never goes up
    assert a.push() == 2
    assert a.committed() == ["frames/v1/cut/c1.npz", "manifests/probe/part-1.parquet"]
    assert a.push() == 0  # nothing new
    b = RunStore(uri, tmp_path / "b")
    assert b.pull() == 2
    assert (b.staging / "frames/v1/cut/c1.npz").read_bytes() == b"samples"


def _one_part_pushed(tmp_path: Path) -> tuple[str, RunStore]:
    uri = _new_uri()
    a = RunStore(uri, tmp_path / "a")
    _write(a.staging, "manifests/probe/part-1.parquet", b"one")
    a.push()
    return uri, a


def test_an_object_no_record_lists_is_not_committed(tmp_path: Path) -> None:
    uri, a = _one_part_pushed(tmp_path)
    fs = fsspec.filesystem("memory")
    fs.pipe_file(a.remote("manifests/probe/part-9.parquet"), b"a push cut short")
    assert a.committed() == ["manifests/probe/part-1.parquet"]
    b = RunStore(uri, tmp_path / "b")
    b.pull()
    assert not (b.staging / "manifests/probe/part-9.parquet").exists()


def test_local_removals_are_committed_and_deleted(tmp_path: Path) -> None:
    uri = _new_uri()
    a = RunStore(uri, tmp_path / "a")
    _write(a.staging, "manifests/probe/part-1.parquet", b"one")
    _write(a.staging, "manifests/probe/part-2.parquet", b"two")
    a.push()
    (a.staging / "manifests/probe/part-1.parquet").unlink()  # folded by a compaction
    _write(a.staging, "manifests/probe/part-3-compact.parquet", b"one+two")
    a.push()
    assert a.committed() == ["manifests/probe/part-2.parquet", "manifests/probe/part-3-compact.parquet"]
    assert not fsspec.filesystem("memory").exists(a.remote("manifests/probe/part-1.parquet"))


def test_pull_keeps_local_work_that_was_not_pushed(tmp_path: Path) -> None:
    """A killed run's staging folder holds files it changed after its last push: a rerun's pull must not replace
    them with the older committed copies."""
    uri = _new_uri()
    a = RunStore(uri, tmp_path / "a")
    _write(a.staging, "logs/curation.log", b"line 1\n")
    a.push()
    _write(a.staging, "logs/curation.log", b"line 1\nline 2 (not pushed)\n")
    assert a.pull() == 0
    assert (a.staging / "logs/curation.log").read_bytes().endswith(b"line 2 (not pushed)\n")
    assert a.push() == 1  # and it goes up next


def test_a_store_emptied_behind_the_staging_folder_gets_everything_again(tmp_path: Path) -> None:
    _, a = _one_part_pushed(tmp_path)
    fs = fsspec.filesystem("memory")
    fs.rm(a.root, recursive=True)  # the run was removed on the store and restarted
    a.pull()
    assert a.push() == 1 and a.committed() == ["manifests/probe/part-1.parquet"]


def test_a_partial_pull_brings_only_the_prefixes_asked_for(tmp_path: Path) -> None:
    uri = _new_uri()
    a = RunStore(uri, tmp_path / "a")
    _write(a.staging, "manifests/probe/part-1.parquet", b"one")
    _write(a.staging, "config.yaml", b"stages: [probe]")
    _write(a.staging, "frames/v1/cut/c1.npz", b"samples")
    a.push()
    b = RunStore(uri, tmp_path / "b")
    assert b.pull(("manifests/", "config.yaml")) == 2
    assert not (b.staging / "frames").exists()
    assert b.push() == 0  # what was not pulled is not taken for removed either
    assert "frames/v1/cut/c1.npz" in b.committed()
