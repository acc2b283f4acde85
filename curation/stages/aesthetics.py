"""`aesthetics`: a 1-10 score per clip.

- `reference`: the LAION improved aesthetic predictor (CLIP ViT-L/14 image embedding -> MLP), via open_clip.
- `embedded`: NOT a learned aesthetic model. A documented, no-download *quality proxy* on the same 1-10 scale from
  five classical measurements on the frame samples: sharpness (variance of the Laplacian at a fixed 384 px scale),
  exposure (mean luma and clipped pixels), contrast (RMS of luma), colourfulness (Hasler & Suesstrunk) and blockiness
  (8x8 coding-block edges vs. other edges, measured where the samples keep the source's pixel grid) and source
  resolution (short side, 144 px -> 0, 720 px -> 1, log scale: training data wants pixels). Each maps to
  [0, 1]; their weighted mean q gives score = 1 + 9 q. The backend is recorded as `embedded:quality-proxy`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, model_validator

from curation.errors import require, torch_device
from curation.filters import FilterConfig, SampleFilter, pick
from curation.stage import Resources, Row, StageContext

WEIGHTS = {
    "sharpness": 0.25,
    "exposure": 0.1,
    "contrast": 0.1,
    "colourfulness": 0.1,
    "blockiness": 0.2,
    "resolution": 0.25,
}


CLIP_SOURCE = (
    "huggingface.co/timm/vit_large_patch14_clip_224.openai (open_clip_model.safetensors: OpenAI's ViT-L/14 as a "
    "state dict)"
)


def is_torchscript(path: Path) -> bool:
    """True for a TorchScript archive (a zip holding `constants.pkl` or `code/`), as OpenAI's CLIP .pt files are."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def laion_mlp(torch: Any) -> Any:
    """The improved-aesthetic-predictor head, in its published layout, so its `layers.N` keys load: Linear(768,
    1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16),
    Linear(16, 1); no activations."""
    nn = torch.nn
    return nn.Sequential(
        nn.Linear(768, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


class AestheticsConfig(FilterConfig):
    min_score: float = Field(
        4.0,
        ge=1,
        le=10,
        description="clips below are rejected (Open-Sora keeps >= 4.5 "
        "with the LAION predictor; the proxy is calibrated to a similar range)",
    )
    clip_model: str = Field(
        "ViT-L-14-quickgelu", description="open_clip model name; OpenAI's weights need the QuickGELU variant"
    )
    clip_pretrained_file: str = "open_clip_model.safetensors"
    mlp_file: str = "sac+logos+ava1-l14-linearMSE.pth"
    reference_weights: ClassVar[tuple[tuple[str, str], ...]] = (
        ("open_clip_model.safetensors", CLIP_SOURCE),
        ("sac+logos+ava1-l14-linearMSE.pth", "github.com/christophschuhmann/improved-aesthetic-predictor"),
    )

    @model_validator(mode="after")
    def _state_dict_not_torchscript(self) -> AestheticsConfig:
        path = Path(self.models_dir) / self.clip_pretrained_file
        if self.backend == "reference" and path.is_file() and is_torchscript(path):
            raise ValueError(
                f"{path} is a TorchScript archive (OpenAI's ViT-L-14.pt), which open_clip 3 refuses to load; use the "
                f"state-dict file instead: {CLIP_SOURCE}"
            )
        return self


def _ramp(x: float, lo: float, hi: float) -> float:
    return float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))


def blockiness(grey: np.ndarray, period: float) -> float:
    """Mean |horizontal + vertical step| on the coding-block grid divided by the mean elsewhere (1 = no blocks)."""
    g = grey.astype(np.float32)
    dx = np.abs(np.diff(g, axis=1))
    dy = np.abs(np.diff(g, axis=0))
    cols = np.arange(dx.shape[1])
    rows = np.arange(dy.shape[0])
    on_c = np.abs(((cols + 1) / period) - np.round((cols + 1) / period)) * period < 0.5
    on_r = np.abs(((rows + 1) / period) - np.round((rows + 1) / period)) * period < 0.5
    on = dx[:, on_c].mean() + dy[on_r, :].mean()
    off = dx[:, ~on_c].mean() + dy[~on_r, :].mean()
    return float(on / max(off, 1e-3))


