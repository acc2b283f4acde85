"""A run directory on object storage (`--out s3://bucket/run`): the stages work in a local staging folder, and what
they write is copied up with commit records that hold where rename is not atomic.

- Every file the stages write is whole before it has its name (temp file + rename, `manifest.atomic_write_*`), and
  manifest parts, samples and shards have unique names, so a copy of a file is never half of one.
- `push` uploads the files that are new or changed since the last push, then writes one commit record,
  `_commits/<time>-<id>.json`, listing them. An object that no record lists (a push cut short by a killed driver)
  does not exist for readers: `pull`, `committed` and `Manifests` on the URI read only what records list.
- `pull` brings the committed files into the staging folder before a run, so a rerun on another machine resumes
  from the manifests as a local rerun does; files a killed run left in its staging folder are whole results and go up
  with the next push.

The staging folder defaults to `~/.cache/musa-curation/runs/<hash of the URI>` (`CURATION_STAGING` overrides it). It
must be one folder that every worker writing the run sees: on several Ray nodes, a shared mount.
Credentials come from the environment the way fsspec's backends take them, never from the config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

from curation.errors import ConfigError
from curation.storage import access_error, filesystem, is_remote

log = logging.getLogger(__name__)

COMMITS = "_commits"
INDEX = ".pushed.json"  # in the staging folder: relpath -> [size, mtime_ns] of what was pushed or pulled
LOCAL_ONLY = ("tmp",)  # top-level folders that never go up (driver scratch)


def staging_dir(uri: str) -> Path:
    """The local folder a remote run is staged in."""
    root = os.environ.get("CURATION_STAGING")
    base = Path(root) if root else Path.home() / ".cache" / "musa-curation" / "runs"
    return base / hashlib.sha1(uri.rstrip("/").encode()).hexdigest()[:16]


class RunStore:
    """The object-storage side of a run directory."""

    def __init__(self, uri: str, staging: Path | None = None) -> None:
        if not is_remote(uri):
            raise ValueError(f"{uri!r} is a local path, not an object-storage URI")
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem(self.uri)
        self.root = self.root.rstrip("/")
        self.staging = staging or staging_dir(self.uri)
        self._lock = threading.Lock()

    # -- remote paths --------------------------------------------------------------------------------------------
    def remote(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def url(self, rel: str) -> str:
        """The URI of a file of the run (what readers outside this process open)."""
        return f"{self.uri}/{rel}"

    def check_writable(self) -> None:
        """Write and remove a probe object: wrong credentials or a missing bucket end the run in one line, before
        anything is written."""
        probe = self.remote(f".write-test-{uuid.uuid4().hex[:8]}")
        try:
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as exc:
            raise access_error(self.uri, exc, "write") from None

    def committed(self) -> list[str]:
        """Every file a commit record lists (relative paths, sorted)."""
        try:
            records = self.fs.find(self.remote(COMMITS))
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise access_error(self.uri, exc) from None
        files: set[str] = set()
        for rec in records:
            if not rec.endswith(".json"):
                continue
            try:
                files.update(json.loads(self.fs.cat_file(rec))["files"])
            except FileNotFoundError:
                continue
        return sorted(files)

    # -- staging <-> storage -------------------------------------------------------------------------------------
    def _index(self) -> dict[str, list[int]]:
        path = self.staging / INDEX
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def _save_index(self, index: dict[str, list[int]]) -> None:
        path = self.staging / INDEX
        tmp = path.with_name(f".{INDEX}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, path)

    def _local_files(self) -> dict[str, list[int]]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.staging):
            rel_dir = Path(dirpath).relative_to(self.staging)
            if rel_dir == Path("."):
                dirnames[:] = [d for d in dirnames if d not in LOCAL_ONLY and not d.startswith(".")]
            else:
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):  # temp files of atomic writes, the index
                    continue
                p = Path(dirpath) / name
                try:
                    st = p.stat()
                except OSError:
                    continue
                out[str(PurePosixPath(*(rel_dir / name).parts))] = [st.st_size, st.st_mtime_ns]
        return out

    def pull(self) -> int:
        """Bring every committed file that the staging folder lacks (or has in another size) down; returns how many."""
        with self._lock:
            self.staging.mkdir(parents=True, exist_ok=True)
            index = self._index()
            n = 0
            for rel in self.committed():
                local = self.staging / rel
                remote = self.remote(rel)
                if local.is_file():
                    try:
                        if self.fs.size(remote) == local.stat().st_size:
                            st = local.stat()
                            index[rel] = [st.st_size, st.st_mtime_ns]
                            continue
                    except FileNotFoundError:
                        continue
                local.parent.mkdir(parents=True, exist_ok=True)
                part = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.part")
                try:
                    self.fs.get_file(remote, str(part))
                except FileNotFoundError:  # listed but gone (removed by hand): nothing to bring
                    part.unlink(missing_ok=True)
                    continue
                except Exception as exc:
                    part.unlink(missing_ok=True)
                    raise access_error(self.uri, exc) from None
                os.replace(part, local)
                st = local.stat()
                index[rel] = [st.st_size, st.st_mtime_ns]
                n += 1
            self._save_index(index)
            if n:
                log.info("pulled %d committed file(s) of %s into %s", n, self.uri, self.staging)
            return n

    def push(self) -> int:
        """Upload what is new or changed in the staging folder, then commit it; returns how many files went up."""
        with self._lock:
            if not self.staging.is_dir():
                return 0
            index = self._index()
            changed = {rel: sig for rel, sig in self._local_files().items() if index.get(rel) != sig}
            if not changed:
                return 0
            sent = {}
            for rel in sorted(changed):
                try:
                    self.fs.put_file(str(self.staging / rel), self.remote(rel))
                except FileNotFoundError:  # removed locally since the walk (parts a compaction folded)
                    continue
                except Exception as exc:
                    raise access_error(self.uri, exc, "write") from None
                sent[rel] = changed[rel]
            if not sent:
                return 0
            record = {"files": sorted(sent), "time": time.time()}
            name = f"{COMMITS}/{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
            try:
                self.fs.pipe_file(self.remote(name), json.dumps(record).encode())
            except Exception as exc:
                raise access_error(self.uri, exc, "write") from None
            index.update(sent)
            self._save_index(index)
            log.info("pushed %d file(s) to %s", len(sent), self.uri)
            return len(sent)


class Pusher:
    """Pushes a run's staging folder every `interval` seconds while a run goes on, so that a driver killed mid-stage
    loses at most that much work on the object store."""

    def __init__(self, store: RunStore, interval: float = 30.0) -> None:
        self.store, self.interval = store, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="curation-push", daemon=True)
        self.error: BaseException | None = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.push()
            except BaseException as exc:  # kept, and raised in the driver's thread when the run ends
                self.error = exc
                return

    def __enter__(self) -> Pusher:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            if self.error is not None:
                raise self.error
            self.store.push()


def open_run(run: str) -> tuple[str, RunStore | None]:
    """(local run directory, store) for a run given as a path or a URI; a URI's committed files are pulled first."""
    if not is_remote(run):
        return run, None
    store = RunStore(run)
    if not store.committed():
        raise ConfigError(f"{run!r} has no committed run on its storage: is it a run directory?")
    store.pull()
    return str(store.staging), store
