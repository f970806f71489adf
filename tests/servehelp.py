"""Starting and talking to a real ``hpcexp serve`` (uvicorn on 127.0.0.1 or a unix socket) in tests."""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from conftest import REPO


class Server:
    """``python -m hpcexp serve ARGS`` in ``project``; stopped with SIGINT by :meth:`stop`."""

    def __init__(self, project: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 30) -> None:
        full_env = dict(os.environ)
        full_env.pop("HPCEXP_PROJECT", None)
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p)
        full_env.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "hpcexp", "serve", *args], cwd=project, env=full_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.socket_path = args[args.index("--socket") + 1] if "--socket" in args else None
        self.stderr_text = ""
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                line = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
                break
            if self.proc.poll() is not None:
                break
        if not line:
            self.proc.kill()
            raise AssertionError(f"hpcexp serve did not start: {self.proc.stderr.read()}")  # type: ignore[union-attr]
        self.url = line
        parts = urlsplit(line)
        self.token = parts.query.split("token=", 1)[1]
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.base = f"{parts.scheme}://{parts.netloc}"

    def connection(self) -> http.client.HTTPConnection:
        if self.socket_path is not None:
            path = self.socket_path

            class UnixConn(http.client.HTTPConnection):
                def connect(self) -> None:
                    self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    self.sock.settimeout(30)
                    self.sock.connect(path)

            return UnixConn("localhost", 8888, timeout=30)
        return http.client.HTTPConnection(self.host, self.port, timeout=60)

    def request(self, method: str, path: str, *, token: str | None | bool = True, headers: dict[str, str] | None = None,
                body: bytes | str | None = None, json_body: Any = None) -> tuple[int, dict[str, str], bytes]:
        """One request with the raw ``path`` as given (http.client does not normalise ``..``)."""
        hdrs = {"Host": f"127.0.0.1:{self.port}"}
        if token is True:
            hdrs["Authorization"] = f"Bearer {self.token}"
        elif isinstance(token, str):
            hdrs["Authorization"] = f"Bearer {token}"
        if json_body is not None:
            body = json.dumps(json_body)
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            conn.close()

    def json(self, path: str, **kw: Any) -> Any:
        status, _, data = self.request("GET", path, **kw)
        assert status == 200, (path, status, data[:500])
        return json.loads(data)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("hpcexp serve did not stop on SIGINT within 15 s") from None
        self.stderr_text = self.proc.stderr.read() if self.proc.stderr is not None else ""
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return self.proc.returncode

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_run(project: Path, experiment: str, run_id: str, **fields: Any) -> Path:
    """A run folder with a record written by hand (as an executor would)."""
    from hpcexp.core.layout import RunPaths
    from hpcexp.core.runs import RunRecord, write_record

    d = project / "runs" / experiment / run_id
    (d / "results").mkdir(parents=True, exist_ok=True)
    rec = RunRecord(experiment=experiment, run_id=run_id, **fields)
    write_record(RunPaths(d), rec)
    return d


def sse_events(resp: http.client.HTTPResponse, until_end: bool = True, timeout: float = 30):  # noqa: ANN201
    """Parse Server-Sent Events from a streaming response: yields (event, data, id)."""
    event, data, ident = "message", [], None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = resp.readline()
        if not raw:
            return
        line = raw.decode("utf-8").rstrip("\n")
        if line == "":
            if data:
                yield event, "\n".join(data), ident
                if event == "end" and until_end:
                    return
            event, data = "message", []
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
        elif field == "id":
            ident = value
