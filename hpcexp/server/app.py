"""The dashboard application: server-rendered pages, the JSON API, downloads and actions.

Built on Starlette (small, no build step, no data-model layer): pages are Jinja2
templates with autoescaping on, so every parameter, log line and file name is text,
never markup; the only JavaScript is ``static/app.js`` (live logs over Server-Sent
Events, job progress). Every call into hpcexp goes through :mod:`hpcexp.server.backend`.
Blocking work runs in Starlette's thread pool (sync endpoints) or, for streams, in a
worker thread behind a bounded :mod:`hpcexp.server.bridge`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from hpcexp import __version__
from hpcexp.errors import HpcexpError, NotFound, UsageError
from hpcexp.server import backend, bridge, files
from hpcexp.server.jobs import Jobs
from hpcexp.server.security import Security, check_csrf

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
MAX_FORM = 256 * 1024
LOG_TAIL_LINES = 1000
FORMATS = {"zip": "zip", "tar.gz": "tar.gz", "tgz": "tar.gz"}
# results files a browser may show inline (anything else is an attachment); never HTML or SVG
INLINE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                ".webp": "image/webp", ".txt": "text/plain", ".log": "text/plain", ".csv": "text/plain",
                ".tsv": "text/plain", ".json": "text/plain", ".md": "text/plain", ".yaml": "text/plain",
                ".out": "text/plain", ".err": "text/plain"}
SANDBOX_CSP = "sandbox; default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"


@dataclass
class Settings:
    project_root: Path
    token: str
    read_only: bool = False
    check_host: bool = True
    secure: bool = False
    jobs: Jobs = field(default_factory=Jobs)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------

def http_status(exc: HpcexpError) -> int:
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, UsageError):
        return 400
    return {3: 503, 75: 409}.get(exc.exit_code, 422)


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


# --------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------

def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["age"] = backend.human_age
    env.filters["size"] = backend.human_size
    env.filters["q"] = lambda s: quote(str(s), safe="")
    env.filters["qpath"] = lambda s: quote(str(s), safe="/")
    env.tests["weblink"] = lambda s: isinstance(s, str) and s.lower().startswith(("https://", "http://"))
    return env


ENV = _env()


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    settings: Settings = request.app.state.settings
    html = ENV.get_template(name).render(request=request, csrf=request.scope.get("state", {}).get("csrf", ""),
                                         read_only=settings.read_only, version=__version__,
                                         project=settings.project_root.name, **context)
    return HTMLResponse(html, status_code=status)


def error_response(request: Request, exc: HpcexpError) -> Response:
    status = http_status(exc)
    if _wants_json(request):
        return JSONResponse({"error": exc.message, "hint": exc.hint}, status_code=status)
    return render(request, "error.html", status=status, message=exc.message, hint=exc.hint)


def os_error_response(request: Request, exc: OSError) -> Response:
    """A file-system error while answering (a name too long, a file gone): never a 500."""
    import errno

    status = {errno.ENAMETOOLONG: 400, errno.ENOENT: 404, errno.ENOTDIR: 404, errno.EACCES: 403,
              errno.EPERM: 403, errno.ELOOP: 403}.get(exc.errno or 0, 503)
    return refused_response(request, files.Refused(exc.strerror or "cannot read the file", status))


def refused_response(request: Request, exc: files.Refused) -> Response:
    if _wants_json(request):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)
    return PlainTextResponse(f"{exc.status}: {exc}\n", status_code=exc.status)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

def project_of(request: Request) -> Any:
    return backend.load_project(request.app.state.settings.project_root)


def run_row(item: backend.Item) -> dict[str, Any]:
    paths, rec = item
    return {"id": rec.run_id, "experiment": rec.experiment, "state": rec.state, "age": backend.age_of(rec),
            "duration": rec.duration(), "exit": backend.exit_cell(rec), "params": sorted(rec.params.items()),
            "sweep": rec.sweep_id, "task": rec.task_index, "executor": rec.executor, "terminal": rec.terminal}


def one_run(project: Any, ref: str) -> backend.Item:
    items = backend.resolve(project, ref)
    if len(items) != 1:
        raise UsageError(f"{ref!r} names {len(items)} runs (a sweep); open one of its tasks")
    return items[0]


async def read_form(request: Request) -> dict[str, str]:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise UsageError("form too large")
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise UsageError("the request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise UsageError("the request body must be a JSON object")
        return data
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise UsageError("the form is not UTF-8") from None
    return {k: v[-1] for k, v in parsed.items()}


def _lines(text: Any, what: str) -> list[str]:
    if text is None:
        return []
    if isinstance(text, list):
        if not all(isinstance(x, str) for x in text):
            raise UsageError(f"{what} must be a list of strings")
        return [x for x in text if x.strip()]
    if isinstance(text, dict):
        return [f"{k}={v}" for k, v in text.items()]
    if not isinstance(text, str):
        raise UsageError(f"{what} must be text")
    return [line.strip() for line in text.replace("\r", "").split("\n") if line.strip()]


def _str_field(form: dict[str, Any], key: str, required: bool = True) -> str | None:
    value = form.get(key)
    if value is None or value == "":
        if required:
            raise UsageError(f"missing field {key!r}")
        return None
    if not isinstance(value, str):
        raise UsageError(f"field {key!r} must be a string")
    return value


# --------------------------------------------------------------------------------------
# Pages
# --------------------------------------------------------------------------------------

def experiments_page(request: Request) -> Response:
    project = project_of(request)
    infos = backend.experiments(project)
    last = backend.last_runs(project)
    rows = []
    for info in infos:
        item = last.get(info.name)
        rows.append({"info": info, "last": run_row(item) if item else None})
    return render(request, "experiments.html", rows=rows, page="experiments")


def _filtered_runs(request: Request, project: Any = None) -> tuple[list[backend.Item], dict[str, str]]:
    project = project if project is not None else project_of(request)
    q = request.query_params
    filters = {k: q.get(k, "") for k in ("experiment", "state", "sweep")}
    items = backend.runs(project, filters["experiment"] or None)
    if filters["state"]:
        items = [it for it in items if it[1].state == filters["state"]]
    if filters["sweep"]:
        items = [it for it in items if it[1].sweep_id == filters["sweep"]]
        items.sort(key=lambda t: (t[1].task_index or 0))
    return items, filters


def runs_page(request: Request) -> Response:
    project = project_of(request)
    items, filters = _filtered_runs(request, project)
    summary = backend.summarize([rec for _, rec in items]) if filters["sweep"] else None
    return render(request, "runs.html", runs=[run_row(it) for it in items], filters=filters,
                  experiments=sorted(project.experiments), states=backend.state_order(), summary=summary,
                  page="runs")


def run_page(request: Request) -> Response:
    project = project_of(request)
    ref = request.path_params["ref"]
    items = backend.resolve(project, ref)
    if len(items) > 1 or (items and items[0][1].sweep_id == ref):
        return RedirectResponse(f"/runs?sweep={quote(items[0][1].sweep_id or '', safe='')}", status_code=303)
    paths, rec = items[0]
    attempts = rec.attempts or []
    return render(request, "run.html", run=run_row((paths, rec)), rec=rec, details=backend.details((paths, rec)),
                  attempts=attempts, page="runs")


def images_page(request: Request) -> Response:
    entries = backend.images(project_of(request))
    return render(request, "images.html", images=entries, page="images")


def job_page(request: Request) -> Response:
    job = request.app.state.settings.jobs.get(request.path_params["job"])
    if job is None:
        raise NotFound("no such job (jobs are kept in memory only, while this server runs)")
    return render(request, "job.html", job=job.to_dict(), page="jobs")


def results_page(request: Request) -> Response:
    project = project_of(request)
    paths, rec = one_run(project, request.path_params["ref"])
    rel = request.path_params.get("path", "")
    root = str(paths.results)
    try:
        parts = files.resolve_inside(root, rel)
        target = Path(files.real_root(root), *parts)
        if target.is_dir():
            entries = files.list_dir(root, rel)
            return render(request, "results.html", run=run_row((paths, rec)), rel=rel, entries=entries,
                          parents=_crumbs(rel), page="runs")
        opened = files.open_file(root, rel)
    except files.Refused as exc:
        return refused_response(request, exc)
    return _file_response(opened, inline=request.query_params.get("view") == "1")


def _crumbs(rel: str) -> list[tuple[str, str]]:
    parts = [p for p in rel.split("/") if p]
    return [(p, "/".join(parts[: i + 1])) for i, p in enumerate(parts)]


def _file_response(opened: files.Opened, inline: bool = False) -> Response:
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
    return StreamingResponse(_iter_in_thread(opened.fd, opened.size), media_type=media, headers=headers)


async def _iter_in_thread(fd: int, size: int):  # noqa: ANN202 - an async generator
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
    return _file_response(opened, inline=request.query_params.get("view") == "1")


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


# --------------------------------------------------------------------------------------
# Actions (forms and API)
# --------------------------------------------------------------------------------------

def _check_write(request: Request, form: dict[str, Any]) -> Response | None:
    settings: Settings = request.app.state.settings
    if settings.read_only:
        text = "this dashboard is read-only (started with --read-only)"
        return JSONResponse({"error": text}, status_code=403) if _wants_json(request) else \
            PlainTextResponse(f"403 Forbidden: {text}\n", status_code=403)
    value = form.get("csrf_token")
    if not check_csrf(request.scope.get("state", {}), value if isinstance(value, str) else None,
                      request.headers.get("x-csrf-token")):
        text = "missing or wrong CSRF token"
        return JSONResponse({"error": text}, status_code=403) if _wants_json(request) else \
            PlainTextResponse(f"403 Forbidden: {text}; reload the page and try again\n", status_code=403)
    return None


def _start(request: Request, kind: str, form: dict[str, Any]) -> Any:
    settings: Settings = request.app.state.settings
    project = project_of(request)
    name = _str_field(form, "experiment")
    assert name is not None
    project.experiment(name)  # NotFound now, not in the job
    arch = _str_field(form, "arch", required=False)
    if arch not in (None, "amd64", "arm64"):
        raise UsageError(f"arch must be amd64 or arm64, not {arch!r}")
    params = _lines(form.get("params"), "params")
    sweeps = _lines(form.get("sweeps"), "sweeps")
    if kind in ("run", "submit"):
        backend.parse_params(params)  # bad parameters are a 400 now
    if kind == "run" and sweeps:
        raise UsageError("a sweep runs through Slurm: use submit")
    force = form.get("force") in ("1", "on", "true", True)

    def work(job: Any) -> Any:
        if kind == "build":
            img = backend.build(project, name, arch=arch, force=force, progress=job.progress)
            return backend.to_jsonable(img)
        if kind == "run":
            paths, rec = backend.run_detached(project, name, params, arch=arch, progress=job.progress)
            job.run_ids.append(rec.run_id)
            return backend.run_json((paths, rec))
        result = backend.submit(project, name, params, sweeps, arch=arch, progress=job.progress)
        job.run_ids.extend(r["run_id"] for r in result["runs"])
        return result

    return settings.jobs.start(kind, name, work)


def _action(kind: str):  # noqa: ANN202 - builds an endpoint
    async def endpoint(request: Request) -> Response:
        form = await read_form(request)
        refused = _check_write(request, form)
        if refused is not None:
            return refused
        if kind == "stop":
            refs = _lines(form.get("refs") or form.get("ref"), "refs")
            if not refs:
                raise UsageError("missing field 'refs'")
            final = await run_in_threadpool(lambda: backend.stop(project_of(request), refs))
            if _wants_json(request):
                return JSONResponse([backend.to_jsonable(backend.run_json(it)) for it in final])
            return RedirectResponse(f"/runs/{quote(final[0][1].run_id, safe='')}" if len(final) == 1 else "/runs",
                                    status_code=303)
        job = await run_in_threadpool(_start, request, kind, form)
        if _wants_json(request):
            return JSONResponse(job.to_dict(), status_code=202, headers={"location": f"/api/jobs/{job.id}"})
        return RedirectResponse(f"/jobs/{job.id}", status_code=303)

    endpoint.__name__ = f"{kind}_action"
    return endpoint


# --------------------------------------------------------------------------------------
# JSON API (the CLI's --json shapes)
# --------------------------------------------------------------------------------------

def api_experiments(request: Request) -> Response:
    return JSONResponse(backend.to_jsonable(backend.experiments(project_of(request))))


def api_runs(request: Request) -> Response:
    items, _ = _filtered_runs(request)
    return JSONResponse([backend.run_json(it) for it in items])


def api_run(request: Request) -> Response:
    items = backend.resolve(project_of(request), request.path_params["ref"])
    return JSONResponse([backend.run_json(it) for it in items])


def api_images(request: Request) -> Response:
    return JSONResponse(backend.to_jsonable(backend.images(project_of(request))))


def api_job(request: Request) -> Response:
    job = request.app.state.settings.jobs.get(request.path_params["job"])
    if job is None:
        raise NotFound("no such job")
    return JSONResponse(backend.to_jsonable(job.to_dict()))


def api_openapi(request: Request) -> Response:
    from hpcexp.server.openapi import document

    return JSONResponse(document(__version__))


def api_docs(request: Request) -> Response:
    return render(request, "api.html", page="api")


# --------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------

MAPPED = (HpcexpError, files.Refused, OSError)


def _mapped(request: Request, exc: BaseException) -> Response:
    """The one mapping of hpcexp's errors to HTTP responses (404, 400, 403, 507...)."""
    if isinstance(exc, HpcexpError):
        return error_response(request, exc)
    if isinstance(exc, files.Refused):
        return refused_response(request, exc)
    assert isinstance(exc, OSError)
    return os_error_response(request, exc)


