"""Streaming loader over the pipeline's WebDataset shards: shuffle buffer, resolution/length buckets, deterministic
resume, and decoding of mp4 frames, reference crops, mask tracks and caption spans into tensors.

Order of one epoch: shards in a seeded order (every `world_size`-th for this rank) -> samples as webdataset reads
them -> a seeded shuffle buffer -> per-bucket queues -> a batch whenever a bucket holds `batch_size` samples (at
the end of the epoch each bucket's leftovers form one short batch, or are dropped with `drop_last`). Everything up
to the batch uses only the sample's json, and the heavy decode happens only for samples in an emitted batch, so
resuming at `(epoch, batches)` replays the epoch without decoding and continues exactly where the interrupted run
stopped.
"""

from __future__ import annotations

import io
import json
import logging
import math
import queue
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import torch

from curation.errors import ConfigError
from curation.masks import rle_decode
from curation.train.config import DataConfig
from curation.train.text import Tokenizer, span_tokens, subject_spans
from curation.video import read_clip_frames

log = logging.getLogger(__name__)


@dataclass
class LoaderState:
    """Where the stream stands: batches already emitted in `epoch`. Saved with every checkpoint."""

    epoch: int = 0
    batches: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches}


@dataclass
class Plan:
    """What will be taken from one raw sample, decided from its json alone (cheap, deterministic)."""

    key: str
    bucket: tuple[int, int, int]  # (frames, height, width)
    stride: int
    members: dict[str, bytes] = field(repr=False, default_factory=dict)
    meta: dict[str, Any] = field(repr=False, default_factory=dict)


def list_shards(spec: str | Path) -> list[str]:
    """A folder of `shard-*.tar` (sorted) or a webdataset brace pattern."""
    p = Path(str(spec)).expanduser()
    if p.is_dir():
        found = sorted(str(x) for x in p.glob("shard-*.tar"))
        if not found:
            raise ConfigError(f"no shard-*.tar in {str(p)!r}: point --shards at a run's shards/ folder")
        return found
    import braceexpand

    found = [x for x in braceexpand.braceexpand(str(spec)) if Path(x).is_file()]
    if not found:
        raise ConfigError(f"no shard matches {str(spec)!r}: pass a folder of shard-*.tar or a brace pattern")
    return found


def _clip_frames(meta: dict[str, Any]) -> int:
    return int((meta.get("video") or {}).get("frames") or (meta.get("clip") or {}).get("num_frames") or 0)


