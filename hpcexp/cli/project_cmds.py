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
    # app modules are imported inside each command: `hpcexp --help` imports this module
    # and must cost no more than click itself.
    from hpcexp.app import project as app

    result = app.init(app.InitRequest(directory=directory))
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
    from hpcexp.app import project as app

    infos = app.list_experiments(ctx.project(), app.ListRequest()).experiments
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
    from hpcexp.app import project as app

    result = app.doctor(app.DoctorRequest(project_dir=ctx.project_arg))
    checks, failed = result.checks, result.failed
    if as_json:
        emit_json({"ok": result.ok, "checks": checks,
                   "project": str(result.project) if result.project else None,
                   "project_error": result.project_error})
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            line = f"{c.status:<4}  {c.name:<{width}}  {c.detail}"
            if c.fix and c.status != "ok":
                line += f"  -> fix: {c.fix}"
            click.echo(line)
        if result.project_error is not None:
            click.echo(f"warn  project  {result.project_error}")
        if failed:
            click.echo(f"\n{len(failed)} required check(s) failed: "
                       + ", ".join(f"{c.name} ({c.fix})" for c in failed), err=True)
    if failed:
        click.get_current_context().exit(3)
