"""`curation train`: flow-matching training of the relational Wan on the shards, with the mask loss, checkpoints
and exact resume.

Loss = flow matching on the video latents (x_t = (1 - s) x0 + s e, target e - x0, as Wan2.1 is trained) plus
`loss.mask_weight` x the mask loss: for each subject, the self-attention mass that video tokens give to its
reference tokens, read as a distribution over the video tokens, is pulled towards the subject's mask track
(KL(mask || attention)); subjects without a mask on the sampled frames do not count.

Determinism: the noise and noise levels of step s come from a generator seeded with (seed, s), and the loader
resumes at its saved (epoch, batches), so a run stopped at a checkpoint and resumed ends with the same weights as
one that never stopped (tested).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from curation.errors import ConfigError
from curation.train.config import TrainConfig
from curation.train.data import LoaderState, ShardStream, list_shards, prefetched
from curation.train.model import build

log = logging.getLogger(__name__)
CKPT_PREFIX = "step-"


def token_masks(
    masks: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int, int], t_factor: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel mask tracks [B, K, F, H, W] (+ frame validity [B, K, F]) -> per video token [B, K, N] in [0, 1] (+ valid).

    Latent frame 0 is pixel frame 0 and latent frame j >= 1 covers pixel frames 1 + t_factor (j - 1) ... t_factor j
    (Wan's causal VAE); a token's target is the mask's mean over the valid frames and pixels it covers.
    """
    b, k, f, h, w = masks.shape
    lf, gh, gw = grid
    m = masks.float() * valid[..., None, None].float()
    out = torch.zeros(b, k, lf, gh, gw)
    ok = torch.zeros(b, k, lf, dtype=torch.bool)
    for j in range(lf):
        lo, hi = (0, 1) if j == 0 else (1 + t_factor * (j - 1), min(f, 1 + t_factor * j))
        n = valid[:, :, lo:hi].sum(dim=2)  # [B, K]
        if hi <= lo:
            continue
        mean = m[:, :, lo:hi].sum(dim=2) / n.clamp_min(1)[..., None, None]
        out[:, :, j] = F.adaptive_avg_pool2d(mean.reshape(b * k, 1, h, w), (gh, gw)).reshape(b, k, gh, gw)
        ok[:, :, j] = n > 0
    return out.flatten(2), ok[..., None, None].expand(b, k, lf, gh, gw).flatten(2)


