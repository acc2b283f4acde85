"""Embedded subject detection and mask tracks on CPU, no model downloads.

What it does: YuNet (a learned face detector shipped compiled inside the `yuface` wheel) finds faces with landmarks,
the HOG people detector finds upright people, and a camera-compensated median background over the clip's frames
finds what moves. Those cues are merged into person / object candidates per frame, associated across frames into
tracks (a face that continues a track's face first, then box overlap), and the candidates of the tracks kept get
their masks from GrabCut seeded with the moving pixels (a person's box takes in the body their face implies). A
still subject seen from behind that HOG misses is missed. The reference backend (insightface + SAM2) gives
production-quality masks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from curation.masks import box_iou, mask_box, mask_iou
from curation.samples import median_of
from curation.stages.subjects.faces import Face, FaceDetector

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the grid they belong to


@dataclass
class Candidate:
    box: Box
    kind: str  # "person" | "object"
    mask: np.ndarray | None = None
    faces: list[tuple[Box, Face]] = field(default_factory=list)  # (grid box, the detection in frame pixels)
    score: float = 0.0


@dataclass
class Track:
    k: int
    boxes: dict[int, Box] = field(default_factory=dict)  # frame position -> box (mask grid)
    masks: dict[int, np.ndarray] = field(default_factory=dict)
    faces: dict[int, Box] = field(default_factory=dict)  # frame position -> largest face (mask grid)
    face_info: dict[int, Face] = field(default_factory=dict)  # the same faces, in decoded-frame pixels
    person_votes: int = 0
    # caption-grounded (reference backend): the caption subject whose phrase found this track, and that phrase
    grounded_subject: int | None = None
    grounded_phrase: str | None = None
    grounded_category: str | None = None
    foreign: set[int] = field(default_factory=set)  # frame positions whose face was someone else's (subjects v7)
    cands: dict[int, Candidate] = field(default_factory=dict)  # while tracking: the candidate taken at each frame

    @property
    def last(self) -> tuple[int, Box]:
        i = max(self.boxes)
        return i, self.boxes[i]


def _nms(boxes: list[Box], scores: list[float], iou: float = 0.3) -> list[int]:
    order = sorted(range(len(boxes)), key=lambda i: -scores[i])
    keep: list[int] = []
    for i in order:
        if all(box_iou(boxes[i], boxes[j]) < iou and not _inside(boxes[i], boxes[j]) for j in keep):
            keep.append(i)
    return keep


def _inside(a: Box, b: Box, frac: float = 0.8) -> bool:
    """Most of a lies within b (or b within a)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return small > 0 and ix * iy / small >= frac


