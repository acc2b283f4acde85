"""Parquet manifests: one table per stage, written as atomic part files, read through DuckDB views.

Layout: `<run>/manifests/<table>/part-*.parquet`. Part files are only ever added (temp file + rename), so a run that
is killed leaves whole parts and a rerun resumes from them; the views (templates in `curation/sql/`, filled in from
the stages' declarations) make the newest attempt per key win, and `compact` folds a table back into one part.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from string import Template
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from curation.stage import CLIP_FIELDS, Kind, Row, registry

log = logging.getLogger(__name__)

SQL_DIR = Path(__file__).resolve().parent / "sql"
BOOKKEEPING = ("status", "reason", "error", "backend", "version", "config_hash", "upstream", "ts")
# Tables that are not stages: (key their newest attempt is chosen by, timestamp column).
SPECIAL_TABLES = {
    "ingest": ("video_id", "ingest_ts"),
    "shards": ("clip_id", "shards_ts"),
    "stage_runs": ("run_id", "stage_runs_ts"),  # one row per stage run: counts and time (history, never deduped)
}


def _sql(name: str) -> Template:
    return Template((SQL_DIR / f"{name}.sql").read_text())


_JOURNAL: list[Path] | None = None  # files written while `journal` runs (one batch of a worker at a time)


@contextlib.contextmanager
def journal() -> Iterator[list[Path]]:
    """Collect the paths of the files written through this module (and `note_written`) while the block runs: a
    Ray worker of a run on object storage pushes exactly these after each batch. A worker runs one batch at a time,
    so one process-wide list serves."""
    global _JOURNAL
    outer, _JOURNAL = _JOURNAL, []
    written = _JOURNAL
    try:
        yield written
    finally:
        _JOURNAL = outer
        if outer is not None:
            outer.extend(written)


def note_written(path: Path) -> None:
    """Record a file a stage finished writing by other means (an encoder's output renamed into place)."""
    if _JOURNAL is not None:
        _JOURNAL.append(Path(path))


def atomic_write_table(table: pa.Table, path: Path) -> None:
    """Write a Parquet file so that readers see all of it or none of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    note_written(path)


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write a file so that readers see all of it or none of it. `durable=False` skips the fsync: for outputs that
    are cheap to redo and written by the thousand (export masks), where a crash costs a rerun, not a lost record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    note_written(path)


def rows_to_table(rows: list[Row]) -> pa.Table:
    """Rows to Arrow with the union of every row's keys (pyarrow's `from_pylist` takes the first row's keys only, so
    an error row first in a batch would silently drop every score column)."""
    names: dict[str, None] = {}
    for r in rows:
        names.update(dict.fromkeys(r))
    return pa.Table.from_pydict({n: [r.get(n) for r in rows] for n in names})


def _table_key(name: str) -> tuple[str, str, str]:
    """(key whose newest attempt wins, columns that identify one row, timestamp column) of a table."""
    if name in SPECIAL_TABLES:
        key, ts = SPECIAL_TABLES[name]
        return key, key, ts
    cls = registry().get(name)
    key = cls.key() if cls is not None else "clip_id"
    row_id = "video_id, clip_id" if cls is not None and cls.kind == Kind.SPLIT else key
    return key, row_id, f"{name}_ts"


def pipeline_order(run_dir: Path, saved_config: str | None = None, tables: set[str] | None = None) -> list[str]:
    """The run's stages in pipeline order: its saved config's list; without one (manifests copied on their own),
    the installed stages that have a table. A run on object storage passes its config's text and its tables."""
    reg = registry()
    cfg = run_dir / "config.yaml"
    if saved_config is None and cfg.is_file():
        saved_config = cfg.read_text()
    if saved_config is not None:
        import yaml

        saved = (yaml.safe_load(saved_config) or {}).get("stages")
        if saved is None:
            from curation.config import DEFAULT_STAGES

            saved = DEFAULT_STAGES
        return [n for n in saved if n in reg]
    if tables is not None:
        return [n for n in reg if n in tables]
    root = run_dir / "manifests"
    return [n for n in reg if (root / n).is_dir() and any((root / n).glob("part-*.parquet"))]


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _arrow(rel: duckdb.DuckDBPyRelation) -> pa.Table:
    """Relation as a pyarrow Table (DuckDB 2 renamed `arrow()` to `to_arrow_table()`)."""
    fetch = getattr(rel, "to_arrow_table", None) or rel.arrow
    return fetch()


