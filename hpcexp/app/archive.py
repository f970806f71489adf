"""Use cases of archives: ``archive`` (runs into one verifiable file), ``verify`` and ``extract``.

Thin: the archive package owns the formats and their safety rules; this layer checks
which options go together and turns a report into an outcome (``failure``). Warnings
(a skipped FIFO, a link stored as a link) go to the ``progress`` callback as ``warn``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hpcexp.app.progress import Progress, silent
from hpcexp.core.config import Project
from hpcexp.errors import Failure, HpcexpError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from hpcexp.archive import ArchiveResult, ExtractResult, VerifyReport


@dataclass(frozen=True)
class ArchiveRequest:
    """``refs``: run ids (or unique prefixes), experiment names (their latest run), @last or
    sweep ids. ``output``: a file or an existing folder; None: a descriptive name in the
    current folder (a server passes an absolute path)."""

    refs: tuple[str, ...] = ()
    all_runs: bool = False
    output: str | None = None
    format: str | None = None        # zip | tar.gz (default: from the output name, else tar.gz)
    strict: bool = False
    skip_unreadable: bool = False
    force: bool = False


def _warner(progress: Progress | None) -> Any:
    report = progress or silent
    return lambda text: report("warn", text)


def archive(project: Project, req: ArchiveRequest, progress: Progress | None = None) -> "ArchiveResult":
    from hpcexp.archive import create_archive
    from hpcexp.core.layout import Layout

    return create_archive(Layout(project), list(req.refs), all_runs=req.all_runs, output=req.output,
                          fmt=req.format, strict=req.strict, skip_unreadable=req.skip_unreadable, force=req.force,
                          warn=_warner(progress))


@dataclass(frozen=True)
class VerifyRequest:
    path: str


@dataclass(frozen=True)
class VerifyResult:
    report: "VerifyReport"
    failure: HpcexpError | None      # the archive does not match its manifest

    def to_json(self) -> dict[str, Any]:
        r = self.report
        return {"path": r.path, "format": r.format, "ok": r.ok, "checked": r.checked, "runs": r.runs,
                "problems": [{"member": p.member, "kind": p.kind, "detail": p.detail} for p in r.problems]}


def check_verify_options(refs: tuple[str, ...], all_runs: bool, output: str | None, fmt: str | None) -> None:
    """Verifying checks an existing archive: nothing that makes one goes with it."""
    if refs or all_runs or output or fmt:
        raise UsageError("--verify FILE checks an existing archive; give no runs, --all, -o or --format with it")


def verify(req: VerifyRequest) -> VerifyResult:
    """Re-check every member of an archive against its MANIFEST.json (no project needed)."""
    from hpcexp.archive import verify_archive

    report = verify_archive(req.path)
    failure = None
    if not report.ok:
        first = report.problems[0]
        more = len(report.problems) - 1
        failure = Failure(f"{req.path} does not verify: {first.line()}" + (f" (and {more} more)" if more else ""))
    return VerifyResult(report, failure)


@dataclass(frozen=True)
class ExtractRequest:
    archive: str
    dest: str
    skip_outside_links: bool = False
    max_size: str | int | None = None    # "50G" or bytes; None: the default limit
    allow_large: bool = False


def extract(req: ExtractRequest, progress: Progress | None = None) -> "ExtractResult":
    """Restore an archive into a new or empty folder, refusing anything unsafe before writing."""
    from hpcexp import archive as store

    if req.max_size is None:
        limit = store.DEFAULT_MAX_SIZE
    elif isinstance(req.max_size, int):
        if req.max_size < 0:
            raise UsageError(f"invalid size {req.max_size}: 0 or more bytes")
        limit = req.max_size
    else:
        limit = store.parse_size(req.max_size)
    return store.extract_archive(req.archive, req.dest, skip_outside_links=req.skip_outside_links,
                                 warn=_warner(progress), max_size=limit, allow_large=req.allow_large)


__all__ = ["ArchiveRequest", "ExtractRequest", "VerifyRequest", "VerifyResult", "archive", "extract",
           "verify"]