class EmbeddedDetector:
    """Per-clip detection + tracking on a list of BGR frames (all the same size)."""

    def __init__(
        self,
        detect_long_side: int = 640,
        mask_long_side: int = 320,
        min_face_px: int = 16,
        face_cue_score: float = 0.6,
        hog_min_weight: float = 0.5,
        motion_threshold: int = 25,
        min_blob_area: float = 0.004,
        grabcut_iters: int = 2,
        background_frames: int = 11,
        grabcut_max_pixels: int = 16384,
        face_long_side: int = 960,
        face_min_long_side: int = 480,
        face_jump: float = 1.0,
    ) -> None:
        self.detect_long_side, self.mask_long_side = detect_long_side, mask_long_side
        self.min_face_px, self.face_cue_score, self.hog_min_weight = min_face_px, face_cue_score, hog_min_weight
        self.motion_threshold, self.min_blob_area, self.grabcut_iters = motion_threshold, min_blob_area, grabcut_iters
        if grabcut_max_pixels < 64:
            raise ValueError(f"grabcut_max_pixels must be at least 64, got {grabcut_max_pixels}")
        self.background_frames, self.grabcut_max_pixels = background_frames, grabcut_max_pixels
        self.face_jump = face_jump
        self._faces = FaceDetector(face_long_side, min_score=0.5, min_long_side=face_min_long_side)
        self._hog = cv2.HOGDescriptor()
        self._hog.setSVMDetector(cv2.HOGDescriptor_getDefaultPeopleDetector())

    # -- cues ------------------------------------------------------------------------------------------------
    def faces(self, bgr: np.ndarray) -> list[Face]:
        """Faces (decoded-frame pixels) that count as a person cue: confident, not cut off by the frame edge, and at
        least `min_face_px` tall at the people detection size (faces are found at their own, larger size)."""
        s = self.detect_long_side / max(bgr.shape[:2])
        return [
            f
            for f in self._faces.detect(bgr)
            if f.score >= self.face_cue_score and f.quality["inside"] >= 0.9 and f.height * s >= self.min_face_px
        ]

    def people(self, bgr: np.ndarray) -> list[tuple[Box, float]]:
        win_w, win_h = self._hog.winSize
        if bgr.shape[0] + 16 < win_h or bgr.shape[1] + 16 < win_w:
            # no window fits (the scan only shrinks the image), and OpenCV 4.14 segfaults on some such images
            # (a 2048x240 panorama is 640x75 at detection size): the whole worker would die
            return []
        rects, weights = self._hog.detectMultiScale(bgr, winStride=(8, 8), padding=(8, 8), scale=1.05)
        cands = [
            ((float(x), float(y), float(x + w), float(y + h)), float(s))
            for (x, y, w, h), s in zip(rects, np.ravel(weights), strict=True)
            if s >= self.hog_min_weight
        ]
        keep = _nms([c[0] for c in cands], [c[1] for c in cands])
        return [cands[i] for i in keep]

    def foreground(self, small: list[np.ndarray]) -> list[np.ndarray]:
        """Moving pixels of each frame: difference to the median of a few other frames, spread over the clip, warped
        onto it (`background_frames` of them: the median needs a handful, and each costs an alignment)."""
        blurred = [cv2.GaussianBlur(f, (5, 5), 0) for f in small]
        greys = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in blurred]
        orb = cv2.ORB_create(800)
        feats = [orb.detectAndCompute(g, None) for g in greys]
        matcher = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True)
        h, w = greys[0].shape
        aligned: dict[tuple[int, int], np.ndarray | None] = {}  # (j, i): warp of frame j onto frame i

        def warp(j: int, i: int) -> np.ndarray | None:
            # one match per pair of frames: the other direction is the inverse warp (matching is most of the cost)
            if (j, i) not in aligned:
                m = _align(feats[j], feats[i], matcher)
                aligned[(j, i)] = m
                aligned[(i, j)] = None if m is None else cv2.invertAffineTransform(m)
            return aligned[(j, i)]

        out = []
        for i in range(len(small)):
            warped = []
            for j in _spread([j for j in range(len(small)) if j != i], self.background_frames):
                m = warp(j, i)
                warped.append(
                    blurred[j] if m is None else cv2.warpAffine(blurred[j], m, (w, h), borderMode=cv2.BORDER_REFLECT)
                )
            if not warped:
                out.append(np.zeros((h, w), np.uint8))
                continue
            bg = median_of(warped)
            diff = np.abs(blurred[i].astype(np.int16) - bg).max(axis=2).astype(np.uint8)
            otsu, _ = cv2.threshold(diff, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            fg = (diff > max(self.motion_threshold, otsu)).astype(np.uint8)
            fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, np.ones((9, 9), np.uint8))
            out.append(cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8)))
        return out

    def blobs(self, fg: np.ndarray) -> list[Box]:
        h, w = fg.shape
        n, lab, st, _ = cv2.connectedComponentsWithStats(fg)
        boxes: list[Box] = []
        for k in range(1, n):
            x, y, bw, bh, area = st[k]
            if area < self.min_blob_area * h * w or area > 0.6 * h * w:
                continue
            blob = (lab[y : y + bh, x : x + bw] == k).astype(np.uint8)
            parts = _split_cores(blob)
            if len(parts) > 1:
                boxes.extend((x + b[0], y + b[1], x + b[2], y + b[3]) for b in parts)
            else:
                boxes.extend(_split_columns(fg, (float(x), float(y), float(x + bw), float(y + bh))))
        return boxes

    # -- per frame -------------------------------------------------------------------------------------------
    def candidates(self, frame: np.ndarray, small: np.ndarray, fg: np.ndarray) -> list[Candidate]:
        """Merge faces, HOG people and moving blobs of one frame into candidates on the mask grid (no masks yet:
        `track` cuts them for the tracks it keeps)."""
        sh, sw = small.shape[:2]
        s = self.detect_long_side / max(frame.shape[:2])
        det = cv2.resize(frame, None, fx=s, fy=s, interpolation=cv2.INTER_AREA) if s < 1 else frame
        to_grid = sw / det.shape[1]

        def grid(b: Box) -> Box:
            return (b[0] * to_grid, b[1] * to_grid, b[2] * to_grid, b[3] * to_grid)

        to_grid_frame = sw / frame.shape[1]
        faces = [(tuple(v * to_grid_frame for v in f.box), f) for f in self.faces(frame)]
        people = [(grid(b), sc) for b, sc in self.people(det)]
        cands: list[Candidate] = [Candidate(b, "object", score=0.5) for b in self.blobs(fg)]
        for b, sc in people:
            match = [c for c in cands if box_iou(c.box, b) > 0.3 or _inside(c.box, b)]
            if match:
                for c in match:
                    c.kind, c.score = "person", max(c.score, sc)
            else:
                cands.append(Candidate(b, "person", score=sc))
        for f, face in faces:
            cx, cy = (f[0] + f[2]) / 2, (f[1] + f[3]) / 2
            host = [c for c in cands if c.box[0] <= cx <= c.box[2] and c.box[1] <= cy <= c.box[3]]
            fw, fh = f[2] - f[0], f[3] - f[1]  # the body a face implies, from head proportions
            body = (max(0.0, cx - 1.6 * fw), max(0.0, f[1] - 0.3 * fh), min(sw, cx + 1.6 * fw), min(sh, f[1] + 6 * fh))
            if host:
                # the host may be a moving part of the person (a head, a hand): its box takes in the body the face
                # implies, so the mask can cover the person and not flicker with whatever moved
                h0 = host[0]
                h0.box = (
                    min(h0.box[0], body[0]),
                    min(h0.box[1], body[1]),
                    max(h0.box[2], body[2]),
                    max(h0.box[3], body[3]),
                )
                h0.faces.append((f, face))
                h0.kind = "person"
                continue
            cands.append(Candidate(body, "person", faces=[(f, face)], score=face.score))
        out: list[Candidate] = []
        for c in cands:  # one candidate holding several faces side by side is several people
            out.extend(_split_by_faces(c) if len(c.faces) > 1 else [c])
        # masks are cut later, only for the candidates of tracks that are kept (`track`): a box smaller than the
        # least mask area cannot hold a mask that large
        min_area = self.min_blob_area * sh * sw
        return [c for c in _absorb_fragments(out) if (c.box[2] - c.box[0]) * (c.box[3] - c.box[1]) >= min_area]

    def cut(self, small: np.ndarray, fg: np.ndarray, c: Candidate) -> bool:
        """The candidate's mask (GrabCut); False when none of at least the least blob area comes out."""
        c.mask = self._grabcut(small, fg, c.box)
        h, w = fg.shape
        return c.mask is not None and c.mask.sum() >= self.min_blob_area * h * w

    def _grabcut(self, small: np.ndarray, fg: np.ndarray, box: Box) -> np.ndarray | None:
        h, w = fg.shape
        x1, y1 = max(0, int(box[0])), max(0, int(box[1]))
        x2, y2 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
        if x2 - x1 < 4 or y2 - y1 < 4:
            return None
        init = np.full((h, w), cv2.GC_BGD, np.uint8)
        init[y1:y2, x1:x2] = cv2.GC_PR_BGD
        inner = fg[y1:y2, x1:x2] > 0
        seed = np.zeros((h, w), np.uint8)
        if inner.mean() > 0.05:
            init[y1:y2, x1:x2][inner] = cv2.GC_PR_FGD
            seed[y1:y2, x1:x2][inner] = 1
        else:  # nothing moves here: the box's core is probably the subject
            cy1, cy2 = y1 + (y2 - y1) // 6, y2 - (y2 - y1) // 6
            cx1, cx2 = x1 + (x2 - x1) // 4, x2 - (x2 - x1) // 4
            init[cy1:cy2, cx1:cx2] = cv2.GC_PR_FGD
        if not seed.any():
            seed = (init == cv2.GC_PR_FGD).astype(np.uint8)
        # GrabCut on a window around the box: outside it every pixel is fixed background anyway, so only the
        # background colour model changes (it learns the colours around the subject rather than the whole frame).
        mx, my = max(8, (x2 - x1) // 2), max(8, (y2 - y1) // 2)
        wx1, wy1, wx2, wy2 = max(0, x1 - mx), max(0, y1 - my), min(w, x2 + mx), min(h, y2 + my)
        win = np.ascontiguousarray(init[wy1:wy2, wx1:wx2])
        img = np.ascontiguousarray(small[wy1:wy2, wx1:wx2])
        # GrabCut's cost grows faster than its pixel count (colour models + a min cut per iteration): a big window
        # is cut at a reduced size and its labels scaled back (a big subject loses nothing a mask grid shows)
        ww, wh = wx2 - wx1, wy2 - wy1
        f = min(1.0, (self.grabcut_max_pixels / (ww * wh)) ** 0.5)
        if f < 1.0:
            size = (max(4, round(ww * f)), max(4, round(wh * f)))
            img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
            win = cv2.resize(win, size, interpolation=cv2.INTER_NEAREST_EXACT)  # centred, unlike INTER_NEAREST
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        # GrabCut seeds its colour models with k-means on OpenCV's per-thread RNG, whose state carries over from
        # call to call: without a reset a clip's masks (and so its subject count) depend on which clips the same
        # worker cut before it, i.e. on how Ray spread the batches (seen: 6 vs 7 subjects on one clip).
        cv2.setRNGSeed(0)
        try:
            cv2.grabCut(
                img,
                win,
                None,
                bgd,
                fgd,
                self.grabcut_iters,
                cv2.GC_INIT_WITH_MASK,
            )
        except cv2.error:  # degenerate colour model (flat box): fall back to the seed
            return seed
        if f < 1.0:
            win = cv2.resize(win, (ww, wh), interpolation=cv2.INTER_NEAREST_EXACT)
            win[init[wy1:wy2, wx1:wx2] == cv2.GC_BGD] = cv2.GC_BGD  # outside the box stays background
        init[wy1:wy2, wx1:wx2] = win
        mask = ((init == cv2.GC_FGD) | (init == cv2.GC_PR_FGD)).astype(np.uint8)
        if seed.any() and mask_iou(mask, seed) < 0.4:  # GrabCut lost the mover (blur, colours like the ground)
            mask = seed
        n, lab, st, _ = cv2.connectedComponentsWithStats(mask)
        if n > 2:  # drop specks of similar colour elsewhere in the box; keep the big pieces (a shirt splits a body)
            areas = st[1:, cv2.CC_STAT_AREA]
            big = 1 + np.nonzero(areas >= 0.1 * areas.max())[0]
            mask = np.isin(lab, big).astype(np.uint8)
        return mask

    # -- per clip --------------------------------------------------------------------------------------------
    def track(
        self, frames: list[np.ndarray], min_presence: float = 0.3, masks: bool = True
    ) -> tuple[list[Track], tuple[int, int]]:
        """Tracks over the frames (mask-grid coordinates) and the grid's (width, height). `masks=False`: boxes and
        faces only, no GrabCut (the reference backend prompts SAM2 with the boxes and takes its masks)."""
        h, w = frames[0].shape[:2]
        s = self.mask_long_side / max(h, w)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        small = [cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames]
        fgs = self.foreground(small)
        tracks: list[Track] = []
        for i, (frame, sm, fg) in enumerate(zip(frames, small, fgs, strict=True)):
            cands = self.candidates(frame, sm, fg)
            pairs = sorted(
                (
                    (_affinity(t, c, i, self.face_jump), ti, ci)
                    for ti, t in enumerate(tracks)
                    for ci, c in enumerate(cands)
                ),
                reverse=True,
            )
            used_t: set[int] = set()
            used_c: set[int] = set()
            for a, ti, ci in pairs:
                if a <= 0 or ti in used_t or ci in used_c:
                    continue
                used_t.add(ti)
                used_c.add(ci)
                _extend(tracks[ti], i, cands[ci])
            for ci, c in enumerate(cands):
                if ci not in used_c:
                    t = Track(k=len(tracks))
                    _extend(t, i, c)
                    tracks.append(t)
        n = len(frames)
        need = max(1, min_presence * n)
        # GrabCut is the costliest step per candidate, and many candidates of a busy clip belong to tracks too short
        # to keep (measured on the throughput corpus: 183 of 466 cuts): cut the masks of the kept tracks only. A frame
        # whose cut leaves too little mask leaves its track, which must then still be seen often enough. (Such a
        # candidate took part in the association, which it did not when masks were cut first: on the 16 clips of
        # that corpus the subject counts came out the same.)
        kept = []
        for t in tracks:
            if len(t.boxes) < need:
                continue
            for i in sorted(t.cands) if masks else []:
                if not self.cut(small[i], fgs[i], t.cands[i]):
                    _drop(t, i)
            if len(t.boxes) >= need:
                kept.append(t)
        for t in kept:
            # every candidate was cut unless masks=False (then none was); the filter narrows the type
            t.masks = {i: c.mask for i, c in t.cands.items() if c.mask is not None}
            t.cands = {}
        for k, t in enumerate(kept):
            t.k = k
        return kept, size


def _spread(items: list[int], n: int) -> list[int]:
    """At most n items, evenly spaced over the list."""
    if len(items) <= n:
        return items
    return [items[round(k * (len(items) - 1) / (n - 1))] for k in range(n)] if n > 1 else items[:1]


def _extend(t: Track, i: int, c: Candidate) -> None:
    t.boxes[i] = c.box
    t.cands[i] = c
    if c.faces:
        t.faces[i], t.face_info[i] = _best_face(c)
    t.person_votes += c.kind == "person"


def _drop(t: Track, i: int) -> None:
    """Undo `_extend` for frame i."""
    c = t.cands.pop(i)
    t.boxes.pop(i)
    t.faces.pop(i, None)
    t.face_info.pop(i, None)
    t.person_votes -= c.kind == "person"


def _affinity(t: Track, c: Candidate, i: int, face_jump: float = 1.0) -> float:
    """How likely the candidate continues the track. Faces first: where both hold a face (the track its latest, from
    however many frames back), a face that continues the track's (`_same_face`) beats any body overlap, so a person
    whose own track is there takes it before a box that spans two people seated close hands the track from one to the
    other. Otherwise the overlap with the track's last box; a nearby centre also counts across gaps (fast motion
    between samples)."""
    j, last = t.last
    if j == i:
        return 0.0
    body = _body_affinity(last, c.box)
    if c.faces and t.faces:
        mine = t.faces[max(t.faces)]
        face = _best_face(c)[0]
        if _same_face(mine, face, face_jump):
            return 2.0 + box_iou(mine, face)
    return body


def _same_face(a: Box, b: Box, face_jump: float) -> bool:
    """Two face boxes of one person in two tracked frames: the centre moved at most `face_jump` face sizes and the
    size changed by less than 1.8x (the rule `subjects._foreign_faces` cuts a track's face runs by). No limit on how
    many frames apart: a person's face that comes back where it was, after frames without it, continues the track."""
    jump = float(np.hypot((a[0] + a[2] - b[0] - b[2]) / 2, (a[1] + a[3] - b[1] - b[3]) / 2))
    return jump <= face_jump * max(_side(a), _side(b)) and _same_size(a, b)


def _same_size(a: Box, b: Box) -> bool:
    """Two face boxes one person's face can have a sample apart: sizes (sqrt of area) within 1.8x."""
    return max(_side(a), _side(b)) <= 1.8 * min(_side(a), _side(b))


def _side(b: Box) -> float:
    return float(np.sqrt(max(1e-6, (b[2] - b[0]) * (b[3] - b[1]))))


def _best_face(c: Candidate) -> tuple[Box, Face]:
    """The face a candidate stands for: the most confident, largest."""
    return max(c.faces, key=lambda f: f[1].score * f[1].height)


def _body_affinity(last: Box, box: Box) -> float:
    iou = box_iou(last, box)
    if iou > 0.1:
        return iou
    diag = float(np.hypot(last[2] - last[0], last[3] - last[1]))
    dist = float(np.hypot((last[0] + last[2] - box[0] - box[2]) / 2, (last[1] + last[3] - box[1] - box[3]) / 2))
    return 0.1 * (1 - dist / diag) if dist < diag / 2 else 0.0


def _align(src: Any, dst: Any, matcher: Any) -> np.ndarray | None:
    (ks, ds), (kd, dd) = src, dst
    if ds is None or dd is None or len(ks) < 8 or len(kd) < 8:
        return None
    matches = matcher.match(ds, dd)
    if len(matches) < 8:
        return None
    a = np.float32([ks[m.queryIdx].pt for m in matches])
    b = np.float32([kd[m.trainIdx].pt for m in matches])
    m, _ = cv2.estimateAffinePartial2D(a, b, method=cv2.RANSAC, ransacReprojThreshold=2.0)
    return m


def _split_cores(blob: np.ndarray) -> list[Box]:
    """Split a blob whose body erodes into two or more comparable cores (two people joined by a limb); each pixel
    goes to its nearest core. A lone person's head is far smaller than its body, so it does not split off."""
    size = max(blob.shape)
    for r in (0.03, 0.05, 0.07, 0.09):
        k = max(3, int(r * size) | 1)
        core = cv2.erode(blob, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
        n, lab, st, _ = cv2.connectedComponentsWithStats(core)
        if n < 3:
            continue
        areas = st[1:, cv2.CC_STAT_AREA]
        big = [i + 1 for i in np.argsort(-areas) if areas[i] >= 0.35 * areas.max()]
        if len(big) < 2:
            continue
        dists = np.stack([cv2.distanceTransform((lab != i).astype(np.uint8), cv2.DIST_L2, 3) for i in big])
        owner = np.argmin(dists, axis=0)
        out: list[Box] = []
        for j in range(len(big)):
            b = mask_box((owner == j) & (blob > 0))
            if b is not None:
                out.append((float(b[0]), float(b[1]), float(b[2]), float(b[3])))
        return out
    return []


def _split_columns(fg: np.ndarray, box: Box, depth: int = 0) -> list[Box]:
    """Split a blob where its column profile falls to a narrow bridge (two people touching by an arm)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    prof = fg[y1:y2, x1:x2].sum(axis=0).astype(np.float32)
    if depth > 2 or len(prof) < 20:
        return [box]
    prof = np.convolve(prof, np.ones(5) / 5, mode="same")
    lo, hi = len(prof) // 5, len(prof) - len(prof) // 5
    cut = lo + int(np.argmin(prof[lo:hi]))
    left, right = prof[:cut].max(), prof[cut:].max()
    if prof[cut] > 0.5 * min(left, right) or min(cut, len(prof) - cut) < len(prof) // 4:
        return [box]
    out: list[Box] = []
    for a, b in ((x1, x1 + cut), (x1 + cut, x2)):
        ys = np.nonzero(fg[y1:y2, a:b].any(axis=1))[0]
        if len(ys) == 0:
            continue
        out.extend(_split_columns(fg, (float(a), float(y1 + ys[0]), float(b), float(y1 + ys[-1] + 1)), depth + 1))
    return out


def _absorb_fragments(cands: list[Candidate]) -> list[Candidate]:
    """A small moving piece touching a much larger candidate (a limb, a shadow) joins it instead of being a subject;
    a piece with a face does not join one with a face (`_split_by_faces` has already run)."""
    area = [(c.box[2] - c.box[0]) * (c.box[3] - c.box[1]) for c in cands]
    order = sorted(range(len(cands)), key=lambda i: -area[i])
    kept: list[int] = []
    for i in order:
        c = cands[i]
        host = None
        for j in kept:
            b = cands[j].box
            pad = 0.1 * max(b[2] - b[0], b[3] - b[1])
            grown = (b[0] - pad, b[1] - pad, b[2] + pad, b[3] + pad)
            if c.faces and cands[j].faces:  # someone's face beside another's is a second person, not a fragment
                continue
            if area[i] < 0.25 * area[j] and box_iou(grown, c.box) > 0 and _inside(c.box, grown, 0.5):
                host = cands[j]
                break
        if host is None:
            kept.append(i)
            continue
        host.box = (
            min(host.box[0], c.box[0]),
            min(host.box[1], c.box[1]),
            max(host.box[2], c.box[2]),
            max(host.box[3], c.box[3]),
        )
        host.faces.extend(c.faces)
        if c.kind == "person":
            host.kind = "person"
    return [cands[i] for i in sorted(kept)]


def _split_by_faces(c: Candidate) -> list[Candidate]:
    faces = sorted(c.faces, key=lambda f: f[0][0] + f[0][2])
    centres = [(f[0][0] + f[0][2]) / 2 for f in faces]
    edges = [c.box[0]] + [(a + b) / 2 for a, b in itertools.pairwise(centres)] + [c.box[2]]
    return [
        Candidate((edges[i], c.box[1], edges[i + 1], c.box[3]), "person", faces=[f], score=c.score)
        for i, f in enumerate(faces)
    ]
