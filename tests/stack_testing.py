"""The team stack of infra/docker-compose.yml without Docker: PostgreSQL, an MLflow server on it, a Prefect server.

Each server is a real process on 127.0.0.1 and a free port, its state in a temporary folder. Shared by
tests/pipelines (runs against the stack) and tests/infra (the stack's authentication).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exit {process.returncode} before {url} answered:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


class ServerProcess:
    """A server started in its own process group (servers spawn workers), stopped with the whole group."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path, url: str = "", cwd: Path | None = None):
        self.command, self.env, self.log, self.cwd = command, env, log, cwd
        self.url = url  # what clients are given; its /health answers when the server is up
        self.process: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        with open(self.log, "a") as out:
            self.process = subprocess.Popen(self.command, env=self.env, cwd=self.cwd, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait(self, timeout: float = 180) -> None:
        wait_for_http(f"{self.url}/health", self.process, self.log, timeout)

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL after 5 s; returns once no process of the group is left (port free)."""
        if self.process is None:
            return
        _signal_group(self.process.pid, signal.SIGTERM)
        if not self._group_gone(timeout=5):
            _signal_group(self.process.pid, signal.SIGKILL)
            self._group_gone(timeout=10)

    def _group_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None and not _signal_group(self.process.pid, 0):
                return True
            time.sleep(0.2)
        return False


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the process group; False when none of it is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def postgres_bin() -> Path:
    found = sorted(glob.glob(f"{POSTGRES_BIN_GLOB}/pg_ctl"))
    if not found:
        pytest.skip(f"PostgreSQL server binaries not found ({POSTGRES_BIN_GLOB}/pg_ctl): apt-get install postgresql "
                    "(.ci/run installs it)")
    return Path(found[-1]).parent


class Postgres:
    """A PostgreSQL cluster in a temporary folder, listening on 127.0.0.1 only, trust authentication.

    initdb refuses to run as root, so under root the cluster belongs to the ``postgres`` user Debian's
    package creates (or ``nobody``), in a folder outside pytest's root-only temporary tree.
    """

    user = "segflow"

    def __init__(self):
        self.bin = postgres_bin()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="segflow-postgres-"))
        self.data = self.root / "data"
        self.run_as = None
        if os.geteuid() == 0:
            self.run_as = next(name for name in ("postgres", "nobody") if _user_exists(name))
            shutil.chown(self.root, self.run_as)

    def _run(self, *args: str, stdin: str | None = None) -> None:
        subprocess.run([str(self.bin / args[0]), *args[1:]], user=self.run_as, input=stdin, text=True, check=True,
                       capture_output=True, cwd=self.root)

    def start(self, init_sql: str) -> Postgres:
        """Create and start the cluster, then run ``init_sql`` in it (as the compose stack's first start does)."""
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w", "start")
        self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", "postgres",
                  "-v", "ON_ERROR_STOP=1", "-q", "-f", "-", stdin=init_sql)
        return self

    def url(self, database: str, driver: str = "psycopg2") -> str:
        return f"postgresql+{driver}://{self.user}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def mlflow_server(backend_uri: str, artifacts: Path, log: Path,
                  auth_env: dict[str, str] | None = None) -> ServerProcess:
    """``mlflow server`` as in infra/docker-compose.yml: proxied artifacts (a folder instead of MinIO).

    No auth unless ``auth_env`` is given: then the basic-auth app runs, configured by that environment
    (MLFLOW_AUTH_CONFIG_PATH, MLFLOW_AUTH_ADMIN_USERNAME / _PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY).
    """
    port = free_port()
    command = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", backend_uri,
               "--artifacts-destination", artifacts.as_uri(), "--serve-artifacts",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if auth_env is not None:
        command += ["--app-name", "basic-auth"]
    return ServerProcess(command, dict(os.environ, **(auth_env or {})), log, f"http://127.0.0.1:{port}")


def prefect_server(home: Path, log: Path, auth_string: str | None = None) -> ServerProcess:
    """``prefect server start`` with its SQLite database in ``home``; a run waiting for a slot retries soon.

    With ``auth_string`` ("user:password") the API requires it as HTTP basic auth, as in the compose stack.
    """
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="2")
    env.pop("PREFECT_API_URL", None)
    if auth_string is not None:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth_string
    command = [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return ServerProcess(command, env, log, f"http://127.0.0.1:{port}/api")
