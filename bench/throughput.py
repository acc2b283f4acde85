"""End-to-end throughput on the embedded profile: a generated corpus through every default stage on Ray.

    python bench/throughput.py [--videos 25 50] [--set ocr.threads=0 ...] [--baseline GIT_REV]

Each video is 5 scenes x 2 s (320x240, 25 fps) from different ffmpeg test sources, so scene cut yields ~5 clips a
video. For each corpus size it reports clips/s end to end and the peak RSS of each stage's workers (measured in the
workers, from `stage_runs`); the largest corpus must not need more memory per worker than the smallest.

`--baseline REV` also runs the code of an earlier commit on the same corpus sizes, in the same invocation (its tree
is exported with `git archive` and run in a subprocess with its own Ray cluster), and reports new / baseline clips/s.
The installed package's entry points name stages the old tree may lack; a `sitecustomize` put first on the
subprocess's PYTHONPATH (driver and Ray workers alike) hides those, so the old tree runs exactly its own stages.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from curation.config import apply_overrides, build_config  # noqa: E402
from curation.pipeline import Pipeline  # noqa: E402
from curation.synthetic import concat_sources  # noqa: E402

SOURCES = ["mandelbrot", "life", "cellauto", "gradients", "rgbtestsrc"]


def corpus(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        order = SOURCES[i % 5 :] + SOURCES[: i % 5]
        concat_sources(folder / f"v{i:04d}.mp4", order, 2.0, size="320x240", fps=25)


def run_once(inputs: Path, out: Path, overrides: list[str]) -> dict[str, object]:
    cfg = build_config(apply_overrides({"runner": "ray", "progress": False}, overrides))
    pipe = Pipeline(cfg, out)
    t0 = time.perf_counter()
    pipe.run(str(inputs))
    wall = time.perf_counter() - t0
    clips = pipe.manifests.rows("SELECT count(*) AS n, count(*) FILTER (WHERE status = 'ok') AS kept FROM clips")[0]
    stages = pipe.manifests.rows("SELECT * FROM stage_runs ORDER BY stage_runs_ts")
    keep = ("stage", "mode", "inputs", "seconds", "busy_s", "workers", "peak_worker_rss_mb")
    stages = [{k: s[k] for k in keep if k in s} for s in stages]
    return {
        "clips": clips["n"],
        "kept": clips["kept"],
        "wall_s": round(wall, 1),
        "clips_per_s": round(clips["n"] / wall, 2),
        "stages": stages,
        "peak_worker_rss_mb": max(s["peak_worker_rss_mb"] for s in stages),
    }


def run_baseline(rev: str, videos: list[int], tmpd: Path) -> dict[int, dict[str, object]]:
    """The same benchmark on commit `rev`'s code, in a subprocess."""
    from _baseline import run_script_at

    res = run_script_at(rev, "throughput.py", ["--videos", *map(str, videos)], tmpd)
    return {int(k): v for k, v in res["runs"].items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, nargs="+", default=[25, 50])
    ap.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "throughput.json")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (ocr.threads=0)")
    ap.add_argument("--baseline", metavar="GIT_REV", help="also run this commit's code and report the ratio")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    results = {}
    with tempfile.TemporaryDirectory() as tmpd:
        for n in args.videos:
            inputs = Path(tmpd) / f"in{n}"
            corpus(inputs, n)
            results[n] = run_once(inputs, Path(tmpd) / f"run{n}", args.set)
            print(f"{n} videos: {json.dumps({k: v for k, v in results[n].items() if k != 'stages'})}", flush=True)
        ray.shutdown()
        base = run_baseline(args.baseline, args.videos, Path(tmpd)) if args.baseline else None
    small, big = results[min(results)], results[max(results)]
    report: dict[str, object] = {
        "overrides": args.set,
        "runs": results,
        "memory_ratio_largest_vs_smallest": round(big["peak_worker_rss_mb"] / small["peak_worker_rss_mb"], 3),
    }
    for r in results.values():
        # the subjects stage's share of what every stage's workers spent on batches (`busy_s`): stages that
        # stream together all record their chain's wall seconds, so a share of wall would count the chain
        busy = {s["stage"]: s.get("busy_s") for s in r["stages"]}  # type: ignore[union-attr]
        known = None not in busy.values() and sum(busy.values()) > 0  # stage_runs of older code lack the column
        r["subjects_share_of_work"] = round(busy.get("subjects", 0.0) / sum(busy.values()), 3) if known else None
    if base is not None:
        report["baseline"] = {"rev": args.baseline, "runs": base}
        report["clips_per_s_ratio"] = {
            n: round(float(results[n]["clips_per_s"]) / float(base[n]["clips_per_s"]), 2)  # type: ignore[arg-type]
            for n in results
        }
    print(json.dumps(report, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
