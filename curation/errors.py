"""Exceptions that reach the user. Per-item failures are rows, never exceptions."""


class CurationError(Exception):
    """A problem the user can fix (bad config, bad path, missing weights); the message says how."""


class ConfigError(CurationError):
    """Invalid configuration: raised early, before any work is done."""
