"""Two ways to run a stage over rows, same stage code in both (the `Runner` protocol).

`LocalRunner` calls `run_batch` in this process (tests, debugging). `RayRunner` wraps the stage in Ray Data
`map_batches` with an actor pool sized from the stage's resources (`Stage.resources()`, GPUs included). Either way
each batch's output is written as one atomic manifest part by the worker that computed it, so a killed run keeps
every finished batch. A `ConfigError` or storage error inside a worker ends the run in the driver, as the same error.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from curation.errors import ConfigError
from curation.logs import log_to_file, tame_third_party, worker_log_name
from curation.manifest import Manifests
from curation.stage import Row, Stage, StageConfig, get_stage, is_fatal

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


class Runner(Protocol):
    """Runs one stage over rows, writing each batch's output rows as a manifest part; returns counts."""

    name: str

    def run(
        self,
        stage_cls: type[Stage[Any]],
        cfg: StageConfig,
        rows: list[Row],
        run_dir: Path,
        progress: Progress | None = None,
    ) -> dict[str, float]: ...


def limit_native_threads(cpus: float) -> int:
    """Native thread pools (OpenCV, OpenMP) sized to the CPUs an actor holds, not to the machine's cores: every
    actor starting a thread per core oversubscribes the node (measured with onnxruntime's pool in `ocr`: 2x slower;
    with OpenCV's in `subjects`: part of its 1.28x). Returns the thread count, which the stage also gets in its
    context for libraries with their own pool (onnxruntime)."""
    n = max(1, math.ceil(cpus))
    os.environ["OMP_NUM_THREADS"] = str(n)  # read by libraries that start OpenMP later (torch)
    try:
        import cv2
    except ImportError:  # a stage package without OpenCV
        return n
    cv2.setNumThreads(n)
    return n


