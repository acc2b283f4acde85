"""The crops stage's reference backend: an attribute phrase grounded inside its person (Grounding DINO through
transformers) and segmented with SAM2's image predictor (the `gpu` extra, weights from `models_dir`)."""

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

    def segment(self, bgr: np.ndarray, person: np.ndarray, phrase: str) -> np.ndarray | None:
        """uint8 mask (frame size) of `phrase` on `person` (frame-size mask), or None when it is not found there."""
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
            self._sam.set_image(np.ascontiguousarray(bgr[..., ::-1]))
            masks, _, _ = self._sam.predict(box=box, multimask_output=False)
        m = (np.asarray(masks[0]) > 0) & (person > 0)
        need = max(64, int(0.01 * (person > 0).sum()))
        return m.astype(np.uint8) if int(m.sum()) >= need else None
