"""Call into a running container from Python on the host.

::

    import hpcexp.remote

    with hpcexp.remote.connect("bench") as b:          # the experiment's name
        y = b.call("objective", x=[0.1, 0.2])

The experiment declares what it serves in hpcexp.yaml (``remote: {module: bench,
factory: make}``). :func:`connect` attaches to a session started by ``hpcexp instance
start bench``, or else starts one of its own (building the image if needed) that stops
when the ``with`` block ends, and also when this process dies (kill -9 included): the
session's keeper watches a pipe from this process. Every session is a run with a record
(``hpcexp status``).

Messages are JSON (never pickle): arguments and results are what :mod:`json` carries
(numbers, strings, lists, dicts, booleans, None). A method that raises comes back as
:class:`hpcexp.errors.RemoteError` carrying the remote type and traceback text; a call
that does not answer within its timeout raises :class:`hpcexp.errors.RemoteTimeout`.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Any, Mapping

from hpcexp.errors import RemoteError, RemoteTimeout
from hpcexp.infra import process
from hpcexp.runtime.remote_client import Connection

__all__ = ["RemoteError", "RemoteTimeout", "Session", "connect"]


class Session:
    """One connection to a served object; the session's run id is ``run_id``."""

    def __init__(self, run_id: str, experiment: str, socket_path: str, run_dir: Path, *, timeout: float,
                 max_message: int, keeper: "subprocess.Popen[bytes] | None" = None) -> None:
        self.run_id = run_id
        self.experiment = experiment
        self.socket = socket_path
        self.run_dir = run_dir
        self.owned = keeper is not None
        self._keeper = keeper
        self._conn = Connection(socket_path, timeout=timeout, max_message=max_message)

    def call(self, method: str, *args: Any, _timeout: float | None = None, **kwargs: Any) -> Any:
        """``method(*args, **kwargs)`` on the served object, inside the container."""
        return self._conn.call(method, *args, _timeout=_timeout, **kwargs)

    def ping(self) -> dict[str, Any]:
        """The server's pid and Python version (a round trip that calls nothing)."""
        return self._conn.ping()

    def close(self, *, wait: float = 60.0) -> None:
        """Disconnect; a session this client started is stopped (and waited for, at most ``wait`` s)."""
        self._conn.close()
        keeper, self._keeper = self._keeper, None
        if keeper is None:
            return
        process.release_watcher(keeper, timeout=wait)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect(name: str, *, params: Mapping[str, Any] | None = None, project: str | Path | None = None,
            attach: bool = True, timeout: float | None = None, wait: float = 300.0,
            rebuild: bool = False) -> Session:
    """A session with experiment ``name``'s served object.

    ``attach`` (the default) uses a serving session started by ``hpcexp instance start``
    when there is one (``params`` must then be left out); otherwise a session of this
    client's own is started with ``params`` (passed to the factory as keyword arguments,
    as strings) and stopped by :meth:`Session.close`. ``timeout`` is each call's limit in
    seconds (default: the experiment's ``remote.timeout``); ``wait`` how long starting may take.
    """
    from hpcexp.app import instances
    from hpcexp.core.config import load_project

    proj = load_project(explicit=project) if project is not None else load_project()
    exp = proj.experiment(name)
    spec = exp.remote
    if spec is None:
        # the same one-line error as `hpcexp instance start`
        instances.start(proj, instances.InstanceStartRequest(name=name))
        raise AssertionError("unreachable")
    limit = spec.timeout if timeout is None else float(timeout)
    max_message = int(spec.max_message_mb * 1024 * 1024)
    if attach and not params:
        found = instances.find_attachable(proj, name)
        if found is not None:
            paths, rec = found
            return Session(rec.run_id, name, str(rec.extra.get("socket") or paths.remote_socket), paths.dir,
                           timeout=limit, max_message=max_message)
    values = {str(k): str(v) for k, v in (params or {}).items()}
    result = instances.start(proj, instances.InstanceStartRequest(name=name, params=values, owned=True, wait=wait,
                                                                  rebuild=rebuild, quiet=True,
                                                                  cmdline=("hpcexp.remote.connect", name)))
    if result.failure is not None:
        if result.keeper is not None:
            with contextlib.suppress(OSError):
                result.keeper.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                result.keeper.wait(timeout=60)
        raise result.failure
    return Session(result.record.run_id, name, result.socket, result.paths.dir, timeout=limit,
                   max_message=max_message, keeper=result.keeper)
