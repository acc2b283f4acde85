"""Quality filters: fused (decode once) vs each filter decoding the video itself, and vs a bare ffmpeg decode.

    python bench/filters.py [--media DIR] [--filters motion,aesthetics,ocr,watermark] [--set ocr.threads=1 ...]
                            [--baseline GIT_REV]

(a) fused: the `scenecut` pass (one decode per video, frame samples kept) then every filter on the samples;
    separate: the same `scenecut` pass (cuts are needed either way), then each filter decodes every video again
    itself to get the same frames. Scores must be identical (the run fails otherwise). Ratio: separate / fused.
(b) fused total wall vs `ffmpeg -i X -f null -` over the same inputs (the decode floor). Ratio: fused / floor.
Both are also reported without OCR, whose CPU model dominates scoring on a machine without a GPU.
(c) `--baseline REV`: the same script as commit REV's code, run in this invocation on the same media; reported as
    fused cost per clip (scene-cut pass + the filters), wall and CPU, this code / REV's (<= 1: no dearer per clip).
    `--repeat N` measures each side N times, alternating (REV, this, REV, this, ...; this code's further runs are
    this script in a subprocess) and reports the ratio of the medians beside each pair's ratio: one pass of each
    swings by +-10% on a 2-core VM (the scene-cut pass most), more than the differences being measured.
CPU seconds of every part are recorded too: (scan + filters CPU) / cores is the least wall any scheduling of the
fused work could reach on this machine (`cpu_bound_fused_vs_ffmpeg_floor`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from curation.config import apply_overrides, build_config  # noqa: E402
from curation.pipeline import Pipeline  # noqa: E402
from curation.stage import Row, registry  # noqa: E402
from curation.video import _rotate, decoded_frames, detect_size, sample_size  # noqa: E402


def decode_samples(uri: str, clips: list[Row], sample_long_side: int) -> dict[str, dict[str, np.ndarray]]:
    """What a filter that reads the video itself has to do: decode it and pull out its clips' frames."""
    want: dict[int, list[tuple[str, int]]] = {}
    for c in clips:
        for k, i in enumerate(c["scenecut_sample_frames"]):
            want.setdefault(i, []).append((c["clip_id"], k))
    out = {
        c["clip_id"]: {
            "frames": [None] * len(c["scenecut_sample_frames"]),
            "pairs": [None] * len(c["scenecut_sample_frames"]),
        }
        for c in clips
    }
    det_rf, rf = VideoReformatter(), VideoReformatter()
    prev_grey = None
    with av.open(uri) as container:
        for idx, frame in enumerate(decoded_frames(container)):  # numbered as the scene-cut pass numbers them
            if idx == 0:
                rot = int(frame.rotation or 0)
                dsize = detect_size(frame.width, frame.height)
                ssize = sample_size(frame.width, frame.height, sample_long_side)
            small = det_rf.reformat(
                frame, width=dsize[0], height=dsize[1], format="bgr24", interpolation=Interpolation.FAST_BILINEAR
            ).to_ndarray()
            grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
            if idx in want:
                rgb = rf.reformat(
                    frame, width=ssize[0], height=ssize[1], format="rgb24", interpolation=Interpolation.BILINEAR
                ).to_ndarray()
                pair = np.stack([_rotate(prev_grey if prev_grey is not None else grey, rot), _rotate(grey, rot)])
                for cid, k in want[idx]:
                    out[cid]["frames"][k] = _rotate(rgb, rot)
                    out[cid]["pairs"][k] = pair
            prev_grey = grey
    result = {}
    for c in clips:
        o = out[c["clip_id"]]
        result[c["clip_id"]] = {
            "frames": np.stack(o["frames"]),
            "pairs": np.stack(o["pairs"]),
            "indices": np.asarray(c["scenecut_sample_frames"]),
            "pair_valid": np.array([i > c["scenecut_start_frame"] for i in c["scenecut_sample_frames"]]),
        }
    return result


