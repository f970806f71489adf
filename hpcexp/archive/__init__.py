"""Archives of runs: results plus everything needed to trust and reproduce them.

``hpcexp archive`` bundles, per run, the run folder (``run.json``, logs, the rendered job
script, ``results/``, ``events/``) with the recipe and the Dockerfile it came from, and
puts ``MANIFEST.json`` first: path, size and sha256 of every member, each run's
provenance (image sha256, recipe sha256, git commit) and hpcexp's version (reliability
invariant I7: an archive is verifiable).

Why it is built the way it is
  - Two passes. The manifest is the first member but lists every file's sha256, so a
    first pass walks and hashes everything, spooling entries to an unlinked temporary
    file (memory stays bounded whatever the number of files); the second pass writes the
    archive and re-hashes each file as it is copied: a file that changed in between is
    an error naming it, never an archive that lies.
  - Nothing outside the run leaks in. The walk never follows a symlink (``lstat``,
    ``scandir(follow_symlinks=False)``, ``O_NOFOLLOW``): a link is stored as a link, so a
    link to ``~/.ssh/id_rsa`` puts the string ``~/.ssh/id_rsa`` in the archive, never the
    key. FIFOs, sockets and devices are skipped before anything opens them (no hang).
  - Deterministic. Members are sorted, every timestamp is one fixed value derived from
    the runs, owners are 0/"" and modes are normalised, the gzip header carries no name
    and mtime 0: the same runs give a byte-identical ``.tar.gz``.
  - Crash consistent. The archive is written under a temporary name in the destination
    folder (:mod:`hpcexp.infra.atomic`) and renamed only when complete; archived runs are only
    read, never modified.
  - Interruptible. On any failure, SIGTERM or Ctrl-C included, the gzip or zip stream is
    cut off from the temporary file (:class:`_Sink`) and closed before that file is
    closed and removed: nothing the stdlib stream still wants to write (at once, or when
    the garbage collector finalises it, which Python 3.13 reports) reaches a closed file.

``extract`` restores an archive into a new (or empty) folder and refuses, before writing
anything, absolute names, ``..``, links leading outside the folder (also through chains
of links), writing through a link, and device or FIFO members, naming the member.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import functools
import gzip
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import signal
import stat
import struct
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from hpcexp import __version__
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.core.runs import RunRecord, iter_runs, parse_time, resolve
from hpcexp.errors import Failure, HpcexpError, Interrupted, NotFound, UsageError
from hpcexp.infra import atomic

log = logging.getLogger(__name__)

FORMATS = ("tar.gz", "zip")
MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = "hpcexp-archive"
MANIFEST_SCHEMA = 1
CHUNK = 1 << 20                  # read/write granularity: large copies, bounded memory
SMALL = 1 << 20                  # files up to this size are read in one call
ZIP_MIN_TIME = 315532800         # 1980-01-01, the earliest time a zip entry can hold
GZIP_LEVEL = 6                   # what `tar czf` (gzip -6) and `zip` use; level 9 is ~3x slower
TAR_RECORD = tarfile.RECORDSIZE
FAULT_ENV = "HPCEXP_TEST_FAULT"

Warn = Callable[[str], None]


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------

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


@dataclass(frozen=True)
class Problem:
    """One member that does not match the manifest."""

    member: str
    kind: str                     # differs | missing | extra | duplicate | corrupt | manifest
    detail: str

    def line(self) -> str:
        return f"{_show(self.member)}: {self.kind}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class VerifyReport:
    path: Path
    format: str
    ok: bool
    checked: int
    runs: list[str]
    problems: list[Problem]


@dataclass(frozen=True)
class ExtractResult:
    path: Path
    format: str
    files: int
    bytes: int
    verified: bool                # every file matched MANIFEST.json


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _show(name: str) -> str:
    """A member name safe to print on one line (control characters escaped)."""
    if _CONTROL.search(name) or any(0xD800 <= ord(c) <= 0xDFFF for c in name):
        return repr(name.encode("utf-8", "surrogateescape"))[2:-1]
    return name


def _fault(point: str) -> None:
    """Test hook: ``HPCEXP_TEST_FAULT=archive.write:sleep`` (or ``:enospc``, ``:sigterm``) at ``point``.

    Points, in order: ``archive.scan`` (first pass, nothing written yet), ``archive.write``
    (MANIFEST.json written), ``archive.member`` (inside a file larger than SMALL, after
    its first chunk), ``archive.close`` (every member written, the end of the stream
    not), ``archive.publish`` (the stream is complete, the file not renamed yet), and
    ``archive.abort`` (a failure is being cleaned up).
    ``sigterm`` sends this process SIGTERM there, as ``kill`` or ``scancel`` would.
    """
    spec = os.environ.get(FAULT_ENV, "")
    for item in spec.split(","):
        where, _, what = item.partition(":")
        if where != point:
            continue
        if what == "sleep":
            time.sleep(float(os.environ.get("HPCEXP_TEST_FAULT_SECONDS", "60")))
        elif what == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        elif what == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler interrupts this at once; without one the signal kills us


def detect_format(path: Path) -> str:
    """``zip`` or ``tar.gz`` (or ``tar``) from the file's first bytes, not its name."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except FileNotFoundError:
        raise NotFound(f"no archive at {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder, not an archive") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "tar.gz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    raise UsageError(f"{path} is not a zip or tar.gz archive")


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


def _is_inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


# --------------------------------------------------------------------------------------
# Pass 1: walk and hash into a spool
# --------------------------------------------------------------------------------------

@dataclass
class _Run:
    paths: RunPaths
    record: RunRecord
    prefix: str                               # "<experiment>/<run_id>"
    extras: list[tuple[str, Path]] = field(default_factory=list)   # (name in recipe/, source)
    info: dict[str, Any] = field(default_factory=dict)


