"""Parsers of the command-line specs ``--vector FILE=WEIGHT`` and ``--bounds LOW:HIGH|NAME=LOW:HIGH,...``.

    from optimer_lib.search.specs import parse_bounds, parse_vector_spec
    parse_vector_spec("vectors/ja.safetensors=0.3")   # ("vectors/ja.safetensors", 0.3)
    parse_bounds("ja=0:1.5,zh=0:1")                   # {"ja": (0.0, 1.5), "zh": (0.0, 1.0)}

Every malformed spec raises :class:`~optimer_lib.errors.ConfigError` with an example of the right form.
"""

from __future__ import annotations

import math

from optimer_lib.errors import ConfigError

_SPEC_EXAMPLE = "e.g. --vector vectors/ja.safetensors=0.3 (or just the file to let the search choose)"


def parse_vector_spec(spec: str) -> tuple[str, float | None]:
    """Parse ``FILE=WEIGHT`` or ``FILE`` (CLI ``--vector``) into ``(file, weight or None)``."""
    if spec.count("=") > 1:
        raise ConfigError(f"bad --vector {spec!r}: use one '=' between file and weight, {_SPEC_EXAMPLE}")
    path, sep, raw = spec.partition("=")
    path = path.strip()
    if not path:
        raise ConfigError(f"bad --vector {spec!r}: the file is missing, {_SPEC_EXAMPLE}")
    if not sep:
        return path, None
    try:
        weight = float(raw)
    except ValueError:
        raise ConfigError(f"bad --vector {spec!r}: weight {raw!r} is not a number, {_SPEC_EXAMPLE}") from None
    if not math.isfinite(weight):
        raise ConfigError(f"bad --vector {spec!r}: the weight must be a finite number, {_SPEC_EXAMPLE}")
    return path, weight


_BOUNDS_EXAMPLE = "e.g. --bounds 0:1 or --bounds ja=0:1.5,zh=0:1"


def _parse_range(raw: str, spec: str) -> tuple[float, float]:
    parts = raw.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise ConfigError(f"bad bounds {spec!r}: {raw!r} is not LOW:HIGH, {_BOUNDS_EXAMPLE}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ConfigError(f"bad bounds {spec!r}: need finite LOW < HIGH in {raw!r}, {_BOUNDS_EXAMPLE}")
    return low, high


def parse_bounds(spec: str) -> tuple[float, float] | dict[str, tuple[float, float]]:
    """Parse ``LOW:HIGH`` (same for every vector) or ``NAME=LOW:HIGH,...`` (per vector) search bounds."""
    spec = spec.strip()
    if "=" not in spec:
        return _parse_range(spec, spec)
    out: dict[str, tuple[float, float]] = {}
    for part in spec.split(","):
        name, sep, raw = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"bad bounds {spec!r}: {part!r} is not NAME=LOW:HIGH, {_BOUNDS_EXAMPLE}")
        if name in out:
            raise ConfigError(f"bad bounds {spec!r}: {name!r} is given twice, {_BOUNDS_EXAMPLE}")
        out[name] = _parse_range(raw.strip(), spec)
    return out