class LocalRunner:
    """In-process: one stage instance, batches in order; native libraries keep a thread per core."""

    name = "local"

    def run(
        self,
        stage_cls: type[Stage[Any]],
        cfg: StageConfig,
        rows: list[Row],
        run_dir: Path,
        progress: Progress | None = None,
    ) -> dict[str, float]:
        stage = stage_cls(cfg).bind(run_dir)
        manifests = Manifests(run_dir)
        for batch in stage.batches(rows):
            manifests.write(stage.name, stage.run_batch(batch))
            tame_third_party()  # libraries loaded in setup may have added console handlers
            if progress:
                progress(len(batch))
        stats = dict(stage.stats)
        stats["workers"] = 1
        stats["peak_worker_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the driver itself
        return stats


def _fatal_record(exc: BaseException) -> str:
    """An error that must end the run, as JSON the driver turns back into the same exception."""
    if isinstance(exc, OSError):
        return json.dumps({"kind": "storage", "errno": exc.errno, "strerror": exc.strerror, "filename": exc.filename})
    return json.dumps({"kind": "config", "message": str(exc)})


def _raise_fatal(record: str) -> None:
    rec = json.loads(record)
    if rec["kind"] == "storage":
        raise OSError(rec["errno"], rec["strerror"], rec["filename"])
    raise ConfigError(rec["message"])


class _RayStageWorker:
    """The actor Ray Data instantiates: builds the stage once, runs batches, writes their manifest parts.
    `RayRunner` subclasses it per stage, so actors and operators carry the stage's name."""

    def __init__(self, stage_name: str, config: dict[str, Any], run_dir: str) -> None:
        self.name = stage_name
        self.fatal = ""  # an error building the stage is reported with the first batch, as one line in the driver
        try:
            log_to_file(run_dir, worker_log_name())
            cls = get_stage(stage_name)
            cfg = cls.config_class(**config)
            self.stage = cls(cfg)
            self.stage.bind(run_dir, limit_native_threads(self.stage.resources().cpus))
            self.manifests = Manifests(run_dir)
        except Exception as exc:
            if not is_fatal(exc):
                raise
            self.fatal = _fatal_record(exc)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows: list[Row] = []
        for p in batch.column("payload").to_pylist():  # a row, or a whole group of a grouped stage
            item = json.loads(p)
            rows.extend(item if isinstance(item, list) else [item])
        fatal = self.fatal
        out: list[Row] = []
        if not fatal:
            try:
                out = self.stage.run_batch(rows)
                self.manifests.write(self.stage.name, out)
            except Exception as exc:
                if not is_fatal(exc):
                    raise
                fatal = _fatal_record(exc)
        tame_third_party()
        counts = {s: sum(1 for r in out if r.get(f"{self.name}_status") == s) for s in ("ok", "reject", "error")}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this worker's peak, MiB
        return pa.table(
            {
                "n_in": [len(rows)],
                "pid": [os.getpid()],
                "rss_mb": [rss],
                "fatal": [fatal],
                **{k: [v] for k, v in counts.items()},
            }
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
        kwargs: dict[str, Any] = {
            "ignore_reinit_error": True,
            "include_dashboard": False,
            "log_to_driver": False,  # workers log to <run>/logs; the console keeps progress and results
            "logging_level": logging.WARNING,
        }
        if self.address:
            kwargs["address"] = self.address
        elif self.num_cpus:
            kwargs["num_cpus"] = self.num_cpus
        tame_third_party()  # before init too: Ray logs its start-up notices through its own handlers
        ray.init(**kwargs)
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        tame_third_party()

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
        res = stage_cls(cfg).resources()
        cluster = ray.cluster_resources()
        if res.gpus and not cluster.get("GPU"):  # Ray would wait for a GPU forever
            raise ConfigError(
                f"stage {stage_cls.name!r} asks for {res.gpus:g} GPU per worker (its backend needs one) but the Ray "
                f"cluster has none: run on a cluster with GPUs, or set {stage_cls.name}.resources.gpus: 0 to run it "
                "on CPU"
            )
        total_cpus = float(cluster.get("CPU", 1))
        # Leave Ray Data's own tasks a CPU: a pool that holds every CPU deadlocks a 2-core machine.
        pool_max = max(
            1, min(res.pool_max, int((total_cpus - 0.5) / max(res.cpus, 0.01)) if res.cpus else res.pool_max)
        )
        pool_min = min(res.pool_min, pool_max)
        stage = stage_cls(cfg)
        if stage.grouping() is None:
            payload = [{"payload": json.dumps(r, default=str)} for r in rows]
            batch_size = res.batch_size
        else:  # one item per group, so a batch is always a whole group
            payload = [{"payload": json.dumps(g, default=str)} for g in stage.batches(rows)]
            batch_size = 1
        ds = ray.data.from_items(payload, override_num_blocks=max(1, min(len(payload), 64)))
        worker = type(f"stage_{stage_cls.name}", (_RayStageWorker,), {"__module__": __name__})
        ds = ds.map_batches(
            worker,
            fn_constructor_args=(stage_cls.name, cfg.portable_dump(), str(run_dir)),
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=pool_min, max_size=pool_max),
            num_cpus=res.cpus,
            num_gpus=res.gpus or None,
        )
        stats: dict[str, float] = {"rows": 0, "ok": 0, "reject": 0, "error": 0}
        peak: dict[int, float] = {}
        for summary in ds.iter_rows():
            if summary["fatal"]:
                _raise_fatal(summary["fatal"])
            for k in ("ok", "reject", "error"):
                stats[k] += summary[k]
            stats["rows"] += summary["ok"] + summary["reject"] + summary["error"]
            peak[summary["pid"]] = max(peak.get(summary["pid"], 0.0), summary["rss_mb"])
            if progress:
                progress(int(summary["n_in"]))
        stats["workers"] = len(peak)
        stats["peak_worker_rss_mb"] = max(peak.values(), default=0.0)
        return stats


def make_runner(kind: str, address: str | None = None, num_cpus: float | None = None) -> Runner:
    if kind == "local" and not address:
        return LocalRunner()
    return RayRunner(address=address, num_cpus=num_cpus)
