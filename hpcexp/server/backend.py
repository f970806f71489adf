"""Every call the dashboard makes into the rest of hpcexp, in one module.

The pages, the JSON API and the actions call only these functions, each of which calls
the same library functions as the matching CLI command (named in its docstring), so the
server has no second copy of their rules. When the application layer (``hpcexp.app``,
one function per use case) grows the matching functions, this module is the one place to
rewire.
"""

from __future__ import annotations

import importlib
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Sequence

from hpcexp.core.config import Project
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.core.runs import RunRecord

Item = tuple[RunPaths, RunRecord]
Progress = Callable[[str, str], None]


# --------------------------------------------------------------------------------------
# Reading (hpcexp list, images, status, runs)
# --------------------------------------------------------------------------------------

def load_project(root: Path) -> Project:
    """The project, read afresh (hpcexp.yaml may change while the server runs), as every CLI call does."""
    from hpcexp.core.config import load_project as _load

    return _load(root)


def to_jsonable(obj: Any) -> Any:
    from hpcexp.cli.common import to_jsonable as _tj

    return _tj(obj)


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
    return {name: item for name, item in zip(newest, _reconciled(project, list(newest.values()), by_time=False))}


def images(project: Project) -> list[Any]:
    """``hpcexp images --json``: build.image.list_images."""
    from hpcexp.build.image import list_images

    return list_images(project)


def _reconciled(project: Project, items: Sequence[Item], by_time: bool = True) -> list[Item]:
    from hpcexp.cli.run_cmds import _reconciled as reconciled

    return reconciled(Layout(project), items, by_time=by_time)


def runs(project: Project, experiment: str | None = None) -> list[Item]:
    """``hpcexp status --json`` / ``hpcexp runs [NAME] --json``: iter_runs + reconcile, by time."""
    from hpcexp.core.config import check_name
    from hpcexp.core.runs import iter_runs

    layout = Layout(project)
    if experiment is not None:
        check_name(experiment, "experiment name")
        if experiment not in project.experiments and not layout.experiment_runs(experiment).is_dir():
            project.experiment(experiment)  # NotFound with a did-you-mean
    return _reconciled(project, list(iter_runs(layout, experiment)))


def resolve(project: Project, ref: str) -> list[Item]:
    """``hpcexp status REF --json``: resolve (id, prefix, experiment, @last, sweep) + reconcile."""
    from hpcexp.core.runs import resolve as _resolve

    return _reconciled(project, _resolve(Layout(project), ref), by_time=False)


def read_record(paths: RunPaths) -> RunRecord:
    from hpcexp.core.runs import read_record as _read

    return _read(paths)


def run_json(item: Item) -> dict[str, Any]:
    """One element of ``hpcexp status --json`` (the same shape: the CLI's own row builder)."""
    from hpcexp.cli.run_cmds import json_rows

    return json_rows([item])[0]


def summarize(records: Sequence[RunRecord]) -> str:
    """The one-line summary ``hpcexp status SWEEP`` prints."""
    from hpcexp.cli.run_cmds import summarize as _summarize

    return _summarize(records)


def state_order() -> tuple[str, ...]:
    from hpcexp.cli.run_cmds import STATE_ORDER

    return STATE_ORDER


def exit_cell(rec: RunRecord) -> str:
    from hpcexp.cli.run_cmds import exit_cell as _exit_cell

    return _exit_cell(rec)


def human_age(seconds: float | None) -> str:
    from hpcexp.cli.common import human_age as _h

    return _h(seconds)


def human_size(n: int | None) -> str:
    from hpcexp.cli.common import human_size as _h

    return _h(n)


def age_of(rec: RunRecord) -> float | None:
    from hpcexp.core.runs import parse_time

    created = parse_time(rec.created_at)
    return None if created is None else time.time() - created


def details(item: Item) -> list[tuple[str, str]]:
    """The key/value lines of ``hpcexp status RUN``."""
    from hpcexp.cli.run_cmds import _details

    out = []
    for line in _details(*item):
        key, _, value = line.partition(": ")
        out.append((key, value))
    return out


# --------------------------------------------------------------------------------------
# Actions (hpcexp build, run --detach, submit, stop)
# --------------------------------------------------------------------------------------