class ShardStream:
    """Deterministic batches of decoded samples from WebDataset shards."""

    def __init__(
        self, shards: list[str], cfg: DataConfig, tokenizer: Tokenizer, seed: int, max_subjects: int, face_refs: bool
    ) -> None:
        if not shards:
            raise ConfigError("no shard to read")
        # each rank reads its own shards; with fewer shards than ranks, every rank reads them all and keeps every
        # world_size-th sample (same seeded order everywhere, so the ranks' samples never overlap)
        self.split_samples = len(shards) < cfg.world_size
        self.shards = list(shards) if self.split_samples else shards[cfg.rank :: cfg.world_size]
        self.cfg = cfg
        self.tok = tokenizer
        self.seed = seed
        self.max_subjects = max_subjects
        self.slots = 2 if face_refs else 1
        self.skipped: dict[str, str] = {}  # key -> why it cannot be used (logged once)
        self._aspects = sorted((math.log(w / h), (h, w)) for h, w in cfg.buckets)

    # -- the plan: json only ----------------------------------------------------------------------------------
    def _raw(self, epoch: int) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        order = list(self.shards)
        random.Random(f"{self.seed}:shards:{epoch}").shuffle(order)
        ds = wds.WebDataset(order, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)
        if not self.split_samples:
            yield from ds
            return
        for i, sample in enumerate(ds):
            if i % self.cfg.world_size == self.cfg.rank:
                yield sample

    def _plan(self, sample: dict[str, Any]) -> Plan | None:
        key = sample["__key__"]
        if "mp4" not in sample or "json" not in sample:
            return self._skip(key, "no mp4 or json member")
        meta = json.loads(sample["json"])
        n = _clip_frames(meta)
        vid = meta.get("video") or {}
        h, w = int(vid.get("height") or 0), int(vid.get("width") or 0)
        if n <= 0 or h <= 0 or w <= 0:
            return self._skip(key, "json lacks the packaged video's frames/size")
        for frames in self.cfg.frames:  # longest bucket the clip can fill, lowering the stride if needed
            for stride in range(self.cfg.frame_stride, 0, -1):
                if (frames - 1) * stride + 1 <= n:
                    a = math.log(w / h)
                    hb, wb = min(self._aspects, key=lambda x: abs(x[0] - a))[1]
                    return Plan(key, (frames, hb, wb), stride, sample, meta)
        return self._skip(key, f"{n} frames is shorter than the smallest frame bucket {min(self.cfg.frames)}")

    def _skip(self, key: str, why: str) -> None:
        if key not in self.skipped:
            self.skipped[key] = why
            log.warning("train data: skipping %s: %s", key, why)
        return None

    def _shuffled(self, epoch: int) -> Iterator[Plan]:
        rng = random.Random(f"{self.seed}:buffer:{epoch}")
        buf: list[Plan] = []
        for s in self._raw(epoch):
            p = self._plan(s)
            if p is None:
                continue
            if len(buf) < self.cfg.shuffle_buffer:
                buf.append(p)
                continue
            i = rng.randrange(len(buf))
            buf[i], p = p, buf[i]
            yield p
        rng.shuffle(buf)
        yield from buf

    def _plans(self, epoch: int) -> Iterator[list[Plan]]:
        queues: dict[tuple[int, int, int], list[Plan]] = {}
        for p in self._shuffled(epoch):
            q = queues.setdefault(p.bucket, [])
            q.append(p)
            if len(q) == self.cfg.batch_size:
                yield q
                queues[p.bucket] = []
        if not self.cfg.drop_last:  # the epoch's leftovers, one short batch per bucket, in a fixed order
            yield from (q for _, q in sorted(queues.items()) if q)

    # -- batches ----------------------------------------------------------------------------------------------
    def batches(self, state: LoaderState | None = None) -> Iterator[tuple[dict[str, Any], LoaderState]]:
        """Endless batches from `state` on; each comes with the state to save after training on it."""
        st = LoaderState(**(state.to_dict() if state else {}))
        while True:
            emitted = 0
            for plans in self._plans(st.epoch):
                emitted += 1
                if emitted <= st.batches:  # fast-forward: replayed from json only, nothing decoded
                    continue
                st = LoaderState(st.epoch, emitted)
                samples = []
                for p in plans:  # a sample that fails to decode is left out (deterministically: same bytes)
                    try:
                        samples.append(self.decode(p, st.epoch))
                    except Exception as exc:
                        self._skip(p.key, f"{type(exc).__name__}: {exc}")
                if samples:
                    yield self.collate(samples), st
            if emitted == 0:
                raise ConfigError(
                    f"the shards give no batch of {self.cfg.batch_size}: {len(self.skipped)} sample(s) skipped "
                    f"({'; '.join(sorted(set(self.skipped.values()))) or 'none readable'}); lower data.batch_size, "
                    "set data.drop_last: false, or add data.frames / data.buckets that the clips fit"
                )
            st = LoaderState(st.epoch + 1, 0)

    # -- decode -----------------------------------------------------------------------------------------------
    def decode(self, p: Plan, epoch: int) -> dict[str, Any]:
        frames_n, hb, wb = p.bucket
        meta, m = p.meta, p.members
        n = _clip_frames(meta)
        span = (frames_n - 1) * p.stride + 1
        subjects = self._subjects(meta, m)
        ref_frames = {  # frames of this clip a reference was cut from (a reference from another clip has none here)
            t.get(f"{r}_frame")
            for t in subjects
            for r in ("ref", "face_ref")
            if t.get(f"{r}_frame") is not None and t.get(f"{r}_source", "same_clip") == "same_clip"
        }
        starts = list(range(0, n - span + 1))
        clear = [s for s in starts if not any(s <= f < s + span for f in ref_frames)]  # keep refs out of targets
        rng = random.Random(f"{self.seed}:window:{epoch}:{p.key}")
        start = rng.choice(clear or starts)
        idx = [start + i * p.stride for i in range(frames_n)]
        video = _decode_frames(m["mp4"], idx, hb, wb)  # [F, H, W, 3] uint8 RGB

        k = len(subjects)
        refs = np.full((k, self.slots, self.cfg.ref_size, self.cfg.ref_size, 3), 255, np.uint8)
        ref_valid = np.zeros((k, self.slots), bool)
        masks = np.zeros((k, frames_n, hb, wb), np.uint8)
        mask_valid = np.zeros((k, frames_n), bool)
        doc = json.loads(m["masks.json"]) if "masks.json" in m else None
        caption = meta.get("caption") or ""
        enc = self.tok.encode(caption, self.cfg.text_len)
        subject_text = torch.zeros(k, self.cfg.text_len, dtype=torch.bool)
        by_id = {s["id"]: s for s in meta.get("subjects") or []}
        for j, t in enumerate(subjects):
            for slot, name in enumerate(("ref", "face_ref")[: self.slots]):
                ext = _member_ext(t.get(name))
                if ext in m:
                    refs[j, slot] = letterbox(decode_image(m[ext]), self.cfg.ref_size)
                    ref_valid[j, slot] = True
            if t.get("subject_id") is not None and t["subject_id"] in by_id:
                subject_text[j] = span_tokens(enc, subject_spans(by_id[t["subject_id"]]))
            if doc is not None and str(t["k"]) in doc["tracks"]:
                tracked, track = doc["frames"], doc["tracks"][str(t["k"])]
                done: dict[int, np.ndarray] = {}  # training frames near the same tracked frame share its mask
                for fi, f in enumerate(idx):
                    near = min(range(len(tracked)), key=lambda i: abs(tracked[i] - f))
                    if abs(tracked[near] - f) <= self.cfg.mask_max_gap:
                        if near not in done:
                            done[near] = _cover(rle_decode(track[near]), hb, wb, cv2.INTER_NEAREST)
                        masks[j, fi] = done[near]
                        mask_valid[j, fi] = True
        return {
            "key": p.key,
            "caption": caption,
            "frame_index": idx,
            "video": torch.from_numpy(video).permute(3, 0, 1, 2).float().div(127.5).sub(1.0),  # [3, F, H, W]
            "refs": torch.from_numpy(refs).permute(0, 1, 4, 2, 3).float().div(127.5).sub(1.0),  # [K, S, 3, r, r]
            "ref_valid": torch.from_numpy(ref_valid),
            "masks": torch.from_numpy(masks),
            "mask_valid": torch.from_numpy(mask_valid),
            "text_ids": torch.tensor(enc.ids, dtype=torch.long),
            "text_valid": torch.tensor(enc.valid, dtype=torch.bool),
            "subject_text": subject_text,
            "subject_ids": [t.get("subject_id") for t in subjects],
        }

    def _subjects(self, meta: dict[str, Any], members: dict[str, bytes]) -> list[dict[str, Any]]:
        """Tracks with a reference crop in the shard: linked to the caption first, then the largest."""
        tracks = [t for t in meta.get("tracks") or [] if _member_ext(t.get("ref")) in members]
        tracks.sort(key=lambda t: (t.get("subject_id") is None, -float(t.get("area") or 0), t["k"]))
        return tracks[: self.max_subjects]

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Stack samples of one bucket; subjects padded to the batch's largest count (padding is invalid)."""
        b = len(samples)
        k = max(len(s["subject_ids"]) for s in samples)
        f, h, w = samples[0]["video"].shape[1:]
        r = self.cfg.ref_size
        refs = torch.ones(b, k, self.slots, 3, r, r)
        ref_valid = torch.zeros(b, k, self.slots, dtype=torch.bool)
        masks = torch.zeros(b, k, f, h, w, dtype=torch.uint8)
        mask_valid = torch.zeros(b, k, f, dtype=torch.bool)
        subject_text = torch.zeros(b, k, self.cfg.text_len, dtype=torch.bool)
        for i, s in enumerate(samples):
            n = len(s["subject_ids"])
            refs[i, :n], ref_valid[i, :n] = s["refs"], s["ref_valid"]
            masks[i, :n], mask_valid[i, :n] = s["masks"], s["mask_valid"]
            subject_text[i, :n] = s["subject_text"]
        return {
            "keys": [s["key"] for s in samples],
            "captions": [s["caption"] for s in samples],
            "frame_index": [s["frame_index"] for s in samples],
            "video": torch.stack([s["video"] for s in samples]),
            "refs": refs,
            "ref_valid": ref_valid,
            "masks": masks,
            "mask_valid": mask_valid,
            "text_ids": torch.stack([s["text_ids"] for s in samples]),
            "text_valid": torch.stack([s["text_valid"] for s in samples]),
            "subject_text": subject_text,
            "subject_ids": [s["subject_ids"] for s in samples],
        }


