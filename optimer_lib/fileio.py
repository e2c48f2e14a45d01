"""Atomic file writes with normal permissions: readers (and crashes) never see a half-written result file,
and every file the project writes ends with the mode a plain ``open`` would give under the user's umask.

    from optimer_lib.fileio import atomic_write_json, atomic_write_text, normal_permissions
    atomic_write_json(workdir / "best.json", payload)
    atomic_write_text(workdir / "report.html", html)
    normal_permissions(tmp_dir)   # before renaming a folder written by safetensors/mkdtemp into place

Temporary files and folders (``mkstemp``/``mkdtemp``) are created private (0600/0700) and safetensors
≥ 0.8 writes ``model.safetensors`` as 0600; left so, colleagues on a shared machine could not read a
merged model. :func:`normal_permissions` is the one place that gives them the usual 0666/0777 & ~umask.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask, read from ``/proc`` where possible (``os.umask`` must set it to read it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # no /proc (macOS): the classic set-and-restore
    os.umask(old)
    return old


def normal_mode(*, directory: bool = False, executable: bool = False) -> int:
    """The mode ``open`` (0666) or ``mkdir`` (0777) would give a new file/folder under the current umask."""
    return (0o777 if directory or executable else 0o666) & ~current_umask()


def normal_permissions(path: str | os.PathLike) -> Path:
    """Give ``path`` — a file, or a folder and everything below it — the modes a plain ``open``/``mkdir``
    would have given under the current umask (executable files keep their x bits); symlinks are left alone.

    Call it on a freshly written temporary file or folder before renaming it into place.
    """
    path = Path(path)
    mask = current_umask()

    def fix(p: str | os.PathLike, st: os.stat_result) -> None:
        if stat.S_ISLNK(st.st_mode):
            return
        full = stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111
        os.chmod(p, (0o777 if full else 0o666) & ~mask)

    fix(path, path.lstat())
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                p = os.path.join(root, name)
                fix(p, os.lstat(p))
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temp file in the same folder, then rename it over ``path`` (normal permissions)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, normal_mode())  # mkstemp makes it 0600
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
