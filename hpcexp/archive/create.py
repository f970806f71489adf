"""``create_archive``: choose the output, scan the runs, write the manifest and the archive.

The archive is written under a temporary name in the destination folder and renamed
only when complete; archived runs are only read. An interruption (SIGTERM, Ctrl-C)
leaves no archive and says whether an existing one is unchanged. This is the only
module that knows about the output file; it drives ``scan``, ``manifest`` and ``writers``,
which know nothing of it.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from hpcexp.archive.base import FORMATS, ZIP_MIN_TIME, Warn, fault, is_inside
from hpcexp.archive.manifest import write_manifest
from hpcexp.archive.scan import ScannedRun, Scanner, collect_runs, prepare_run
from hpcexp.archive.writers import Changed, write_archive
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.core.runs import RunRecord, parse_time
from hpcexp.errors import Interrupted, NotFound, UsageError
from hpcexp.infra import atomic
from hpcexp.infra.units import human_size as human

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchiveResult:
    """What ``create_archive`` wrote."""

    path: Path
    format: str
    runs: list[str]
    files: int                    # regular files (MANIFEST.json excluded)
    links: int
    bytes: int                    # total size of the files archived
    archive_bytes: int            # size of the archive itself
    warnings: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def format_for(output: Path | None, fmt: str | None) -> str:
    """The archive format from ``--format`` and/or the output file name (they must agree)."""
    by_name = None
    if output is not None:
        name = output.name.lower()
        if name.endswith(".zip"):
            by_name = "zip"
        elif name.endswith((".tar.gz", ".tgz")):
            by_name = "tar.gz"
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown archive format {fmt!r}: choose zip or tar.gz")
    if fmt and by_name and fmt != by_name:
        raise UsageError(f"--format {fmt} does not match the output name {output}",
                         hint=f"name the file *.{fmt} or drop --format")
    return fmt or by_name or "tar.gz"


def default_name(records: list[RunRecord], fmt: str, today: _dt.date | None = None) -> str:
    """A file name saying what the archive holds: experiment, run or sweep id, date."""
    day = (today or _dt.datetime.now(_dt.timezone.utc).date()).strftime("%Y%m%d")
    exps = sorted({r.experiment for r in records})
    sweeps = {r.sweep_id for r in records}
    if len(records) == 1:
        stem = f"{records[0].experiment}-{records[0].run_id}"
    elif len(sweeps) == 1 and None not in sweeps and len(exps) == 1:
        sweep = re.sub(r"[^A-Za-z0-9._-]", "_", str(next(iter(sweeps))))
        stem = f"{exps[0]}-sweep-{sweep}-{day}"
    elif len(exps) == 1:
        stem = f"{exps[0]}-{len(records)}runs-{day}"
    else:
        stem = f"hpcexp-{len(records)}runs-{day}"
    return f"{stem}.{fmt}"


def _fixed_mtime(records: list[RunRecord]) -> int:
    """The one timestamp every member carries: the newest run's creation time (deterministic)."""
    times = [parse_time(r.created_at) for r in records]
    best = max((int(t) for t in times if t is not None), default=ZIP_MIN_TIME)
    return max(best, ZIP_MIN_TIME)


