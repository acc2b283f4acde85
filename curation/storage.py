"""Inputs on object storage: any fsspec URI (`s3://`, `gs://`, ...) next to local paths.

Credentials and endpoints are taken the way the filesystem's library takes them (for S3: `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, `~/.aws`), never from the run's config, so they cannot end up in the
saved config, the manifests or the logs. Decoders (PyAV, ffmpeg) get a local copy: a worker keeps its last few
downloads, since consecutive rows are usually clips of the same video.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePosixPath
from typing import Any

from curation.errors import ConfigError

log = logging.getLogger(__name__)

KEEP_DOWNLOADS = 2  # per worker process: the video its current rows come from, and the one before


def is_remote(uri: str) -> bool:
    """A URI with a scheme other than file:// (local paths have none)."""
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URI; a missing protocol package is a config error with the fix."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(uri)
    except ImportError as exc:
        scheme = uri.split("://", 1)[0]
        raise ConfigError(
            f"reading {scheme}:// needs its fsspec package ({exc}): pip install 'musa-curation[s3]' for s3://"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"{uri!r}: {exc}") from None


def access_error(uri: str, exc: BaseException, verb: str = "read") -> ConfigError:
    """A storage error as one line naming the URI and where credentials come from (never their values)."""
    scheme = uri.split("://", 1)[0]
    how = (
        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a non-AWS server) or ~/.aws"
        if scheme in ("s3", "s3a")
        else f"the credentials {scheme}:// takes"
    )
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return ConfigError(f"cannot {verb} {uri}: {msg} (credentials and endpoint come from {how})")


class _Downloads:
    """A worker's recent downloads (uri -> local file), oldest dropped first."""

    def __init__(self) -> None:
        self.dir: str | None = None
        self.files: OrderedDict[str, str] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, uri: str) -> str:
        with self.lock:
            if uri in self.files:
                self.files.move_to_end(uri)
                return self.files[uri]
            if self.dir is None:
                self.dir = _worker_dir()
                atexit.register(shutil.rmtree, self.dir, True)
            fs, path = filesystem(uri)
            local = os.path.join(self.dir, f"{len(self.files)}-{abs(hash(uri))}") + PurePosixPath(path).suffix
            part = local + ".part"
            try:
                fs.get_file(path, part)
            except FileNotFoundError:  # a missing object: that row's error
                _unlink(part)
                raise
            except Exception as exc:
                _unlink(part)
                if _is_auth_error(exc):  # every later download would fail too: end the run, in one line
                    raise access_error(uri, exc) from None
                raise
            os.replace(part, local)
            self.files[uri] = local
            while len(self.files) > KEEP_DOWNLOADS:
                _, old = self.files.popitem(last=False)
                try:
                    os.remove(old)
                except OSError:
                    pass
            return local


def _unlink(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _is_auth_error(exc: BaseException) -> bool:
    """Credentials refused or missing (s3fs turns 403s into PermissionError; botocore has its own classes)."""
    if isinstance(exc, PermissionError):
        return True
    name = type(exc).__name__
    return name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")


def _worker_dir() -> str:
    """This process's download folder under one per-node root; folders of processes that are gone (a killed worker
    never runs its exit hooks) are removed on the way."""
    root = os.path.join(tempfile.gettempdir(), "curation-inputs")
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
        pid = name.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


_DOWNLOADS = _Downloads()


@contextmanager
def local_file(uri: str) -> Iterator[str]:
    """A local path to read `uri` from: the path itself, or this worker's copy of a remote object."""
    yield _DOWNLOADS.get(uri) if is_remote(uri) else uri


def list_remote(spec: str) -> tuple[Any, list[str]]:
    """The objects a remote input names (a prefix, recursively; a glob; one object), hidden names left out, as
    (filesystem, paths). Storage errors become one-line config errors: nothing has been written yet."""
    fs, path = filesystem(spec)
    try:
        if any(ch in path for ch in "*?["):
            found = [p for p in fs.glob(path) if fs.isfile(p)]
        elif fs.isfile(path):
            found = [path]
        elif fs.isdir(path):
            found = fs.find(path)
        else:
            raise ConfigError(f"input {spec!r} matched nothing on its storage")
    except ConfigError:
        raise
    except Exception as exc:  # PermissionError, botocore's errors, connection errors
        raise access_error(spec, exc) from None
    base = path.rstrip("/")
    out = []
    for p in sorted(found):
        rel = p[len(base) :].lstrip("/") if p.startswith(base + "/") else PurePosixPath(p).name
        if not any(part.startswith(".") for part in PurePosixPath(rel).parts):
            out.append(p)
    return fs, out
