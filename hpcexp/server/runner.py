"""Binding and running the dashboard: a loopback port, a 0600 unix socket, or TLS on another address.

The listening socket is made here, before uvicorn starts, so that the port is known
(``--port 0``: a free one) and a unix socket never exists with a wider mode than 0600
(it is bound under umask 0177). uvicorn then serves on that socket.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import secrets
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hpcexp.errors import EnvironmentProblem, UsageError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, socket_path: str | None, certfile: str | None, keyfile: str | None,
               allow_remote: bool) -> None:
    """Refuse (exit 2) what would expose the dashboard without saying so."""
    if socket_path is not None and host not in ("127.0.0.1", "localhost"):
        raise UsageError("--socket and --host exclude each other (a unix socket has no address)")
    if bool(certfile) != bool(keyfile):
        raise UsageError("--certfile and --keyfile go together")
    for f in (certfile, keyfile):
        if f and not os.path.isfile(f):
            raise UsageError(f"TLS file {f} does not exist")
    if socket_path is None and not is_loopback(host):
        if not allow_remote:
            raise UsageError(f"--host {host} is not a loopback address: anyone who can reach it could try the "
                             "dashboard; pass --allow-remote with --certfile/--keyfile to do so on purpose",
                             hint="or keep the default 127.0.0.1 and forward it: ssh -L 8888:127.0.0.1:PORT HOST")
        if not certfile:
            raise UsageError(f"--host {host} needs TLS: give --certfile and --keyfile (the token must not travel "
                             "in clear text)")


def new_token() -> str:
    return secrets.token_urlsafe(32)


def tcp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is already in use", hint="leave out --port for a free one") \
                from None
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def unix_socket(path: str) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600 from its creation; a stale one is replaced."""
    p = Path(path)
    if not p.parent.is_dir():
        raise UsageError(f"folder {p.parent} of --socket does not exist")
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(p)
        if not stat.S_ISSOCK(st.st_mode):
            raise UsageError(f"--socket {path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(p))
        except OSError:
            os.unlink(p)  # nobody listens: a leftover of a server that died
        else:
            raise UsageError(f"--socket {path} is in use by another server")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(p))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot create the socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    os.chmod(p, 0o600)
    sock.listen(128)
    return sock


@dataclass
class Served:
    url: str               # what to open (with the token)
    where: str             # what is listened on, for people


def serve(app: object, sock: socket.socket, *, certfile: str | None, keyfile: str | None,
          on_ready: Callable[[], None] | None = None, log_level: str = "warning") -> None:
    """Run uvicorn on ``sock`` until Ctrl-C / SIGTERM (clean shutdown: open streams get 3 s)."""
    try:
        import uvicorn
    except ImportError:  # pragma: no cover - the extra is not installed
        raise EnvironmentProblem("hpcexp serve needs the web extra", hint="pip install 'hpcexp[web]'") from None
    config = uvicorn.Config(app, log_level=log_level, access_log=False, server_header=False, date_header=False,
                            ssl_certfile=certfile, ssl_keyfile=keyfile, timeout_graceful_shutdown=3,
                            lifespan="off", proxy_headers=False)
    server = uvicorn.Server(config)
    if on_ready is not None:
        orig = server.startup

        async def startup(sockets: list[socket.socket] | None = None) -> None:
            await orig(sockets=sockets)
            if server.started:
                on_ready()
        server.startup = startup  # type: ignore[method-assign]
    server.run(sockets=[sock])
