"""The images of an experiment's services, found or built before a run or a submission
(docs/services.md).

A service's image is another experiment of the project (found or built like the run's
own image, pinned images pulled) or a SIF file inside the project. Every SIF file is
checked before anything is built, so a missing one costs no build and leaves no run.
"""

from __future__ import annotations

import os
from pathlib import Path

from hpcexp.app.progress import Progress
from hpcexp.core.config import Experiment, Project
from hpcexp.errors import NotFound, UsageError


def check_service_files(project: Project, exp: Experiment) -> None:
    """Each service SIF file exists and resolves inside the project (NotFound, UsageError)."""
    root = os.path.realpath(project.root)
    for svc in exp.services:
        if svc.sif is None:
            continue
        if not svc.sif.is_file():
            raise NotFound(f"experiments.{exp.name}.services.{svc.name}.image: {svc.sif} does not exist",
                           hint="build or copy that SIF file there, or name an experiment of the project")
        real = os.path.realpath(svc.sif)
        if not (real == root or real.startswith(root.rstrip("/") + "/")):
            raise UsageError(f"experiments.{exp.name}.services.{svc.name}.image: {svc.sif} leads outside the "
                             f"project (to {real}); refusing to use it")


def service_images(project: Project, exp: Experiment, arch: str, *, quiet: bool = False,
                   progress: Progress | None = None, dry_run: bool = False) -> dict[str, Path]:
    """Service name -> its image file; experiments' images are found or built now
    (``dry_run``: only where they would be)."""
    from hpcexp.build import image

    check_service_files(project, exp)
    out: dict[str, Path] = {}
    for svc in exp.services:
        if svc.sif is not None:
            out[svc.name] = svc.sif
            continue
        assert svc.image is not None
        other = project.experiment(svc.image)
        if dry_run:
            out[svc.name] = image.prepare(project, other, arch, write=False).image
        else:
            out[svc.name] = Path(image.ensure_image(project, other, arch, quiet=quiet, progress=progress,
                                                    pull=True).path)
    return out
