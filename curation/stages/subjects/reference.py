"""The subjects stage's reference backend: caption-grounded boxes (Grounding DINO through transformers), SAM2 video
masks and insightface faces (the `gpu` extra, weights from `models_dir`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from curation.errors import require, torch_device
from curation.masks import box_iou, mask_box
from curation.stages.subjects import sam2_checkpoint
from curation.stages.subjects.embedded import EmbeddedDetector, Track

if TYPE_CHECKING:
    from curation.stages.subjects import SubjectsConfig


class Grounder:
    """Open-vocabulary boxes for a phrase (Grounding DINO from a transformers folder): one query per phrase, so
    every box it returns belongs to that phrase."""

    def __init__(self, path: Path, device: str) -> None:
        tr = require("transformers", "subjects reference grounding (or set subjects.grounding: false)")
        self._proc = tr.AutoProcessor.from_pretrained(str(path))
        self._model = tr.AutoModelForZeroShotObjectDetection.from_pretrained(str(path)).to(device).eval()
        self._device = device

    def boxes(
        self, bgr: np.ndarray, phrase: str, box_threshold: float, text_threshold: float
    ) -> list[tuple[tuple[float, float, float, float], float]]:
        """(x0, y0, x1, y1) in frame pixels with scores, best first."""
        import torch
        from PIL import Image

        rgb = Image.fromarray(np.ascontiguousarray(bgr[..., ::-1]))
        text = phrase.lower().strip().rstrip(".") + "."  # Grounding DINO's prompt form: lower case, "." ended
        inputs = self._proc(images=rgb, text=text, return_tensors="pt").to(self._device)
        with torch.inference_mode():
            out = self._model(**inputs)
        res = self._proc.post_process_grounded_object_detection(
            out,
            inputs["input_ids"],
            threshold=box_threshold,
            text_threshold=text_threshold,
            target_sizes=[bgr.shape[:2]],
        )[0]
        pairs = zip(res["boxes"].tolist(), res["scores"].tolist(), strict=True)
        found = [((float(b[0]), float(b[1]), float(b[2]), float(b[3])), float(sc)) for b, sc in pairs]
        return sorted(found, key=lambda x: -x[1])


class Reference:
    """Caption-grounded SAM2 masks and insightface faces (GPU). SAM2 is prompted with the embedded detector's tracks
    (the first frame each is seen) and with a box for each caption subject's phrase from Grounding DINO on a few
    keyframes, so an animal or object the caption names gets a mask even when no detector of ours finds it; masks
    propagate both ways over the clip; faces come from insightface's detector on every tracked frame."""

    def __init__(self, c: SubjectsConfig, gpus: float) -> None:
        what = "subjects backend reference (or use backend: embedded)"
        torch = require("torch", what)
        FaceAnalysis = require("insightface.app", what).FaceAnalysis
        build_sam2_video_predictor = require("sam2.build_sam", what).build_sam2_video_predictor
        root = Path(c.models_dir)
        device = torch_device(torch, gpus, "subjects")
        self._torch = torch
        self._device = device
        # boxes only: the other four buffalo_l models (landmarks, gender/age, recognition) are not needed here;
        # onnxruntime's CUDA provider on a GPU worker (the GPU image installs onnxruntime-gpu)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        self._faces = FaceAnalysis(
            name="buffalo_l", root=str(root / "insightface"), allowed_modules=["detection"], providers=providers
        )
        self._faces.prepare(ctx_id=0 if device == "cuda" else -1, det_size=(640, 640))
        self._sam = build_sam2_video_predictor(
            c.sam2_config, str(root / "sam2" / sam2_checkpoint(c.sam2_config)), device=device
        )
        self._fp32 = device != "cuda" and _keep_memory_fp32(self._sam)
        self._grounder = Grounder(root / c.grounding_model, device) if c.grounding else None

    def _ground(
        self,
        frames: list[np.ndarray],
        seeds: list[Track],
        subjects: list[dict[str, Any]],
        c: SubjectsConfig,
        scale: tuple[float, float],
    ) -> list[tuple[Track, dict[int, tuple[float, float, float, float]]]]:
        """Each caption subject's best box on each keyframe. A subject whose box lies on a detector track (IoU >=
        0.5 on that frame) names that track; otherwise it becomes a new track prompted at those keyframes.
        Returns the new tracks with their prompts (mask-grid boxes per frame)."""
        from curation.filters import pick

        assert self._grounder is not None
        sx, sy = scale
        keyframes = [int(i) for i in pick(len(frames), c.grounding_keyframes)]
        next_k = max((t.k for t in seeds), default=-1) + 1
        new: list[tuple[Track, dict[int, tuple[float, float, float, float]]]] = []
        for s in subjects:
            phrase = str(s.get("name") or "").strip()
            if not phrase:
                continue
            found: dict[int, tuple[float, float, float, float]] = {}
            prev: tuple[float, float, float, float] | None = None
            for fi in keyframes:
                hits = [
                    (x0 / sx, y0 / sy, x1 / sx, y1 / sy)
                    for (x0, y0, x1, y1), _ in self._grounder.boxes(
                        frames[fi], phrase, c.box_threshold, c.text_threshold
                    )
                ]
                if hits:  # the best box, or on later keyframes the one continuing the previous (same object)
                    found[fi] = hits[0] if prev is None else max(hits, key=lambda b: box_iou(b, prev))
                    prev = found[fi]
            if not found:
                continue

            def overlap(t: Track, found: dict[int, tuple[float, float, float, float]] = found) -> float:
                return max((box_iou(t.boxes[fi], b) for fi, b in found.items() if fi in t.boxes), default=0.0)

            best = max(seeds, key=overlap, default=None)
            if best is not None and overlap(best) >= 0.5:
                if best.grounded_subject is None:  # the phrase names the detector's track
                    best.grounded_subject, best.grounded_phrase = int(s["id"]), phrase
                    if best.grounded_category is None and not best.person_votes:
                        best.grounded_category = s.get("category")
                continue  # on a track already: never a second SAM2 object on the same thing
            t = Track(k=next_k, grounded_subject=int(s["id"]), grounded_phrase=phrase)
            t.grounded_category = s.get("category")
            next_k += 1
            new.append((t, found))
        return new

    def track(
        self,
        frames: list[np.ndarray],
        det: EmbeddedDetector,
        c: SubjectsConfig,
        subjects: list[dict[str, Any]] | None = None,
    ) -> tuple[list[Track], Any]:
        import tempfile

        import cv2

        seeds, grid = det.track(frames, c.min_presence, masks=False)  # SAM2 makes the masks
        gw, gh = grid
        fh, fw = frames[0].shape[:2]
        sx, sy = fw / gw, fh / gh
        # SAM2 prompts: object id -> {frame: mask-grid box}
        prompts = {t.k: {min(t.boxes): t.boxes[min(t.boxes)]} for t in seeds}
        grounded = self._ground(frames, seeds, subjects or [], c, (sx, sy)) if self._grounder is not None else []
        for t, found in grounded:
            prompts[t.k] = found
        with tempfile.TemporaryDirectory() as tmp:  # SAM2 reads a folder of numbered JPEGs
            for i, f in enumerate(frames):
                cv2.imwrite(str(Path(tmp) / f"{i:05d}.jpg"), f)
            torch = self._torch
            # SAM2's video predictor keeps its memory features in bf16 and mixes them with fp32 tensors: it runs under
            # bf16 autocast, except on the CPU where the memory is kept in fp32 (`_keep_memory_fp32`)
            amp = torch.autocast(
                "cuda" if self._device == "cuda" else "cpu", dtype=torch.bfloat16, enabled=not self._fp32
            )
            out = {
                t.k: Track(
                    k=t.k,
                    person_votes=t.person_votes,
                    grounded_subject=t.grounded_subject,
                    grounded_phrase=t.grounded_phrase,
                    grounded_category=t.grounded_category,
                )
                for t in [*seeds, *(g for g, _ in grounded)]
            }
            with torch.inference_mode(), amp:
                state = self._sam.init_state(video_path=tmp)
                for k, boxes in prompts.items():
                    for fi, b in sorted(boxes.items()):
                        self._sam.add_new_points_or_box(
                            inference_state=state,
                            frame_idx=fi,
                            obj_id=k,
                            box=np.array([b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy], np.float32),
                        )
                prompted = [fi for boxes in prompts.values() for fi in boxes]
                if prompted:  # forward from the earliest prompt to the end, then back from it to frame 0 if needed
                    passes = [self._sam.propagate_in_video(state, start_frame_idx=min(prompted))]
                    if min(prompted) > 0:
                        passes.append(self._sam.propagate_in_video(state, start_frame_idx=min(prompted), reverse=True))
                    for results in passes:
                        for fi, ids, logits in results:
                            for oid, lg in zip(ids, logits, strict=True):
                                m = (lg[0] > 0).float().cpu().numpy().astype(np.uint8)
                                m = cv2.resize(m, grid, interpolation=cv2.INTER_NEAREST)
                                b = mask_box(m)
                                if b is not None and oid in out:
                                    out[oid].masks[fi], out[oid].boxes[fi] = m, tuple(map(float, b))
        for i, f in enumerate(frames):
            for face in self._faces.get(f):
                x1, y1, x2, y2 = (float(v) for v in face.bbox)
                g = (x1 / sx, y1 / sy, x2 / sx, y2 / sy)
                host = max(out.values(), key=lambda t: box_iou(t.boxes.get(i, (0, 0, 0, 0)), g), default=None)
                if host is not None and i in host.boxes and box_iou(host.boxes[i], g) > 0:
                    host.faces[i] = g
        return [t for t in out.values() if t.masks], grid


def _keep_memory_fp32(sam: Any) -> bool:
    """SAM2's video predictor stores its memory features in bf16 (GPU memory) and later mixes them with fp32 tensors,
    which needs bf16 autocast. On a CPU without native bf16 an autocast matmul is ~70x slower than fp32 (measured on
    a 2-core AMD EPYC with AVX2 only: 2.26 s against 0.031 s for a 1024x1024 product), so on the CPU the stored
    memory is cast back to fp32 as it is made and SAM2 runs in fp32. False (autocast stays) when this SAM2 has not
    the two methods that store it."""
    single = getattr(sam, "_run_single_frame_inference", None)
    encode = getattr(sam, "_run_memory_encoder", None)
    if single is None or encode is None:
        return False

    def run_single(*a: Any, **k: Any) -> Any:
        out, masks = single(*a, **k)
        if out.get("maskmem_features") is not None:
            out["maskmem_features"] = out["maskmem_features"].float()
        return out, masks

    def run_encoder(*a: Any, **k: Any) -> Any:
        feats, pos = encode(*a, **k)
        return feats.float(), pos

    sam._run_single_frame_inference, sam._run_memory_encoder = run_single, run_encoder
    return True
