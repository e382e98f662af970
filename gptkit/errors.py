"""Typed errors raised at gptkit's boundaries (files, configs, requests, data).

The CLI prints any ``GptkitError`` as one line and exits non-zero; everything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class GptkitError(Exception):
    """Base class for every error a user can cause and fix."""


class ConfigError(GptkitError):
    """A configuration value is unknown, malformed or out of range."""


class CheckpointError(GptkitError):
    """A checkpoint is missing, incomplete, corrupt or incompatible."""


class DataError(GptkitError):
    """A corpus or prepared data set is missing, empty, unreadable or malformed."""


class TokenizerError(GptkitError):
    """A tokenizer file is missing or malformed, or a token id is out of range."""


class RequestError(GptkitError):
    """A generation request is invalid (for example a prompt longer than the context)."""


class TrainingError(GptkitError):
    """Training cannot go on (for example the loss or the gradients became inf/nan)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type's name when it has none): how a
    multi-line error from a library (a traceback inside DCP, a Rust panic) enters a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def reason(exc: BaseException) -> str:
    """Why an operation failed, for a one-line error: an OSError's own words ("No space left on
    device", without the errno and path the message names already), else :func:`first_line`."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return first_line(exc)
