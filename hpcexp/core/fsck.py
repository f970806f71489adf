"""Checking the project's own files (``hpcexp check``): records, temporary files, locks.

What is checked here needs no scheduler: every run record parses and matches its folder;
no temporary file (``.hpcexp-tmp-<host>-<pid>-<rand>-<name>``, see :mod:`hpcexp.infra.atomic`)
is left without a live owner; no lock is held by a dead owner. Whether each run's state
agrees with the scheduler and with the job's own markers is the application's part
(:mod:`hpcexp.app.check`), because it needs the executors.

What ``--repair`` may do, and nothing else (invariant I6: user outputs are never touched;
``results/`` folders are not even walked):

- an orphaned temporary file (same host, its pid gone) is removed;
- a lock whose owner is provably dead (same host and boot, pid gone) is broken;
- a damaged run record is kept aside as ``run.json.damaged-<time>`` (never deleted) and a
  small record in state ``lost`` takes its place, saying why and where the original is.

A temporary file or lock of another host, or of a live process, is reported and kept.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from hpcexp.core import runs
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.infra import atomic
from hpcexp.infra import host as hostinfo
from hpcexp.infra import lock as locks

DAMAGED_SUFFIX = ".damaged-"


@dataclass
class Finding:
    """One thing ``check`` found: what, where, and what was done about it.

    action: ``found`` (a problem, not repaired), ``removed``, ``broken`` (a lock),
    ``marked`` (a record now says what is wrong), ``reconciled`` (a state brought up to
    date), ``kept`` (left alone on purpose: a live or foreign owner)."""

    kind: str
    path: str
    detail: str
    action: str = "found"

    @property
    def problem(self) -> bool:
        """Still wrong after this check (nothing was, or could be, done)."""
        return self.action == "found"

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "path": self.path, "detail": self.detail, "action": self.action}


def tmp_owner(name: str) -> tuple[str, bool | None]:
    """(who, alive) of a temporary file's owner: alive is None when it cannot be told here
    (another host, or a name that does not say)."""
    owner = atomic.parse_tmp_owner(name)
    if owner is None:
        return "an unknown owner", None
    host, pid = owner
    if host != hostinfo.short_hostname():
        return f"pid {pid} on host {host}", None
    return f"pid {pid} on {host}", hostinfo.pid_alive(pid)


def _walk(top: Path, *, skip_results: bool) -> Iterator[Path]:
    """Every file under ``top`` (no symlink followed; run folders' results/ not entered)."""
    if not top.is_dir():
        return
    for folder, dirs, files in os.walk(top, followlinks=False):
        here = Path(folder)
        if skip_results and os.path.lexists(here / "run.json"):
            dirs[:] = [d for d in dirs if d != "results"]   # the run's own outputs: never ours
        for name in files + [d for d in dirs if d.startswith(atomic.TMP_PREFIX)]:
            yield here / name


def roots(layout: Layout) -> list[Path]:
    """The folders hpcexp writes into: runs (and sweeps), images (locks, logs), recipes, bases."""
    proj = layout.project
    out = [proj.runs_dir, proj.images_dir, proj.recipes_dir, proj.cache_dir / "bases"]
    seen: list[Path] = []
    for p in out:
        if p not in seen and not any(p.is_relative_to(s) for s in seen):
            seen.append(p)
    return seen


def check_temps(layout: Layout, *, repair: bool) -> list[Finding]:
    """Temporary files of hpcexp: orphans (same host, owner gone) removed with ``repair``."""
    found: list[Finding] = []
    for top in roots(layout):
        for path in _walk(top, skip_results=True):
            if not path.name.startswith(atomic.TMP_PREFIX):
                continue
            who, alive = tmp_owner(path.name)
            if alive:
                continue                       # being written right now: not a finding
            if alive is None:
                found.append(Finding("temporary file", str(path), f"made by {who}; cannot tell from here "
                                     "whether it is still in use", "kept"))
                continue
            finding = Finding("orphaned temporary file", str(path), f"its owner ({who}) is gone")
            if repair:
                try:
                    if path.is_dir() and not path.is_symlink():
                        import shutil

                        shutil.rmtree(path)
                    else:
                        path.unlink()
                    finding.action = "removed"
                except FileNotFoundError:
                    finding.action = "removed"
                except OSError as exc:
                    finding.detail += f"; cannot remove it: {exc.strerror or exc}"
            found.append(finding)
    return found


def lock_files(layout: Layout) -> list[Path]:
    """Every lock file of the project (build, sign, pull, tracking, hpcexp.lock updates)."""
    out: list[Path] = []
    for top in roots(layout):
        for path in _walk(top, skip_results=True):
            if path.suffix == ".lock" and not path.name.startswith(atomic.TMP_PREFIX) and \
                    (path.parent.name == ".locks" or path.parent.name == ".tracking" or path.name.startswith(".")):
                out.append(path)
    return sorted(out)


def check_locks(layout: Layout, *, repair: bool) -> list[Finding]:
    """Locks whose owner is provably dead (broken with ``repair``); live ones are not findings."""
    found: list[Finding] = []
    for path in lock_files(layout):
        owner = locks.read_owner(path)
        if owner is None:
            found.append(Finding("lock", str(path), "its owner record is unreadable; `hpcexp unlock --force "
                                 f"{path}` breaks it if nothing holds it", "kept"))
            continue
        if not owner.is_dead():
            continue
        finding = Finding("stale lock", str(path), f"held by {owner.describe()}, which is gone")
        if repair and locks.break_lock(path, force=False) is not None:
            finding.action = "broken"
        found.append(finding)
    return found


def _salvage_executor(path: Path) -> str:
    """The executor a damaged record named, if its text still says (else ``local``)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16).decode("utf-8", "replace")
    except OSError:
        return "local"
    m = re.search(r'"executor"\s*:\s*"(local|slurm)"', head)
    return m.group(1) if m else "local"


def quarantine(paths: RunPaths, why: str) -> str:
    """Keep a damaged run.json aside (renamed, never deleted) and put a ``lost`` record in
    its place that says why and where the original is. Returns the kept file's name."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = paths.record.with_name(f"{paths.record.name}{DAMAGED_SUFFIX}{stamp}")
    n = 1
    while os.path.lexists(aside):
        n += 1
        aside = paths.record.with_name(f"{paths.record.name}{DAMAGED_SUFFIX}{stamp}.{n}")
    executor = _salvage_executor(paths.record)
    os.rename(paths.record, aside)
    rec = runs.RunRecord(experiment=paths.dir.parent.name, run_id=paths.dir.name, state="lost", executor=executor,
                         host="?", user=hostinfo.user(),
                         reason=f"the run record was damaged ({why}); kept as {aside.name}; marked by "
                                "`hpcexp check --repair`")
    rec.ended_at = runs.utcnow()
    rec.extra["damaged_record"] = aside.name
    runs.write_record(paths, rec)
    return aside.name


def check_records(layout: Layout, *, repair: bool) -> tuple[list[Finding], list[tuple[RunPaths, runs.RunRecord]]]:
    """Every run record parses and matches its folder. Returns the findings and the sound records."""
    found: list[Finding] = []
    sound: list[tuple[RunPaths, runs.RunRecord]] = []
    for paths, rec in runs.iter_runs(layout):
        if rec.error is None:
            sound.append((paths, rec))
            continue
        why = str(rec.error).split(": ", 1)[-1]
        finding = Finding("damaged record", str(paths.record), why)
        if repair and not paths.dir.is_symlink():
            try:
                kept = quarantine(paths, why)
                finding.action = "marked"
                finding.detail += f"; kept as {kept}, the run is now marked lost"
            except OSError as exc:
                finding.detail += f"; cannot set it aside: {exc.strerror or exc}"
        found.append(finding)
    return found, sound
