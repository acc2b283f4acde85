"""The GPU benchmark: one prepared script for a machine with a GPU, run once, figures into docs/benchmarks.md.

    python bench/gpu.py [--part train] [--weights models/Wan2.1-T2V-1.3B-Diffusers] [--steps 20] [--out DIR]
    python bench/gpu.py --dims tiny --device cpu --steps 2      # the same code path in seconds (the tests run it)

Part `train` (issue 19): the relational Wan2.1-T2V-1.3B training step at 480x832, 33 frames, 4 subjects with a
subject and a face crop each (256 px), a 512-token caption, bf16 autocast, gradient checkpointing, the DiasR mask
loss on blocks 8/12/16/20, AdamW. Weights from `--weights` (a diffusers-format folder) when given, else random
weights in the real shapes (same compute). The frozen VAE and umT5 are not timed: the trainer caches caption
embeddings, and the latents here are random tensors of the shapes the VAE would give. Reports per-step time
(median after `--warmup` steps), peak GPU memory (torch.cuda.max_memory_allocated) and the loss terms; writes
`gpu-train.json` into `--out`.

The reference pipeline stages (issue 17) are still to be added as a second part.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from curation.train.loop import mask_l2, token_masks  # noqa: E402
from curation.train.model import RelationalWan  # noqa: E402

WAN13B = {  # Wan2.1-T2V-1.3B transformer config (diffusers)
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
TINY = {**WAN13B, "num_attention_heads": 2, "attention_head_dim": 24, "text_dim": 32, "freq_dim": 32,
        "ffn_dim": 96, "num_layers": 2, "in_channels": 4, "out_channels": 4, "rope_max_seq_len": 256}  # fmt: skip


def train_part(args: argparse.Namespace) -> dict:
    from diffusers import WanTransformer3DModel

    dev = torch.device(args.device)
    torch.manual_seed(0)
    if args.weights:
        dit = WanTransformer3DModel.from_pretrained(args.weights, subfolder="transformer")
        source = args.weights
    else:
        dit = WanTransformer3DModel(**(TINY if args.dims == "tiny" else WAN13B))
        source = f"random weights, {args.dims} shapes"
    model = RelationalWan(dit, 4, 2, "soft", 0.1, 8).to(dev).train()
    model.gradient_checkpointing = args.dims != "tiny"
    cfg = dit.config
    h, w, f = (64, 64, 5) if args.dims == "tiny" else (480, 832, 33)
    ref, text_len = (32, 64) if args.dims == "tiny" else (256, 512)
    zc, k, b = cfg.in_channels, 4, 1
    lat = torch.randn(b, zc, (f - 1) // 4 + 1, h // 8, w // 8, device=dev)
    refs = torch.randn(b, k, 2, zc, 1, ref // 8, ref // 8, device=dev)
    ref_valid = torch.ones(b, k, 2, dtype=torch.bool, device=dev)
    text = torch.randn(b, text_len, cfg.text_dim, device=dev)
    text_valid = torch.zeros(b, text_len, dtype=torch.bool, device=dev)
    text_valid[:, :120] = True
    subject_text = torch.zeros(b, k, text_len, dtype=torch.bool, device=dev)
    for s in range(k):
        subject_text[:, s, 5 + 20 * s : 15 + 20 * s] = True
    masks = torch.zeros(b, k, f, h, w, dtype=torch.uint8)
    for s in range(k):  # four side-by-side subjects
        masks[:, s, :, h // 4 : 3 * h // 4, s * w // 4 : (s + 1) * w // 4] = 1
    grid = (lat.shape[2], h // 16, w // 16)
    target, valid = token_masks(masks, torch.ones(b, k, f, dtype=torch.bool), grid, 4)
    target, valid = target.to(dev), valid.to(dev)
    layers = {i for i in (8, 12, 16, 20) if i < cfg.num_layers} or {0}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        sigma = torch.rand(b, device=dev)
        noise = torch.randn_like(lat)
        xt = (1 - sigma.view(b, 1, 1, 1, 1)) * lat + sigma.view(b, 1, 1, 1, 1) * noise
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            pred, captured = model(
                xt, sigma * 1000, text, refs, ref_valid, subject_text, text_valid, capture_layers=layers
            )
        flow = torch.nn.functional.mse_loss(pred.float(), noise - lat)
        terms = [t for _, m in captured if (t := mask_l2(m, target, valid)) is not None]
        mask = torch.stack(terms).mean() if terms else torch.zeros((), device=dev)
        (flow + 0.05 * mask).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append({"flow": float(flow.detach()), "mask": float(mask.detach())})
        print(f"step {step + 1}/{args.steps}: {times[-1]:.2f} s  flow {losses[-1]['flow']:.4f}", flush=True)
    timed = times[args.warmup :] or times
    return {
        "part": "train",
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "weights": source,
        "shape": {
            "frames": f,
            "height": h,
            "width": w,
            "subjects": k,
            "crops_per_subject": 2,
            "ref_px": ref,
            "text_tokens": text_len,
            "video_tokens": int(lat.shape[2] * grid[1] * grid[2]),
        },
        "steps": args.steps,
        "step_seconds_median": statistics.median(timed),
        "step_seconds": times,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
        "parameters": sum(p.numel() for p in params),
        "losses": losses,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["train"], default="train")
    ap.add_argument("--weights", help="diffusers-format Wan2.1-T2V-1.3B folder (default: random weights)")
    ap.add_argument("--dims", choices=["wan13b", "tiny"], default="wan13b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=".", help="folder for gpu-<part>.json")
    args = ap.parse_args()
    if args.dims == "wan13b" and args.device != "cuda":
        raise SystemExit("the Wan2.1-1.3B shapes need a CUDA GPU; use --dims tiny to exercise the code on the CPU")
    res = train_part(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"gpu-{args.part}.json").write_text(json.dumps(res, indent=1))
    print(
        f"| {res['device']} | {res['weights']} | {res['shape']['frames']}x{res['shape']['height']}x"
        f"{res['shape']['width']}, {res['shape']['subjects']} subjects | {res['step_seconds_median']:.2f} s/step | "
        f"{res['peak_memory_gib'] if res['peak_memory_gib'] is None else round(res['peak_memory_gib'], 1)} GiB |"
    )


if __name__ == "__main__":
    main()
