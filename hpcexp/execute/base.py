"""The Executor protocol, the registry of executors, and the dispatch every command uses.

A run record names the executor that runs it (``run.json: executor``). Everything that
acts on runs (``status``, ``logs``, ``stop``, ``archive``, the web dashboard) goes through
:func:`reconcile`, :func:`stop` and :func:`log_files` here, so it never needs to know
which executor ran a run, and an executor this version does not know is shown as such
(state ``unknown`` with the reason) instead of being skipped.

Executors are registered by name and imported only when a record or a command needs
them: ``hpcexp status`` of local runs never imports the Slurm executor.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Protocol, Sequence, runtime_checkable

from hpcexp.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from hpcexp.core.config import Experiment, Project
    from hpcexp.core.layout import Layout, RunPaths
    from hpcexp.core.runs import RunRecord

#: name -> module that defines ``EXECUTOR``. The names are what run records store.
REGISTRY: dict[str, str] = {
    "local": "hpcexp.execute.local",
    "slurm": "hpcexp.execute.slurm",
}


@dataclass(frozen=True)
class LaunchRequest:
    """What to launch: one run per parameter set of one experiment from one built image.

    ``options`` holds what only one executor understands (the local executor's
    ``detach``/``gpu``/``grace``, the Slurm executor's resources and ``hold``); each
    executor refuses an option it does not know rather than ignoring it.
    """

    project: "Project"
    experiment: "Experiment"
    image: Any                                   # an ImageInfo (path, sha256, input hash, cmd, ...)
    param_sets: tuple[Mapping[str, str], ...] = ({},)
    args: tuple[str, ...] | None = None
    arch: str | None = None
    allow_binds: bool = False
    cmdline: tuple[str, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LogFile:
    """One log of a run's current attempt, with the label ``logs`` prints before its lines."""

    stream: str                                  # "stdout" or "stderr"
    path: Path


@runtime_checkable
class Executor(Protocol):
    """What every executor implements. Records in, records out: an executor never prints."""

    name: str
    #: how often (seconds) a follower of this executor's runs asks it for news
    poll_interval: float

    def launch(self, request: LaunchRequest) -> Any:
        """Create the runs' records, then start or submit them; returns what was launched."""

    def reconcile(self, layout: "Layout", items: Sequence["tuple[RunPaths, RunRecord]"]
                  ) -> list["tuple[RunPaths, RunRecord]"]:
        """Bring these non-terminal records up to date with the executor's own evidence."""

    def stop(self, layout: "Layout", items: Sequence["tuple[RunPaths, RunRecord]"], *,
             grace: float | None = None) -> list["tuple[RunPaths, RunRecord]"]:
        """Stop these runs: SIGTERM (or the image's STOPSIGNAL), then SIGKILL after ``grace``."""

    def log_files(self, paths: "RunPaths", rec: "RunRecord") -> list[LogFile]:
        """The current attempt's logs (earlier attempts keep theirs beside them)."""

    def doctor_checks(self) -> list[tuple[str, str, str, str]]:
        """(name, ok|warn|fail, detail, fix) rows that ``hpcexp doctor`` prints."""


def names() -> list[str]:
    """The executors this version knows, in registry order."""
    return list(REGISTRY)


def get(name: str) -> Executor | None:
    """The executor registered under ``name``, or None for a name this version does not know."""
    module_name = REGISTRY.get(name)
    if module_name is None:
        return None
    return importlib.import_module(module_name).EXECUTOR  # type: ignore[no-any-return]


def require(name: str) -> Executor:
    """Like :func:`get`, but a name this version does not know is a usage error."""
    found = get(name)
    if found is None:
        raise UsageError(f"unknown executor {name!r}: this version of hpcexp knows {', '.join(REGISTRY)}")
    return found


def unknown_reason(name: str) -> str:
    return (f"executor {name!r} is unknown to this version of hpcexp (known: {', '.join(REGISTRY)}); "
            "the record is shown as written")


def _by_executor(items: Iterable["tuple[RunPaths, RunRecord]"]) -> dict[str, list["tuple[RunPaths, RunRecord]"]]:
    groups: dict[str, list[tuple[RunPaths, RunRecord]]] = {}
    for paths, rec in items:
        groups.setdefault(rec.executor, []).append((paths, rec))
    return groups


def reconcile(layout: "Layout", items: Iterable["tuple[RunPaths, RunRecord]"]
              ) -> list["tuple[RunPaths, RunRecord]"]:
    """Every non-terminal record brought up to date by its own executor, in the given order.

    A record whose executor is unknown comes back as ``unknown`` with the reason (in memory
    only: the file is left as written, since a newer hpcexp may still understand it).
    """
    items = list(items)
    out: dict[Path, tuple[RunPaths, RunRecord]] = {p.dir: (p, r) for p, r in items}
    # A damaged record (``error`` set when it was read) is shown as read: no executor can
    # reconcile what it cannot trust.
    live = ((p, r) for p, r in items if not r.terminal and not r.error)
    for name, group in _by_executor(live).items():
        executor = get(name)
        if executor is None:
            for paths, rec in group:
                shown = rec.copy()
                shown.state, shown.reason = "unknown", unknown_reason(name)
                out[paths.dir] = (paths, shown)
            continue
        for paths, rec in executor.reconcile(layout, group):
            out[paths.dir] = (paths, rec)
    return [out[p.dir] for p, _ in items]


def stop(layout: "Layout", items: Sequence["tuple[RunPaths, RunRecord]"], *, grace: float | None = None
         ) -> list["tuple[RunPaths, RunRecord]"]:
    """Stop runs of any executors; refuses (before stopping anything) runs of an unknown one."""
    groups = _by_executor(items)
    unknown = sorted(n for n in groups if n not in REGISTRY)
    if unknown:
        raise UsageError(f"cannot stop runs of {unknown_reason(unknown[0])}")
    results: dict[Path, tuple[RunPaths, RunRecord]] = {}
    for name, group in groups.items():
        for paths, rec in require(name).stop(layout, group, grace=grace):
            results[paths.dir] = (paths, rec)
    return [results.get(p.dir, (p, r)) for p, r in items]


def log_files(paths: "RunPaths", rec: "RunRecord") -> list[LogFile]:
    """The current attempt's logs of any run; the record's own layout for an unknown executor."""
    executor = get(rec.executor)
    if executor is None:
        return [LogFile("stdout", paths.attempt_stdout(rec.attempt)),
                LogFile("stderr", paths.attempt_stderr(rec.attempt))]
    return executor.log_files(paths, rec)


def poll_interval(records: Iterable["RunRecord"]) -> float:
    """How often to ask for news about these runs: the most patient of their executors."""
    intervals = [getattr(get(r.executor), "poll_interval", 10.0) for r in records]
    return max(intervals, default=2.0)
