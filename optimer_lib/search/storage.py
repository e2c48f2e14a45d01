"""Where studies live: ``--storage`` URLs to Optuna storages, the workdir default, and opening a stored study.

    from optimer_lib.search.storage import open_storage, open_study, workdir_storage
    url = workdir_storage("runs/search")                 # sqlite:////abs/runs/search/optuna.db
    study = open_study(url)                              # the storage's only study (else name one)

``sqlite:///FILE`` (the default, one file in the workdir), ``journal:///abs/file.log`` (a JournalStorage: several
hosts on a shared file system) and any SQLAlchemy URL (``postgresql://``, ``mysql://``) for workers on several
machines. ``":memory:"`` means no storage at all (the study lives in the process).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import optuna

from optimer_lib.errors import ConfigError

MEMORY = ":memory:"


def workdir_storage(workdir: str | os.PathLike, storage: str | None = None) -> str | None:
    """The storage URL of a search: ``storage`` as given, None for ``":memory:"``, else SQLite in ``workdir``."""
    if storage == MEMORY:
        return None
    return storage or f"sqlite:///{Path(workdir).resolve() / 'optuna.db'}"


FILE_STORAGES = (("sqlite:///", "study database"), ("journal://", "study journal"))


def storage_file(url: str) -> tuple[Path, str] | None:
    """The file a SQLite or journal storage URL names (``:memory:`` for an in-memory SQLite one), with what it
    holds; None for a server URL (postgresql://, mysql://)."""
    for prefix, what in FILE_STORAGES:
        if url.startswith(prefix):
            return Path(url.removeprefix(prefix)), what
    return None


def open_storage(url: str | None) -> optuna.storages.BaseStorage | str | None:
    """The Optuna storage for ``--storage``: ``journal:///abs/file.log`` (or ``journal://rel/file.log``) is a
    JournalStorage on that file (several hosts on a shared file system); SQLite URLs get a 60 s lock
    timeout so several workers can share one file; other URLs (postgresql://, mysql://) are RDB storages.
    Workers starting together on a fresh database race to create its tables: the loser retries (SQLite and
    MySQL report the lost race as an integrity or operational error, PostgreSQL as a programming error:
    ``relation "studies" already exists``)."""
    if not url:
        return None
    file = storage_file(url)
    if file and file[0].name != ":memory:" and not file[0].parent.is_dir():  # say so, not the driver's error
        raise ConfigError(f"cannot open the study storage {url!r}: the folder {str(file[0].parent)!r} does not "
                          "exist: create it, or choose another storage")
    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal://"):]))
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else None
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except (IntegrityError, OperationalError, ProgrammingError):
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
    return url


def open_study(storage: str, study_name: str | None = None) -> optuna.Study:
    """Load an existing study; ``study_name=None`` picks the storage's only study (else lists them)."""
    file = storage_file(storage)
    if file and not file[0].is_file():
        raise ConfigError(f"no {file[1]} at {storage!r}: point --workdir/--storage at a finished search")
    store = open_storage(storage)
    names = optuna.get_all_study_names(store)
    if study_name is None:
        if len(names) != 1:
            raise ConfigError(f"{storage} holds studies {names or '(none)'}: choose one with --study NAME")
        study_name = names[0]
    if study_name not in names:
        raise ConfigError(f"no study {study_name!r} in {storage} (studies: {', '.join(names) or 'none'})")
    return optuna.load_study(study_name=study_name, storage=store)
