"""``hpcexp run``, ``status``, ``runs``, ``logs`` and ``stop``: local runs and the run records of all executors.

Exit codes of ``hpcexp run`` (foreground): 0 the payload succeeded; 5 the payload ran and
failed (its own exit code is in the record and in the message); 3 Apptainer could not
start the container (a launch error such as a missing bind source); 4 the image build
failed; 130 interrupted (Ctrl-C; the run is stopped and recorded ``cancelled``).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from hpcexp.cli.common import arch_option, emit_json, info, json_option, pass_ctx, warn

if TYPE_CHECKING:  # pragma: no cover
    from hpcexp.cli.common import Ctx

# --------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------

@click.command("run", context_settings={"ignore_unknown_options": False})
@click.argument("name")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A parameter (repeatable). Passed byte for byte as --KEY=VALUE and/or HPCEXP_PARAM_KEY "
                   "(experiment setting params_as).")
@click.option("-d", "--detach", is_flag=True, help="Start in the background and print the run id.")
@arch_option
@click.option("--gpu/--no-gpu", default=None, help="Pass the host GPUs in (apptainer --nv); default: the "
              "experiment's `gpu` setting.")
@click.option("--writable/--read-only", default=None, help="Bind the experiment folder read-write (default: "
              "read-only unless the experiment sets `writable: true`).")
@click.option("--allow-bind", is_flag=True, help="Allow binds of /, $HOME and its parents, project parents, system "
              "folders and credential folders (~/.ssh, ~/.gnupg, ~/.aws...).")
@click.option("--grace", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL when the run is stopped.")
@click.option("--rebuild", is_flag=True, help="Rebuild the image even when it is cached.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
@click.option("--slurm", "via_slurm", is_flag=True,
              help="Submit to Slurm instead: an alias of `hpcexp submit NAME` (see its --help for resources).")
@pass_ctx
def run_cmd(ctx: "Ctx", name: str, args: tuple[str, ...], params: tuple[str, ...], detach: bool,
            arch: str | None, gpu: bool | None, writable: bool | None, allow_bind: bool, grace: float,
            rebuild: bool, quiet: bool, via_slurm: bool = False) -> None:
    """Run experiment NAME without root; results land in runs/NAME/RUN_ID/.

    \b
    Arguments after `--` replace the experiment's configured args:
      hpcexp run train -p lr=0.1 -- --epochs 3
    Exit code: 0 succeeded, 5 the experiment failed (its code is in the record),
    3 apptainer could not start it, 4 the image build failed, 130 interrupted.
    """
    if via_slurm:  # `hpcexp run --slurm` is an alias of `hpcexp submit` (the documented spelling)
        from hpcexp.cli.slurm_cmds import submit_cmd

        click.get_current_context().invoke(submit_cmd, name=name, args=args, params=params, arch=arch,
                                           allow_bind=allow_bind)
        return
    # The application layer is imported inside each command, not at module level:
    # `hpcexp --help` imports this module and must stay as cheap as click.
    from hpcexp.app import runs as app

    def progress(kind: str, text: str) -> None:
        if kind == "warn":
            warn(text)
        elif not quiet:
            info(text)

    req = app.RunRequest(name=name, params=params, args=args or None, arch=arch, detach=detach, gpu=gpu,
                         writable=writable, allow_binds=allow_bind, grace=grace, rebuild=rebuild, quiet=quiet,
                         tee=True, interactive=True, cmdline=("hpcexp", *sys.argv[1:]))
    result = app.run(ctx.project(), req, progress=progress)
    paths, rec = result.paths, result.record
    if detach:
        click.echo(rec.run_id)
        if rec.state == "running":
            info(f"run {rec.run_id} started in the background: hpcexp logs -f {rec.run_id}", quiet)
        elif rec.state == "succeeded":
            info(f"run {rec.run_id} already finished: succeeded", quiet)
    if result.failure is not None:
        raise result.failure
    if not detach and rec.state == "succeeded":
        info(f"run {rec.run_id}: succeeded; results in {paths.results}")


# --------------------------------------------------------------------------------------
# status / runs
# --------------------------------------------------------------------------------------

@click.command("status")
@click.argument("ref", required=False)
@json_option
@pass_ctx
def status_cmd(ctx: "Ctx", ref: str | None, as_json: bool) -> None:
    """State of all runs, or details of one RUN (id, unique prefix, experiment name, @last, sweep id)."""
    from hpcexp.app import runs as app
    from hpcexp.app.views import details, json_rows
    from hpcexp.cli.tables import echo_runs, warn_damaged

    # the tracking lines are read for the JSON rows and one run's details only
    req = app.StatusRequest(ref=ref, describe=as_json or ref is not None)
    result = app.status(ctx.project(), req)
    items = result.items
    if result.exporting and not as_json:
        info(f"tracking: {result.exporting} finished run(s) not exported yet; sending them in the background "
             "(or: hpcexp export mlflow)")
    if as_json:
        rows = json_rows(items)
        if result.tracked:
            for row, described in zip(rows, result.tracking):
                row["tracking"] = described
        emit_json(rows)
        return
    if result.single:
        lines = details(*items[0])
        if result.tracking and result.tracking[0] is not None:
            from hpcexp.app.tracking import describe_line

            lines.append(describe_line(result.tracking[0]))
        click.echo("\n".join(lines))
        return
    if result.sweep_id:
        click.echo(f"sweep {result.sweep_id}: {app.summarize([r for _, r in items])}")
    echo_runs(items)
    warn_damaged(items)


@click.command("runs")
@click.argument("name", required=False)
@json_option
@pass_ctx
def runs_cmd(ctx: "Ctx", name: str | None, as_json: bool) -> None:
    """Table of runs (of experiment NAME, or all): state, age, duration, exit code, parameters."""
    from hpcexp.app import runs as app
    from hpcexp.app.views import json_rows
    from hpcexp.cli.tables import echo_runs, warn_damaged

    items = app.list_runs(ctx.project(), app.RunsRequest(experiment=name)).items
    if as_json:
        emit_json(json_rows(items))
        return
    echo_runs(items)
    warn_damaged(items)


# --------------------------------------------------------------------------------------
# logs
# --------------------------------------------------------------------------------------

@click.command("logs")
@click.argument("ref")
@click.option("-f", "--follow", is_flag=True, help="Keep printing until the run ends (follows by name, as tail -F).")
@click.option("-n", "--lines", type=click.IntRange(min=0), default=None, help="Only the last N lines.")
@click.option("--stderr", "which", flag_value="stderr", help="Show stderr instead of stdout.")
@click.option("--both", "which", flag_value="both", help="Show stdout and stderr, lines prefixed.")
@click.option("--stdout", "which", flag_value="stdout", default=True, hidden=True)
@pass_ctx
def logs_cmd(ctx: "Ctx", ref: str, follow: bool, lines: int | None, which: str) -> None:
    """Print a run's output: RUN is an id, a unique prefix, an experiment name (its latest run) or @last.

    With -f, keeps printing until the run ends, then exits (a sweep id follows all its tasks).
    """
    from hpcexp.app import runs as app

    def progress(kind: str, text: str) -> None:
        if kind == "warn":
            warn(text)

    req = app.LogsRequest(ref=ref, which=which, lines=lines)
    if follow:
        app.follow_logs(ctx.project(), req, sys.stdout.buffer, progress=progress)
    else:
        app.show_logs(ctx.project(), req, sys.stdout.buffer, progress=progress)


# --------------------------------------------------------------------------------------
# stop
# --------------------------------------------------------------------------------------

@click.command("stop")
@click.argument("refs", nargs=-1, required=True)
@click.option("--grace", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL.")
@click.option("--checkpoint", is_flag=True,
              help="Local runs: send the checkpoint signal first (checkpoint: in hpcexp.yaml, else SIGUSR1) and "
                   "give the payload --grace seconds to save in $HPCEXP_CHECKPOINT_DIR and exit.")
@json_option
@pass_ctx
def stop_cmd(ctx: "Ctx", refs: tuple[str, ...], grace: float, as_json: bool, checkpoint: bool = False) -> None:
    """Stop runs: SIGTERM to the whole container process tree, SIGKILL after --grace seconds.

    RUN is an id, a unique prefix, an experiment name (its latest run), @last or a sweep id.
    The record then says `cancelled`.
    """
    from hpcexp.app import runs as app
    from hpcexp.app.views import json_rows

    result = app.stop(ctx.project(), app.StopRequest(refs=refs, grace=grace, checkpoint=checkpoint))
    if as_json:
        emit_json(json_rows(result.after))
        return
    for (_paths, before), (_, rec) in zip(result.before, result.after):
        if before.terminal:
            info(f"run {rec.run_id} had already ended: {rec.state}")
        else:
            info(f"run {rec.run_id}: {rec.state}" + (f" ({rec.reason})" if rec.reason else ""))
