"""A throwaway PostgreSQL cluster for tests and benchmarks.

``PgCluster`` runs Debian's (or any PATH) ``initdb`` in a fresh temp dir with trust
authentication, starts it with ``pg_ctl`` on a free 127.0.0.1 port (its Unix socket inside
the temp dir, so it never meets a system server), hands out fresh databases with
:meth:`PgCluster.new_database`, and stops and deletes it at the end. Durability is switched
off (``fsync``, ``synchronous_commit``, ``full_page_writes``): a test cluster is thrown away,
and this keeps start-up under a few seconds.

PostgreSQL refuses to run as root; as root the cluster runs as the system user
``aiworker-pg`` (created with ``useradd --system`` when missing, ``nobody`` when that fails)
through ``runuser``. Benchmarks import it with ``sys.path.insert(0, "tests")``::

    with PgCluster() as cluster:
        url = cluster.new_database()   # postgresql://aiworker@127.0.0.1:PORT/db_1_...
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

SUPERUSER = "aiworker"  # the cluster's superuser role (initdb -U); trust auth, no password
SYSTEM_USER = "aiworker-pg"  # the OS user the server runs as when we are root
SERVER_OPTIONS = ("-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                  "-c max_connections=200 -c shared_buffers=32MB")


class PgClusterError(RuntimeError):
    """The cluster cannot be set up here; the message says why (tests skip with it)."""


def find_bindir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: ``$AIWORKER_PG_BINDIR``, else Debian's
    newest ``/usr/lib/postgresql/N/bin``, else wherever PATH has ``initdb``; None if none."""
    candidates = [os.environ.get("AIWORKER_PG_BINDIR", "")]
    debian = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(debian, key=lambda p: _version_key(Path(p).parent.name), reverse=True)
    on_path = shutil.which("initdb")
    candidates.append(str(Path(on_path).resolve().parent) if on_path else "")
    for folder in filter(None, candidates):
        if all(os.access(Path(folder) / tool, os.X_OK) for tool in ("initdb", "pg_ctl")):
            return Path(folder)
    return None


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit()) or (0,)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_user() -> str | None:
    """None when not root (run as ourselves); else an unprivileged user, created if needed."""
    if os.geteuid() != 0:
        return None
    for name in (SYSTEM_USER, "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            if name == SYSTEM_USER and shutil.which("useradd"):
                subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                                "/usr/sbin/nologin", name], capture_output=True, timeout=30)
                try:
                    pwd.getpwnam(name)
                    return name
                except KeyError:
                    continue
    raise PgClusterError("running as root and no unprivileged user (aiworker-pg, nobody) "
                         "to run PostgreSQL as")


class PgCluster:
    """One PostgreSQL server in a temp dir: ``start()``, ``new_database()``, ``stop()``.

    Also a context manager. ``stop()`` runs at interpreter exit too, so an aborted test run
    does not leave a server behind.
    """

    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir or find_bindir()
        if self.bindir is None:
            raise PgClusterError("no PostgreSQL server binaries (initdb, pg_ctl): "
                                 "apt-get install postgresql")
        self.user = _server_user()
        self.root: Path | None = None
        self.port = 0
        self.host = "127.0.0.1"
        self._count = 0

    # --- paths ---------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._root() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._root() / "socket"

    @property
    def log_file(self) -> Path:
        return self._root() / "server.log"

    def _root(self) -> Path:
        if self.root is None:
            raise PgClusterError("cluster not started")
        return self.root

    # --- life cycle ----------------------------------------------------------------------

    def start(self, attempts: int = 3) -> PgCluster:
        """initdb and start on a free port (another port if one was taken meanwhile)."""
        self.root = Path(tempfile.mkdtemp(prefix="aiworker-pg-"))
        self.socket_dir.mkdir()
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        atexit.register(self.stop)
        self._run("initdb", "-D", self.data_dir, "-U", SUPERUSER, "--auth=trust",
                  "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions")
        for attempt in range(attempts):
            self.port = _free_port()
            options = (f"-c listen_addresses={self.host} -p {self.port} "
                       f"-k {self.socket_dir} {SERVER_OPTIONS}")
            try:
                self._run("pg_ctl", "-D", self.data_dir, "-l", self.log_file, "-w", "-t", "30",
                          "-o", options, "start")
                return self
            except PgClusterError:
                if attempt == attempts - 1:
                    self.stop()
                    raise
        return self

    def stop(self) -> None:
        """``pg_ctl stop -m immediate`` (the data is thrown away, so no shutdown checkpoint
        is worth waiting for); the temp dir is removed."""
        if self.root is None:
            return
        if (self.data_dir / "postmaster.pid").exists():
            with contextlib.suppress(PgClusterError):
                self._run("pg_ctl", "-D", self.data_dir, "-w", "-t", "10", "-m", "immediate",
                          "stop")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- databases -----------------------------------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        """``postgresql://aiworker@127.0.0.1:PORT/DBNAME`` (trust auth: no password)."""
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    def new_database(self, name: str | None = None) -> str:
        """Create an empty database (a unique name unless given) and return its URL."""
        import psycopg
        from psycopg import sql

        self._count += 1
        name = name or f"db_{self._count}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    # --- helpers -------------------------------------------------------------------------

    def _run(self, tool: str, *args: str | Path) -> None:
        assert self.bindir is not None
        command = [str(self.bindir / tool), *map(str, args)]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}
        proc = subprocess.run(command, cwd=self._root(), env=env, capture_output=True,
                              text=True, timeout=60)
        if proc.returncode != 0:
            log = self.log_file.read_text(errors="replace")[-2000:] if (
                self.log_file.exists()) else ""
            raise PgClusterError(f"{tool} failed (exit {proc.returncode}): "
                                 f"{(proc.stderr or proc.stdout).strip()[-1000:]} {log}".strip())
