"""The image store: the images folder, each image's sidecar, listing and cleaning.

An image lives at ``images/NAME-ARCH-HASH.sif`` beside its sidecar ``NAME-ARCH-HASH.json``
(provenance, the SIF's own sha256 and stat, the input hash it was built for). A SIF
counts as built only when its sidecar matches it (:func:`valid_sif`); anything else in
the folder is stale, corrupt or a temporary file whose owner may be gone.

Split from the builder (which writes into the store) and from :mod:`hpcexp.build.image`
(which knows how to compute today's identity): listing and cleaning take the current
input hashes as an argument, so the store never converts a Dockerfile itself, and bases
can check and fill the store without importing the image pipeline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from hpcexp.core.config import Project
from hpcexp.core.layout import Layout
from hpcexp.errors import HpcexpError
from hpcexp.infra import atomic, hashing
from hpcexp.infra import host as hostinfo

log = logging.getLogger(__name__)

SIDECAR_SCHEMA = 1

Current = Mapping[tuple[str, str], Optional[str]]
"""(experiment, arch) -> the input hash of today's inputs (None when it cannot be computed)."""


@dataclass(frozen=True)
class ImageEntry:
    """One image in the images folder, as ``hpcexp images`` shows it."""

    experiment: str
    arch: str
    path: Path
    size: int
    age_seconds: float | None
    state: str                          # current | stale | corrupt
    input_hash: str | None
    built_at: str | None
    used_by: tuple[str, ...] = ()       # run ids whose record points at this image


@dataclass
class CleanReport:
    removed: list[tuple[str, str]] = field(default_factory=list)   # (path, why)
    kept: list[tuple[str, str]] = field(default_factory=list)      # (path, why kept)
    freed_bytes: int = 0