class Manifests:
    """The manifests of one run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        from curation.storage import is_remote

        self.store: Any = None
        self.remote_parts: dict[str, list[str]] = {}
        if is_remote(str(run_dir)):  # read where it is: the committed parts, through fsspec (`curation.runstore`)
            from curation.runstore import RunStore

            self.store = RunStore(str(run_dir))
            for rel in self.store.committed():
                bits = rel.split("/")
                if len(bits) == 3 and bits[0] == "manifests" and bits[2].startswith("part-"):
                    self.remote_parts.setdefault(bits[1], []).append(self.store.url(rel))
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "manifests"

    def table_dir(self, name: str) -> Path:
        return self.root / name

    def has(self, name: str) -> bool:
        if self.store is not None:
            return bool(self.remote_parts.get(name))
        d = self.table_dir(name)
        return d.is_dir() and any(d.glob("part-*.parquet"))

    def _tables(self) -> set[str]:
        if self.store is not None:
            return set(self.remote_parts)
        return {p.name for p in self.root.iterdir() if p.is_dir()} if self.root.is_dir() else set()

    def _order(self) -> list[str]:
        if self.store is None:
            return pipeline_order(self.run_dir)
        try:
            text = self.store.fs.cat_file(self.store.remote("config.yaml")).decode()
        except FileNotFoundError:
            text = None
        return pipeline_order(self.run_dir, text, set(self.remote_parts))

    def write(self, name: str, rows: list[Row]) -> Path | None:
        """Append rows to a table as one new atomic part file."""
        if self.store is not None:
            raise ValueError("manifests on object storage are read-only here: stages write to the staging folder")
        if not rows:
            return None
        table = rows_to_table(rows)
        path = self.table_dir(name) / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        atomic_write_table(table, path)
        return path

    # -- reading --------------------------------------------------------------------------------------------
    def connect(self) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB with one view per table plus the `videos` and `clips` views."""
        con = duckdb.connect()
        if self.store is not None:
            con.register_filesystem(self.store.fs)
        reg = registry()
        names = set(reg) | set(SPECIAL_TABLES) | self._tables()
        for name in sorted(names):
            sql = self._table_sql(name)
            declared = reg[name].declared_columns() if name in reg else {}
            if declared:
                have = {r[0] for r in con.execute(f"DESCRIBE {sql}").fetchall()}
                extra = [f"NULL::{t} AS {c}" for c, t in declared.items() if c not in have]
                if extra:
                    sql = f"SELECT *, {', '.join(extra)} FROM ({sql})"
            con.execute(f'CREATE VIEW "{name}" AS {sql}')
        video, split, clip = self._plan()
        con.execute(f"CREATE VIEW clips AS {self._clips_sql(video, split, clip)}")
        con.execute(f"CREATE VIEW videos AS {self._videos_sql(video, split)}")
        return con

    def _table_sql(self, name: str) -> str:
        key, row_id, ts = _table_key(name)
        if self.has(name):
            if self.store is not None:
                files = "[" + ", ".join(_literal(u) for u in self.remote_parts[name]) + "]"
            else:
                files = _literal(str(self.table_dir(name) / "part-*.parquet"))
            return _sql("stage_table").substitute(key=key, row_id=row_id, ts_col=ts, files=files)
        # An empty, typed table so that views joining it work before the stage has run.
        cls = registry().get(name)
        keys = list(cls.output_keys()) if cls is not None else ["video_id", "clip_id"]
        if name == "ingest":
            keys = ["video_id"]
        cols = [f"NULL::VARCHAR AS {k}" for k in keys]
        if name == "ingest":
            cols += ["NULL::VARCHAR AS uri", "NULL::VARCHAR AS given_caption", "NULL::VARCHAR AS given_caption_source"]
        elif name == "shards":
            cols += ["NULL::VARCHAR AS shard"]
        elif name == "stage_runs":
            cols = ["NULL::VARCHAR AS run_id", "NULL::VARCHAR AS stage"]
        else:
            cols += [f"NULL::VARCHAR AS {name}_{c}" for c in BOOKKEEPING if c != "ts"]
        cols.append(f"NULL::DOUBLE AS {ts}")
        return f"SELECT {', '.join(cols)} WHERE false"

    def _plan(self) -> tuple[list[str], str | None, list[str]]:
        """(video-level stages, the split stage, clip-level stages), each in pipeline order."""
        reg = registry()
        order = self._order()
        video = [n for n in order if reg[n].kind == Kind.VIDEO]
        splits = [n for n in order if reg[n].kind == Kind.SPLIT]
        clip = [n for n in order if reg[n].kind == Kind.CLIP]
        return video, (splits[0] if splits else None), clip

    def split_stage(self) -> str | None:
        """The stage that cuts this run's videos into clips."""
        return self._plan()[1]

    @staticmethod
    def _video_parts(video: list[str]) -> tuple[str, str]:
        cols = "".join(f'v{k}.* EXCLUDE (video_id, "{n}_ts"),\n    ' for k, n in enumerate(video))
        joins = "".join(f'LEFT JOIN "{n}" v{k} USING (video_id)\n' for k, n in enumerate(video))
        return cols, joins

    def _videos_sql(self, video: list[str], split: str | None) -> str:
        cols, joins = self._video_parts(video)
        status = ["CASE"]
        reason = ["CASE"]
        for k, n in enumerate(video):
            st = f"v{k}.{n}_status"
            status.append(f"WHEN {st} IS NULL THEN 'pending' WHEN {st} <> 'ok' THEN {st}")
            reason.append(f"WHEN {st} IS NOT NULL AND {st} <> 'ok' THEN '{n}:' || coalesce(v{k}.{n}_reason, '')")
        if split is None:  # nothing cuts videos here: the video-level stages decide, no clips to count
            counts = "0 AS n_clips, 0 AS n_clips_ok, 0 AS n_clips_kept"
            st = f"{' '.join(status)} ELSE 'ok' END" if video else "'pending'"
            why = f"{' '.join(reason)} END" if video else "NULL::VARCHAR"
            return f"SELECT i.*, {cols}{counts}, {st} AS status, {why} AS reason FROM ingest i {joins}"
        status.append(
            "WHEN s.video_status IS NOT NULL THEN s.video_status WHEN s.n_clips IS NULL THEN 'pending' "
            "WHEN s.n_clips_ok = 0 THEN 'reject' WHEN k.n_pending = 0 AND k.n_kept = 0 THEN 'reject'"
        )
        reason.append(
            f"WHEN s.video_status IS NOT NULL THEN '{split}:' || coalesce(s.video_reason, '') "
            f"WHEN s.n_clips = 0 OR s.n_clips_ok = 0 THEN '{split}:no_usable_clips' "
            "WHEN k.n_pending = 0 AND k.n_kept = 0 THEN 'no_clip_kept'"
        )
        return _sql("videos").substitute(
            split=split,
            video_columns=cols,
            video_joins=joins,
            status_case=" ".join(status) + " ELSE 'ok' END",
            reason_case=" ".join(reason) + " END",
        )

    def _clips_sql(self, video: list[str], split: str | None, clip: list[str]) -> str:
        if split is None:  # nothing cuts videos into clips in this install
            cols = ["clip_id", "video_id", "uri", "status", "reason"]
            typed = [f"NULL::VARCHAR AS {c}" for c in cols] + [f"NULL::{t} AS clip_{f}" for f, t in CLIP_FIELDS.items()]
            return f"SELECT {', '.join(typed)} WHERE false"
        vcols, vjoins = self._video_parts(video)
        aliases = "".join(f"sc.{split}_{f} AS clip_{f},\n    " for f in CLIP_FIELDS)
        stage_cols, joins = "", ""
        status_case = [f"CASE WHEN sc.{split}_status <> 'ok' THEN sc.{split}_status"]
        reason_case = [f"CASE WHEN sc.{split}_status <> 'ok' THEN '{split}:' || coalesce(sc.{split}_reason, '')"]
        for i, name in enumerate(clip):
            alias = f"s{i}"
            stage_cols += f"{alias}.* EXCLUDE (clip_id),\n    "
            joins += f'LEFT JOIN "{name}" {alias} USING (clip_id)\n'
            st = f"{alias}.{name}_status"
            status_case.append(f"WHEN {st} IS NULL THEN 'pending' WHEN {st} <> 'ok' THEN {st}")
            reason_case.append(
                f"WHEN {st} IS NOT NULL AND {st} <> 'ok' THEN '{name}:' || coalesce({alias}.{name}_reason, '')"
            )
        return _sql("clips").substitute(
            split=split,
            clip_aliases=aliases,
            video_columns=vcols,
            video_joins=vjoins,
            stage_columns=stage_cols,
            joins=joins,
            status_case=" ".join(status_case) + " ELSE 'ok' END",
            reason_case=" ".join(reason_case) + " END",
        )

    def query(self, sql: str, params: Iterable[Any] | None = None) -> pa.Table:
        con = self.connect()
        try:
            return _arrow(con.sql(sql, params=list(params or []) or None))
        finally:
            con.close()

    def rows(self, sql: str, params: Iterable[Any] | None = None) -> list[Row]:
        return self.query(sql, params).to_pylist()

    def export(
        self, sql: str, params: Iterable[Any] | None, folder: Path, rows_per_file: int, max_files: int = 10_000
    ) -> InputFiles:
        """Write a query's rows to Parquet files under `folder`, one record batch at a time: how the driver hands a
        stage its inputs without holding them (its memory stays flat however large the corpus). A file is one work
        item of the stage's actor pool, so `rows_per_file` is the stage's batch size, raised only when more than
        `max_files` files would be written."""
        con = self.connect()
        try:
            n = int(con.sql(f"SELECT count(*) FROM ({sql})", params=list(params or []) or None).fetchall()[0][0])
            paths: list[str] = []
            if n:
                per_file = max(1, rows_per_file, -(-n // max_files))
                rel = con.sql(sql, params=list(params or []) or None)
                # DuckDB 2 renamed `record_batch` to `to_arrow_reader`
                reader = (getattr(rel, "to_arrow_reader", None) or rel.record_batch)(per_file)
                folder.mkdir(parents=True, exist_ok=True)
                pending: list[pa.RecordBatch] = []
                size = 0
                for rb in reader:  # DuckDB yields batches of up to per_file rows, not always full ones
                    pending.append(rb)
                    size += rb.num_rows
                    if size >= per_file:
                        paths.append(_write_input(folder, len(paths), pending))
                        pending, size = [], 0
                if pending:
                    paths.append(_write_input(folder, len(paths), pending))
            return InputFiles(paths, n)
        finally:
            con.close()

    def compact(self, name: str) -> None:
        """Fold a table's parts into one part holding only the newest attempt per key.

        Crash-safe: the folded part is written (atomically) before the old parts are removed, and a row present in
        both is read once (`stage_table.sql`), so a kill between the two steps loses and duplicates nothing; the
        next compaction folds the leftovers.
        """
        parts = sorted(self.table_dir(name).glob("part-*.parquet"))
        if len(parts) <= 1:
            return
        table = self.query(f'SELECT * FROM "{name}"')
        path = self.table_dir(name) / f"part-{time.time_ns():020d}-compact.parquet"
        atomic_write_table(table, path)
        _remove(parts)


class InputFiles:
    """A stage's input rows as Parquet files the driver wrote (`Manifests.export`); `len` is the row count."""

    def __init__(self, paths: list[str], rows: int) -> None:
        self.paths = paths
        self.rows = rows

    def __len__(self) -> int:
        return self.rows


def _write_input(folder: Path, i: int, batches: list[pa.RecordBatch]) -> str:
    path = folder / f"input-{i:06d}.parquet"
    atomic_write_table(pa.Table.from_batches(batches), path)
    return str(path)


def _remove(parts: list[Path]) -> None:
    """Remove folded parts (its own function so tests can kill a compaction right before it)."""
    for p in parts:
        p.unlink(missing_ok=True)
