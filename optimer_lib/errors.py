"""The exceptions OptiMer raises for problems a user can fix.

Every message says what went wrong *and* what to do about it. The CLI prints
``error: <message>`` and exits with status 2 for any :class:`OptimerError`
(set ``OPTIMER_DEBUG=1`` to see the traceback as well); anything else is a bug.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


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


class Problems:
    """Collect several user mistakes and report them together (so a user fixes a command line in one go).

        problems = Problems()
        spec = problems.check(parse_vector_spec, "ja.safetensors=abc")   # None when it raised
        problems.check(check_checkpoint_dir, "nope")
        problems.raise_any()      # nothing; the one error as raised; or a ConfigError listing them all
    """

    def __init__(self) -> None:
        self.errors: list[OptimerError] = []

    def check(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``fn(*args, **kwargs)``, or None with its OptimerError kept for :meth:`raise_any`."""
        try:
            return fn(*args, **kwargs)
        except OptimerError as exc:
            self.errors.append(exc)
            return None

    def raise_any(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            items = (str(e).replace("\n", "\n    ") for e in self.errors)  # a multi-line message stays one item
            raise ConfigError(f"{len(self.errors)} problems:\n  - " + "\n  - ".join(items))
