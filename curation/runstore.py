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
manifests record artifact paths inside it (frame samples, clips, masks); `local` finds such a path in this machine's
staging folder (the `<hash>` part of the path names the run), and brings the file from the store when it is not there.

On Ray, every worker stages the run on its own node and pushes what each batch wrote (`push_files`: its artifacts
and manifest part, then one commit record) before the batch's rows go on, so a later stage on another node fetches
them from the store on a miss: no folder is shared between nodes. The driver pulls the manifests after each stage,
and takes a file a worker on its own node pushed as pushed (same size, listed by a record) instead of sending it again.
Files a run removes locally (parts a compaction folded, samples of an older cut, clips packed into shards) are
listed as removed in the next commit record and deleted from the store.
Credentials come from the environment the way fsspec's backends take them, never from the config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from curation.errors import ConfigError
from curation.storage import _is_auth_error, access_error, filesystem, is_remote

log = logging.getLogger(__name__)
T = TypeVar("T")

COMMITS = "_commits"
INDEX = ".pushed.json"  # in the staging folder: relpath -> [size, mtime_ns] of what was pushed or pulled
LOCAL_ONLY = ("tmp",)  # top-level folders that never go up (driver scratch)


DEFAULT_STAGING = "/var/tmp/musa-curation"
# the modification time (ns) of a file `fetch` brought from the store: a copy of a committed file, which no push
# sends back (the file a run writes gets a time of its own)
FETCHED_NS = 1_000_000_000  # the same path on every machine (see above); not wiped at reboot


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
        self._records: dict[str, dict[str, Any]] = {}  # commit records read so far, by object path

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
        return sorted(self.committed_sigs())

    def committed_sigs(self) -> dict[str, list[int] | None]:
        """{relative path: [size, mtime_ns] of the file as its writer committed it (None from records older than
        signatures)} of every committed file. Records read once are kept: a run's workers commit one a batch."""
        try:
            records = self._io(lambda: sorted(r for r in self._list_records() if r.endswith(".json")))
            bodies = []
            for rec in records:  # in commit order: names start with the commit time
                body = self._records.get(rec)
                if body is None:
                    try:
                        body = self._io(lambda rec=rec: json.loads(self.fs.cat_file(rec)))
                    except FileNotFoundError:  # folded by a compaction since the listing: its snapshot is listed
                        continue
                    self._records[rec] = body
                bodies.append((rec, body))
            folded = {f"{self.remote(COMMITS)}/{n}" for _, b in bodies for n in b.get("folds", ())}
            files: dict[str, list[int] | None] = {}
            for rec, body in bodies:
                if rec in folded:  # a snapshot holds it (a compaction that could not delete it)
                    continue
                sigs = body.get("sigs") or {}
                for rel in body.get("files", ()):
                    files[rel] = sigs.get(rel)
                for rel in body.get("removed", ()):
                    files.pop(rel, None)
            for gone in set(self._records) - set(records):
                del self._records[gone]
        except FileNotFoundError:
            return {}
        except ConfigError:
            raise
        except Exception as exc:
            raise access_error(self.uri, exc) from None
        return files

    def _list_records(self) -> list[str]:
        self.fs.invalidate_cache(self.remote(COMMITS))  # fsspec caches listings: another process may have committed
        return list(self.fs.find(self.remote(COMMITS)))

    def _io(self, fn: Callable[[], T], tries: int = 4) -> T:
        """`fn()` (one storage request), tried again after a pause when the server failed in passing (a 500, a
        timeout); refused credentials and missing objects are raised at once."""
        for attempt in range(tries):
            try:
                return fn()
            except (FileNotFoundError, ConfigError):
                raise
            except Exception as exc:
                if _is_auth_error(exc) or attempt == tries - 1:
                    raise
                log.debug("storage request failed (%s), trying again", exc)
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def _commit(self, sigs: dict[str, list[int] | None], removed: list[str], **extra: Any) -> None:
        """Write one commit record: the files of `sigs` ({relpath: [size, mtime_ns]}) are whole on the store,
        `removed` are gone. Its name sorts after every record this process has read (clocks of different machines
        differ: a removal must come after the record that added the file)."""
        record = {
            "files": sorted(sigs),
            "sigs": {rel: sig for rel, sig in sigs.items() if sig is not None},
            "removed": removed,
            "time": time.time(),
            **extra,
        }
        seen = max((int(PurePosixPath(r).name.split("-", 1)[0]) for r in self._records), default=0)
        name = f"{COMMITS}/{max(time.time_ns(), seen + 1):020d}-{uuid.uuid4().hex[:8]}.json"
        try:
            self._io(lambda: self.fs.pipe_file(self.remote(name), json.dumps(record).encode()))
        except Exception as exc:
            raise access_error(self.uri, exc, "write") from None

    def compact_records(self, keep: int = 16) -> int:
        """Fold the commit records into one snapshot record once there are more than `keep` (a run's workers write
        one a batch); returns how many were removed. The snapshot names the records it folds and is written before
        they are deleted, so a reader sees the same files before, during and after; a record it did not see (one
        written meanwhile) still counts."""
        with self._lock:
            files = self.committed_sigs()
            records = sorted(self._records)
            if len(records) <= keep:
                return 0
            self._commit(files, [], folds=[PurePosixPath(r).name for r in records])
            removed = 0
            for rec in records:
                try:
                    self._io(lambda rec=rec: self.fs.rm_file(rec))
                    removed += 1
                except Exception as exc:  # a folded record left behind is skipped by readers
                    log.debug("could not remove %s: %s", rec, exc)
                self._records.pop(rec, None)
            log.info("folded %d commit record(s) of %s into one", removed, self.uri)
            return removed

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
            committed = self.committed_sigs()
            # what the index says went up but the store no longer holds (a run removed and restarted) goes up again
            index = {rel: sig for rel, sig in self._index().items() if rel in committed}
            n = 0
            for rel in sorted(committed):
                local = self.staging / rel
                if rel not in index and local.is_file():
                    st = local.stat()
                    sig = [st.st_size, st.st_mtime_ns]
                    if sig == committed[rel] or (st.st_mtime_ns == FETCHED_NS and st.st_size == _size(committed[rel])):
                        index[rel] = sig  # this node's worker pushed it, or it was fetched: the store holds it
                        continue
                if only is not None and not rel.startswith(only):
                    continue
                remote = self.remote(rel)
                if local.is_file():
                    st = local.stat()
                    if index.get(rel) != [st.st_size, st.st_mtime_ns] and st.st_mtime_ns != FETCHED_NS:
                        continue  # changed here and not pushed yet: the local file wins
                    try:
                        if self._io(lambda remote=remote: self.fs.size(remote)) == st.st_size:
                            continue
                    except FileNotFoundError:
                        continue
                    except Exception as exc:
                        raise access_error(self.uri, exc) from None
                local.parent.mkdir(parents=True, exist_ok=True)
                part = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.part")
                try:
                    self._io(lambda remote=remote, part=part: self.fs.get_file(remote, str(part)))
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
            for rel in [r for r, sig in changed.items() if sig[1] == FETCHED_NS]:  # a copy of what the store has
                index[rel] = changed.pop(rel)
            if any(rel not in index for rel in changed):
                committed = self.committed_sigs()
                for rel in [r for r in changed if r not in index]:  # what this node's workers pushed themselves
                    if committed.get(rel) == changed[rel]:
                        index[rel] = changed.pop(rel)
            if not changed and not removed:
                self._save_index(index)
                return 0
            sent = {}
            for rel in sorted(changed):
                try:
                    self._io(lambda rel=rel: self.fs.put_file(str(self.staging / rel), self.remote(rel)))
                except FileNotFoundError:  # removed locally since the walk (parts a compaction folded)
                    continue
                except Exception as exc:
                    raise access_error(self.uri, exc, "write") from None
                sent[rel] = changed[rel]
            if not sent and not removed:
                self._save_index(index)
                return 0
            self._commit(sent, removed)
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

    # -- a worker's side ------------------------------------------------------------------------------------------
    def rel(self, path: str | Path) -> str | None:
        """`path` (a path some machine recorded inside its staging folder of this run) relative to the run; None for
        a path outside the run."""
        try:
            rel = Path(path).relative_to(self.staging)
            return rel.as_posix() if rel.parts else None
        except ValueError:
            pass
        parts = Path(path).parts
        try:
            i = parts.index(self.staging.name)  # the run's hash: the same on every machine
        except ValueError:
            return None
        return PurePosixPath(*parts[i + 1 :]).as_posix() if i + 1 < len(parts) else None

    def push_files(self, paths: list[Path]) -> int:
        """Upload these files of the staging folder (what one batch wrote), then commit them in one record. A file
        gone since (a packed clip) is skipped. Returns how many went up."""
        sent: dict[str, list[int] | None] = {}
        for p in dict.fromkeys(paths):
            rel = self.rel(p)
            if rel is None or rel.split("/", 1)[0] in LOCAL_ONLY:
                continue
            try:
                st = p.stat()
                self._io(lambda p=p, rel=rel: self.fs.put_file(str(p), self.remote(rel)))
            except FileNotFoundError:
                continue
            except Exception as exc:
                raise access_error(self.uri, exc, "write") from None
            sent[rel] = [st.st_size, st.st_mtime_ns]  # the driver of this node matches its copy against it
        if sent:
            self._commit(sent, [], by=f"worker-{os.getpid()}")
        return len(sent)

    def put_scratch(self, paths: list[str]) -> None:
        """Upload a driver's input files for the workers (scratch: no commit record; `remove_tree` drops them)."""
        for p in paths:
            rel = self.rel(p)
            if rel is None:
                continue
            try:
                self._io(lambda p=p, rel=rel: self.fs.put_file(p, self.remote(rel)))
            except Exception as exc:
                raise access_error(self.uri, exc, "write") from None

    def remove_tree(self, path: str | Path) -> None:
        rel = self.rel(path)
        if rel is None:
            return
        try:
            self.fs.rm(self.remote(rel), recursive=True)
        except FileNotFoundError:
            pass
        except Exception as exc:  # scratch left behind is never read
            log.debug("could not remove %s: %s", self.remote(rel), exc)

    def fetch(self, path: Path, tree: bool = False) -> int:
        """Bring the object at `path` (inside this staging folder), or with `tree` every object under it, from the
        store when it is not here; returns how many files came down. A missing object brings nothing."""
        rel = self.rel(path)
        if rel is None:
            return 0
        if tree:
            try:
                self.fs.invalidate_cache(self.remote(rel))
                objects = self._io(lambda: self.fs.find(self.remote(rel)))
            except FileNotFoundError:
                return 0
            except Exception as exc:
                raise access_error(self.uri, exc) from None
            prefix = self.remote(rel).rstrip("/") + "/"
            rels = [f"{rel}/{o[len(prefix) :]}" for o in objects if o.startswith(prefix)]
        else:
            rels = [rel]
        n = 0
        for r in rels:
            local = self.staging / r
            if local.exists():
                continue
            self.staging.mkdir(parents=True, exist_ok=True)
            part = self.staging / f".fetch-{uuid.uuid4().hex[:12]}.part"  # folders only for what exists
            try:
                self._io(lambda r=r, part=part: self.fs.get_file(self.remote(r), str(part)))
            except FileNotFoundError:
                part.unlink(missing_ok=True)
                continue
            except Exception as exc:
                part.unlink(missing_ok=True)
                raise access_error(self.uri, exc) from None
            os.utime(part, ns=(time.time_ns(), FETCHED_NS))  # marks a copy of the store's: never pushed back
            local.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, local)  # two workers of a node fetching the same file: either copy is whole
            n += 1
        return n

    def discard(self, paths: list[Path]) -> None:
        """Commit these files of the run as removed and delete their objects (files the run no longer needs that
        any node may have pushed: clips packed into shards)."""
        rels = [r for r in (self.rel(p) for p in paths) if r is not None]
        if not rels:
            return
        with self._lock:
            self._commit({}, rels)
            index = self._index()
            for rel in rels:
                index.pop(rel, None)
                try:
                    self.fs.rm_file(self.remote(rel))
                except Exception as exc:  # committed as removed: an object left behind is unread
                    log.debug("could not remove %s: %s", self.remote(rel), exc)
            if self.staging.is_dir():
                self._save_index(index)


