"""The trainer's loader over real shards made by the pipeline: bucket shapes, caption spans -> tokens, masks aligned
with tracked frames, one pass per epoch, exact resume, and bad samples skipped instead of crashing."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from curation.errors import ConfigError  # noqa: E402
from curation.train.config import DataConfig  # noqa: E402
from curation.train.data import LoaderState, ShardStream, list_shards  # noqa: E402
from curation.train.text import ByteTokenizer  # noqa: E402

BUCKETS = [(64, 64), (48, 80), (80, 48)]


def _stream(run: Path, seed: int = 0, **data: object) -> ShardStream:
    cfg = DataConfig(**{"buckets": BUCKETS, "frames": [9, 5], "text_len": 128, "mask_max_gap": 12, **data})
    return ShardStream(list_shards(run / "shards"), cfg, ByteTokenizer(), seed, max_subjects=4, face_refs=True)


def _shard_samples(run: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for shard in list_shards(run / "shards"):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def _take(stream: ShardStream, n: int, state: LoaderState | None = None) -> list[tuple[dict, LoaderState]]:
    out = []
    for item in stream.batches(state):
        out.append(item)
        if len(out) == n:
            break
    return out


def test_batches_have_bucket_shapes(overfit_run: Path) -> None:
    for batch, _ in _take(_stream(overfit_run), 6):
        b, c, f, h, w = batch["video"].shape
        k = batch["refs"].shape[1]
        assert c == 3 and f in (9, 5) and (h, w) in BUCKETS
        assert batch["refs"].shape == (b, k, 2, 3, 32, 32)
        assert batch["masks"].shape == (b, k, f, h, w) and batch["mask_valid"].shape == (b, k, f)
        assert batch["text_ids"].shape == batch["text_valid"].shape == (b, 128)
        assert batch["subject_text"].shape == (b, k, 128)
        assert batch["video"].min() >= -1 and batch["video"].max() <= 1
        assert batch["ref_valid"][:, :, 0].any(), "every clip here has at least one subject crop"


def test_caption_spans_map_to_the_subjects_tokens(overfit_run: Path) -> None:
    samples = _shard_samples(overfit_run)
    checked = 0
    for batch, _ in _take(_stream(overfit_run, batch_size=1), 4):
        meta = json.loads(samples[batch["keys"][0]]["json"])
        names = {s["id"]: s["name"] for s in meta["subjects"]}
        ids = batch["text_ids"][0]
        for j, sid in enumerate(batch["subject_ids"][0]):
            sel = batch["subject_text"][0, j]
            words = bytes(int(t) - ByteTokenizer.offset for t in ids[sel]).decode()
            if sid is None:
                assert not sel.any()  # an unlinked track owns no words
                continue
            assert names[sid] in words
            others = [n for i, n in names.items() if i != sid and n not in names[sid]]
            assert not any(f" {o} " in f" {words} " for o in others), (words, others)
            checked += 1
    assert checked >= 4


def test_masks_are_valid_exactly_on_tracked_frames(overfit_run: Path) -> None:
    samples = _shard_samples(overfit_run)
    seen_valid = 0
    for batch, _ in _take(_stream(overfit_run, batch_size=1, mask_max_gap=0, frame_stride=1), 8):
        doc = json.loads(samples[batch["keys"][0]]["masks.json"])
        idx = batch["frame_index"][0]
        k = batch["refs"].shape[1]
        for j in range(k):
            for fi, f in enumerate(idx):
                assert bool(batch["mask_valid"][0, j, fi]) == (f in doc["frames"])
                if f in doc["frames"]:
                    seen_valid += 1
        assert not batch["masks"][0][~batch["mask_valid"][0]].any()
    assert seen_valid > 0


def test_each_epoch_is_one_pass_and_epochs_are_reshuffled(overfit_run: Path) -> None:
    keys = sorted(_shard_samples(overfit_run))
    stream = _stream(overfit_run, batch_size=1, buckets=[(64, 64)], shuffle_buffer=2)
    by_epoch: dict[int, list[str]] = {}
    for batch, st in _take(stream, 4 * len(keys)):
        by_epoch.setdefault(st.epoch, []).extend(batch["keys"])
    assert all(sorted(v) == keys for v in by_epoch.values()), by_epoch
    assert len({tuple(v) for v in by_epoch.values()}) > 1  # not the same order every epoch


def test_short_batches_end_each_epoch_unless_dropped(overfit_run: Path) -> None:
    keys = sorted(_shard_samples(overfit_run))
    stream = _stream(overfit_run, batch_size=len(keys) + 4)  # more than there are clips
    seen = [(b["keys"], st) for b, st in _take(stream, 6)]
    epoch0 = [k for ks, st in seen if st.epoch == 0 for k in ks]
    assert sorted(epoch0) == keys and all(0 < len(ks) < len(keys) + 4 for ks, _ in seen)
    with pytest.raises(ConfigError, match="drop_last"):
        _take(_stream(overfit_run, batch_size=len(keys) + 4, drop_last=True), 1)


def test_resume_continues_exactly(overfit_run: Path) -> None:
    full = _take(_stream(overfit_run), 7)
    cut = 3
    resumed = _take(_stream(overfit_run), len(full) - cut, full[cut - 1][1])
    for (a, sa), (b, sb) in zip(full[cut:], resumed, strict=True):
        assert a["keys"] == b["keys"] and a["frame_index"] == b["frame_index"] and sa == sb
        for name in ("video", "refs", "masks", "text_ids", "subject_text"):
            assert torch.equal(a[name], b[name]), name
    other = _take(_stream(overfit_run, seed=1), 7)
    assert [b["keys"] for b, _ in other] != [b["keys"] for b, _ in full]


def test_bad_samples_are_skipped_with_a_reason(overfit_run: Path, tmp_path: Path) -> None:
    good = _shard_samples(overfit_run)
    key, members = sorted(good.items())[0]
    shards = tmp_path / "shards"
    shards.mkdir()

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(shards / "shard-000000.tar", "w") as tar:
        for ext, data in members.items():
            add(tar, f"{key}.{ext}", data)
        add(tar, "nomp4.json", members["json"])  # json but no video
        add(tar, "garbage.json", members["json"])
        add(tar, "garbage.mp4", b"\x00not an mp4" * 100)  # undecodable video
    cfg = DataConfig(buckets=BUCKETS, frames=[9, 5], batch_size=1, text_len=128)
    stream = ShardStream(list_shards(shards), cfg, ByteTokenizer(), 0, 4, True)
    got = [b["keys"][0] for b, _ in _take(stream, 3)]
    assert got == [key] * 3
    assert set(stream.skipped) == {"nomp4", "garbage"}
    assert "no mp4" in stream.skipped["nomp4"] and stream.skipped["garbage"]


def test_prefetched_batches_equal_the_plain_loader(overfit_run: Path) -> None:
    """Decoding ahead in a thread changes when a batch is decoded, never which batch comes next (resume relies on
    it)."""
    from contextlib import closing

    from curation.train.data import prefetched

    plain = _take(_stream(overfit_run), 7)
    with closing(prefetched(_stream(overfit_run).batches(), 2)) as it:
        ahead = [next(it) for _ in range(7)]
    assert [s for _, s in ahead] == [s for _, s in plain]
    for (a, _), (b, _) in zip(ahead, plain, strict=True):
        assert a["keys"] == b["keys"]
        for name in ("video", "refs", "masks", "mask_valid", "text_ids", "subject_text"):
            assert torch.equal(a[name], b[name]), name


def test_prefetch_raises_where_the_source_failed_and_stops_its_thread() -> None:
    import threading
    from contextlib import closing

    from curation.train.data import prefetched

    def source():
        yield 1
        yield 2
        raise ConfigError("shards gone")

    it = prefetched(source(), 4)
    assert next(it) == 1 and next(it) == 2
    with pytest.raises(ConfigError, match="shards gone"):
        next(it)

    released = []

    def endless():
        n = 0
        try:
            while True:
                n += 1
                yield n
        finally:
            released.append(n)  # the source's files would be closed here

    src = endless()  # held here, so only an explicit close (not garbage collection) can release it
    with closing(prefetched(src, 3)) as it:
        assert [next(it) for _ in range(5)] == [1, 2, 3, 4, 5]
    assert not any(t.name == "batch-prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(released) == 1
