"""What every dashboard endpoint shares: settings, templates, forms, and the one mapping of
hpcexp's errors to HTTP responses."""

from __future__ import annotations

import asyncio
import json
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
)

from hpcexp import __version__
from hpcexp.errors import HpcexpError, NotFound, UsageError
from hpcexp.server import backend, files
from hpcexp.server.jobs import Jobs

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


def wants_json(request: Request) -> bool:
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
    if wants_json(request):
        return JSONResponse({"error": exc.message, "hint": exc.hint}, status_code=status)
    return render(request, "error.html", status=status, message=exc.message, hint=exc.hint)


def os_error_response(request: Request, exc: OSError) -> Response:
    """A file-system error while answering (a name too long, a file gone): never a 500."""
    import errno

    status = {errno.ENAMETOOLONG: 400, errno.ENOENT: 404, errno.ENOTDIR: 404, errno.EACCES: 403,
              errno.EPERM: 403, errno.ELOOP: 403}.get(exc.errno or 0, 503)
    return refused_response(request, files.Refused(exc.strerror or "cannot read the file", status))


def refused_response(request: Request, exc: files.Refused) -> Response:
    if wants_json(request):
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


def form_lines(text: Any, what: str) -> list[str]:
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


def str_field(form: dict[str, Any], key: str, required: bool = True) -> str | None:
    value = form.get(key)
    if value is None or value == "":
        if required:
            raise UsageError(f"missing field {key!r}")
        return None
    if not isinstance(value, str):
        raise UsageError(f"field {key!r} must be a string")
    return value



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


def wrap(fn: Any) -> Any:
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


def guess_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"
