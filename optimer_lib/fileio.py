"""Atomic file writes: readers (and crashes) never see a half-written result file.

    from optimer_lib.fileio import atomic_write_json, atomic_write_text
    atomic_write_json(workdir / "best.json", payload)
    atomic_write_text(workdir / "report.html", html)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temp file in the same folder, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, payload: Any, *, indent: int = 2) -> Path:
    """JSON (UTF-8, non-ASCII kept) written with :func:`atomic_write_text`."""
    return atomic_write_text(path, json.dumps(payload, indent=indent, ensure_ascii=False, default=str))
