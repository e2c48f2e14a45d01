"""Small wording helpers for what the workbench shows (status lines, titles)."""

from __future__ import annotations

import re
from collections.abc import Mapping

_FLAG = re.compile(r"--[a-z][a-z-]*")
_COMMAND = re.compile(r"\boptimer [a-z][^:;()]*$")  # "... (optimer vector extract --name)": a command, kept


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun`` in the right number: ``counted(1, "trial")`` is "1 trial", ``counted(3, "trial")``
    "3 trials" (``plural`` for an irregular noun)."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def reworded(message: str, labels: Mapping[str, str]) -> str:
    """``message`` with the CLI flags it names replaced by the quoted ``labels`` of whatever sets them where the user
    is (a box on the page, a notebook widget's field); flags without a label, and those inside an ``optimer ...``
    command the message quotes, stay.

    >>> print(reworded("bad --objective x: use --sampler tpe (or optimer search --sampler grad)",
    ...                {"--objective": "objective", "--sampler": "sampler"}))
    bad "objective" x: use "sampler" tpe (or optimer search --sampler grad)
    """
    def label(m: re.Match[str]) -> str:
        name = labels.get(m.group())
        if name is None or _COMMAND.search(message, 0, m.start()):
            return m.group()
        return f'"{name}"'

    return _FLAG.sub(label, message)
