"""A PostgreSQL cluster the tracking service owns: initialized under a folder, started and stopped
with pg_ctl, listening on one address, with the databases the platform needs.

`bdlab server start --root DIR` uses it when no `--postgres-url` is given. PostgreSQL refuses to
run as root: when we are root, the server processes run as an unprivileged user (`postgres` when
the system has one, else `--pg-user`), which then owns the data folder.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bdlab.servers import connect_host
from bdlab.tracking.store import LOOPBACK_HOSTS
from trials.errors import BdlabError

DATABASES = ("mlflow", "mlflow_auth", "optuna")  # tracking store, MLflow's users, Optuna's studies
SUPERUSER = "bdlab"
MAX_CONNECTIONS = 100


class PostgresError(BdlabError):
    """PostgreSQL could not be set up or reached; the message names the step and the log."""


def binaries() -> Path:
    """The folder of initdb and pg_ctl: PATH first, then Debian's versioned folders, newest first."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / "pg_ctl").exists():
            return folder
    raise PostgresError(
        "PostgreSQL's server programs (initdb, pg_ctl) are not installed; install PostgreSQL 15 or "
        "newer (apt install postgresql), or give --postgres-url of a running server"
    )


def run_as(user: str | None) -> list[str]:
    """The command prefix that runs a program as `user` (nothing when it is ourselves)."""
    if user is None or pwd.getpwuid(os.getuid()).pw_name == user:
        return []
    return ["runuser", "-u", user, "--"]


def default_user() -> str | None:
    """Who runs the server processes: ourselves, unless we are root (PostgreSQL refuses root)."""
    if os.getuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresError(
            "running as root and the system has no `postgres` user: give --pg-user NAME, an "
            "unprivileged user to run PostgreSQL as"
        ) from None
    return "postgres"


@dataclass(frozen=True)
class LocalPostgres:
    """The cluster under `data` (its PGDATA), listening on host:port, run as `user`."""

    data: Path
    host: str = "127.0.0.1"
    port: int = 5432
    user: str | None = None

    @property
    def log(self) -> Path:
        return self.data.parent / "postgres.log"

    def _run(self, args: list[str], step: str, timeout: float = 120) -> str:
        proc = subprocess.run(
            run_as(self.user) + args, capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            detail = " ".join((proc.stderr or proc.stdout).split())[-400:]
            raise PostgresError(f"PostgreSQL {step} failed ({detail}); log: {self.log}")
        return proc.stdout

    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def initialize(self, password: str) -> None:
        """initdb with password authentication for everything but the owner's local socket, and
        the listen address, port and socket folder written into postgresql.conf."""
        if self.initialized():
            return
        self.data.mkdir(parents=True, exist_ok=True)
        self.data.chmod(0o700)
        if self.user is not None:
            shutil.chown(self.data, self.user)
            shutil.chown(self.data.parent, self.user)
        with tempfile.NamedTemporaryFile("w", dir=self.data.parent, delete=False) as pw:
            pw.write(password + "\n")
        try:
            if self.user is not None:
                shutil.chown(pw.name, self.user)
            self._run(
                [
                    str(binaries() / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    SUPERUSER,
                    f"--pwfile={pw.name}",
                    "--auth-local=scram-sha-256",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--no-instructions",
                ],
                "initdb",
            )
        finally:
            os.unlink(pw.name)
        settings = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.data}'",
            "max_connections": str(MAX_CONNECTIONS),
        }
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# written by bdlab server\n")
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())
        with open(self.data / "pg_hba.conf", "a") as hba:
            if self.host not in LOOPBACK_HOSTS:
                # the private network the cluster's nodes are on; password-authenticated
                hba.write("host all all samenet scram-sha-256\n")

    def running(self) -> bool:
        proc = subprocess.run(
            run_as(self.user) + [str(binaries() / "pg_ctl"), "-D", str(self.data), "status"],
            capture_output=True,
            text=True,
            check=False,
        )
        return proc.returncode == 0

    def start(self) -> None:
        if self.running():
            return
        self._run(
            [
                str(binaries() / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-w",
                "-t",
                "60",
                "start",
            ],
            "start",
        )

    def stop(self) -> None:
        if self.initialized() and self.running():
            self._run([str(binaries() / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"], "stop")

    def url(self, password: str, database: str, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://{SUPERUSER}:{password}@{connect_host(self.host)}:{self.port}/{database}"

    def create_databases(self, password: str, names: tuple[str, ...] = DATABASES) -> None:
        """The platform's databases (idempotent)."""
        psycopg = import_driver()
        conninfo = self.url(password, "postgres", driver="postgresql")
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(conninfo, autocommit=True) as conn:
                    existing = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
                    for name in names:
                        if name not in existing:
                            conn.execute(f'CREATE DATABASE "{name}"')
                return
            except psycopg.OperationalError as err:
                if time.monotonic() > deadline:
                    raise PostgresError(
                        f"cannot connect to {connect_host(self.host)}:{self.port} ({err}); log: {self.log}"
                    ) from None
                time.sleep(0.5)


def import_driver():
    """psycopg 3, or a one-line error naming the extra that installs it."""
    try:
        import psycopg
    except ImportError:
        raise PostgresError(
            "the PostgreSQL driver is not installed: pip install 'bdlab[cluster]' (or 'psycopg[binary]')"
        ) from None
    return psycopg
