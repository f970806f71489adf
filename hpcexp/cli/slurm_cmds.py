"""``hpcexp submit`` and ``hpcexp resubmit``: runs and sweeps through Slurm.

``submit`` is the documented spelling; the image is built (or reused) here on the login
node, then one job (one run) or ONE job array (a sweep) is submitted. Exit codes: 0
submitted; 2 bad input (nothing created, no sbatch call); 4 the image build failed; 6
sbatch refused (the records say so).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from hpcexp.cli.common import arch_option, emit_json, info, json_option, pass_ctx, warn

if TYPE_CHECKING:  # pragma: no cover
    from hpcexp.cli.common import Ctx


def _resources(partition: str | None, time: str | None, cpus: int | None, mem: str | None, gpus: str | None,
               account: str | None, qos: str | None, max_parallel: int | None, sbatch_args: tuple[str, ...],
               template: str | None = None) -> Any:
    from hpcexp.core.config import SlurmResources

    return SlurmResources(partition=partition, time=time, cpus=cpus, mem=mem, gpus=gpus, account=account, qos=qos,
                          max_parallel=max_parallel, sbatch_args=tuple(sbatch_args), template=template)


def _report(sub: Any, as_json: bool) -> None:
    if sub.dry_run:
        if as_json:
            emit_json({"dry_run": True, "sweep_id": sub.sweep_id, "tasks": len(sub.runs), "scripts": sub.texts,
                       "params": [rec.params for _, rec in sub.runs]})
            return
        for i, text in enumerate(sub.texts):
            if len(sub.texts) > 1:
                click.echo(f"# ===== job script {i + 1} of {len(sub.texts)} =====")
            click.echo(text, nl=False)
        info(f"dry run: {len(sub.runs)} task(s) in {len(sub.texts)} job script(s); nothing was submitted")
        return
    if as_json:
        # the essentials of each run (a sweep has thousands; `hpcexp status --json` gives full records)
        emit_json({"experiment": sub.experiment, "sweep_id": sub.sweep_id, "job_ids": sub.job_ids,
                   "runs": [{"run_id": rec.run_id, "state": rec.state, "task_index": rec.task_index,
                             "params": rec.params, "attempt": rec.attempt, "image": rec.image,
                             "executor_ids": rec.executor_ids, "dir": str(paths.dir)}
                            for paths, rec in sub.runs]})
        return
    if sub.sweep_id:
        click.echo(f"sweep {sub.sweep_id}: {len(sub.runs)} task(s) submitted as array job "
                   f"{', '.join(sub.job_ids)}")
        click.echo(f"  hpcexp status {sub.sweep_id}    hpcexp logs -f {sub.sweep_id}")
    else:
        paths, rec = sub.runs[0]
        click.echo(f"run {rec.run_id}: submitted as job {sub.job_ids[0]} ({paths.dir})")
        click.echo(f"  hpcexp status {rec.run_id}    hpcexp logs -f {rec.run_id}")


resource_options = [
    click.option("--partition", default=None, help="Slurm partition (default: hpcexp.yaml, then Slurm's)."),
    click.option("--time", "time_", default=None, help="Time limit, e.g. 30, 2:00:00, 1-12."),
    click.option("--cpus", type=click.IntRange(1, 4096), default=None, help="CPUs per task."),
    click.option("--mem", default=None, help="Memory per task, e.g. 4G."),
    click.option("--gpus", default=None, help="GPUs per task: a count or TYPE:COUNT."),
    click.option("--account", default=None, help="Slurm account."),
    click.option("--qos", default=None, help="Slurm QOS."),
    click.option("--sbatch-arg", "sbatch_args", multiple=True, metavar="ARG",
                 help="Extra sbatch option, e.g. --sbatch-arg=--constraint=a100 (repeatable)."),
    click.option("--max-parallel", type=click.IntRange(min=1), default=None,
                 help="At most N tasks of a sweep at once (--array=0-N%MAX)."),
]


def _with(options: list[Any]) -> Any:
    def deco(fn: Any) -> Any:
        for opt in reversed(options):
            fn = opt(fn)
        return fn
    return deco


@click.command("submit", context_settings={"ignore_unknown_options": False})
@click.argument("name")
@click.argument("args", nargs=-1)
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="A parameter (repeatable).")
@click.option("--sweep", "sweeps", multiple=True, metavar="KEY=V1,V2,...",
              help="Sweep a parameter over values; several --sweep give their cartesian product, "
                   "submitted as ONE job array.")
@click.option("--sweep-file", type=click.Path(dir_okay=False), default=None,
              help="Parameter sets to sweep: YAML/JSON list of mappings (or name -> values), or CSV/TSV.")
@_with(resource_options)
@click.option("--template", default=None, help="Use slurm/TEMPLATE.sbatch (default: slurm/NAME.sbatch, "
                                               "else slurm/default.sbatch).")
@click.option("--hold", is_flag=True, help="Submit held (sbatch --hold); release with `scontrol release`.")
@click.option("--dry-run", is_flag=True, help="Print the rendered job script(s); submit and write nothing.")
@click.option("--allow-bind", is_flag=True, help="Allow binds of otherwise refused host folders.")
@click.option("--wait", "wait_", is_flag=True,
              help="Wait until every task has finished (like sbatch --wait); exit 5 if any did not succeed.")
@click.option("--checkpoint-signal", "checkpoint_signal", default=None, metavar="SIG[@SECONDS]",
              help="Send SIG to the payload SECONDS (default 90) before the time limit so that it saves a "
                   "checkpoint in $HPCEXP_CHECKPOINT_DIR, e.g. USR1@90 (overrides checkpoint: in hpcexp.yaml).")
@arch_option
@json_option
@pass_ctx
def submit_cmd(ctx: "Ctx", name: str, args: tuple[str, ...], params: tuple[str, ...], sweeps: tuple[str, ...],
               sweep_file: str | None, partition: str | None, time_: str | None, cpus: int | None, mem: str | None,
               gpus: str | None, account: str | None, qos: str | None, sbatch_args: tuple[str, ...],
               max_parallel: int | None, template: str | None, hold: bool, dry_run: bool, allow_bind: bool,
               wait_: bool, arch: str | None, as_json: bool, checkpoint_signal: str | None = None) -> None:
    """Submit experiment NAME to Slurm: one job, or one job array for a sweep.

    \b
    Resources come from hpcexp.yaml (project `slurm:`, then the experiment's), then
    these options. The image is built or reused here, on the login node; the job only
    runs it. `hpcexp run --slurm NAME` is an alias. Examples:
      hpcexp submit hello -p greeting=hi --time 10
      hpcexp submit train --sweep lr=0.1,0.01 --sweep seed=1,2,3 --max-parallel 4
    """
    import sys
    from pathlib import Path

    # The application layer is imported inside each command, not at module level:
    # `hpcexp --help` imports this module and must stay as cheap as click.
    from hpcexp.app import submit as app

    over = _resources(partition, time_, cpus, mem, gpus, account, qos, max_parallel, sbatch_args, template)
    req = app.SubmitRequest(name=name, params=params, args=args or None, sweeps=sweeps,
                            sweep_file=Path(sweep_file) if sweep_file else None, resources=over, hold=hold,
                            dry_run=dry_run, allow_binds=allow_bind, wait=wait_, arch=arch, quiet=as_json,
                            cmdline=("hpcexp", *sys.argv[1:]), checkpoint_signal=checkpoint_signal)

    def progress(kind: str, text: str) -> None:
        if kind == "warn":
            warn(text)
        elif kind in ("start", "wait") and not as_json:  # building, or pulling a pinned image
            click.echo(text, err=True)

    result = app.submit_and_wait(ctx.project(), req, progress=progress,
                                 on_submitted=None if as_json else lambda sub: _report(sub, False),
                                 on_change=None if as_json else info)
    if result.waited is None:
        _report(result.submission, as_json)
        return
    waited = result.waited
    if as_json:
        emit_json([rec.to_dict() for _, rec in waited.items])
    else:
        from hpcexp.cli.tables import echo_runs

        echo_runs(waited.items)
    if waited.failure is not None:
        raise waited.failure


@click.command("resubmit")
@click.argument("sweep_id")
@click.option("--failed", "failed", is_flag=True, default=True,
              help="Resubmit failed, timed-out, out-of-memory, node-failed and lost tasks (default).")
@click.option("--cancelled", is_flag=True, help="Also resubmit cancelled tasks.")
@click.option("--partition", default=None, help="Override the partition for this resubmission.")
@click.option("--time", "time_", default=None, help="Override the time limit (e.g. for timed-out tasks).")
@click.option("--mem", default=None, help="Override memory (e.g. for out-of-memory tasks).")
@click.option("--hold", is_flag=True, help="Submit held (sbatch --hold).")
@click.option("--dry-run", is_flag=True, help="Print the job script; submit and change nothing.")
@json_option
@pass_ctx
def resubmit_cmd(ctx: "Ctx", sweep_id: str, failed: bool, cancelled: bool, partition: str | None,
                 time_: str | None, mem: str | None, hold: bool, dry_run: bool, as_json: bool) -> None:
    """Submit the failed tasks of SWEEP again, as one new job array.

    Each task keeps its run record and folder and gets a new attempt; earlier attempts
    and their logs are kept.
    """
    from hpcexp.app import submit as app

    over = _resources(partition, time_, None, mem, None, None, None, None, ())
    req = app.ResubmitRequest(sweep_id=sweep_id, cancelled=cancelled, resources=over, hold=hold, dry_run=dry_run)
    sub = app.resubmit(ctx.project(), req)
    _report(sub, as_json)
