"""`crops`: attribute crops, object crops and background plates, each bound to the caption words it shows.

Generators such as LumosX condition on a crop per attribute phrase ("blue jeans", "long black hair") and on a
background image named by the caption's scene phrase, and look each file's name up in the caption: so every part
here carries its verbatim caption span. Per clip:

- attributes of each person the caption names and a track is linked to: the attribute's body region (head, upper,
  lower, feet, hands, full; `regions.txt` maps words to regions) cut from the person's mask on the frame that shows
  it best, on white, plus that region's mask on every tracked frame (COCO RLE, the subjects mask grid). Embedded:
  body geometry from the mask and the face box (`regions.py`). Reference: the attribute phrase grounded inside the
  person's box (Grounding DINO) and segmented by SAM2's image predictor, kept where it lies on the person.
- objects and animals the caption names: their subject crop (written by `subjects`, replaced by `identity`), listed
  with their phrase.
- the background plate (`background.py`): the temporal median with the subjects masked out, with its `coverage`
  and `residual`; what no frame shows is painted (embedded: OpenCV's Telea; reference: LaMa); written when the
  camera holds still (`max_residual`) and enough of the scene was seen.

Parts that cannot be made are listed with a reason (`unknown_kind`, `no_track`, `no_face_ref`, `no_ref`,
`not_in_view`, `camera_moves`, `low_coverage`, `too_few_frames`, `background_unseen`, `no_scene_phrase`), so an
export can say why a clip lacks one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from curation.filters import FilterConfig
from curation.manifest import atomic_write_bytes
from curation.masks import mask_box, rle_decode, rle_encode
from curation.runstore import attempt_dir, local
from curation.stage import Resources, Row, Stage, StageContext
from curation.stages.crops.background import MIN_FRAMES, median_plate, subject_free
from curation.stages.crops.regions import attribute_region, body, region_mask
from curation.storage import local_file

GROUNDING_SOURCE = "https://huggingface.co/IDEA-Research/grounding-dino-tiny (a transformers folder)"
SAM2_SOURCE = "https://github.com/facebookresearch/sam2#download-checkpoints"
LAMA_SOURCE = "https://github.com/enesmsahin/simple-lama-inpainting/releases (big-lama.pt, TorchScript)"


class CropsConfig(FilterConfig):
    decode_long_side: int = Field(640, ge=64, description="frames are decoded at most this large (crops, plate)")
    attributes: bool = Field(True, description="attribute crops of linked people")
    background: bool = Field(True, description="background plates")
    dilate: float = Field(0.02, ge=0, le=0.2, description="subject masks grow by this share of the frame's long side")
    max_residual: float = Field(
        6.0, ge=0, description="plate: a clip whose frames differ from the plate by more (8-bit levels) moves"
    )
    min_coverage: float = Field(0.5, ge=0, le=1, description="plate: share of the scene seen free of subjects")
    grounding_model: str = Field("grounding-dino-tiny", description="reference: Grounding DINO folder in models_dir")
    sam2_config: str = Field("configs/sam2.1/sam2.1_hiera_l.yaml", description="reference: SAM2 model config")
    box_threshold: float = Field(0.3, ge=0, le=1, description="reference: Grounding DINO box score threshold")
    text_threshold: float = Field(0.25, ge=0, le=1, description="reference: Grounding DINO text score threshold")
    inpaint_model: str = Field("lama/big-lama.pt", description="reference: LaMa TorchScript file in models_dir")

    reference_weights: ClassVar[tuple[tuple[str, str], ...]] = (
        ("sam2/sam2.1_hiera_large.pt", SAM2_SOURCE),
        ("grounding-dino-tiny", GROUNDING_SOURCE),
        ("lama/big-lama.pt", LAMA_SOURCE),
    )  # the defaults; `weights()` follows the settings

    def weights(self) -> tuple[tuple[str, str], ...]:
        from curation.stages.subjects import sam2_checkpoint

        return (
            (f"sam2/{sam2_checkpoint(self.sam2_config)}", SAM2_SOURCE),
            (self.grounding_model, GROUNDING_SOURCE),
            (self.inpaint_model, LAMA_SOURCE),
        )


def scene_phrase(caption: str) -> tuple[int, int] | None:
    """The span of the caption's scene: the last noun phrase whose head is a place word ("a paved courtyard" ->
    "paved courtyard"), without its article, so a file named by it is a verbatim caption span."""
    from curation.stages.caption.lexicon import lexicon
    from curation.stages.caption.parser import tagged

    lex = lexicon()
    best = None
    for chunk in tagged(caption).noun_chunks:
        root = chunk.root
        lemma = root.lower_[:-1] if root.tag_ == "NNS" and root.lower_.endswith("s") else root.lower_
        if lex.category(lemma) != "place" and lex.category(root.lower_) != "place":
            continue
        toks = [t for t in chunk if t.dep_ not in ("det", "poss", "predet") and not t.is_punct]
        if toks:
            best = (toks[0].idx, toks[-1].idx + len(toks[-1].text))
    return best


class Crops(Stage[CropsConfig]):
    name = "crops"
    version = "1"
    config_class = CropsConfig
    requires = (
        "uri",
        "clip_start_frame",
        "clip_num_frames",
        "caption_text",
        "caption_subjects",
        "subjects_tracks",
        "subjects_dir",
    )
    default_resources = Resources(cpus=0.5, batch_size=2, pool_max=2)
    gpu_backends: ClassVar[dict[str, float]] = {"reference": 0.5}
    score_column = "crops_attributes"
    not_scores = ("parts", "dir", "scene")
    columns: ClassVar[dict[str, str]] = {
        "crops_attributes": "BIGINT",
        "crops_objects": "BIGINT",
        "crops_background_coverage": "DOUBLE",
        "crops_background_residual": "DOUBLE",
        "crops_parts": "VARCHAR",
        "crops_scene": "VARCHAR",
        "crops_dir": "VARCHAR",
    }

    @property
    def backend(self) -> str:
        if self.config.backend == "embedded":
            return "embedded:body-regions+median+telea"
        return f"reference:{self.config.grounding_model}+sam2+median+lama"

    def setup(self, ctx: StageContext) -> None:
        from curation.stages.crops.background import telea

        self._ref = None
        self._fill = telea
        if self.config.backend == "reference":
            from curation.stages.crops.reference import AttributeSegmenter, Inpainter

            self._ref = AttributeSegmenter(self.config, self.resources().gpus)
            self._fill = Inpainter(Path(self.config.models_dir) / self.config.inpaint_model, self.resources().gpus)

    def process(self, r: Row) -> Row:
        from curation.video import read_clip_frames

        c = self.config
        sub_dir = local(r["subjects_dir"], tree=True)
        doc = json.loads((sub_dir / "masks.json").read_text())
        positions = [int(p) for p in doc["frames"]]
        gw, gh = int(doc["width"]), int(doc["height"])
        with local_file(r["uri"]) as path:
            got = read_clip_frames(
                path,
                int(r["clip_start_frame"]),
                positions,
                int(r.get("clip_rotation") or 0),
                c.decode_long_side,
                seek=r.get("clip_ts_regular") is True,
            )
        idx = [i for i, p in enumerate(positions) if p in got]
        if len(idx) < 1:
            return self.row(r, "error", "decode", "none of the tracked frames decoded")
        frames = {i: got[positions[i]] for i in idx}
        fh, fw = next(iter(frames.values())).shape[:2]
        caption = str(r.get("caption_text") or "")
        subjects = {int(s["id"]): s for s in json.loads(r.get("caption_subjects") or "[]")}
        tracks = json.loads(r.get("subjects_tracks") or "[]")
        grids = {t["k"]: [rle_decode(x) for x in doc["tracks"][str(t["k"])]] for t in tracks}
        out_dir = attempt_dir(self.ctx.path("crops", r["video_id"]), r["clip_id"])
        parts: list[dict[str, Any]] = []
        masks: dict[str, list[dict[str, Any]]] = {}
        linked: dict[int, list[dict[str, Any]]] = {}  # a subject with a count ("two girls") has several tracks
        for t in tracks:
            if t.get("subject_id") is not None:
                linked.setdefault(int(t["subject_id"]), []).append(t)
        for sid, s in sorted(subjects.items()):
            if not s.get("span"):
                continue
            if s.get("category") != "person":
                parts += [_subject_part("object", s, t, caption) for t in linked.get(sid) or [None]]
                continue
            parts += [_subject_part("person", s, t, caption) for t in linked.get(sid) or [None]]
            if not c.attributes:
                continue
            for j, a in enumerate(s.get("attributes") or []):
                if not a.get("span"):
                    continue
                for t in linked.get(sid) or [None]:
                    part: dict[str, Any] = {
                        "kind": "attribute",
                        "subject_id": sid,
                        "attribute": j,
                        "phrase": caption[a["span"]["start"] : a["span"]["end"]],
                        "span": [a["span"]["start"], a["span"]["end"]],
                        "k": t["k"] if t else None,
                        "region": attribute_region(a.get("text") or ""),
                        "file": None,
                        "frame": None,
                        "method": None,
                        "skipped": None,
                    }
                    parts.append(part)
                    if part["region"] is None:
                        part["skipped"] = "unknown_kind"
                    elif t is None:
                        part["skipped"] = "no_track"
                    else:
                        name = f"attr_{t['k']}_{j}"
                        got = self._attribute(part, t, grids[t["k"]], positions, frames, (gw, gh), out_dir, name)
                        if got is None:
                            part["skipped"] = "not_in_view"
                        else:
                            masks[name] = got
        scene, coverage, residual = None, None, None
        if c.background:
            bg = self._background(r, grids, frames, (gw, gh), (fw, fh), out_dir)
            coverage, residual = bg.get("coverage"), bg.get("residual")
            parts.append(bg)
            scene = bg.get("phrase")
        doc_out = {"width": gw, "height": gh, "frames": positions, "masks": masks}
        atomic_write_bytes(out_dir / "parts.json", json.dumps(doc_out, separators=(",", ":")).encode())
        return self.row(
            r,
            "ok",
            attributes=sum(p["kind"] == "attribute" and p["file"] is not None for p in parts),
            objects=sum(p["kind"] == "object" and p["file"] is not None for p in parts),
            background_coverage=coverage,
            background_residual=residual,
            parts=json.dumps(parts, ensure_ascii=False),
            scene=scene,
            dir=str(out_dir),
        )

    def _attribute(
        self,
        part: dict[str, Any],
        t: dict[str, Any],
        grid_masks: list[np.ndarray],
        positions: list[int],
        frames: dict[int, np.ndarray],
        grid: tuple[int, int],
        out_dir: Path,
        name: str,
    ) -> list[dict[str, Any]] | None:
        """Region masks on every tracked frame (grid size) and the crop from the best one; None when not in view."""
        import cv2

        gw, gh = grid
        regions: dict[int, np.ndarray] = {}
        for i, m in enumerate(grid_masks):
            if not m.any():
                continue
            f = (t.get("faces") or {}).get(str(positions[i]))
            face = None
            if f is not None:
                x0, y0, x1, y1 = f["box"]
                face = (x0 * gw, y0 * gh, x1 * gw, y1 * gh)
            bd = body(m, face)
            if bd is None:
                continue
            rm = region_mask(m, bd, part["region"])
            if rm is not None:
                regions[i] = rm
        if not regions:
            return None

        def quality(i: int) -> float:
            """Region area, preferring frames where the geometry holds: a face to measure by, an upright body
            (the head-height proportions assume one; a person bending over puts the jeans in the "upper" band)."""
            if i not in frames:
                return -1.0
            has_face = str(positions[i]) in (t.get("faces") or {})
            b = mask_box(grid_masks[i])
            upright = b is not None and (b[3] - b[1]) >= 1.8 * (b[2] - b[0])
            return float(regions[i].sum()) * (2.0 if has_face else 1.0) * (1.0 if upright else 0.4)

        best = max(regions, key=quality)
        if best not in frames:
            return None
        img = frames[best]
        fh, fw = img.shape[:2]
        rm = cv2.resize(regions[best], (fw, fh), interpolation=cv2.INTER_NEAREST)
        method = "body-region"
        if self._ref is not None:
            person = cv2.resize(grid_masks[best], (fw, fh), interpolation=cv2.INTER_NEAREST)
            found = self._ref.segment(img, person, part["phrase"], key=(str(out_dir), best))  # clip, frame
            if found is not None:
                rm, method = found, f"grounding+sam2:{self.config.grounding_model}"
        b = mask_box(rm)
        if b is None:
            return None
        x0, y0, x1, y1 = b
        crop, m = img[y0:y1, x0:x1], rm[y0:y1, x0:x1]
        ok, png = cv2.imencode(".png", np.where(m[..., None] > 0, crop, np.full_like(crop, 255)))
        if not ok:
            return None
        atomic_write_bytes(out_dir / f"{name}.png", png.tobytes())
        part.update(file=f"{name}.png", frame=positions[best], method=method, box=[x0 / fw, y0 / fh, x1 / fw, y1 / fh])
        empty = np.zeros((gh, gw), np.uint8)
        return [rle_encode(regions.get(i, empty)) for i in range(len(grid_masks))]

    def _background(
        self,
        r: Row,
        grids: dict[int, list[np.ndarray]],
        frames: dict[int, np.ndarray],
        grid: tuple[int, int],
        size: tuple[int, int],
        out_dir: Path,
    ) -> dict[str, Any]:
        import cv2

        c = self.config
        fw, fh = size
        caption = str(r.get("caption_text") or "")
        span = scene_phrase(caption) if caption else None
        part: dict[str, Any] = {
            "kind": "background",
            "phrase": caption[span[0] : span[1]] if span else None,
            "span": list(span) if span else None,
            "file": None,
            "method": "temporal-median+" + ("lama" if self._ref is not None else "telea"),
            "skipped": None,
        }
        order = sorted(frames)
        dilate = round(c.dilate * max(fw, fh))
        free = []
        for i in order:
            ms = [cv2.resize(grids[k][i], (fw, fh), interpolation=cv2.INTER_NEAREST) for k in grids]
            free.append(subject_free(ms, dilate) if ms else np.ones((fh, fw), bool))
        plate = median_plate([frames[i] for i in order], free, self._fill)
        measured = plate.usable >= MIN_FRAMES
        part.update(coverage=round(plate.coverage, 4), residual=round(plate.residual, 3) if measured else None)
        if len(order) < MIN_FRAMES:
            part["skipped"] = "too_few_frames"
        elif plate.residual == float("inf"):
            part["skipped"] = "background_unseen"
        elif plate.residual > c.max_residual:
            part["skipped"] = "camera_moves"
        elif plate.coverage < c.min_coverage:
            part["skipped"] = "low_coverage"
        elif span is None:
            part["skipped"] = "no_scene_phrase"
        if part["skipped"] is None or part["skipped"] == "no_scene_phrase":
            ok, png = cv2.imencode(".png", plate.image)
            if ok:  # written without a scene phrase too: formats that do not name the plate still use it
                atomic_write_bytes(out_dir / "background.png", png.tobytes())
                part["file"] = "background.png"
        return part

    def shard_fields(self, row: Row) -> dict[str, Any]:
        """The parts with the member names of their images and masks."""
        parts = json.loads(row.get(self.col("parts")) or "[]")
        cid = row["clip_id"]
        for p in parts:
            if p.get("file"):
                p["file"] = f"{cid}.{p['file']}"
            if p["kind"] == "attribute" and p.get("file"):
                p["masks"] = f"{cid}.parts.json"
        return {"parts": parts}

    def shard_members(self, row: Row) -> list[tuple[str, bytes]]:
        d = row.get(self.col("dir"))
        if not d or row.get(self.col("status")) != "ok":
            return []
        d = local(d, tree=True)
        out = [("parts.json", (d / "parts.json").read_bytes())]
        for p in json.loads(row.get(self.col("parts")) or "[]"):
            if p["kind"] in ("attribute", "background") and p.get("file"):  # persons' and objects': subjects' files
                out.append((p["file"], (d / p["file"]).read_bytes()))
        return out

    def gallery(self, row: Row) -> list[tuple[str, str, bytes]]:
        return [(n.rsplit(".", 1)[0], "image/png", b) for n, b in self.shard_members(row) if n.endswith(".png")]

    def describe(self, row: Row) -> str | None:
        parts = json.loads(row.get(self.col("parts")) or "[]")
        made = [p["phrase"] for p in parts if p.get("file") and p["kind"] == "attribute"]
        bg = next((p for p in parts if p["kind"] == "background"), None)
        text = "attributes: " + (", ".join(made) if made else "none")
        if bg is not None:
            text += f"; background: {bg.get('skipped') or 'plate'} (coverage {bg.get('coverage')})"
        return text


def _subject_part(kind: str, s: dict[str, Any], t: dict[str, Any] | None, caption: str) -> dict[str, Any]:
    """A person (its face crop) or an animal or object (its subject crop) the caption names, with its phrase: the
    images are the `subjects` stage's (replaced by `identity`'s from another clip), listed here with their words.
    A person's grammatical gender from its noun ("woman", "boy"): benchmarks file face references by it."""
    from curation.stages.caption.lexicon import lexicon

    sp = s["span"]
    key = "face_ref" if kind == "person" else "ref"
    has = bool(t and t.get(key))
    name = (f"ref_{t['k']}_face.jpg" if kind == "person" else f"ref_{t['k']}_subject.png") if t and has else None
    part = {
        "kind": kind,
        "subject_id": int(s["id"]),
        "phrase": caption[sp["start"] : sp["end"]],
        "span": [sp["start"], sp["end"]],
        "k": t["k"] if t else None,
        "file": name,
        "frame": (t.get(f"{key}_frame") if t and has else None),  # the clip frame the crop was cut from
        "method": ("face-ref" if kind == "person" else "subject-ref") if has else None,
        "skipped": None if has else ("no_track" if t is None else f"no_{key}"),
    }
    if kind == "person":
        part["gender"] = {"m": "male", "f": "female"}.get(lexicon().gender(str(s.get("name") or ""))) or None
    return part
