"""Orchestration: ingest, then each configured stage over the rows its upstream stages kept.

Which rows a stage gets is a query over the manifests (DESIGN: reruns are queries, not code paths): the rows every
earlier stage said ok to, minus those this stage already has, unless `rerun` asks for failed, stale or all rows.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from curation.config import PipelineConfig
from curation.errors import ConfigError
from curation.ingest import discover
from curation.logs import logging_to
from curation.manifest import Manifests, atomic_write_bytes
from curation.runners import Progress, Runner, make_runner
from curation.stage import Kind, Row, Stage, StageContext, registry

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
        self.run_dir = Path(run_dir)
        self.manifests = Manifests(self.run_dir)

    # -- set-up ---------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the run directory and save the effective config next to the manifests (once per pipeline)."""
        if getattr(self, "_prepared", False):
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"cannot write to run directory {str(self.run_dir)!r}: {exc.strerror or exc}") from None
        atomic_write_bytes(self.run_dir / "config.yaml", yaml.safe_dump(self.cfg.dump(), sort_keys=False).encode())
        self._prepared = True

    def ingest(self, spec: str | None) -> int:
        """Record new input videos; returns how many were new. Known videos keep their first row."""
        if spec is None:
            if not self.manifests.has("ingest"):
                raise ConfigError("no input: pass --input FOLDER|GLOB|LIST (or set `input:` in the config)")
            return 0
        rows = discover(spec)
        known = {r["video_id"] for r in self.manifests.rows("SELECT video_id FROM ingest")}
        new = [r for r in rows if r["video_id"] not in known]
        ts = time.time()
        for r in new:
            r["ingest_ts"] = ts
        self.manifests.write("ingest", new)
        return len(new)

    # -- selection ------------------------------------------------------------------------------------------
    def _upstream(self, name: str) -> list[str]:
        stages = self.cfg.stages
        return stages[: stages.index(name)] if name in stages else list(stages)

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
        parts = [f"coalesce(CAST({c} AS VARCHAR), '')" for c in cls.requires]
        fingerprint = f"md5(concat_ws('|', {', '.join(parts)}))" if parts else "md5('')"
        base = f"SELECT *, {fingerprint} AS _upstream FROM ({self._base_sql(name, selection)})"
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
        """The columns the stage declares it reads must exist upstream; raises ConfigError naming the missing ones."""
        cls = registry()[name]
        if not cls.requires:
            return
        con = self.manifests.connect()
        try:
            have = {r[0] for r in con.execute(f"DESCRIBE {self._base_sql(name)}").fetchall()}
        finally:
            con.close()
        missing = [c for c in cls.requires if c not in have]
        if missing:
            ups = self._upstream(name)
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

    def run_stage(
        self,
        name: str,
        runner: Runner,
        rerun: Rerun = "missing",
        selection: Path | None = None,
        progress_factory: Any = None,
    ) -> StageReport:
        cls: type[Stage[Any]] = registry()[name]
        cfg = self.cfg.stage_config(name)
        self.check_requires(name)
        rows = self.inputs(name, rerun, selection)
        t0 = time.perf_counter()
        stats: dict[str, float] = {}
        if rows:
            bar = progress_factory(name, len(rows)) if progress_factory else None
            progress: Progress | None = bar.update if bar is not None else None
            try:
                stats = runner.run(cls, cfg, rows, self.run_dir, progress)
            finally:
                if bar is not None:
                    bar.close()
            self.manifests.compact(name)
        stage = cls(cfg)
        stage.finalize(StageContext(self.run_dir))
        report = StageReport(name, len(rows), time.perf_counter() - t0, stats)
        self.manifests.write(
            "stage_runs",
            [
                {
                    "run_id": uuid.uuid4().hex,
                    "stage": name,
                    "runner": getattr(runner, "name", "?"),
                    "rerun": rerun,
                    "inputs": len(rows),
                    **{k: int(stats.get(k, 0)) for k in ("ok", "reject", "error")},
                    "seconds": round(report.seconds, 3),
                    "workers": int(stats.get("workers", 0)),
                    "peak_worker_rss_mb": round(float(stats.get("peak_worker_rss_mb", 0.0)), 1),
                    "version": cls.version,
                    "config_hash": stage.config_hash,
                    "stage_runs_ts": time.time(),
                }
            ],
        )
        log.info("stage %s: %d inputs, %s in %.1fs", name, len(rows), _fmt(stats), report.seconds)
        return report

    def run(
        self, input_spec: str | None = None, rerun: Rerun = "missing", progress_factory: Any = None
    ) -> list[StageReport]:
        self.prepare()
        with logging_to(self.run_dir):
            n_new = self.ingest(input_spec)
            log.info("ingest: %d new input video(s)", n_new)
            runner = self.runner()
            return [self.run_stage(name, runner, rerun, None, progress_factory) for name in self.cfg.stages]


def _fmt(stats: dict[str, float]) -> str:
    return ", ".join(f"{k}={int(stats.get(k, 0))}" for k in ("ok", "reject", "error"))
