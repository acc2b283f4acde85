"""WebDataset shards of the packaged clips: `shards/shard-%06d.tar`, per clip `<clip_id>.mp4`, `<clip_id>.json`
and, when the subjects stage ran, `<clip_id>.masks.json` (COCO RLE tracks), `<clip_id>.ref_<k>_face.jpg` and
`<clip_id>.ref_<k>_subject.png`.

Shards are numbered from the shard index (the `shards` manifest table), written to a temp name and renamed, and
indexed right after: a shard file that exists but is not indexed (the writer was killed in between) is simply
overwritten by the next run, so no clip ever lands in two shards.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

from curation.manifest import BOOKKEEPING, Manifests
from curation.stage import Row, registry

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-%06d.tar"
_SHARD_RE = re.compile(r"shard-(\d{6})\.tar$")
_CLIP_FIELDS = ("start_frame", "end_frame", "num_frames", "start_s", "end_s", "duration_s", "fps", "start_reason")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def sample_json(row: Row) -> dict[str, Any]:
    """The per-sample json: caption, clip geometry, every stage's scores and its provenance."""
    scores: dict[str, Any] = {}
    provenance: dict[str, Any] = {}
    for name, cls in registry().items():
        prefix = f"{name}_"
        if row.get(f"{name}_status") is None:
            continue
        provenance[name] = {k: row.get(prefix + k) for k in ("backend", "version", "config_hash")}
        if cls.score_column is None:  # metadata, geometry and text, not scores
            continue
        for k, v in row.items():
            if k.startswith(prefix) and k[len(prefix) :] not in BOOKKEEPING and k[len(prefix) :] not in cls.not_scores:
                scores[k] = v
    return _clean(
        {
            "clip_id": row["clip_id"],
            "video_id": row["video_id"],
            "source": row.get("uri"),
            "caption": row.get("caption_text") or row.get("given_caption"),
            "caption_origin": row.get("caption_origin") or ("supplied" if row.get("given_caption") else None),
            "clip": {k: row.get(f"scenecut_{k}") for k in _CLIP_FIELDS},
            "video": {
                "width": row.get("package_width"),
                "height": row.get("package_height"),
                "frames": row.get("package_frames"),
            },
            "source_video": {k: row.get(f"probe_{k}") for k in ("codec", "width", "height", "fps", "rotation")},
            "subjects": json.loads(row["caption_subjects"]) if row.get("caption_subjects") else [],
            "tracks": _tracks(row),
            "relations": json.loads(row["caption_relations"]) if row.get("caption_relations") else [],
            "scores": scores,
            "provenance": provenance,
        }
    )


def _tracks(row: Row) -> list[dict[str, Any]]:
    """The subjects stage's tracks, with the shard member names of their masks and references."""
    tracks = json.loads(row["subjects_tracks"]) if row.get("subjects_tracks") else []
    cid = row["clip_id"]
    for t in tracks:
        k = t["k"]
        t["masks"] = f"{cid}.masks.json"
        t["face_ref"] = f"{cid}.ref_{k}_face.jpg" if t.get("face_ref") else None
        t["ref"] = f"{cid}.ref_{k}_subject.png" if t.get("ref") else None
    return tracks


def subject_members(row: Row) -> list[tuple[str, bytes]]:
    """(member name, bytes) of a clip's masks and reference crops; none when the subjects stage did not run."""
    d = row.get("subjects_dir")
    if not d or row.get("subjects_status") != "ok":
        return []
    d = Path(d)
    cid = row["clip_id"]
    out = [(f"{cid}.masks.json", (d / "masks.json").read_bytes())]
    for t in json.loads(row.get("subjects_tracks") or "[]"):
        for key, suffix in (("face_ref", "face.jpg"), ("ref", "subject.png")):
            if t.get(key):
                out.append((f"{cid}.ref_{t['k']}_{suffix}", (d / t[key]).read_bytes()))
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: identical inputs give identical shards
    tar.addfile(info, io.BytesIO(data))


def write_shards(run_dir: str | Path, cfg: Any) -> list[Path]:
    """Shard every packaged clip not yet in the shard index; returns the shard files written."""
    run_dir = Path(run_dir)
    m = Manifests(run_dir)
    if not m.has("package"):  # nothing was packaged (e.g. every clip was rejected upstream)
        return []
    rows = m.rows(
        "SELECT * FROM clips WHERE package_status = 'ok' AND clip_id NOT IN (SELECT clip_id FROM shards) "
        "ORDER BY video_id, scenecut_start_frame, clip_id"
    )
    if not rows:
        return []
    used = [int(_SHARD_RE.search(r["shard"]).group(1)) for r in m.rows("SELECT DISTINCT shard FROM shards")]
    number = max(used, default=-1) + 1
    out_dir = run_dir / "shards"
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".shard-*.tmp"):
        stale.unlink(missing_ok=True)
    written: list[Path] = []
    i = 0
    while i < len(rows):
        name = SHARD_PATTERN % number
        tmp = out_dir / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        members: list[Row] = []
        size = 0
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            while i < len(rows) and len(members) < cfg.shard_size:
                r = rows[i]
                mp4 = Path(r["package_path"]).read_bytes()
                if members and size + len(mp4) > cfg.shard_max_bytes:
                    break
                meta = json.dumps(sample_json(r), ensure_ascii=False, sort_keys=True).encode()
                _add(tar, f"{r['clip_id']}.mp4", mp4)
                _add(tar, f"{r['clip_id']}.json", meta)
                size += len(mp4) + len(meta)
                for member, data in subject_members(r):
                    _add(tar, member, data)
                    size += len(data)
                members.append(r)
                i += 1
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        final = out_dir / name
        os.replace(tmp, final)
        ts = time.time()
        m.write(
            "shards",
            [{"clip_id": r["clip_id"], "video_id": r["video_id"], "shard": name, "shards_ts": ts} for r in members],
        )
        written.append(final)
        number += 1
        if not cfg.keep_clips:
            for r in members:
                Path(r["package_path"]).unlink(missing_ok=True)
    m.compact("shards")
    log.info("wrote %d shard(s) with %d clips to %s", len(written), len(rows), out_dir)
    return written
