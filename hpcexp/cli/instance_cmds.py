"""``hpcexp instance start|stop|list``: remote-call sessions (an experiment's ``remote:``
object served from a running Apptainer instance; Python: ``hpcexp.remote.connect``).

Exit codes: 0 fine; 2 bad usage or an experiment without ``remote:``; 3 apptainer could
not start the instance; 4 the image build failed; 5 the server failed (its factory raised).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from hpcexp.cli.common import arch_option, echo_table, emit_json, info, json_option, pass_ctx

if TYPE_CHECKING:  # pragma: no cover
    from hpcexp.cli.common import Ctx


def _row(paths, rec, alive=None) -> dict:  # type: ignore[no-untyped-def]
    return {"run_id": rec.run_id, "experiment": rec.experiment, "state": rec.state,
            "instance": rec.extra.get("instance"), "socket": rec.extra.get("socket") or str(paths.remote_socket),
            "owned": bool(rec.extra.get("owned")), "alive": alive, "params": rec.params,
            "started_at": rec.started_at, "ended_at": rec.ended_at, "reason": rec.reason, "dir": str(paths.dir)}


@click.group("instance")
def instance_group() -> None:
    """Sessions that serve an experiment's `remote:` object from a running container."""


@instance_group.command("start")
@click.argument("name")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE",
              help="A parameter for the factory (keyword argument) and the container (repeatable).")
@arch_option
@click.option("--rebuild", is_flag=True, help="Rebuild the image even when it is cached.")
@click.option("--wait", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              help="Seconds the server may take to start listening.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
@json_option
@pass_ctx
def start_cmd(ctx: "Ctx", name: str, params: tuple[str, ...], arch: str | None, rebuild: bool, wait: float,
              quiet: bool, as_json: bool) -> None:
    """Start a session of experiment NAME; it serves until `hpcexp instance stop NAME`."""
    from hpcexp.app import instances as app

    def progress(kind: str, text: str) -> None:
        if not quiet and not as_json:
            info(text)

    result = app.start(ctx.project(), app.InstanceStartRequest(
        name=name, params=params, arch=arch, rebuild=rebuild, quiet=quiet, wait=wait,
        cmdline=("hpcexp", *sys.argv[1:])), progress=progress)
    if result.failure is not None:
        raise result.failure
    if as_json:
        emit_json(_row(result.paths, result.record, True))
        return
    click.echo(result.record.run_id)
    info(f"session {result.record.run_id} serves {name} on {result.socket}; "
         f"stop it with: hpcexp instance stop {result.record.run_id}", quiet)


@instance_group.command("stop")
@click.argument("refs", nargs=-1, required=True)
@click.option("--grace", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds the instance gets before it is killed.")
@json_option
@pass_ctx
def stop_cmd(ctx: "Ctx", refs: tuple[str, ...], grace: float, as_json: bool) -> None:
    """Stop sessions: REF is an experiment name (all its serving sessions) or a session's run id."""
    from hpcexp.app import instances as app

    result = app.stop(ctx.project(), app.InstanceStopRequest(refs=refs, grace=grace))
    if as_json:
        emit_json([_row(p, r) for p, r in result.after])
        return
    for (_p, before), (_, rec) in zip(result.before, result.after):
        if before.terminal:
            info(f"session {rec.run_id} had already ended: {rec.state}")
        else:
            info(f"session {rec.run_id}: {rec.state}" + (f" ({rec.reason})" if rec.reason else ""))


@instance_group.command("list")
@click.argument("name", required=False)
@click.option("--all", "all_", is_flag=True, help="Ended sessions too.")
@json_option
@pass_ctx
def list_cmd(ctx: "Ctx", name: str | None, all_: bool, as_json: bool) -> None:
    """Serving sessions (of experiment NAME), with their instance and socket."""
    from hpcexp.app import instances as app

    result = app.list_sessions(ctx.project(), app.InstanceListRequest(name=name, all=all_))
    rows = [_row(p, r, result.alive.get(r.run_id)) for p, r in result.items]
    if as_json:
        emit_json(rows)
        return
    if not rows:
        info("no serving sessions" + (f" of {name}" if name else "") + " (start one: hpcexp instance start NAME)")
        return
    echo_table([(r["run_id"], r["experiment"], r["state"], "yes" if r["alive"] else "no",
                 "client" if r["owned"] else "cli", r["socket"]) for r in rows],
               ["SESSION", "EXPERIMENT", "STATE", "INSTANCE", "OWNER", "SOCKET"])
