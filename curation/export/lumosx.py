"""LumosX layouts (alibaba-damo-academy/Lumos-Custom, `LumosX/`).

`lumosx`: the folders its subject inference script and benchmark read, one per clip under `<out>/lumosx/<clip_id>/`:
`caption.txt` (`<id>;<caption>`), `video.mp4` (the ground truth the benchmark compares with),
`subjects/<n>/face_<subject phrase>.png` and `subjects/<n>/<attribute phrase>.png` per person,
`objects/<phrase>.png`, `background/<scene>.png`.
The reader binds each image to the caption by tokenizing its file name and looking for those tokens in the caption,
so every name is a verbatim, word-aligned caption span (`phrase_problem`); a part whose phrase fails is left out and
noted. A person needs a face crop to get a folder (the benchmark reads a `face_` file in each).

`lumosx-train`: the training loader's table (`train.csv`: path, text, duration, height, width) and per clip an
`info.json` with `selected_frames` (the tracked frames) and `word_tags_path`: per person its face boxes per frame
(integer pixels) and whole-person mask PNGs, its attributes' mask PNGs, other subjects' masks and the background plate.
Masks are single-channel 0/255 PNGs at the video's size, named `..._frame<N>.png`. The loader finds a clip's folder
from its video path (`<root>/<p[3]>/<p[4]>/<p[5]>/<p[6]>/<name>`, p = the path split on `/`): the folders are laid out
the same way under `<out>/lumosx-train/annotations`, which is the root to set in the loader.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from curation.errors import CurationError
from curation.export import Exporter, Result, Sample, phrase_problem, png
from curation.masks import rle_decode


def linked_tracks(s: Sample) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(track, caption subject) for every track linked to a caption subject, in track order."""
    out = []
    for t in s.meta.get("tracks") or []:
        subj = s.subject(t.get("subject_id"))
        if subj is not None and subj.get("span"):
            out.append((t, subj))
    return out


def attribute_parts(s: Sample, k: int) -> list[dict[str, Any]]:
    """The attribute crops the crops stage made for track k."""
    return [p for p in s.meta.get("parts") or [] if p.get("kind") == "attribute" and p.get("k") == k and p.get("file")]


def background_part(s: Sample) -> dict[str, Any] | None:
    """The background plate, when the crops stage wrote one."""
    return next((p for p in s.meta.get("parts") or [] if p.get("kind") == "background" and p.get("file")), None)


def shared_phrases(s: Sample) -> set[str]:
    """Attribute phrases given to more than one subject: a reader binding names to words cannot tell whose they are."""
    owners: dict[str, set[int]] = {}
    for p in s.meta.get("parts") or []:
        if p.get("kind") == "attribute":
            owners.setdefault(p["phrase"], set()).add(int(p["subject_id"]))
    return {ph for ph, ids in owners.items() if len(ids) > 1}


class LumosX(Exporter):
    name = "lumosx"
    uses_tokenizer = True

    def remove(self, clip_id: str) -> None:
        self.w.remove(f"lumosx/{clip_id}")  # its reader lists the folder: a clip no longer exported must go

    def add(self, s: Sample) -> Result:
        cap = s.caption
        if "{" in cap or cap.startswith("|0|"):  # the reader parses "{" as inline JSON and "|0|" as a loop prompt
            return Result("skip", "caption_unsafe")
        match = self.options.get("matcher")
        files: list[tuple[str, bytes]] = []
        notes: list[str] = []
        shared = shared_phrases(s)

        def usable(span: Any, phrase: str | None, role: str) -> bool:
            why = phrase_problem(cap, span, phrase, role, match)
            if why is None and role == "attribute" and phrase in shared:
                why = "shared_by_subjects"
            if why:
                notes.append(f"{role} {phrase!r}: {why}")
            return why is None

        n = 0
        for t, subj in linked_tracks(s):
            if subj.get("category") != "person":
                continue
            face = s.member(t.get("face_ref"))
            name = s.phrase(subj["span"])
            if face is None:
                notes.append(f"person {name!r} (track {t['k']}): no face crop")
                continue
            if not usable(subj["span"], name, "subject"):
                continue
            folder = f"subjects/{n}"
            files.append((f"{folder}/face_{name}.png", png(face)))
            seen = set()
            for p in attribute_parts(s, t["k"]):
                data = s.member(p["file"])
                if data is None:
                    notes.append(f"attribute {p['phrase']!r}: member {p['file']} missing")
                    continue
                if p["phrase"] in seen or not usable(p["span"], p["phrase"], "attribute"):
                    continue
                seen.add(p["phrase"])
                files.append((f"{folder}/{p['phrase']}.png", data))
            n += 1
        used: set[str] = set()
        for t, subj in linked_tracks(s):
            if subj.get("category") == "person":
                continue
            name = s.phrase(subj["span"])
            ref = s.member(t.get("ref"))
            if ref is None:
                notes.append(f"object {name!r} (track {t['k']}): no crop")
                continue
            if name in used or not usable(subj["span"], name, "object"):
                continue
            used.add(name)
            files.append((f"objects/{name}.png", png(ref)))
        if not files:
            return Result("skip", "no_subject", notes=notes)  # a background alone is not a subject-to-video sample
        bg = background_part(s)
        data = s.member(bg["file"]) if bg else None
        if bg is not None and data is None:
            notes.append(f"background: member {bg['file']} missing")
        elif bg is not None and bg.get("phrase") and usable(bg["span"], bg["phrase"], "background"):
            files.append((f"background/{bg['phrase']}.png", data))
        video = self.w.media(s.clip_id, "video.mp4", s.members["mp4"])
        root = f"lumosx/{s.clip_id}"
        with self.w.folder(root) as w:
            w.place("video.mp4", video)
            w.write("caption.txt", f"{s.clip_id};{cap}".encode())
            for rel, data in files:
                w.write(rel, data)
        names = [rel for rel, _ in files]
        record = {"id": s.clip_id, "folder": root, "caption": cap, "files": names}
        written = [f"{root}/{x}" for x in (*names, "video.mp4", "caption.txt")]
        return Result("ok", files=written, record=record, notes=notes)


