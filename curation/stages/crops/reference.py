"""The crops stage's reference backend: an attribute phrase grounded inside its person (Grounding DINO through
transformers) and segmented with SAM2's image predictor, and the background plate's unseen parts painted by LaMa
(the TorchScript `big-lama.pt` OpenS2V-Nexus's pipeline also uses); the `gpu` extra, weights from `models_dir`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from curation.errors import require, torch_device
from curation.masks import mask_box

if TYPE_CHECKING:
    from curation.stages.crops import CropsConfig


class AttributeSegmenter:
    """The mask of "blue jeans" on the person wearing them: boxes for the phrase on the frame, the best one lying
    mostly on the person's mask, SAM2 prompted with it, and the result kept where it lies on the person."""

    def __init__(self, c: CropsConfig, gpus: float) -> None:
        what = "crops backend reference (or use backend: embedded)"
        torch = require("torch", what)
        build_sam2 = require("sam2.build_sam", what).build_sam2
        predictor_cls = require("sam2.sam2_image_predictor", what).SAM2ImagePredictor
        from curation.stages.subjects import sam2_checkpoint
        from curation.stages.subjects.reference import Grounder

        root = Path(c.models_dir)
        device = torch_device(torch, gpus, "crops")
        self._sam = predictor_cls(
            build_sam2(c.sam2_config, str(root / "sam2" / sam2_checkpoint(c.sam2_config)), device=device)
        )
        self._grounder = Grounder(root / c.grounding_model, device)
        self._torch = torch
        self._c = c
        self._key: object = None  # the frame whose embedding SAM2 holds

    def segment(self, bgr: np.ndarray, person: np.ndarray, phrase: str, key: object = None) -> np.ndarray | None:
        """uint8 mask (frame size) of `phrase` on `person` (frame-size mask), or None when it is not found there.
        `key` names the frame: attributes on the same frame share SAM2's image embedding."""
        pb = mask_box(person)
        if pb is None:
            return None
        c = self._c
        on_person = []
        for (x0, y0, x1, y1), score in self._grounder.boxes(bgr, phrase, c.box_threshold, c.text_threshold):
            ix0, iy0, ix1, iy1 = max(x0, pb[0]), max(y0, pb[1]), min(x1, pb[2]), min(y1, pb[3])
            inside = max(0.0, ix1 - ix0) * max(0.0, iy1 - iy0) / max(1e-6, (x1 - x0) * (y1 - y0))
            if inside >= 0.8:
                on_person.append(((x0, y0, x1, y1), score))
        if not on_person:
            return None
        box = np.array(max(on_person, key=lambda b: b[1])[0], dtype=np.float32)
        with self._torch.inference_mode():
            if key is None or key != self._key:
                self._sam.set_image(np.ascontiguousarray(bgr[..., ::-1]))
                self._key = key
            masks, _, _ = self._sam.predict(box=box, multimask_output=False)
        m = (np.asarray(masks[0]) > 0) & (person > 0)
        need = max(64, int(0.01 * (person > 0).sum()))
        return m.astype(np.uint8) if int(m.sum()) >= need else None


class Inpainter:
    """LaMa as a TorchScript module: `model(image, mask)` with image (1, 3, H, W) RGB in [0, 1] and mask (1, 1, H, W)
    (1 = paint), H and W multiples of 8, returning the painted image in [0, 1]."""

    def __init__(self, path: Path, gpus: float) -> None:
        torch = require("torch", "crops backend reference (or use backend: embedded)")
        self._device = torch_device(torch, gpus, "crops")
        self._model = torch.jit.load(str(path), map_location=self._device).eval()
        self._torch = torch

    def __call__(self, bgr: np.ndarray, hole: np.ndarray) -> np.ndarray:
        torch = self._torch
        h, w = hole.shape
        ph, pw = (8 - h % 8) % 8, (8 - w % 8) % 8
        rgb = np.pad(bgr[..., ::-1], ((0, ph), (0, pw), (0, 0)), mode="reflect").astype(np.float32) / 255.0
        m = np.pad((hole > 0).astype(np.float32), ((0, ph), (0, pw)), mode="reflect")
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].to(self._device)
        mask = torch.from_numpy(m)[None, None].to(self._device)
        with torch.inference_mode():
            out = self._model(image, mask)[0].permute(1, 2, 0).float().cpu().numpy()
        painted = (out[:h, :w].clip(0, 1) * 255).round().astype(np.uint8)[..., ::-1]
        keep = (hole == 0)[..., None]
        return np.where(keep, bgr, painted)
