"""`identity`: who is who across clips, and references taken from another clip of the same person.

Personalised generators must not learn to copy-paste the reference into the video, so a subject's reference should
come from another shot of the same person (OpenS2V-Nexus cross-video pairs, Concat-ID's similarity band). This stage
takes every clip of a source video at once (`group_by = "video_id"`; `scope: run` takes the whole run) and:

1. clusters the face tracks the `subjects` stage embedded (average linkage on the descriptor distance, stopping at
   `max_distance`; two tracks of one clip with gated faces in a common frame are never merged: they are two people)
   into `identity_id`s;
2. for each track with an identity, picks the reference crops from another clip of that identity whose face
   similarity to the track lies in [`min_similarity`, `max_similarity`] (above: near-identical, a copy; below:
   probably someone else), best face first; without one, the clip's own crops stay, marked `same_clip` with their
   frame so the trainer keeps its target window away from them.

The shard json's tracks carry `identity_id`, `face_ref_source` / `ref_source` (`other_clip` | `same_clip`), the source
clip, frame and similarity; the crops from another clip replace the clip's own under the same member names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from curation.runstore import local
from curation.stage import Kind, Resources, Row, Stage, StageConfig


class IdentityConfig(StageConfig):
    scope: Literal["video", "run"] = Field("video", description="cluster faces per source video, or across the run")
    max_distance: float = Field(
        0.5,
        gt=0,
        description="merge face clusters closer than this; dlib's published 0.6 is for still photos, and a wrong merge "
        "(another person's face as the reference) costs more than a missed one (the clip's own crop), so stricter",
    )
    min_similarity: float = Field(0.8, ge=-1, le=1, description="a reference from another clip needs this similarity")
    max_similarity: float = Field(0.985, ge=-1, le=1, description="above this a reference is a near-copy: not used")

    @model_validator(mode="after")
    def _band(self) -> IdentityConfig:
        if self.min_similarity >= self.max_similarity:
            raise ValueError("identity.min_similarity must be below identity.max_similarity")
        return self


class Identity(Stage[IdentityConfig]):
    name = "identity"
    version = "2"
    kind = Kind.CLIP
    config_class = IdentityConfig
    requires = ("video_id", "subjects_tracks", "subjects_dir")
    default_resources = Resources(cpus=0.25, batch_size=1, pool_max=1)
    score_column = "identity_count"
    not_scores = ("tracks",)
    columns: ClassVar[dict[str, str]] = {"identity_count": "BIGINT", "identity_tracks": "VARCHAR"}
    group_by = "video_id"

    def grouping(self) -> str | None:
        return "run" if self.config.scope == "run" else "video_id"

    @property
    def backend(self) -> str:
        return "builtin:average-linkage"

    def process(self, row: Row) -> Row:
        return self.process_group([row])[0]

    def process_group(self, rows: list[Row]) -> list[Row]:
        items = _face_tracks(rows)
        labels = cluster(items, self.config.max_distance)
        prefix = "run" if self.config.scope == "run" else str(rows[0].get("video_id"))[:12]
        names: dict[int, str] = {}  # cluster label -> id, numbered by first appearance
        for lab in labels:
            names.setdefault(lab, f"{prefix}-{len(names)}")
        ident = {(ci, t["k"]): names[lab] for (ci, t), lab in zip(items, labels, strict=True)}
        n = len(names)
        for ci, r in enumerate(rows):  # a face track without a usable descriptor is still one person: its own id
            for t in json.loads(r.get("subjects_tracks") or "[]"):
                if t.get("faces") and (ci, t["k"]) not in ident:
                    ident[(ci, t["k"])] = f"{prefix}-{n}"
                    n += 1
        out = []
        for ci, r in enumerate(rows):
            tracks = json.loads(r.get("subjects_tracks") or "[]")
            result = {}
            for t in tracks:
                iid = ident.get((ci, t["k"]))
                result[str(t["k"])] = {"identity_id": iid, **self._references(ci, t, iid, rows, items, ident)}
            ids = {v["identity_id"] for v in result.values() if v["identity_id"]}
            out.append(
                self.row(
                    r,
                    "ok",
                    count=len(ids),
                    cross_refs=sum(v["face_ref_source"] == "other_clip" for v in result.values()),
                    tracks=json.dumps(result),
                )
            )
        return out

    def _references(
        self, ci: int, t: dict, iid: str | None, rows: list[Row], items: list[tuple[int, dict]], ident: dict
    ) -> dict[str, Any]:
        """Where the track's face and subject references come from: the best in-band face of the same identity in
        another clip, else the clip's own crops."""
        own = {
            "face_ref_source": "same_clip" if t.get("face_ref") else None,
            "face_ref_clip": None,
            "face_ref_frame": t.get("face_ref_frame"),
            "face_ref_similarity": None,
            "ref_source": "same_clip" if t.get("ref") else None,
            "ref_clip": None,
            "ref_frame": t.get("ref_frame"),
        }
        if iid is None or not t.get("face_embedding"):
            return own
        c = self.config
        best, best_q, best_sim = None, -1.0, None
        for cj, u in items:
            if cj == ci or ident.get((cj, u["k"])) != iid or not u.get("face_ref"):
                continue
            sim = face_similarity(t["face_embedding"], u["face_embedding"])
            if not c.min_similarity <= sim <= c.max_similarity:
                continue
            f = (u.get("faces") or {}).get(str(u.get("face_ref_frame"))) or {}
            q = float(f.get("px") or 0) * float(np.log1p(f.get("blur") or 1.0))
            if q > best_q:
                best, best_q, best_sim = (cj, u), q, sim
        if best is None:
            return own
        cj, u = best
        out = dict(own)
        out.update(
            face_ref_source="other_clip",
            face_ref_clip=rows[cj]["clip_id"],
            face_ref_frame=u["face_ref_frame"],
            face_ref_similarity=round(float(best_sim), 4),
            face_ref_distance=round(face_distance(t["face_embedding"], u["face_embedding"]), 4),
            face_ref_path=str(Path(rows[cj]["subjects_dir"]) / u["face_ref"]),
        )
        # the body crop: from the same other clip when it has one, else the largest of the identity's other clips
        bodies = [(ck, v) for ck, v in items if ck != ci and ident.get((ck, v["k"])) == iid and v.get("ref")]
        if bodies:
            ck, v = max(bodies, key=lambda cv: (cv[0] == cj and cv[1] is u, float(cv[1].get("area") or 0)))
            out.update(
                ref_source="other_clip",
                ref_clip=rows[ck]["clip_id"],
                ref_frame=v.get("ref_frame"),
                ref_path=str(Path(rows[ck]["subjects_dir"]) / v["ref"]),
            )
        return out

    # -- what the shards and the report get ------------------------------------------------------------------
    def _merged(self, row: Row) -> list[dict[str, Any]]:
        tracks = json.loads(row.get("subjects_tracks") or "[]")
        mine = json.loads(row.get(self.col("tracks")) or "{}")
        cid = row["clip_id"]
        for t in tracks:
            info = mine.get(str(t["k"]), {})
            t["identity_id"] = info.get("identity_id")
            for r, suffix in (("face_ref", "face.jpg"), ("ref", "subject.png")):
                src = info.get(f"{r}_source")
                t[f"{r}_source"] = src
                t[f"{r}_frame"] = info.get(f"{r}_frame")
                t[f"{r}_clip"] = info.get(f"{r}_clip")
                t[r] = f"{cid}.ref_{t['k']}_{suffix}" if src else None
            t["face_ref_similarity"] = info.get("face_ref_similarity")
            t["masks"] = f"{cid}.masks.json"
        return tracks

    def shard_fields(self, row: Row) -> dict[str, Any]:
        """The subjects' tracks with identity and where each reference came from."""
        if row.get(self.col("status")) != "ok":
            return {}
        return {"tracks": self._merged(row)}

    def shard_members(self, row: Row) -> list[tuple[str, bytes]]:
        """Crops from another clip, under the names of the clip's own (which they replace)."""
        if row.get(self.col("status")) != "ok":
            return []
        out = []
        for k, info in json.loads(row.get(self.col("tracks")) or "{}").items():
            for r, suffix in (("face_ref", "face.jpg"), ("ref", "subject.png")):
                path = info.get(f"{r}_path")
                if info.get(f"{r}_source") == "other_clip" and path:
                    out.append((f"ref_{k}_{suffix}", local(path).read_bytes()))
        return out

    def describe(self, row: Row) -> str | None:
        mine = json.loads(row.get(self.col("tracks")) or "{}")
        named = [
            f"{k}:{v['identity_id']}" + ("*" if v["face_ref_source"] == "other_clip" else "")
            for k, v in mine.items()
            if v.get("identity_id")
        ]
        return ("identities: " + ", ".join(named) + " (* reference from another clip)") if named else None


