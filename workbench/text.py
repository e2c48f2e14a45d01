"""Small wording helpers for what the workbench shows (status lines, titles)."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun`` in the right number: ``counted(1, "trial")`` is "1 trial", ``counted(3, "trial")``
    "3 trials" (``plural`` for an irregular noun)."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"