def quality_proxy(frames: np.ndarray, source_size: tuple[int, int] | None) -> dict[str, Any]:
    import cv2

    sharp, expo, contr, colour, block = [], [], [], [], []
    for rgb in frames:
        h, w = rgb.shape[:2]
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        f = 384 / max(h, w)
        fixed = cv2.resize(
            grey,
            (max(1, round(w * f)), max(1, round(h * f))),
            interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC,
        )
        sharp.append(float(cv2.Laplacian(fixed, cv2.CV_32F).var()))
        luma = grey.astype(np.float32) / 255.0
        clipped = float(((luma < 0.02) | (luma > 0.98)).mean())
        expo.append(1.0 - min(1.0, abs(float(luma.mean()) - 0.5) * 1.6 + clipped))
        contr.append(float(luma.std()))
        r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
        rg, yb = r - g, 0.5 * (r + g) - b
        colour.append(float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())))
        # only where samples keep the source's pixel grid: a resampled grid makes block edges unmeasurable
        same_grid = source_size is None or w == source_size[0]
        block.append(blockiness(grey, 8) if same_grid else float("nan"))
    m = {
        "sharpness": float(np.median(sharp)),
        "exposure": float(np.median(expo)),
        "contrast": float(np.median(contr)),
        "colourfulness": float(np.median(colour)),
        "blockiness": float(np.nanmedian(block)) if not np.all(np.isnan(block)) else None,
    }
    parts = {
        "sharpness": _ramp(np.log10(m["sharpness"] + 1), 1.0, 3.2),
        "exposure": m["exposure"],
        "contrast": _ramp(m["contrast"], 0.04, 0.25),
        "colourfulness": _ramp(m["colourfulness"], 5.0, 60.0),
    }
    if m["blockiness"] is not None:
        parts["blockiness"] = 1.0 - _ramp(m["blockiness"], 1.03, 1.3)
    if source_size is not None:
        m["short_side"] = min(source_size)
        parts["resolution"] = _ramp(np.log2(min(source_size)), np.log2(144), np.log2(720))
    q = sum(WEIGHTS[k] * v for k, v in parts.items()) / sum(WEIGHTS[k] for k in parts)
    return {"score": 1.0 + 9.0 * q, **m}


class _LaionAesthetic:
    """Reference backend: open_clip ViT-L/14 + the LAION MLP head (imported lazily from the `gpu` extra)."""

    def __init__(self, cfg: AestheticsConfig, gpus: float) -> None:
        open_clip = require("open_clip", "aesthetics backend reference")
        torch = require("torch", "aesthetics backend reference")

        self.torch = torch
        self.device = torch_device(torch, gpus, "aesthetics")
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.clip_model, pretrained=f"{cfg.models_dir}/{cfg.clip_pretrained_file}", device=self.device
        )
        self.model, self.preprocess = model.eval(), preprocess
        sd = torch.load(f"{cfg.models_dir}/{cfg.mlp_file}", map_location=self.device, weights_only=True)
        mlp = laion_mlp(torch)
        mlp.load_state_dict({k.removeprefix("layers."): v for k, v in sd.items()})
        self.mlp = mlp.to(self.device).eval()

    def __call__(self, frames: np.ndarray) -> dict[str, Any]:
        from PIL import Image

        torch = self.torch
        with torch.no_grad():
            x = torch.stack([self.preprocess(Image.fromarray(f)) for f in frames]).to(self.device)
            emb = self.model.encode_image(x).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            scores = self.mlp(emb).squeeze(-1).cpu().numpy()
        return {"score": float(scores.mean()), "score_min": float(scores.min())}


class Aesthetics(SampleFilter):
    name = "aesthetics"
    version = "2"
    config_class = AestheticsConfig
    requires = ("clip_samples_path",)
    default_resources = Resources(cpus=0.5, batch_size=8, pool_max=2)
    gpu_backends: ClassVar[dict[str, float]] = {"reference": 0.25}
    backend_names: ClassVar[dict[str, str]] = {"embedded": "quality-proxy", "reference": "laion-aesthetic-v2"}
    score_column = "aesthetics_score"

    def setup(self, ctx: StageContext) -> None:
        self._ref = _LaionAesthetic(self.config, self.resources().gpus) if self.config.backend == "reference" else None

    def score(self, row: Row, samples: dict[str, np.ndarray]) -> dict[str, Any]:
        frames = samples["frames"][pick(len(samples["frames"]), self.config.max_frames)]
        if self._ref is not None:
            return self._ref(frames)
        w = row.get("probe_display_width") or row.get("probe_width")
        h = row.get("probe_display_height") or row.get("probe_height")
        return quality_proxy(frames, (int(w), int(h)) if w and h else None)

    def decide(self, s: dict[str, Any]) -> tuple[str, str | None]:
        return ("reject", "low_score") if s["score"] < self.config.min_score else ("ok", None)

    def thresholds(self) -> dict[str, list[tuple[float, str]]]:
        return {self.col("score"): [(self.config.min_score, "min")]}
