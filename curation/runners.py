"""Two ways to run a stage over rows, same stage code in both.

`LocalRunner` calls `run_batch` in this process (tests, debugging). `RayRunner` wraps the stage in Ray Data
`map_batches` with an actor pool sized from the stage's declared `Resources`. Either way each batch's output is
written as one atomic manifest part by the worker that computed it, so a killed run keeps every finished batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from curation.manifest import Manifests
from curation.stage import Resources, Row, Stage, StageConfig, batched, get_stage

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


def resources_for(stage_cls: type[Stage[Any]], cfg: StageConfig) -> Resources:
    """Declared resources, with the stage config's `resources` section (if any) on top."""
    base = stage_cls.resources
    over = getattr(cfg, "resources", None)
    if not over:
        return base
    return Resources(**{**base.__dict__, **{k: v for k, v in over.model_dump().items() if v is not None}})


_native_threads: int | None = None  # set in stage actors; None in-process, where one stage runs at a time


def native_threads() -> int | None:
    """Threads this worker's native libraries may use: the actor's CPUs, or None (the library's default, a thread
    per core) when stages run in-process one after another. For libraries with their own pool (onnxruntime)."""
    return _native_threads


def limit_native_threads(cpus: float) -> int:
    """Native thread pools (OpenCV, OpenMP) sized to the CPUs an actor holds, not to the machine's cores: every
    actor starting a thread per core oversubscribes the node (measured with onnxruntime's pool in `ocr`: 2x slower;
    with OpenCV's in `subjects`: part of its 1.28x)."""
    import cv2

    global _native_threads
    n = max(1, math.ceil(cpus))
    _native_threads = n
    cv2.setNumThreads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)  # read by libraries that start OpenMP later (torch)
    return n


class LocalRunner:
    """In-process: one stage instance, batches in order."""

    name = "local"

    def run(
        self,
        stage_cls: type[Stage[Any]],
        cfg: StageConfig,
        rows: list[Row],
        run_dir: Path,
        progress: Progress | None = None,
    ) -> dict[str, float]:
        stage = stage_cls(cfg)
        stage.workdir = run_dir
        manifests = Manifests(run_dir)
        for batch in batched(rows, resources_for(stage_cls, cfg).batch_size):
            manifests.write(stage.name, stage.run_batch(batch))
            if progress:
                progress(len(batch))
        stats = dict(stage.stats)
        stats["workers"] = 1
        stats["peak_worker_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the driver itself
        return stats


class _RayStageWorker:
    """The actor Ray Data instantiates: builds the stage once, runs batches, writes their manifest parts."""

    def __init__(self, stage_name: str, config: dict[str, Any], run_dir: str) -> None:
        cls = get_stage(stage_name)
        cfg = cls.config_class(**config)
        limit_native_threads(resources_for(cls, cfg).cpus)
        self.stage = cls(cfg)
        self.stage.workdir = Path(run_dir)
        self.manifests = Manifests(run_dir)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [json.loads(p) for p in batch.column("payload").to_pylist()]
        out = self.stage.run_batch(rows)
        self.manifests.write(self.stage.name, out)
        counts = {s: sum(1 for r in out if r.get(f"{self.stage.name}_status") == s) for s in ("ok", "reject", "error")}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this worker's peak, MiB
        return pa.table(
            {"n_in": [len(rows)], "pid": [os.getpid()], "rss_mb": [rss], **{k: [v] for k, v in counts.items()}}
        )


class RayRunner:
    """Ray Data actor pools; `address=None` starts (or joins) a local cluster."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: float | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus

    def _init(self) -> None:
        import ray

        if ray.is_initialized():
            return
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "include_dashboard": False, "log_to_driver": True}
        if self.address:
            kwargs["address"] = self.address
        elif self.num_cpus:
            kwargs["num_cpus"] = self.num_cpus
        ray.init(**kwargs)
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False

    def run(
        self,
        stage_cls: type[Stage[Any]],
        cfg: StageConfig,
        rows: list[Row],
        run_dir: Path,
        progress: Progress | None = None,
    ) -> dict[str, float]:
        import ray
        from ray.data import ActorPoolStrategy

        self._init()
        res = resources_for(stage_cls, cfg)
        total_cpus = float(ray.cluster_resources().get("CPU", 1))
        # Leave Ray Data's own tasks a CPU: a pool that holds every CPU deadlocks a 2-core machine.
        pool_max = max(
            1, min(res.pool_max, int((total_cpus - 0.5) / max(res.cpus, 0.01)) if res.cpus else res.pool_max)
        )
        pool_min = min(res.pool_min, pool_max)
        payload = [{"payload": json.dumps(r, default=str)} for r in rows]
        ds = ray.data.from_items(payload, override_num_blocks=max(1, min(len(payload), 64)))
        ds = ds.map_batches(
            _RayStageWorker,
            fn_constructor_args=(stage_cls.name, cfg.model_dump(mode="json"), str(run_dir)),
            batch_size=res.batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=pool_min, max_size=pool_max),
            num_cpus=res.cpus,
            num_gpus=res.gpus or None,
        )
        stats: dict[str, float] = {"rows": 0, "ok": 0, "reject": 0, "error": 0}
        peak: dict[int, float] = {}
        for summary in ds.iter_rows():
            for k in ("ok", "reject", "error"):
                stats[k] += summary[k]
            stats["rows"] += summary["ok"] + summary["reject"] + summary["error"]
            peak[summary["pid"]] = max(peak.get(summary["pid"], 0.0), summary["rss_mb"])
            if progress:
                progress(int(summary["n_in"]))
        stats["workers"] = len(peak)
        stats["peak_worker_rss_mb"] = max(peak.values(), default=0.0)
        return stats


def make_runner(kind: str, address: str | None = None, num_cpus: float | None = None) -> LocalRunner | RayRunner:
    if kind == "local" and not address:
        return LocalRunner()
    return RayRunner(address=address, num_cpus=num_cpus)
