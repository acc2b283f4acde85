"""The whole extension surface: the `Stage` base class, what a stage declares, and the registry of stages.

Stages are found through the `curation.stages` entry-point group (built-ins and third-party packages alike), so a
package adds a stage with one module and one line in its pyproject. Stage modules must import cheaply: heavy
libraries (PyAV, OpenCV, models) are imported in `setup` or inside the functions that use them, because the core
loads every stage class to build views, shards and the CLI.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from curation.errors import ConfigError
from curation.logs import tame_third_party

log = logging.getLogger(__name__)

Row = dict[str, Any]
ENTRY_POINT_GROUP = "curation.stages"
# Errors of the storage, not of an item: every later write would fail too, so they end the run instead of
# becoming error rows (the CLI reports them in one line; finished work is kept for the rerun).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def is_storage_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


def is_fatal(exc: BaseException) -> bool:
    """Errors that end the run instead of becoming a row: bad configuration, a full or read-only disk."""
    return isinstance(exc, ConfigError) or is_storage_error(exc)


Status = Literal["ok", "reject", "error"]
STATUSES: tuple[str, ...] = ("ok", "reject", "error")
_NAME_RE = re.compile(r"^[a-z][a-z0-9]*$")


class Kind(StrEnum):
    """What a stage consumes and produces: the one declaration that replaces keys, fan-out and level."""

    VIDEO = "video"  # one row per input video in, one out (keyed by video_id)
    SPLIT = "split"  # one video in, its clips out (video_id + clip_id); one video-level row when it fails
    CLIP = "clip"  # one clip in, one out (keyed by clip_id)


# What a SPLIT stage writes for every clip (prefixed with its name); the `clips` view exposes them as `clip_<field>`
# so downstream stages and the core read clip geometry without knowing which stage cut the video.
CLIP_FIELDS: dict[str, str] = {
    "start_frame": "BIGINT",
    "end_frame": "BIGINT",
    "num_frames": "BIGINT",
    "fps": "DOUBLE",
    "start_s": "DOUBLE",
    "end_s": "DOUBLE",
    "duration_s": "DOUBLE",
    "rotation": "BIGINT",
    "ts_regular": "BOOLEAN",
    "samples_path": "VARCHAR",
}


def operational(default: Any = None, **kwargs: Any) -> Any:
    """A config field that changes how a stage runs, not what it computes (resources, paths, endpoints, threads,
    timeouts): left out of `config_hash`, so changing it never makes finished rows stale."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {})
    extra["operational"] = True
    if "default_factory" in kwargs:
        return Field(json_schema_extra=extra, **kwargs)
    return Field(default, json_schema_extra=extra, **kwargs)


def fingerprint_sql(requires: tuple[str, ...] | list[str]) -> str:
    """DuckDB expression over the columns a stage declares it reads: stored as `<stage>_upstream`, so a row counts as
    done only while those upstream values are unchanged. The pipeline's selection and the streaming chain (which
    fingerprints rows between stages, in the worker) use this one expression, so the two agree."""
    parts = [f"coalesce(CAST(\"{c}\" AS VARCHAR), '')" for c in requires]
    return f"md5(concat_ws('|', {', '.join(parts)}))" if parts else "md5('')"


def is_operational(model: type[BaseModel], name: str) -> bool:
    extra = model.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("operational"))


class ResourcesOverride(BaseModel):
    """Per-run override of a stage's declared resources (e.g. bigger pools on a cluster)."""

    model_config = ConfigDict(extra="forbid")
    cpus: float | None = Field(None, gt=0)
    gpus: float | None = Field(None, ge=0)
    batch_size: int | None = Field(None, ge=1)
    pool_min: int | None = Field(None, ge=1)
    pool_max: int | None = Field(None, ge=1)


class StageConfig(BaseModel):
    """Base of every stage's config section. Unknown keys are errors, so typos fail early."""

    model_config = ConfigDict(extra="forbid")
    resources: ResourcesOverride | None = operational(None, description="override the stage's declared resources")

    def result_fields(self) -> dict[str, Any]:
        """The fields that change results: what `config_hash` covers."""
        dump = self.model_dump(mode="json")
        return {k: v for k, v in dump.items() if not is_operational(type(self), k)}

    def portable_dump(self) -> dict[str, Any]:
        """The settings as saved with a run and sent to workers: a `models_dir` the config did not name is left out,
        since where weights live is a property of each machine ($CURATION_MODELS there), not of the run."""
        data = self.model_dump(mode="json")
        if "models_dir" in data and "models_dir" not in self.model_fields_set:
            del data["models_dir"]
        return data


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs; the Ray runner turns this into an actor pool.

    `cpus` is fractional on purpose: on a 2-core machine whole-CPU actors starve Ray Data's own tasks.
    """

    cpus: float = 0.5
    gpus: float = 0.0
    batch_size: int = 4
    pool_min: int = 1
    pool_max: int = 2


@dataclass
class StageContext:
    """What a worker gives its stage: where the run lives, and how many native threads it may use (None: the
    libraries' default, a thread per core, where stages run one at a time in-process)."""

    run_dir: Path = field(default_factory=lambda: Path("."))
    threads: int | None = None

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)