class LumosXTrain(Exporter):
    name = "lumosx-train"

    def add(self, s: Sample) -> Result:
        import cv2

        cap = s.caption
        video_meta = s.meta.get("video") or {}
        w, h = int(video_meta.get("width") or 0), int(video_meta.get("height") or 0)
        masks_doc = json.loads(s.members.get("masks.json") or b"{}")
        if not masks_doc or not w or not h:
            return Result("skip", "no_masks")
        frames = [int(f) for f in masks_doc["frames"]]
        vpath = (self.w.out / "lumosx-train" / "videos" / s.clip_id[:2] / s.clip_id[2:4] / f"{s.clip_id}.mp4").resolve()
        parts = str(vpath).split("/")
        if len(parts) < 8:
            raise CurationError(f"lumosx-train: {vpath} is too short a path for LumosX's loader: use a deeper --out")
        ann = f"lumosx-train/annotations/{parts[3]}/{parts[4]}/{parts[5]}/{parts[6]}/{s.clip_id}"
        parts_doc = json.loads(s.members.get("parts.json") or b"{}")
        files: list[tuple[str, bytes]] = []  # written together at the end, into a folder built aside
        notes: list[str] = []

        def mask_files(prefix: str, rles: list[dict[str, Any]]) -> list[str]:
            names = []
            for f, rle in zip(frames, rles, strict=True):
                m = rle_decode(rle)
                if not m.any():
                    continue
                big = cv2.resize(m * 255, (w, h), interpolation=cv2.INTER_NEAREST)
                ok, enc = cv2.imencode(".png", big)
                if ok:
                    name = f"{prefix}_frame{f}.png"
                    files.append((name, enc.tobytes()))
                    names.append(name)
            return names

        person, others = [], []
        shared = shared_phrases(s)
        for t, subj in linked_tracks(s):
            phrase = s.phrase(subj["span"])
            why = phrase_problem(cap, subj["span"], phrase, "subject")
            if why:
                notes.append(f"subject {phrase!r}: {why}")
                continue
            slug = f"s{t['k']}_" + "_".join(phrase.split())
            body = mask_files(slug, masks_doc["tracks"][str(t["k"])])
            if not body:
                continue
            if subj.get("category") != "person":
                others.append({phrase: body})
                continue
            entry: dict[str, Any] = {"subject": {phrase: body}}
            faces = {}
            for f, face in (t.get("faces") or {}).items():
                if int(f) in frames and face.get("ok", True):
                    x0, y0, x1, y1 = face["box"]
                    faces[str(int(f))] = [round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)]
            if faces:
                entry["subject"]["face"] = faces
            attrs = []
            for p in attribute_parts(s, t["k"]):
                rles = (parts_doc.get("masks") or {}).get(p["file"].split(".", 1)[1].rsplit(".", 1)[0])
                why = phrase_problem(cap, p["span"], p["phrase"], "attribute")
                why = why or ("shared_by_subjects" if p["phrase"] in shared else None)
                if not rles or why:
                    notes.append(f"attribute {p['phrase']!r}: {why or 'no masks'}")
                    continue
                names = mask_files(f"s{t['k']}_a{p['attribute']}_" + "_".join(p["phrase"].split()), rles)
                if names:
                    attrs.append({p["phrase"]: names})
            if attrs:
                entry["attributes"] = attrs
            person.append(entry)
        tags: dict[str, Any] = {}
        if person:
            tags["person"] = person
        if others:
            tags["other_subjects"] = others
        bg = background_part(s)
        data = s.member(bg["file"]) if bg else None
        if bg is not None and data is None:
            notes.append(f"background: member {bg['file']} missing")
        elif bg is not None and bg.get("phrase") and not phrase_problem(cap, bg["span"], bg["phrase"], "background"):
            files.append(("background.png", data))
            tags["background"] = {bg["phrase"]: ["background.png"]}
        if not tags:
            return Result("skip", "no_reference", notes=notes)
        info = {"video": str(vpath), "selected_frames": frames, "word_tags_path": tags}
        files.append(("info.json", json.dumps(info, ensure_ascii=False, indent=1).encode()))
        video = self.w.media(s.clip_id, "video.mp4", s.members["mp4"])
        self.w.place(str(vpath.relative_to(self.w.out.resolve())), video)
        with self.w.folder(ann) as fw:
            for name, blob in files:
                fw.write(name, blob)
        seconds = float((s.meta.get("clip") or {}).get("duration_s") or 0)
        record = {"path": str(vpath), "text": cap, "duration": max(1, int(seconds)), "height": h, "width": w}
        return Result("ok", files=[f"{ann}/{n}" for n, _ in files], record=record, notes=notes)

    def finish(self, records: list[tuple[str, Any]]) -> list[str]:
        buf = io.StringIO()
        wr = csv.DictWriter(buf, fieldnames=["path", "text", "duration", "height", "width"], lineterminator="\n")
        wr.writeheader()
        for _, r in records:
            wr.writerow(r)
        path = self.w.write("lumosx-train/train.csv", buf.getvalue().encode())
        return [str(Path(path))]
