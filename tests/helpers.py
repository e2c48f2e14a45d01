"""Helpers shared by the tests: a free port, fake and tiny mergers (import them: ``from helpers import ...``).

    from helpers import FakeMerger, TinyMerger, free_port
    merger = FakeMerger(["a", "b"])          # records weights; its ``model`` is itself
    merger = TinyMerger(base, {"x": tuned})  # θ = θ_base + Σ α_i τ_i in place on a real tiny model

Fixtures live in ``conftest.py``; these are plain objects and functions.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping

import torch


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

    @torch.no_grad()
    def set_weights(self, weights: Mapping[str, float]) -> None:
        target = self.expected(weights)
        for key, param in self.model.state_dict().items():
            param.copy_(target[key])