def _size(sig: list[int] | None) -> int | None:
    return sig[0] if sig else None


_RUN: tuple[Path, RunStore | None] | None = None  # the run this process works on (`register_run`)
_TREES: set[Path] = set()  # folders `local(tree=True)` brought whole (a cut's samples: complete once written)


def register_run(run_dir: str | Path, store: RunStore | None) -> None:
    """Tell `local` which run this process works on: its staging folder (or run directory) and its store."""
    global _RUN
    _RUN = (Path(run_dir), store)
    _TREES.clear()


def local(path: str | Path, tree: bool = False, fetch: bool = True) -> Path:
    """A file (or with `tree`, a folder) a manifest row names, on this machine. A path inside the registered run's
    folder, or one that exists in a run not on object storage, is itself. Otherwise a path inside the run (under
    another machine's staging folder, or a run directory since moved) is the same file under this machine's folder,
    found by the run folder's name (for a run on object storage, the hash of its URI), and for a run on object
    storage fetched on a miss (with `tree`, every file under the folder, once per process)."""
    p = Path(path)
    if _RUN is None:
        return p
    run_dir, store = _RUN
    if store is None and p.exists():
        return p
    try:
        here = run_dir / p.relative_to(run_dir)
    except ValueError:
        parts = p.parts
        at = [i for i, part in enumerate(parts) if part == run_dir.name]
        if not at:
            return p
        if store is None:  # a folder on the way may share the run folder's name: the first that exists
            found = (run_dir.joinpath(*parts[i + 1 :]) for i in at)
            return next((f for f in found if f.exists()), p)
        here = run_dir.joinpath(*parts[at[0] + 1 :])  # the URI's hash: once in the path
    if store is None:
        return here if here.exists() else p
    if fetch and tree and here not in _TREES:
        store.fetch(here, tree=True)
        _TREES.add(here)
    elif fetch and not tree and not here.exists():
        store.fetch(here)
    return here


