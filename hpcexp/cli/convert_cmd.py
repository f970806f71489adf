"""``hpcexp convert``: Dockerfile -> Apptainer recipe, with a fidelity report.

Only click and hpcexp.cli.common are imported at module level; the converter (and
spython behind it) is imported when the command runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from hpcexp.cli.common import arch_option, emit_json, info, json_option, pass_ctx


def _parse_build_args(values: tuple[str, ...]) -> dict[str, str]:
    from hpcexp.errors import UsageError

    out: dict[str, str] = {}
    for v in values:
        key, eq, val = v.partition("=")
        if not eq or not key or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise UsageError(f"invalid --build-arg {v!r}: expected NAME=VALUE")
        if "\x00" in val or "\n" in val:
            raise UsageError(f"invalid --build-arg {key}: control characters are not allowed")
        out[key] = val
    return out


def _summary(name: str, conv: Any) -> str:
    counts = conv.counts()
    extra = [f"{counts[k]} {k}" for k in ("approximated", "dropped") if counts.get(k)]
    n = len(conv.notes)
    return f"{name}: {n} note{'s' if n != 1 else ''}" + (f" ({', '.join(extra)})" if extra else "")


def _print_notes(conv: Any, verbose: bool) -> None:
    for n in conv.notes:
        if n.action == "translated" and not verbose:
            continue
        where = f"line {n.line}" if n.line else "file"
        code = f" [{n.code}]" if n.code else ""
        info(f"  {where}: {n.construct}: {n.action}: {n.reason}{code}")


@click.command("convert")
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Convert every experiment.")
@arch_option
@click.option("--check", is_flag=True, help="Write nothing; exit 1 when a committed recipe is stale (for CI).")
@click.option("--strict", is_flag=True, help="Fail when anything was approximated or dropped.")
@click.option("--build-arg", "build_args", multiple=True, metavar="NAME=VALUE",
              help="Override a Dockerfile ARG (after hpcexp.yaml build_args).")
@click.option("--dockerfile", "dockerfile", type=click.Path(path_type=Path), default=None,
              help="Convert this Dockerfile instead of an experiment (no project needed).")
@click.option("--context", "context", type=click.Path(path_type=Path), default=None,
              help="Build context of --dockerfile (default: its folder).")
@click.option("-o", "--output", "output", default=None, metavar="FILE|-",
              help="With --dockerfile: where to write the recipe (default: stdout).")
@click.option("-V", "--show-all", "show_all", is_flag=True, help="Also list the notes of translated constructs.")
@json_option
@pass_ctx
def convert_cmd(ctx: Any, names: tuple[str, ...], all_: bool, arch: str | None, check: bool, strict: bool,
                build_args: tuple[str, ...], dockerfile: Path | None, context: Path | None, output: str | None,
                show_all: bool, as_json: bool) -> None:
    """Convert experiments' Dockerfiles into recipes/NAME.ARCH.def (and a report beside each)."""
    from hpcexp.errors import Failure, UsageError

    cli_args = _parse_build_args(build_args)
    if dockerfile is not None:
        if names or all_ or check:
            raise UsageError("--dockerfile converts one file: do not also name experiments, --all or --check")
        _convert_file(dockerfile, context, arch, cli_args, output, strict, as_json, show_all)
        return
    if context is not None or output is not None:
        raise UsageError("--context and -o go with --dockerfile")
    from hpcexp.build.bases import base_resolver
    from hpcexp.convert.recipe import convert
    from hpcexp.core.config import host_arch
    from hpcexp.core.layout import Layout
    from hpcexp.infra import atomic

    project = ctx.project()
    exps = project.select(list(names), all_)
    arch = arch or host_arch()
    layout = Layout(project)
    results = []
    stale_any = False
    strict_fail = []
    for exp in exps:
        df = exp.dockerfile(arch)
        try:
            label = str(df.resolve().relative_to(project.root.resolve()))
        except ValueError:
            label = str(df)
        conv = convert(df, context=exp.path, arch=arch, build_args={**exp.build_args, **cli_args},
                       resolve_base=base_resolver(project, exp), source_label=label)
        recipe_path = layout.recipe(exp.name, arch)
        report_path = layout.report(exp.name, arch)
        try:
            current = recipe_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            current = None
        stale = current != conv.recipe
        report = conv.report(recipe_path.name)
        if strict and conv.approximated:
            strict_fail.append(recipe_path.name)
        elif not check:
            recipe_path.parent.mkdir(parents=True, exist_ok=True)
            if stale:
                atomic.write_text(recipe_path, conv.recipe)
            atomic.write_json(report_path, report)
        stale_any = stale_any or stale
        rel = lambda p: str(p.relative_to(project.root)) if p.is_relative_to(project.root) else str(p)  # noqa: E731
        results.append({"experiment": exp.name, "arch": arch, "recipe": rel(recipe_path), "report": rel(report_path),
                        "dockerfile": label, "stale": stale, "written": not check and not
                        (strict and conv.approximated), "counts": conv.counts(), "notes": report["notes"]})
        if not as_json:
            state = (" STALE" if stale else " up to date") if check else ""
            info(_summary(recipe_path.name, conv) + state)
            _print_notes(conv, show_all)
    if as_json:
        emit_json(results)
    if strict_fail:
        raise Failure(f"--strict: {', '.join(strict_fail)} approximated or dropped something; nothing written",
                      hint="see the notes above, or convert without --strict")
    if check and stale_any:
        raise Failure("recipes are stale: " + ", ".join(r["recipe"] for r in results if r["stale"]),
                      hint="run `hpcexp convert` and commit the result")


def _convert_file(dockerfile: Path, context: Path | None, arch: str | None, cli_args: dict[str, str],
                  output: str | None, strict: bool, as_json: bool, show_all: bool) -> None:
    from hpcexp.convert.recipe import convert
    from hpcexp.core.config import host_arch
    from hpcexp.errors import Failure
    from hpcexp.infra import atomic

    arch = arch or host_arch()
    conv = convert(dockerfile, context=context, arch=arch, build_args=cli_args, source_label=str(dockerfile))
    if strict and conv.approximated:
        if not as_json:
            info(_summary(str(dockerfile), conv))
            _print_notes(conv, show_all)
        raise Failure(f"--strict: converting {dockerfile} approximated or dropped something; nothing written")
    target = output or "-"
    if target == "-":
        if as_json:
            emit_json({"dockerfile": str(dockerfile), "arch": arch, "recipe_text": conv.recipe,
                       **conv.report(None)})
            return
        sys.stdout.write(conv.recipe)
        sys.stdout.flush()
    else:
        out = Path(target)
        atomic.write_text(out, conv.recipe)
        stem = out.name[:-4] if out.name.endswith(".def") else out.name
        report = out.with_name(stem + ".report.json")
        atomic.write_json(report, conv.report(out.name))
        if as_json:
            emit_json({"dockerfile": str(dockerfile), "arch": arch, "recipe": str(out), "report": str(report),
                       **{k: v for k, v in conv.report(out.name).items() if k != "recipe"}})
            return
    if not as_json:
        info(_summary(str(dockerfile), conv))
        _print_notes(conv, show_all)
