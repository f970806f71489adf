"""Streams: log downloads, live logs over Server-Sent Events (across attempts) and archive
downloads, each fed by a worker thread through a bounded bridge so a slow client holds
back only its own stream."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    Response,
    StreamingResponse,
)

from hpcexp.errors import HpcexpError, NotFound, UsageError
from hpcexp.server import backend, bridge, files
from hpcexp.server.web import FORMATS, INLINE_TYPES, LOG_TAIL_LINES, SANDBOX_CSP, one_run, project_of, refused_response

log = logging.getLogger(__name__)

async def iter_in_thread(fd: int, size: int):  # noqa: ANN202 - an async generator
    loop = asyncio.get_running_loop()

    def work(b: bridge.Bridge) -> None:
        for chunk in files.read_chunks(fd, size):
            b.put(chunk)

    br = bridge.start(loop, work, depth=8, name="hpcexp-serve-file")
    async for chunk in br.chunks():
        yield chunk


def log_download(request: Request) -> Response:
    project = project_of(request)
    paths, rec = one_run(project, request.path_params["ref"])
    which = request.path_params["stream"]
    if which not in ("stdout", "stderr"):
        raise NotFound(f"no log {which!r} (stdout or stderr)")
    attempt = request.query_params.get("attempt")
    n = rec.attempt
    if attempt:
        if not attempt.isdigit() or not 1 <= int(attempt) <= max(rec.attempt, 1):
            raise UsageError(f"attempt must be a number from 1 to {rec.attempt}")
        n = int(attempt)
    name = (paths.attempt_stdout(n) if which == "stdout" else paths.attempt_stderr(n)).name
    try:
        opened = files.open_file(str(paths.dir), name)
    except files.Refused as exc:
        return refused_response(request, exc)
    return file_response(opened, inline=request.query_params.get("view") == "1")


# --------------------------------------------------------------------------------------
# Live logs: Server-Sent Events
# --------------------------------------------------------------------------------------

async def log_events(request: Request) -> Response:
    """SSE: ``attempt`` events when an attempt's file starts, ``data`` chunks of text, then ``end``.

    Each event id is ``ATTEMPT:OFFSET`` (bytes of that attempt's text sent so far): a
    reconnecting EventSource sends it back as Last-Event-ID and gets only what it lacks.
    """
    project = await run_in_threadpool(project_of, request)
    paths, rec = await run_in_threadpool(one_run, project, request.path_params["ref"])
    which = request.path_params["stream"]
    if which not in ("stdout", "stderr"):
        raise NotFound(f"no log {which!r} (stdout or stderr)")
    resume_attempt, skip = None, 0
    last = request.headers.get("last-event-id", "")
    if last:
        a, _, off = last.partition(":")
        if a.isdigit() and off.isdigit():
            resume_attempt, skip = int(a), int(off)
    tail = request.query_params.get("tail", str(LOG_TAIL_LINES))
    lines = int(tail) if tail.isdigit() else LOG_TAIL_LINES
    if resume_attempt is not None:
        lines = None  # resuming: count from the start of the attempt
    loop = asyncio.get_running_loop()
    gone = threading.Event()

    def work(b: bridge.Bridge) -> None:
        out = _EventSink(b, skip if resume_attempt is not None else 0)

        def on_attempt(n: int) -> None:
            out.new_attempt(n)

        backend.follow_log(project, paths, which, out, lines=lines, gone=gone, on_attempt=on_attempt,
                           start_attempt=resume_attempt)
        out.flush()
        b.put(b"event: end\ndata: \n\n")

    br = bridge.start(loop, work, depth=16, name="hpcexp-serve-log")

    async def body():  # noqa: ANN202 - an async generator
        try:
            yield b"retry: 1000\n\n"
            async for chunk in br.chunks(heartbeat=15.0, ping=b": ping\n\n"):
                yield chunk
        finally:
            gone.set()
            br.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"cache-control": "no-store", "x-accel-buffering": "no"})


class _EventSink:
    """A binary file object for logs.follow that turns what it writes into SSE ``data`` events."""

    def __init__(self, b: bridge.Bridge, skip: int = 0) -> None:
        self.b = b
        self.buf = bytearray()
        self.attempt = 0
        self.offset = 0
        self.skip = skip

    def new_attempt(self, n: int) -> None:
        self.flush()
        if self.attempt and n != self.attempt:
            self.skip = 0
        self.attempt = n
        self.offset = 0
        self.b.put(f"event: attempt\ndata: {n}\n\n".encode())

    def write(self, data: bytes) -> int:
        if self.skip:
            cut = min(self.skip, len(data))
            self.skip -= cut
            self.offset += cut
            data = data[cut:]
        self.buf += data
        if len(self.buf) >= 64 * 1024:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if not self.buf:
            return
        text = bytes(self.buf)
        self.buf.clear()
        self.offset += len(text)
        # SSE data lines cannot hold a bare CR or LF: send the text JSON-encoded, one line
        payload = json.dumps(text.decode("utf-8", "replace"))
        self.b.put(f"id: {self.attempt}:{self.offset}\ndata: {payload}\n\n".encode())


# --------------------------------------------------------------------------------------
# Archives
# --------------------------------------------------------------------------------------

async def archive_download(request: Request) -> Response:
    ref = request.path_params["ref"]
    fmt = FORMATS.get(request.path_params["fmt"])
    if fmt is None:
        raise NotFound("archives are .zip or .tar.gz")
    project = await run_in_threadpool(project_of, request)
    warnings: list[str] = []
    stream = await run_in_threadpool(lambda: backend.open_archive(project, [ref], fmt, warn=warnings.append))
    loop = asyncio.get_running_loop()

    def work(b: bridge.Bridge) -> None:
        sink = bridge.Sink(b)
        try:
            stream.write_to(sink)
            sink.flush()
        finally:
            stream.close()

    br = bridge.start(loop, work, depth=16, name="hpcexp-serve-archive")
    return AbortableStream(br.chunks(), what=f"archive of {ref}",
                           media_type="application/zip" if fmt == "zip" else "application/gzip",
                           headers={"content-disposition":
                                    f"attachment; filename*=UTF-8''{quote(stream.name, safe='')}",
                                    "x-hpcexp-runs": str(len(stream.runs)),
                                    "x-hpcexp-warnings": str(len(warnings))})


class AbortableStream(StreamingResponse):
    """A streamed body that, when its producer fails halfway (a file changed while being
    archived), ends the connection without the final chunk: the client sees a broken
    transfer, never a short file that looks complete. The server logs one line."""

    def __init__(self, content: Any, *, what: str, **kw: Any) -> None:
        super().__init__(content, **kw)
        self.what = what

    async def stream_response(self, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except HpcexpError as exc:
            log.error("%s aborted: %s", self.what, exc.message)
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def file_response(opened: files.Opened, inline: bool = False) -> Response:
    ext = Path(opened.name).suffix.lower()
    ctype = INLINE_TYPES.get(ext) if inline else None
    headers = {"content-length": str(opened.size), "x-content-type-options": "nosniff"}
    if ctype is not None:
        media = ctype + ("; charset=utf-8" if ctype.startswith("text/") else "")
        headers["content-disposition"] = "inline"
        headers["content-security-policy"] = SANDBOX_CSP
    else:
        media = "application/octet-stream"
        headers["content-disposition"] = f"attachment; filename*=UTF-8''{quote(opened.name, safe='')}"
        headers["content-security-policy"] = SANDBOX_CSP
    return StreamingResponse(iter_in_thread(opened.fd, opened.size), media_type=media, headers=headers)
