"""OpenS2V-Nexus layouts (PKU-YuanGroup/OpenS2V-Nexus).

`opens2v`: OpenS2V-5M records, as its `data_process/demo_dataloader.py` (and BindWeave's feature extractor) read
them: `<out>/opens2v.json` = {key: {metadata, word_tags, annotation}} with the clip as its own video
(`opens2v/videos/<key>.mp4`, so `cut` = `face_cut` = [0, frames) and `crop` is the whole frame), the annotated frame's
boxes (xyxy pixels) and COCO RLE masks (counts as a string, at the video's size), object ids "1".."N" aligned with
`annotations`, and the background plate as `opens2v/background/<key>.png`. Ours for their scores: `aes_score` and
`foreground_ase_score` are the clip's aesthetics score, `gme_score` the confidence of the caption-to-track link
(OpenS2V's is a GME text-image similarity), `tech` is null (no technical-quality score here), and
`background_ase_score` is 0 (the plate is not scored; BindWeave uses plates scoring >= 10).

`opens2v-eval`: a benchmark split in OpenS2V-Eval's form, `<out>/opens2v-eval.json` = {"<category>_<n>": {img_paths,
prompt, class_label, synthesis_flag}}: only clips whose every reference comes from another clip of the same identity
(`identity` stage), so a model cannot copy the reference from the frames it is scored on; face references under
`Images/<category>/crop_man|crop_woman/`, which its face-similarity scorer looks for.
"""

from __future__ import annotations

import json
from typing import Any

from curation.export import Exporter, Result, Sample, png
from curation.export.lumosx import background_part, linked_tracks
from curation.masks import mask_box, rle_decode, rle_encode


class OpenS2V(Exporter):
    name = "opens2v"

    def add(self, s: Sample) -> Result:
        import cv2

        cap = s.caption
        vm = s.meta.get("video") or {}
        w, h, n = int(vm.get("width") or 0), int(vm.get("height") or 0), int(vm.get("frames") or 0)
        doc = json.loads(s.members.get("masks.json") or b"{}")
        tracks = [(t, subj) for t, subj in linked_tracks(s) if str(t["k"]) in (doc.get("tracks") or {})]
        if not tracks or not w:
            return Result("skip", "no_subjects")
        frames = [int(f) for f in doc["frames"]]
        decoded = {str(t["k"]): [rle_decode(r) for r in doc["tracks"][str(t["k"])]] for t, _ in tracks}
        # the annotated frame: the tracked frame where most linked subjects are seen (earliest on a tie)
        best = max(range(len(frames)), key=lambda i: (sum(bool(decoded[str(t["k"])][i].any()) for t, _ in tracks), -i))
        scores = s.meta.get("scores") or {}
        aes = scores.get("aesthetics_score")
        annotations, mask_map, masks = [], {}, {}
        for t, subj in tracks:
            m = decoded[str(t["k"])][best]
            if not m.any():
                continue
            big = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
            box = mask_box(big)
            if box is None:
                continue
            oid = str(len(annotations) + 1)
            name = s.phrase(subj["span"]).lower()
            annotations.append(
                {
                    "class_name": name,
                    "bbox": [float(v) for v in box],
                    "gme_score": float(t.get("link_confidence") or 0.0),
                    "aes_score": float(aes) if aes is not None else 0.0,
                }
            )
            mask_map[oid] = {"class_name": name}
            rle = rle_encode(big)
            masks[oid] = {"size": rle["size"], "counts": rle["counts"], "score": [float(t.get("link_confidence") or 0)]}
        if not annotations:
            return Result("skip", "no_subjects")
        video = self.w.media(s.clip_id, "video.mp4", s.members["mp4"])
        files = [str(self.w.place(f"opens2v/videos/{s.clip_id}.mp4", video).relative_to(self.w.out))]
        notes: list[str] = []
        bg = background_part(s)
        plate = s.member(bg["file"]) if bg else None
        if bg is not None and plate is None:
            notes.append(f"background: member {bg['file']} missing")
        if plate is not None:
            self.w.write(f"opens2v/background/{s.clip_id}.png", _at_size(plate, w, h))
            files.append(f"opens2v/background/{s.clip_id}.png")
        fps = float((s.meta.get("clip") or {}).get("fps") or 0)
        words: dict[str, list[str]] = {"background": [], "subject": [], "object": []}
        words["pre_define"] = ["person", "human head"]
        for _, subj in tracks:
            words["subject" if subj.get("category") == "person" else "object"].append(s.phrase(subj["span"]).lower())
        if plate is not None and bg and bg.get("phrase"):
            words["background"].append(bg["phrase"].lower())
        record = {
            "metadata": {
                "path": f"{s.clip_id}.mp4",
                "cut": [0, n],
                "face_cut": [0, n],
                "crop": [0, w, 0, h],
                "fps": fps,
                "num_frames": n,
                "resolution": {"height": h, "width": w},
                "tech": None,
                "motion": scores.get("motion_score"),
                "aesthetic": aes,
                "cap": [cap],
                "face_cap_qwen": cap,
            },
            "word_tags": words,
            "annotation": {
                "ann_frame_data": {
                    "ann_frame_idx": frames[best],
                    "annotations": annotations,
                    "box_format": "xyxy",
                    "img_width": w,
                    "img_height": h,
                    "foreground_ase_score": float(aes) if aes is not None else 0.0,
                    "background_ase_score": 0.0,
                },
                "mask_map": mask_map,
                "mask_annotation": {str(frames[best]): masks},
            },
        }
        return Result("ok", files=files, record=record, notes=notes)

    def finish(self, records: list[tuple[str, Any]]) -> list[str]:
        data = json.dumps(dict(records), ensure_ascii=False).encode()
        return [str(self.w.write("opens2v.json", data))]


