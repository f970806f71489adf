"""Dockerfile -> Apptainer recipe conversion, with a fidelity report: the public entry points.

The build, the CLI and the tests depend only on :class:`Conversion`, :class:`Note`,
:class:`BaseResolution` and :func:`convert` below (and :class:`IgnoreRules`,
:func:`heredoc_marker`, re-exported from where they live).

The pipeline is parser -> model -> writer (why, and the codes P01..P33 of the fidelity
report: docs/conversion.md):

1. :mod:`hpcexp.convert.dockerfile` tokenizes the Dockerfile (directives, continuations, comments,
   heredocs, flags, JSON form). spython reads raw lines and guesses, which is where most of
   its defects come from, so it never sees the file as a whole.
2. :mod:`hpcexp.convert.interpret` (with :mod:`~hpcexp.convert.staging` for COPY/ADD/RUN
   --mount and :mod:`~hpcexp.convert.context` for the build context and .dockerignore)
   reads each instruction with Docker's semantics into the typed model of
   :mod:`hpcexp.convert.model` and the notes of :mod:`hpcexp.convert.report`.
3. :mod:`hpcexp.convert.writer` renders the model as recipe text; spython's writer does the
   ``%files``/``%labels``/``%environment`` sections, and its ``DockerParser.parse_env`` splits
   plain ``KEY=VALUE`` lines (cross-checked against our tokenizer, which wins on the cases
   spython gets wrong, P10). Every spython call goes through :mod:`hpcexp.convert.bridge`.

Paths in ``%files`` and a ``localimage`` base inside the project are written *relative to
the build context*, so recipes are identical across clones: run ``apptainer build`` with
the context as the working directory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping

from hpcexp.convert import dockerfile as dfmod
from hpcexp.convert.bridge import _SPY, _spython, _spython_mod
from hpcexp.convert.context import BuildContext, IgnoreRules
from hpcexp.convert.interpret import Interpreter
from hpcexp.convert.model import REF as _REF
from hpcexp.convert.model import STAGING, BaseResolution, BaseResolver, Stage
from hpcexp.convert.report import Conversion, Note
from hpcexp.convert.words import has_refs, literal
from hpcexp.convert.writer import heredoc_marker, render
from hpcexp.errors import ConvertError

__all__ = ["STAGING", "BaseResolution", "BaseResolver", "BuildContext", "Conversion", "IgnoreRules", "Note",
           "_SPY", "_spython", "_spython_mod", "convert", "heredoc_marker"]


def convert(dockerfile: Path, *, context: Path | None = None, arch: str = "amd64",
            build_args: Mapping[str, str] | None = None, resolve_base: BaseResolver | None = None,
            source_label: str | None = None) -> Conversion:
    """Convert ``dockerfile`` (build context ``context``, default its folder) into a recipe."""

    if not isinstance(dockerfile, Path):
        dockerfile = Path(dockerfile)
    label = source_label or str(dockerfile)
    if "\n" in label or "\r" in label or "\x00" in label:
        raise ConvertError(f"invalid Dockerfile name {label!r}")
    if arch not in ("amd64", "arm64"):
        raise ConvertError(f"unknown architecture {arch!r}: choose amd64 or arm64")
    df, data = dfmod.load(dockerfile, label)
    sha = hashlib.sha256(data).hexdigest()
    ctx = (context if isinstance(context, Path) else Path(context)) if context is not None else dockerfile.parent
    conv = Interpreter(df, ctx if ctx.is_absolute() else ctx.absolute(), arch, build_args or {}, resolve_base, label)
    try:
        conv.run()
    except RecursionError:
        raise ConvertError(f"{label}: too deeply nested to convert") from None
    conv.finish_notes()
    conv.prune()
    recipe = render(conv.recipe(sha))
    last = conv.stages[-1]
    base = str(conv.ctx_root).rstrip("/") + "/"
    files = tuple((rel, Path(base + rel)) for rel in sorted(conv.context_files))
    notes = tuple(sorted(conv.notes, key=lambda n: n.line))
    return Conversion(recipe=recipe, notes=notes, dockerfile=dockerfile, dockerfile_sha256=sha, context=ctx,
                      arch=arch, context_files=files, base_refs=tuple(conv.base_refs),
                      workdir=last.workdir if last.workdir_set and _REF not in last.workdir else None,
                      build_args=dict(sorted(conv.used_args.items())), source_label=label,
                      cmd=tuple(last.cmd) if last.cmd else None,
                      entrypoint=tuple(last.entrypoint) if last.entrypoint else None,
                      environment=_known_environment(last), stopsignal=last.stopsignal,
                      observed=conv.ctx.observed() if conv.ctx is not None else {"ignore": [], "dirs": {}, "kinds": {}})


def _known_environment(st: Stage) -> dict[str, str]:
    """The final image's environment as far as it is known: the base's plus literal ENV values."""
    env = dict(st.base_env)
    for key, value in st.env.items():
        if has_refs(value):
            env.pop(key, None)
        else:
            env[key] = literal(value)
    return dict(sorted(env.items()))
