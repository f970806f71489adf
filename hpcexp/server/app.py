"""The dashboard application: the routes, over pages, streams and actions.

Built on Starlette (small, no build step, no data-model layer): pages are Jinja2
templates with autoescaping on, so every parameter, log line and file name is text,
never markup; the only JavaScript is ``static/app.js`` (live logs over Server-Sent
Events, job progress). Every call into hpcexp goes through :mod:`hpcexp.server.backend`.
Blocking work runs in Starlette's thread pool (sync endpoints) or, for streams, in a
worker thread behind a bounded :mod:`hpcexp.server.bridge`.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from hpcexp.server.actions import action
from hpcexp.server.pages import (
    api_docs,
    api_experiments,
    api_images,
    api_job,
    api_openapi,
    api_run,
    api_runs,
    experiments_page,
    images_page,
    job_page,
    results_page,
    run_page,
    runs_page,
)
from hpcexp.server.security import Security
from hpcexp.server.streams import archive_download, log_download, log_events
from hpcexp.server.web import HERE, Settings, wrap

__all__ = ["Settings", "create_app"]


def create_app(settings: Settings) -> Any:
    """The ASGI application (the Starlette app behind the security middleware)."""
    routes = [
        Route("/", wrap(experiments_page)),
        Route("/experiments", wrap(experiments_page)),
        Route("/runs", wrap(runs_page)),
        Route("/runs/{ref}", wrap(run_page)),
        Route("/runs/{ref}/results", wrap(results_page)),
        Route("/runs/{ref}/results/{path:path}", wrap(results_page)),
        Route("/runs/{ref}/log/{stream}", wrap(log_download)),
        Route("/runs/{ref}/log/{stream}/events", wrap(log_events)),
        Route("/runs/{ref}/archive.{fmt}", wrap(archive_download)),
        Route("/images", wrap(images_page)),
        Route("/jobs/{job}", wrap(job_page)),
        Route("/api", wrap(api_docs)),
        Route("/api/openapi.json", wrap(api_openapi)),
        Route("/api/experiments", wrap(api_experiments)),
        Route("/api/runs", wrap(api_runs)),
        Route("/api/runs/{ref}", wrap(api_run)),
        Route("/api/runs/{ref}/log/{stream}/events", wrap(log_events)),
        Route("/api/runs/{ref}/archive.{fmt}", wrap(archive_download)),
        Route("/api/images", wrap(api_images)),
        Route("/api/jobs/{job}", wrap(api_job)),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    for kind in ("build", "run", "submit", "stop"):
        routes.append(Route(f"/actions/{kind}", wrap(action(kind)), methods=["POST"]))
        routes.append(Route(f"/api/{kind}", wrap(action(kind)), methods=["POST"]))
    app = Starlette(routes=routes)
    app.state.settings = settings
    return Security(app, token=settings.token, check_host=settings.check_host, secure=settings.secure)
