"""User-facing errors: anything raised as a `TunerError` is printed as a message, never as a trace."""

from __future__ import annotations


class TunerError(Exception):
    """A problem the user can fix (bad config, missing file, unusable data). The CLI exits 1 with the message."""


class ConfigError(TunerError):
    """A configuration value or key is invalid; the message names the dotted path and what is allowed."""


class DataError(TunerError):
    """The data set cannot be used as given (missing path, empty, unsafe metadata, policy `error`)."""


class TrainingStopped(TunerError):
    """Training stopped on purpose (NaN guard, damaged checkpoint); the message says what is safe on disk."""
