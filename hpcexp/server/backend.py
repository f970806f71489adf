"""Every call the dashboard makes into the rest of hpcexp, in one module.

The pages, the JSON API and the actions call only these functions, and each calls the
application layer's use case behind the matching CLI command (named in its docstring):
the same request types, the same checks, the same results. How a run, a size or an age
is shown comes from :mod:`hpcexp.app.views`, which the CLI prints from too, so the
server has no second copy of any rule or format.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Sequence

from hpcexp.app import runs as app_runs
from hpcexp.app import views
from hpcexp.app.progress import Progress
from hpcexp.core.config import Project
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.core.runs import RunRecord
from hpcexp.infra.jsonable import to_jsonable

__all__ = ["Item", "Progress", "age_of", "build", "details", "exit_cell", "experiments", "follow_log",
           "human_age", "human_size", "images", "last_runs", "load_project", "open_archive", "parse_params",
           "read_record", "resolve", "run_detached", "run_json", "runs", "state_order", "stop", "submit",
           "summarize", "to_jsonable"]

Item = app_runs.Item
exit_cell = views.exit_cell
human_age = views.human_age
human_size = views.human_size
summarize = app_runs.summarize


# --------------------------------------------------------------------------------------
# Reading (hpcexp list, images, status, runs)
# --------------------------------------------------------------------------------------

def load_project(root: Path) -> Project:
    """The project, read afresh (hpcexp.yaml may change while the server runs), as every CLI call does."""
    from hpcexp.core.config import load_project as _load

    return _load(root)


def experiments(project: Project) -> list[Any]:
    """``hpcexp list --json``: build.inventory.describe."""
    from hpcexp.build.inventory import describe

    return describe(project)


def last_runs(project: Project) -> dict[str, Item]:
    """The newest run of each experiment (reconciled), for the experiments page."""
    from hpcexp.core.runs import iter_runs

    newest: dict[str, Item] = {}
    for paths, rec in iter_runs(Layout(project)):
        cur = newest.get(rec.experiment)
        if cur is None or (rec.created_at, rec.run_id) > (cur[1].created_at, cur[1].run_id):
            newest[rec.experiment] = (paths, rec)
    fresh = app_runs.reconciled(Layout(project), list(newest.values()), by_time=False)
    return {name: item for name, item in zip(newest, fresh)}


def images(project: Project) -> list[Any]:
    """``hpcexp images --json``: app.build.images (the local images)."""
    from hpcexp.app import build as app_build

    return app_build.images(project).entries


def runs(project: Project, experiment: str | None = None) -> list[Item]:
    """``hpcexp runs [NAME] --json``: app.runs.list_runs (reconciled, by time)."""
    return app_runs.list_runs(project, app_runs.RunsRequest(experiment=experiment)).items


def resolve(project: Project, ref: str) -> list[Item]:
    """``hpcexp status REF --json``: app.runs.status (id, prefix, experiment, @last, sweep; reconciled).

    A page view starts no background export (the CLI's ``status`` does)."""
    return app_runs.status(project, app_runs.StatusRequest(ref=ref, export=False, describe=False)).items


def read_record(paths: RunPaths) -> RunRecord:
    from hpcexp.core.runs import read_record as _read

    return _read(paths)


def run_json(item: Item) -> dict[str, Any]:
    """One element of ``hpcexp status --json`` (the same shape: app.views.json_rows)."""
    return views.json_rows([item])[0]


def state_order() -> tuple[str, ...]:
    return app_runs.STATE_ORDER


def age_of(rec: RunRecord) -> float | None:
    return views.age_of(rec)


def details(item: Item) -> list[tuple[str, str]]:
    """The key/value lines of ``hpcexp status RUN`` (app.views.details)."""
    out = []
    for line in views.details(*item):
        key, _, value = line.partition(": ")
        out.append((key, value))
    return out


# --------------------------------------------------------------------------------------
# Actions (hpcexp build, run --detach, submit, stop)
# --------------------------------------------------------------------------------------

def parse_params(items: Sequence[str]) -> dict[str, str]:
    """``-p KEY=VALUE`` items, with the CLI's rules (app.runs.parse_params)."""
    return app_runs.parse_params(items)


def build(project: Project, name: str, *, arch: str | None = None, force: bool = False,
          progress: Progress | None = None) -> Any:
    """``hpcexp build NAME``: app.build.build (waits for another builder of the same image)."""
    from hpcexp.app import build as app_build

    result = app_build.build(project, app_build.BuildRequest(names=(name,), arch=arch, force=force),
                             progress=progress)
    if result.failure is not None:
        raise result.failure
    return result.images[0]


def run_detached(project: Project, name: str, params: Sequence[str], *, arch: str | None = None,
                 progress: Progress | None = None, cmdline: Sequence[str] | None = None) -> Item:
    """``hpcexp run NAME -p ... --detach``: app.runs.run with detach (no tee, no terminal)."""
    req = app_runs.RunRequest(name=name, params=tuple(params), arch=arch, detach=True, tee=False,
                              interactive=False, cmdline=tuple(cmdline or ("hpcexp", "serve")))
    result = app_runs.run(project, req, progress=progress)
    return result.paths, result.record


def submit(project: Project, name: str, params: Sequence[str], sweeps: Sequence[str], *,
           arch: str | None = None, progress: Progress | None = None,
           cmdline: Sequence[str] | None = None) -> dict[str, Any]:
    """``hpcexp submit NAME -p ... --sweep K=V1,V2 --json``: app.submit.submit (one job, or one job array)."""
    from hpcexp.app import submit as app_submit

    req = app_submit.SubmitRequest(name=name, params=tuple(params), sweeps=tuple(sweeps), arch=arch,
                                   cmdline=tuple(cmdline or ("hpcexp", "serve")))
    sub = app_submit.submit(project, req, progress=progress).submission
    return {"experiment": sub.experiment, "sweep_id": sub.sweep_id, "job_ids": sub.job_ids,
            "runs": [{"run_id": rec.run_id, "state": rec.state, "task_index": rec.task_index,
                      "params": rec.params, "attempt": rec.attempt, "image": rec.image,
                      "executor_ids": rec.executor_ids, "dir": str(paths.dir)} for paths, rec in sub.runs]}


def stop(project: Project, refs: Sequence[str], *, grace: float = app_runs.DEFAULT_GRACE) -> list[Item]:
    """``hpcexp stop REF... --json``: app.runs.stop (each executor's stop; a damaged record refuses all)."""
    return app_runs.stop(project, app_runs.StopRequest(refs=tuple(refs), grace=grace)).after


# --------------------------------------------------------------------------------------
# Archives and logs (hpcexp archive, hpcexp logs -f)
# --------------------------------------------------------------------------------------

def open_archive(project: Project, refs: Sequence[str], fmt: str, *, warn: Callable[[str], None] | None = None
                 ) -> Any:
    """``hpcexp archive REF --format FMT`` without a file: pass 1 done, pass 2 written to any sink."""
    from hpcexp import archive

    return archive.open_stream(Layout(project), list(refs), fmt=fmt, warn=warn)


def log_path(paths: RunPaths, rec: RunRecord, which: str) -> Path:
    return paths.attempt_stdout(rec.attempt) if which == "stdout" else paths.attempt_stderr(rec.attempt)


def follow_log(project: Project, paths: RunPaths, which: str, out: IO[bytes], *, lines: int | None,
               gone: threading.Event, on_attempt: Callable[[int], None] | None = None,
               start_attempt: int | None = None) -> None:
    """``hpcexp logs -f RUN [--stderr]``: execute.logs.follow by name until the run ends.

    Also across attempts (a requeued Slurm job writes ``stdout.N.log``): when the record's
    attempt changes, the current file is drained and the new attempt's file followed from
    its start. Returns when the run has ended and everything was sent, or when ``gone``
    is set (the client left).
    """
    from hpcexp.execute import logs
    from hpcexp.execute.base import poll_interval, reconcile

    layout = Layout(project)
    rec = read_record(paths)
    attempt = start_attempt or rec.attempt
    first = True
    while True:
        state = {"next": 0.0, "attempt": attempt, "ended": False}

        def until(state: dict[str, Any] = state) -> bool:
            if gone.is_set():
                return True
            now = time.monotonic()
            current = read_record(paths)
            if current.attempt != state["attempt"]:
                state["attempt"] = current.attempt
                return True
            if current.terminal:
                state["ended"] = True
                return True
            if now >= state["next"]:
                state["next"] = now + poll_interval([current])
                current = reconcile(layout, [(paths, current)])[0][1]
                state["ended"] = current.terminal
                return current.terminal
            return False

        if on_attempt is not None:
            on_attempt(attempt)
        target = paths.attempt_stdout(attempt) if which == "stdout" else paths.attempt_stderr(attempt)
        logs.follow([("", target)], until, out=out, lines=lines if first else None, poll=0.1)
        first = False
        if gone.is_set() or state["ended"] or state["attempt"] == attempt:
            return
        attempt = state["attempt"]
