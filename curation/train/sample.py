"""Use a trained checkpoint: `curation sample` generates a video from a caption and each subject's reference images;
`curation export-model` writes the trained transformer in diffusers format.

Sampling follows Wan2.1's diffusers settings: UniPC multistep on flow sigmas (`flow_prediction`, `flow_shift`
3.0 at 480p), classifier-free guidance against a negative prompt, the VAE in fp32. The references go in as in
training: each subject's crop (and face crop) letterboxed to `data.ref_size`, VAE-encoded, bound to the caption
words of its phrase, which must appear verbatim in the caption. The unconditional pass keeps the references and
swaps the caption for the negative prompt, so guidance strengthens the text, not the identity.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curation.errors import ConfigError
from curation.train.config import TrainConfig
from curation.train.model import Encoders, RelationalWan, build
from curation.train.text import span_tokens

log = logging.getLogger(__name__)
EXPORT_EXTRAS = "relational.safetensors"
EXPORT_CONFIG = "relational.json"


@dataclass
class Reference:
    """One subject for sampling: its phrase in the caption and its images (subject crop, then optional face)."""

    phrase: str
    images: list[str]


def parse_reference(spec: str) -> Reference:
    """`PHRASE=IMAGE[,FACE_IMAGE]` from the command line."""
    phrase, sep, paths = spec.partition("=")
    images = [p for p in paths.split(",") if p]
    if not sep or not phrase.strip() or not images:
        raise ConfigError(f"--ref {spec!r}: write PHRASE=IMAGE or PHRASE=IMAGE,FACE_IMAGE")
    return Reference(phrase.strip(), images)


def resolve_checkpoint(path: str | Path) -> Path:
    """A training output folder (its newest checkpoint), a `step-*` checkpoint or an exported folder."""
    p = Path(path)
    if (p / "model.pt").is_file() or (p / EXPORT_CONFIG).is_file():
        return p
    cks = sorted(c for c in (p / "checkpoints").glob("step-*") if (c / "state.json").is_file())
    if cks:
        return cks[-1]
    raise ConfigError(f"{p}: no checkpoint (model.pt), no exported model ({EXPORT_CONFIG}), no checkpoints/step-*")


def load_trained(path: str | Path, device: str = "cpu") -> tuple[RelationalWan, Encoders, TrainConfig, Path]:
    """The trained relational Wan with its frozen encoders, from a checkpoint or an export."""
    p = resolve_checkpoint(path)
    if (p / EXPORT_CONFIG).is_file():
        cfg = TrainConfig(**json.loads((p / EXPORT_CONFIG).read_text())["train_config"])
        model, enc = build(cfg.model, cfg.seed)
        from diffusers import WanTransformer3DModel
        from safetensors.torch import load_file

        dit = WanTransformer3DModel.from_pretrained(str(p / "transformer"))
        model.transformer.load_state_dict({k: v.float() for k, v in dit.state_dict().items()})
        extras = {k: v.float() for k, v in load_file(str(p / EXPORT_EXTRAS)).items()}
        missing, unexpected = model.load_state_dict(extras, strict=False)
        if unexpected or any(not k.startswith("transformer.") for k in missing):
            raise ConfigError(f"{p / EXPORT_EXTRAS} does not fit the model: missing {missing}, unexpected {unexpected}")
    else:
        state = json.loads((p / "state.json").read_text())
        cfg = TrainConfig(**_current(state["config"]))
        model, enc = build(cfg.model, cfg.seed)
        model.load_state_dict(torch.load(p / "model.pt", map_location="cpu", weights_only=True))
    model.to(device).eval().requires_grad_(False)
    enc.vae.to(device).float().eval()
    enc.text_encoder.to(device).float().eval()
    return model, enc, cfg, p


def _current(config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's saved config without the keys later versions removed (so older checkpoints still load)."""
    config.get("loss", {}).pop("mask_queries", None)  # the mask loss reads every video token now
    # trained before the soft mode existed: hard cross-attention (and face crops on the subject crop's RoPE
    # positions, which this version shifts: such a checkpoint generates, but not exactly as it was trained)
    config.setdefault("model", {}).setdefault("cross_attention", "hard")
    return config


