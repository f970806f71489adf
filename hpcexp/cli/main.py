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
    "instance": "hpcexp.cli.instance_cmds:instance_group",
    "check": "hpcexp.cli.check_cmds:check_cmd",
    "unlock": "hpcexp.cli.check_cmds:unlock_cmd",
}


# command name -> its one-line help as `hpcexp --help` lists it, so that the help page
# imports no command module (tests/test_startup.py checks each line against the command's
# own help). A command missing here is imported to ask it.
SHORT_HELP: dict[str, str] = {
    "init": "Create a working project in DIRECTORY (default: here).",
    "list": "List experiments: Dockerfiles per architecture, recipe and image state.",
    "doctor": "Check what works on this machine: Apptainer, fakeroot, squashfuse, space, Slurm.",
    "convert": "Convert experiments' Dockerfiles into recipes/NAME.ARCH.def (and a report beside each).",
    "build": "Convert (when stale) and build images rootless, cached by content.",
    "images": ("List images: experiment, architecture, size, age, current or stale, and registry state "
               "(pushed, pinned in hpcexp.lock, signed, pulled; pins not pulled here yet are listed too)."),
    "clean": "Remove stale images, orphaned temporary files whose owner is gone, and dead owners' locks.",
    "push": "Push the current image of NAME and pin it by digest in hpcexp.lock (commit that file).",
    "pull": "Pull the image hpcexp.lock pins for NAME, by digest, into the images folder.",
    "run": "Run experiment NAME without root; results land in runs/NAME/RUN_ID/.",
    "status": "State of all runs, or details of one RUN (id, unique prefix, experiment name, @last, sweep id).",
    "runs": "Table of runs (of experiment NAME, or all): state, age, duration, exit code, parameters.",
    "logs": "Print a run's output: RUN is an id, a unique prefix, an experiment name (its latest run) or @last.",
    "stop": "Stop runs: SIGTERM to the whole container process tree, SIGKILL after --grace seconds.",
    "submit": "Submit experiment NAME to Slurm: one job, or one job array for a sweep.",
    "resubmit": "Submit the failed tasks of SWEEP again, as one new job array.",
    "archive": "Bundle runs with their logs, recipe, Dockerfile and a checksummed MANIFEST.json.",
    "extract": "Restore an archive into DIR (a new or empty folder), refusing anything unsafe.",
    "export": "Export runs to an experiment tracker (configured under `tracking:` in hpcexp.yaml).",
    "serve": "Serve a web dashboard of this project: experiments, runs, live logs, downloads, actions.",
    "instance": "Sessions that serve an experiment's `remote:` object from a running container.",
    "check": "Check every run record, temporary file, lock and run state of the project.",
    "unlock": ("Break locks whose owner is provably dead (same host and boot, process gone), or the LOCK file "
               "named (with --force: whoever holds it)."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._load(name) is not None]

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Click's command list, from :data:`SHORT_HELP` instead of importing every command."""
        names = list(COMMANDS)
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:
            text = SHORT_HELP.get(name)
            if text is None:
                cmd = self._load(name)
                if cmd is None or cmd.hidden:
                    continue
                text = cmd.get_short_help_str(limit)
            else:  # click's own shortening, on a command that costs nothing to make
                text = click.Command(name, help=text).get_short_help_str(limit)
            rows.append((name, text))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

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
    level = 10 if (debug or verbose >= 2) else 20 if verbose == 1 else 30  # DEBUG, INFO, WARNING
    if level_name or level != 30 or "logging" in sys.modules:
        import logging

        if level_name:
            level = getattr(logging, level_name.upper(), level)
        _configure_logging(logging, level)
    else:
        _configure_logging_on_import(level)
    ctx.obj = Ctx(project_arg=project, debug=debug)


def _configure_logging(logging: Any, level: int) -> None:
    logging.basicConfig(level=level, format="hpcexp: %(levelname)s: %(name)s: %(message)s", stream=sys.stderr)


class _LoggingOnImport:
    """Configures logging the moment something imports it: `list`, `--help` and the like
    never log, and importing logging is a few per cent of their start-up."""

    def __init__(self, level: int) -> None:
        self.level = level

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "logging":
            return None
        sys.meta_path.remove(self)
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run, level = spec.loader.exec_module, self.level

        def exec_module(module: Any) -> None:
            run(module)
            _configure_logging(module, level)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _configure_logging_on_import(level: int) -> None:
    if not any(isinstance(f, _LoggingOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _LoggingOnImport(level))


def _fail(lines: list[str], code: int) -> None:
    from hpcexp.errors import clip_line

    for i, line in enumerate(lines):
        line = clip_line(line)
        prefix = "hpcexp: error: " if i == 0 else "hpcexp: " if not line.startswith("hint:") else "hpcexp: "
        click.echo(prefix + line, err=True)
    sys.exit(code)


def entry() -> None:
    """The ``hpcexp`` command (the console script and ``python -m hpcexp``): :func:`main`, then
    a quick exit.

    Tearing the interpreter down (every module's objects freed one by one) costs a short
    command several milliseconds, as much as some of its work. When :func:`main` is done
    and no other thread is alive, the exit handlers run (logging's flush, temporary folders'
    cleanup: ``atexit``), standard output and error are flushed, and the process ends with
    ``os._exit``; otherwise it exits as usual. In-process callers (tests) use :func:`main`.
    """
    try:
        main()
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    _quick_exit(code)


def _quick_exit(code: Any) -> None:
    import threading

    if threading.active_count() > 1:  # someone else still runs: let the interpreter wait for it
        sys.exit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): printed to stderr, status 1
        sys.stderr.write(f"{code}\n")
        status = 1
    import atexit

    try:
        atexit._run_exitfuncs()
    except Exception:  # noqa: BLE001 - whatever went wrong here, the usual exit reports it
        sys.exit(status)
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except BrokenPipeError:  # `hpcexp runs | head`: the reader went away; not an error of ours
            pass
        except Exception:  # noqa: BLE001 - the usual exit reports it
            sys.exit(status)
    os._exit(status & 0xFF)


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
