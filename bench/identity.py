"""Identity on the hand-labelled table, with where it is lost: the pipeline run of `tests/test_identity.py`, then
each labelled person's hits and, per track whose face jumps, every run boundary with what could tell the two runs
apart.

    python bench/identity.py [--set subjects.other_face_distance=100 ...] [--json OUT]

Printed: pairwise identity precision / recall over the labelled faces and how many land on a track (the figures
`test_identity_pairwise_precision_and_recall` gates); each (video, person) with the (clip, track, identity) each of
their labelled faces landed on; then, for every boundary where `_same_face` cuts a track's faces into runs: the face
jump (face sizes), the jump less the box's own top-centre motion (face sizes), the size ratio, the dlib distance of
the two faces (gated or not) and whether each side was dropped as another person's. Labels: `tests/data`.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

log = logging.getLogger("bench.identity")


def _value(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def run(sets: list[str]) -> dict[str, Any]:
    import tests.test_identity as ti
    from curation.config import build_config
    from curation.pipeline import Pipeline
    from tests.conftest import media

    subjects: dict[str, Any] = {"max_subjects": 12}  # as the test: the meeting has more people than the default
    for s in sets:
        key, _, v = s.partition("=")
        stage, _, name = key.partition(".")
        if stage != "subjects" or not name:
            raise SystemExit(f"--set takes subjects.NAME=VALUE, got {s!r}")
        subjects[name] = _value(v)
    work = Path(tempfile.mkdtemp(prefix="bench-identity-"))
    inputs = work / "inputs.txt"
    inputs.write_text("\n".join(media(v) for v in ti.PEOPLE_VIDEOS))
    cfg = build_config(
        {
            "runner": "local",
            "progress": False,
            "stages": ["probe", "scenecut", "subjects", "identity"],
            "subjects": subjects,
        }
    )
    pipe = Pipeline(cfg, work)
    pipe.run(str(inputs))
    rows = pipe.manifests.rows("SELECT * FROM clips WHERE identity_status = 'ok'")
    items = ti._labelled_to_tracks(rows)
    p, r, positives = ti.pairwise(items)
    matched = sum(hit is not None for _, _, hit in items)
    people: dict[str, list[Any]] = collections.defaultdict(list)
    for video, person, hit in items:
        people[f"{video}:{person}"].append(None if hit is None else [hit[0], hit[1], hit[2]])
    clips = pipe.manifests.rows("SELECT * FROM clips WHERE subjects_status IS NOT NULL")
    return {
        "precision": p,
        "recall": r,
        "same_person_pairs": positives,
        "on_a_track": matched,
        "labelled_faces": len(items),
        "people": dict(people),
        "boundaries": boundaries(clips, subjects),
        "subjects": subjects,
    }


def boundaries(clips: list[dict[str, Any]], subjects: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run boundary of every track, from the subjects stage run again on each clip with `_foreign_faces`
    watched (the same code and settings as the run, so the same tracks)."""
    import curation.stages.subjects as subjects_mod
    from curation.stages.subjects import Subjects, SubjectsConfig
    from curation.stages.subjects.embedded import _same_face, _side

    out: list[dict[str, Any]] = []
    clip_name = ""
    real = subjects_mod._foreign_faces

    def watched(embedder: Any, t: Any, info: Any, frames: Any, positions: Any, c: Any, vecs: Any, others: Any) -> Any:
        dropped = real(embedder, t, info, frames, positions, c, vecs, others)
        order = sorted(i for i in t.faces if i in t.face_info)
        for a, b in itertools.pairwise(order):
            fa, fb = t.faces[a], t.faces[b]
            if _same_face(fa, fb, c.face_jump):
                continue
            size = max(_side(fa), _side(fb))
            ca = np.array([(fa[0] + fa[2]) / 2, (fa[1] + fa[3]) / 2])
            cb = np.array([(fb[0] + fb[2]) / 2, (fb[1] + fb[3]) / 2])
            ba, bb = t.boxes[a], t.boxes[b]
            moved = np.array([(bb[0] + bb[2] - ba[0] - ba[2]) / 2, bb[1] - ba[1]])
            dist = np.linalg.norm(embedder.embed(frames[a], t.face_info[a]) - embedder.embed(frames[b], t.face_info[b]))
            out.append(
                {
                    "clip": clip_name,
                    "frames": [positions[a], positions[b]],
                    "jump": round(float(np.linalg.norm(cb - ca) / size), 2),
                    "jump_less_box_motion": round(float(np.linalg.norm(cb - ca - moved) / size), 2),
                    "size_ratio": round(size / min(_side(fa), _side(fb)), 2),
                    "dlib_distance": round(float(dist), 2),
                    "gated": [info["faces"][str(positions[i])]["ok"] for i in (a, b)],
                    "dropped": [a in dropped, b in dropped],
                }
            )
        return dropped

    st = Subjects(SubjectsConfig(**subjects))
    st.bind(Path(tempfile.mkdtemp(prefix="bench-identity-")))
    st.setup(st.ctx)
    subjects_mod._foreign_faces = watched
    try:
        for row in clips:
            clip_name = f"{row['uri'].rsplit('/', 1)[-1]}:{row['clip_id'][-6:]}"
            st.process(dict(row))
    finally:
        subjects_mod._foreign_faces = real
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", default=[], help="subjects.NAME=VALUE (JSON value), repeatable")
    ap.add_argument("--json", type=Path, help="write the figures here")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("curation", "ray", "rapidocr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    res = run(a.set)
    log.info(
        "identity pairwise precision %.2f recall %.2f over %d same-person pairs; %d of %d labelled faces on a track",
        res["precision"],
        res["recall"],
        res["same_person_pairs"],
        res["on_a_track"],
        res["labelled_faces"],
    )
    for person, hits in sorted(res["people"].items()):
        log.info("%-60s %s", person, " ".join("-" if h is None else f"{h[0][-6:]}/{h[1]}" for h in hits))
    log.info("run boundaries (frames: jump, jump less box motion, size ratio, dlib distance, gated, dropped):")
    for b in res["boundaries"]:
        log.info(
            "  %-44s %4d->%-4d %5.2f %5.2f %5.2f %5.2f %s %s",
            b["clip"],
            *b["frames"],
            b["jump"],
            b["jump_less_box_motion"],
            b["size_ratio"],
            b["dlib_distance"],
            b["gated"],
            b["dropped"],
        )
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
