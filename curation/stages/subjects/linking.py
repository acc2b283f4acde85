"""Which caption subject each mask track is: category, count and position words decide, with a confidence."""

from __future__ import annotations

import re
from typing import Any

POSITION_WORDS = {"left": 0.0, "right": 1.0, "middle": 0.5, "center": 0.5, "centre": 0.5}


def link_subjects(tracks: list[dict[str, Any]], caption_subjects: list[dict[str, Any]]) -> None:
    """Assign caption subjects to tracks in place (`subject_id`, `link_confidence`); unmatched tracks stay unlinked.

    Category must agree, except that a moving region of unknown kind may take an animal (0.6) or an object (0.4).
    Position words in a subject's attributes (left / right / middle) pick the track by horizontal position;
    otherwise tracks with a face passing the reference gates go first, then the largest. Confidence 0.9 when category
    and count leave no choice or a position word decides, 0.6 when more tracks of the category than subjects
    competed; 0.95 for a track the subject's own phrase found (`grounded_subject`, the reference backend's caption
    grounding), which is linked before the others.
    """
    slots: list[tuple[dict[str, Any], float | None]] = []
    for t in tracks:
        t["subject_id"], t["link_confidence"] = None, None
    grounded: dict[int, int] = {}  # subject id -> tracks its own phrase found (reference backend): linked first
    for t in tracks:
        sid = t.get("grounded_subject")
        if sid is not None and any(int(s["id"]) == sid for s in caption_subjects):
            t["subject_id"], t["link_confidence"] = int(sid), 0.95
            grounded[int(sid)] = grounded.get(int(sid), 0) + 1
    tracks = [t for t in tracks if t["subject_id"] is None]
    for s in caption_subjects:
        left = max(1, int(s.get("count") or 1)) - grounded.get(int(s["id"]), 0)
        if left <= 0:
            continue
        words = " ".join(a.get("text", "") for a in s.get("attributes") or []).lower()
        pos = next((v for w, v in POSITION_WORDS.items() if re.search(rf"\b{w}\b", words)), None)
        slots.extend([(s, pos)] * left)
    order = {"person": 0, "animal": 1, "object": 2}  # a moving region of unknown kind is likelier an animal
    slots.sort(key=lambda sp: (sp[1] is None, order.get(sp[0].get("category"), 3)))  # position words first
    # A caption names the people it shows clearly: among tracks of a kind, one with a face that passed the reference
    # gates goes before a larger one seen only in profile or blurred; then the largest, longest-seen first.
    free = sorted(tracks, key=lambda t: (not _clear_face(t), -t["area"] * t["presence"]))
    for s, pos in slots:
        cat = s.get("category")
        same = [t for t in free if t["category"] == cat]
        pool, conf = same, 0.9
        if not same:
            pool, conf = [t for t in free if t["category"] == "object"], 0.6 if cat == "animal" else 0.4
        if not pool:
            continue
        if pos is not None:
            chosen = min(pool, key=lambda t: abs(t["cx"] - pos))
        else:
            chosen = pool[0]
            n_same = sum(1 for x, _ in slots if x.get("category") == cat)
            if conf == 0.9 and len(pool) > n_same:
                conf = 0.6
        chosen["subject_id"], chosen["link_confidence"] = int(s["id"]), conf
        free.remove(chosen)


def _clear_face(t: dict[str, Any]) -> bool:
    return any(f.get("ok") for f in (t.get("faces") or {}).values())