C = TypeVar("C", bound=StageConfig)


class Stage(ABC, Generic[C]):
    """One pipeline step. A subclass sets the class declarations and implements `process`.

    Contract: `process` returns the output row(s) for one input row, built with `self.row(...)`: one row for VIDEO
    and CLIP stages, a list of clip rows for a SPLIT stage. A bad item is a row with status `error` (an exception
    raised by `process` becomes one, in `process_batch`); only `ConfigError` and storage errors end the run. Rows
    are never dropped: the runner filters after the manifest is written.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    kind: ClassVar[Kind] = Kind.CLIP
    config_class: ClassVar[type[StageConfig]] = StageConfig
    # Upstream columns `process` reads; checked before the stage runs, with a message naming what is missing.
    requires: ClassVar[tuple[str, ...]] = ()
    # Upstream columns `process` reads when a stage before it in `stages` wrote them (`<stage>_...`), and goes
    # without otherwise; part of the upstream fingerprint when read (`Pipeline.reads`).
    optional_requires: ClassVar[tuple[str, ...]] = ()
    default_resources: ClassVar[Resources] = Resources()
    # GPUs one worker needs per backend value (`config.backend`): a reference backend asks Ray for them.
    gpu_backends: ClassVar[dict[str, float]] = {}
    # Columns other SQL relies on ({name: DuckDB type}); a table whose parts lack one (every row an error) gets it
    # as NULLs, so the views still bind.
    columns: ClassVar[dict[str, str]] = {}
    # A filter's headline score column: its `<name>_` columns go to the shard json's scores, and the report draws
    # a histogram of this one. None for stages that produce metadata, geometry or text.
    score_column: ClassVar[str | None] = None
    # Fields of a scoring stage that are payload, not scores (JSON, paths): kept out of the shard json's scores.
    not_scores: ClassVar[tuple[str, ...]] = ()
    # A stage whose rows decide together (identity across a video's clips, duplicates across the run) groups them:
    # "video_id" (a video's rows) or "run" (every row); see `grouping` and `process_group`.
    group_by: ClassVar[str | None] = None

    def __init__(self, config: C | None = None) -> None:
        self.config: C = config if config is not None else self.config_class()  # type: ignore[assignment]
        self.ctx = StageContext()
        self.stats: dict[str, float] = {"rows": 0, "ok": 0, "reject": 0, "error": 0, "seconds": 0.0}
        self._ready = False

    # -- declarations derived from `kind` --------------------------------------------------------------------
    @classmethod
    def key(cls) -> str:
        """The column the stage's input rows (and its manifest attempts) are keyed by."""
        return "clip_id" if cls.kind == Kind.CLIP else "video_id"

    @classmethod
    def output_keys(cls) -> tuple[str, ...]:
        return {Kind.VIDEO: ("video_id",), Kind.SPLIT: ("video_id", "clip_id"), Kind.CLIP: ("clip_id",)}[cls.kind]

    @classmethod
    def declared_columns(cls) -> dict[str, str]:
        """The bookkeeping columns every stage writes, `columns`, and the clip geometry every SPLIT stage writes."""
        names = ("status", "reason", "error", "backend", "version", "config_hash", "upstream")
        out = {f"{cls.name}_{c}": "VARCHAR" for c in names}
        out.update(cls.columns)
        if cls.kind == Kind.SPLIT:
            out.update({f"{cls.name}_{k}": t for k, t in CLIP_FIELDS.items()})
        return out

    def bind(self, run_dir: str | Path, threads: int | None = None) -> Stage[C]:
        """Tell the stage where its run lives (before `setup`)."""
        self.ctx = StageContext(Path(run_dir), threads)
        return self

    # -- hooks -----------------------------------------------------------------------------------------------
    def resources(self) -> Resources:
        """Declared resources for this config: GPUs for a backend that needs them, then the `resources` section."""
        res = self.default_resources
        gpus = self.gpu_backends.get(str(getattr(self.config, "backend", "")))
        if gpus:
            res = replace(res, gpus=gpus)
        over = self.config.resources
        if over:
            res = replace(res, **{k: v for k, v in over.model_dump().items() if v is not None})
        return res

    def setup(self, ctx: StageContext) -> None:
        """Load models once per worker. Optional."""

    @abstractmethod
    def process(self, row: Row) -> Row | list[Row]:
        """The work: one input row -> its output row (a SPLIT stage: a list of clip rows)."""

    def fusible(self) -> bool:
        """Whether this config's work may share an actor pool with the CPU stages beside it (`ray.fuse`). A stage
        that waits on a server says no: its batch is a set of concurrent requests and its pool is sized for the
        server, which a fused pool (small batches, the CPU stages' pool size) would undo."""
        return True

    def grouping(self) -> str | None:
        """How rows are grouped for this config: None (row by row), "video_id" or "run". The runners hand a grouped
        stage one whole group per batch, and a rerun redoes a whole group when any member needs it."""
        return self.group_by

    def process_group(self, rows: list[Row]) -> list[Row]:
        """A grouped stage's work: every row of one group -> one output row each, in order. The default runs
        `process` row by row."""
        return [self.process(r) for r in rows]  # type: ignore[misc]

    def batches(self, rows: list[Row]) -> Iterator[list[Row]]:
        """The batches the runners hand to `run_batch`: `batch_size` rows, or one group per batch."""
        g = self.grouping()
        if g is None:
            yield from batched(rows, self.resources().batch_size)
            return
        groups: dict[Any, list[Row]] = {}
        for r in rows:
            groups.setdefault(r.get(g) if g != "run" else None, []).append(r)
        yield from groups.values()

    def process_batch(self, batch: list[Row]) -> list[Row]:
        """`process` over a batch, each item's failure captured as its own error row. Override to batch model calls
        (then a failure that escapes makes every row of the batch an error row). A grouped stage gets one group
        and runs `process_group` on it; if that raises, every row of the group is an error row."""
        if self.grouping() is not None:
            try:
                return self.process_group(batch)
            except Exception as exc:
                if is_fatal(exc):
                    raise
                return [self.error_row(r, exc) for r in batch]
        out: list[Row] = []
        for r in batch:
            try:
                res = self.process(r)
            except Exception as exc:
                if is_fatal(exc):
                    raise
                res = self.error_row(r, exc)
            if isinstance(res, list):
                out.extend(res)
            else:
                out.append(res)
        return out

    def finalize(self, ctx: StageContext) -> None:
        """Called once in the driver after every batch of a stage run is in the manifest. Optional."""

    # What the stage adds to a packaged sample, to the report, from its own columns of a clip row. Optional.
    def shard_fields(self, row: Row) -> dict[str, Any]:
        """Entries of the shard's per-sample json."""
        return {}

    def shard_members(self, row: Row) -> list[tuple[str, bytes]]:
        """(member suffix, bytes) files of the sample, e.g. ("mp4", ...) or ("masks.json", ...)."""
        return []

    def draw(self, row: Row, frame: int, image: Any) -> None:
        """Draw the stage's findings for source frame `frame` onto a BGR thumbnail (in place)."""

    def describe(self, row: Row) -> str | None:
        """One line about the clip for the report's sample cards."""
        return None

    def gallery(self, row: Row) -> list[tuple[str, str, bytes]]:
        """(label, mime type, bytes) images about the clip for the report's cards (e.g. reference crops)."""
        return []

    def thresholds(self) -> dict[str, list[tuple[float, str]]]:
        """{score column: [(value, "min" | "max"), ...]}: where the stage's keep/reject lines are, for the report."""
        return {}

    # -- provided --------------------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """Which implementation produced the scores; recorded in every row."""
        return str(getattr(self.config, "backend", "builtin"))

    def hash_extra(self) -> str:
        """Inputs besides the config that change results (e.g. prompt text). Part of `config_hash`."""
        return ""

    @property
    def config_hash(self) -> str:
        payload = json.dumps(self.config.result_fields(), sort_keys=True) + self.hash_extra()
        return hashlib.blake2b(payload.encode(), digest_size=6).hexdigest()

    def col(self, field: str) -> str:
        return f"{self.name}_{field}"

    def row(
        self, key_row: Row, status: Status, reason: str | None = None, error: str | None = None, **scores: Any
    ) -> Row:
        """Build an output row: the keys of `key_row`, the status columns and the `<name>_`-prefixed scores."""
        out: Row = {k: key_row.get(k) for k in self.output_keys()}
        out[self.col("status")] = status
        out[self.col("reason")] = reason
        out[self.col("error")] = error
        for k, v in scores.items():
            out[self.col(k)] = v
        return out

    def error_row(self, key_row: Row, exc: BaseException | str) -> Row:
        """An error row for an input row (a SPLIT stage's is video-level: `clip_id` null)."""
        msg = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        if self.kind == Kind.SPLIT:
            key_row = {"video_id": key_row.get("video_id"), "clip_id": None}
        return self.row(key_row, "error", reason="exception", error=str(msg)[:2000])

    def run_batch(self, batch: list[Row]) -> list[Row]:
        """`process_batch` plus what every stage shares: setup once, timing, provenance columns, the row contract."""
        if not self._ready:
            self.setup(self.ctx)
            self._ready = True
            tame_third_party()  # libraries loaded in setup may have added console handlers
        t0 = time.perf_counter()
        try:
            out = self.process_batch(batch)
        except Exception as exc:  # escaped an overridden process_batch: the batch's rows, not the run, fail
            if is_fatal(exc):
                raise
            log.warning("stage %s: batch of %d failed: %s", self.name, len(batch), exc)
            out = [self.error_row(r, exc) for r in batch]
        if self.kind != Kind.SPLIT and len(out) != len(batch):
            raise RuntimeError(f"stage {self.name} returned {len(out)} rows for {len(batch)} inputs")
        ts = time.time()
        key = self.key()
        upstream = {r.get(key): r.get("_upstream") for r in batch}  # what the pipeline fingerprinted per input
        for r in out:
            r[self.col("upstream")] = upstream.get(r.get(key))
            r[self.col("backend")] = self.backend
            r[self.col("version")] = self.version
            r[self.col("config_hash")] = self.config_hash
            r[self.col("ts")] = ts
            status = r.get(self.col("status"))
            if status not in STATUSES:
                raise RuntimeError(f"stage {self.name} wrote status {status!r}; expected one of {STATUSES}")
            self.stats[status] += 1
        self.stats["rows"] += len(out)
        self.stats["seconds"] += time.perf_counter() - t0
        return out


