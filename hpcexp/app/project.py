"""Use cases about the project as a whole: ``init``, ``list`` and ``doctor``.

``list`` is benchmarked start-up (``hpcexp list --json``): this module imports only the
cheap inventory at top level; ``init`` and ``doctor`` import what they need when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hpcexp.build.inventory import ExperimentInfo, describe
from hpcexp.core.config import Project

if TYPE_CHECKING:  # pragma: no cover
    from hpcexp.app.doctor import Check
    from hpcexp.app.scaffold import InitResult


@dataclass(frozen=True)
class InitRequest:
    directory: Path


def init(req: InitRequest) -> "InitResult":
    """Create a project in ``req.directory``; refuses (writing nothing) if any file exists."""
    from hpcexp.app.scaffold import init_project  # atomic writes: not needed by `list`

    return init_project(Path(req.directory))


@dataclass(frozen=True)
class ListRequest:
    """Nothing to choose yet: every experiment of the project."""


@dataclass(frozen=True)
class ListResult:
    experiments: list[ExperimentInfo]


def list_experiments(project: Project, req: ListRequest = ListRequest()) -> ListResult:
    """Experiments with their Dockerfiles per architecture and recipe/image state (cheap)."""
    return ListResult(experiments=describe(project))


@dataclass(frozen=True)
class DoctorRequest:
    """``project_dir``: the folder named explicitly (``--project``), else None: look from ``cwd``
    (None: the process's working directory) up to hpcexp.yaml, and outside a project check the
    machine only."""

    project_dir: str | None = None
    cwd: Path | None = None


@dataclass(frozen=True)
class DoctorResult:
    checks: list["Check"]
    project: Path | None
    project_error: str | None     # only when a project was named explicitly and could not be loaded

    @property
    def failed(self) -> list["Check"]:
        return [c for c in self.checks if c.failed_required]

    @property
    def ok(self) -> bool:
        return not self.failed


def doctor(req: DoctorRequest) -> DoctorResult:
    """Every check, never stopping at the first failure; works outside a project too."""
    from hpcexp.app.doctor import run_checks  # probes apptainer, Slurm: only when asked
    from hpcexp.core.config import find_project_root, load_project
    from hpcexp.errors import HpcexpError

    project = None
    error = None
    try:
        if req.project_dir is None and req.cwd is not None:
            project = load_project(find_project_root(start=req.cwd))
        else:
            project = load_project(explicit=req.project_dir)
    except HpcexpError as exc:  # doctor is useful outside a project too
        error = exc
    return DoctorResult(checks=run_checks(project), project=project.root if project else None,
                        project_error=str(error) if error is not None and req.project_dir else None)
