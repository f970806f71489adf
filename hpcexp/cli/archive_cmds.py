"""``hpcexp archive`` (and ``--verify``) and ``hpcexp extract``: thin wrappers over hpcexp.archive."""

from __future__ import annotations

import click

from hpcexp.cli.common import emit_json, human_size, info, json_option, pass_ctx, warn


@click.command("archive")
@click.argument("refs", nargs=-1, metavar="RUN|NAME|SWEEP...")
@click.option("--all", "all_runs", is_flag=True, help="Archive every run of the project.")
@click.option("-o", "--output", metavar="FILE",
              help="Archive file (or an existing folder to put it in). Default: a name saying what it holds "
                   "(experiment, run or sweep id, date) in the current folder.")
@click.option("--format", "fmt", type=click.Choice(["zip", "tar.gz"]), default=None,
              help="Archive format (default: from the -o name, else tar.gz).")
@click.option("--verify", "verify_file", metavar="FILE",
              help="Instead of archiving, re-check FILE against its MANIFEST.json.")
@click.option("--strict", is_flag=True, help="Turn every warning (links, special files...) into an error.")
@click.option("--skip-unreadable", is_flag=True, help="Leave out unreadable files with a warning instead of failing.")
@click.option("--force", is_flag=True, help="Replace an existing archive at the output path.")
@json_option
@pass_ctx
def archive_cmd(ctx, refs: tuple[str, ...], all_runs: bool, output: str | None, fmt: str | None,
                verify_file: str | None, strict: bool, skip_unreadable: bool, force: bool, as_json: bool) -> None:
    """Bundle runs with their logs, recipe, Dockerfile and a checksummed MANIFEST.json.

    \b
    RUN|NAME|SWEEP: a run id (or unique prefix), an experiment name (its latest run),
    @last, or a sweep id (all its tasks). Symlinks are stored as links and never
    followed; FIFOs, sockets and devices are skipped with a warning. The archive appears
    at its final name only when complete; the runs themselves are never modified.

    \b
    Examples:
      hpcexp archive hello                      latest run of 'hello' as .tar.gz
      hpcexp archive SWEEP_ID -o sweep.zip      every task of a sweep as zip
      hpcexp archive --verify sweep.zip         re-check every member (exit 1 naming any that differ)
    """
    # The application layer is imported inside each command, not at module level:
    # `hpcexp --help` imports this module and must stay as cheap as click.
    from hpcexp.app import archive as app

    def progress(kind: str, text: str) -> None:
        if kind == "warn":
            warn(text)

    if verify_file is not None:
        app.check_verify_options(refs, all_runs, output, fmt)
        verified = app.verify(app.VerifyRequest(path=verify_file))
        report = verified.report
        if as_json:
            emit_json(verified.to_json())
        if verified.failure is not None:
            if not as_json:
                for p in report.problems:
                    click.echo(f"hpcexp: {p.line()}", err=True)
            raise verified.failure
        if not as_json:
            click.echo(f"{report.path}: OK ({report.checked} members match MANIFEST.json, "
                       f"{len(report.runs)} run{'s' if len(report.runs) != 1 else ''})")
        return

    _stop_on_sigterm()
    result = app.archive(ctx.project(), app.ArchiveRequest(refs=refs, all_runs=all_runs, output=output, format=fmt,
                                                           strict=strict, skip_unreadable=skip_unreadable,
                                                           force=force), progress=progress)
    if as_json:
        emit_json(result)
        return
    click.echo(str(result.path))
    info(f"archived {len(result.runs)} run{'s' if len(result.runs) != 1 else ''}, {result.files} files "
         f"({human_size(result.bytes)}) into {human_size(result.archive_bytes)} {result.format}"
         + (f"; {len(result.warnings)} warning{'s' if len(result.warnings) != 1 else ''}"
            if result.warnings else ""))


@click.command("extract")
@click.argument("archive_file", metavar="FILE")
@click.argument("dest", metavar="DIR")
@click.option("--skip-outside-links", is_flag=True,
              help="Leave out symlinks leading outside DIR (with a warning) instead of refusing the archive.")
@click.option("--max-size", "max_size", metavar="SIZE", default=None,
              help="Refuse an archive that unpacks to more than SIZE (e.g. 50G; default 16G).")
@click.option("--allow-large", is_flag=True,
              help="Extract however large the archive unpacks and however well it compresses "
                   "(no size or compression-ratio limit).")
@json_option
def extract_cmd(archive_file: str, dest: str, skip_outside_links: bool, max_size: str | None, allow_large: bool,
                as_json: bool) -> None:
    """Restore an archive into DIR (a new or empty folder), refusing anything unsafe.

    Absolute paths, '..', links leading outside DIR, writing through a link and device
    or FIFO members are refused (exit 2, naming the member) before anything is written,
    as are member paths deeper than 128 folders or longer than 2048 bytes, and archives that
    unpack to more than --max-size or compress better than 200:1 (a zip bomb).
    Files are checked against MANIFEST.json when the archive has one. An hpcexp archive
    of a results folder holding a link to outside the run keeps that link as a link;
    --skip-outside-links restores everything else.
    """
    from hpcexp.app import archive as app

    def progress(kind: str, text: str) -> None:
        if kind == "warn":
            warn(text)

    _stop_on_sigterm()
    result = app.extract(app.ExtractRequest(archive=archive_file, dest=dest, skip_outside_links=skip_outside_links,
                                            max_size=max_size, allow_large=allow_large), progress=progress)
    if as_json:
        emit_json(result)
        return
    click.echo(str(result.path))
    info(f"extracted {result.files} files ({human_size(result.bytes)})"
         + ("; every file matches MANIFEST.json" if result.verified else "; no manifest to check against"))


def _stop_on_sigterm() -> None:
    """SIGTERM (kill, scancel) unwinds like Ctrl-C so the temporary file is removed.

    Only the first one: a second SIGTERM while unwinding would interrupt the clean-up
    itself (closing the streams, removing the temporary file), so it is ignored; SIGKILL
    still ends the process at once.
    """
    import signal

    def handler(signum, frame):  # noqa: ANN001 - signal handler signature
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (embedded use): leave the default
        pass
