"""Where log records go: the console keeps the project's own messages (and anything at ERROR), every record goes to
`<run>/logs/*.log`. Third-party libraries (Ray, RapidOCR, onnxruntime wrappers) log INFO and WARNING lines per
batch or per frame; on the console they would bury the progress bars and the summary."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_OWN = ("curation",)


class _ConsoleFilter(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".")[0] in _OWN
        return record.levelno >= (self.level if own else logging.ERROR)


def setup_console(level: int) -> None:
    """The CLI's console handler: the project's records at `level`, other libraries' only at ERROR."""
    root = logging.getLogger()
    root.setLevel(min(level, logging.INFO))
    for h in list(root.handlers):
        if getattr(h, "_curation", None) == "console":
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_ConsoleFilter(level))
    handler._curation = "console"  # type: ignore[attr-defined]
    root.addHandler(handler)


def log_to_file(run_dir: str | Path, name: str = "curation") -> logging.Handler | None:
    """Send every record at INFO and above to `<run>/logs/<name>.log`; returns the new handler (None when this
    process already logs there)."""
    path = Path(run_dir) / "logs" / f"{name}.log"
    root = logging.getLogger()
    handler = None
    if not any(getattr(h, "_curation", None) == str(path) for h in root.handlers):
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8", delay=True)  # no file until something is logged
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._curation = str(path)  # type: ignore[attr-defined]
        root.addHandler(handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
    tame_third_party()
    return handler


@contextmanager
def logging_to(run_dir: str | Path) -> Iterator[None]:
    """`log_to_file` for the duration of a block (one run in a process that may do several)."""
    handler = log_to_file(run_dir)
    try:
        yield
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def tame_third_party() -> None:
    """Libraries that print through their own console handlers are routed through the root logger instead (so their
    records reach the log file and only their errors reach the console). Called again after models load, since
    libraries add handlers when imported."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or name.split(".")[0] in _OWN:
            continue
        console = [
            h
            for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        ]
        for h in console:
            logger.removeHandler(h)
        if console:
            logger.propagate = True


def native_stderr_to_file(run_dir: str | Path) -> Path:
    """Send what native code writes to file descriptor 2 (Ray's C++ core, codec and ONNX libraries) to
    `<run>/logs/native.log`, while Python's `sys.stderr` (progress bars, the console handler, the one-line errors)
    keeps the terminal. For the CLI only: a library must not rewire its host process's descriptors."""
    path = Path(run_dir) / "logs" / "native.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    if getattr(sys.stderr, "_curation_console", False):
        return path  # already done in this process
    sys.stderr.flush()
    console = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    console._curation_console = True  # type: ignore[attr-defined]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = console
    for h in logging.getLogger().handlers:
        if getattr(h, "_curation", None) == "console" and isinstance(h, logging.StreamHandler):
            h.setStream(console)
    return path


def worker_log_name() -> str:
    return f"worker-{os.getpid()}"
