"""Scale-out on one machine: a local multi-node Ray cluster with declared (fake) GPUs running the real pipeline code,
each model's compute replaced by a calibrated sleep (`bench/_simulated.py`).

    python bench/scale.py [--videos-per-node 128] [--time-scale 5] [--rows 10000 100000]

Calibration (per clip of 81 frames; seconds on the machine each model runs on, divided by --time-scale):
- GPU, captioning: Qwen2.5-VL-7B on vLLM, ~13 videos/min on one A100 -> 4.6 s a clip, one GPU per engine.
- GPU, mask tracks: SAM2.1-large, 39.5 frames/s on one A100 -> 81 / 39.5 = 2.05 s a clip (one pass over the clip's
  frames; the published figure is for one object), one GPU per worker.
- CPU: probe 0.1 s a video, scene cut 2.5 s a video (decode + PySceneDetect, 5 clips), filters 1.6 s a clip
  (motion, aesthetics proxy, OCR; this machine's embedded chain is of that order).
A node declares 2 CPUs and 3 GPUs. Pools are fixed and the same in both modes: one worker per node for each CPU
stage (it does one core's work), two captioning engines and one SAM2 worker per node (the GPUs split roughly as the
two models' costs, 4.6 : 2.05, as one would size them on a real node). The corpus grows with the cluster
(--videos-per-node; weak scaling): a 2M-clip run keeps every node busy for hours, which a fixed small corpus spread
over more nodes does not show. Reported, in one run: clips/s at 1, 2 and 4 nodes streaming and at 4 nodes one stage
at a time (`ray.streaming=false`), over three spans: wall (cluster and actor start-up included, which on this
machine's two real cores is the 4-node run's largest loss), steady (first probe batch done -> last clip done) and
middle (the middle 80% of the clips to come out: the rate a long run holds between filling and draining its
stages); each GPU stage's busy fraction over the same spans (time its batches held a GPU over its GPUs x span); and
the driver's peak RSS for a stage over 10k vs 100k ingest rows (each in its own process).
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
MASKS_S = 81 / 39.5  # SAM2.1-large, 39.5 frames/s on one A100, 81 frames a clip
PROBE_S, CUT_S, FILTER_S = 0.1, 2.5, 1.6
STAGES = ["simprobe", "simcut", "simfilter", "simcaption", "simmasks"]
CPUS_PER_NODE = 2
WORKERS_PER_NODE = {"simprobe": 1, "simcut": 1, "simfilter": 1, "simcaption": 2, "simmasks": 1}
GPU_STAGES = ("simcaption", "simmasks")


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
        "simmasks": {"seconds": MASKS_S / scale},
        **(extra or {}),
    }


def run_cluster(nodes: int, streaming: bool, videos: int, scale: float, tmp: Path) -> dict[str, float]:
    """One pipeline run on a fresh local cluster of `nodes` nodes (2 CPUs, 3 fake GPUs each)."""
    import _simulated
    import ray
    from ray.cluster_utils import Cluster

    from curation.config import build_config
    from curation.pipeline import Pipeline

    _simulated.register()
    cluster = Cluster()
    for _ in range(nodes):
        cluster.add_node(num_cpus=CPUS_PER_NODE, num_gpus=sum(WORKERS_PER_NODE[n] for n in GPU_STAGES))
    env = {"worker_process_setup_hook": "_simulated.register", "env_vars": {"PYTHONPATH": f"{BENCH}:{REPO}"}}
    ray.init(address=cluster.address, runtime_env=env, log_to_driver=False, include_dashboard=False)
    try:
        out = tmp / f"run-{nodes}-{int(streaming)}"
        pools = {  # fixed pools, the same in both modes
            n: {"resources": {"pool_min": nodes * k, "pool_max": nodes * k}} for n, k in WORKERS_PER_NODE.items()
        }
        cfg = _config(scale, streaming)
        for n, extra in pools.items():
            cfg[n].update(extra)
        pipe = Pipeline(build_config(cfg), out)
        t0 = time.time()
        pipe.run(str(_inputs(tmp, videos)))
        wall = time.time() - t0
        last = STAGES[-1]
        done = sorted(  # when each clip left the last stage (its batch's end)
            r["t"] for r in pipe.manifests.rows(f"SELECT {last}_t1 AS t FROM {last} WHERE {last}_status = 'ok'")
        )
        clips = len(done)
        first = pipe.manifests.rows("SELECT min(simprobe_ts) AS t FROM simprobe")[0]["t"]
        span = (first, done[-1])  # first probe batch done -> last clip done: without cluster and actor start-up
        # the middle 80% of the clips to come out: the rate a long run holds between filling and draining its stages
        mid = (done[clips // 10], done[clips - 1 - clips // 10])
        mid_clips = clips - 1 - 2 * (clips // 10)
        out_row: dict[str, object] = {
            "nodes": nodes,
            "streaming": streaming,
            "clips": clips,
            "wall_s": round(wall, 2),
            "clips_per_s": round(clips / wall, 3),
            "steady_s": round(span[1] - span[0], 2),
            "steady_clips_per_s": round(clips / (span[1] - span[0]), 3),
            "middle_clips_per_s": round(mid_clips / (mid[1] - mid[0]), 3),
        }
        for n in GPU_STAGES:
            batches = pipe.manifests.rows(  # each batch's rows share its (t0, t1): count a batch once
                f"SELECT DISTINCT {n}_t0 AS t0, {n}_t1 AS t1 FROM {n}"
            )
            gpus = nodes * WORKERS_PER_NODE[n]

            def held(a: float, b: float, batches: list = batches) -> float:
                return sum(max(0.0, min(x["t1"], b) - max(x["t0"], a)) for x in batches)

            out_row[f"{n}_busy"] = round(held(0, float("inf")) / (gpus * wall), 3)
            out_row[f"{n}_steady_busy"] = round(held(*span) / (gpus * (span[1] - span[0])), 3)
            out_row[f"{n}_middle_busy"] = round(held(*mid) / (gpus * (mid[1] - mid[0])), 3)
        return out_row
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
    ap.add_argument(
        "--videos-per-node",
        type=int,
        default=128,
        help="corpus size per node (5 clips a video): the corpus grows"
        " with the cluster, as a long run's share of each node does (~38 min on 2 cores; 64 takes ~18)",
    )
    ap.add_argument("--time-scale", type=float, default=5.0, help="divide every calibrated duration by this")
    ap.add_argument("--rows", type=int, nargs=2, default=[10_000, 100_000])
    ap.add_argument("--json", type=Path, default=BENCH / "out" / "scale.json")
    args = ap.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    res: dict[str, object] = {
        "calibration": {
            "caption_s": CAPTION_S,
            "masks_s": MASKS_S,
            "probe_s": PROBE_S,
            "cut_s": CUT_S,
            "filter_s": FILTER_S,
            "time_scale": args.time_scale,
        }
    }
    with tempfile.TemporaryDirectory(prefix="scale-") as d:
        tmp = Path(d)
        per = args.videos_per_node
        runs = [run_cluster(n, True, n * per, args.time_scale, tmp) for n in (1, 2, 4)]
        runs.append(run_cluster(4, False, 4 * per, args.time_scale, tmp))
        for r in runs:
            print(json.dumps(r), flush=True)
        by = {(r["nodes"], r["streaming"]): r for r in runs}
        res["runs"] = runs
        for key in ("clips_per_s", "steady_clips_per_s", "middle_clips_per_s"):
            what = key.removesuffix("clips_per_s")
            if what != "middle_":  # one stage at a time, the last stage's middle is that stage's rate alone
                res[f"{what}streaming_vs_barrier_4_nodes"] = round(by[4, True][key] / by[4, False][key], 2)
            res[f"{what}scaling_efficiency_1_to_4"] = round(by[4, True][key] / (4 * by[1, True][key]), 2)
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
