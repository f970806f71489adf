"""``hpcexp init``, ``hpcexp list`` and ``hpcexp doctor``."""

from __future__ import annotations

from pathlib import Path

import click

from hpcexp.cli.common import Ctx, echo_table, emit_json, json_option, pass_ctx


@click.command("init")
@click.argument("directory", default=".", type=click.Path(file_okay=False, path_type=Path))
@json_option
def init_cmd(directory: Path, as_json: bool) -> None:
    """Create a working project in DIRECTORY (default: here).

    Writes hpcexp.yaml, an example experiment `hello` (Dockerfile, Dockerfile.arm64 and a
    small program that takes parameters and writes a result file), slurm/default.sbatch and
    a .gitignore. Existing files are never overwritten.
    """
    from hpcexp.app.scaffold import init_project

    result = init_project(directory)
    if as_json:
        emit_json(result)
        return
    for rel in result.created:
        click.echo(f"created {rel}")
    click.echo(f"\nproject ready in {result.root}\nnext: cd {directory} && hpcexp doctor && hpcexp list "
               "&& hpcexp run hello")


@click.command("list")
@json_option
@pass_ctx
def list_cmd(ctx: Ctx, as_json: bool) -> None:
    """List experiments: Dockerfiles per architecture, recipe and image state."""
    from hpcexp.build.inventory import describe

    project = ctx.project()
    infos = describe(project)
    if as_json:
        emit_json(infos)
        return
    rows = []
    for info in infos:
        for arch in info.arches or ["-"]:
            rows.append([info.name, arch, info.dockerfiles.get(arch, "-"), info.recipe.get(arch, "-"),
                         info.image.get(arch, "-"), info.ref or ""])
    echo_table(rows, ["EXPERIMENT", "ARCH", "DOCKERFILE", "RECIPE", "IMAGE", "REF"])


@click.command("doctor")
@json_option
@pass_ctx
def doctor_cmd(ctx: Ctx, as_json: bool) -> None:
    """Check what works on this machine: Apptainer, fakeroot, squashfuse, space, Slurm.

    Exits 3 when something required is missing; every failure names its fix.
    """
    from hpcexp.app.doctor import run_checks
    from hpcexp.errors import HpcexpError

    project = None
    project_error = None
    try:
        project = ctx.project()
    except HpcexpError as exc:  # doctor is useful outside a project too
        project_error = exc
    checks = run_checks(project)
    failed = [c for c in checks if c.failed_required]
    if as_json:
        emit_json({"ok": not failed, "checks": checks,
                   "project": str(project.root) if project else None,
                   "project_error": str(project_error) if project_error and ctx.project_arg else None})
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            line = f"{c.status:<4}  {c.name:<{width}}  {c.detail}"
            if c.fix and c.status != "ok":
                line += f"  -> fix: {c.fix}"
            click.echo(line)
        if project is None and ctx.project_arg:
            click.echo(f"warn  project  {project_error}")
        if failed:
            click.echo(f"\n{len(failed)} required check(s) failed: "
                       + ", ".join(f"{c.name} ({c.fix})" for c in failed), err=True)
    if failed:
        click.get_current_context().exit(3)