def mask_kl(mass: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
    """KL(mask || attention) per subject over the valid video tokens, averaged over subjects that have a mask there.

    mass, target, valid: [B, K, Q]. None when no subject has any mask on the read tokens.
    """
    eps = 1e-8
    v = valid.float()
    t = target * v
    tsum = t.sum(-1)
    ok = tsum > 0
    if not bool(ok.any()):
        return None
    m = mass.float() * v
    p = m / m.sum(-1, keepdim=True).clamp_min(eps)
    q = t / tsum[..., None].clamp_min(eps)
    kl = (q * (q.clamp_min(eps).log() - p.clamp_min(eps).log())).sum(-1)
    return kl[ok].mean()


class Trainer:
    def __init__(self, cfg: TrainConfig, shards: str | None = None, out: str | None = None) -> None:
        self.cfg = cfg
        shards = shards or cfg.shards
        out = out or cfg.out
        if not shards:
            raise ConfigError("no shards: pass --shards RUN/shards (or set `shards:` in the train config)")
        if not out:
            raise ConfigError("no output folder: pass --out DIR (or set `out:` in the train config)")
        self.out = Path(out)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda was asked for but torch sees no CUDA device; set device: cpu")
        self.model, self.enc = build(cfg.model, cfg.seed)
        self.model.gradient_checkpointing = cfg.model.gradient_checkpointing
        self.model.to(self.device).train()
        self.enc.vae.to(self.device).eval().requires_grad_(False)
        self.enc.text_encoder.to(self.device).eval().requires_grad_(False)
        self.autocast = cfg.model.mixed_precision == "bf16"
        if self.autocast:  # the frozen parts only run forward: keep them in bf16 outright
            self.enc.vae.to(torch.bfloat16)
            self.enc.text_encoder.to(torch.bfloat16)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / o.warmup_steps) if o.warmup_steps else 1.0
        )
        self.stream = ShardStream(
            list_shards(shards), cfg.data, self.enc.tokenizer, cfg.seed, cfg.model.max_subjects, cfg.model.face_refs
        )
        n_layers = len(self.model.transformer.blocks)
        layers = cfg.loss.mask_layers if cfg.loss.mask_layers is not None else list(range(n_layers))
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise ConfigError(f"loss.mask_layers {bad} outside the model's {n_layers} blocks")
        self.mask_layers = set(layers) if cfg.loss.mask_weight > 0 else set()
        self.step = 0
        self.loader_state = LoaderState()
        vc = self.enc.vae.config
        self._z_mean = torch.tensor(vc.latents_mean).view(1, -1, 1, 1, 1).to(self.device)
        self._z_std = torch.tensor(vc.latents_std).view(1, -1, 1, 1, 1).to(self.device)
        self._t_factor = int(getattr(vc, "scale_factor_temporal", None) or 4)

    # -- encoders (frozen) ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        dt = next(self.enc.vae.parameters()).dtype
        z = self.enc.vae.encode(x.to(self.device, dt)).latent_dist.mode().float()
        return (z - self._z_mean) / self._z_std

    @torch.no_grad()
    def encode(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        ids = batch["text_ids"].to(self.device)
        valid = batch["text_valid"].to(self.device)
        text = self.enc.text_encoder(input_ids=ids, attention_mask=valid.long()).last_hidden_state.float()
        out = {"latents": self._latents(batch["video"]), "text": text * valid[..., None], "text_valid": valid}
        refs = batch["refs"]
        b, k, s = refs.shape[:3]
        if k:  # only real crops go through the VAE; padding slots stay zero (nobody attends to them)
            valid = batch["ref_valid"].reshape(-1)
            z = self._latents(refs.reshape(b * k * s, 3, 1, *refs.shape[-2:])[valid])
            full = torch.zeros(b * k * s, *z.shape[1:], device=z.device)
            full[valid.to(z.device)] = z
            out["refs"] = full.reshape(b, k, s, *z.shape[1:])
        return out

    # -- one step ---------------------------------------------------------------------------------------------
    def losses(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        e = self.encode(batch)
        x0 = e["latents"]
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        lc = self.cfg.loss
        b = x0.shape[0]
        if lc.timestep_sampling == "logit_normal":
            u = torch.sigmoid(torch.randn(b, generator=g))
        else:
            u = torch.rand(b, generator=g)
        sigma = (lc.flow_shift * u / (1 + (lc.flow_shift - 1) * u)).to(self.device)
        sv = sigma.view(b, 1, 1, 1, 1)
        xt = (1 - sv) * x0 + sv * noise
        k = batch["refs"].shape[1]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            pred, captured = self.model(
                xt,
                sigma * 1000,
                e["text"],
                e.get("refs"),
                batch["ref_valid"].to(self.device) if k else None,
                batch["subject_text"].to(self.device) if k else None,
                e["text_valid"],
                capture_layers=self.mask_layers,
                mask_queries=lc.mask_queries,
            )
        flow = F.mse_loss(pred.float(), (noise - x0).float())
        out = {"loss": flow, "flow": flow}
        if captured:
            pt, ph, pw = self.model.patch
            grid = (x0.shape[2] // pt, x0.shape[3] // ph, x0.shape[4] // pw)
            target, valid = token_masks(batch["masks"], batch["mask_valid"], grid, self._t_factor)
            q = self.model.ctx.queries
            assert q is not None
            target, valid = target[:, :, q].to(self.device), valid[:, :, q].to(self.device)
            kls = [kl for c in captured if (kl := mask_kl(c, target, valid)) is not None]
            if kls:
                mk = torch.stack(kls).mean()
                out["mask"] = mk
                out["loss"] = flow + lc.mask_weight * mk
        return out

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        self.opt.zero_grad(set_to_none=True)
        ls = self.losses(batch, self.step)
        ls["loss"].backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        return {k: float(v.detach()) for k, v in ls.items()}

    # -- checkpoints ------------------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        d = self.out / "checkpoints"
        return sorted(p for p in d.glob(f"{CKPT_PREFIX}*") if p.is_dir() and (p / "state.json").is_file())

    def save(self) -> Path:
        """Write a checkpoint atomically (temp folder + rename) and keep the newest `keep_checkpoints`."""
        d = self.out / "checkpoints"
        d.mkdir(parents=True, exist_ok=True)
        final = d / f"{CKPT_PREFIX}{self.step:08d}"
        tmp = d / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
        torch.save(self.model.state_dict(), tmp / "model.pt")
        torch.save({"opt": self.opt.state_dict(), "sched": self.sched.state_dict()}, tmp / "optim.pt")
        state = {"step": self.step, "loader": self.loader_state.to_dict(), "config": self.cfg.model_dump(mode="json")}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.checkpoints()[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def resume(self) -> bool:
        """Load the newest checkpoint under `out`, if any; True when one was loaded."""
        cks = self.checkpoints()
        if not cks:
            return False
        ck = cks[-1]
        state = json.loads((ck / "state.json").read_text())
        self.model.load_state_dict(torch.load(ck / "model.pt", map_location=self.device))
        opt = torch.load(ck / "optim.pt", map_location=self.device)
        self.opt.load_state_dict(opt["opt"])
        self.sched.load_state_dict(opt["sched"])
        self.step = int(state["step"])
        self.loader_state = LoaderState(**state["loader"])
        log.info("resumed from %s (step %d, epoch %d)", ck, self.step, self.loader_state.epoch)
        return True

    def _trim_metrics(self) -> None:
        """Drop metric lines past the resumed step: those steps are about to be trained again."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= self.step]
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, path)

    # -- the loop ---------------------------------------------------------------------------------------------
    def fit(self, steps: int | None = None, on_log: Callable[[dict[str, Any]], None] | None = None) -> list[dict]:
        """Train until `steps` (default cfg.steps) total steps, resuming from the newest checkpoint."""
        total = steps or self.cfg.steps
        self.out.mkdir(parents=True, exist_ok=True)
        self.resume()
        self._trim_metrics()
        history: list[dict[str, Any]] = []
        if self.step >= total:
            return history
        t0 = time.perf_counter()
        batches = prefetched(self.stream.batches(self.loader_state), self.cfg.data.prefetch)
        # closing: the prefetch thread stops however the loop ends (done, error, interrupt)
        with (self.out / "metrics.jsonl").open("a") as metrics, closing(batches):
            for batch, st in batches:
                ls = self.train_step(batch)
                self.loader_state = st
                rec = {
                    "step": self.step,
                    **ls,
                    "lr": self.sched.get_last_lr()[0],
                    "epoch": st.epoch,
                    "samples": len(batch["keys"]),
                    "subjects": int(batch["ref_valid"].any(-1).sum()),
                    "seconds": round(time.perf_counter() - t0, 3),
                }
                if not all(math.isfinite(v) for k, v in ls.items()):
                    raise FloatingPointError(f"non-finite loss at step {self.step}: {ls}; lower optim.lr")
                history.append(rec)
                metrics.write(json.dumps(rec) + "\n")
                if on_log and (self.step % self.cfg.log_every == 0 or self.step == total):
                    on_log(rec)
                if self.step % self.cfg.checkpoint_every == 0 or self.step >= total:
                    metrics.flush()
                    self.save()
                if self.step >= total:
                    break
        return history
