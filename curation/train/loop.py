"""`curation train`: flow-matching training of the relational Wan on the shards, with the mask loss, checkpoints
and exact resume.

Loss = flow matching on the video latents (x_t = (1 - s) x0 + s e, target e - x0, as Wan2.1 is trained) plus
`loss.mask_weight` x the DiasR mask loss, sum over subjects i of ||S_i - M_i||^2 + ||A_i - M_i||^2 on the blocks in
`loss.mask_layers`: S_i is the share of each video token's self-attention on subject i's reference tokens, A_i the
share of its cross-attention on subject i's caption words, per head, over every video token, and M_i the subject's
mask track pooled to the token grid; tokens on frames without a mask for i do not count.

Text: each caption's umT5 embedding is computed once and kept in a cache beside the run (`TextCache`).
Distributed: under torchrun, DDP (gloo on CPU, nccl on CUDA) keeps the weights equal on every rank.

Determinism: the noise and noise levels of step s come from a generator seeded with (seed, s), and the loader
resumes at its saved (epoch, batches), so a run stopped at a checkpoint and resumed ends with the same weights as
one that never stopped (tested).
"""

from __future__ import annotations

import hashlib
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


def mask_l2(maps: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
    """DiasR's routing term for one attention map: sum over subjects i of ||R_i - M_i||^2, each the mean squared
    error over the video tokens where subject i has a mask frame and over heads (every head is supervised, none is
    averaged away), then the mean over samples.

    maps: [B, H, Nv, K] shares in [0, 1] (S: self-attention on subject i's references, A: cross-attention on its
    words); target, valid: [B, K, Nv]. None when no subject has a mask frame on these tokens. Unlike a divergence of
    normalised maps, L2 on the raw shares cannot be satisfied by a subject that draws almost no attention.
    """
    r = maps.float().permute(0, 3, 1, 2)  # [B, K, H, Nv]
    v = valid.float()[:, :, None, :]
    n = v.sum(-1)  # [B, K, 1]
    ok = n[..., 0] > 0  # [B, K]
    if not bool(ok.any()):
        return None
    err = ((r - target.float()[:, :, None, :]) ** 2 * v).sum(-1) / n.clamp_min(1)  # [B, K, H]
    per_sample = (err.mean(-1) * ok).sum(1)  # [B]: summed over subjects
    return per_sample[ok.any(1)].mean()


class TextCache:
    """Caption embeddings on disk, so the frozen umT5 runs once per caption: later epochs, resumed runs and other
    ranks read them. The key covers the caption, the token length and what produced the embedding (model weights'
    identity and dtype), so a changed encoder never reads stale entries."""

    def __init__(self, root: Path, identity: dict[str, Any]) -> None:
        self.root = root
        self.prefix = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def path(self, caption: str) -> Path:
        key = hashlib.sha256(f"{self.prefix}\n{caption}".encode()).hexdigest()[:40]
        return self.root / key[:2] / f"{key}.pt"

    def get(self, caption: str) -> torch.Tensor | None:
        p = self.path(caption)
        if not p.is_file():
            return None
        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # a torn or foreign file: recompute (and rewrite) rather than fail the run
            log.warning("text cache entry %s unreadable (%s); recomputing", p, exc)
            return None

    def put(self, caption: str, emb: torch.Tensor) -> None:
        p = self.path(caption)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
        torch.save(emb.detach().cpu().clone(), tmp)
        os.replace(tmp, p)


def _weights_identity(path: str | None) -> list[Any]:
    """What identifies a pretrained text encoder for the cache: its folder, and each file's name, size and mtime
    under text_encoder/ and tokenizer/ (replacing the weights in place changes the key)."""
    root = Path(path or "")
    files = sorted(f for part in ("text_encoder", "tokenizer") for f in (root / part).rglob("*") if f.is_file())
    return [str(root.resolve()), *[(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]]


def _init_distributed(device: str) -> tuple[int, int]:
    """(rank, world size): torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) starts the process group,
    nccl on CUDA, gloo on CPU; without it, one process."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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
        self.rank, self.world = _init_distributed(cfg.device)
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda was asked for but torch sees no CUDA device; set device: cpu")
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        data_cfg = cfg.data
        if self.world > 1:  # torchrun's rank and world size split the shards
            data_cfg = cfg.data.model_copy(update={"rank": self.rank, "world_size": self.world})
        self.model, self.enc = build(cfg.model, cfg.seed)
        self.model.gradient_checkpointing = cfg.model.gradient_checkpointing
        self.model.to(self.device).train()
        # the VAE stays in fp32 (as diffusers loads Wan's); umT5 in bf16 under mixed precision unless told otherwise
        self.enc.vae.to(self.device).float().eval().requires_grad_(False)
        self.autocast = cfg.model.mixed_precision == "bf16"
        te_dtype = cfg.model.text_encoder_dtype or ("bfloat16" if self.autocast else "float32")
        self.enc.text_encoder.to(self.device, getattr(torch, te_dtype)).eval().requires_grad_(False)
        self.forward: Any = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # a batch without subjects leaves the group embeddings unused: DDP must not wait for their gradients
            self.forward = DistributedDataParallel(self.model, device_ids=ids, find_unused_parameters=True)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / o.warmup_steps) if o.warmup_steps else 1.0
        )
        self.stream = ShardStream(
            list_shards(shards), data_cfg, self.enc.tokenizer, cfg.seed, cfg.model.max_subjects, cfg.model.face_refs
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
        self.text_cache: TextCache | None = None
        if cfg.data.text_cache:
            root = Path(cfg.data.text_cache_dir) if cfg.data.text_cache_dir else self.out / "text-cache"
            ident = {
                "model": _weights_identity(cfg.model.path)
                if cfg.model.kind == "pretrained"
                else cfg.model.tiny.model_dump(),
                "seed": cfg.seed if cfg.model.kind == "tiny" else None,
                "dtype": te_dtype,
                "text_len": cfg.data.text_len,
            }
            self.text_cache = TextCache(root, ident)
        self.text_encoded = 0  # distinct captions run through umT5 by this process (the cache's misses)

    # -- encoders (frozen) ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        dt = next(self.enc.vae.parameters()).dtype
        z = self.enc.vae.encode(x.to(self.device, dt)).latent_dist.mode().float()
        return (z - self._z_mean) / self._z_std

    @torch.no_grad()
    def text_states(self, batch: dict[str, Any]) -> torch.Tensor:
        """[B, L, D] caption embeddings (zero on padding): from the text cache, umT5 only for captions not in it."""
        ids, valid = batch["text_ids"], batch["text_valid"]
        te = self.enc.text_encoder
        b, length = ids.shape
        out = torch.zeros(b, length, te.config.d_model, device=self.device)
        captions = batch.get("captions") or [None] * b
        missing = []
        for i, c in enumerate(captions):
            hit = self.text_cache.get(c) if self.text_cache is not None and c is not None else None
            if hit is not None and hit.shape[0] == int(valid[i].sum()):
                out[i, valid[i].to(self.device)] = hit.to(self.device, torch.float32)
            else:
                missing.append(i)
        if missing:  # each distinct caption once (clips of one video often share theirs)
            first: dict[Any, int] = {}
            for i in missing:
                first.setdefault(captions[i] if captions[i] is not None else ("row", i), i)
            rows = list(first.values())
            idx = torch.tensor(rows)
            mid, mvalid = ids[idx].to(self.device), valid[idx].to(self.device)
            emb = te(input_ids=mid, attention_mask=mvalid.long()).last_hidden_state
            self.text_encoded += len(rows)
            done = {}
            for j, i in enumerate(rows):
                done[i] = emb[j][mvalid[j]]
                if self.text_cache is not None and captions[i] is not None:
                    self.text_cache.put(captions[i], done[i])
            for i in missing:
                e = done[first[captions[i] if captions[i] is not None else ("row", i)]]
                out[i, valid[i].to(self.device)] = e.float()
        return out

    @torch.no_grad()
    def encode(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        valid = batch["text_valid"].to(self.device)
        out = {"latents": self._latents(batch["video"]), "text": self.text_states(batch), "text_valid": valid}
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
        # each rank its own noise and noise levels (rank 0 draws what a single process draws)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step + self.rank * 1_000_000_007)
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
            pred, captured = self.forward(
                xt,
                sigma * 1000,
                e["text"],
                e.get("refs"),
                batch["ref_valid"].to(self.device) if k else None,
                batch["subject_text"].to(self.device) if k else None,
                e["text_valid"],
                capture_layers=self.mask_layers,
            )
        flow = F.mse_loss(pred.float(), (noise - x0).float())
        out = {"loss": flow, "flow": flow}
        if captured:
            pt, ph, pw = self.model.patch
            grid = (x0.shape[2] // pt, x0.shape[3] // ph, x0.shape[4] // pw)
            target, valid = token_masks(batch["masks"], batch["mask_valid"], grid, self._t_factor)
            target, valid = target.to(self.device), valid.to(self.device)
            # a subject whose phrase is not in the caption has no words to route to: no cross-attention term
            worded = batch["subject_text"].any(-1).to(self.device)[..., None]  # [B, K, 1]
            terms: dict[str, list[torch.Tensor]] = {"self": [], "cross": []}
            for kind, maps in captured:
                if (t := mask_l2(maps, target, valid & worded if kind == "cross" else valid)) is not None:
                    terms[kind].append(t)
            if terms["self"] or terms["cross"]:
                mk = torch.zeros((), device=self.device)
                for kind, w in (("self", lc.mask_self_weight), ("cross", lc.mask_cross_weight)):
                    if terms[kind]:
                        out[f"mask_{kind}"] = torch.stack(terms[kind]).mean()
                        mk = mk + w * out[f"mask_{kind}"]
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
        out = {k: float(v.detach()) for k, v in ls.items()}
        if self.world > 1:  # what is logged is the mean over the ranks that have each term
            import torch.distributed as dist

            every: list[dict[str, float]] = [{} for _ in range(self.world)]
            dist.all_gather_object(every, out)
            keys = sorted(set().union(*every))
            out = {k: sum(d[k] for d in every if k in d) / sum(k in d for d in every) for k in keys}
        return out

    # -- checkpoints ------------------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        d = self.out / "checkpoints"
        return sorted(p for p in d.glob(f"{CKPT_PREFIX}*") if p.is_dir() and (p / "state.json").is_file())

    def save(self) -> Path:
        """Write a checkpoint atomically (temp folder + rename) and keep the newest `keep_checkpoints`.

        Distributed: the weights are equal on every rank, so rank 0 writes them, with every rank's loader state."""
        loaders = [self.loader_state.to_dict()]
        if self.world > 1:
            import torch.distributed as dist

            loaders = [{} for _ in range(self.world)]
            dist.all_gather_object(loaders, self.loader_state.to_dict())
        d = self.out / "checkpoints"
        final = d / f"{CKPT_PREFIX}{self.step:08d}"
        if self.rank != 0:
            _barrier()
            return final
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir()
        torch.save(self.model.state_dict(), tmp / "model.pt")
        torch.save({"opt": self.opt.state_dict(), "sched": self.sched.state_dict()}, tmp / "optim.pt")
        state = {
            "step": self.step,
            "loader": loaders[0],
            "loaders": loaders,
            "world_size": self.world,
            "config": self.cfg.model_dump(mode="json"),
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self.checkpoints()[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        _barrier()
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
        loaders = state.get("loaders") or [state["loader"]]
        if len(loaders) == self.world:
            self.loader_state = LoaderState(**loaders[self.rank])
        else:  # another world size splits the data differently: start the checkpoint's epoch afresh
            self.loader_state = LoaderState(epoch=int(loaders[0]["epoch"]) + 1, batches=0)
            log.warning(
                "checkpoint written by %d rank(s), resumed by %d: data restarts at epoch %d",
                len(loaders),
                self.world,
                self.loader_state.epoch,
            )
        log.info("resumed from %s (step %d, epoch %d)", ck, self.step, self.loader_state.epoch)
        return True

    def _trim_metrics(self) -> None:
        """Drop metric lines past the resumed step: those steps are about to be trained again."""
        path = self.out / "metrics.jsonl"
        if self.rank != 0 or not path.is_file():
            return
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= self.step]
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, path)

    def close(self) -> None:
        """Leave the process group (torchrun runs); nothing to do in a single process."""
        import torch.distributed as dist

        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    # -- the loop ---------------------------------------------------------------------------------------------
    def fit(self, steps: int | None = None, on_log: Callable[[dict[str, Any]], None] | None = None) -> list[dict]:
        """Train until `steps` (default cfg.steps) total steps, resuming from the newest checkpoint."""
        total = steps or self.cfg.steps
        self.out.mkdir(parents=True, exist_ok=True)
        _barrier()  # rank 0 may be creating it; every rank reads the same checkpoint
        self.resume()
        self._trim_metrics()
        history: list[dict[str, Any]] = []
        if self.step >= total:
            return history
        t0 = time.perf_counter()
        batches = prefetched(self.stream.batches(self.loader_state), self.cfg.data.prefetch)
        # closing: the prefetch thread stops however the loop ends (done, error, interrupt)
        metrics_path = self.out / "metrics.jsonl" if self.rank == 0 else Path(os.devnull)  # rank 0 logs the means
        with metrics_path.open("a") as metrics, closing(batches):
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
                    "text_encoded": self.text_encoded,
                    "seconds": round(time.perf_counter() - t0, 3),
                }
                if not all(math.isfinite(v) for k, v in ls.items()):
                    raise FloatingPointError(f"non-finite loss at step {self.step}: {ls}; lower optim.lr")
                history.append(rec)
                metrics.write(json.dumps(rec) + "\n")
                if on_log and self.rank == 0 and (self.step % self.cfg.log_every == 0 or self.step == total):
                    on_log(rec)
                if self.step % self.cfg.checkpoint_every == 0 or self.step >= total:
                    metrics.flush()
                    self.save()
                if self.step >= total:
                    break
        return history
