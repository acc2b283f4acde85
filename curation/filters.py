"""What the four frame-sample filters share: read the clip's samples (never the video), score, threshold.

Each filter has two backends behind one interface: `embedded` (CPU, no downloads, the default) and `reference`
(the real model library from the `gpu` extra, weights read from `models_dir`). The backend that produced a score is
recorded in `<stage>_backend` on every row.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field, ValidationInfo, model_validator

from curation.samples import SAMPLES_COLUMN, load_samples
from curation.stage import Kind, Row, Stage, StageConfig, operational


def models_dir_default() -> str:
    return os.environ.get("CURATION_MODELS", "models")


class FilterConfig(StageConfig):
    backend: Literal["embedded", "reference"] = "embedded"
    models_dir: str = operational(
        default_factory=models_dir_default, description="where reference weights are read from"
    )
    max_frames: int = Field(8, ge=1, le=64, description="at most this many of the clip's samples are scored")

    # (file name inside models_dir, where to get it) for the reference backend; set by each filter's config
    reference_weights: ClassVar[tuple[tuple[str, str], ...]] = ()

    def weights(self) -> tuple[tuple[str, str], ...]:
        """(file, source) this config's reference backend reads; a config whose files depend on its settings
        overrides it."""
        return self.reference_weights

    @model_validator(mode="after")
    def _reference_weights_present(self, info: ValidationInfo) -> FilterConfig:
        # `curation models` lists what is missing: it validates with context {"weights": False}
        if self.backend == "reference" and (info.context or {}).get("weights", True):
            missing = [
                f"{Path(self.models_dir) / name} (get it from {source})"
                for name, source in self.weights()
                if not (Path(self.models_dir) / name).exists()
            ]
            if missing:
                raise ValueError(
                    f"reference backend needs {'; '.join(missing)}. Set models_dir or the CURATION_MODELS "
                    "environment variable to the folder holding them, or use backend: embedded"
                )
        return self


def pick(n_total: int, n: int) -> np.ndarray:
    """Evenly spaced indices of at most n out of n_total."""
    if n_total <= n:
        return np.arange(n_total)
    return np.unique(np.linspace(0, n_total - 1, n).round().astype(int))


class SampleFilter(Stage[Any]):
    """Base of the frame-sample filters: `score` measures, `decide` thresholds; both per clip."""

    kind = Kind.CLIP
    requires: ClassVar[tuple[str, ...]] = (SAMPLES_COLUMN,)

    @property
    def backend(self) -> str:
        return f"{self.config.backend}:{self.backend_names[self.config.backend]}"

    backend_names: ClassVar[dict[str, str]] = {"embedded": "embedded", "reference": "reference"}

    def score(self, row: Row, samples: dict[str, np.ndarray]) -> dict[str, Any]:
        raise NotImplementedError

    def decide(self, scores: dict[str, Any]) -> tuple[str, str | None]:
        raise NotImplementedError

    def process(self, r: Row) -> Row:
        scores = self.score(r, load_samples(r))
        status, reason = self.decide(scores)
        return self.row(r, status, reason, **scores)  # scores recorded even when rejected
