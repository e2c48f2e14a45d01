"""The exceptions OptiMer raises for problems a user can fix.

Every message says what went wrong *and* what to do about it. The CLI prints
``error: <message>`` and exits with status 2 for any :class:`OptimerError`
(set ``OPTIMER_DEBUG=1`` to see the traceback as well); anything else is a bug.
"""

from __future__ import annotations


class OptimerError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ConfigError(OptimerError, ValueError):
    """A malformed option or specification (``--vector``, ``--objective``, bounds...)."""


class DataError(OptimerError):
    """A corpus or data file that is missing, unknown, empty or unreadable."""


class ModelError(OptimerError):
    """A checkpoint that cannot be loaded or is unsafe to load."""


class VectorError(OptimerError):
    """A distribution vector that is corrupt or does not fit the base model."""


class MissingDependencyError(OptimerError, ImportError):
    """An optional package is needed for this action; the message names the install command."""
