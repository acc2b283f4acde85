"""Training configuration: `configs/train_tiny.yaml` (random init, CPU, the tests) and `configs/train_wan13b.yaml`
(real Wan2.1-T2V-1.3B weights from a folder). Same loader and `--set` overrides as the pipeline config."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from curation.config import _format_validation, apply_overrides, read_yaml_mapping
from curation.errors import ConfigError

WAN_SOURCE = (
    "https://huggingface.co/Wan-AI/Wan2.1-T2V-1.3B-Diffusers (huggingface-cli download, then point model.path at it)"
)
PRETRAINED_PARTS = ("transformer", "vae", "text_encoder", "tokenizer")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TinyDims(_Strict):
    """Sizes of the random-init model: small enough to train on two CPU cores in seconds."""

    layers: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)
    head_dim: int = Field(24, ge=6, description="multiple of 6: Wan splits RoPE over (t, h, w)")
    ffn_dim: int = Field(96, ge=1)
    freq_dim: int = Field(32, ge=2)
    text_dim: int = Field(32, ge=8)
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(4, ge=1)
    vae_base_dim: int = Field(16, ge=4)
    z_dim: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _rope(self) -> TinyDims:
        if self.head_dim % 6:
            raise ValueError(f"head_dim ({self.head_dim}) must be a multiple of 6 for Wan's 3D RoPE")
        return self


class ModelConfig(_Strict):
    kind: Literal["tiny", "pretrained"] = "tiny"
    path: str | None = Field(None, description="pretrained: a diffusers-format Wan2.1 folder")
    tiny: TinyDims = TinyDims()
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "bf16"] = "no"
    max_subjects: int = Field(4, ge=0, le=16, description="reference groups per sample (extra subjects dropped)")
    face_refs: bool = Field(True, description="a second reference slot per subject for its face crop")
    cross_attention: Literal["hard", "soft"] = Field(
        "soft",
        description="references' cross-attention: hard (own words + context only) or soft (LumosX: every word, "
        "own words biased up, other subjects' down)",
    )
    soft_ratio: float = Field(0.1, ge=0, description="soft cross-attention: bias = ratio x |score| x template")
    soft_pool: int = Field(8, ge=1, description="soft cross-attention: reference queries averaged over pool x pool")
    text_encoder_dtype: Literal["float32", "bfloat16"] | None = Field(
        None, description="umT5's weights (null: bfloat16 under mixed_precision bf16, else float32); VAE is fp32"
    )

    @model_validator(mode="after")
    def _path(self) -> ModelConfig:
        if self.kind == "pretrained" and not self.path:
            raise ValueError(f"model.kind pretrained needs model.path: {WAN_SOURCE}")
        return self

    def check_weights(self) -> None:
        """Fail before any work when the pretrained folder is incomplete, naming what is missing and its source."""
        if self.kind != "pretrained":
            return
        root = Path(self.path or "").expanduser()
        missing = [p for p in PRETRAINED_PARTS if not (root / p).is_dir()]
        if missing:
            raise ConfigError(
                f"model.path {str(root)!r} lacks {', '.join(p + '/' for p in missing)}: it must be a diffusers-format "
                f"Wan2.1 folder; get it from {WAN_SOURCE}"
            )


class DataConfig(_Strict):
    batch_size: int = Field(2, ge=1)
    shuffle_buffer: int = Field(16, ge=1)
    drop_last: bool = Field(False, description="drop each bucket's short last batch of an epoch")
    buckets: list[tuple[int, int]] = Field(
        default_factory=lambda: [(64, 64)], description="(height, width) resolution buckets; multiples of 16"
    )
    frames: list[int] = Field(default_factory=lambda: [9, 5], description="frame-count buckets, each 4n+1")
    frame_stride: int = Field(2, ge=1, description="take every n-th frame of the clip (lowered for short clips)")
    ref_size: int = Field(32, ge=16, description="reference crops are letterboxed to this square; multiple of 16")
    text_len: int = Field(64, ge=8, description="caption tokens (padded / truncated)")
    mask_max_gap: int = Field(4, ge=0, description="a frame takes the mask of the nearest tracked frame this close")
    prefetch: int = Field(
        2, ge=0, description="batches decoded ahead in a background thread while the model steps (0: none)"
    )
    text_cache: bool = Field(True, description="keep each caption's umT5 embedding on disk and reuse it")
    text_cache_dir: str | None = Field(None, description="where (null: OUT/text-cache, beside the checkpoints)")
    rank: int = Field(0, ge=0, description="this process's share of the shards (distributed training)")
    world_size: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _shapes(self) -> DataConfig:
        for h, w in self.buckets:
            if h % 16 or w % 16 or h <= 0 or w <= 0:
                raise ValueError(f"bucket {h}x{w}: sides must be positive multiples of 16 (VAE 8x, patch 2x)")
        for f in self.frames:
            if f < 1 or (f - 1) % 4:
                raise ValueError(f"frame bucket {f}: must be 4n+1 (Wan's VAE keeps frame 0, then groups of 4)")
        if self.ref_size % 16:
            raise ValueError(f"ref_size {self.ref_size} must be a multiple of 16")
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} must be below world_size {self.world_size}")
        self.frames = sorted(set(self.frames), reverse=True)
        return self


class OptimConfig(_Strict):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)


class LossConfig(_Strict):
    timestep_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    flow_shift: float = Field(1.0, gt=0, description="shifts sampled noise levels up (Wan uses 3-5 at inference)")
    mask_weight: float = Field(0.1, ge=0, description="weight of the mask (attention routing) loss; 0: off")
    mask_self_weight: float = Field(1.0, ge=0, description="its self-attention term: ||S_i - M_i||^2")
    mask_cross_weight: float = Field(1.0, ge=0, description="its cross-attention term: ||A_i - M_i||^2")
    mask_layers: list[int] | None = Field(None, description="blocks whose attention is supervised; null: all")


class TrainConfig(_Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    steps: int = Field(100, ge=1)
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    shards: str | None = Field(None, description="folder of shard-*.tar or a brace pattern")
    out: str | None = Field(None, description="checkpoints and metrics.jsonl go here")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (null: torch's default)")


def build_train_config(data: dict[str, Any]) -> TrainConfig:
    try:
        cfg = TrainConfig(**(data or {}))
    except ValidationError as exc:
        raise ConfigError(_format_validation("train", exc)) from None
    cfg.model.check_weights()
    return cfg


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    data = read_yaml_mapping(path, "train config", "configs/train_tiny.yaml")
    return build_train_config(apply_overrides(data, list(overrides or [])))
