"""Scale-out on one machine: a local multi-node Ray cluster with declared (fake) GPUs running the real pipeline code,
each model's compute replaced by a calibrated sleep (`bench/_simulated.py`).

    python bench/scale.py [--videos 48] [--time-scale 20] [--rows 10000 100000]

Calibration (per clip of 81 frames; seconds on the machine each model runs on, divided by --time-scale):
- GPU: captioning with Qwen2.5-VL-7B on vLLM, ~13 videos/min on one A100 -> 4.6 s a clip, one GPU per engine.
- CPU: probe 0.1 s a video, scene cut 2.5 s a video (decode + PySceneDetect, 5 clips), filters 1.6 s a clip
  (motion, aesthetics proxy, OCR; this machine's embedded chain is of that order).
A node declares 2 CPUs and 1 GPU, and each stage gets one worker per node (fixed pools): a CPU stage's worker does
one core's work. Reported, in one run: clips/s at 1, 2 and 4 nodes streaming; clips/s at 4 nodes
one stage at a time (`ray.streaming=false`); the GPU stage's busy fraction (time its batches held a GPU over
GPUs x wall); and the driver's peak RSS for a stage over 10k vs 100k ingest rows (each in its own process).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

CAPTION_S = 60 / 13  # Qwen2.5-VL-7B, vLLM, one A100
PROBE_S, CUT_S, FILTER_S = 0.1, 2.5, 1.6
STAGES = ["simprobe", "simcut", "simfilter", "simcaption"]


def _inputs(folder: Path, n: int) -> Path:
    """A list file of n made-up video URIs (the simulated stages never open them)."""
    folder.mkdir(parents=True, exist_ok=True)
    lst = folder / f"inputs-{n}.txt"
    lst.write_text("".join(f"/data/videos/v{i:07d}.mp4\n" for i in range(n)))
    return lst


def _config(scale: float, streaming: bool, extra: dict | None = None) -> dict:
    return {
        "runner": "ray",
        "progress": False,
        "stages": STAGES,
        "ray": {"streaming": streaming},
        "simprobe": {"seconds": PROBE_S / scale},
        "simcut": {"seconds": CUT_S / scale},
        "simfilter": {"seconds": FILTER_S / scale},
        "simcaption": {"seconds": CAPTION_S / scale},
        **(extra or {}),
    }


def run_cluster(nodes: int, streaming: bool, videos: int, scale: float, tmp: Path) -> dict[str, float]:
    """One pipeline run on a fresh local cluster of `nodes` nodes (2 CPUs, 1 fake GPU each)."""
    import _simulated
    import ray
    from ray.cluster_utils import Cluster

    from curation.config import build_config
    from curation.pipeline import Pipeline

    _simulated.register()
    cluster = Cluster()
    for _ in range(nodes):
        cluster.add_node(num_cpus=2, num_gpus=1)
    env = {"worker_process_setup_hook": "_simulated.register", "env_vars": {"PYTHONPATH": f"{BENCH}:{REPO}"}}
    ray.init(address=cluster.address, runtime_env=env, log_to_driver=False, include_dashboard=False)
    try:
        out = tmp / f"run-{nodes}-{int(streaming)}"
        pools = {  # fixed pools: one worker per node for each CPU stage, one engine per GPU
            n: {"resources": {"pool_min": nodes, "pool_max": nodes}} for n in STAGES
        }
        cfg = _config(scale, streaming)
        for n, extra in pools.items():
            cfg[n].update(extra)
        pipe = Pipeline(build_config(cfg), out)
        t0 = time.time()
        pipe.run(str(_inputs(tmp, videos)))
        wall = time.time() - t0
        clips = pipe.manifests.rows("SELECT count(*) AS n FROM simcaption WHERE simcaption_status = 'ok'")[0]["n"]
        span = pipe.manifests.rows(  # first probe batch done -> last caption batch done: without cluster start-up
            "SELECT (SELECT max(simcaption_t1) FROM simcaption) - (SELECT min(simprobe_ts) FROM simprobe) AS s"
        )[0]["s"]
        busy = pipe.manifests.rows(  # each batch's rows share its (t0, t1): count a batch once
            "SELECT sum(t1 - t0) AS s FROM (SELECT DISTINCT simcaption_t0 AS t0, simcaption_t1 AS t1 FROM simcaption)"
        )[0]["s"]
        return {
            "nodes": nodes,
            "streaming": streaming,
            "clips": clips,
            "wall_s": round(wall, 2),
            "clips_per_s": round(clips / wall, 3),
            "gpu_busy": round(busy / (nodes * wall), 3),
            "steady_s": round(span, 2),
            "steady_clips_per_s": round(clips / span, 3),
            "steady_gpu_busy": round(busy / (nodes * span), 3),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


def driver_memory(rows: int, tmp: Path) -> float:
    """Peak RSS (MiB) of a driver process that ingests `rows` videos and runs one stage over them on Ray."""
    code = f"""