def _at_size(data: bytes, w: int, h: int) -> bytes:
    """A PNG at the video's size (the plate is made at the crops stage's decode size; OpenS2V reads it at the
    cropped frame's)."""
    import cv2
    import numpy as np

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.shape[:2] == (h, w):
        return data
    ok, enc = cv2.imencode(".png", cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA))
    return enc.tobytes() if ok else data


class OpenS2VEval(Exporter):
    name = "opens2v-eval"

    def add(self, s: Sample) -> Result:
        cap = s.caption
        refs, notes = [], []
        for t, subj in linked_tracks(s):
            if subj.get("category") != "person":
                continue
            if t.get("face_ref_source") != "other_clip":
                notes.append(f"track {t['k']}: face reference not from another clip ({t.get('face_ref_source')})")
                return Result("skip", "reference_from_same_clip", notes=notes)
            face = s.member(t.get("face_ref"))
            part = next((p for p in s.meta.get("parts") or [] if p.get("kind") == "person" and p["k"] == t["k"]), None)
            if face is None:
                return Result("skip", "no_face_reference", notes=[f"track {t['k']}"])
            if part is None:  # the crops stage names each person's gender: it did not run on this clip
                return Result("skip", "no_person_part", notes=[f"track {t['k']}: run the crops stage"])
            gender = part.get("gender")
            if gender not in ("male", "female"):
                return Result("skip", "unknown_gender", notes=[f"subject {subj.get('name')!r}"])
            refs.append((t, face, "man" if gender == "male" else "woman"))
        if not refs:
            return Result("skip", "no_person", notes=notes)
        refs = refs[:3]
        category = "singleface" if len(refs) == 1 else "multiface"
        paths, labels, files = [], [], []
        for t, face, who in refs:
            rel = f"opens2v-eval/Images/{category}/crop_{who}/{s.clip_id}_{t['k']}.png"
            self.w.write(rel, png(face))
            paths.append(rel.removeprefix("opens2v-eval/"))
            labels.append(who.capitalize())
            files.append(rel)
        video = self.w.media(s.clip_id, "video.mp4", s.members["mp4"])
        record = {
            "category": category,
            "img_paths": paths,
            "prompt": cap,
            "class_label": labels,
            "synthesis_flag": "True" if len(refs) > 1 else "Wrong",
            "gt_video": str(video.resolve()),
            "clip_id": s.clip_id,
        }
        return Result("ok", files=files, record=record, notes=notes)

    def finish(self, records: list[tuple[str, Any]]) -> list[str]:
        out: dict[str, Any] = {}
        counts: dict[str, int] = {}
        for _, r in records:
            counts[r["category"]] = counts.get(r["category"], 0) + 1
            out[f"{r['category']}_{counts[r['category']]}"] = {k: v for k, v in r.items() if k != "category"}
        return [str(self.w.write("opens2v-eval.json", json.dumps(out, ensure_ascii=False, indent=1).encode()))]
