"""Concat-ID (ML-GSAI/Concat-ID): its training list, `<out>/concat-id.json` = [{video_path, caption, image_path,
mask_path}], paths absolute (its loader joins no root), the clip's face references joined with "@@" (identity's
crop from another clip of the person where there is one, so the model does not learn to copy), and `mask_path`
on every entry ("": the loader keeps its mask list aligned only when every entry has the key)."""

from __future__ import annotations

import json
from typing import Any

from curation.export import Exporter, Result, Sample, png
from curation.export.lumosx import linked_tracks


class ConcatId(Exporter):
    name = "concat-id"

    def add(self, s: Sample) -> Result:
        cap = s.caption
        refs = []
        for t, subj in linked_tracks(s):
            face = s.member(t.get("face_ref")) if subj.get("category") == "person" else None
            if face is not None:
                refs.append(self.w.media(s.clip_id, f"face_{t['k']}.png", png(face)))
        if not refs:
            return Result("skip", "no_face_reference")
        video = self.w.media(s.clip_id, "video.mp4", s.members["mp4"])
        record = {
            "video_path": str(video.resolve()),
            "caption": cap,
            "image_path": "@@".join(str(p.resolve()) for p in refs),
            "mask_path": "",
        }
        return Result("ok", files=[str(p.relative_to(self.w.out)) for p in (video, *refs)], record=record)

    def finish(self, records: list[tuple[str, Any]]) -> list[str]:
        data = json.dumps([r for _, r in records], ensure_ascii=False, indent=1).encode()
        return [str(self.w.write("concat-id.json", data))]
