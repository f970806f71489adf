"""Dockerfile -> Apptainer recipe conversion (contract; implementation in progress).

The build, the CLI and the tests depend only on :class:`Conversion`, :class:`Note`,
:class:`BaseResolution` and :func:`convert` below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping


@dataclass(frozen=True)
class Note:
    """One line of the fidelity report."""

    line: int            # Dockerfile line (1-based; 0 when not tied to a line)
    construct: str       # e.g. "USER", "RUN --mount=type=cache", "COPY --chown"
    action: str          # "translated" | "approximated" | "dropped"
    reason: str          # why, in one sentence a researcher understands
    code: str | None = None  # defect code from the spython gap catalogue (P01..P31) when relevant


@dataclass(frozen=True)
class BaseResolution:
    """What a FROM reference became: the recipe header ``Bootstrap: X`` / ``From: Y``."""

    bootstrap: str       # "docker" | "localimage" | "oras" | "library" | ...
    source: str          # the From: value (a path for localimage, a reference otherwise)


@dataclass(frozen=True)
class Conversion:
    """The result of converting one Dockerfile."""

    recipe: str                                   # full .def text, deterministic
    notes: tuple[Note, ...]
    dockerfile: Path
    dockerfile_sha256: str
    context: Path
    arch: str
    context_files: tuple[tuple[str, Path], ...] = ()  # (path relative to context, absolute path) copied in
    base_refs: tuple[str, ...] = ()               # external FROM references after ARG resolution, stage order
    workdir: str | None = None                    # final WORKDIR of the last stage, if any
    build_args: Mapping[str, str] = field(default_factory=dict)  # resolved ARG values used

    @property
    def approximated(self) -> bool:
        return any(n.action != "translated" for n in self.notes)


BaseResolver = Callable[[str], "BaseResolution | None"]


def convert(dockerfile: Path, *, context: Path | None = None, arch: str = "amd64",
            build_args: Mapping[str, str] | None = None, resolve_base: BaseResolver | None = None,
            source_label: str | None = None) -> Conversion:
    """Convert ``dockerfile`` (build context ``context``, default its folder) into a recipe."""
    raise NotImplementedError
