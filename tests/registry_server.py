"""A real OCI registry (Debian's docker-registry) on 127.0.0.1 for tests and benchmarks.

TLS comes from the test CA that scripts/provision.d/20-registry.sh creates and trusts
system-wide (its certificate is for 127.0.0.1 only); storage is a temporary folder and
the port a free one. The registry is stopped (and waited for) when the context ends.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

TLS_DIR = Path("/etc/hpcexp-test-registry")


@dataclass(frozen=True)
class Registry:
    host: str          # 127.0.0.1:PORT
    storage: Path
    pid: int

    def url(self, namespace: str = "lab") -> str:
        return f"oras://{self.host}/{namespace}"


def missing() -> str | None:
    """Why a registry cannot be started here, or None."""
    if shutil.which("docker-registry") is None:
        return "docker-registry is not installed (run scripts/provision-test-env as root)"
    for name in ("server.crt", "server.key"):
        p = TLS_DIR / name
        if not p.is_file() or not _readable(p):
            return f"{p} is missing or unreadable (run scripts/provision-test-env as root)"
    return None


def _readable(p: Path) -> bool:
    try:
        p.read_bytes()
        return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running(base: Path | None = None, *, tls: bool = True) -> Iterator[Registry]:
    """A registry on 127.0.0.1 (with TLS from the test CA unless ``tls`` is False: plain HTTP)."""
    work = Path(tempfile.mkdtemp(prefix="hpcexp-registry-", dir=base))
    storage = work / "storage"
    storage.mkdir()
    port = _free_port()
    config = work / "config.yml"
    listen = f"addr: \"127.0.0.1:{port}\""
    if tls:
        listen += f", tls: {{certificate: {TLS_DIR / 'server.crt'}, key: {TLS_DIR / 'server.key'}}}"
    config.write_text(
        "version: 0.1\n"
        "log: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {storage}}}, delete: {{enabled: true}}}}\n"
        f"http: {{{listen}}}\n")
    log = open(work / "registry.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        ctx = ssl.create_default_context()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=ctx))
        deadline = time.monotonic() + 30
        while True:
            try:
                with opener.open(f"{'https' if tls else 'http'}://127.0.0.1:{port}/v2/", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("registry did not start: " + (work / "registry.log").read_text(errors="replace"))
            time.sleep(0.1)
        yield Registry(host=f"127.0.0.1:{port}", storage=storage, pid=proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(work, ignore_errors=True)
