"""Entry point of the ``hpcexp`` command.

This module is the CLI edge: it is the only place that turns hpcexp's errors into
messages and exit codes (see ``hpcexp.errors.EXIT_CODES``). Subcommands live in small
modules under ``hpcexp.cli`` and are imported only when invoked (or listed by
``--help``), which keeps ``hpcexp --help`` as fast as importing click itself.

Each command only parses its options into a request of the application layer
(:mod:`hpcexp.app`), calls the use case and prints the result. It imports its ``app``
module inside the function, never at module level: ``--help`` imports every command
module to list them, and must not import the stages behind them.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

import click

from hpcexp import __version__

# command name -> "module:attribute"; modules import only click at top level.
COMMANDS: dict[str, str] = {
    "init": "hpcexp.cli.project_cmds:init_cmd",
    "list": "hpcexp.cli.project_cmds:list_cmd",
    "doctor": "hpcexp.cli.project_cmds:doctor_cmd",
    "convert": "hpcexp.cli.convert_cmd:convert_cmd",
    "build": "hpcexp.cli.build_cmds:build_cmd",
    "images": "hpcexp.cli.build_cmds:images_cmd",
    "clean": "hpcexp.cli.build_cmds:clean_cmd",
    "push": "hpcexp.cli.registry_cmds:push_cmd",
    "pull": "hpcexp.cli.registry_cmds:pull_cmd",
    "run": "hpcexp.cli.run_cmds:run_cmd",
    "status": "hpcexp.cli.run_cmds:status_cmd",
    "runs": "hpcexp.cli.run_cmds:runs_cmd",
    "logs": "hpcexp.cli.run_cmds:logs_cmd",
    "stop": "hpcexp.cli.run_cmds:stop_cmd",
    "submit": "hpcexp.cli.slurm_cmds:submit_cmd",
    "resubmit": "hpcexp.cli.slurm_cmds:resubmit_cmd",
    "archive": "hpcexp.cli.archive_cmds:archive_cmd",
    "extract": "hpcexp.cli.archive_cmds:extract_cmd",
    "export": "hpcexp.cli.track_cmds:export_group",
    "serve": "hpcexp.cli.serve_cmd:serve_cmd",
    "check": "hpcexp.cli.check_cmds:check_cmd",
    "unlock": "hpcexp.cli.check_cmds:unlock_cmd",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._load(name) is not None]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self._load(cmd_name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # command not part of this build
                return None
            raise
        cmd = getattr(module, attr, None)
        return cmd if isinstance(cmd, click.Command) else None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="hpcexp", message="%(prog)s %(version)s")
@click.option("--project", "project", metavar="DIR", envvar="HPCEXP_PROJECT",
              help="Project folder (default: walk up from here to hpcexp.yaml). Env: HPCEXP_PROJECT.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, project: str | None, verbose: int, debug: bool) -> None:
    """Run Dockerfile-based experiments rootless with Apptainer, locally or through Slurm.

    \b
    Typical day:
      hpcexp init myproj && cd myproj
      hpcexp list                       experiments, Dockerfiles, recipe/image state
      hpcexp build hello                convert + build the image (cached by content)
      hpcexp run hello -p greeting=hi   run it; results land in runs/hello/RUN_ID/
      hpcexp submit hello --sweep seed=1,2,3
      hpcexp status; hpcexp logs -f @last; hpcexp archive hello
    """
    from hpcexp.cli.common import Ctx

    level_name = os.environ.get("HPCEXP_LOG_LEVEL")
    level = logging.DEBUG if (debug or verbose >= 2) else logging.INFO if verbose == 1 else logging.WARNING
    if level_name:
        level = getattr(logging, level_name.upper(), level)
    logging.basicConfig(level=level, format="hpcexp: %(levelname)s: %(name)s: %(message)s", stream=sys.stderr)
    ctx.obj = Ctx(project_arg=project, debug=debug)


def _fail(lines: list[str], code: int) -> None:
    from hpcexp.errors import clip_line

    for i, line in enumerate(lines):
        line = clip_line(line)
        prefix = "hpcexp: error: " if i == 0 else "hpcexp: " if not line.startswith("hint:") else "hpcexp: "
        click.echo(prefix + line, err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> Any:
    """Run the CLI; map every error to its documented exit code, with no traceback."""
    from hpcexp.errors import HpcexpError

    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        rv = cli.main(args=argv, prog_name="hpcexp", standalone_mode=False)
        # With standalone_mode=False click returns ctx.exit(N)'s code instead of exiting.
        if isinstance(rv, int) and not isinstance(rv, bool) and rv != 0:
            sys.exit(rv)
        return rv
    except HpcexpError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        # A failed build carries the last lines of its log: show them before the one-line
        # error, whichever command (build, run, submit) needed the image.
        for line in getattr(exc, "tail", None) or ():
            click.echo(f"  | {line}", err=True)
        _fail(exc.lines(), exc.exit_code)
    except click.exceptions.Abort:
        click.echo("hpcexp: interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("hpcexp: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        # `hpcexp runs | head`: the reader went away; that is not an error of ours.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        finally:
            sys.exit(0)
    except OSError as exc:
        from hpcexp.infra.atomic import access_error

        # Which call failed is unknown here (a read or a write): say neither rather than guess.
        err = access_error(exc, exc.filename or "?")
        if debug:
            import traceback

            traceback.print_exc()
        _fail(err.lines() if isinstance(err, HpcexpError) else [str(err)], getattr(err, "exit_code", 74))
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        if debug:
            raise
        _fail([f"internal error: {type(exc).__name__}: {exc}",
               "hint: this is a bug in hpcexp; run again with --debug for the traceback and report it"], 1)
    return None
