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
from curation.manifest import InputFiles, Manifests, journal, rows_to_table
from curation.runstore import RunStore, local, register_run
from curation.stage import (
    CLIP_FIELDS,
    Kind,
    Resources,
    Row,
    Stage,
    StageConfig,
    fingerprint_sql,
    get_stage,
    is_fatal,
)
from curation.storage import is_remote

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
CHAIN_BLOCK_BYTES = 16 * 1024  # a few rows: what streams between the stages of a chain moves in blocks this small


class Runner(Protocol):
    """Runs one stage over rows, writing each batch's output rows as a manifest part; returns counts. A runner
    with `reads_files = True` also takes the rows as the driver's Parquet export (`InputFiles`)."""

    name: str

    def run(
        self,
        stage_cls: type[Stage[Any]],
        cfg: StageConfig,
        rows: list[Row] | InputFiles,
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
        rows: list[Row] | InputFiles,
        run_dir: Path,
        progress: Progress | None = None,
    ) -> dict[str, float]:
        if isinstance(rows, InputFiles):
            raise TypeError("the local runner takes a list of rows")
        stage = stage_cls(cfg).bind(run_dir)
        manifests = Manifests(run_dir)
        for batch in stage.batches(rows):
            manifests.write(stage.name, stage.run_batch(batch))
            tame_third_party()  # libraries loaded in setup may have added console handlers
            if progress:
                progress(len(batch))
        stats = dict(stage.stats)
        stats["busy_s"] = stats.pop("seconds", 0.0)
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


def chain_rows(
    stage: Stage[Any], rows: list[Row], out: list[Row], requires: tuple[str, ...], unread: tuple[str, ...] = ()
) -> list[Row]:
    """The next stage's input rows, built in the worker from this stage's inputs and outputs: what the pipeline's
    selection query would return for them (the rows this stage kept, joined with its columns; a split stage's
    clips with their `clip_*` geometry, without the `unread` optional columns), fingerprinted over the next stage's
    reads the way the query does."""
    st = stage.col("status")
    if stage.kind == Kind.SPLIT:
        by_video = {r.get("video_id"): r for r in rows}
        split = stage.name
        nxt = [
            {**by_video.get(o.get("video_id"), {}), **o, **{f"clip_{f}": o.get(f"{split}_{f}") for f in CLIP_FIELDS}}
            for o in out
            if o.get(st) == "ok" and o.get("clip_id") is not None
        ]
    else:
        key = stage.key()
        by_key = {r.get(key): r for r in rows}
        nxt = [{**by_key.get(o.get(key), {}), **o} for o in out if o.get(st) == "ok"]
    if not nxt:
        return []
    for r in nxt if unread else ():
        for c in unread:
            r.pop(c, None)
    import duckdb

    cols = (
        rows_to_table([{c: r.get(c) for c in requires} for r in nxt]) if requires else pa.table({"n": [0] * len(nxt)})
    )
    con = duckdb.connect()
    try:
        con.register("t", cols)
        prints = [r[0] for r in con.execute(f"SELECT {fingerprint_sql(requires)} FROM t").fetchall()]
    finally:
        con.close()
    for r, fp in zip(nxt, prints, strict=True):
        r["_upstream"] = fp
    return nxt


