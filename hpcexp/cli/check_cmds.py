"""``hpcexp check [--repair]`` (fsck of runs, temporary files, locks and states) and
``hpcexp unlock [LOCK]``.

Exit codes: ``check`` 0 when nothing is wrong (or, with ``--repair``, everything found
was fixed or marked), 1 when a problem remains; ``unlock`` 0, 75 when the named lock's
owner may be alive (use ``--force``), 2 for a file that is no lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from hpcexp.cli.common import emit_json, info, json_option, pass_ctx

if TYPE_CHECKING:  # pragma: no cover
    from hpcexp.cli.common import Ctx


@click.command("check")
@click.option("--repair", is_flag=True,
              help="Fix what is safe (remove orphaned temporary files, break dead owners' locks, reconcile "
                   "states) and mark the rest (a damaged record is kept aside and the run marked lost).")
@json_option
@pass_ctx
def check_cmd(ctx: "Ctx", repair: bool, as_json: bool) -> None:
    """Check every run record, temporary file, lock and run state of the project.

    \b
    Records must parse and match their folder; temporary files need a live owner; locks
    a live owner; each run's state must agree with Slurm and the job's own markers (or,
    for a local run, with its supervisor being alive). Without --repair nothing changes.
    Exit 1 while a problem remains.
    """
    from hpcexp.app import check as app
    from hpcexp.errors import Failure

    result = app.check(ctx.project(), app.CheckRequest(repair=repair))
    if as_json:
        emit_json({"runs": result.runs, "repair": repair, "findings": [f.as_dict() for f in result.findings],
                   "problems": len(result.problems)})
    else:
        for f in result.findings:
            click.echo(f"{f.action:<10} {f.kind}: {f.path}: {f.detail}")
        fixed = len(result.findings) - len(result.problems)
        info(f"checked {result.runs} run(s): {len(result.findings)} finding(s), {fixed} repaired, marked or kept, "
             f"{len(result.problems)} problem(s) left" + ("" if repair or not result.problems else
                                                           "; `hpcexp check --repair` fixes what is safe"))
    if result.problems:
        raise Failure(f"check found {len(result.problems)} problem(s) left",
                      hint=None if repair else "`hpcexp check --repair` fixes what is safe and marks the rest")


@click.command("unlock")
@click.argument("lock", required=False, type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Break the named lock even if its owner may still be alive.")
@json_option
@pass_ctx
def unlock_cmd(ctx: "Ctx", lock: str | None, force: bool, as_json: bool) -> None:
    """Break locks whose owner is provably dead (same host and boot, process gone), or
    the LOCK file named (with --force: whoever holds it). Says whose each lock was."""
    from pathlib import Path

    from hpcexp.app import check as app

    result = app.unlock(ctx.project(), app.UnlockRequest(lock=Path(lock) if lock else None, force=force))
    if as_json:
        emit_json({"broken": [{"lock": p, "owner": w} for p, w in result.broken],
                   "kept": [{"lock": p, "why": w} for p, w in result.kept]})
        return
    for path, whose in result.broken:
        click.echo(f"broke {path}: it was held by {whose}")
    for path, why in result.kept:
        click.echo(f"kept {path}: held by {why}")
    if not result.broken and not result.kept:
        info("no lock to break")
