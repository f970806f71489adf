"""The fidelity report: one :class:`Note` per construct that was translated, approximated or
dropped, and the :class:`Conversion` result that carries them with the recipe.

The codes P01..P33 a note cites are defined in ``docs/conversion.md``; :data:`CODES` names
them so that a code the converter cites but the documentation does not define is caught by
a test. Split from the interpreter and the writer because build/, cli/ and the report file
depend on this contract alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from hpcexp import __version__


class Note(NamedTuple):
    """One line of the fidelity report (immutable; a named tuple because a converter makes
    dozens per Dockerfile and a frozen dataclass is three times slower to create)."""

    line: int            # Dockerfile line (1-based; 0 when not tied to a line)
    construct: str       # e.g. "USER", "RUN --mount=type=cache", "COPY --chown"
    action: str          # "translated" | "approximated" | "dropped"
    reason: str          # why, in one sentence a researcher understands
    code: str | None = None  # the code of docs/conversion.md (P01..P33, see CODES) when relevant




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
    source_label: str = ""                        # how the recipe header names the Dockerfile
    cmd: tuple[str, ...] | None = None            # last stage's CMD as an argv (shell form: sh -c TEXT)
    entrypoint: tuple[str, ...] | None = None     # last stage's ENTRYPOINT as an argv
    environment: Mapping[str, str] = field(default_factory=dict)  # the image's known environment (base + ENV)
    stopsignal: str | None = None                 # last stage's STOPSIGNAL, as a signal name (SIGINT...)
    observed: Mapping[str, Any] | None = None     # what was read of the build context (BuildContext.observed:
    #                                               ignore files, listings, kinds); None: not known

    @property
    def approximated(self) -> bool:
        return any(n.action != "translated" for n in self.notes)

    def counts(self) -> dict[str, int]:
        out = {"translated": 0, "approximated": 0, "dropped": 0}
        for n in self.notes:
            out[n.action] = out.get(n.action, 0) + 1
        return out

    def report(self, recipe_name: str | None = None) -> dict[str, Any]:
        """The fidelity report as saved in NAME.ARCH.report.json (no machine-specific paths)."""
        return {
            "dockerfile": self.source_label,
            "dockerfile_sha256": self.dockerfile_sha256,
            "hpcexp_version": __version__,
            "arch": self.arch,
            "recipe": recipe_name,
            "base_refs": list(self.base_refs),
            "build_args": dict(sorted(self.build_args.items())),
            "workdir": self.workdir,
            "stopsignal": self.stopsignal,
            "context_files": [rel for rel, _ in self.context_files],
            "counts": self.counts(),
            "notes": [{"line": n.line, "construct": n.construct, "action": n.action, "reason": n.reason,
                       "code": n.code} for n in self.notes],
        }


# The codes of docs/conversion.md (its ### headings), for checking that every cited code is defined.
CODES: dict[str, str] = {
    'P01': 'FROM references',
    'P02': 'Stages',
    'P03': 'COPY --from',
    'P04': 'COPY/ADD flags',
    'P05': 'Paths and variables in COPY/ADD',
    'P06': 'Order of COPY and RUN',
    'P07': 'JSON form of COPY/ADD',
    'P08': 'ADD',
    'P09': 'ENV during the build',
    'P10': 'Legacy `KEY value` form of ENV and LABEL',
    'P11': 'ENV values referring to ARG/ENV',
    'P12': 'ARG',
    'P13': 'USER',
    'P14': 'WORKDIR',
    'P15': 'CMD only',
    'P16': 'ENTRYPOINT (+ CMD)',
    'P17': 'Shell-form ENTRYPOINT/CMD',
    'P18': 'No CMD/ENTRYPOINT',
    'P19': 'SHELL',
    'P20': 'Heredocs',
    'P21': 'RUN --mount',
    'P22': 'Comments inside continuations',
    'P23': 'Exec-form RUN',
    'P24': 'HEALTHCHECK',
    'P25': 'ONBUILD',
    'P26': 'LABEL',
    'P27': 'EXPOSE, VOLUME, STOPSIGNAL',
    'P28': 'Parser directives',
    'P29': 'Lower-case instructions',
    'P30': 'Keywords inside continuations and heredocs',
    'P31': '.dockerignore and COPY --exclude',
    'P32': 'A source wildcard that matches nothing',
    'P33': 'Variables the base image defines',
}
