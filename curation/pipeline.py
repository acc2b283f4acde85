"""Orchestration: ingest, then each configured stage over the rows its upstream stages kept.

Which rows a stage gets is a query over the manifests (DESIGN: reruns are queries, not code paths): the rows every
earlier stage said ok to, minus those this stage already has, unless `rerun` asks for failed, stale or all rows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from curation.config import PipelineConfig
from curation.errors import ConfigError
from curation.ingest import iter_inputs
from curation.logs import logging_to
from curation.manifest import InputFiles, Manifests, atomic_write_bytes
from curation.runners import Progress, Runner, fusion_units, make_runner
from curation.runstore import Pusher, RunStore, register_run
from curation.stage import Kind, Row, Stage, StageContext, batched, fingerprint_sql, registry
from curation.storage import is_remote

log = logging.getLogger(__name__)

Rerun = Literal["missing", "failed", "stale", "all"]
RERUN_CHOICES = ("missing", "failed", "stale", "all")


@dataclass
class StageReport:
    name: str
    inputs: int
    seconds: float
    stats: dict[str, float] = field(default_factory=dict)


class Pipeline:
    def __init__(self, cfg: PipelineConfig, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.store: RunStore | None = None
        if is_remote(str(run_dir)):  # on object storage: work in the staging folder, push with commit records
            self.store = RunStore(str(run_dir))
            run_dir = self.store.staging
        self.run_dir = Path(run_dir)
        self.manifests = Manifests(self.run_dir)
        register_run(self.run_dir, self.store)  # artifact paths other machines recorded resolve here

    # -- set-up ---------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the run directory and save the effective config next to the manifests (once per pipeline)."""
        if getattr(self, "_prepared", False):
            return
        if self.store is not None:
            self.store.check_writable()  # wrong credentials: one line, nothing written anywhere
            self.store.pull()  # the committed state of an earlier run: a rerun resumes from it
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"cannot write to run directory {str(self.run_dir)!r}: {exc.strerror or exc}") from None
        atomic_write_bytes(self.run_dir / "config.yaml", yaml.safe_dump(self.cfg.dump(), sort_keys=False).encode())
        for old in (self.run_dir / "tmp").glob("inputs-*"):  # input files a killed driver left
            shutil.rmtree(old, ignore_errors=True)
        if self.store is not None:  # and its uploads of them for the workers
            self.store.remove_tree(self.run_dir / "tmp")
        self._prepared = True

    def check_input(self, spec: str) -> None:
        """Read the input spec through once without keeping its rows, before anything is written: an input that
        cannot be listed (wrong credentials, a typo, a malformed list) ends the run with an empty output directory.
        A remote prefix is listed (its listing and sidecar captions are read whole; `ingest` reads them again)."""
        if getattr(self, "_checked", None) == spec:
            return
        rows = iter_inputs(spec)
        if is_remote(spec):
            next(rows, None)
        else:
            for _ in rows:
                pass
        self._checked = spec

    def ingest(self, spec: str | None, chunk: int = 10_000) -> int:
        """Record new input videos, `chunk` rows at a time (the driver never holds the whole input list); returns
        how many were new. Known videos keep their first row."""
        if spec is None:
            if not self.manifests.has("ingest"):
                raise ConfigError("no input: pass --input FOLDER|GLOB|LIST (or set `input:` in the config)")
            return 0
        ts = time.time()
        total = 0
        for rows in batched(iter_inputs(spec), chunk):
            ids = [r["video_id"] for r in rows]
            sql = "SELECT video_id FROM ingest WHERE video_id IN (SELECT unnest(?::VARCHAR[]))"
            known = {r["video_id"] for r in self.manifests.rows(sql, [ids])}
            new = [r for r in rows if r["video_id"] not in known]
            for r in new:
                r["ingest_ts"] = ts
            self.manifests.write("ingest", new)
            total += len(new)
        return total

    # -- selection ------------------------------------------------------------------------------------------
    def _upstream(self, name: str) -> list[str]:
        stages = self.cfg.stages
        return stages[: stages.index(name)] if name in stages else list(stages)

    def reads(self, name: str) -> tuple[str, ...]:
        """The upstream columns the stage reads here: `requires`, and each `optional_requires` column whose stage
        runs before it in `stages`."""
        cls = registry()[name]
        ups = self._upstream(name)
        return cls.requires + tuple(c for c in cls.optional_requires if any(c.startswith(f"{u}_") for u in ups))

    def _unread(self, name: str, selection: Path | None = None) -> list[str]:
        """The stage's optional columns that the selection has but the stage must not read here (a stage after it
        in `stages` wrote them): left out of its input rows, as they are out of its fingerprint."""
        cls = registry()[name]
        extra = [c for c in cls.optional_requires if c not in self.reads(name)]
        if not extra:
            return []
        have = self._columns(name, selection)
        return [c for c in extra if c in have]

    def _columns(self, name: str, selection: Path | None = None) -> set[str]:
        """The columns of every row the stage could take (`_base_sql`)."""
        con = self.manifests.connect()
        try:
            return {r[0] for r in con.execute(f"DESCRIBE {self._base_sql(name, selection)}").fetchall()}
        finally:
            con.close()

    def _base_sql(self, name: str, selection: Path | None = None) -> str:
        """Every row the stage could take: what the earlier stages in `stages` kept (or a selection)."""
        reg = registry()
        cls = reg[name]
        ups = self._upstream(name)
        video_ups = [u for u in ups if reg[u].kind == Kind.VIDEO]
        if cls.kind != Kind.CLIP:
            sql = "SELECT i.*" + "".join(f", t{k}.* EXCLUDE (video_id)" for k in range(len(video_ups)))
            sql += " FROM ingest i" + "".join(f' JOIN "{u}" t{k} USING (video_id)' for k, u in enumerate(video_ups))
            conds = [f"t{k}.{u}_status = 'ok'" for k, u in enumerate(video_ups)]
        else:
            split = next((u for u in ups if reg[u].kind == Kind.SPLIT), None)
            if split is None:
                raise ConfigError(f"stage {name!r} works on clips: list a split stage (scenecut) before it in `stages`")
            sql = "SELECT * FROM clips"
            conds = [f"{split}_status = 'ok'"]
            if selection is not None:
                path = str(selection).replace("'", "''")
                conds.append(f"clip_id IN (SELECT clip_id FROM read_parquet('{path}'))")
            else:
                conds += [f"{u}_status = 'ok'" for u in ups if reg[u].kind == Kind.CLIP]
        where = " AND ".join(f"({c})" for c in conds)
        return f"{sql}{' WHERE ' + where if where else ''}"

    def inputs_sql(self, name: str, rerun: Rerun = "missing", selection: Path | None = None) -> tuple[str, list[Any]]:
        """The rows the stage runs on. A row counts as done only if the stage's row for it was computed from the same
        upstream values it declares it reads (`requires`, fingerprinted as `_upstream`): after a scene-cut rerun
        that rewrites a clip's samples, the filters redo that clip even though its id is unchanged."""
        cls = registry()[name]
        key = cls.key()
        drop = self._unread(name, selection)
        star = "*" + (f" EXCLUDE ({', '.join(f'{chr(34)}{c}{chr(34)}' for c in drop)})" if drop else "")
        sql = self._base_sql(name, selection)
        base = f"SELECT {star}, {fingerprint_sql(self.reads(name))} AS _upstream FROM ({sql})"
        mine = f'SELECT 1 FROM "{name}" m WHERE m.{key} = q.{key}'
        fresh = f"EXISTS ({mine} AND m.{name}_upstream IS NOT DISTINCT FROM q._upstream)"
        params: list[Any] = []
        if rerun == "missing":
            cond = f"NOT {fresh}"
        elif rerun == "failed":
            cond = f"NOT {fresh} OR EXISTS ({mine} AND m.{name}_status = 'error')"
        elif rerun == "stale":
            stage = cls(self.cfg.stage_config(name))
            cond = f"NOT {fresh} OR EXISTS ({mine} AND (m.{name}_version <> ? OR m.{name}_config_hash <> ?))"
            params += [stage.version, stage.config_hash]
        elif rerun == "all":
            cond = "true"
        else:
            raise ConfigError(f"--rerun must be one of {', '.join(RERUN_CHOICES)}, got {rerun!r}")
        group = cls(self.cfg.stage_config(name)).grouping()
        if group == "video_id":  # a group is redone whole when any member needs it
            sql = f"SELECT * FROM ({base}) q WHERE video_id IN (SELECT video_id FROM ({base}) q WHERE {cond})"
            return f"{sql} ORDER BY video_id, {key}", params
        if group == "run":
            sql = f"SELECT * FROM ({base}) q WHERE EXISTS (SELECT 1 FROM ({base}) q WHERE {cond})"
            return f"{sql} ORDER BY video_id, {key}", params
        return f"SELECT * FROM ({base}) q WHERE {cond} ORDER BY {key}", params

    def check_requires(self, name: str) -> None:
        """The columns the stage declares it reads must exist upstream; raises ConfigError naming the missing ones.
        A stage that has not run yet (a fresh run, a streaming chain) shows the columns it declares in `columns`."""
        cls = registry()[name]
        if not cls.requires:
            return
        have = self._columns(name)
        missing = [c for c in cls.requires if c not in have]
        if missing:
            ups = self._upstream(name)
            unrun = [u for u in ups if any(c.startswith(f"{u}_") for c in missing) and not self.manifests.has(u)]
            if unrun:
                raise ConfigError(
                    f"stage {name!r} reads column(s) {', '.join(missing)}, which {', '.join(unrun)} (not run yet) "
                    "does not declare: list every column other stages read in that stage's `columns`"
                )
            raise ConfigError(
                f"stage {name!r} reads column(s) {', '.join(missing)} that no stage before it in `stages` "
                f"({', '.join(ups) or 'none'}) writes; add the stage that produces them before {name!r}"
            )

    def inputs(self, name: str, rerun: Rerun = "missing", selection: Path | None = None) -> list[Row]:
        sql, params = self.inputs_sql(name, rerun, selection)
        return self.manifests.rows(sql, params)

    # -- running --------------------------------------------------------------------------------------------
    def runner(self) -> Runner:
        return make_runner(self.cfg.runner, self.cfg.ray.address, self.cfg.ray.num_cpus)

    def _target(self, runner: Runner) -> Path | str:
        """Where `runner`'s workers find the run: Ray's workers get a run on object storage as its URI (each stages
        it on its own node and pushes what it writes), the local runner the staging folder it shares with us."""
        if self.store is not None and getattr(runner, "reads_files", False):
            return self.store.uri
        return self.run_dir

    def _synced(self, runner: Runner) -> None:
        """After Ray's workers ran a stage of a run on object storage: their manifest parts, pushed from whatever
        node they ran on, brought here (the next stage's inputs and the compaction read them)."""
        if self.store is not None and getattr(runner, "reads_files", False):
            self.store.pull(("manifests/",))

    def _stage_inputs(
        self, name: str, runner: Runner, rerun: Rerun, selection: Path | None, scratch: Path, batch: int = 0
    ) -> list[Row] | InputFiles:
        """A stage's inputs: a list for the local runner and for grouped stages; for Ray's ungrouped stages,
        Parquet files under `scratch` written a batch at a time (the driver never holds the whole corpus; `batch`:
        rows a file, default the stage's batch size)."""
        stage = registry()[name](self.cfg.stage_config(name))
        if getattr(runner, "reads_files", False) and stage.grouping() is None:
            sql, params = self.inputs_sql(name, rerun, selection)
            files = self.manifests.export(sql, params, scratch, batch or stage.resources().batch_size)
            if self.store is not None:  # workers on other nodes fetch them from the store
                self.store.put_scratch(files.paths)
            return files
        return self.inputs(name, rerun, selection)

    def _drop_scratch(self, scratch: Path) -> None:
        shutil.rmtree(scratch, ignore_errors=True)
        if self.store is not None:
            self.store.remove_tree(scratch)

    def _scratch(self, name: str) -> Path:
        return self.run_dir / "tmp" / f"inputs-{name}-{uuid.uuid4().hex[:8]}"

    def run_stage(
        self,
        name: str,
        runner: Runner,
        rerun: Rerun = "missing",
        selection: Path | None = None,
        progress_factory: Any = None,
        streamed: StageReport | None = None,
    ) -> StageReport:
        """Run one stage over its inputs, then compact its table, finalize it and record the run. `streamed`: what
        a streaming chain already did for this stage; only the rows it left (a resumed run's) are run here."""
        cls: type[Stage[Any]] = registry()[name]
        cfg = self.cfg.stage_config(name)
        self.check_requires(name)
        t0 = time.perf_counter()
        stats: dict[str, float] = dict(streamed.stats) if streamed else {}
        n_in = streamed.inputs if streamed else 0
        scratch = self._scratch(name)
        try:
            rows = self._stage_inputs(name, runner, rerun, selection, scratch)
            if len(rows):
                bar = progress_factory(name, len(rows)) if progress_factory else None
                progress: Progress | None = bar.update if bar is not None else None
                try:
                    stats = _merge(stats, runner.run(cls, cfg, rows, self._target(runner), progress))
                finally:
                    if bar is not None:
                        bar.close()
                n_in += len(rows)
                self._synced(runner)
        finally:
            self._drop_scratch(scratch)
        if n_in:
            self.manifests.compact(name)
        stage = cls(cfg)
        stage.finalize(StageContext(self.run_dir))
        seconds = time.perf_counter() - t0 + (streamed.seconds if streamed else 0.0)
        report = StageReport(name, n_in, seconds, stats)
        mode = "streaming" if streamed else "stage"
        self.manifests.write(
            "stage_runs",
            [
                {
                    "run_id": uuid.uuid4().hex,
                    "stage": name,
                    "runner": getattr(runner, "name", "?"),
                    "mode": mode,
                    "rerun": rerun,
                    "inputs": n_in,
                    **{k: int(stats.get(k, 0)) for k in ("ok", "reject", "error")},
                    "seconds": round(report.seconds, 3),
                    "busy_s": round(float(stats.get("busy_s", 0.0)), 3),
                    "workers": int(stats.get("workers", 0)),
                    "peak_worker_rss_mb": round(float(stats.get("peak_worker_rss_mb", 0.0)), 1),
                    "version": cls.version,
                    "config_hash": stage.config_hash,
                    "stage_runs_ts": time.time(),
                }
            ],
        )
        log.info("stage %s: %d inputs, %s in %.1fs (%s)", name, n_in, _fmt(stats), report.seconds, mode)
        if self.store is not None:
            self.store.push()
        return report

    def pushing(self) -> Any:
        """While a run goes on, push a run on object storage every `CURATION_PUSH_SECONDS` (30)."""
        if self.store is None:
            return contextlib.nullcontext()
        return Pusher(self.store, float(os.environ.get("CURATION_PUSH_SECONDS", "30")))

    def segments(self, runner: Runner, rerun: Rerun = "missing") -> list[list[str]]:
        """The stages grouped into what runs together: on Ray (`ray.streaming`; `auto`: on a cluster with GPUs or
        several nodes; new rows only) each run of consecutive ungrouped stages streams as one chain, as long as its
        GPU pools fit together; a grouped stage (dedup, identity) needs every row of its group first, so it runs
        alone between chains. Elsewhere every stage runs alone."""
        mode = self.cfg.ray.streaming
        if not (getattr(runner, "reads_files", False) and mode and rerun == "missing"):
            return [[n] for n in self.cfg.stages]
        gpus = float(runner.cluster_gpus())  # type: ignore[attr-defined]
        if mode == "auto" and not (gpus or runner.cluster_nodes() > 1 or self.fuses(runner)):  # type: ignore[attr-defined]
            return [[n] for n in self.cfg.stages]
        reg = registry()
        out: list[list[str]] = []
        chained = False  # whether the previous stage may stream on into this one
        held = 0.0  # GPUs the current chain's smallest pools hold together
        for name in self.cfg.stages:
            stage = reg[name](self.cfg.stage_config(name))
            streams = stage.grouping() is None
            res = stage.resources()
            need = res.gpus * res.pool_min
            # GPU pools of one chain must all fit at once, or they wait for each other forever: a stage whose GPUs
            # do not fit beside the chain's starts a new chain (on one GPU: caption, then subjects)
            if streams and chained and held + need <= gpus + 1e-9:
                out[-1].append(name)
                held += need
            else:
                out.append([name])
                held = need
            chained = streams
        return out

    def fuses(self, runner: Runner) -> bool:
        """Whether a streaming chain runs its CPU stages in one pool (`ray.fuse`; auto: one node, no GPU)."""
        mode = self.cfg.ray.fuse
        if mode != "auto":
            return bool(mode)
        return not runner.cluster_gpus() and runner.cluster_nodes() <= 1  # type: ignore[attr-defined]

    def run_chain(self, names: list[str], runner: Runner, progress_factory: Any = None) -> list[StageReport]:
        """Stream new rows through `names` at once, from the first stage that has any (a resumed run's earlier
        stages may be complete), then let each stage pick up what the chain left (rows a killed run's earlier
        stages finished but later ones did not) and record it."""
        reg = registry()
        for name in names:
            self.check_requires(name)
        streamed: dict[str, StageReport] = {}
        fuse = self.fuses(runner)
        for start, first in enumerate(names):
            scratch = self._scratch(first)
            chain = names[start:]
            batch = 0
            if fuse:  # a fused pool's work item is a file: the finest batch of its stages spreads it over the pool
                built = [reg[n](self.cfg.stage_config(n)) for n in chain]
                batch = min(built[i].resources().batch_size for i in fusion_units(built, True)[0])
            try:
                rows = self._stage_inputs(first, runner, "missing", None, scratch, batch)
                if not len(rows):
                    continue
                t0 = time.perf_counter()
                bars: dict[str, Any] = {}
                for n in chain if progress_factory else ():  # a later stage's total is not known up front
                    if (bar := progress_factory(n, len(rows) if n == first else None)) is not None:
                        bars[n] = bar
                try:
                    stats = runner.run_chain(  # type: ignore[attr-defined]
                        [(reg[n], self.cfg.stage_config(n)) for n in chain],
                        rows,
                        self._target(runner),
                        {n: b.update for n, b in bars.items()},
                        reads={n: self.reads(n) for n in chain},
                        fuse=fuse,
                    )
                finally:
                    for b in bars.values():
                        b.close()
                seconds = time.perf_counter() - t0
                streamed = {n: StageReport(n, int(stats[n].pop("inputs", 0)), seconds, stats[n]) for n in chain}
                self._synced(runner)
                break
            finally:
                self._drop_scratch(scratch)
        return [self.run_stage(n, runner, "missing", None, progress_factory, streamed.get(n)) for n in names]

    def run(
        self, input_spec: str | None = None, rerun: Rerun = "missing", progress_factory: Any = None
    ) -> list[StageReport]:
        if input_spec is not None:
            self.check_input(input_spec)
        self.prepare()
        runner = self.runner()  # before anything is ingested: a cluster this run directory cannot work on stops here
        with logging_to(self.run_dir):
            with self.pushing():
                n_new = self.ingest(input_spec)
                log.info("ingest: %d new input video(s)", n_new)
                reports: list[StageReport] = []
                for seg in self.segments(runner, rerun):
                    if len(seg) == 1:
                        reports.append(self.run_stage(seg[0], runner, rerun, None, progress_factory))
                    else:
                        reports.extend(self.run_chain(seg, runner, progress_factory))
            if self.store is not None:  # the workers' per-batch commit records, folded now that none is written
                self.store.compact_records()
            return reports


def _merge(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Counts of two runs of a stage added; peaks and worker counts the larger of the two."""
    out = dict(a)
    for k, v in b.items():
        out[k] = max(out.get(k, 0.0), v) if k in ("workers", "peak_worker_rss_mb") else out.get(k, 0.0) + v
    return out


def _fmt(stats: dict[str, float]) -> str:
    return ", ".join(f"{k}={int(stats.get(k, 0))}" for k in ("ok", "reject", "error"))
