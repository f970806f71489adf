"""``hpcexp build``, ``hpcexp images`` and ``hpcexp clean``."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

from hpcexp.cli.common import (
    Ctx,
    arch_option,
    echo_table,
    emit_json,
    human_age,
    human_size,
    info,
    json_option,
    pass_ctx,
    warn,
)


def _rel(path: Path | str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return rel if not rel.startswith("../..") else str(path)


class LiveLine:
    """Progress for people: one live line with elapsed time and the current step on a
    terminal, plain lines otherwise."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.text = ""
        self.label = ""
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._width = 0

    def __call__(self, kind: str, text: str) -> None:
        if kind == "warn":
            self._clear()
            warn(text)
            return
        if kind == "wait":
            self._clear()
            click.echo(f"hpcexp: {text}", err=True)
            return
        if kind == "note":
            self._clear()
            click.echo(f"hpcexp: note: {text}", err=True)
            return
        if kind == "start":
            self.label = text
            self.t0 = time.monotonic()
            if self.tty:
                self._start_ticker()
            else:
                click.echo(text, err=True)
            return
        if kind == "step":
            if self.tty:
                with self._lock:
                    self.text = text.split(": ", 1)[-1]
                self._draw()
            elif text.split(": ", 1)[-1].startswith(("Running", "Copying", "Creating", "Extracting")):
                click.echo(text, err=True)
            return
        if kind == "done":
            self.finish()

    def _start_ticker(self) -> None:
        self._stop.clear()

        def tick() -> None:
            while not self._stop.wait(0.5):
                self._draw()
        self._thread = threading.Thread(target=tick, daemon=True)
        self._thread.start()

    def _draw(self) -> None:
        if not self.tty:
            return
        with self._lock:
            try:
                cols = os.get_terminal_size(sys.stderr.fileno()).columns
            except OSError:
                cols = 0
            cols = cols if cols >= 20 else 80
            line = f"{self.label} {time.monotonic() - self.t0:5.1f} s  {self.text}"[: cols - 1]
            sys.stderr.write("\r" + line.ljust(self._width) + "\r" + line)
            sys.stderr.flush()
            self._width = len(line)

    def _clear(self) -> None:
        if self.tty and self._width:
            with self._lock:
                sys.stderr.write("\r" + " " * self._width + "\r")
                sys.stderr.flush()
                self._width = 0

    def finish(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
            self._thread = None
        self._clear()


@click.command("build")
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Build every experiment.")
@arch_option
@click.option("--force", is_flag=True, help="Rebuild even when a current image exists.")
@click.option("--no-wait", is_flag=True, help="Exit 75 instead of waiting when someone else builds the same image.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors and warnings.")
@click.option("--no-host-network", is_flag=True,
              help="Do not pass the host's CA bundle and proxy variables into build steps "
                   "(also `build: {host_network: false}` in hpcexp.yaml).")
@json_option
@pass_ctx
def build_cmd(ctx: Ctx, names: tuple[str, ...], all_: bool, arch: str | None, force: bool, no_wait: bool,
              quiet: bool, no_host_network: bool, as_json: bool) -> None:
    """Convert (when stale) and build images rootless, cached by content.

    Same inputs, same image: when nothing the image is made of changed, no apptainer
    command runs at all. Images land in the images folder as NAME-ARCH-HASH.sif, each with
    a provenance sidecar (.json) and labels (`apptainer inspect --labels`).
    """
    # The application layer is imported here, not at module level: `hpcexp --help`
    # imports this module and must stay as cheap as click.
    from hpcexp.app import build as app

    live = LiveLine(tty=sys.stderr.isatty() and not quiet and not as_json)

    def shown(outcome: Any) -> None:
        live.finish()
        if outcome.error is not None:
            for line in getattr(outcome.error, "tail", None) or ():
                click.echo(f"  | {line}", err=True)
            click.echo(f"hpcexp: error: {outcome.error.message}", err=True)
            return
        if as_json or quiet:
            return
        img = outcome.image
        where = _rel(img.path)
        if img.built:
            click.echo(f"{outcome.experiment} {outcome.arch}: built in {outcome.seconds:.1f} s ({where})")
        else:
            click.echo(f"{outcome.experiment} {outcome.arch}: cached ({where})")

    req = app.BuildRequest(names=names, all=all_, arch=arch, force=force, wait=not no_wait, quiet=quiet,
                           host_network=False if no_host_network else None)
    try:
        result = app.build(ctx.project(), req, progress=live, on_outcome=shown)
    finally:
        live.finish()
    if as_json:
        emit_json(result.images)
    if result.failure is not None:
        raise result.failure


@click.command("images")
@json_option
@pass_ctx
def images_cmd(ctx: Ctx, as_json: bool) -> None:
    """List images: experiment, architecture, size, age, current or stale, and registry state
    (pushed, pinned in hpcexp.lock, signed, pulled; pins not pulled here yet are listed too)."""
    from hpcexp.app import build as app

    result = app.images(ctx.project(), app.ImagesRequest())
    if as_json:
        emit_json(result.to_json())
        return
    rows = [(e.experiment, e.arch, human_size(e.size), human_age(e.age_seconds), e.state, s,
             ",".join(e.used_by[-1:]) + ("+" if len(e.used_by) > 1 else ""), _rel(e.path))
            for e, s in zip(result.entries, result.registry)]
    rows += [(p.experiment, p.arch, human_size(p.size), "-", "not here", app.pin_registry_cell(p), "",
              app.redact_ref(p.ref)) for p in result.missing]
    echo_table(rows, ("EXPERIMENT", "ARCH", "SIZE", "AGE", "STATE", "REGISTRY", "USED BY", "PATH"))


@click.command("clean")
@click.option("-n", "--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@click.option("--force", is_flag=True, help="Also remove stale images that run records still point to.")
@json_option
@pass_ctx
def clean_cmd(ctx: Ctx, dry_run: bool, force: bool, as_json: bool) -> None:
    """Remove stale images, orphaned temporary files whose owner is gone, and dead owners' locks.

    An image a run record points to is kept unless --force (the run could not be
    reproduced from it otherwise).
    """
    from hpcexp.app import build as app

    result = app.clean(ctx.project(), app.CleanRequest(dry_run=dry_run, force=force))
    report = result.report
    if as_json:
        emit_json(result.to_json())
        return
    verb = "would remove" if dry_run else "removed"
    for path, why in report.removed:
        click.echo(f"{verb} {_rel(path)} ({why})")
    for path, why in report.kept:
        info(f"kept {_rel(path)}: {why}")
    click.echo(f"{verb} {len(report.removed)} file(s), {human_size(report.freed_bytes)}")