def parse_params(items: Sequence[str]) -> dict[str, str]:
    """``-p KEY=VALUE`` items, with the CLI's rules."""
    from hpcexp.runtime import launch

    return launch.parse_params(items)


def build(project: Project, name: str, *, arch: str | None = None, force: bool = False,
          progress: Progress | None = None) -> Any:
    """``hpcexp build NAME``: build.image.ensure_image (waits for another builder of the same image)."""
    from hpcexp.build.image import ensure_image
    from hpcexp.core.config import host_arch

    exp = project.experiment(name)
    return ensure_image(project, exp, arch or host_arch(), force=force, progress=progress)


def run_detached(project: Project, name: str, params: Sequence[str], *, arch: str | None = None,
                 progress: Progress | None = None, cmdline: Sequence[str] | None = None) -> Item:
    """``hpcexp run NAME -p ... --detach``: ensure_image, then execute.local.start_run(detach=True)."""
    from hpcexp.build.image import ensure_image
    from hpcexp.core.config import host_arch
    from hpcexp.execute import local

    exp = project.experiment(name)
    parsed = parse_params(params)
    arch = arch or host_arch()
    image = ensure_image(project, exp, arch, progress=progress)
    return local.start_run(project, exp, image, params=parsed, arch=arch, detach=True, tee=False,
                           interactive=False, cmdline=list(cmdline or ["hpcexp", "serve"]))


def submit(project: Project, name: str, params: Sequence[str], sweeps: Sequence[str], *,
           arch: str | None = None, progress: Progress | None = None,
           cmdline: Sequence[str] | None = None) -> dict[str, Any]:
    """``hpcexp submit NAME -p ... --sweep K=V1,V2 --json``: one job, or one job array for a sweep."""
    from hpcexp.build import image
    from hpcexp.core.config import SlurmResources, host_arch
    from hpcexp.execute import slurm, sweep

    exp = project.experiment(name)
    fixed = parse_params(params)
    grid = [sweep.parse_sweep_option(s) for s in sweeps]
    param_sets = sweep.product(fixed, grid, [])
    resources = exp.slurm.merged(slurm.check_resources(SlurmResources()))
    arch = arch or host_arch()
    image_ref = image.ensure_image(project, exp, arch, progress=progress)
    sub = slurm.submit_runs(project, exp, image_ref, param_sets, resources, sweep=bool(grid), arch=arch,
                            cmdline=list(cmdline or ["hpcexp", "serve"]))
    return {"experiment": sub.experiment, "sweep_id": sub.sweep_id, "job_ids": sub.job_ids,
            "runs": [{"run_id": rec.run_id, "state": rec.state, "task_index": rec.task_index,
                      "params": rec.params, "attempt": rec.attempt, "image": rec.image,
                      "executor_ids": rec.executor_ids, "dir": str(paths.dir)} for paths, rec in sub.runs]}


def stop(project: Project, refs: Sequence[str], *, grace: float = 10.0) -> list[Item]:
    """``hpcexp stop REF... --json``: each executor's ``stop`` for its runs."""
    from hpcexp.core.runs import resolve as _resolve
    from hpcexp.errors import UsageError

    layout = Layout(project)
    items: list[Item] = []
    seen = set()
    for ref in refs:
        for paths, rec in _resolve(layout, ref):
            if paths.dir not in seen:
                seen.add(paths.dir)
                items.append((paths, rec))
    by_exec: dict[str, list[Item]] = {}
    for paths, rec in items:
        by_exec.setdefault(rec.executor, []).append((paths, rec))
    results: dict[Path, Item] = {}
    for executor, group in by_exec.items():
        try:
            module = importlib.import_module(f"hpcexp.execute.{executor}")
        except ImportError:
            module = None
        fn = getattr(module, "stop", None) if module is not None else None
        if fn is None:
            raise UsageError(f"cannot stop runs of executor {executor!r} from this version of hpcexp")
        for paths, rec in fn(layout, group, grace=grace):
            results[paths.dir] = (paths, rec)
    return [results.get(p.dir, (p, r)) for p, r in items]


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