def create_archive(layout: Layout, specs: list[str], *, all_runs: bool = False,
                   output: Path | str | None = None, fmt: str | None = None, strict: bool = False,
                   skip_unreadable: bool = False, force: bool = False,
                   warn: Warn | None = None) -> ArchiveResult:
    """Archive the runs named by ``specs`` (and all runs with ``all_runs``) into one file.

    Raises UsageError for unreadable files (unless ``skip_unreadable``), for any warning
    under ``strict``, and for an existing output (unless ``force``); StorageError when
    writing fails, with the temporary file removed. Archived runs are only read (but for a
    sweep task whose record is still its sweep's table: its run.json is written out first).
    """
    warn = warn or (lambda msg: log.warning("%s", msg))
    out_path = Path(output) if output is not None else None
    fmt = format_for(out_path if out_path is not None and not out_path.is_dir() else None, fmt)
    items = collect_runs(layout, specs, all_runs)
    records = [rec for _, rec in items]
    if out_path is None:
        out_path = Path.cwd() / default_name(records, fmt)
    elif out_path.is_dir():
        out_path = out_path / default_name(records, fmt)
    out_path = Path(os.path.abspath(out_path))
    if out_path.exists() and not force:
        raise UsageError(f"{out_path} already exists", hint="pass --force to replace it, or -o another name")
    if not out_path.parent.is_dir():
        raise NotFound(f"output folder {out_path.parent} does not exist")
    real_parent = os.path.realpath(out_path.parent)
    for paths, _ in items:
        if is_inside(real_parent, os.path.realpath(paths.dir)):
            raise UsageError(f"the output {out_path} is inside the run folder {paths.dir} being archived",
                             hint="write the archive somewhere else with -o (runs are never modified)")

    before = _identity(out_path)
    try:
        return _create(out_path, fmt, items, records, strict=strict, skip_unreadable=skip_unreadable,
                       layout=layout, warn=warn)
    except KeyboardInterrupt:
        # SIGTERM (the CLI turns it into KeyboardInterrupt) or Ctrl-C: the temporary file
        # is gone by now. Say so, unless the archive had already been renamed into place.
        after = _identity(out_path)
        if after is not None and after != before:
            raise Interrupted(f"interrupted after {out_path} was complete; it is kept") from None
        raise Interrupted(f"interrupted while writing {out_path}; no archive was written"
                          + (" (the existing file is unchanged)" if before is not None else "")) from None


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, None when nothing is there: tells a new file from an old one."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _create(out_path: Path, fmt: str, items: list[tuple[RunPaths, RunRecord]], records: list[RunRecord], *,
            strict: bool, skip_unreadable: bool, layout: Layout, warn: Warn) -> ArchiveResult:
    scanner, runs, manifest_spool, manifest_size = _scan(layout, items, strict=strict,
                                                          skip_unreadable=skip_unreadable, warn=warn)
    try:
        mtime = _fixed_mtime(records)
        try:
            archive_bytes = _write(out_path, fmt, mtime, scanner, manifest_spool, manifest_size)
        except Changed as exc:
            raise UsageError(f"{exc}; no archive was written",
                             hint="archive again when the run has stopped writing") from None
    finally:
        scanner.spool.close()
        manifest_spool.close()
    return ArchiveResult(path=out_path, format=fmt, runs=[r.prefix for r in runs], files=scanner.files,
                         links=scanner.links, bytes=scanner.bytes, archive_bytes=archive_bytes,
                         warnings=list(scanner.warnings), skipped=list(scanner.skipped))


def _scan(layout: Layout, items: list[tuple[RunPaths, RunRecord]], *, strict: bool, skip_unreadable: bool,
          warn: Warn) -> tuple[Scanner, list[ScannedRun], IO[bytes], int]:
    """Pass 1: walk and hash every member, write MANIFEST.json to a spool (both closed on error)."""
    scanner = Scanner(warn=warn, skip_unreadable=skip_unreadable, project_root=str(layout.project.root))
    manifest_spool: IO[bytes] = tempfile.TemporaryFile(prefix="hpcexp-manifest-")  # noqa: SIM115
    try:
        runs = [prepare_run(layout, paths, rec, scanner) for paths, rec in items]
        for run in runs:
            root = os.path.realpath(run.paths.dir)
            fault("archive.scan")
            scanner.walk_dir(str(run.paths.dir), run.prefix, root, top=True, extra=run.extras)
        _fill_recipe_hashes(runs, scanner)
        if scanner.errors:
            more = len(scanner.errors) - 1
            raise UsageError(scanner.errors[0] + (f" (and {more} more)" if more else ""),
                             hint="fix the permissions, or pass --skip-unreadable to leave such files out")
        if strict and scanner.warnings:
            more = len(scanner.warnings) - 1
            raise UsageError(f"--strict: {scanner.warnings[0]}" + (f" (and {more} more)" if more else ""),
                             hint="fix the run folder, or drop --strict to archive with warnings")
        manifest_size = write_manifest(runs, scanner, manifest_spool)
    except BaseException:
        scanner.spool.close()
        manifest_spool.close()
        raise
    return scanner, runs, manifest_spool, manifest_size