def attempt_dir(parent: Path, name: str) -> Path:
    """A new folder for one attempt at a clip's artifacts (`<name>.<8 hex>`), the older attempts' here removed.
    A rerun never writes where an earlier attempt wrote: a node that fetched the earlier files cannot take them for
    the new ones (manifest rows name the folder of the attempt they describe)."""
    parent.mkdir(parents=True, exist_ok=True)
    for old in parent.iterdir():
        if old.is_dir() and (old.name == name or (old.name.startswith(f"{name}.") and len(old.name) == len(name) + 9)):
            shutil.rmtree(old, ignore_errors=True)
    d = parent / f"{name}.{uuid.uuid4().hex[:8]}"
    d.mkdir()
    return d


def discard(paths: list[str]) -> None:
    """Remove files of the registered run that it no longer needs, here and (for a run on object storage) there."""
    found = [local(p, fetch=False) for p in paths]
    for p in found:
        p.unlink(missing_ok=True)
    if _RUN is not None and _RUN[1] is not None:
        _RUN[1].discard(found)


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
    are pulled first, and the run registered for `local` (paths other machines recorded, files not pulled)."""
    if not is_remote(run):
        register_run(run, None)
        return run, None
    store = RunStore(run)
    if not store.committed():
        raise ConfigError(f"{run!r} has no committed run on its storage: is it a run directory?")
    store.pull(only)
    register_run(store.staging, store)
    return str(store.staging), store
