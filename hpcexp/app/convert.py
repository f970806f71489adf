"""Use case ``convert``: experiments' Dockerfiles (or one Dockerfile) into Apptainer recipes.

The converter (and spython behind it) is imported when a conversion runs, never when
this module is imported, so a command that only lists stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hpcexp.core.config import Project
from hpcexp.errors import Failure, HpcexpError, UsageError


def parse_build_args(values: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """``NAME=VALUE`` items (or a mapping) checked: a Dockerfile ARG name, no control characters."""
    items = [f"{k}={v}" for k, v in values.items()] if isinstance(values, Mapping) else list(values)
    out: dict[str, str] = {}
    for v in items:
        key, eq, val = v.partition("=")
        if not eq or not key or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise UsageError(f"invalid --build-arg {v!r}: expected NAME=VALUE")
        if "\x00" in val or "\n" in val:
            raise UsageError(f"invalid --build-arg {key}: control characters are not allowed")
        out[key] = val
    return out


@dataclass(frozen=True)
class ConvertRequest:
    names: tuple[str, ...] = ()
    all: bool = False
    arch: str | None = None
    check: bool = False          # write nothing; a stale recipe is a failure
    strict: bool = False         # anything approximated or dropped is a failure
    build_args: Sequence[str] | Mapping[str, str] = ()

    def __post_init__(self) -> None:
        # checked when the request is made, before a project is even looked for
        object.__setattr__(self, "build_args", parse_build_args(self.build_args))


@dataclass(frozen=True)
class ConvertedRecipe:
    """One experiment's conversion; ``conversion`` is the converter's result (notes, counts)."""

    experiment: str
    arch: str
    recipe: str                  # relative to the project when inside it
    report: str
    dockerfile: str
    stale: bool
    written: bool
    conversion: Any

    def to_json(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "arch": self.arch, "recipe": self.recipe, "report": self.report,
                "dockerfile": self.dockerfile, "stale": self.stale, "written": self.written,
                "counts": self.conversion.counts(), "notes": self.conversion.report(Path(self.recipe).name)["notes"]}


@dataclass
class ConvertResult:
    items: list[ConvertedRecipe] = field(default_factory=list)
    failure: HpcexpError | None = None   # --strict or --check failed (the items are still valid)


def convert(project: Project, req: ConvertRequest,
            on_converted: Callable[[ConvertedRecipe], None] | None = None) -> ConvertResult:
    """Convert each chosen experiment; ``on_converted`` is told about each as it is done."""
    from hpcexp.build.bases import base_resolver
    from hpcexp.convert import recipe as converter
    from hpcexp.core.config import host_arch
    from hpcexp.core.layout import Layout
    from hpcexp.infra import atomic

    cli_args = dict(req.build_args)
    exps = project.select(list(req.names), req.all)
    arch = req.arch or host_arch()
    layout = Layout(project)
    result = ConvertResult()
    strict_fail = []
    for exp in exps:
        df = exp.dockerfile(arch)
        try:
            label = str(df.resolve().relative_to(project.root.resolve()))
        except ValueError:
            label = str(df)
        conv = converter.convert(df, context=exp.path, arch=arch, build_args={**exp.build_args, **cli_args},
                                 resolve_base=base_resolver(project, exp), source_label=label)
        recipe_path = layout.recipe(exp.name, arch)
        report_path = layout.report(exp.name, arch)
        try:
            current = recipe_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            current = None
        stale = current != conv.recipe
        refused = req.strict and conv.approximated
        if refused:
            strict_fail.append(recipe_path.name)
        elif not req.check:
            recipe_path.parent.mkdir(parents=True, exist_ok=True)
            if stale:
                atomic.write_text(recipe_path, conv.recipe)
            atomic.write_json(report_path, conv.report(recipe_path.name))

        def rel(p: Path) -> str:
            return str(p.relative_to(project.root)) if p.is_relative_to(project.root) else str(p)

        item = ConvertedRecipe(exp.name, arch, rel(recipe_path), rel(report_path), label, stale,
                               not req.check and not refused, conv)
        result.items.append(item)
        if on_converted is not None:
            on_converted(item)
    if strict_fail:
        result.failure = Failure(f"--strict: {', '.join(strict_fail)} approximated or dropped something; "
                                 "nothing written", hint="see the notes above, or convert without --strict")
    elif req.check and any(i.stale for i in result.items):
        result.failure = Failure("recipes are stale: " + ", ".join(i.recipe for i in result.items if i.stale),
                                 hint="run `hpcexp convert` and commit the result")
    return result


@dataclass(frozen=True)
class ConvertFileRequest:
    """One Dockerfile, no project: ``output`` None or ``-`` returns the recipe text instead."""

    dockerfile: Path
    context: Path | None = None
    arch: str | None = None
    build_args: Sequence[str] | Mapping[str, str] = ()
    output: str | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "build_args", parse_build_args(self.build_args))


@dataclass
class ConvertFileResult:
    dockerfile: Path
    arch: str
    conversion: Any
    recipe_text: str | None = None     # when not written to a file
    recipe: Path | None = None         # the written recipe and its report
    report: Path | None = None
    failure: HpcexpError | None = None


def convert_file(req: ConvertFileRequest) -> ConvertFileResult:
    from hpcexp.convert import recipe as converter
    from hpcexp.core.config import host_arch
    from hpcexp.infra import atomic

    cli_args = dict(req.build_args)
    arch = req.arch or host_arch()
    df = Path(req.dockerfile)
    conv = converter.convert(df, context=req.context, arch=arch, build_args=cli_args, source_label=str(df))
    result = ConvertFileResult(dockerfile=df, arch=arch, conversion=conv)
    if req.strict and conv.approximated:
        result.failure = Failure(f"--strict: converting {df} approximated or dropped something; nothing written")
        return result
    target = req.output or "-"
    if target == "-":
        result.recipe_text = conv.recipe
        return result
    out = Path(target)
    atomic.write_text(out, conv.recipe)
    stem = out.name[:-4] if out.name.endswith(".def") else out.name
    report = out.with_name(stem + ".report.json")
    atomic.write_json(report, conv.report(out.name))
    result.recipe, result.report = out, report
    return result


def check_convert_options(req_names: Sequence[str], all_: bool, check: bool, dockerfile: Path | None,
                          context: Path | None, output: str | None) -> None:
    """Which options go together (one place, for the CLI and any other caller)."""
    if dockerfile is not None:
        if req_names or all_ or check:
            raise UsageError("--dockerfile converts one file: do not also name experiments, --all or --check")
    elif context is not None or output is not None:
        raise UsageError("--context and -o go with --dockerfile")
