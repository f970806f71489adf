"""A real ``mlflow server`` on 127.0.0.1 for the tracking tests (and a PostgreSQL for it).

The server comes from its own venv (scripts/provision.d/30-mlflow.sh, or
HPCEXP_MLFLOW_SERVER naming the ``mlflow`` program); the tests' own venv has only the
light client, as users get it with ``hpcexp[mlflow]``. Every server binds 127.0.0.1 on
a free port with temporary storage and is stopped by the fixture that started it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

MLFLOW = os.environ.get("HPCEXP_MLFLOW_SERVER", "/opt/hpcexp-test/mlflow/bin/mlflow")
REQUIRED = os.environ.get("HPCEXP_E2E_REQUIRED") == "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unavailable(reason: str) -> None:
    pytest.fail(reason, pytrace=False) if REQUIRED else pytest.skip(reason)


@dataclass
class Server:
    uri: str
    port: int
    folder: Path
    backend: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Server":
        if not os.access(MLFLOW, os.X_OK):
            _unavailable(f"no MLflow server at {MLFLOW} (run scripts/provision-test-env)")
        log = open(self.folder / "server.log", "ab")  # noqa: SIM115 - closed with the process
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
        self.proc = subprocess.Popen(
            [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "2",
             "--backend-store-uri", self.backend, "--serve-artifacts",
             "--artifacts-destination", str(self.folder / "artifacts")],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=self.folder, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("mlflow server exited:\n" + (self.folder / "server.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise AssertionError("mlflow server did not answer /health within 90 s:\n"
                             + (self.folder / "server.log").read_text()[-3000:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


def sqlite_server(folder: Path, port: int | None = None) -> Server:
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    return Server(uri=f"http://127.0.0.1:{port}", port=port, folder=folder,
                  backend=f"sqlite:///{folder / 'mlflow.db'}")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """One server per test module (starting one costs ~10 s of CPU); tests keep apart by
    using their own MLflow experiment."""
    server = sqlite_server(tmp_path_factory.mktemp("mlflow")).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Postgres:
    folder: Path
    port: int
    bindir: Path

    def start(self) -> "Postgres":
        data, sock = self.folder / "data", self.folder / "sock"
        sock.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(self.bindir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True)
        subprocess.run([str(self.bindir / "pg_ctl"), "-D", str(data), "-l", str(self.folder / "pg.log"), "-w",
                        "-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {sock}", "start"],
                       check=True, capture_output=True)
        subprocess.run([str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow",
                        "mlflow"], check=True, capture_output=True)
        return self

    def stop(self) -> None:
        subprocess.run([str(self.bindir / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop"],
                       capture_output=True)

    @property
    def uri(self) -> str:
        return f"postgresql://mlflow@127.0.0.1:{self.port}/mlflow"


def postgres_bindir() -> Path | None:
    base = Path("/usr/lib/postgresql")
    found = sorted(base.glob("*/bin/initdb")) if base.is_dir() else []
    return found[-1].parent if found else (Path(shutil.which("initdb")).parent if shutil.which("initdb") else None)


@pytest.fixture
def mlflow_postgres_server(tmp_path: Path):
    bindir = postgres_bindir()
    if bindir is None:
        _unavailable("PostgreSQL (initdb, pg_ctl) is not installed (run scripts/provision-test-env)")
    pg = Postgres(tmp_path / "pg", free_port(), bindir).start()
    folder = tmp_path / "mlflow-pg"
    folder.mkdir()
    port = free_port()
    server = Server(uri=f"http://127.0.0.1:{port}", port=port, folder=folder, backend=pg.uri)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        pg.stop()
