"""The subjects stage's reference backend: insightface faces + SAM2 video masks (the `gpu` extra, weights from
`models_dir`)."""

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


class Reference:
    """insightface faces + SAM2 video masks (GPU). Boxes to prompt SAM2 come from the embedded detector's tracks
    (the first frame each track is seen), faces from insightface on every tracked frame."""

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

    def track(self, frames: list[np.ndarray], det: EmbeddedDetector, c: SubjectsConfig) -> tuple[list[Track], Any]:
        import tempfile

        import cv2

        seeds, grid = det.track(frames, c.min_presence)
        gw, gh = grid
        fh, fw = frames[0].shape[:2]
        sx, sy = fw / gw, fh / gh
        with tempfile.TemporaryDirectory() as tmp:  # SAM2 reads a folder of numbered JPEGs
            for i, f in enumerate(frames):
                cv2.imwrite(str(Path(tmp) / f"{i:05d}.jpg"), f)
            torch = self._torch
            # SAM2's video predictor mixes bf16 and fp32 tensors unless it runs under bf16 autocast on the GPU
            amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self._device == "cuda")
            out = {t.k: Track(k=t.k, person_votes=t.person_votes) for t in seeds}
            with torch.inference_mode(), amp:
                state = self._sam.init_state(video_path=tmp)
                first = {}
                for t in seeds:
                    i0 = min(t.boxes)
                    b = t.boxes[i0]
                    first[t.k] = i0
                    self._sam.add_new_points_or_box(
                        inference_state=state,
                        frame_idx=i0,
                        obj_id=t.k,
                        box=np.array([b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy], np.float32),
                    )
                if seeds:  # forward from the earliest prompt, then backward from the latest: every frame of the clip
                    passes = [self._sam.propagate_in_video(state, start_frame_idx=min(first.values()))]
                    if max(first.values()) > 0:
                        passes.append(
                            self._sam.propagate_in_video(state, start_frame_idx=max(first.values()), reverse=True)
                        )
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
