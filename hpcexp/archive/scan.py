"""Pass 1 of ``create``: which runs, what of each is archived, and the walk that hashes it.

The scanner walks run folders without following links, skips what must never be
opened (FIFOs, sockets, devices), hashes every regular file and spools one JSON line per
member to an unlinked temporary file, so memory stays bounded whatever the number of
files. Everything that decides what may enter an archive lives here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from hpcexp.archive.base import CHUNK, Warn, is_inside, show
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.core.runs import RunRecord, iter_runs, resolve
from hpcexp.errors import HpcexpError, NotFound, UsageError
from hpcexp.infra import atomic


@dataclass
class ScannedRun:
    """One run to archive: where it is, its record, the project files added and its manifest entry."""

    paths: RunPaths
    record: RunRecord
    prefix: str                               # "<experiment>/<run_id>"
    extras: list[tuple[str, Path]] = field(default_factory=list)   # (name in recipe/, source)
    info: dict[str, Any] = field(default_factory=dict)


class Scanner:
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
        text = f"{show(arcname)}: {message}"
        self.warnings.append(text)
        if skipped:
            self.skipped.append({"path": arcname, "reason": message})
        self.warn_cb(text)

    def unreadable(self, arcname: str, exc: OSError) -> None:
        message = f"cannot read {show(arcname)}: {exc.strerror or exc}"
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
            if not is_inside(real, run_root):
                note = f"symlink to {show(target)} outside the run; stored as a link, not followed"
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                note = f"symlink loop ({show(target)}); stored as a link, not followed"
            else:
                note = f"dangling symlink to {show(target)}; stored as a link"
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
        if self.project_root is not None and not is_inside(real, self.project_root):
            self.warn(arcname, f"{show(src)} leads outside the project (to {show(real)}); not archived, "
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


def collect_runs(layout: Layout, specs: list[str], all_runs: bool) -> list[tuple[RunPaths, RunRecord]]:
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


def prepare_run(layout: Layout, paths: RunPaths, rec: RunRecord, scanner: Scanner) -> ScannedRun:
    from hpcexp.core.config import host_arch

    # The folder name is the truth on disk; a record naming another place is reported.
    exp_name, run_id = paths.dir.parent.name, paths.dir.name
    prefix = f"{exp_name}/{run_id}"
    run = ScannedRun(paths=paths, record=rec, prefix=prefix)
    if rec.from_table:
        # a sweep task whose record is still its sweep's table (no run.json, maybe no folder
        # yet): the archive holds a run.json like every other run's, so write it out first
        from hpcexp.core.runs import replace_record_nosync

        try:
            replace_record_nosync(paths, rec)
        except HpcexpError as exc:
            scanner.warn(prefix, f"its record is only in its sweep's table and cannot be written out "
                         f"({exc}); archived without run.json", skipped=False)
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
            if not is_inside(real, os.path.realpath(layout.project.root)):
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
