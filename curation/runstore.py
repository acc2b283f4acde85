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

The staging folder is `/var/tmp/musa-curation/<hash of the URI>` (`CURATION_STAGING` replaces the first part). The
manifests record artifact paths inside it (frame samples, clips, masks), so every machine that works on or resumes
the run must stage it at the same path: the default is the same everywhere. It must also be one folder that every
worker writing the run sees: on several Ray nodes, a shared mount.
Files a run removes locally (parts a compaction folded, samples of an older cut, clips packed into shards) are
listed as removed in the next commit record and deleted from the store.
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


DEFAULT_STAGING = "/var/tmp/musa-curation"  # the same path on every machine (see above); not wiped at reboot


def staging_dir(uri: str) -> Path:
    """The local folder a remote run is staged in."""
    base = Path(os.environ.get("CURATION_STAGING") or DEFAULT_STAGING)
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
        """Every file the commit records list and no later record removed (relative paths, sorted)."""
        try:
            self.fs.invalidate_cache(self.remote(COMMITS))  # fsspec caches listings: another process may have committed
            records = sorted(r for r in self.fs.find(self.remote(COMMITS)) if r.endswith(".json"))
            files: set[str] = set()
            for rec in records:  # in commit order: names start with the commit time
                try:
                    body = json.loads(self.fs.cat_file(rec))
                except FileNotFoundError:
                    continue
                files.update(body.get("files", ()))
                files.difference_update(body.get("removed", ()))
        except FileNotFoundError:
            return []
        except ConfigError:
            raise
        except Exception as exc:
            raise access_error(self.uri, exc) from None
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
        """Signatures of the staging folder's files; the manifests first, so that a part listed here had its
        artifacts (written before it) on disk when the rest of the folder is walked."""
        out = self._walk(self.staging / "manifests")
        out.update(self._walk(self.staging, skip_top=("manifests", *LOCAL_ONLY)))
        return out

    def _walk(self, top: Path, skip_top: tuple[str, ...] = ()) -> dict[str, list[int]]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(top):
            rel_dir = Path(dirpath).relative_to(self.staging)
            dirnames[:] = [
                d for d in dirnames if not d.startswith(".") and not (Path(dirpath) == top and d in skip_top)
            ]
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

    def pull(self, only: tuple[str, ...] | None = None) -> int:
        """Bring the committed files down that the staging folder lacks, or holds as last pushed or pulled while the
        store has another version; a file changed here since (a killed run's unpushed work) is kept, for the next
        push. `only`: relative path prefixes to bring (the manifests alone, for a command that reads nothing else).
        Returns how many files came down."""
        with self._lock:
            self.staging.mkdir(parents=True, exist_ok=True)
            committed = self.committed()
            # what the index says went up but the store no longer holds (a run removed and restarted) goes up again
            index = {rel: sig for rel, sig in self._index().items() if rel in set(committed)}
            n = 0
            for rel in committed:
                if only is not None and not rel.startswith(only):
                    continue
                local = self.staging / rel
                remote = self.remote(rel)
                if local.is_file():
                    st = local.stat()
                    if index.get(rel) != [st.st_size, st.st_mtime_ns]:
                        continue  # changed here and not pushed yet: the local file wins
                    try:
                        if self.fs.size(remote) == st.st_size:
                            continue
                    except FileNotFoundError:
                        continue
                    except Exception as exc:
                        raise access_error(self.uri, exc) from None
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
            local = self._local_files()
            changed = {rel: sig for rel, sig in local.items() if index.get(rel) != sig}
            removed = sorted(rel for rel in index if rel not in local)
            if not changed and not removed:
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
            if not sent and not removed:
                return 0
            record = {"files": sorted(sent), "removed": removed, "time": time.time()}
            name = f"{COMMITS}/{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
            try:
                self.fs.pipe_file(self.remote(name), json.dumps(record).encode())
            except Exception as exc:
                raise access_error(self.uri, exc, "write") from None
            index.update(sent)
            for rel in removed:
                index.pop(rel, None)
            self._save_index(index)
            for rel in removed:  # committed as removed first: a kill here leaves objects nobody reads
                try:
                    self.fs.rm_file(self.remote(rel))
                except Exception as exc:  # an object left behind is unread, not an error
                    log.debug("could not remove %s: %s", self.remote(rel), exc)
            log.info("pushed %d file(s) to %s (%d removed)", len(sent), self.uri, len(removed))
            return len(sent)


class Pusher:
    """Pushes a run's staging folder every `interval` seconds while a run goes on, so that a driver killed mid-stage
    loses at most that much work on the object store."""

    def __init__(self, store: RunStore, interval: float = 30.0) -> None:
        self.store, self.interval = store, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="curation-push", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.push()
            except Exception as exc:  # a passing storage error: the next push sends the same files again
                log.warning("push to %s failed, will retry: %s", self.store.uri, exc)

    def __enter__(self) -> Pusher:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is None:
            self.store.push()  # the last push's error, if any, ends the run


MANIFESTS_ONLY = ("manifests/", "config.yaml", "selections/")


def open_run(run: str, only: tuple[str, ...] | None = None) -> tuple[str, RunStore | None]:
    """(local run directory, store) for a run given as a path or a URI; a URI's committed files (those under `only`)
    are pulled first."""
    if not is_remote(run):
        return run, None
    store = RunStore(run)
    if not store.committed():
        raise ConfigError(f"{run!r} has no committed run on its storage: is it a run directory?")
    store.pull(only)
    return str(store.staging), store
