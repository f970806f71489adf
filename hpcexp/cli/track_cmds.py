"""``hpcexp export mlflow [RUN|SWEEP|NAME...]``: send finished runs to the tracking server.

Exit codes: 0 everything asked for is exported (or was already); 6 the server could not
be reached or refused a request (nothing is lost: the export waits in each run folder);
3 the MLflow client is not installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from hpcexp.cli.common import emit_json, info, json_option, pass_ctx, warn

if TYPE_CHECKING:  # pragma: no cover
    from hpcexp.cli.common import Ctx


@click.group("export")
def export_group() -> None:
    """Export runs to an experiment tracker (configured under `tracking:` in hpcexp.yaml)."""


@export_group.command("mlflow")
@click.argument("refs", nargs=-1)
@click.option("--pending", is_flag=True, help="Only finished runs not exported yet (the default without RUN).")
@click.option("--threads", type=click.IntRange(1, 32), default=4, show_default=True,
              help="Runs sent at once.")
@click.option("--background", is_flag=True, hidden=True,
              help="Started by `status`: one at a time per project, quiet, backs off when the server is down.")
@json_option
@pass_ctx
def mlflow_cmd(ctx: "Ctx", refs: tuple[str, ...], pending: bool, threads: int, background: bool,
               as_json: bool) -> None:
    """Export finished runs to MLflow: RUN is a run id, a unique prefix, an experiment name
    (its latest run), @last or a sweep id (the sweep as a parent run with one child per task).

    Without RUN, every finished run that is not exported yet. Exporting again never
    duplicates: a run that is already exported is left alone, one whose state changed
    since (a resubmitted task) is updated in place.
    """
    from hpcexp.app import tracking
    from hpcexp.core.layout import Layout
    from hpcexp.core.runs import iter_runs, resolve
    from hpcexp.errors import TrackingError, UsageError
    from hpcexp.execute.base import reconcile
    from hpcexp.track import export as ex

    project = ctx.project()
    layout = Layout(project)
    if not ex.tracking_configured(project):
        if background:
            return
        raise UsageError("no tracking is configured: add tracking: {mlflow: {uri: ..., experiment: ...}} to "
                         f"{project.config_file or 'hpcexp.yaml'}", hint="see docs/tracking.md")
    if refs:
        items = []
        seen = set()
        for ref in refs:
            for paths, rec in resolve(layout, ref):
                if paths.dir not in seen:
                    seen.add(paths.dir)
                    items.append((paths, rec))
        items = reconcile(layout, items)
    else:
        items = reconcile(layout, list(iter_runs(layout)))
    if pending or not refs:
        items = ex.waiting(project, items)
    if background:
        _background(layout, project, items, threads)
        return
    untracked = [r.run_id for _, r in items if ex.settings_for(project, r.experiment) is None]
    if refs and untracked and len(untracked) == len(items):
        raise UsageError(f"run {untracked[0]} belongs to an experiment without tracking configured")
    out = tracking.export_runs(project, items, threads=threads)
    if as_json:
        emit_json({"exported": out.exported, "unchanged": out.unchanged, "busy": out.busy,
                   "not_finished_or_untracked": out.skipped, "notes": out.notes, "errors": out.errors,
                   "targets": sorted(out.targets)})
    else:
        for note in out.notes:
            warn(note)
        where = ", ".join(sorted(out.targets)) or "MLflow"
        parts = [f"{len(out.exported)} exported"]
        if out.unchanged:
            parts.append(f"{len(out.unchanged)} already exported")
        if out.busy:
            parts.append(f"{len(out.busy)} being exported by another process")
        if out.skipped:
            parts.append(f"{len(out.skipped)} not finished or not tracked")
        info(f"{where}: " + ", ".join(parts))
    if out.errors:
        more = f" (and {len(out.errors) - 1} more)" if len(out.errors) > 1 else ""
        raise TrackingError(out.errors[0] + more, hint="nothing is lost: run `hpcexp export mlflow` again later")


def _background(layout: object, project: object, items: list, threads: int) -> None:
    """One background exporter per project; a server that does not answer is not retried
    for a minute (a marker file's age), so `status` never starts a crowd of them."""
    import os
    import time

    from hpcexp.app import tracking
    from hpcexp.errors import HpcexpError
    from hpcexp.infra.lock import Lock

    folder = layout.tracking_dir()  # type: ignore[attr-defined]
    lock = Lock(folder / "export.lock", purpose="background export")
    if lock.try_acquire() is not None:
        return
    try:
        try:
            out = tracking.export_runs(project, items, threads=threads)  # type: ignore[arg-type]
        except HpcexpError as exc:
            click.echo(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} hpcexp: {exc.message}", err=True)
            marker = folder / "unreachable"
            with open(marker, "w", encoding="utf-8") as fh:
                fh.write(exc.message + "\n")
            return
        try:
            os.unlink(folder / "unreachable")
        except OSError:
            pass
        stamp = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
        click.echo(f"{stamp} exported {len(out.exported)}, errors {len(out.errors)}", err=True)
        for line in out.errors + out.notes:
            click.echo(f"{stamp} {line}", err=True)
    finally:
        lock.release()