def _wrap(fn: Any) -> Any:
    """Map hpcexp's errors to HTTP for sync and async endpoints alike. Two wrappers, one
    mapping: a sync endpoint must stay sync so Starlette runs it in its thread pool."""
    if asyncio.iscoroutinefunction(fn):
        async def aendpoint(request: Request) -> Response:
            try:
                return await fn(request)
            except MAPPED as exc:
                return _mapped(request, exc)
        aendpoint.__name__ = fn.__name__
        return aendpoint

    def endpoint(request: Request) -> Response:
        try:
            return fn(request)
        except MAPPED as exc:
            return _mapped(request, exc)
    endpoint.__name__ = fn.__name__
    return endpoint


def create_app(settings: Settings) -> Any:
    """The ASGI application (the Starlette app behind the security middleware)."""
    routes = [
        Route("/", _wrap(experiments_page)),
        Route("/experiments", _wrap(experiments_page)),
        Route("/runs", _wrap(runs_page)),
        Route("/runs/{ref}", _wrap(run_page)),
        Route("/runs/{ref}/results", _wrap(results_page)),
        Route("/runs/{ref}/results/{path:path}", _wrap(results_page)),
        Route("/runs/{ref}/log/{stream}", _wrap(log_download)),
        Route("/runs/{ref}/log/{stream}/events", _wrap(log_events)),
        Route("/runs/{ref}/archive.{fmt}", _wrap(archive_download)),
        Route("/images", _wrap(images_page)),
        Route("/jobs/{job}", _wrap(job_page)),
        Route("/api", _wrap(api_docs)),
        Route("/api/openapi.json", _wrap(api_openapi)),
        Route("/api/experiments", _wrap(api_experiments)),
        Route("/api/runs", _wrap(api_runs)),
        Route("/api/runs/{ref}", _wrap(api_run)),
        Route("/api/runs/{ref}/log/{stream}/events", _wrap(log_events)),
        Route("/api/runs/{ref}/archive.{fmt}", _wrap(archive_download)),
        Route("/api/images", _wrap(api_images)),
        Route("/api/jobs/{job}", _wrap(api_job)),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    for kind in ("build", "run", "submit", "stop"):
        routes.append(Route(f"/actions/{kind}", _wrap(_action(kind)), methods=["POST"]))
        routes.append(Route(f"/api/{kind}", _wrap(_action(kind)), methods=["POST"]))
    app = Starlette(routes=routes)
    app.state.settings = settings
    return Security(app, token=settings.token, check_host=settings.check_host, secure=settings.secure)


def guess_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"
