"""WebDataset shards of the packaged clips: `shards/shard-%06d.tar`, per clip `<clip_id>.json` plus the members the
stages contribute (`Stage.shard_members`): the packaged `<clip_id>.mp4`, and when the subjects stage ran
`<clip_id>.masks.json` (COCO RLE tracks), `<clip_id>.ref_<k>_face.jpg` and `<clip_id>.ref_<k>_subject.png`, and when
the crops stage ran `<clip_id>.parts.json`, `<clip_id>.attr_<k>_<j>.png` and `<clip_id>.background.png`.
The json is built the same way: clip, video and source, then each stage's `shard_fields` and its scores.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from curation.config import run_stages
from curation.manifest import BOOKKEEPING, Manifests
from curation.stage import Row, Stage

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-%06d.tar"
_SHARD_RE = re.compile(r"shard-(\d{6})\.tar$")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def sample_json(row: Row, stages: list[Stage[Any]]) -> dict[str, Any]:
    """The per-sample json: ids and source, what each stage contributes, every filter's scores, provenance."""
    scores: dict[str, Any] = {}
    provenance: dict[str, Any] = {}
    given = row.get("given_caption")
    # The keys every sample has (readers such as the trainer rely on them); stages fill them in when they ran.
    out: dict[str, Any] = {
        "clip_id": row["clip_id"],
        "video_id": row["video_id"],
        "source": row.get("uri"),
        "caption": given,
        "caption_origin": "supplied" if given else None,
        "subjects": [],
        "relations": [],
        "tracks": [],
    }
    for stage in stages:
        name, prefix = stage.name, f"{stage.name}_"
        if row.get(f"{name}_status") is None:
            continue
        out.update(stage.shard_fields(row))
        provenance[name] = {k: row.get(prefix + k) for k in ("backend", "version", "config_hash")}
        if stage.score_column is None:  # metadata, geometry and text, not scores
            continue
        for k, v in row.items():
            field = k[len(prefix) :]
            if k.startswith(prefix) and field not in BOOKKEEPING and field not in stage.not_scores:
                scores[k] = v
    out["scores"] = scores
    out["provenance"] = provenance
    return _clean(out)


def sample_members(row: Row, stages: list[Stage[Any]]) -> list[tuple[str, bytes]]:
    """(member name, bytes) of a clip: the json first, then each stage's files in pipeline order. A later stage's
    file of the same name replaces an earlier one's (as its `shard_fields` do): `identity` swaps in references
    from another clip for the ones `subjects` cut from the clip itself."""
    meta = json.dumps(sample_json(row, stages), ensure_ascii=False, sort_keys=True).encode()
    members: dict[str, bytes] = {f"{row['clip_id']}.json": meta}
    for stage in stages:
        if row.get(f"{stage.name}_status") is not None:
            members.update((f"{row['clip_id']}.{suffix}", data) for suffix, data in stage.shard_members(row))
    return list(members.items())


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: identical inputs give identical shards
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    run_dir: str | Path,
    stage: str,
    shard_size: int,
    shard_max_bytes: int,
    on_written: Callable[[list[Row]], None] | None = None,
) -> list[Path]:
    """Shard every clip that `stage` said ok to and that is not yet in the shard index; returns the shard files
    written. `on_written(rows)` runs after each shard is indexed (e.g. to delete the encoded clips it now holds)."""
    run_dir = Path(run_dir)
    m = Manifests(run_dir)
    if not m.has(stage):  # nothing was packaged (e.g. every clip was rejected upstream)
        return []
    rows = m.rows(
        f"SELECT * FROM clips WHERE {stage}_status = 'ok' AND clip_id NOT IN (SELECT clip_id FROM shards) "
        "ORDER BY video_id, clip_start_frame, clip_id"
    )
    if not rows:
        return []
    stages = run_stages(run_dir)
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
            while i < len(rows) and len(members) < shard_size:
                files = sample_members(rows[i], stages)
                n_bytes = sum(len(d) for _, d in files)
                if members and size + n_bytes > shard_max_bytes:
                    break
                for member, data in files:
                    _add(tar, member, data)
                size += n_bytes
                members.append(rows[i])
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
        if on_written is not None:
            on_written(members)
    m.compact("shards")
    log.info("wrote %d shard(s) with %d clips to %s", len(written), len(rows), out_dir)
    return written
