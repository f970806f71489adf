"""Actions (forms and API): build, run, submit and stop as background jobs, behind the
write checks (read-only mode, CSRF)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)

from hpcexp.errors import UsageError
from hpcexp.server import backend
from hpcexp.server.security import check_csrf
from hpcexp.server.web import Settings, form_lines, project_of, read_form, str_field, wants_json

# --------------------------------------------------------------------------------------
# Actions (forms and API)
# --------------------------------------------------------------------------------------

def _check_write(request: Request, form: dict[str, Any]) -> Response | None:
    settings: Settings = request.app.state.settings
    if settings.read_only:
        text = "this dashboard is read-only (started with --read-only)"
        return JSONResponse({"error": text}, status_code=403) if wants_json(request) else \
            PlainTextResponse(f"403 Forbidden: {text}\n", status_code=403)
    value = form.get("csrf_token")
    if not check_csrf(request.scope.get("state", {}), value if isinstance(value, str) else None,
                      request.headers.get("x-csrf-token")):
        text = "missing or wrong CSRF token"
        return JSONResponse({"error": text}, status_code=403) if wants_json(request) else \
            PlainTextResponse(f"403 Forbidden: {text}; reload the page and try again\n", status_code=403)
    return None


def _start(request: Request, kind: str, form: dict[str, Any]) -> Any:
    settings: Settings = request.app.state.settings
    project = project_of(request)
    name = str_field(form, "experiment")
    assert name is not None
    project.experiment(name)  # NotFound now, not in the job
    arch = str_field(form, "arch", required=False)
    if arch not in (None, "amd64", "arm64"):
        raise UsageError(f"arch must be amd64 or arm64, not {arch!r}")
    params = form_lines(form.get("params"), "params")
    sweeps = form_lines(form.get("sweeps"), "sweeps")
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


def action(kind: str):  # noqa: ANN202 - builds an endpoint
    async def endpoint(request: Request) -> Response:
        form = await read_form(request)
        refused = _check_write(request, form)
        if refused is not None:
            return refused
        if kind == "stop":
            refs = form_lines(form.get("refs") or form.get("ref"), "refs")
            if not refs:
                raise UsageError("missing field 'refs'")
            final = await run_in_threadpool(lambda: backend.stop(project_of(request), refs))
            if wants_json(request):
                return JSONResponse([backend.to_jsonable(backend.run_json(it)) for it in final])
            return RedirectResponse(f"/runs/{quote(final[0][1].run_id, safe='')}" if len(final) == 1 else "/runs",
                                    status_code=303)
        job = await run_in_threadpool(_start, request, kind, form)
        if wants_json(request):
            return JSONResponse(job.to_dict(), status_code=202, headers={"location": f"/api/jobs/{job.id}"})
        return RedirectResponse(f"/jobs/{job.id}", status_code=303)

    endpoint.__name__ = f"{kind}action"
    return endpoint
