"""Relational attention: dense masked attention vs the blocked kernels the trainer runs, for 1-4 subjects.

    python bench/attention.py [--device cpu|cuda] [--repeat 3] [--frames 5 --height 15 --width 26]

Shapes default to Wan2.1-1.3B's attention (12 heads x 128) on a 17-frame 240x416 clip (5 x 15 x 26 = 1,950 video
tokens), 256-px reference crops (16 x 16 = 256 tokens each, subject + face = 512 per subject) and a 512-token
caption. Per subject count it runs, in one process:

- dense: one SDPA over the whole sequence with the boolean relational mask (what a generic masked kernel does:
  every query against every key, masked entries computed and thrown away);
- relational: `blocked_self_attention` + `blocked_cross_attention` (the masked-out blocks are never computed).

Both give the same output (checked every run). Reported: analytical FLOPs of the score and value products and the
best-of-`repeat` wall time, as ratios dense / relational.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from curation.train.relational import (  # noqa: E402
    Layout,
    attention_flops,
    blocked_cross_attention,
    blocked_self_attention,
    cross_attention_mask,
    dense_attention,
    self_attention_mask,
)


def layout(k: int, n_video: int, per_slot: int, n_text: int, device: str) -> Layout:
    text_valid = torch.zeros(1, n_text, dtype=torch.bool, device=device)
    text_valid[:, :60] = True  # a ~60-token caption padded to the context length, as Wan's umT5 input
    subject_text = torch.zeros(1, k, n_text, dtype=torch.bool, device=device)
    for s in range(k):
        subject_text[:, s, 4 + 12 * s : 12 + 12 * s] = True
    ref_valid = torch.ones(1, k, 2, dtype=torch.bool, device=device)
    return Layout(n_video, k, 2, per_slot, ref_valid, subject_text, text_valid)


def best(fn: Callable[[], object], repeat: int, device: str) -> float:
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--height", type=int, default=15)
    ap.add_argument("--width", type=int, default=26)
    ap.add_argument("--ref-tokens", type=int, default=256, help="tokens per reference image")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--text", type=int, default=512)
    args = ap.parse_args()
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    nv = args.frames * args.height * args.width
    h, d = args.heads, args.head_dim
    print(f"device {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else f'{torch.get_num_threads()} threads'})")
    print(
        f"video tokens {nv}, {args.ref_tokens} tokens per reference x 2 per subject, {h} heads x {d}, text {args.text}"
    )
    print("| subjects | tokens | GFLOP dense | GFLOP relational | FLOP ratio | ms dense | ms relational | time ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator(device=dev).manual_seed(0)
    for k in (1, 2, 3, 4):
        lay = layout(k, nv, args.ref_tokens, args.text, dev)
        n = lay.n_total
        q, kk, v = (torch.randn(1, h, n, d, generator=g, device=dev, dtype=dtype) for _ in range(3))
        tk, tv = (torch.randn(1, h, args.text, d, generator=g, device=dev, dtype=dtype) for _ in range(2))
        smask, cmask = self_attention_mask(lay), cross_attention_mask(lay)

        def dense() -> tuple[torch.Tensor, torch.Tensor]:
            return dense_attention(q, kk, v, smask), dense_attention(q, tk, tv, cmask)  # noqa: B023

        def relational() -> tuple[torch.Tensor, torch.Tensor]:
            return blocked_self_attention(q, kk, v, lay)[0], blocked_cross_attention(q, tk, tv, lay)[0]  # noqa: B023

        a, b = dense(), relational()
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        for x, y in zip(a, b, strict=True):
            if not torch.allclose(x.float(), y.float(), atol=tol):
                raise SystemExit(f"dense and relational outputs differ for {k} subjects")
        fl = attention_flops(nv, k, lay.group_size, args.text, d * h)
        td, tr = best(dense, args.repeat, dev), best(relational, args.repeat, dev)
        print(
            f"| {k} | {n} | {fl['dense'] / 1e9:.1f} | {fl['relational'] / 1e9:.1f} | "
            f"{fl['dense'] / fl['relational']:.2f} | {td * 1e3:.0f} | {tr * 1e3:.0f} | {td / tr:.2f} |"
        )


if __name__ == "__main__":
    main()