# -- registry --------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Stage[Any]]] | None = None


def check_stage_class(cls: Any, name: str) -> type[Stage[Any]]:
    """A registered class must be a Stage whose declarations hold; raises ConfigError saying what to fix."""
    where = f"entry point {name!r} ({getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)!s})"
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise ConfigError(f"{where} is not a curation.stage.Stage subclass")
    if getattr(cls, "name", None) != name or not _NAME_RE.match(name):
        raise ConfigError(
            f"{where}: the class's name is {getattr(cls, 'name', None)!r}; it must equal the entry point's name "
            "and be a lowercase identifier without underscores"
        )
    if not getattr(cls, "version", None):
        raise ConfigError(f"{where}: set `version` (bump it when the stage's logic changes)")
    if not isinstance(cls.kind, Kind):
        raise ConfigError(f"{where}: kind must be a curation.stage.Kind, got {cls.kind!r}")
    bad = [c for c in [*cls.columns, cls.score_column] if c is not None and not c.startswith(f"{name}_")]
    if bad:
        raise ConfigError(f"{where}: declared columns must start with {name + '_'!r}: {bad}")
    return cls


def registry() -> dict[str, type[Stage[Any]]]:
    """Every stage installed (entry-point group `curation.stages`), by name, in name order."""
    global _REGISTRY
    if _REGISTRY is None:
        found: dict[str, type[Stage[Any]]] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                cls = ep.load()
            except Exception as exc:
                raise ConfigError(
                    f"stage {ep.name!r} ({ep.value}) failed to import: {type(exc).__name__}: {exc}; "
                    f"reinstall or uninstall the package that provides it"
                ) from exc
            check_stage_class(cls, ep.name)
            if ep.name in found and found[ep.name] is not cls:
                raise ConfigError(
                    f"two installed stages are named {ep.name!r}: {found[ep.name].__module__} and {cls.__module__}"
                )
            found[ep.name] = cls
        if not found:
            raise ConfigError(
                "no stages are installed: install the project (pip install -e .) so its entry points exist"
            )
        _REGISTRY = dict(sorted(found.items()))
    return dict(_REGISTRY)


def get_stage(name: str) -> type[Stage[Any]]:
    reg = registry()
    if name not in reg:
        raise ConfigError(f"unknown stage {name!r}; installed stages: {', '.join(reg)}")
    return reg[name]


def batched(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    """Lists of up to `size` rows, in order; takes any iterable (a generator is read as it goes)."""
    it = iter(rows)
    while chunk := list(itertools.islice(it, max(1, size))):
        yield chunk
