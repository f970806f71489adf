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
    from hpcexp.build.registry import Pin


@dataclass(frozen=True)
class BuildRequest:
    names: tuple[str, ...] = ()
    all: bool = False
    arch: str | None = None
    force: bool = False          # rebuild even when a current image exists
    wait: bool = True            # False: LockBusy (exit 75) when someone else builds the same image
    quiet: bool = False          # progress gets warnings only
    host_network: bool | None = None  # False: no host CA bundle or proxy in build steps (None: hpcexp.yaml's)


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

    if req.host_network is not None and req.host_network != project.host_network:
        import dataclasses

        project = dataclasses.replace(project, host_network=req.host_network)
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
    """Local images with their registry state (``registry[i]`` belongs to ``entries[i]``:
    pushed, pinned, signed, pulled), and the pins of hpcexp.lock not pulled here yet."""

    entries: list["ImageEntry"]
    registry: list[str] = field(default_factory=list)
    missing: list["Pin"] = field(default_factory=list)

    def to_json(self) -> list[dict[str, Any]]:
        from hpcexp.infra.jsonable import to_jsonable

        return ([dict(to_jsonable(e), registry=s) for e, s in zip(self.entries, self.registry)]
                + [{"experiment": p.experiment, "arch": p.arch, "state": "not here", "input_hash": p.input_hash,
                    "size": p.size, "registry": pin_registry_cell(p), "ref": p.ref}
                   for p in self.missing])


def pin_registry_cell(pin: "Pin") -> str:
    """The REGISTRY cell of a pin not pulled here."""
    return "pinned" + (",signed" if pin.signed_by else "")


def redact_ref(ref: str) -> str:
    """A registry reference as it may be shown: no ``user:password@``."""
    from hpcexp.build.registry import redact

    return redact(ref)


def images(project: Project, req: ImagesRequest = ImagesRequest()) -> ImagesResult:
    """Every image of the images folder with its registry state, and the pins not here."""
    from hpcexp.build import registry
    from hpcexp.build.image import list_images

    entries = list_images(project)
    states = [registry.image_state(project, e.path, e.experiment, e.arch, e.input_hash) for e in entries]
    missing = registry.pins_not_here(project, {(e.experiment, e.arch, e.input_hash) for e in entries})
    return ImagesResult(entries=entries, registry=states, missing=missing)


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
