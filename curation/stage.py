"""The whole extension surface: one `Stage` base class, its declared resources and the registry."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from curation.errors import ConfigError

log = logging.getLogger(__name__)

Row = dict[str, Any]
# Errors of the storage, not of an item: every later write would fail too, so they end the run instead of
# becoming error rows (the CLI reports them in one line; finished work is kept for the rerun).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def is_storage_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


Status = Literal["ok", "reject", "error"]
STATUSES: tuple[str, ...] = ("ok", "reject", "error")
_NAME_RE = re.compile(r"^[a-z][a-z0-9]*$")


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
    resources: ResourcesOverride | None = None


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


C = TypeVar("C", bound=StageConfig)


class Stage(Generic[C]):
    """One pipeline step. Subclasses set the class vars and implement `process_batch`.

    Contract: `process_batch` returns one row per input row (only a `fan_out` stage such as scene cut may return
    several or none per input), never raises for a bad item (it returns a row with `<name>_status = "error"`), and
    never drops rows: the runner filters after the manifest is written.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    config_class: ClassVar[type[StageConfig]] = StageConfig
    resources: ClassVar[Resources] = Resources()
    input_key: ClassVar[str] = "clip_id"  # key of the rows this stage consumes
    output_key: ClassVar[str] = "clip_id"  # key of the rows it writes (differs only for fan-out stages)
    fan_out: ClassVar[bool] = False
    level: ClassVar[Literal["video", "clip"]] = "clip"
    # Columns other SQL relies on ({name: DuckDB type}); a table whose parts lack one (every row an error) gets it
    # as NULLs, so the views still bind.
    columns: ClassVar[dict[str, str]] = {}
    # A filter's headline score column: its `<name>_` columns go to the shard json's scores, and the report draws
    # a histogram of this one. None for stages that produce metadata, geometry or text.
    score_column: ClassVar[str | None] = None
    # Fields of a scoring stage that are payload, not scores (JSON, paths): kept out of the shard json's scores.
    not_scores: ClassVar[tuple[str, ...]] = ()
    workdir: Path | None = None  # the run directory, set by the runner before `setup`; artifacts go under it

    def __init__(self, config: C | None = None) -> None:
        self.config: C = config if config is not None else self.config_class()  # type: ignore[assignment]
        self.stats: dict[str, float] = {"rows": 0, "ok": 0, "reject": 0, "error": 0, "seconds": 0.0}
        self._ready = False

    # -- hooks -----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load models once per worker. Optional."""

    def process_batch(self, batch: list[Row]) -> list[Row]:
        raise NotImplementedError

    def finalize(self, run_dir: Path) -> None:
        """Called once in the driver after every batch of a stage run is in the manifest. Optional."""

    # -- provided --------------------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """Which implementation produced the scores; recorded in every row."""
        return str(getattr(self.config, "backend", "builtin"))

    @property
    def config_hash(self) -> str:
        payload = json.dumps(self.config.model_dump(mode="json"), sort_keys=True)
        return hashlib.blake2b(payload.encode(), digest_size=6).hexdigest()

    def col(self, field: str) -> str:
        return f"{self.name}_{field}"

    def row(
        self, key_row: Row, status: Status, reason: str | None = None, error: str | None = None, **scores: Any
    ) -> Row:
        """Build an output row: the keys of `key_row`, the status columns and the `<name>_`-prefixed scores."""
        keys = ("video_id", "clip_id") if self.fan_out else (self.output_key,)
        out: Row = {k: key_row.get(k) for k in keys}
        out[self.col("status")] = status
        out[self.col("reason")] = reason
        out[self.col("error")] = error
        for k, v in scores.items():
            out[self.col(k)] = v
        return out

    def error_row(self, key_row: Row, exc: BaseException | str) -> Row:
        msg = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        return self.row(key_row, "error", reason="exception", error=str(msg)[:2000])

    def run_batch(self, batch: list[Row]) -> list[Row]:
        """`process_batch` plus the bookkeeping every stage shares: setup once, timing, provenance columns, and a
        per-row fallback so one bad item cannot take its batch down."""
        if not self._ready:
            self.setup()
            self._ready = True
        t0 = time.perf_counter()
        try:
            out = self.process_batch(batch)
        except Exception as exc:  # a bug or an unexpected input: retry row by row to isolate it
            if is_storage_error(exc):
                raise
            log.warning("stage %s: batch failed (%s), retrying %d rows one by one", self.name, exc, len(batch))
            out = []
            for r in batch:
                try:
                    out.extend(self.process_batch([r]))
                except Exception as row_exc:  # recorded as data, never raised
                    if is_storage_error(row_exc):
                        raise
                    out.append(self.error_row(r, row_exc))
        if not self.fan_out and len(out) != len(batch):
            raise RuntimeError(f"stage {self.name} returned {len(out)} rows for {len(batch)} inputs")
        ts = time.time()
        for r in out:
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
_REGISTRY: dict[str, type[Stage[Any]]] = {}


def register(cls: type[Stage[Any]]) -> type[Stage[Any]]:
    """Class decorator: make a stage known to the CLI, config loader and runners under its one name."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise TypeError(f"{cls.__qualname__}.name must be a lowercase identifier without underscores, got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise TypeError(f"two stages are named {name!r}: {_REGISTRY[name].__qualname__} and {cls.__qualname__}")
    if not getattr(cls, "version", None):
        raise TypeError(f"{cls.__qualname__}.version is required")
    _REGISTRY[name] = cls
    return cls


def registry() -> dict[str, type[Stage[Any]]]:
    import stages  # noqa: F401  (importing the package registers the built-in stages)

    return dict(_REGISTRY)


def get_stage(name: str) -> type[Stage[Any]]:
    reg = registry()
    if name not in reg:
        raise ConfigError(f"unknown stage {name!r}; known stages: {', '.join(reg)}")
    return reg[name]


def batched(rows: list[Row], size: int) -> Iterator[list[Row]]:
    for i in range(0, len(rows), max(1, size)):
        yield rows[i : i + size]
