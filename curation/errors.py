"""Exceptions that reach the user. Per-item failures are rows, never exceptions."""

from __future__ import annotations

import importlib
from types import ModuleType


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
