"""Use cases ``check`` (fsck of the project's runs, temporary files and locks) and ``unlock``.

``check`` reports; ``check --repair`` also fixes what is safe and marks the rest (see
:mod:`hpcexp.core.fsck` for the file-level rules): orphaned temporary files removed,
dead owners' locks broken, damaged records kept aside and marked, and every run whose
state disagrees with the scheduler or with the job's own markers reconciled, which also
marks a run whose job Slurm has forgotten ``lost`` with the reason. Nothing else changes.

``unlock`` breaks locks: those whose owner is provably dead (same host and boot, pid
gone), or one named explicitly with ``force``; it always says whose lock it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcexp.core.config import Project
from hpcexp.core.fsck import Finding
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.core.runs import RunRecord
from hpcexp.errors import LockBusy, NotFound, UsageError

Item = tuple[RunPaths, RunRecord]


@dataclass(frozen=True)
class CheckRequest:
    repair: bool = False


@dataclass
class CheckResult:
    findings: list[Finding] = field(default_factory=list)
    runs: int = 0                      # run records looked at

    @property
    def problems(self) -> list[Finding]:
        """What is still wrong (found and not repaired or marked)."""
        return [f for f in self.findings if f.problem]


def check(project: Project, req: CheckRequest) -> CheckResult:
    """Check (and with ``repair`` fix) the project's records, temporary files, locks and states."""
    from hpcexp.core import fsck

    layout = Layout(project)
    out = CheckResult()
    out.findings += fsck.check_temps(layout, repair=req.repair)
    out.findings += fsck.check_locks(layout, repair=req.repair)
    damaged, sound = fsck.check_records(layout, repair=req.repair)
    out.findings += damaged
    out.runs = len(sound) + len(damaged)
    out.findings += _check_states(layout, sound, repair=req.repair)
    return out


def _check_states(layout: Layout, items: list[Item], *, repair: bool) -> list[Finding]:
    """Runs whose recorded state disagrees with the scheduler and the job's markers."""
    from hpcexp.execute import base

    active = [(p, r) for p, r in items if not r.terminal]
    found = _terminal_disagreements([(p, r) for p, r in items if r.terminal])
    if not active:
        return found
    if repair:
        after = base.reconcile(layout, active)
    else:
        after = _dry_reconcile(layout, active)
    for (paths, old), (_, new) in zip(active, after):
        if new.state == old.state:
            if (new.reason or "").startswith("scheduler unreachable"):
                found.append(Finding("state", str(paths.record), f"recorded {old.state}; cannot compare with "
                                     f"Slurm: {new.reason}", "kept"))
            continue
        detail = f"recorded {old.state}, but {_who(old)} says {new.state}" + (f": {new.reason}" if new.reason else "")
        action = "found"
        if repair:
            action = "marked" if new.state in ("lost", "unknown") else "reconciled"
        found.append(Finding("state", str(paths.record), detail, action))
    return found


def _who(rec: RunRecord) -> str:
    return "Slurm with the job's markers" if rec.executor == "slurm" else "its supervisor's liveness"


def _dry_reconcile(layout: Layout, items: list[Item]) -> list[Item]:
    """What reconcile would decide, without writing a record or signalling anything."""
    from hpcexp.infra import host as hostinfo

    out: dict[Path, Item] = {p.dir: (p, r) for p, r in items}
    slurm_items = [(p, r) for p, r in items if r.executor == "slurm"]
    if slurm_items:
        from hpcexp.execute.slurm.decide import decide
        from hpcexp.execute.slurm.reconcile import gather, read_markers

        ev = gather(layout, [r for _, r in slurm_items], {})
        for paths, rec in slurm_items:
            out[paths.dir] = (paths, decide(rec, read_markers(paths), ev))
    for paths, rec in items:
        if rec.executor != "local":
            continue
        ids = rec.executor_ids
        if ids.get("host", rec.host) != hostinfo.hostname():
            continue
        owner = ids.get("supervisor_pid") or ids.get("launcher_pid")
        start = ids.get("supervisor_start") if ids.get("supervisor_pid") else ids.get("launcher_start")
        if owner and not hostinfo.pid_alive(owner, start):
            new = rec.copy()
            new.state, new.reason = "lost", f"its supervisor (pid {owner}) is gone"
            out[paths.dir] = (paths, new)
    return [out[p.dir] for p, _ in items]


