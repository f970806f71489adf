"""The host side of a remote call: one connection to the unix socket of an instance's
server (:mod:`hpcexp.runtime.remote_server`, whose framing it shares).

Each call sends one framed JSON request and waits at most ``timeout`` seconds for the
reply with the same id. A timed-out connection is dropped (a late reply must never be
taken for the next call's) and the next call opens a new one; the session lives on.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
from pathlib import Path
from typing import Any

from hpcexp.errors import RemoteError, RemoteTimeout
from hpcexp.runtime.remote_server import DEFAULT_MAX_MESSAGE, HEADER

# sockaddr_un holds 108 bytes; a longer path is reached through a directory descriptor
SUN_PATH_MAX = 100


class Connection:
    """A connection to a served object. Not thread-safe: one per thread."""

    def __init__(self, socket_path: str | Path, *, timeout: float = 60.0,
                 max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.path = str(socket_path)
        self.timeout = timeout
        self.max_message = max_message
        self._sock: socket.socket | None = None
        self._reader: Any = None
        self._ids = itertools.count(1)

    # -- connection ---------------------------------------------------------------------
    def _open(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            if len(self.path.encode()) <= SUN_PATH_MAX:
                sock.connect(self.path)
            else:
                folder, name = os.path.split(self.path)
                fd = os.open(folder or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    sock.connect(f"/proc/self/fd/{fd}/{name}")
                finally:
                    os.close(fd)
        except PermissionError as exc:
            sock.close()
            raise RemoteError(f"may not connect to {self.path}: {exc.strerror} (a session is its owner's only)",
                              kind="connection") from None
        except OSError as exc:
            sock.close()
            raise RemoteError(f"no remote session answers at {self.path}: {exc.strerror or exc}",
                              kind="connection") from None
        self._sock = sock
        self._reader = sock.makefile("rb", buffering=65536)

    def close(self) -> None:
        reader, sock = self._reader, self._sock
        self._reader = self._sock = None
        for thing in (reader, sock):
            if thing is not None:
                try:
                    thing.close()
                except OSError:
                    pass

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- calls --------------------------------------------------------------------------
    def call(self, method: str, *args: Any, _timeout: float | None = None, **kwargs: Any) -> Any:
        """``method(*args, **kwargs)`` on the served object; its result, or RemoteError."""
        return self.request({"call": method, "args": list(args), "kwargs": kwargs}, timeout=_timeout)

    def ping(self, timeout: float | None = None) -> dict[str, Any]:
        return self.request({"op": "ping"}, timeout=timeout)

    def request(self, message: dict[str, Any], *, timeout: float | None = None) -> Any:
        rid = next(self._ids)
        message["id"] = rid
        try:
            body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise RemoteError(f"the arguments of {message.get('call', 'the request')!r} are not JSON: {exc}",
                              kind="protocol") from None
        if len(body) > self.max_message:
            raise RemoteError(f"a message of {len(body)} bytes exceeds the limit of {self.max_message} bytes "
                              "(remote.max_message_mb)", kind="protocol")
        if self._sock is None:
            self._open()
        sock = self._sock
        assert sock is not None
        limit = self.timeout if timeout is None else timeout
        if limit != self.timeout or sock.gettimeout() != limit:
            sock.settimeout(limit)
        try:
            sock.sendall(HEADER.pack(len(body)) + body)
            while True:
                reply = self._read_reply()
                if reply.get("id") in (rid, None):
                    break
        except socket.timeout:
            self.close()
            raise RemoteTimeout(f"{message.get('call', message.get('op'))!r} did not answer within {limit:g} s",
                                kind="timeout") from None
        except (OSError, EOFError) as exc:
            self.close()
            raise RemoteError(f"the remote session at {self.path} went away ({exc or 'connection closed'})",
                              kind="connection") from None
        if "error" in reply:
            err = reply["error"] if isinstance(reply["error"], dict) else {"message": str(reply["error"])}
            kind = str(err.get("kind") or "call")
            rtype = err.get("type")
            what = message.get("call") or message.get("op")
            text = (f"{what}() raised {rtype}: {err.get('message', '')}" if kind == "call"
                    else f"the server refused {what!r}: {err.get('message', '')}")
            raise RemoteError(text, kind=kind, remote_type=rtype, remote_traceback=str(err.get("traceback") or ""))
        return reply.get("result")

    def _read_reply(self) -> dict[str, Any]:
        reader = self._reader
        head = reader.read(HEADER.size)
        if len(head) < HEADER.size:
            raise EOFError("connection closed")
        (n,) = HEADER.unpack(head)
        if n > self.max_message:
            raise EOFError(f"a reply of {n} bytes exceeds the limit")
        body = reader.read(n)
        if len(body) < n:
            raise EOFError("connection closed")
        return json.loads(body)