def read_sidecar(image: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(image.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def publish(tmp: Path, final: Path, sidecar: Mapping[str, Any]) -> None:
    """Make the finished SIF ``tmp`` visible as ``final``, its sidecar first.

    The order is the promise readers rely on: the sidecar (temp then rename) lands before
    the SIF's rename, so a SIF under its final name always has its sidecar, and
    :func:`valid_sif` checks the SIF's stat against it (a sidecar left from an older SIF
    does not vouch for a new one). The folder is fsynced so both names survive a crash.
    A full disk is a :class:`~hpcexp.errors.StorageError` naming ``final``.
    """
    try:
        atomic.write_json(final.with_suffix(".json"), dict(sidecar))
        os.replace(tmp, final)
        atomic.fsync_dir(final.parent)
    except OSError as exc:
        raise atomic.storage_error(exc, final) from exc


def valid_sif(image: Path, sidecar: dict[str, Any] | None = None) -> bool:
    """The image is at its final name, its sidecar exists and its size/sha256 match.

    Cheap when untouched: the SIF's (size, mtime_ns, inode) recorded in the sidecar are
    compared first; the content is re-hashed only when they differ (a copied folder).
    """
    if sidecar is None:
        sidecar = read_sidecar(image)
    if sidecar is None:
        return False
    try:
        st = os.stat(image)
    except OSError:
        return False
    if st.st_size != sidecar.get("size"):
        return False
    if sidecar.get("sif_stat") == [st.st_size, st.st_mtime_ns, st.st_ino]:
        return True
    if hashing.sha256_file(image) != sidecar.get("sha256"):
        return False
    # Same content under a new inode/mtime (a copied folder): remember it, so the next
    # check is a stat again. Best effort: the folder may be read-only for us.
    updated = dict(sidecar, sif_stat=[st.st_size, st.st_mtime_ns, st.st_ino])
    with contextlib.suppress(HpcexpError, OSError):
        atomic.write_json(image.with_suffix(".json"), updated)
    return True


# The builder makes a private scratch folder per build (hpcexp.build.builder); its name is
# defined here, beside the code that finds the ones whose owner is gone.
SCRATCH_PREFIX = "hpcexp-build-"


def scratch_dirs() -> list[tuple[Path, str, int]]:
    """Build scratch folders of this user in the temp dir: (path, host, pid of the owner)."""
    import tempfile

    base = Path(os.environ.get("TMPDIR") or tempfile.gettempdir())
    out: list[tuple[Path, str, int]] = []
    try:
        children = list(base.iterdir())
    except OSError:
        return out
    for p in children:
        if not p.name.startswith(SCRATCH_PREFIX):
            continue
        m = re.match(r"^(?P<host>.+)-(?P<pid>\d+)-[^-]+$", p.name[len(SCRATCH_PREFIX):])
        try:
            mine = p.is_dir() and not p.is_symlink() and p.stat().st_uid == os.getuid()
        except OSError:
            mine = False
        if m and mine:
            out.append((p, m.group("host"), int(m.group("pid"))))
    return out


_NAME_RE = re.compile(r"^(?P<name>.+)-(?P<arch>amd64|arm64)-(?P<hash>[0-9a-f]{16})\.sif$")


def _runs_by_image(project: Project) -> dict[str, list[str]]:
    from hpcexp.core.runs import iter_runs

    users: dict[str, list[str]] = {}
    try:
        for _, rec in iter_runs(Layout(project)):
            if rec.image:
                users.setdefault(os.path.realpath(rec.image), []).append(rec.run_id)
    except HpcexpError as exc:
        log.info("could not read run records: %s", exc)
    return users


def list_images(project: Project, current: Current) -> list[ImageEntry]:
    """Every image in the images folder with its state (current for today's inputs, or stale).

    ``current`` holds today's input hashes (:func:`hpcexp.build.image.list_images` computes them).
    """
    folder = project.images_dir
    if not folder.is_dir():
        return []
    users = _runs_by_image(project)
    now = time.time()
    out = []
    for sif in sorted(folder.glob("*.sif")):
        m = _NAME_RE.match(sif.name)
        if not m:
            continue
        side = read_sidecar(sif)
        try:
            st = sif.stat()
        except OSError:
            continue
        name, arch = m.group("name"), m.group("arch")
        full = side.get("input_hash") if side else None
        if side is None or not valid_sif(sif, side):
            state = "corrupt"
        elif full is not None and current.get((name, arch)) == full:
            state = "current"
        else:
            state = "stale"
        from hpcexp.core.runs import parse_time
        built = parse_time(side.get("built_at")) if side else None
        out.append(ImageEntry(experiment=name, arch=arch, path=sif, size=st.st_size,
                              age_seconds=now - (built or st.st_mtime), state=state, input_hash=full,
                              built_at=side.get("built_at") if side else None,
                              used_by=tuple(users.get(os.path.realpath(sif), ()))))
    return out


def _host_arch() -> str:
    from hpcexp.core.config import host_arch
    return host_arch()


def _tmp_owner_gone(name: str) -> tuple[bool, str]:
    owner = atomic.parse_tmp_owner(name)
    if owner is None:
        return False, "owner unknown"
    host, pid = owner
    me = hostinfo.short_hostname()
    if host != me:
        return False, f"owner on another host ({host} pid {pid})"
    if hostinfo.pid_alive(pid):
        return False, f"owner pid {pid} is running"
    return True, f"owner pid {pid} on {host} is gone"


def clean(project: Project, current: Current, *, dry_run: bool = False, force: bool = False) -> CleanReport:
    """Remove stale or corrupt images (never one a run record points to, unless ``force``),
    orphaned temporary files whose owner is gone, and locks of dead owners. ``current`` is
    as for :func:`list_images`."""
    # In-function: reading sidecars (a cached run) needs none of these.
    import shutil

    from hpcexp.infra.lock import Lock

    report = CleanReport()
    folder = project.images_dir
    if not folder.is_dir():
        return report
    layout = Layout(project)

    def remove(path: Path, why: str) -> None:
        try:
            size = path.stat().st_size if path.is_file() else 0
        except OSError:
            size = 0
        if not dry_run:
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                return
            except OSError as exc:
                report.kept.append((str(path), f"cannot remove: {exc.strerror}"))
                return
        report.removed.append((str(path), why))
        report.freed_bytes += size

    for entry in list_images(project, current):
        if entry.state == "current":
            continue
        if entry.used_by and not force:
            report.kept.append((str(entry.path), f"{entry.state}, but used by run {entry.used_by[-1]}"
                                + (f" and {len(entry.used_by) - 1} more" if len(entry.used_by) > 1 else "")
                                + " (use --force)"))
            continue
        lock = Lock(layout.build_lock(entry.path))
        if lock.path.exists():
            report.kept.append((str(entry.path), "being built (locked)"))
            continue
        remove(entry.path, entry.state)
        for extra in (entry.path.with_suffix(".json"), layout.build_log(entry.path), layout.image_inputs(entry.path)):
            if extra.exists():
                remove(extra, f"belongs to {entry.state} image")
    base_dir = project.cache_dir / "bases" / _host_arch()  # where bases.base_sif_path puts this machine's bases
    inputs_dir = layout.image_inputs_dir()
    if inputs_dir.is_dir():
        # input records of images that are gone (removed by hand): nothing to check them against
        for p in sorted(inputs_dir.glob("*.json")):
            if not p.name.startswith(atomic.TMP_PREFIX) and not (folder / (p.stem + ".sif")).exists():
                remove(p, "input record of an image that is gone")
    for d in (folder, folder / ".locks", folder / ".logs", inputs_dir, base_dir, base_dir / ".locks",
              project.recipes_dir):
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.name.startswith(atomic.TMP_PREFIX):
                gone, why = _tmp_owner_gone(p.name)
                (remove(p, f"orphaned temporary file: {why}") if gone
                 else report.kept.append((str(p), f"temporary file in use: {why}")))
            elif d.name == ".locks" and p.suffix == ".lock":
                from hpcexp.infra.lock import read_owner
                owner = read_owner(p)
                if owner is not None and owner.is_dead():
                    remove(p, f"lock of {owner.describe()}, process gone")
    for p, host, pid in scratch_dirs():
        if host == hostinfo.short_hostname() and not hostinfo.pid_alive(pid):
            remove(p, f"build scratch of pid {pid}, process gone")
    return report
