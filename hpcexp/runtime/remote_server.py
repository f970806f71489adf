"""hpcexp's remote-call server: bound read-only into an instance and run by the image's
own Python (any Python 3 from 3.6 on; the standard library only, no hpcexp).

It imports the experiment's module, calls its factory once (the session's parameters as
keyword arguments) and serves the object's public methods on a unix socket (mode 0600).

Wire format, both directions: a 4-byte big-endian length, then that many bytes of UTF-8
JSON (never pickle). A request is ``{"id": N, "call": NAME, "args": [...], "kwargs": {...}}``
(or ``{"id": N, "op": "ping"}``); the reply ``{"id": N, "result": ...}`` or
``{"id": N, "error": {"kind", "type", "message", "traceback"}}``. A message longer than
the limit is read and thrown away, not kept, and answered with an error; so is one that
is not JSON: the connection and the server carry on. Calls into the object are
serialised (one at a time), because benchmark objects are rarely thread-safe.

The server ends when its standard input closes (the host side of the session is gone)
or on SIGTERM; the session on the host then stops the instance.

Kept importable on the host too (the client shares :func:`encode` and the limits).
"""

import json
import os
import signal
import socket
import struct
import sys
import threading
import traceback

HEADER = struct.Struct(">I")
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024
DISCARD_CHUNK = 1 << 20
PROTOCOL = 1


def encode(obj):
    """One framed message: length header + compact UTF-8 JSON (NaN allowed, as Python's json)."""
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return HEADER.pack(len(body)) + body


def _error(kind, exc_type, message, tb=""):
    return {"kind": kind, "type": exc_type, "message": message, "traceback": tb}


class _Closed(Exception):
    pass


def _read_exact(reader, n):
    data = reader.read(n)
    if data is None or len(data) < n:
        raise _Closed()
    return data


def _discard(reader, n):
    while n > 0:
        chunk = reader.read(min(n, DISCARD_CHUNK))
        if not chunk:
            raise _Closed()
        n -= len(chunk)


class Server(object):
    def __init__(self, target, max_message=DEFAULT_MAX_MESSAGE, log=None):
        self.target = target
        self.max_message = max_message
        self.lock = threading.Lock()
        self.log = log or sys.stderr

    def say(self, text):
        try:
            self.log.write("hpcexp-remote: " + text + "\n")
            self.log.flush()
        except (OSError, ValueError):
            pass

    def answer(self, raw):
        """The reply (a dict) to one request body."""
        try:
            req = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            return {"id": None, "error": _error("protocol", "InvalidJSON",
                                                "the message is not valid UTF-8 JSON: %s" % (exc,))}
        if not isinstance(req, dict):
            return {"id": None, "error": _error("protocol", "InvalidRequest", "a request must be a JSON object")}
        rid = req.get("id")
        if req.get("op") == "ping":
            return {"id": rid, "result": {"protocol": PROTOCOL, "pid": os.getpid(),
                                          "python": sys.version.split()[0]}}
        name = req.get("call")
        args = req.get("args", [])
        kwargs = req.get("kwargs", {})
        if not isinstance(name, str) or not name or name.startswith("_"):
            return {"id": rid, "error": _error("protocol", "InvalidRequest",
                                               "`call` must name a public method (no leading '_'), got %r"
                                               % (name,))}
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            return {"id": rid, "error": _error("protocol", "InvalidRequest",
                                               "`args` must be a list and `kwargs` an object")}
        func = getattr(self.target, name, None)
        if func is None or not callable(func):
            return {"id": rid, "error": _error("protocol", "NoSuchMethod",
                                               "the served object has no method %r" % (name,))}
        with self.lock:
            try:
                result = func(*args, **kwargs)
            except BaseException as exc:  # the caller's exception, with its traceback text
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                return {"id": rid, "error": _error("call", type(exc).__name__, str(exc), traceback.format_exc())}
        return {"id": rid, "result": result}

    def reply(self, conn, message):
        try:
            data = encode(message)
        except (TypeError, ValueError) as exc:
            data = encode({"id": message.get("id"), "error": _error(
                "result", type(exc).__name__, "the result is not JSON: %s" % (exc,))})
        if len(data) - HEADER.size > self.max_message:
            data = encode({"id": message.get("id"), "error": _error(
                "result", "MessageTooLarge", "the result of %d bytes exceeds the limit of %d bytes"
                % (len(data) - HEADER.size, self.max_message))})
        conn.sendall(data)

    def serve_connection(self, conn):
        reader = conn.makefile("rb", buffering=65536)
        try:
            while True:
                try:
                    head = reader.read(HEADER.size)
                    if not head:
                        return
                    if len(head) < HEADER.size:
                        return
                    (n,) = HEADER.unpack(head)
                    if n > self.max_message:
                        self.say("refused a message of %d bytes (limit %d)" % (n, self.max_message))
                        _discard(reader, n)
                        self.reply(conn, {"id": None, "error": _error(
                            "protocol", "MessageTooLarge",
                            "a message of %d bytes exceeds the limit of %d bytes" % (n, self.max_message))})
                        continue
                    raw = _read_exact(reader, n)
                except _Closed:
                    return
                self.reply(conn, self.answer(raw))
        except (OSError, ValueError):
            return
        finally:
            try:
                reader.close()
                conn.close()
            except OSError:
                pass

    def serve(self, listener):
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self.serve_connection, args=(conn,))
            t.daemon = True
            t.start()


def _watch_stdin():
    """End the server when the host side closes our standard input."""
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    os._exit(0)


def main(argv):
    import argparse
    import importlib

    parser = argparse.ArgumentParser(prog="hpcexp-remote")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--module", required=True)
    parser.add_argument("--factory", required=True)
    parser.add_argument("--path", action="append", default=[])
    parser.add_argument("--max-message", type=int, default=DEFAULT_MAX_MESSAGE)
    parser.add_argument("--watch-stdin", action="store_true")
    opts = parser.parse_args(argv)
    for folder in reversed(opts.path):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        params = json.loads(os.environ.get("HPCEXP_PARAMS") or "{}")
        module = importlib.import_module(opts.module)
        factory = getattr(module, opts.factory)
        target = factory(**params)
    except BaseException:
        sys.stderr.write("hpcexp-remote: could not make the served object %s.%s:\n%s"
                         % (opts.module, opts.factory, traceback.format_exc()))
        sys.stderr.flush()
        return 3
    os.umask(0o177)  # the socket is born 0600
    # bound and listening under a temporary name, then renamed: whoever sees the socket's
    # name can connect at once
    temporary = "%s.%d.tmp" % (opts.socket, os.getpid())
    for name in (temporary, opts.socket):
        try:
            os.unlink(name)
        except OSError:
            pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(temporary)
    os.chmod(temporary, 0o600)
    listener.listen(64)
    os.rename(temporary, opts.socket)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if opts.watch_stdin:
        t = threading.Thread(target=_watch_stdin)
        t.daemon = True
        t.start()
    server = Server(target, max_message=opts.max_message)
    server.say("serving %s.%s on %s (pid %d, Python %s)" % (opts.module, opts.factory, opts.socket, os.getpid(),
                                                             sys.version.split()[0]))
    sys.stdout.write("hpcexp-remote: ready\n")
    sys.stdout.flush()
    server.serve(listener)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