def _cpu(children: bool = False) -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _scores(stage: Any, row: Row, samples: dict[str, np.ndarray]) -> dict[str, Any]:
    return stage.score(row, samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--media", type=Path, default=REPO.parent / "shared" / "media" / "video")
    ap.add_argument("--filters", default="motion,aesthetics,ocr,watermark")
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "filters.json")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (ocr.threads=1)")
    ap.add_argument("--baseline", metavar="GIT_REV", help="also run this commit's code and report per-clip ratios")
    ap.add_argument("--repeat", type=int, default=1, help="with --baseline: runs of each side, alternating (median)")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    logging.basicConfig(level=logging.ERROR)
    names = args.filters.split(",")
    videos = sorted(p for p in args.media.iterdir() if p.is_file() and "truncated" not in p.name and p.suffix != ".md")
    with tempfile.TemporaryDirectory() as tmpd:
        run = Path(tmpd) / "run"
        cfg = build_config(
            apply_overrides({"runner": "local", "progress": False, "stages": ["probe", "scenecut"]}, args.set)
        )
        pipe = Pipeline(cfg, run)
        pipe.prepare()
        lst = Path(tmpd) / "inputs.txt"
        lst.write_text("\n".join(str(v) for v in videos))
        pipe.ingest(str(lst))
        runner = pipe.runner()
        pipe.run_stage("probe", runner)
        t0, c0 = time.perf_counter(), _cpu()
        pipe.run_stage("scenecut", runner)
        t_scan, cpu_scan = time.perf_counter() - t0, _cpu() - c0
        clips = pipe.manifests.rows("SELECT * FROM clips WHERE scenecut_status = 'ok' ORDER BY uri, clip_id")
        by_video: dict[str, list[Row]] = {}
        for c in clips:
            by_video.setdefault(c["uri"], []).append(c)
        sample_side = pipe.cfg.stage_config("scenecut").sample_long_side

        fused: dict[str, float] = {}
        fused_cpu: dict[str, float] = {}
        fused_scores: dict[tuple[str, str], Any] = {}
        separate: dict[str, float] = {}
        separate_cpu: dict[str, float] = {}
        mismatches: list[str] = []
        for name in names:
            stage = registry()[name](cfg.stage_config(name))
            stage.bind(run)
            stage.setup(stage.ctx)
            from curation.samples import load_samples

            t0, c0 = time.perf_counter(), _cpu()
            for c in clips:
                fused_scores[(name, c["clip_id"])] = _scores(stage, c, load_samples(c))
            fused[name], fused_cpu[name] = time.perf_counter() - t0, _cpu() - c0
            t0, c0 = time.perf_counter(), _cpu()
            for uri, vclips in by_video.items():
                decoded = decode_samples(uri, vclips, sample_side)
                for c in vclips:
                    s = _scores(stage, c, decoded[c["clip_id"]])
                    if json.dumps(s, sort_keys=True, default=str) != json.dumps(
                        fused_scores[(name, c["clip_id"])], sort_keys=True, default=str
                    ):
                        mismatches.append(f"{name}:{Path(uri).name}:{c['scenecut_start_frame']}")
            separate[name], separate_cpu[name] = time.perf_counter() - t0, _cpu() - c0

    t0, c0 = time.perf_counter(), _cpu(children=True)
    for v in videos:
        subprocess.run(
            ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(v), "-map", "0:v:0", "-f", "null", "-"], check=False
        )
    t_floor, cpu_floor = time.perf_counter() - t0, _cpu(children=True) - c0
    cores = os.cpu_count() or 1

    def totals(keep: list[str]) -> tuple[float, float]:
        return t_scan + sum(fused[n] for n in keep), t_scan + sum(separate[n] for n in keep)

    report: dict[str, Any] = {
        "overrides": args.set,
        "videos": len(videos),
        "clips": len(clips),
        "scenecut_pass_s": round(t_scan, 2),
        "ffmpeg_null_decode_s": round(t_floor, 2),
        "cores": cores,
        "cpu_s": {
            "scenecut_pass": round(cpu_scan, 2),
            "ffmpeg_null_decode": round(cpu_floor, 2),
            **{k: round(v, 2) for k, v in fused_cpu.items()},
            **{f"{k}_separate": round(v, 2) for k, v in separate_cpu.items()},
        },
        "fused_filter_s": {k: round(v, 2) for k, v in fused.items()},
        "separate_filter_s": {k: round(v, 2) for k, v in separate.items()},
        "identical_scores": not mismatches,
        "mismatches": mismatches,
    }
    for label, keep in (("all", names), ("without_ocr", [n for n in names if n != "ocr"])):
        f, s = totals(keep)
        report[label] = {
            "fused_s": round(f, 2),
            "separate_s": round(s, 2),
            "speedup_fused_vs_separate": round(s / f, 2),
            "fused_vs_ffmpeg_floor": round(f / t_floor, 2),
            "cpu_separate_vs_fused": round(
                (cpu_scan + sum(separate_cpu[n] for n in keep)) / (cpu_scan + sum(fused_cpu[n] for n in keep)), 2
            ),
            # Even with every core busy all the time the fused work cannot finish sooner than this.
            "cpu_bound_fused_vs_ffmpeg_floor": round((cpu_scan + sum(fused_cpu[n] for n in keep)) / cores / t_floor, 2),
        }
    if args.baseline:
        report["baseline"] = _against(args, report, names)
    print(json.dumps(report, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if not mismatches else 1


def _per_clip(r: dict[str, Any], names: list[str]) -> tuple[float, float]:
    """Fused wall and CPU seconds a clip: the scene-cut pass plus the filters."""
    wall = r["scenecut_pass_s"] + sum(r["fused_filter_s"][n] for n in names)
    cpu = r["cpu_s"]["scenecut_pass"] + sum(r["cpu_s"][n] for n in names)
    return wall / r["clips"], cpu / r["clips"]


def _medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return float(np.median([w for w, _ in runs])), float(np.median([c for _, c in runs]))


def _against(args: argparse.Namespace, report: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The fused chain's cost per clip, this code vs commit `args.baseline`'s, same media, same invocation; with
    `--repeat N`, N runs of each side alternating, compared by their medians."""
    from _baseline import run_script_at

    extra = ["--media", str(args.media), "--filters", ",".join(names), *[x for s in args.set for x in ("--set", s)]]
    this_runs, base_runs = [report], []
    with tempfile.TemporaryDirectory() as tmpd:
        for k in range(args.repeat):
            run_dir = Path(tmpd) / f"run{k}"
            run_dir.mkdir()
            base_runs.append(run_script_at(args.baseline, "filters.py", extra, run_dir, check=False))
            if k + 1 < args.repeat:  # this code's first run is the report above
                out = run_dir / "this.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), *extra, "--json", str(out)]
                subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
                this_runs.append(json.loads(out.read_text()))

    new = [_per_clip(r, names) for r in this_runs]
    old = [_per_clip(r, names) for r in base_runs]
    (w_new, c_new), (w_old, c_old) = _medians(new), _medians(old)
    return {
        "rev": args.baseline,
        "runs_each": args.repeat,
        "clips": {"this": report["clips"], "baseline": base_runs[0]["clips"]},
        "fused_s_per_clip": {"this": round(w_new, 3), "baseline": round(w_old, 3)},
        "fused_cpu_s_per_clip": {"this": round(c_new, 3), "baseline": round(c_old, 3)},
        "parts_s": {
            k: [{"scenecut_pass": r["scenecut_pass_s"], **{n: r["fused_filter_s"][n] for n in names}} for r in rs]
            for k, rs in (("this", this_runs), ("baseline", base_runs))
        },
        "wall_ratio_each_run": [round(a[0] / b[0], 3) for a, b in zip(new, old, strict=True)],
        "cpu_ratio_each_run": [round(a[1] / b[1], 3) for a, b in zip(new, old, strict=True)],
        # medians: of per-clip seconds over the runs of each side
        "wall_ratio_this_vs_baseline": round(w_new / w_old, 3),
        "cpu_ratio_this_vs_baseline": round(c_new / c_old, 3),
    }


if __name__ == "__main__":
    sys.exit(main())