@dataclass
class ArchiveStream:
    """An archive whose first pass is done, ready to be written to any byte sink.

    ``write_to(raw)`` runs pass 2 into a raw, possibly unseekable, file object (an HTTP
    response body): a zip then carries data descriptors. Same members, MANIFEST.json and
    checks as :func:`create_archive`; nothing is spooled but the manifest. Always
    ``close()`` it (also when ``write_to`` was never called).
    """

    name: str
    format: str
    runs: list[str]
    files: int
    bytes: int
    warnings: list[str]
    _scanner: Scanner
    _manifest: IO[bytes]
    _manifest_size: int
    _mtime: int

    def write_to(self, raw: IO[bytes]) -> None:
        try:
            write_archive(raw, self.format, self._mtime, self._manifest, self._manifest_size,
                          self._scanner.entries_iter())
        except Changed as exc:
            raise UsageError(f"{exc}; the archive is incomplete",
                             hint="archive again when the run has stopped writing") from None

    def close(self) -> None:
        self._scanner.spool.close()
        self._manifest.close()


def open_stream(layout: Layout, specs: list[str], *, fmt: str = "tar.gz", strict: bool = False,
                skip_unreadable: bool = False, warn: Warn | None = None) -> ArchiveStream:
    """Pass 1 of an archive of ``specs`` (as :func:`create_archive`), for streaming it."""
    warn = warn or (lambda msg: log.warning("%s", msg))
    if fmt not in FORMATS:
        raise UsageError(f"unknown archive format {fmt!r}; expected one of {', '.join(FORMATS)}")
    items = collect_runs(layout, specs, False)
    records = [rec for _, rec in items]
    scanner, runs, manifest, size = _scan(layout, items, strict=strict, skip_unreadable=skip_unreadable, warn=warn)
    return ArchiveStream(name=default_name(records, fmt), format=fmt, runs=[r.prefix for r in runs],
                         files=scanner.files, bytes=scanner.bytes, warnings=list(scanner.warnings),
                         _scanner=scanner, _manifest=manifest, _manifest_size=size, _mtime=_fixed_mtime(records))


def _fill_recipe_hashes(runs: list[ScannedRun], scanner: Scanner) -> None:
    """Record the archived recipe's sha256 and whether it is the one the run used."""
    for run in runs:
        info = run.info.get("recipe")
        digest = scanner.project_digests.get(info["path"]) if info else None
        if not info or digest is None:
            continue
        info["sha256"] = digest
        recorded = info.get("recorded_sha256")
        info["matches_record"] = None if not recorded else recorded == digest
        if recorded and recorded != digest:
            scanner.warn(info["path"], "recipe changed since the run (its sha256 differs from run.json's "
                         "recipe_sha256); archived as it is now", skipped=False)


def _write(out_path: Path, fmt: str, mtime: int, scanner: Scanner, manifest: IO[bytes],
           manifest_size: int) -> int:
    with atomic.atomic_open(out_path, "wb") as raw:
        write_archive(raw, fmt, mtime, manifest, manifest_size, scanner.entries_iter())
        size = raw.tell()
    return size


def human_summary(result: ArchiveResult) -> str:
    """One line for people: where, what, how big."""
    from_size = human(result.bytes)
    return (f"{result.path} ({result.format}, {len(result.runs)} run{'s' if len(result.runs) != 1 else ''}, "
            f"{result.files} files, {from_size} archived into {human(result.archive_bytes)})")