def _face_tracks(rows: list[Row]) -> list[tuple[int, dict]]:
    """(row index, track) for every track with a face descriptor."""
    out = []
    for ci, r in enumerate(rows):
        for t in json.loads(r.get("subjects_tracks") or "[]"):
            if t.get("face_embedding"):
                out.append((ci, t))
    return out


def cluster(items: list[tuple[int, dict]], max_distance: float) -> list[int]:
    """Average-linkage agglomerative clustering of face tracks by descriptor distance; returns a label per item.

    Two tracks of one clip with gated faces in a common tracked frame are never merged (a frame cannot show one
    person twice). Faces that failed the gates do not count: a soft or turned detection is the weaker evidence, and
    a duplicate track of one person (body and face found apart) would otherwise be kept two people.
    """
    n = len(items)
    if n == 0:
        return []
    emb = np.array([t["face_embedding"] for _, t in items], np.float64)
    d = np.linalg.norm(emb[:, None, :] - emb[None, :, :], axis=2)
    cannot = np.zeros((n, n), bool)
    for a in range(n):
        for b in range(a + 1, n):
            (ca, ta), (cb, tb) = items[a], items[b]
            if ca == cb and _gated_frames(ta) & _gated_frames(tb):
                cannot[a, b] = cannot[b, a] = True
    clusters: dict[int, list[int]] = {i: [i] for i in range(n)}
    while len(clusters) > 1:
        best, pair = max_distance, None
        keys = sorted(clusters)
        for i, a in enumerate(keys):
            for b in keys[i + 1 :]:
                ma, mb = clusters[a], clusters[b]
                if cannot[np.ix_(ma, mb)].any():
                    continue
                dist = float(d[np.ix_(ma, mb)].mean())
                if dist < best:
                    best, pair = dist, (a, b)
        if pair is None:
            break
        a, b = pair
        clusters[a] += clusters.pop(b)
    labels = [0] * n
    for lab, members in enumerate(sorted(clusters.values(), key=min)):
        for i in members:
            labels[i] = lab
    return labels


def _gated_frames(track: dict) -> set[str]:
    """Tracked frames where the track's face passed the gates (all face frames for tracks written before the
    per-face `ok` flag)."""
    faces = track.get("faces")
    if not isinstance(faces, dict):
        return {str(f) for f in track.get("face_frames") or []}
    return {p for p, f in faces.items() if f.get("ok", True)}


def face_similarity(a: Any, b: Any) -> float:
    """Cosine similarity of two descriptors (lists or arrays)."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y / n) if n > 0 else 0.0


def face_distance(a: Any, b: Any) -> float:
    """Euclidean distance of two descriptors: what dlib's model is trained to threshold."""
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