class _Scanner:
    """Walks the runs without following links and spools one JSON line per member."""

    def __init__(self, *, warn: Warn, skip_unreadable: bool, project_root: str | None = None) -> None:
        self.warn_cb = warn
        self.project_root = os.path.realpath(project_root) if project_root else None
        self.skip_unreadable = skip_unreadable
        self.warnings: list[str] = []
        self.errors: list[str] = []
        self.skipped: list[dict[str, str]] = []
        self.spool: IO[bytes] = tempfile.TemporaryFile(prefix="hpcexp-archive-")  # noqa: SIM115
        self.entries = 0
        self.files = 0
        self.links = 0
        self.bytes = 0
        self.buf = bytearray(CHUNK)
        self.project_digests: dict[str, str] = {}

    # -- reporting
    def warn(self, arcname: str, message: str, *, skipped: bool = True) -> None:
        text = f"{_show(arcname)}: {message}"
        self.warnings.append(text)
        if skipped:
            self.skipped.append({"path": arcname, "reason": message})
        self.warn_cb(text)

    def unreadable(self, arcname: str, exc: OSError) -> None:
        message = f"cannot read {_show(arcname)}: {exc.strerror or exc}"
        if self.skip_unreadable:
            self.warn(arcname, f"unreadable ({exc.strerror or exc}); skipped")
        else:
            self.errors.append(message)

    def emit(self, entry: list[Any]) -> None:
        self.spool.write(json.dumps(entry, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n")
        self.entries += 1

    # -- hashing
    def hash_file(self, src: str, arcname: str, st: os.stat_result) -> tuple[str, os.stat_result] | None:
        """sha256 of a regular file opened without following links; None if skipped."""
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                self.unreadable(arcname, exc)
            elif exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
                self.warn(arcname, "vanished or changed type while archiving; skipped")
            else:
                self.unreadable(arcname, exc)
            return None
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode) or fst.st_ino != st.st_ino:
                self.warn(arcname, "changed type while archiving; skipped")
                return None
            h = hashlib.sha256()
            view = memoryview(self.buf)
            while True:
                n = os.readv(fd, [self.buf])
                if not n:
                    break
                h.update(view[:n])
            return h.hexdigest(), fst
        except OSError as exc:
            self.unreadable(arcname, exc)
            return None
        finally:
            os.close(fd)

    # -- walking
    def add_path(self, src: str, arcname: str, run_root: str) -> None:
        """One directory entry (already known not to be followed) and, for a folder, its tree."""
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            self.warn(arcname, "vanished while archiving; skipped")
            return
        except OSError as exc:
            self.unreadable(arcname, exc)
            return
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            self.add_link(src, arcname, run_root)
        elif stat.S_ISREG(mode):
            got = self.hash_file(src, arcname, st)
            if got is None:
                return
            digest, fst = got
            perm = 0o755 if fst.st_mode & 0o111 else 0o644
            self.emit(["file", arcname, src, fst.st_size, digest, perm, fst.st_ino, fst.st_mtime_ns])
            self.files += 1
            self.bytes += fst.st_size
        elif stat.S_ISDIR(mode):
            self.emit(["dir", arcname])
            self.walk_dir(src, arcname, run_root)
        else:
            kind = ("FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
                    else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")
            self.warn(arcname, f"is a {kind}; skipped (never opened)")

    def walk_dir(self, src: str, arcname: str, run_root: str, *, top: bool = False,
                 extra: list[tuple[str, Path]] | None = None) -> None:
        if top and os.path.islink(src):
            self.warn(arcname, "the run folder is a symbolic link; not followed, nothing of it archived")
            return
        try:
            with os.scandir(src) as it:
                names = sorted(e.name for e in it)
        except OSError as exc:
            self.unreadable(arcname + "/", exc)
            return
        for name in names:
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                self.warn(f"{arcname}/{name}", "file name is not valid UTF-8; skipped")
                continue
            if top and name.startswith(atomic.TMP_PREFIX):
                continue  # a record being replaced right now: the published one is archived
            if top and name == "recipe" and extra:
                self.warn(f"{arcname}/recipe", "the run folder has its own recipe/; the project's recipe "
                          "and Dockerfile are not added", skipped=False)
                extra = None
            self.add_path(os.path.join(src, name), f"{arcname}/{name}", run_root)
        if top and extra:
            self.emit(["dir", f"{arcname}/recipe"])
            for name, path in sorted(extra):
                self.add_project_file(path, f"{arcname}/recipe/{name}")

    def add_link(self, src: str, arcname: str, run_root: str) -> None:
        try:
            target = os.readlink(src)
        except OSError as exc:
            self.unreadable(arcname, exc)
            return
        try:
            target.encode("utf-8")
        except UnicodeEncodeError:
            self.warn(arcname, "symlink target is not valid UTF-8; skipped")
            return
        note = None
        try:
            os.stat(src)  # follows the link without opening anything: only to judge it
            real = os.path.realpath(src)
            if not _is_inside(real, run_root):
                note = f"symlink to {_show(target)} outside the run; stored as a link, not followed"
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                note = f"symlink loop ({_show(target)}); stored as a link, not followed"
            else:
                note = f"dangling symlink to {_show(target)}; stored as a link"
        if note:
            self.warn(arcname, note, skipped=False)
        self.emit(["symlink", arcname, target])
        self.links += 1

    def add_project_file(self, path: Path, arcname: str) -> None:
        """A recipe, report or Dockerfile: read through its link only if it stays in the project.

        Anything leading outside the project (a link to a secret elsewhere) is left out with a
        warning before it is opened, so no byte of it reaches the archive."""
        src = str(path)
        real = os.path.realpath(src)
        if self.project_root is not None and not _is_inside(real, self.project_root):
            self.warn(arcname, f"{_show(src)} leads outside the project (to {_show(real)}); not archived, "
                      "never read")
            return
        try:
            st = os.stat(src)
        except OSError as exc:
            self.unreadable(arcname, exc)
            return
        got = self.hash_file(os.path.realpath(src), arcname, st)
        if got is None:
            return
        digest, fst = got
        self.emit(["file", arcname, os.path.realpath(src), fst.st_size, digest, 0o644, fst.st_ino,
                   fst.st_mtime_ns])
        self.project_digests[arcname] = digest
        self.files += 1
        self.bytes += fst.st_size

    def entries_iter(self) -> Iterator[list[Any]]:
        self.spool.seek(0)
        for line in self.spool:
            yield json.loads(line.decode("utf-8", "surrogateescape"))


def _collect_runs(layout: Layout, specs: list[str], all_runs: bool) -> list[tuple[RunPaths, RunRecord]]:
    if not specs and not all_runs:
        raise UsageError("name runs, experiments or sweeps to archive, or pass --all",
                         hint="`hpcexp runs` lists them; @last is the newest run")
    found: dict[str, tuple[RunPaths, RunRecord]] = {}
    if all_runs:
        for paths, rec in iter_runs(layout):
            found[str(paths.dir)] = (paths, rec)
        if not found:
            raise NotFound("no runs yet in this project")
    for spec in specs:
        for paths, rec in resolve(layout, spec):
            found[str(paths.dir)] = (paths, rec)
    return sorted(found.values(), key=lambda t: (t[1].experiment, t[1].run_id))


def _prepare_run(layout: Layout, paths: RunPaths, rec: RunRecord, scanner: _Scanner) -> _Run:
    from hpcexp.core.config import host_arch

    # The folder name is the truth on disk; a record naming another place is reported.
    exp_name, run_id = paths.dir.parent.name, paths.dir.name
    prefix = f"{exp_name}/{run_id}"
    run = _Run(paths=paths, record=rec, prefix=prefix)
    if rec.error:
        scanner.warn(prefix, f"run record is damaged ({rec.error}); archiving the folder as it is",
                     skipped=False)
    if (rec.experiment, rec.run_id) != (exp_name, run_id):
        scanner.warn(prefix, f"run.json names {rec.experiment}/{rec.run_id}; archived under its folder name",
                     skipped=False)
    if not rec.terminal:
        scanner.warn(prefix, f"run is not finished (state {rec.state}); archiving what exists now",
                     skipped=False)
    if not rec.image_sha256:
        scanner.warn(prefix, "run.json records no image sha256", skipped=False)
    arch = rec.arch or host_arch()
    recipe_info: dict[str, Any] | None = None
    recipe = layout.recipe(exp_name, arch)
    if recipe.is_file():
        run.extras.append((recipe.name, recipe))
        recipe_info = {"path": f"{prefix}/recipe/{recipe.name}", "recorded_sha256": rec.recipe_sha256}
    else:
        scanner.warn(prefix, f"recipe {recipe} does not exist; not archived", skipped=False)
    dockerfile_info: dict[str, Any] | None = None
    exp = layout.project.experiments.get(exp_name)
    if exp is None:
        scanner.warn(prefix, f"experiment {exp_name!r} is not in the project any more; "
                     "its Dockerfile is not archived", skipped=False)
    else:
        try:
            dockerfile = exp.dockerfile(arch)
        except HpcexpError as exc:
            scanner.warn(prefix, f"no Dockerfile archived: {exc}", skipped=False)
        else:
            real = os.path.realpath(dockerfile)
            if not _is_inside(real, os.path.realpath(layout.project.root)):
                scanner.warn(prefix, f"Dockerfile {dockerfile} leads outside the project; not archived",
                             skipped=False)
            elif not os.path.isfile(real):
                scanner.warn(prefix, f"Dockerfile {dockerfile} does not exist; not archived", skipped=False)
            else:
                name = dockerfile.name if dockerfile.name != recipe.name else "Dockerfile"
                run.extras.append((name, dockerfile))
                try:
                    source = str(dockerfile.relative_to(layout.project.root))
                except ValueError:
                    source = str(dockerfile)
                dockerfile_info = {"path": f"{prefix}/recipe/{name}", "source": source}
    run.info = {
        "path": prefix,
        "experiment": rec.experiment,
        "run_id": rec.run_id,
        "sweep_id": rec.sweep_id,
        "task_index": rec.task_index,
        "state": rec.state,
        "executor": rec.executor,
        "exit_code": rec.exit_code,
        "created_at": rec.created_at,
        "ended_at": rec.ended_at,
        "arch": arch,
        "params": rec.params,
        "image": rec.image,
        "image_sha256": rec.image_sha256,
        "input_hash": rec.input_hash,
        "recipe_sha256": rec.recipe_sha256,
        "git_commit": rec.git_commit,
        "git_dirty": rec.git_dirty,
        "run_hpcexp_version": rec.hpcexp_version,
        "recipe": recipe_info,
        "dockerfile": dockerfile_info,
    }
    return run


def _fixed_mtime(records: list[RunRecord]) -> int:
    """The one timestamp every member carries: the newest run's creation time (deterministic)."""
    times = [parse_time(r.created_at) for r in records]
    best = max((int(t) for t in times if t is not None), default=ZIP_MIN_TIME)
    return max(best, ZIP_MIN_TIME)


def _manifest_bytes(runs: list[_Run], scanner: _Scanner, spool_out: IO[bytes]) -> int:
    """Write MANIFEST.json (one member per line, so it is streamed, never held whole)."""
    images: dict[tuple[str | None, str], None] = {}
    for run in runs:
        if run.info.get("image_sha256"):
            images[(run.info.get("image"), str(run.info["image_sha256"]))] = None
    head = {
        "format": MANIFEST_FORMAT,
        "schema": MANIFEST_SCHEMA,
        "hpcexp_version": __version__,
        "images": [{"image": i, "sha256": s} for i, s in images],
    }
    image_sha = sorted({s for _, s in images})
    head["image_sha256"] = image_sha[0] if len(image_sha) == 1 else None

    def dump(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, sort_keys=True).encode("utf-8", "surrogateescape")

    out = spool_out
    out.write(b"{\n")
    for key, value in head.items():
        out.write(b'  "' + key.encode() + b'": ' + dump(value) + b",\n")
    out.write(b'  "runs": [\n')
    out.write(b",\n".join(b"    " + dump(r.info) for r in runs))
    out.write(b'\n  ],\n  "files": [\n')
    first = True
    for entry in scanner.entries_iter():
        kind, arcname = entry[0], entry[1]
        if kind == "file":
            item: dict[str, Any] = {"path": arcname, "type": "file", "size": entry[3], "sha256": entry[4]}
        elif kind == "symlink":
            target = entry[2]
            item = {"path": arcname, "type": "symlink", "target": target,
                    "size": len(target.encode("utf-8")),
                    "sha256": hashlib.sha256(target.encode("utf-8")).hexdigest()}
        else:
            item = {"path": arcname, "type": "dir"}
        out.write((b"" if first else b",\n") + b"    " + dump(item))
        first = False
    out.write(b'\n  ],\n  "skipped": [\n')
    out.write(b",\n".join(b"    " + dump(s) for s in scanner.skipped))
    totals = {"runs": len(runs), "files": scanner.files, "links": scanner.links, "bytes": scanner.bytes}
    out.write(b'\n  ],\n  "totals": ' + dump(totals) + b"\n}\n")
    out.flush()
    return out.tell()


# --------------------------------------------------------------------------------------
# Pass 2: writers
# --------------------------------------------------------------------------------------

class _Changed(Exception):
    """A file differs between the hashing pass and the writing pass."""


class _Source:
    """A regular file reopened for pass 2, checked against what pass 1 saw."""

    def __init__(self, src: str, arcname: str, size: int, digest: str, ino: int) -> None:
        self.arcname, self.size, self.digest = arcname, size, digest
        try:
            self.fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise _Changed(f"{_show(arcname)} could not be reopened ({exc.strerror})") from None
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode) or st.st_ino != ino or st.st_size != size:
            os.close(self.fd)
            raise _Changed(f"{_show(arcname)} changed while archiving (size {size} -> {st.st_size})")
        self.hash = hashlib.sha256()
        self.left = size

    def chunks(self, buf: bytearray) -> Iterator[memoryview]:
        view = memoryview(buf)
        while self.left > 0:
            n = os.readv(self.fd, [view[:min(self.left, len(buf))]])
            if n == 0:
                raise _Changed(f"{_show(self.arcname)} shrank while archiving")
            chunk = view[:n]
            self.hash.update(chunk)
            self.left -= n
            yield chunk
            _fault("archive.member")

    def read_all(self) -> bytes:
        parts = []
        got = 0
        while got <= self.size:  # read one byte past the size: a file that grew is caught
            part = os.read(self.fd, self.size + 1 - got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        data = b"".join(parts)
        if len(data) != self.size:
            raise _Changed(f"{_show(self.arcname)} changed size while archiving")
        self.hash.update(data)
        self.left = 0
        return data

    def finish(self) -> None:
        os.close(self.fd)
        if self.hash.hexdigest() != self.digest:
            raise _Changed(f"{_show(self.arcname)} changed while archiving (sha256 differs)")


class _Sink:
    """The temporary archive file as the gzip and zip streams see it, until :meth:`cut`.

    A stdlib stream that is not closed writes its tail when it is finalised (GzipFile,
    its BufferedWriter, ZipFile and an open zip member all do), which after the file is
    closed is ``ValueError: write to closed file``: an "Exception ignored" traceback on
    Python 3.13, where IOBase finalisers report errors. Failing writers therefore cut
    the sink first and then close their streams: whatever they still write is counted
    and dropped, on every Python version, and only then is the file closed and removed.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw: IO[bytes] | None = raw
        self.pos = 0                       # the position once cut (zipfile asks for it)

    def cut(self) -> None:
        raw, self.raw = self.raw, None
        if raw is not None:
            try:
                self.pos = raw.tell()
            except (OSError, ValueError):
                pass

    def write(self, data: bytes | memoryview) -> int:
        raw = self.raw
        if raw is None:
            self.pos += len(data)
            return len(data)
        return raw.write(data)

    def tell(self) -> int:
        raw = self.raw
        return self.pos if raw is None else raw.tell()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        raw = self.raw
        if raw is not None:
            return raw.seek(offset, whence)
        if whence == os.SEEK_SET:
            self.pos = offset
        elif whence == os.SEEK_CUR:
            self.pos += offset
        return self.pos

    def seekable(self) -> bool:
        return True

    def flush(self) -> None:
        raw = self.raw
        if raw is not None:
            raw.flush()

    def close(self) -> None:
        """Nothing: the file belongs to atomic_open, which closes and renames or removes it."""


class _Compressor:
    """gzip in a second thread (zlib releases the GIL), as `tar czf` pipes into gzip."""

    def __init__(self, sink: _Sink) -> None:
        self.gz = gzip.GzipFile(filename="", mode="wb", fileobj=sink, compresslevel=GZIP_LEVEL,
                                mtime=0)
        self.q: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        self.dropping = False              # aborting: compress nothing more
        self.thread = threading.Thread(target=self._work, name="hpcexp-gzip", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is None and not self.dropping:
                try:
                    self.gz.write(item)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the writer thread
                    self.error = exc

    def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(data)

    def close(self) -> None:
        """Finish the stream: the worker drains the queue, then the gzip trailer is written."""
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        self.gz.close()

    def abort(self) -> None:
        """Stop the worker and close the gzip stream (its sink is cut: nothing is written)."""
        self.dropping = True
        try:
            self.q.put(None)
            self.thread.join()
        finally:
            with contextlib.suppress(Exception):
                self.gz.close()


def _ustar_header(name: str, kind: bytes, size: int, mode: int, mtime: int, linkname: str) -> bytes | None:
    """The header tarfile would write for a short ASCII member (byte for byte), ~10x faster.

    tarfile's ``tobuf`` costs ~100 us per member in pure Python, which dominated archives of
    100,000 small files; anything unusual (long or non-ASCII names, huge sizes) returns None
    and goes through tarfile, which adds the pax records it needs.
    """
    if kind == tarfile.DIRTYPE and not name.endswith("/"):
        name += "/"
    if not (name.isascii() and linkname.isascii() and len(name) <= 100 and len(linkname) <= 100
            and 0 <= size < 8 ** 11 and 0 <= mtime < 8 ** 11) or "\x00" in name or "\x00" in linkname:
        return None
    buf = b"".join((
        name.encode("ascii").ljust(100, b"\0"),
        b"%07o\0" % (mode & 0o7777), b"0000000\0", b"0000000\0",
        b"%011o\0" % size, b"%011o\0" % mtime,
        b"        ", kind, linkname.encode("ascii").ljust(100, b"\0"),
        b"ustar\x0000", b"\0" * 247,  # uname, gname, devmajor, devminor, prefix: empty
    ))
    return buf[:148] + b"%06o\0 " % sum(buf) + buf[156:]


class _TarGzWriter:
    """A ustar/pax stream written member by member (no member list kept in memory)."""

    def __init__(self, sink: _Sink, mtime: int) -> None:
        self.out = _Compressor(sink)
        self.mtime = mtime
        self.buf = bytearray()
        self.offset = 0

    def _put(self, data: bytes | memoryview) -> None:
        self.buf += data
        self.offset += len(data)
        if len(self.buf) >= CHUNK:
            self.out.write(bytes(self.buf))
            self.buf.clear()

    def _pad(self, size: int) -> None:
        rem = size % tarfile.BLOCKSIZE
        if rem:
            self._put(tarfile.NUL * (tarfile.BLOCKSIZE - rem))

    def _header(self, name: str, kind: bytes, size: int = 0, mode: int = 0o644, linkname: str = "") -> None:
        fast = _ustar_header(name, kind, size, mode, self.mtime, linkname)
        if fast is not None:
            self._put(fast)
            return
        ti = tarfile.TarInfo(name)
        ti.type, ti.size, ti.mode, ti.mtime, ti.linkname = kind, size, mode, self.mtime, linkname
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        self._put(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def add_bytes_stream(self, name: str, size: int, stream: IO[bytes]) -> None:
        self._header(name, tarfile.REGTYPE, size)
        left = size
        while left:
            data = stream.read(min(CHUNK, left))
            if not data:
                raise _Changed(f"{name} shrank while archiving")
            self._put(data)
            left -= len(data)
        self._pad(size)

    def add_file(self, source: _Source, mode: int, buf: bytearray) -> None:
        self._header(source.arcname, tarfile.REGTYPE, source.size, mode)
        if source.size <= SMALL:
            self._put(source.read_all())
        else:
            for chunk in source.chunks(buf):
                self._put(chunk)
        self._pad(source.size)

    def add_dir(self, name: str) -> None:
        self._header(name, tarfile.DIRTYPE, mode=0o755)

    def add_symlink(self, name: str, target: str) -> None:
        self._header(name, tarfile.SYMTYPE, mode=0o777, linkname=target)

    def close(self) -> None:
        self._put(tarfile.NUL * (tarfile.BLOCKSIZE * 2))
        rem = self.offset % TAR_RECORD
        if rem:
            self._put(tarfile.NUL * (TAR_RECORD - rem))
        if self.buf:
            self.out.write(bytes(self.buf))
            self.buf.clear()
        self.out.close()

    def abort(self) -> None:
        """After :meth:`_Sink.cut`: stop compressing; the original error is what matters."""
        with contextlib.suppress(Exception):
            self.out.abort()


class _ZipWriter:
    """zip with deflate level 6, zip64 where needed, fixed timestamps."""

    def __init__(self, sink: _Sink, mtime: int) -> None:
        self.zf = zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=GZIP_LEVEL,
                                  allowZip64=True)
        self.date_time = time.gmtime(max(mtime, ZIP_MIN_TIME))[:6]

    def _info(self, name: str, mode: int, compress: bool = True) -> zipfile.ZipInfo:
        zi = zipfile.ZipInfo(name, date_time=self.date_time)
        zi.create_system = 3
        zi.external_attr = (mode & 0xFFFF) << 16
        zi.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        return zi

    def add_bytes_stream(self, name: str, size: int, stream: IO[bytes]) -> None:
        zi = self._info(name, stat.S_IFREG | 0o644)
        zi.file_size = size
        with self.zf.open(zi, "w") as dst:
            shutil.copyfileobj(stream, dst, CHUNK)

    def add_file(self, source: _Source, mode: int, buf: bytearray) -> None:
        zi = self._info(source.arcname, stat.S_IFREG | mode)
        if source.size <= SMALL:
            self.zf.writestr(zi, source.read_all())
            return
        zi.file_size = source.size
        # file_size is known, so zipfile switches to zip64 by itself when the member needs it
        with self.zf.open(zi, "w") as dst:
            for chunk in source.chunks(buf):
                dst.write(chunk)

    def add_dir(self, name: str) -> None:
        zi = self._info(name + "/", stat.S_IFDIR | 0o755, compress=False)
        zi.external_attr |= 0x10  # MS-DOS directory bit
        self.zf.writestr(zi, b"")

    def add_symlink(self, name: str, target: str) -> None:
        self.zf.writestr(self._info(name, stat.S_IFLNK | 0o777, compress=False), target.encode("utf-8"))

    def close(self) -> None:
        self.zf.close()

    def abort(self) -> None:
        """After :meth:`_Sink.cut`: close the zip (its central directory goes nowhere) so
        that neither it nor a member left open writes anything when finalised."""
        with contextlib.suppress(Exception):
            self.zf.close()


# --------------------------------------------------------------------------------------
# create
# --------------------------------------------------------------------------------------

def create_archive(layout: Layout, specs: list[str], *, all_runs: bool = False,
                   output: Path | str | None = None, fmt: str | None = None, strict: bool = False,
                   skip_unreadable: bool = False, force: bool = False,
                   warn: Warn | None = None) -> ArchiveResult:
    """Archive the runs named by ``specs`` (and all runs with ``all_runs``) into one file.

    Raises UsageError for unreadable files (unless ``skip_unreadable``), for any warning
    under ``strict``, and for an existing output (unless ``force``); StorageError when
    writing fails, with the temporary file removed. Archived runs are only read.
    """
    warn = warn or (lambda msg: log.warning("%s", msg))
    out_path = Path(output) if output is not None else None
    fmt = format_for(out_path if out_path is not None and not out_path.is_dir() else None, fmt)
    items = _collect_runs(layout, specs, all_runs)
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
        if _is_inside(real_parent, os.path.realpath(paths.dir)):
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
        except _Changed as exc:
            raise UsageError(f"{exc}; no archive was written",
                             hint="archive again when the run has stopped writing") from None
    finally:
        scanner.spool.close()
        manifest_spool.close()
    return ArchiveResult(path=out_path, format=fmt, runs=[r.prefix for r in runs], files=scanner.files,
                         links=scanner.links, bytes=scanner.bytes, archive_bytes=archive_bytes,
                         warnings=list(scanner.warnings), skipped=list(scanner.skipped))


def _scan(layout: Layout, items: list[tuple[RunPaths, RunRecord]], *, strict: bool, skip_unreadable: bool,
          warn: Warn) -> tuple[_Scanner, list[_Run], IO[bytes], int]:
    """Pass 1: walk and hash every member, write MANIFEST.json to a spool (closed on error)."""
    scanner = _Scanner(warn=warn, skip_unreadable=skip_unreadable, project_root=str(layout.project.root))
    manifest_spool: IO[bytes] = tempfile.TemporaryFile(prefix="hpcexp-manifest-")  # noqa: SIM115
    try:
        runs = [_prepare_run(layout, paths, rec, scanner) for paths, rec in items]
        for run in runs:
            root = os.path.realpath(run.paths.dir)
            _fault("archive.scan")
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
        manifest_size = _manifest_bytes(runs, scanner, manifest_spool)
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
    _scanner: _Scanner
    _manifest: IO[bytes]
    _manifest_size: int
    _mtime: int

    def write_to(self, raw: IO[bytes]) -> None:
        try:
            _write_stream(raw, self.format, self._mtime, self._scanner, self._manifest, self._manifest_size)
        except _Changed as exc:
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
    items = _collect_runs(layout, specs, False)
    records = [rec for _, rec in items]
    scanner, runs, manifest, size = _scan(layout, items, strict=strict, skip_unreadable=skip_unreadable, warn=warn)
    return ArchiveStream(name=default_name(records, fmt), format=fmt, runs=[r.prefix for r in runs],
                         files=scanner.files, bytes=scanner.bytes, warnings=list(scanner.warnings),
                         _scanner=scanner, _manifest=manifest, _manifest_size=size, _mtime=_fixed_mtime(records))


def _fill_recipe_hashes(runs: list[_Run], scanner: _Scanner) -> None:
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


def _write(out_path: Path, fmt: str, mtime: int, scanner: _Scanner, manifest: IO[bytes],
           manifest_size: int) -> int:
    with atomic.atomic_open(out_path, "wb") as raw:
        _write_stream(raw, fmt, mtime, scanner, manifest, manifest_size)
        _fault("archive.publish")
        size = raw.tell()
    return size


def _write_stream(raw: IO[bytes], fmt: str, mtime: int, scanner: _Scanner, manifest: IO[bytes],
                  manifest_size: int) -> None:
    """Pass 2 into ``raw`` (a file, or an unseekable sink such as an HTTP response)."""
    buf = bytearray(CHUNK)
    sink = _Sink(raw)
    writer: _TarGzWriter | _ZipWriter = _TarGzWriter(sink, mtime) if fmt == "tar.gz" else _ZipWriter(sink, mtime)
    try:
        manifest.seek(0)
        writer.add_bytes_stream(MANIFEST_NAME, manifest_size, manifest)
        _fault("archive.write")
        for entry in scanner.entries_iter():
            kind, arcname = entry[0], entry[1]
            if kind == "dir":
                writer.add_dir(arcname)
            elif kind == "symlink":
                writer.add_symlink(arcname, entry[2])
            else:
                _, _, src, size, digest, perm, ino, _mt = entry
                source = _Source(src, arcname, size, digest, ino)
                try:
                    writer.add_file(source, perm, buf)
                except BaseException:
                    os.close(source.fd)
                    raise
                source.finish()
        _fault("archive.close")
        writer.close()
    except BaseException:
        # Streams before their file: cut the sink, close the streams into it, and only
        # then let the caller close (and, for a file, remove) what it wrote into.
        _fault("archive.abort")
        sink.cut()
        writer.abort()
        raise


# --------------------------------------------------------------------------------------
# Reading archives (verify and extract share the member iteration)
# --------------------------------------------------------------------------------------

@dataclass
class _Member:
    name: str                      # as stored, without a trailing "/" for folders
    kind: str                      # file | dir | symlink | hardlink | special
    size: int = 0
    target: str = ""
    mode: int = 0o644
    detail: str = ""               # for special: what it is
    open: Callable[[], IO[bytes]] | None = None
    packed: int | None = None      # zip: the member's compressed size (for the ratio check)


class _Corrupt(Exception):
    def __init__(self, member: str, detail: str) -> None:
        super().__init__(detail)
        self.member, self.detail = member, detail


# What reading a damaged or odd archive raises (zipfile: RuntimeError for encrypted members,
# NotImplementedError for unknown compression; tarfile/gzip: their own errors, zlib.error).
_READ_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError,
                                                 gzip.BadGzipFile, struct.error, ValueError,
                                                 NotImplementedError, RuntimeError)


def _iter_members(path: Path, fmt: str) -> Iterator[_Member]:
    """Members in archive order; raises _Corrupt naming the member being read."""
    if fmt == "zip":
        yield from _iter_zip(path)
    else:
        yield from _iter_tar(path)


def _iter_tar(path: Path) -> Iterator[_Member]:
    last = "(start of archive)"
    try:
        with tarfile.open(path, "r|*") as tf:
            while True:
                ti = tf.next()
                if ti is None:
                    break
                tf.members.clear()  # type: ignore[attr-defined]  # TarFile keeps every member read (~50 MiB/100k)
                last = ti.name
                name = ti.name.rstrip("/") if ti.isdir() else ti.name
                if ti.isreg():
                    m = _Member(name, "file", ti.size, mode=ti.mode, open=functools.partial(_tar_open, tf, ti))
                elif ti.isdir():
                    m = _Member(name, "dir", mode=ti.mode)
                elif ti.issym():
                    m = _Member(name, "symlink", target=ti.linkname)
                elif ti.islnk():
                    m = _Member(name, "hardlink", target=ti.linkname)
                else:
                    what = ("FIFO" if ti.isfifo() else "character device" if ti.ischr()
                            else "block device" if ti.isblk() else "special member")
                    m = _Member(name, "special", detail=what)
                yield m
    except _READ_ERRORS as exc:
        raise _Corrupt(last, f"{type(exc).__name__}: {exc}") from None


def _tar_open(tf: tarfile.TarFile, ti: tarfile.TarInfo) -> IO[bytes]:
    fh = tf.extractfile(ti)
    if fh is None:  # pragma: no cover - only regular members get an opener
        raise tarfile.ReadError(f"{ti.name} has no data")
    return fh


def _iter_zip(path: Path) -> Iterator[_Member]:
    last = "(central directory)"
    try:
        with zipfile.ZipFile(path) as zf:
            for zi in zf.infolist():
                last = zi.filename
                mode = (zi.external_attr >> 16) & 0xFFFF if zi.create_system == 3 else 0
                ftype = stat.S_IFMT(mode)
                name = zi.filename
                if zi.is_dir() or ftype == stat.S_IFDIR:
                    yield _Member(name.rstrip("/"), "dir", mode=mode & 0o7777 or 0o755)
                elif ftype == stat.S_IFLNK:
                    if zi.file_size > 65536:
                        raise _Corrupt(name, "symlink target longer than 64 KiB")
                    target = zf.read(zi).decode("utf-8", "surrogateescape")
                    yield _Member(name, "symlink", target=target)
                elif ftype in (0, stat.S_IFREG):
                    yield _Member(name, "file", zi.file_size, mode=mode & 0o7777 or 0o644,
                                  open=functools.partial(zf.open, zi), packed=zi.compress_size)
                else:
                    what = ("FIFO" if ftype == stat.S_IFIFO else "socket" if ftype == stat.S_IFSOCK
                            else "device" if ftype in (stat.S_IFCHR, stat.S_IFBLK) else "special member")
                    yield _Member(name, "special", detail=what)
    except _READ_ERRORS as exc:
        raise _Corrupt(last, f"{type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise _Corrupt(last, f"{exc.strerror or exc}") from None


def _hash_member(m: _Member) -> tuple[int, str]:
    assert m.open is not None
    h = hashlib.sha256()
    size = 0
    with m.open() as fh:
        while True:
            data = fh.read(CHUNK)
            if not data:
                break
            h.update(data)
            size += len(data)
    return size, h.hexdigest()


def _compact(item: Any) -> tuple[str, tuple[str, int | None, bytes | str | None]] | None:
    """(path, compact entry) of one manifest entry: 100,000 entries must fit in a few MiB."""
    if not isinstance(item, dict) or not isinstance(item.get("path"), str):
        return None
    kind = sys.intern(str(item.get("type")))
    if kind == "file":
        try:
            digest: bytes | str | None = bytes.fromhex(str(item.get("sha256")))
        except ValueError:
            digest = None
        size = item.get("size") if isinstance(item.get("size"), int) else None
        return item["path"], (kind, size, digest)
    if kind == "symlink":
        return item["path"], (kind, None, str(item.get("target")))
    return item["path"], (kind, None, None)


def _load_manifest(m: _Member, archive: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the manifest without its file list, {path: compact entry}).

    hpcexp writes one file entry per line, so the list is parsed line by line and never
    held as JSON objects (a manifest of 100,000 files would take ~100 MiB that way); any
    other valid layout falls back to parsing the whole document.
    """
    assert m.open is not None
    expected: dict[str, Any] = {}
    rest: list[str] = []
    in_files = False
    line_mode = True
    with tempfile.SpooledTemporaryFile(max_size=8 << 20) as copy:
        with m.open() as fh:
            for raw in fh:
                copy.write(raw)
                if not line_mode:
                    continue
                line = raw.decode("utf-8", "surrogateescape").strip()
                if in_files:
                    if line in ("]", "],"):
                        in_files = False
                        rest.append(line)
                        continue
                    try:
                        got = _compact(json.loads(line[:-1] if line.endswith(",") else line))
                    except ValueError:
                        got = None
                    if got is None:
                        line_mode = False
                        continue
                    expected[got[0]] = got[1]
                else:
                    if line == '"files": [':
                        in_files = True
                    rest.append(line)
        head: Any = None
        if line_mode:
            try:
                head = json.loads("\n".join(rest))
            except ValueError:
                head = None
        if not isinstance(head, dict) or not isinstance(head.get("files"), list):
            copy.seek(0)
            try:
                head = json.loads(copy.read().decode("utf-8", "surrogateescape"))
            except ValueError as exc:
                raise Failure(f"{archive}: {MANIFEST_NAME} is not valid JSON ({exc})") from None
            if isinstance(head, dict) and isinstance(head.get("files"), list):
                expected = dict(e for e in map(_compact, head.pop("files")) if e is not None)
                head["files"] = []
    if not isinstance(head, dict) or head.get("format") != MANIFEST_FORMAT or not isinstance(head.get("files"), list):
        raise Failure(f"{archive}: {MANIFEST_NAME} is not an hpcexp manifest")
    return head, expected


def verify_archive(path: Path | str) -> VerifyReport:
    """Re-check every member against MANIFEST.json; the report lists every mismatch.

    Files that differ (size or sha256), are missing, are not in the manifest or appear
    twice are all listed; a damaged archive is reported at the member being read.
    """
    path = Path(path)
    fmt = detect_format(path)
    problems: list[Problem] = []
    expected: dict[str, Any] = {}   # path -> compact entry, or SEEN once checked
    runs: list[str] = []
    checked = 0
    have_manifest = False
    try:
        for i, m in enumerate(_iter_members(path, fmt)):
            if m.name == MANIFEST_NAME and not have_manifest:
                if i != 0:
                    problems.append(Problem(m.name, "manifest", "not the first member"))
                head, expected = _load_manifest(m, path)
                have_manifest = True
                runs = [str(r.get("path")) for r in head.get("runs", []) if isinstance(r, dict)]
                continue
            if not have_manifest:
                raise Failure(f"{path}: {MANIFEST_NAME} is not the first member (found {_show(m.name)})",
                              hint="this is not an hpcexp archive, or it was re-packed")
            want = expected.get(m.name)
            if want is _SEEN:
                problems.append(Problem(m.name, "duplicate", "member appears twice"))
                continue
            if want is None:
                problems.append(Problem(m.name, "extra", "not in the manifest"))
                continue
            expected[m.name] = _SEEN
            kind, want_size, want_value = want
            if kind != m.kind:
                problems.append(Problem(m.name, "differs", f"is a {m.kind}, manifest says {kind}"))
                continue
            checked += 1
            if m.kind == "file":
                try:
                    size, digest = _hash_member(m)
                except _READ_ERRORS as exc:
                    problems.append(Problem(m.name, "corrupt", f"{type(exc).__name__}: {exc}"))
                    if fmt != "zip":
                        break  # a broken compressed stream cannot be read past this point
                    continue
                if size != want_size or bytes.fromhex(digest) != want_value:
                    shown = want_value.hex()[:12] if isinstance(want_value, bytes) else "?"
                    problems.append(Problem(m.name, "differs", f"size {size}, sha256 {digest[:12]}...; "
                                            f"manifest: size {want_size}, sha256 {shown}..."))
            elif m.kind == "symlink" and m.target != want_value:
                problems.append(Problem(m.name, "differs", f"link to {_show(m.target)}, manifest says "
                                        f"{_show(str(want_value))}"))
    except _Corrupt as exc:
        problems.append(Problem(exc.member, "corrupt", exc.detail))
    if not have_manifest and not problems:
        raise Failure(f"{path}: no {MANIFEST_NAME} in the archive", hint="this is not an hpcexp archive")
    if have_manifest and not any(p.kind == "corrupt" for p in problems):
        for name, value in expected.items():
            if value is not _SEEN:
                problems.append(Problem(name, "missing", "listed in the manifest, not in the archive"))
    return VerifyReport(path=path, format=fmt, ok=not problems, checked=checked, runs=runs, problems=problems)


_SEEN = ("seen", None, None)


# --------------------------------------------------------------------------------------
# extract
# --------------------------------------------------------------------------------------

MAX_LINK_HOPS = 40
MAX_MEMBER_DEPTH = 128           # folders in one member path; results trees are far shallower
MAX_MEMBER_NAME = 2048           # bytes of one member path (PATH_MAX is 4096 with the destination)
MAX_COMPONENT = 255              # bytes of one path component (NAME_MAX)
DEFAULT_MAX_SIZE = 16 << 30      # total bytes an extraction writes unless --max-size / --allow-large
MAX_RATIO = 200                  # unpacked : packed, checked once more than RATIO_FLOOR is unpacked
RATIO_FLOOR = 64 << 20


def parse_size(text: str) -> int:
    """``10G``, ``500M``, ``64k`` or plain bytes (binary units) -> bytes; UsageError otherwise."""
    m = re.fullmatch(r"\s*(\d{1,15})\s*([kKmMgGtT]?)(i?B)?\s*", text or "")
    if not m:
        raise UsageError(f"invalid size {text[:40]!r}: use bytes or a number with K, M, G or T (e.g. 20G)")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]


def _safe_name(name: str) -> tuple[str, str | None]:
    """(normalised name, why it is unsafe or None). ``./a//b`` becomes ``a/b``; ``.`` is ""."""
    if "\x00" in name:
        return name, "NUL byte in the name"
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        return name, "absolute path"
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return name, "'..' in the path"
    return "/".join(parts), None


def _resolve_link(start_dir: list[str], target: str, links: dict[str, str]) -> str:
    """Where ``target`` (relative to ``start_dir``) leads, following the archive's own
    symlinks so a chain of links cannot step out: "inside", "outside" or "loop"."""
    if target.startswith("/"):
        return "outside"
    stack = list(start_dir)
    todo = [p for p in target.split("/") if p not in ("", ".")]
    hops = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if not stack:
                return "outside"
            stack.pop()
            continue
        stack.append(part)
        key = "/".join(stack)
        if key in links:
            hops += 1
            if hops > MAX_LINK_HOPS:
                return "loop"
            nxt = links[key]
            if nxt.startswith("/"):
                return "outside"
            stack.pop()
            todo = [p for p in nxt.split("/") if p not in ("", ".")] + todo
    return "inside"


def _validate(path: Path, fmt: str, *, skip_outside_links: bool = False,
              warn: Warn | None = None, max_size: int | None = DEFAULT_MAX_SIZE,
              max_ratio: float | None = MAX_RATIO) -> tuple[set[str], dict[str, str]]:
    """First pass over an untrusted archive: refuse (UsageError naming the member) before
    anything is written. Returns the links to leave out (only with ``skip_outside_links``)
    and every validated link, which the second pass insists on finding unchanged."""
    names: set[str] = set()
    files: set[str] = set()
    links: dict[str, str] = {}

    def refuse(name: str, why: str) -> UsageError:
        return UsageError(f"refusing to extract {path}: member {_show(name)}: {why}; nothing was written",
                          hint="the archive may be hostile or damaged; inspect it with `tar tvzf` / `unzip -l`")

    total = packed = 0
    zip_packed = True
    try:
        for m in _iter_members(path, fmt):
            raw_len = len(m.name.encode("utf-8", "surrogateescape"))
            if raw_len > MAX_MEMBER_NAME:
                raise refuse(m.name[:200] + "...", f"path of {raw_len} bytes, more than the {MAX_MEMBER_NAME} allowed")
            name, why = _safe_name(m.name)
            if why:
                raise refuse(m.name, why)
            depth = name.count("/") + 1
            if depth > MAX_MEMBER_DEPTH:
                raise refuse(name[:200] + "...", f"path {depth} levels deep, more than the {MAX_MEMBER_DEPTH} allowed")
            if any(len(p.encode("utf-8", "surrogateescape")) > MAX_COMPONENT for p in name.split("/")):
                raise refuse(name, f"a path component longer than {MAX_COMPONENT} bytes")
            if m.kind == "file":
                total += m.size
                if m.packed is None:
                    zip_packed = False
                else:
                    packed += m.packed
                if max_size is not None and total > max_size:
                    raise refuse(m.name, f"the archive unpacks to more than {_human(max_size)} "
                                 "(use --max-size SIZE or --allow-large if that is expected)")
            if not name:
                if m.kind == "dir":
                    continue  # "./": the destination itself
                raise refuse(m.name, "empty name")
            if m.kind == "special":
                raise refuse(m.name, f"{m.detail} members are never extracted")
            if name in names:
                raise refuse(m.name, "appears twice in the archive")
            parts = name.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                if parent in links:
                    raise refuse(m.name, f"would be written through the symlink {_show(parent)}")
                if parent in files:
                    raise refuse(m.name, f"its parent {_show(parent)} is a file")
            if m.kind == "symlink":
                if not m.target:
                    raise refuse(m.name, "symlink with an empty target")
                if m.target.startswith("/") and not skip_outside_links:
                    raise refuse(m.name, f"symlink to the absolute path {_show(m.target)}")
                links[name] = m.target
            elif m.kind == "hardlink":
                tname, why = _safe_name(m.target)
                if why or tname not in files:
                    raise refuse(m.name, f"hard link to {_show(m.target)}, which is not a file extracted before")
                files.add(name)
            elif m.kind == "file":
                files.add(name)
            names.add(name)
    except _Corrupt as exc:
        raise Failure(f"{path} is damaged at member {_show(exc.member)}: {exc.detail}; nothing was written") from None
    if max_ratio is not None and total > RATIO_FLOOR:
        try:
            on_disk = packed if (fmt == "zip" and zip_packed) else os.stat(path).st_size
        except OSError:
            on_disk = 0
        ratio = total / max(on_disk, 1)
        if ratio > max_ratio:
            raise UsageError(f"refusing to extract {path}: it unpacks to {_human(total)} from {_human(on_disk)} "
                             f"(ratio {ratio:.0f}:1, more than {max_ratio:.0f}:1); nothing was written",
                             hint="a compression bomb, or very repetitive data: pass --allow-large if you trust it")
    skip: set[str] = set()
    while True:  # leaving a link out changes where others lead: repeat until stable
        kept = {n: t for n, t in links.items() if n not in skip}
        bad = [n for n, t in sorted(kept.items()) if _resolve_link(n.split("/")[:-1], t, kept) == "outside"]
        if not bad:
            break
        if not skip_outside_links:
            raise refuse(bad[0], f"symlink to {_show(links[bad[0]])} leads outside the destination")
        skip.update(bad)
    for name in skip:
        if warn is not None:
            warn(f"{_show(name)}: symlink to {_show(links[name])} leads outside the destination; left out")
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in links:
                raise refuse(name, f"would be written through the symlink {_show('/'.join(parts[:i]))}")
    return skip, links


def extract_archive(path: Path | str, dest: Path | str, *, skip_outside_links: bool = False,
                    warn: Warn | None = None, max_size: int | None = DEFAULT_MAX_SIZE,
                    allow_large: bool = False) -> ExtractResult:
    """Restore an archive into ``dest`` (new or empty), refusing anything unsafe.

    Every member is validated before the first byte is written; the tree is built in a
    temporary sibling folder and renamed to ``dest`` when complete (removed on any failure,
    without recursion). When the archive has an hpcexp manifest, each file's sha256 is
    checked as it is written. Member paths are bounded in depth and length; the total size
    (``max_size``) and the compression ratio are limited unless ``allow_large``.
    """
    path, dest = Path(path), Path(os.path.abspath(dest))
    fmt = detect_format(path)
    if dest.is_symlink():
        raise UsageError(f"destination {dest} is a symlink", hint="extract into a new folder")
    if dest.exists():
        if not dest.is_dir():
            raise UsageError(f"destination {dest} exists and is not a folder")
        if any(dest.iterdir()):
            raise UsageError(f"destination {dest} is not empty",
                             hint="extract into a new or empty folder (nothing is ever overwritten)")
    skip, links = _validate(path, fmt, skip_outside_links=skip_outside_links, warn=warn,
                            max_size=None if allow_large else max_size, max_ratio=None if allow_large else MAX_RATIO)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise atomic.storage_error(exc, dest.parent) from exc
    tmp = atomic.tmp_name_for(dest)
    try:
        tmp.mkdir(mode=0o700)
    except OSError as exc:
        raise atomic.storage_error(exc, tmp) from exc
    try:
        files, total, verified = _extract_into(path, fmt, tmp, skip, links)
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, dest)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise UsageError(f"destination {dest} was filled while extracting; nothing was written") from None
            raise
        atomic.fsync_dir(dest.parent)
    except BaseException as exc:
        _remove_tree(str(tmp))
        if isinstance(exc, OSError):
            raise atomic.storage_error(exc, dest) from exc
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or SIGTERM through the CLI
            raise Interrupted(f"interrupted while extracting into {dest}; nothing was written") from None
        raise
    return ExtractResult(path=dest, format=fmt, files=files, bytes=total, verified=verified)


