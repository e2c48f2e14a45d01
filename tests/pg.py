"""A throwaway PostgreSQL server for tests: Debian's ``postgresql`` binaries, a temp data dir, a free port.

    from pg import postgres_server
    with postgres_server() as url:          # postgresql://optimer@127.0.0.1:<port>/postgres
        optimer search ... --storage url

``.ci/run`` installs the binaries (``apt-get install postgresql``) and the ``test`` extra the driver
(``psycopg[binary]``: SQLAlchemy 2.1 loads psycopg 3 for a plain ``postgresql://`` URL). PostgreSQL refuses to run as
root, so under root the server runs as the ``postgres`` user the Debian package creates (else ``nobody``).
Trust authentication on 127.0.0.1 only; no Unix socket outside the temp dir; fsync off (a test database).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from helpers import free_port

USER = "optimer"


def bin_dir() -> Path | None:
    """The folder holding initdb/pg_ctl: the newest /usr/lib/postgresql/*/bin, else initdb on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def missing() -> str | None:
    """Why a server cannot be started here (None when it can)."""
    if bin_dir() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the PostgreSQL driver is not installed: pip install -e '.[test]' (psycopg[binary])"
    return None


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged user the server runs as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and neither a 'postgres' nor a 'nobody' user exists to run PostgreSQL")


def _call(argv: list[str], who: pwd.struct_passwd | None, **kw) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
    ids = {"user": who.pw_uid, "group": who.pw_gid, "extra_groups": []} if who else {}
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=False, **ids, **kw)


@contextlib.contextmanager
def postgres_server(max_connections: int = 100) -> Iterator[str]:
    """Start a fresh server (initdb + pg_ctl) and yield its URL; stopped and deleted on exit."""
    why = missing()
    if why:
        raise RuntimeError(why)
    bins, who = bin_dir(), _run_as()
    root = Path(tempfile.mkdtemp(prefix="optimer-pg-"))
    data, log = root / "data", root / "server.log"
    try:
        if who:
            os.chown(root, who.pw_uid, who.pw_gid)
        init = _call([str(bins / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8",
                      "--no-locale", "--no-sync"], who, timeout=120)
        if init.returncode:
            raise RuntimeError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
        started, port = None, 0
        for _ in range(3):  # a free port can be taken between picking it and binding it: try another
            port = free_port()
            opts = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                    f"-c full_page_writes=off -c max_connections={max_connections}")
            started = _call([str(bins / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", opts,
                             "start"], who, timeout=90)
            if started.returncode == 0:
                break
        if started is None or started.returncode:
            tail = log.read_text()[-2000:] if log.is_file() else ""
            raise RuntimeError(f"pg_ctl start failed:\n{started.stdout if started else ''}\n{tail}")
        try:
            yield f"postgresql://{USER}@127.0.0.1:{port}/postgres"
        finally:
            _call([str(bins / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], who, timeout=60)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def create_database(url: str, name: str) -> str:
    """Create database ``name`` on the server of ``url`` and return its URL (one per test keeps tests apart)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + f"/{name}"