def _terminal_disagreements(items: list[Item]) -> list[Finding]:
    """A Slurm run recorded ``succeeded`` must have its attempt's exit marker saying 0."""
    from hpcexp.execute.slurm.reconcile import read_markers

    found = []
    for paths, rec in items:
        if rec.executor != "slurm" or rec.state != "succeeded":
            continue
        exited = read_markers(paths).get(rec.attempt, {}).get("exit")
        if not exited or exited.get("exit_code") != 0:
            what = "no exit marker" if not exited else f"exit code {exited.get('exit_code')}"
            found.append(Finding("state", str(paths.record),
                                 f"recorded succeeded, but attempt {rec.attempt}'s marker says {what}"))
    return found


# --------------------------------------------------------------------------------------
# unlock
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UnlockRequest:
    lock: Path | None = None          # one lock file; None: every lock of a dead owner
    force: bool = False               # break the named lock even if its owner may be alive


@dataclass
class UnlockResult:
    broken: list[tuple[str, str]] = field(default_factory=list)     # (path, whose)
    kept: list[tuple[str, str]] = field(default_factory=list)       # (path, why)


def unlock(project: Project, req: UnlockRequest) -> UnlockResult:
    """Break dead owners' locks, or the one named (``force``: whoever holds it)."""
    from hpcexp.core import fsck
    from hpcexp.infra import lock as locks

    layout = Layout(project)
    out = UnlockResult()
    if req.lock is None:
        if req.force:
            raise UsageError("unlock --force needs the lock to break: name its file",
                             hint="`hpcexp unlock` alone breaks only locks whose owner is provably dead")
        for path in fsck.lock_files(layout):
            _unlock_one(path, False, out, locks)
        return out
    path = _lock_path(layout, req.lock)
    _unlock_one(path, req.force, out, locks)
    if out.kept:
        raise LockBusy(f"lock {path} is held by {out.kept[0][1]}; not broken",
                       hint=f"if that process is gone for good: hpcexp unlock --force {path}")
    return out


def _unlock_one(path: Path, force: bool, out: UnlockResult, locks: Any) -> None:
    owner = locks.read_owner(path)
    whose = owner.describe() + (f" ({owner.purpose})" if owner.purpose else "") if owner else \
        "an unreadable owner record"
    if owner is not None and not force and not owner.is_dead():
        out.kept.append((str(path), whose + ("" if owner.host == _here() else ", on another host")
                         + ", which may be alive"))
        return
    if owner is None and not force:
        out.kept.append((str(path), whose))
        return
    broken = locks.break_lock(path, force=force)
    if broken is None:
        out.kept.append((str(path), whose + " (it changed while breaking it)"))
    else:
        out.broken.append((str(path), whose + ("" if owner is None or owner.is_dead() else
                                               ", which may still be alive (--force)")))


def _here() -> str:
    from hpcexp.infra import host as hostinfo

    return hostinfo.hostname()


def _lock_path(layout: Layout, given: Path) -> Path:
    """The named lock file: a ``.lock`` file of hpcexp's (relative names from the project root)."""
    from hpcexp.core import fsck

    path = given if given.is_absolute() else Path(os.path.abspath(given))
    if not os.path.lexists(path) and not given.is_absolute():
        path = layout.project.root / given
    if not os.path.lexists(path):
        known = fsck.lock_files(layout)
        hint = ("locks here: " + ", ".join(str(p) for p in known[:5])) if known else "this project holds no lock"
        raise NotFound(f"no lock file {given}", hint=hint)
    if path.suffix != ".lock" or not path.is_file() or path.is_symlink():
        raise UsageError(f"{given} is not a lock file (hpcexp's locks are regular files named *.lock)")
    return path
