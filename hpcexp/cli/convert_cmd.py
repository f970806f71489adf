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
    # The application layer (and the converter behind it) is imported here, not at module
    # level: `hpcexp --help` imports this module and must stay as cheap as click.
    from hpcexp.app import convert as app

    # the request checks the build args when made, before the options and the project
    if dockerfile is not None:
        file_req = app.ConvertFileRequest(dockerfile=dockerfile, context=context, arch=arch, build_args=build_args,
                                          output=output, strict=strict)
        app.check_convert_options(names, all_, check, dockerfile, context, output)
        _convert_file(file_req, as_json, show_all)
        return
    req = app.ConvertRequest(names=names, all=all_, arch=arch, check=check, strict=strict, build_args=build_args)
    app.check_convert_options(names, all_, check, dockerfile, context, output)

    def shown(item: Any) -> None:
        if not as_json:
            state = (" STALE" if item.stale else " up to date") if check else ""
            info(_summary(Path(item.recipe).name, item.conversion) + state)
            _print_notes(item.conversion, show_all)

    result = app.convert(ctx.project(), req, on_converted=shown)
    if as_json:
        emit_json([item.to_json() for item in result.items])
    if result.failure is not None:
        raise result.failure


def _convert_file(req: Any, as_json: bool, show_all: bool) -> None:
    from hpcexp.app import convert as app

    result = app.convert_file(req)
    conv, dockerfile = result.conversion, result.dockerfile
    if result.failure is not None:
        if not as_json:
            info(_summary(str(dockerfile), conv))
            _print_notes(conv, show_all)
        raise result.failure
    if result.recipe is None:
        if as_json:
            emit_json({"dockerfile": str(dockerfile), "arch": result.arch, "recipe_text": conv.recipe,
                       **conv.report(None)})
            return
        sys.stdout.write(result.recipe_text or "")
        sys.stdout.flush()
    elif as_json:
        emit_json({"dockerfile": str(dockerfile), "arch": result.arch, "recipe": str(result.recipe),
                   "report": str(result.report),
                   **{k: v for k, v in conv.report(result.recipe.name).items() if k != "recipe"}})
        return
    if not as_json:
        info(_summary(str(dockerfile), conv))
        _print_notes(conv, show_all)