def _remove_tree(top: str) -> None:
    """rm -rf ``top`` without recursion and by directory descriptors: a hostile tree may be
    deeper than Python's stack, than PATH_MAX and than the descriptor limit (only one
    folder is open at a time; ``..`` leads back up). Links are never followed; errors are
    ignored (best effort on a failure path), and the walk always ends."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(top, flags)
    except OSError:
        return
    stack: list[tuple[str, set[str]]] = [("", set())]   # (name in parent, names to skip here)
    try:
        while stack:
            skip = stack[-1][1]
            child = None
            try:
                with os.scandir(fd) as it:
                    for e in it:
                        if e.name in skip:
                            continue
                        if e.is_dir(follow_symlinks=False):
                            child = e.name
                            break
                        try:
                            os.unlink(e.name, dir_fd=fd)
                        except OSError:
                            skip.add(e.name)
            except OSError:
                pass
            if child is not None:
                try:
                    nfd = os.open(child, flags, dir_fd=fd)
                except OSError:
                    skip.add(child)
                    continue
                os.close(fd)
                fd = nfd
                stack.append((child, set()))
                continue
            name, _ = stack.pop()
            if not stack:
                break
            try:
                pfd = os.open("..", flags, dir_fd=fd)
            except OSError:
                break
            os.close(fd)
            fd = pfd
            try:
                os.rmdir(name, dir_fd=fd)
            except OSError:
                stack[-1][1].add(name)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(top)


def _extract_into(path: Path, fmt: str, root: Path, skip: set[str],
                  links: dict[str, str]) -> tuple[int, int, bool]:
    expected: dict[str, Any] | None = None
    mismatches: list[str] = []
    files = total = 0
    dirfd_root = str(root)
    try:
        for i, m in enumerate(_iter_members(path, fmt)):
            name, why = _safe_name(m.name)
            if why or (not name and m.kind != "dir"):  # validated before; the archive changed since
                raise UsageError(f"refusing to extract {path}: member {_show(m.name)}: {why or 'empty name'}")
            if not name or name in skip:
                continue
            target = os.path.join(dirfd_root, *name.split("/"))
            parent = os.path.dirname(target)
            _make_dirs(dirfd_root, parent)
            if m.kind == "dir":
                if not os.path.lexists(target):
                    os.mkdir(target, 0o755)
            elif m.kind == "symlink":
                if links.get(name) != m.target:  # the archive was swapped after validation
                    raise UsageError(f"refusing to extract {path}: member {_show(m.name)} changed while extracting")
                os.symlink(m.target, target)
            elif m.kind == "hardlink":
                tname, _ = _safe_name(m.target)
                os.link(os.path.join(dirfd_root, *tname.split("/")), target, follow_symlinks=False)
            elif m.kind == "file":
                size, digest = _write_member(m, target)
                if i == 0 and m.name == MANIFEST_NAME:
                    expected = _read_extracted_manifest(target, path)
                files += 1
                total += size
                if expected is not None and i != 0:
                    want = expected.get(m.name)
                    if want is None or want[0] != "file" or want[1] != size or want[2] != bytes.fromhex(digest):
                        mismatches.append(m.name)
            else:  # validated away in the first pass; never reached
                raise UsageError(f"member {_show(m.name)} cannot be extracted")
    except _Corrupt as exc:
        raise Failure(f"{path} is damaged at member {_show(exc.member)}: {exc.detail}; nothing was written") from None
    if mismatches:
        more = len(mismatches) - 1
        raise Failure(f"{path}: {_show(mismatches[0])} does not match {MANIFEST_NAME}"
                      + (f" (and {more} more)" if more else "") + "; nothing was written",
                      hint=f"`hpcexp archive --verify {path}` lists every difference")
    return files, total, expected is not None


def _read_extracted_manifest(target: str, archive: Path) -> dict[str, Any] | None:
    """The file entries of an extracted MANIFEST.json, or None if it is not an hpcexp one."""
    def opener() -> IO[bytes]:
        return open(target, "rb")

    member = _Member(MANIFEST_NAME, "file", open=opener)
    try:
        return _load_manifest(member, archive)[1]
    except Failure:
        return None


def _make_dirs(root: str, parent: str) -> None:
    """mkdir -p below ``root``, refusing to pass through anything but real folders."""
    rel = os.path.relpath(parent, root)
    if rel == ".":
        return
    cur = root
    for part in rel.split(os.sep):
        cur = os.path.join(cur, part)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur, 0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"refusing to write below {cur}: not a folder (symlink or file)")


def _write_member(m: _Member, target: str) -> tuple[int, str]:
    assert m.open is not None
    mode = (m.mode & 0o755) | 0o600
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    h = hashlib.sha256()
    size = 0
    try:
        with m.open() as src, open(fd, "wb", closefd=False) as dst:
            while True:
                data = src.read(CHUNK)
                if not data:
                    break
                h.update(data)
                dst.write(data)
                size += len(data)
        os.fchmod(fd, mode)
    except _READ_ERRORS as exc:
        raise _Corrupt(m.name, f"{type(exc).__name__}: {exc}") from None
    finally:
        os.close(fd)
    return size, h.hexdigest()


def human_summary(result: ArchiveResult) -> str:
    """One line for people: where, what, how big."""
    from_size = _human(result.bytes)
    return (f"{result.path} ({result.format}, {len(result.runs)} run{'s' if len(result.runs) != 1 else ''}, "
            f"{result.files} files, {from_size} archived into {_human(result.archive_bytes)})")


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"

