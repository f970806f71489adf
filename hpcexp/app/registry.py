"""Use cases of images that travel: ``push`` (the current image to an OCI registry,
pinned by digest in hpcexp.lock) and ``pull`` (a pinned image, by digest, into the
images folder).

Which experiments a request means, which are skipped and why, and what each outcome
says are decided here, once; the registry client (:mod:`hpcexp.build.registry`, which
loads the HTTP and TLS modules) is imported when a use case runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from hpcexp.app.progress import Progress, silent
from hpcexp.core.config import Project
from hpcexp.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from hpcexp.build.registry import Pin


@dataclass(frozen=True)
class PushRequest:
    names: tuple[str, ...] = ()
    all: bool = False            # every experiment with a current image (the others are skipped, with a warning)
    arch: str | None = None
    to: str | None = None        # oras://HOST/NAMESPACE (default: `registry:` in hpcexp.yaml)
    sign: bool = False
    key_file: Path | None = None  # PEM private key to sign with (implies sign)


@dataclass(frozen=True)
class PushOutcome:
    experiment: str
    arch: str
    pin: "Pin"

    @property
    def line(self) -> str:
        """What a person reads: the pinned reference (no credentials), signed or not."""
        from hpcexp.build.registry import redact

        return f"{self.experiment} {self.arch}: {redact(self.pin.ref)}" + (" (signed)" if self.pin.signed_by else "")


@dataclass
class PushResult:
    outcomes: list[PushOutcome] = field(default_factory=list)

    def to_json(self) -> list[dict[str, Any]]:
        return [dict(o.pin.__dict__) for o in self.outcomes]


def push(project: Project, req: PushRequest, progress: Progress | None = None,
         on_outcome: Callable[[PushOutcome], None] | None = None) -> PushResult:
    """Push each chosen experiment's current image and pin it; each outcome goes to
    ``on_outcome`` as soon as it is pinned (the first failure stops the rest)."""
    from hpcexp.build import image, registry
    from hpcexp.core.config import host_arch

    report = progress or silent
    if req.key_file is not None and not Path(req.key_file).is_file():
        raise UsageError(f"--key {req.key_file}: no such file")
    arch = req.arch or host_arch()
    result = PushResult()
    for exp in project.select(list(req.names), req.all):
        if req.all and arch not in exp.dockerfiles:
            continue
        current = image.current_image(project, exp, arch)
        if req.all and current is None:
            report("warn", f"{exp.name} {arch}: no current image, not pushed (hpcexp build {exp.name})")
            continue
        pin = registry.push(project, exp, arch, current, to=req.to, sign=req.sign, key_file=req.key_file,
                            progress=progress)
        outcome = PushOutcome(exp.name, arch, pin)
        result.outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    return result


@dataclass(frozen=True)
class PullRequest:
    names: tuple[str, ...] = ()
    all: bool = False            # every image hpcexp.lock pins for this architecture
    arch: str | None = None


@dataclass(frozen=True)
class PullOutcome:
    experiment: str
    arch: str
    path: str | None
    sha256: str | None
    ref: str | None
    pulled: bool                 # False: the pinned image was already here

    @property
    def line(self) -> str:
        return f"{self.experiment} {self.arch}: {'pulled' if self.pulled else 'present'} ({self.path})"


@dataclass
class PullResult:
    outcomes: list[PullOutcome] = field(default_factory=list)

    def to_json(self) -> list[dict[str, Any]]:
        return [dict(experiment=o.experiment, arch=o.arch, path=o.path, sha256=o.sha256, ref=o.ref, pulled=o.pulled)
                for o in self.outcomes]


def pull(project: Project, req: PullRequest, progress: Progress | None = None,
         on_outcome: Callable[[PullOutcome], None] | None = None) -> PullResult:
    """Pull each chosen pinned image by digest (its sha256 and signature checked before it
    gets its final name); a pin made for other inputs than the current ones is refused."""
    from hpcexp.build import registry
    from hpcexp.core.config import host_arch

    arch = req.arch or host_arch()
    result = PullResult()
    for exp in project.select(list(req.names), req.all):
        if req.all and registry.read_lock(project).pin(exp.name, arch) is None:
            continue

        def current(exp: Any = exp) -> str:  # computed while the download runs
            from hpcexp.build import image

            return image.prepare(project, exp, arch, write=False).input_hash

        side = registry.pull(project, exp, arch, current_hash=current, progress=progress)
        fresh = bool(side.pop("_pulled", False))
        outcome = PullOutcome(exp.name, arch, side.get("path"), side.get("sha256"), side.get("pulled_from"), fresh)
        result.outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    return result
