"""The dashboard's read views: HTML pages (experiments, runs, one run, results, images,
jobs) and the JSON API that mirrors the CLI's ``--json`` shapes."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    RedirectResponse,
    Response,
)

from hpcexp import __version__
from hpcexp.errors import NotFound
from hpcexp.server import backend, files
from hpcexp.server.streams import file_response
from hpcexp.server.web import one_run, project_of, refused_response, render, run_row

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
    return file_response(opened, inline=request.query_params.get("view") == "1")


def _crumbs(rel: str) -> list[tuple[str, str]]:
    parts = [p for p in rel.split("/") if p]
    return [(p, "/".join(parts[: i + 1])) for i, p in enumerate(parts)]




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