T = TypeVar("T")


def prefetched(items: Iterator[T], depth: int) -> Iterator[T]:
    """`items` in the same order, produced by a background thread up to `depth` ahead.

    Decoding (PyAV, OpenCV, numpy) releases the GIL, so the next batches decode while the model steps. Order is
    kept, so resume positions are unchanged. The producer's exception is raised at the point it happened; closing
    the generator stops the thread.
    """
    if depth <= 0:
        yield from items
        return
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for it in items:
                if not put(("item", it)):
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(("error", exc))
            return
        finally:
            close = getattr(items, "close", None)
            if close is not None:  # release the source's files now, in the thread that ran it
                close()
        put(("end", None))

    thread = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


def _member_ext(member: str | None) -> str | None:
    """`<clip_id>.ref_0_subject.png` (the json's member name) -> `ref_0_subject.png` (webdataset's sample key)."""
    return member.split(".", 1)[1] if member else None


def decode_image(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("reference image does not decode")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def letterbox(img: np.ndarray, size: int) -> np.ndarray:
    """Fit inside size x size on white, aspect kept (references are subjects on a plain background)."""
    h, w = img.shape[:2]
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    out = np.full((size, size, 3), 255, np.uint8)
    y, x = (size - nh) // 2, (size - nw) // 2
    out[y : y + nh, x : x + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    return out


def _cover(img: np.ndarray, h: int, w: int, interp: int) -> np.ndarray:
    """Scale to cover h x w, then centre-crop: frames and masks get the same transform."""
    ih, iw = img.shape[:2]
    s = max(h / ih, w / iw)
    nh, nw = max(h, math.ceil(ih * s)), max(w, math.ceil(iw * s))
    img = cv2.resize(img, (nw, nh), interpolation=interp)
    y, x = (nh - h) // 2, (nw - w) // 2
    return img[y : y + h, x : x + w]


def _decode_frames(mp4: bytes, idx: list[int], h: int, w: int) -> np.ndarray:
    """Frames `idx` of the shard's mp4 (numbered like the pipeline numbers them) resized to cover h x w, RGB uint8."""
    got = read_clip_frames(io.BytesIO(mp4), 0, sorted(set(idx)))
    missing = [i for i in idx if i not in got]
    if missing:
        raise ValueError(f"mp4 has no frame {missing[0]} (decoded {len(got)} of {len(set(idx))})")
    return np.stack([_cover(cv2.cvtColor(got[i], cv2.COLOR_BGR2RGB), h, w, cv2.INTER_AREA) for i in idx])