class _RayStageWorker:
    """The actor Ray Data instantiates: builds the stage once, runs batches, writes their manifest parts.
    `RayRunner` subclasses it per stage, so actors and operators carry the stage's name.

    Input batches are the driver's Parquet rows, grouped payloads (JSON), or what the previous stage of a streaming
    chain emitted. Output: `kind`/`payload` rows: the next stage's input rows (`row`), and one `summary` per batch
    (counts, worker memory, a fatal error) that later stages pass through to the driver."""

    def __init__(
        self, stage_name: str, config: dict[str, Any], run_dir: str, nxt: tuple[str, list[str]] | None = None
    ) -> None:
        self.name = stage_name
        self.next_requires = tuple(nxt[1]) if nxt else None
        # the next stage's optional columns it does not read here (a later stage's output): kept from its rows
        self.next_unread = tuple(c for c in get_stage(nxt[0]).optional_requires if c not in nxt[1]) if nxt else ()
        self.fatal = ""  # an error building the stage is reported with the first batch, as one line in the driver
        self.store: RunStore | None = None
        try:
            if is_remote(run_dir):  # a run on object storage: staged on this node, each batch's files pushed
                self.store = RunStore(run_dir)
                run_dir = str(self.store.staging)
            register_run(run_dir, self.store)
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
        kinds: list[str] = []
        payloads: list[str] = []
        rows: list[Row] = []
        if "path" in batch.column_names:  # files of the driver's exported rows, native types
            import pyarrow.parquet as pq

            for path in batch.column("path").to_pylist():
                here = local(path)  # on another node than the driver's: fetched from the run's store
                rows.extend(pq.read_table(here).to_pylist())
                if str(here) != path:
                    here.unlink(missing_ok=True)
        else:
            kind = batch.column("kind").to_pylist() if "kind" in batch.column_names else ["row"] * batch.num_rows
            for k, p in zip(kind, batch.column("payload").to_pylist(), strict=True):
                if k == "summary":  # an earlier stage's: on to the driver
                    kinds.append(k)
                    payloads.append(p)
                    continue
                item = json.loads(p)  # a row, or a whole group of a grouped stage
                rows.extend(item if isinstance(item, list) else [item])
        if not rows and not self.fatal:
            return _records(kinds, payloads)
        fatal = self.fatal
        out: list[Row] = []
        nxt: list[Row] = []
        before = self.stage.stats["seconds"] if not fatal else 0.0
        if not fatal:
            try:
                with journal() as written:
                    out = self.stage.run_batch(rows)
                    self.manifests.write(self.stage.name, out)
                if self.store is not None:  # before the rows go on: a stage on another node fetches these
                    self.store.push_files(written)
                if self.next_requires is not None:
                    nxt = chain_rows(self.stage, rows, out, self.next_requires, self.next_unread)
            except Exception as exc:
                if not is_fatal(exc):
                    raise
                fatal = _fatal_record(exc)
        tame_third_party()
        counts = {s: sum(1 for r in out if r.get(f"{self.name}_status") == s) for s in ("ok", "reject", "error")}
        summary = {
            "stage": self.name,
            "n_in": len(rows),
            "pid": os.getpid(),
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # this worker's peak, MiB
            "busy_s": self.stage.stats["seconds"] - before if not self.fatal else 0.0,  # in run_batch, as locally
            "fatal": fatal,
            **counts,
        }
        kinds += ["summary"] + ["row"] * len(nxt)
        payloads += [json.dumps(summary)] + [json.dumps(r, default=str) for r in nxt]
        return _records(kinds, payloads)


def _records(kinds: list[str], payloads: list[str]) -> pa.Table:
    return pa.table({"kind": pa.array(kinds, pa.string()), "payload": pa.array(payloads, pa.string())})


class _RayFusedWorker:
    """Consecutive CPU stages of a chain in one actor: each batch goes through them in turn, in pieces of each
    stage's batch size, every stage still writing its own manifest part per piece. On one machine a pool per stage
    costs 1-5 s a stage whatever its input (actor start-up, Ray Data handing blocks between operators); this pays
    it once for the lot. `RayRunner` subclasses it per fusion, named after its stages."""

    def __init__(
        self,
        names: list[str],
        configs: list[dict[str, Any]],
        run_dir: str,
        nxts: list[tuple[str, list[str]] | None],
        batch_sizes: list[int],
    ) -> None:
        self.workers = [_RayStageWorker(n, c, run_dir, x) for n, c, x in zip(names, configs, nxts, strict=True)]
        self.batch_sizes = batch_sizes
        built = [w.stage for w in self.workers if hasattr(w, "stage")]
        if built:  # each stage set the process's native threads for its own CPUs; the pool holds the most of them
            limit_native_threads(fused_resources(built).cpus)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = self.workers[0](batch)
        for worker, size in zip(self.workers[1:], self.batch_sizes[1:], strict=True):
            out = _in_pieces(worker, out, size)
        return out