import resource, sys
sys.path[:0] = [{str(BENCH)!r}, {str(REPO)!r}]
import ray, _simulated
_simulated.register()
env = {{"worker_process_setup_hook": "_simulated.register", "env_vars": {{"PYTHONPATH": {f"{BENCH}:{REPO}"!r}}}}}
ray.init(num_cpus=2, runtime_env=env, log_to_driver=False, include_dashboard=False)
from curation.config import build_config
from curation.pipeline import Pipeline
cfg = build_config({{"runner": "ray", "progress": False, "stages": ["simprobe"],
                    "simprobe": {{"resources": {{"batch_size": 2000, "pool_max": 2}}}}}})
pipe = Pipeline(cfg, {str(tmp / f"mem-{rows}")!r})
pipe.run({str(_inputs(tmp, rows))!r})
n = pipe.manifests.rows("SELECT count(*) AS n FROM simprobe WHERE simprobe_status = 'ok'")[0]["n"]
assert n == {rows}, n
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return float(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=16)
    ap.add_argument("--time-scale", type=float, default=5.0, help="divide every calibrated duration by this")
    ap.add_argument("--rows", type=int, nargs=2, default=[10_000, 100_000])
    ap.add_argument("--json", type=Path, default=BENCH / "out" / "scale.json")
    args = ap.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    res: dict[str, object] = {
        "calibration": {
            "caption_s": CAPTION_S,
            "probe_s": PROBE_S,
            "cut_s": CUT_S,
            "filter_s": FILTER_S,
            "time_scale": args.time_scale,
        }
    }
    with tempfile.TemporaryDirectory(prefix="scale-") as d:
        tmp = Path(d)
        runs = [run_cluster(n, True, args.videos, args.time_scale, tmp) for n in (1, 2, 4)]
        runs.append(run_cluster(4, False, args.videos, args.time_scale, tmp))
        for r in runs:
            print(json.dumps(r), flush=True)
        by = {(r["nodes"], r["streaming"]): r for r in runs}
        res["runs"] = runs
        res["streaming_vs_barrier_4_nodes"] = round(by[4, True]["clips_per_s"] / by[4, False]["clips_per_s"], 2)
        res["steady_streaming_vs_barrier_4_nodes"] = round(
            by[4, True]["steady_clips_per_s"] / by[4, False]["steady_clips_per_s"], 2
        )
        res["scaling_efficiency_1_to_4"] = round(by[4, True]["clips_per_s"] / (4 * by[1, True]["clips_per_s"]), 2)
        res["steady_scaling_efficiency_1_to_4"] = round(
            by[4, True]["steady_clips_per_s"] / (4 * by[1, True]["steady_clips_per_s"]), 2
        )
        mem = {n: round(driver_memory(n, tmp), 1) for n in args.rows}
        res["driver_peak_rss_mb"] = mem
        res["driver_memory_ratio"] = round(mem[args.rows[1]] / mem[args.rows[0]], 2)
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    _ = resource
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