def export_model(path: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write `out/transformer/` (diffusers `WanTransformer3DModel.save_pretrained`: without references the model is
    exactly Wan, so this folder can replace a Wan2.1 diffusers folder's transformer/), `relational.safetensors`
    (the group and slot embeddings) and `relational.json` (the training config, for `curation sample`). No
    optimizer state: a fraction of the checkpoint's size. Written to a temporary folder, then renamed."""
    from safetensors.torch import save_file

    model, _, cfg, src = load_trained(path)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if dt is None:
        raise ConfigError(f"--dtype {dtype}: choose float32, bfloat16 or float16")
    dest = Path(out)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    keep = set(getattr(model.transformer, "_keep_in_fp32_modules", None) or ())
    for name, param in model.transformer.named_parameters():  # as diffusers loads it: some modules stay fp32
        if not keep.intersection(name.split(".")):
            param.data = param.data.to(dt)
    model.transformer.save_pretrained(str(tmp / "transformer"), safe_serialization=True)
    extras = {k: v.to(dt).contiguous() for k, v in model.state_dict().items() if not k.startswith("transformer.")}
    save_file(extras, str(tmp / EXPORT_EXTRAS))
    meta = {"train_config": cfg.model_dump(mode="json"), "source": str(src), "dtype": dtype}
    (tmp / EXPORT_CONFIG).write_text(json.dumps(meta, indent=1))
    old = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.old")
    if dest.exists():  # swap: a reader sees the old export or the new one, never a half-written folder
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def _scheduler(cfg: TrainConfig, shift: float) -> Any:
    """Wan2.1's diffusers scheduler: from the weights folder when it has one, else the same settings written out."""
    from diffusers import UniPCMultistepScheduler

    if cfg.model.kind == "pretrained" and (Path(cfg.model.path or "") / "scheduler").is_dir():
        return UniPCMultistepScheduler.from_pretrained(str(cfg.model.path), subfolder="scheduler", flow_shift=shift)
    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        solver_order=2,
    )


@torch.no_grad()
def generate(
    model: RelationalWan,
    enc: Encoders,
    cfg: TrainConfig,
    caption: str,
    refs: list[Reference],
    frames: int,
    height: int,
    width: int,
    steps: int = 50,
    guidance: float = 5.0,
    shift: float = 3.0,
    negative: str = "",
    seed: int = 0,
    device: str = "cpu",
) -> np.ndarray:
    """[frames, height, width, 3] uint8 RGB generated from the caption and references."""
    from curation.train.data import decode_image, letterbox  # the loader's crop preparation, as in training

    if (frames - 1) % 4:
        raise ConfigError(f"--frames {frames}: must be 4n+1 (Wan's VAE keeps frame 0, then groups of 4)")
    if height % 16 or width % 16:
        raise ConfigError(f"--size {height}x{width}: sides must be multiples of 16")
    if len(refs) > max(1, cfg.model.max_subjects):
        raise ConfigError(f"{len(refs)} references: the model was trained with at most {cfg.model.max_subjects}")
    slots = 2 if cfg.model.face_refs else 1
    length = cfg.data.text_len
    vc = enc.vae.config
    z_mean = torch.tensor(vc.latents_mean, device=device).view(1, -1, 1, 1, 1)
    z_std = torch.tensor(vc.latents_std, device=device).view(1, -1, 1, 1, 1)

    def embed(text: str) -> tuple[torch.Tensor, torch.Tensor, Any]:
        e = enc.tokenizer.encode(text, length)
        ids = torch.tensor([e.ids], device=device)
        valid = torch.tensor([e.valid], device=device)
        states = enc.text_encoder(input_ids=ids, attention_mask=valid.long()).last_hidden_state.float()
        return states * valid[..., None], valid, e

    text, text_valid, encoded = embed(caption)
    neg, neg_valid, _ = embed(negative)
    k = len(refs)
    ref_latents = ref_valid = subject_text = None
    if k:
        r = cfg.data.ref_size
        pix = torch.ones(k, slots, 3, r, r, device=device)
        ref_valid = torch.zeros(1, k, slots, dtype=torch.bool, device=device)
        subject_text = torch.zeros(1, k, length, dtype=torch.bool, device=device)
        low = caption.lower()
        for j, ref in enumerate(refs):
            at = low.find(ref.phrase.lower())
            if at < 0:
                raise ConfigError(f"reference phrase {ref.phrase!r} is not in the caption: it binds to those words")
            spans = caption_spans(caption, (at, at + len(ref.phrase)))
            subject_text[0, j] = span_tokens(encoded, spans).to(device)
            if not subject_text[0, j].any():
                raise ConfigError(f"reference phrase {ref.phrase!r} lies past the {length} caption tokens read")
            if len(ref.images) > slots:
                raise ConfigError(f"{ref.phrase!r}: {len(ref.images)} images, the model takes {slots} per subject")
            for s, img_path in enumerate(ref.images):
                data = Path(img_path).read_bytes()
                img = letterbox(decode_image(data), r)
                pix[j, s] = torch.from_numpy(img).permute(2, 0, 1).float().div(127.5).sub(1.0)
                ref_valid[0, j, s] = True
        z = enc.vae.encode(pix.reshape(k * slots, 3, 1, r, r)).latent_dist.mode().float()
        z = (z - z_mean) / z_std
        z = z * ref_valid.reshape(k * slots, 1, 1, 1, 1)  # a missing face crop stays zero, as in training
        ref_latents = z.reshape(1, k, slots, *z.shape[1:])

    sched = _scheduler(cfg, shift)
    sched.set_timesteps(steps, device=device)
    g = torch.Generator().manual_seed(seed)
    zc = int(vc.z_dim)
    lat_f = (frames - 1) // int(getattr(vc, "scale_factor_temporal", None) or 4) + 1
    sf = int(getattr(vc, "scale_factor_spatial", None) or 8)
    x = torch.randn(1, zc, lat_f, height // sf, width // sf, generator=g).to(device)
    for t in sched.timesteps:
        ts = t.expand(1).float().to(device)
        cond, _ = model(x, ts, text, ref_latents, ref_valid, subject_text, text_valid)
        if guidance > 1.0:  # the negative prompt has none of the subjects' words
            unbound = None if subject_text is None else torch.zeros_like(subject_text)
            uncond, _ = model(x, ts, neg, ref_latents, ref_valid, unbound, neg_valid)
            cond = uncond + guidance * (cond - uncond)
        x = sched.step(cond, t, x, return_dict=False)[0]
    video = enc.vae.decode(x * z_std + z_mean, return_dict=False)[0]  # [1, 3, F, H, W] in [-1, 1]
    video = ((video[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(1, 2, 3, 0).cpu().numpy()[:frames]


def caption_spans(caption: str, phrase: tuple[int, int]) -> list[tuple[int, int]]:
    """The character spans a reference binds to: the phrase, plus the attributes the caption parser gives the
    subject it names (as the shards' subject spans were made in training); just the phrase when the parser finds
    no subject there."""
    from curation.stages.caption.parser import parse_caption
    from curation.train.text import subject_spans

    a, b = phrase
    for subject in parse_caption(caption).model_dump()["subjects"]:
        sp = subject.get("span")
        if sp and sp["start"] < b and a < sp["end"]:
            return [phrase, *subject_spans(subject)]
    return [phrase]


def write_mp4(frames: np.ndarray, path: str | Path, fps: int = 16) -> Path:
    """H.264 yuv420p mp4 (written to a temporary name, then renamed)."""
    import av

    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.stem}.{uuid.uuid4().hex[:8]}.tmp.mp4")
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for pkt in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(pkt)
        for pkt in stream.encode():
            out.mux(pkt)
    os.replace(tmp, dest)
    return dest