def _in_pieces(worker: _RayStageWorker, table: pa.Table, size: int) -> pa.Table:
    """`worker` over the rows of `table` (a previous stage's output) `size` at a time; summaries pass through."""
    kinds = table.column("kind").to_pylist()
    payloads = table.column("payload").to_pylist()
    summaries = [p for k, p in zip(kinds, payloads, strict=True) if k == "summary"]
    rows = [p for k, p in zip(kinds, payloads, strict=True) if k != "summary"]
    if not rows:
        return worker(table)  # passes the summaries on (and reports a stage that failed to build)
    parts = [_records(["summary"] * len(summaries), summaries)]
    for i in range(0, len(rows), size):
        piece = rows[i : i + size]
        parts.append(worker(_records(["row"] * len(piece), piece)))
    return pa.concat_tables(parts)


def fusion_units(stages: list[Stage[Any]], fuse: bool) -> list[list[int]]:
    """Which of a chain's stages share a pool (indices): with `fuse`, each run of consecutive stages that ask for
    no GPU and are `fusible`; a GPU stage always has its own (its pool is sized by the GPUs, and the CPU stages
    beside it keep working while it holds them)."""

    def alone(s: Stage[Any]) -> bool:
        return bool(s.resources().gpus) or not s.fusible()

    units: list[list[int]] = []
    for i, s in enumerate(stages):
        if fuse and units and not alone(s) and not alone(stages[units[-1][-1]]):
            units[-1].append(i)
        else:
            units.append([i])
    return units


def fused_resources(stages: list[Stage[Any]]) -> Resources:
    """One pool for several stages: the most CPUs and GPUs any of them asks a worker for, the largest minimum and
    the smallest maximum pool (a stage capped at one worker, for memory, keeps the cap)."""
    res = [s.resources() for s in stages]
    pool_max = min(r.pool_max for r in res)
    return Resources(
        cpus=max(r.cpus for r in res),
        gpus=max(r.gpus for r in res),
        batch_size=res[0].batch_size,
        pool_min=min(max(r.pool_min for r in res), pool_max),
        pool_max=pool_max,
    )


