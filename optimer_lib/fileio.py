"""Atomic file writes with normal permissions: readers (and crashes) never see a half-written result file,
and every file the project writes ends with the mode a plain ``open`` would give under the user's umask.

    from optimer_lib.fileio import atomic_write_json, atomic_write_text, normal_permissions, read_or_make_json
    atomic_write_json(workdir / "best.json", payload)
    atomic_write_text(workdir / "report.html", html)
    normal_permissions(tmp_dir)   # before renaming a folder written by safetensors/mkdtemp into place
    stage = read_or_make_json(stage_json, compute)  # cached; made by one process at a time (result_lock)
    check_writable("runs/search", flag="--workdir")  # before any work: a file in the way, or no permission

Temporary files and folders (``mkstemp``/``mkdtemp``) are created private (0600/0700) and safetensors
≥ 0.8 writes ``model.safetensors`` as 0600; left so, colleagues on a shared machine could not read a
merged model. :func:`normal_permissions` is the one place that gives them the usual 0666/0777 & ~umask.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from optimer_lib.errors import ConfigError


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


@contextmanager
def result_lock(result: str | os.PathLike, *, poll_s: float = 10.0,
                waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``<result>.lock`` while this process makes ``result``; wait while another holds it.

        with result_lock(path, waiting=lambda who: print(f"{path.name}: made by {who}; waiting")):
            if not path.exists():  # the other process may have made it while this one waited
                atomic_write_json(path, compute())

    Why: two runs of one resumable job (``optimer experiments`` started twice, or a second process started to
    use another core) would otherwise compute the same stage at once and write into the same Optuna study. The
    lock is the kernel's (``flock``): it ends with its process, so a killed or crashed run never leaves a result
    blocked, whatever pid a restarted container gets. The file holds ``host pid`` of the holder, for the message
    only; it is removed once the result is written (a waiter that then gets the old file reads the result). Where
    ``flock`` does not exist (Windows) there is no lock: run one process per workdir there.
    ``waiting(owner)`` is called once, when this process starts to wait.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        yield
        return
    lock = Path(result).with_name(Path(result).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, normal_mode())
    try:
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told and waiting is not None:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").split()
                    who = f"process {holder[1]} on {holder[0]}" if len(holder) == 2 else "another process"
                    waiting(f"{who} (lock file {lock})")
                    told = True
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}".encode(), 0)
        yield
        if Path(result).exists():  # made: later processes read it; a failed attempt leaves the file to the next
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the flock


def read_or_make_json(path: str | os.PathLike, make: Callable[[], Any], *, indent: int = 1,
                      waiting: Callable[[str], None] | None = None, poll_s: float = 10.0) -> Any:
    """The JSON in ``path``; if there is none, ``make()``'s result, written there atomically first.

    Made under :func:`result_lock`: a second process asking for the same ``path`` meanwhile waits and then reads
    what the first one wrote (``waiting(owner)`` tells it once), instead of computing it again.
    """
    path = Path(path)
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    with result_lock(path, waiting=waiting, poll_s=poll_s):
        if path.exists():  # made by the other process while this one waited
            return json.loads(path.read_text(encoding="utf-8"))
        payload = make()
        atomic_write_json(path, payload, indent=indent)
        return payload


def check_writable(path: str | os.PathLike, *, flag: str, kind: Literal["dir", "file", "any"] = "dir") -> Path:
    """Refuse (ConfigError, one line naming ``flag``) an output location that cannot be written, before any work.

    ``kind="dir"``: ``path`` is a folder to write into (created if missing); ``"file"``: a file to write (its folder
    created if missing); ``"any"``: either. Refused: a folder that is a file, a file that is a folder, a missing
    folder under a file, and a location whose nearest existing folder this user may not write to. Whether ``path``
    may be *replaced* (``--force``) is the command's own check.
    """
    p = Path(path).expanduser()
    if kind == "dir" and p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is a file: give a folder")
    if kind == "file" and p.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is a folder: give a file name")
    where = p if kind == "dir" or (kind == "any" and p.is_dir()) else p.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} lies under {str(where)!r}, which is a file: choose another location")
    if not os.access(where, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {str(path)!r}: this user may not write to {str(where.resolve())!r}: choose a "
                          "location you can write to")
    return p
