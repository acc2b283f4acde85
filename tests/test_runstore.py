"""Commit records of a run directory on object storage (`curation.runstore`), on fsspec's in-memory filesystem (a
real fsspec implementation; the S3 server runs in tests/test_s3.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec

from curation.runstore import FETCHED_NS, RunStore, attempt_dir, local, register_run


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


def _records(store: RunStore) -> list[str]:
    return fsspec.filesystem("memory").find(store.remote("_commits"))


def test_a_workers_files_reach_another_node_through_the_store_and_go_up_once(tmp_path: Path) -> None:
    """Two nodes stage the run in folders of their own (same run hash, different disks): what a worker on one
    pushed, a worker on the other fetches on a miss; the driver beside the first worker does not send it again."""
    uri = _new_uri()
    a = RunStore(uri, tmp_path / "node-a" / "run0")
    b = RunStore(uri, tmp_path / "node-b" / "run0")
    _write(a.staging, "frames/v1/cut/c1.npz", b"samples one")
    _write(a.staging, "frames/v1/cut/c2.npz", b"samples two")
    _write(a.staging, "manifests/scenecut/part-1.parquet", b"part")
    written = [a.staging / "frames/v1/cut/c1.npz", a.staging / "frames/v1/cut/c2.npz"]
    assert a.push_files([*written, a.staging / "manifests/scenecut/part-1.parquet", a.staging / "gone.npz"]) == 3
    assert len(_records(a)) == 1  # one record for the batch
    assert a.committed() == ["frames/v1/cut/c1.npz", "frames/v1/cut/c2.npz", "manifests/scenecut/part-1.parquet"]
    # node b: a path a node recorded (its disk is not this one), found in b's staging folder, fetched on the miss
    elsewhere = tmp_path / "node-x" / "run0"
    register_run(b.staging, b)
    try:
        got = local(str(elsewhere / "frames/v1/cut/c1.npz"))
        assert got == b.staging / "frames/v1/cut/c1.npz" and got.read_bytes() == b"samples one"
        folder = local(str(elsewhere / "frames/v1/cut"), tree=True)  # a cut's folder: every clip's samples
        assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["c1.npz", "c2.npz"]
        assert local(str(elsewhere / "frames/v9/none.npz")) == b.staging / "frames/v9/none.npz"  # nothing to bring
        assert not (b.staging / "frames/v9").exists()
        assert local("/some/other/file.npz") == Path("/some/other/file.npz")  # outside the run: itself
    finally:
        register_run(tmp_path, None)
    # the driver on node a: the worker's files are committed already, nothing goes up again
    assert a.push() == 0 and len(_records(a)) == 1
    _write(a.staging, "config.yaml", b"driver's own")
    assert a.push() == 1
    # a removal the driver makes of an adopted file is committed (compaction folding a worker's part)
    (a.staging / "manifests/scenecut/part-1.parquet").unlink()
    a.push()
    assert "manifests/scenecut/part-1.parquet" not in a.committed()


def test_commit_records_fold_into_one_and_discarded_files_leave_the_store(tmp_path: Path) -> None:
    uri = _new_uri()
    a = RunStore(uri, tmp_path / "a" / "run0")
    for i in range(5):
        _write(a.staging, f"clips/c{i}.mp4", b"x" * (i + 1))
        a.push_files([a.staging / f"clips/c{i}.mp4"])
    before = a.committed()
    assert len(before) == 5 and len(_records(a)) == 5
    assert a.compact_records(keep=16) == 0  # few records: left alone
    assert a.compact_records(keep=2) == 5
    assert len(_records(a)) == 1 and a.committed() == before
    assert RunStore(uri, tmp_path / "fresh" / "run0").committed_sigs()["clips/c3.mp4"][0] == 4
    # a record written while the compaction ran, named before its snapshot, still counts
    fs = fsspec.filesystem("memory")
    fs.pipe_file(a.remote("_commits/00000000000000000001-late.json"), b'{"files": ["clips/late.mp4"]}')
    assert "clips/late.mp4" in RunStore(uri, tmp_path / "fresh2" / "run0").committed()
    fs.rm_file(a.remote("_commits/00000000000000000001-late.json"))
    a.discard([a.staging / "clips/c0.mp4", a.staging / "clips/c1.mp4"])
    assert a.committed() == before[2:]
    assert not fsspec.filesystem("memory").exists(a.remote("clips/c0.mp4"))
    b = RunStore(uri, tmp_path / "b" / "run0")
    assert b.pull() == 3 and not (b.staging / "clips/c0.mp4").exists()


def test_a_fetched_copy_never_goes_back_and_a_stale_one_is_replaced(tmp_path: Path) -> None:
    uri = _new_uri()
    w = RunStore(uri, tmp_path / "worker" / "run0")
    _write(w.staging, "subjects/v1/c1.ab12cd34/masks.json", b"first")
    w.push_files([w.staging / "subjects/v1/c1.ab12cd34/masks.json"])
    d = RunStore(uri, tmp_path / "driver" / "run0")
    assert d.fetch(d.staging / "subjects/v1/c1.ab12cd34", tree=True) == 1
    n = len(_records(d))
    assert d.push() == 0 and len(_records(d)) == n  # a copy of the store's: not sent back
    _write(w.staging, "subjects/v1/c1.ab12cd34/masks.json", b"second, longer")  # rewritten elsewhere
    w.push_files([w.staging / "subjects/v1/c1.ab12cd34/masks.json"])
    d2 = RunStore(uri, tmp_path / "driver2" / "run0")
    d2.fetch(d2.staging / "subjects/v1/c1.ab12cd34/masks.json")
    (d2.staging / "subjects/v1/c1.ab12cd34/masks.json").write_bytes(b"first")  # a stale copy, as fetched
    import os

    os.utime(d2.staging / "subjects/v1/c1.ab12cd34/masks.json", ns=(0, FETCHED_NS))
    assert d2.pull() == 1 and (d2.staging / "subjects/v1/c1.ab12cd34/masks.json").read_bytes() == b"second, longer"


def test_a_removal_sorts_after_the_record_it_removes_whatever_the_clocks(tmp_path: Path, monkeypatch) -> None:
    """A worker whose clock runs an hour ahead commits a clip; the driver, reading that record, then discards it:
    its record must come after in commit order, or the clip would come back as committed."""
    import time as real_time

    uri = _new_uri()
    w = RunStore(uri, tmp_path / "w" / "run0")
    _write(w.staging, "clips/c1.mp4", b"clip")
    ahead = real_time.time_ns() + 3600 * 10**9
    monkeypatch.setattr("curation.runstore.time.time_ns", lambda: ahead)
    w.push_files([w.staging / "clips/c1.mp4"])
    monkeypatch.undo()
    d = RunStore(uri, tmp_path / "d" / "run0")
    assert d.committed() == ["clips/c1.mp4"]
    d.discard([d.staging / "clips/c1.mp4"])
    assert d.committed() == [] and RunStore(uri, tmp_path / "x" / "run0").committed() == []


def test_local_paths_of_a_run_not_on_object_storage(tmp_path: Path) -> None:
    """A local run: a path that exists is itself, even when a folder on the way has the run folder's name; a run
    folder moved elsewhere still finds its files; a new attempt folder replaces the clip's older ones."""
    run = tmp_path / "demo" / "work" / "demo"  # "demo" twice on the way
    _write(run, "frames/v/cut/c1.npz", b"x")
    register_run(run, None)
    try:
        assert local(str(run / "frames/v/cut/c1.npz")) == run / "frames/v/cut/c1.npz"
        moved = tmp_path / "moved" / "demo"
        moved.parent.mkdir()
        run.rename(moved)
        register_run(moved, None)
        assert local(str(run / "frames/v/cut/c1.npz")) == moved / "frames/v/cut/c1.npz"
        assert local(str(run / "frames/v/cut/nope.npz")) == run / "frames/v/cut/nope.npz"  # not here either: itself
    finally:
        register_run(tmp_path, None)
    run = moved
    first = attempt_dir(run / "subjects" / "v", "c1")
    (first / "masks.json").write_text("{}")
    other = attempt_dir(run / "subjects" / "v", "c10")  # another clip whose id starts the same: kept
    second = attempt_dir(run / "subjects" / "v", "c1")
    assert second != first and not first.exists() and other.exists()