class RayRunner:
    """Ray Data actor pools; `address=None` starts (or joins) a local cluster. `run` runs one stage; `run_chain`
    streams rows through several stages at once, each its own actor pool, rows a stage rejects going no further."""

    name = "ray"
    reads_files = True  # takes its inputs as the driver's Parquet export, not as a list held in the driver

    def __init__(self, address: str | None = None, num_cpus: float | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus

    def _init(self) -> None:
        import ray

        if not ray.is_initialized():
            self._start()
        from ray.data import DataContext

        ctx = DataContext.get_current()  # also when the caller started Ray: progress goes to our bars, not stdout
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        tame_third_party()

    def _start(self) -> None:
        import ray

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

    def cluster_gpus(self) -> float:
        """GPUs in the cluster (starting or joining it)."""
        import ray

        self._init()
        return float(ray.cluster_resources().get("GPU", 0.0))

    def cluster_nodes(self) -> int:
        """Alive nodes in the cluster."""
        import ray

        self._init()
        return sum(1 for n in ray.nodes() if n.get("Alive"))

    def _dataset(self, stage: Stage[Any], rows: list[Row] | InputFiles) -> tuple[Any, int]:
        """The input dataset and the batch size its rows go to the workers in."""
        import ray

        if isinstance(rows, InputFiles):  # one work item per file, read by the stage's actor itself (a read
            # task per file costs a task's scheduling each: seconds a stage on small corpora)
            ds = ray.data.from_items([{"path": p} for p in rows.paths], override_num_blocks=max(1, len(rows.paths)))
            return ds, 1
        # a list (a grouped stage's rows, or a direct caller's): one item per batch the stage forms itself, so a
        # whole group always reaches one worker
        payload = [{"payload": json.dumps(b, default=str)} for b in stage.batches(rows)]
        return ray.data.from_items(payload, override_num_blocks=max(1, min(len(payload), 64))), 1

    def _map(self, ds: Any, stage: Stage[Any], run_dir: Path, batch_size: int, share: float, nxt: Any) -> Any:
        """Add one stage's actor pool to the dataset. `share` scales its CPU request: stages streaming together
        share the cluster, and pools whose minimum sizes do not fit would wait for each other forever."""
        worker = type(f"stage_{stage.name}", (_RayStageWorker,), {"__module__": __name__})
        args = (stage.name, stage.config.portable_dump(), str(run_dir), nxt)
        return self._pool(ds, stage.name, stage.resources(), worker, args, batch_size, share)

    def _map_fused(
        self, ds: Any, stages: list[Stage[Any]], run_dir: Path, batch_size: int, share: float, nxts: list[Any]
    ) -> Any:
        """Add one actor pool that runs `stages` (none asking for a GPU) one after another on each batch."""
        names = [s.name for s in stages]
        worker = type("stage_" + "+".join(names), (_RayFusedWorker,), {"__module__": __name__})
        sizes = [s.resources().batch_size for s in stages]
        args = (names, [s.config.portable_dump() for s in stages], str(run_dir), nxts, sizes)
        return self._pool(ds, "+".join(names), fused_resources(stages), worker, args, batch_size, share)

    def _pool(
        self, ds: Any, name: str, res: Resources, worker: type, args: tuple, batch_size: int, share: float
    ) -> Any:
        import ray
        from ray.data import ActorPoolStrategy

        cluster = ray.cluster_resources()
        if res.gpus and not cluster.get("GPU"):  # Ray would wait for a GPU forever
            raise ConfigError(
                f"stage {name!r} asks for {res.gpus:g} GPU per worker (its backend needs one) but the Ray "
                f"cluster has none: run on a cluster with GPUs, or set {name}.resources.gpus: 0 to run it "
                "on CPU"
            )
        total_cpus = float(cluster.get("CPU", 1))
        cpus = res.cpus * share
        # Leave Ray Data's own tasks a CPU: a pool that holds every CPU deadlocks a 2-core machine.
        pool_max = max(1, min(res.pool_max, int((total_cpus - 0.5) / max(cpus, 0.01)) if cpus else res.pool_max))
        if res.gpus:  # never more GPU workers than the cluster has GPUs for
            pool_max = max(1, min(pool_max, int(float(cluster["GPU"]) / res.gpus + 1e-9)))
        pool_min = min(res.pool_min, pool_max)
        return ds.map_batches(
            worker,
            fn_constructor_args=args,
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=pool_min, max_size=pool_max),
            num_cpus=cpus,
            num_gpus=res.gpus or None,
        )

    def run(
        self,
        stage_cls: type[Stage[Any]],
        cfg: StageConfig,
        rows: list[Row] | InputFiles,
        run_dir: Path,
        progress: Progress | None = None,
    ) -> dict[str, float]:
        self._init()
        stage = stage_cls(cfg)
        ds, batch_size = self._dataset(stage, rows)
        ds = self._map(ds, stage, run_dir, batch_size, 1.0, None)
        stats = self._collect(ds, [stage.name], {stage.name: progress})[stage.name]
        stats.pop("inputs")
        return stats

    def run_chain(
        self,
        stages: list[tuple[type[Stage[Any]], StageConfig]],
        rows: InputFiles,
        run_dir: Path,
        progress: dict[str, Progress | None] | None = None,
        reads: dict[str, tuple[str, ...]] | None = None,
        fuse: bool = False,
    ) -> dict[str, dict[str, float]]:
        """Stream the rows through every stage in `stages` (none grouped) in one Ray Data pipeline: a GPU stage works
        while the CPU stages before it still do, and each stage writes its manifest part per batch as in `run`.
        `reads`: the upstream columns each stage reads (`Pipeline.reads`; default its `requires`), which the rows
        handed to it are fingerprinted over. `fuse`: consecutive stages that ask for no GPU share one actor pool
        (`_RayFusedWorker`)."""
        import ray

        self._init()
        built = [cls(cfg) for cls, cfg in stages]
        if any(s.grouping() is not None for s in built):
            raise ValueError("a grouped stage needs all its rows at once; it cannot stream")
        units = fusion_units(built, fuse)
        pools = [fused_resources([built[i] for i in u]) for u in units]
        total_cpus = float(ray.cluster_resources().get("CPU", 1))
        floor = sum(r.cpus * r.pool_min for r in pools)
        share = min(1.0, (total_cpus - 0.5) / floor) if floor else 1.0
        ds, first_batch = self._dataset(built[0], rows)
        # Small blocks: an actor pool hands out whole blocks, so one block holding a whole batch of a cheap stage
        # (16 captions, a video's clips) would put all of a slow next stage's rows (subjects, 1 a batch) on one actor.
        ds.context.target_max_block_size = CHAIN_BLOCK_BYTES

        def nxt(i: int) -> tuple[str, list[str]] | None:
            if i + 1 >= len(built):
                return None
            after = built[i + 1]
            return after.name, list((reads or {}).get(after.name, after.requires))

        for j, unit in enumerate(units):
            size = first_batch if j == 0 else built[unit[0]].resources().batch_size
            if len(unit) == 1:
                ds = self._map(ds, built[unit[0]], run_dir, size, share, nxt(unit[0]))
            else:
                ds = self._map_fused(ds, [built[i] for i in unit], run_dir, size, share, [nxt(i) for i in unit])
        return self._collect(ds, [s.name for s in built], progress or {})

    @staticmethod
    def _collect(ds: Any, names: list[str], progress: dict[str, Progress | None]) -> dict[str, dict[str, float]]:
        """Drain the pipeline, turning the workers' summaries into per-stage counts; a fatal one raises."""
        stats = {n: {"inputs": 0.0, "rows": 0.0, "ok": 0.0, "reject": 0.0, "error": 0.0, "busy_s": 0.0} for n in names}
        peak: dict[str, dict[int, float]] = {n: {} for n in names}
        batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None))
        fatal = ""
        for batch in batches:
            for kind, p in zip(batch.column("kind").to_pylist(), batch.column("payload").to_pylist(), strict=True):
                if kind != "summary":
                    continue
                summary = json.loads(p)
                if summary["fatal"]:
                    fatal = summary["fatal"]
                    break
                name = summary["stage"]
                st = stats[name]
                for k in ("ok", "reject", "error"):
                    st[k] += summary[k]
                st["rows"] += summary["ok"] + summary["reject"] + summary["error"]
                st["inputs"] += summary["n_in"]
                st["busy_s"] += summary.get("busy_s", 0.0)
                peak[name][summary["pid"]] = max(peak[name].get(summary["pid"], 0.0), summary["rss_mb"])
                if (bar := progress.get(name)) is not None:
                    bar(int(summary["n_in"]))
            if fatal:
                break
        if fatal:  # stop the pipeline now (its operators shut down here, not at exit), then end the run
            close = getattr(batches, "close", None)
            if close is not None:
                close()
            _raise_fatal(fatal)
        for n in names:
            stats[n]["workers"] = len(peak[n])
            stats[n]["peak_worker_rss_mb"] = max(peak[n].values(), default=0.0)
        return stats


def make_runner(kind: str, address: str | None = None, num_cpus: float | None = None) -> Runner:
    """`local` runs in-process whatever `ray.address` says: a stage rerun with `--runner local` on a run made on a
    cluster must not try to join that cluster."""
    if kind == "local":
        return LocalRunner()
    return RayRunner(address=address, num_cpus=num_cpus)
