"""Exceptions that reach the user. Per-item failures are rows, never exceptions."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any


class CurationError(Exception):
    """A problem the user can fix (bad config, bad path, missing weights); the message says how."""


class ConfigError(CurationError):
    """Invalid configuration: raised early, before any work is done."""


def require(module: str, what: str, install: str = "pip install -e '.[gpu]'") -> ModuleType:
    """Import an optional library, or fail with one line naming what needs it and the install command to run."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"{what} needs the {module.split('.')[0]} library ({exc}): {install}") from None


def torch_device(torch: Any, gpus: float, stage: str) -> str:
    """ "cuda" when this worker sees a GPU. A stage whose backend asked Ray for GPUs and sees none fails in one line
    instead of running on the CPU unnoticed; `resources.gpus: 0` asks for the CPU on purpose (slow, or tests)."""
    if torch.cuda.is_available():
        return "cuda"
    if gpus > 0:
        raise ConfigError(
            f"{stage}: the reference backend asked for {gpus:g} GPU but torch sees none (torch {torch.__version__}, "
            f"built {'with CUDA ' + torch.version.cuda if torch.version.cuda else 'for CPU only'}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); install a CUDA build on a GPU "
            f"machine, or set {stage}.resources.gpus: 0 to run it on the CPU"
        )
    return "cpu"
