"""Typed errors raised by localify.

Every error says what was looked for, what was found and what to do next. They all derive from
:class:`LocalifyError`, and each also derives from the closest built-in exception so that callers who
catch ``ValueError`` / ``RuntimeError`` keep working.
"""

from __future__ import annotations

__all__ = [
    "LocalifyError",
    "TraceError",
    "NoMLPFoundError",
    "LayerSpecError",
    "NotLocalifiableError",
    "AlreadyLocalifiedError",
    "ExampleInputError",
    "ConfigError",
    "FuseError",
    "ModelSourceError",
    "CheckpointError",
    "SavedModelError",
    "UntrustedCodeError",
]


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type name if it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


class LocalifyError(Exception):
    """Base class of every error localify raises on purpose."""


class TraceError(LocalifyError, RuntimeError):
    """The model could not be traced into a graph."""


class ExampleInputError(LocalifyError, ValueError):
    """No example input could be built for the model, or the one given is unusable."""


class NoMLPFoundError(LocalifyError, ValueError):
    """The traced graph holds no transformer MLP (Linear -> activation -> Linear on tokens)."""


class LayerSpecError(LocalifyError, ValueError):
    """A ``layers=`` specification is malformed or out of range."""


class NotLocalifiableError(LocalifyError, ValueError):
    """Blocks were selected explicitly, but none of them can be converted."""


class AlreadyLocalifiedError(LocalifyError, ValueError):
    """The selected blocks were already converted by localify."""


class ConfigError(LocalifyError, ValueError):
    """An invalid localify option (variant, kernel size, activation, ...)."""


class FuseError(LocalifyError, RuntimeError):
    """A model cannot be fused for deployment in its current state."""


class ModelSourceError(LocalifyError, ValueError):
    """A model name, path or factory could not be resolved."""


class CheckpointError(LocalifyError, ValueError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


class SavedModelError(LocalifyError, ValueError):
    """A saved localify model is unreadable, unsafe or from an incompatible version."""


class UntrustedCodeError(SavedModelError):
    """A saved model would import and call code it names (a ``module:factory`` source); loading it needs
    ``trust_code=True`` (``--trust-code``)."""
