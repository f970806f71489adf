"""Use cases of the image store: ``build``, ``images`` and ``clean``.

The builder is imported when a use case runs (it brings the converter for a stale
recipe); importing this module costs nothing more than its dataclasses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from hpcexp.app.progress import Progress
from hpcexp.core.config import Project
from hpcexp.errors import HpcexpError

if TYPE_CHECKING:  # pragma: no cover
    from hpcexp.build.image import CleanReport, ImageEntry, ImageInfo


@dataclass(frozen=True)
class BuildRequest:
    names: tuple[str, ...] = ()
    all: bool = False
    arch: str | None = None
    force: bool = False          # rebuild even when a current image exists
    wait: bool = True            # False: LockBusy (exit 75) when someone else builds the same image
    quiet: bool = False          # progress gets warnings only


@dataclass(frozen=True)
class BuildOutcome:
    """One experiment's build: its image, or the error that stopped it (with several
    experiments, one failure does not stop the others)."""

    experiment: str
    arch: str
    image: "ImageInfo | None"
    error: HpcexpError | None
    seconds: float


@dataclass
class BuildResult:
    outcomes: list[BuildOutcome] = field(default_factory=list)
    failure: HpcexpError | None = None

    @property
    def images(self) -> list["ImageInfo"]:
        return [o.image for o in self.outcomes if o.image is not None]


def build(project: Project, req: BuildRequest, progress: Progress | None = None,
          on_outcome: Callable[[BuildOutcome], None] | None = None) -> BuildResult:
    """Convert (when stale) and build each chosen experiment's image, cached by content.

    One experiment: its failure is raised as is (with the build log's tail). Several: each
    outcome goes to ``on_outcome`` as it is known, and the result's ``failure`` sums up.
    """
    from hpcexp.build.image import ensure_image
    from hpcexp.core.config import host_arch

    exps = project.select(list(req.names), req.all)
    arch = req.arch or host_arch()
    result = BuildResult()
    errors: list[HpcexpError] = []
    for exp in exps:
        if req.all and arch not in exp.dockerfiles:
            continue
        t0 = time.monotonic()
        try:
            img = ensure_image(project, exp, arch, force=req.force, quiet=req.quiet, progress=progress,
                               wait=req.wait)
        except HpcexpError as exc:
            if len(exps) == 1:
                raise
            outcome = BuildOutcome(exp.name, arch, None, exc, time.monotonic() - t0)
            errors.append(exc)
        else:
            outcome = BuildOutcome(exp.name, arch, img, None, time.monotonic() - t0)
        result.outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    if errors:
        first = errors[0]
        if len(errors) > 1:
            first.message = f"{len(errors)} of {len(exps)} builds failed; first: {first.message}"
        result.failure = first
    return result


@dataclass(frozen=True)
class ImagesRequest:
    """Every image of the project's images folder."""


@dataclass(frozen=True)
class ImagesResult:
    entries: list["ImageEntry"]


def images(project: Project, req: ImagesRequest = ImagesRequest()) -> ImagesResult:
    from hpcexp.build.image import list_images

    return ImagesResult(entries=list_images(project))


@dataclass(frozen=True)
class CleanRequest:
    dry_run: bool = False
    force: bool = False          # also stale images that run records still point to


@dataclass(frozen=True)
class CleanResult:
    dry_run: bool
    report: "CleanReport"

    def to_json(self) -> dict[str, Any]:
        r = self.report
        return {"dry_run": self.dry_run,
                "removed": [{"path": p, "why": w} for p, w in r.removed],
                "kept": [{"path": p, "why": w} for p, w in r.kept], "freed_bytes": r.freed_bytes}


def clean(project: Project, req: CleanRequest) -> CleanResult:
    """Stale images, orphaned temporary files and dead owners' locks (kept: images runs use)."""
    from hpcexp.build.image import clean as clean_store

    return CleanResult(dry_run=req.dry_run, report=clean_store(project, dry_run=req.dry_run, force=req.force))
