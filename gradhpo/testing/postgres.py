"""A throwaway PostgreSQL server, for tests and benchmarks of studies on a database server.

:class:`PostgresServer` runs ``initdb`` into a fresh temporary folder and starts ``postgres`` on
127.0.0.1 only, on a free port, with password authentication; ``url()`` /
``create_database()`` give ``postgresql://gradhpo:<password>@127.0.0.1:<port>/<db>`` URLs;
``stop()``/``start()`` stop and start it again on the same port and data directory (fault
tests), ``close()`` stops it and removes the folder. PostgreSQL refuses to run as root: as
root, every server command runs as the ``postgres`` user (``runuser``, else ``su``), which
owns the folder. :func:`missing_reason` says why no server can be started here (no server
binaries: ``apt-get install postgresql``; no ``psycopg`` driver: ``pip install
'gradhpo[postgresql]'``), or ``None``.

The pytest fixtures built on it are in ``tests/postgres.py``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

__all__ = ["PostgresServer", "find_binaries", "missing_reason"]

USER = "gradhpo"
#: Where Debian/Ubuntu put the server binaries (not on PATH).
SEARCH_PATTERNS = (
    "/usr/lib/postgresql/*/bin",
    "/usr/pgsql-*/bin",
    "/opt/homebrew/opt/postgresql*/bin",
)


def find_binaries() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``: on PATH, else the newest of
    the usual install folders; ``None`` if PostgreSQL's server is not installed."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        folder = Path(os.path.realpath(on_path)).parent
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    found = []
    for pattern in SEARCH_PATTERNS:
        found += [Path(p) for p in glob.glob(pattern)]
    found = [f for f in found if all((f / b).is_file() for b in ("initdb", "pg_ctl", "postgres"))]

    def version(folder: Path) -> tuple[int, ...]:
        digits = "".join(c if c.isdigit() else " " for c in str(folder))
        return tuple(int(d) for d in digits.split())

    return max(found, key=version) if found else None


def missing_reason() -> str | None:
    """Why no server can be started here, or ``None``."""
    if find_binaries() is None:
        return (
            "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
            "/usr/lib/postgresql/*/bin; install them with `apt-get install postgresql`"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return (
                "running as root, and PostgreSQL refuses root: no 'postgres' user to run the "
                "server as (Debian's postgresql package creates it)"
            )
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the psycopg driver is not installed (pip install 'psycopg[binary]')"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One PostgreSQL server in a temporary folder (see the module docstring).

    ``durable=False`` (tests) turns off fsync and synchronous commits: a throwaway server need
    not survive a power cut, and the suite is faster. The benchmark uses ``durable=True``, the
    server's defaults."""

    def __init__(self, *, durable: bool = False, port: int | None = None) -> None:
        reason = missing_reason()
        if reason is not None:
            raise RuntimeError(reason)
        binaries = find_binaries()
        assert binaries is not None  # missing_reason() found them
        self.bin = binaries
        self.durable = durable
        self.password = uuid.uuid4().hex
        self.port = port or _free_port()
        self.as_root = os.geteuid() == 0
        # Not under pytest's tmp_path: that folder is private to root, and the server runs as
        # the postgres user, which must reach its data directory.
        self.root = Path(tempfile.mkdtemp(prefix="gradhpo-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.running = False
        try:
            self._initdb()
            self.start()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ commands
    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if self.as_root:
            if shutil.which("runuser"):
                command = ["runuser", "-u", "postgres", "--", *command]
            else:
                command = [
                    "su",
                    "postgres",
                    "-s",
                    "/bin/sh",
                    "-c",
                    subprocess.list2cmdline(command),
                ]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.is_file() else ""
            raise RuntimeError(
                f"{argv[0]} failed with exit code {done.returncode}: "
                f"{done.stderr.strip() or done.stdout.strip()}\n{log}"
            )
        return done

    def _initdb(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        os.chmod(pwfile, 0o600)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            USER,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=scram-sha-256",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        )
        pwfile.unlink()
        settings = [
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            f"unix_socket_directories = '{self.root}'",
            "max_connections = 200",
            "shared_buffers = 16MB",
        ]
        if not self.durable:
            settings += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write("\n# gradhpo test server\n" + "\n".join(settings) + "\n")

    def start(self) -> None:
        """Start the server (again) on the same port and data directory; waits until it
        accepts connections."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (disconnects clients, clean shutdown) or ``immediate``
        (as a crash)."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"mode must be 'smart', 'fast' or 'immediate', got {mode!r}")
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        self.running = False

    def close(self) -> None:
        """Stop the server (if running) and remove its folder."""
        try:
            if self.running:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ databases
    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url("postgres"), connect_timeout=10, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until a connection succeeds (after :meth:`start`, which already waits)."""
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
