"""Reconcile and stop Slurm runs: gather the scheduler's evidence, decide, write back.

Owns the I/O around :func:`.decide.decide`: one ``squeue`` call for all runs, then (only
for runs that left the queue) at most one ``sacct`` call (skipped for an hour once it
said accounting is disabled) and one ``scontrol show job`` call; re-attaching records
left ``submitting`` by a crash between ``sbatch`` and recording the job id; reading the
job's markers; writing back only the records that changed; and ``stop`` (one ``scancel``
call, then reconcile). Kept apart from submission: ``hpcexp status`` needs this module,
not the job-script renderer.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from hpcexp.core import runs, sweeptable
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.errors import EnvironmentProblem, HpcexpError, SchedulerError
from hpcexp.execute.slurm import requeue
from hpcexp.execute.slurm.commands import (
    id_key,
    run,
    sacct_argv,
    scancel_argv,
    scancel_name_argv,
    scontrol_jobs_argv,
    squeue_argv,
)
from hpcexp.execute.slurm.decide import Evidence, decide
from hpcexp.execute.slurm.facts import FACTS_TTL, read_cache, write_cache
from hpcexp.execute.slurm.parse import (
    JobInfo,
    accounting_disabled,
    marker_name,
    parse_sacct,
    parse_scontrol_jobs,
    parse_squeue,
)
from hpcexp.infra import host as hostinfo
from hpcexp.infra import process, safeio

log = logging.getLogger(__name__)


def _known_user(name: str) -> bool:
    """squeue -u fails outright on a user unknown here (records copied from another cluster)."""
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except (KeyError, TypeError):
        return False


def gather(layout: Layout, records: Sequence[runs.RunRecord], markers: Mapping[str, Mapping[int, Any]]
           ) -> Evidence:
    """One squeue call, then (only for runs that left the queue without a final answer)
    one sacct call unless accounting is known to be off, and one scontrol call."""
    ev = Evidence()
    users = sorted({u for u in {r.user for r in records} if _known_user(u)} | {hostinfo.user()})  # once a user
    try:
        res = run(squeue_argv(users))
        if res.ok:
            ev.live = parse_squeue(res.stdout)
            ev.checked.append("squeue")
        else:
            ev.squeue_ok, ev.squeue_error = False, res.last_line()
    except EnvironmentProblem as exc:
        ev.squeue_ok, ev.squeue_error = False, exc.message
    if not ev.squeue_ok:
        ev.checked.append(f"squeue (failed: {ev.squeue_error})")
        return ev
    gone = [r for r in records if r.executor_ids.get("job_id") and r.executor_ids["job_id"] not in ev.live]
    orphans = [r for r in records if not r.executor_ids.get("job_id") and r.state == "submitting"]
    if not gone and not orphans:
        return ev
    cache = read_cache(layout)
    acct_off = cache.get("accounting") is False and time.time() - float(cache.get("accounting_checked", 0)) < FACTS_TTL
    if gone and not acct_off:
        try:
            res = run(sacct_argv({r.executor_ids["job_id"].split("_")[0] for r in gone}))
            if res.ok:
                ev.final.update(parse_sacct(res.stdout))
                ev.checked.append("sacct")
                cache.update(accounting=True, accounting_checked=time.time())
            elif accounting_disabled(res):
                ev.checked.append("sacct (accounting disabled)")
                cache.update(accounting=False, accounting_checked=time.time())
            else:
                ev.checked.append(f"sacct (failed: {res.last_line()})")
            write_cache(layout, cache)
        except EnvironmentProblem as exc:
            ev.checked.append(f"sacct (unavailable: {exc.message})")
    elif gone:
        ev.checked.append("sacct (accounting disabled)")
    need_scontrol = orphans or any(r.executor_ids["job_id"] not in ev.final for r in gone)
    if need_scontrol:
        try:
            res = run(scontrol_jobs_argv())
            if res.ok:
                ev.scontrol = parse_scontrol_jobs(res.stdout)
                for jid, info in ev.scontrol.items():
                    ev.final.setdefault(jid, info)
                age = cache.get("min_job_age")
                ev.checked.append("scontrol show job" + (f" (forgets jobs {age} after they end)" if age else
                                                         " (no record: finished jobs are forgotten after MinJobAge)"))
            else:
                ev.checked.append(f"scontrol (failed: {res.last_line()})")
        except EnvironmentProblem as exc:
            ev.checked.append(f"scontrol (unavailable: {exc.message})")
    return ev


def array_task_ids(layout: Layout, sweep_id: str, array_job: str, pos: int, size: int) -> dict[str, Any]:
    """The executor ids of task ``pos`` of array job ``array_job`` of a sweep."""
    folder = os.path.join(layout.project.runs_dir, ".sweeps", sweep_id)   # layout.sweep_dir, as a string: per task
    return {"job_id": f"{array_job}_{pos}", "array_job_id": array_job, "array_task_id": pos, "array_size": size,
            "slurm_output": f"{folder}/slurm-{array_job}_{pos}.out"}


def _attach_from_sweeps(layout: Layout, items: list[tuple[RunPaths, runs.RunRecord]]) -> set[Path]:
    """A sweep's task records are written once, before ``sbatch``, and stay ``submitting``
    on disk: their job id is the array job id the (fsynced) sweep record holds for their
    part, added here in memory. Returns the run folders so completed: their job id is
    durable there, so they are not rewritten for it (docs/records.md)."""
    done: set[Path] = set()
    parts: dict[str, dict[str, dict[str, Any]]] = {}
    for paths, rec in items:
        ids = rec.executor_ids
        if ids.get("job_id") or rec.state != "submitting" or not rec.sweep_id \
                or ids.get("array_task_id") is None:
            continue
        if rec.sweep_id not in parts:
            # the sweep record as sweep_runs just read it (cached while the file is unchanged)
            idx = sweeptable.index(layout.sweeps_dir(), rec.sweep_id)
            parts[rec.sweep_id] = {str(sub.get("job_name")): sub for sub in (idx.submissions if idx else [])
                                   if sub.get("array_job_id")}
        sub = parts[rec.sweep_id].get(str(ids.get("job_name")))
        if sub is None:
            continue
        try:
            ids.update(array_task_ids(layout, rec.sweep_id, str(sub["array_job_id"]), int(ids["array_task_id"]),
                                      int(ids.get("array_size") or 0)))
        except (TypeError, ValueError):
            continue
        if sub.get("submitted_at"):
            ids["submitted_at"] = sub["submitted_at"]
        done.add(paths.dir)
    return done


def _attach_orphans(items: list[tuple[RunPaths, runs.RunRecord]], ev: Evidence) -> None:
    """Records left in ``submitting`` with no job id anywhere (hpcexp died between sbatch
    and recording the id): find their job by the name hpcexp gave it and attach it."""
    by_name: dict[str, list[JobInfo]] = {}
    for info in list(ev.live.values()) + list(ev.scontrol.values()):
        by_name.setdefault(info.name, []).append(info)
    for _paths, rec in items:
        ids = rec.executor_ids
        if ids.get("job_id") or rec.state != "submitting":
            continue
        chunk_job = None
        for info in by_name.get(ids.get("job_name", ""), []):
            chunk_job = info.job_id.split("_")[0]
            break
        if chunk_job is None:
            continue
        if ids.get("array_task_id") is not None:
            ids["array_job_id"] = chunk_job
            ids["job_id"] = f"{chunk_job}_{ids['array_task_id']}"
        else:
            ids["job_id"] = chunk_job
        ids["attached_by"] = "reconcile (hpcexp stopped between sbatch and recording the job id)"


def reconcile(layout: Layout, items: Iterable[tuple[RunPaths, runs.RunRecord]]
              ) -> list[tuple[RunPaths, runs.RunRecord]]:
    """Bring Slurm runs up to date: one squeue call (plus at most one sacct and one
    scontrol call for runs that left the queue), the job's own markers, then write back
    only the records that changed."""
    items = list(items)
    todo = [(p, r) for p, r in items if not r.terminal]
    if not todo:
        return items
    from_sweep = _attach_from_sweeps(layout, todo)
    ev = gather(layout, [r for _, r in todo], {})
    _attach_orphans(todo, ev)
    # markers are read after squeue: a job gone from the queue has written its exit already
    changed: list[tuple[RunPaths, runs.RunRecord]] = []
    updated: dict[Path, runs.RunRecord] = {}
    with runs.bulk():
        decided = [(paths, decide(rec, read_markers(paths), ev)) for paths, rec in todo]
        requeue.apply(decided, {p.dir: r for p, r in todo})
        for (paths, new), (_, rec) in zip(decided, todo):
            requeue.attempt_logs(paths, new)
            # still queued, with its job id durable in the sweep record: the record on disk
            # plus the sweep record say all there is, so nothing is rewritten
            queued = paths.dir in from_sweep and new.state == "pending"
            if not queued and _worth_writing(rec, new):
                changed.append((paths, new))
            updated[paths.dir] = new
    write_many(changed)
    return [(p, updated.get(p.dir, r)) for p, r in items]


DURABLE_FIELDS = ("state", "attempt", "started_at", "ended_at", "exit_code", "signal", "launch_error")


def _worth_writing(old: runs.RunRecord, new: runs.RunRecord) -> bool:
    """Persist what a later reader needs (a new state, attempt, times, exit, job id); live
    details such as a pending reason are shown but not rewritten into 1,000 records on
    every status query."""
    if any(getattr(old, k) != getattr(new, k) for k in DURABLE_FIELDS) or len(old.attempts) != len(new.attempts):
        return True
    return old.executor_ids.get("job_id") != new.executor_ids.get("job_id")


def _write_one(item: tuple[RunPaths, runs.RunRecord]) -> None:
    try:
        runs.write_record(item[0], item[1])
    except HpcexpError as exc:  # somebody else's run: report it in the listing, do not fail
        log.warning("could not update %s: %s", item[0].record, exc)


def write_many(items: Sequence[tuple[RunPaths, runs.RunRecord]], *, strict: bool = False,
                durable: bool = True) -> None:
    """Write many records (batched: see :func:`hpcexp.core.runs.write_records`).

    ``strict=False`` (status of possibly other users' runs): a record we may not write is
    logged and skipped, never a reason to fail the listing.
    """
    if strict:
        runs.write_records(items, durable=durable)
        return
    try:
        runs.write_records(items)
    except HpcexpError:
        for it in items:
            _write_one(it)


def _check_scancel(res: process.Result) -> None:
    """A job that already ended is not a failure to cancel; anything else scancel says is."""
    if not res.ok and "already completing or completed" not in res.stderr and "Invalid job id" not in res.stderr:
        raise SchedulerError(f"scancel failed: {res.last_line()}", hint="check `squeue --me`")


def stop(layout: Layout, items: Sequence[tuple[RunPaths, runs.RunRecord]], *, grace: float | None = None,
         wait: bool = True) -> list[tuple[RunPaths, runs.RunRecord]]:
    """scancel the given runs in one call: a whole array job when every one of its tasks
    is named, single tasks otherwise. Returns the records reconciled afterwards.

    ``grace`` is accepted for symmetry with local runs; Slurm's own KillWait applies."""
    items = [(p, r) for p, r in items]
    todo = [(p, r) for p, r in reconcile(layout, items) if not r.terminal]
    if not todo:
        return reconcile(layout, items)
    by_array: dict[str, list[runs.RunRecord]] = {}
    singles: list[str] = []
    names: list[str] = []
    for _, rec in todo:
        ids = rec.executor_ids
        if ids.get("array_job_id") and ids.get("job_id"):
            by_array.setdefault(str(ids["array_job_id"]), []).append(rec)
        elif ids.get("job_id"):
            singles.append(str(ids["job_id"]))
        elif ids.get("job_name"):
            names.append(str(ids["job_name"]))
    targets = list(singles)
    for array_id, recs in by_array.items():
        size = int(recs[0].executor_ids.get("array_size") or 0)
        if size and len({r.executor_ids.get("array_task_id") for r in recs}) >= size:
            targets.append(array_id)
        else:
            targets += [str(r.executor_ids["job_id"]) for r in recs]
    if targets:
        _check_scancel(run(scancel_argv(sorted(set(targets), key=id_key))))
    for name in sorted(set(names)):
        _check_scancel(run(scancel_name_argv(name)))
    time.sleep(0.3)  # let slurmctld settle the cancelled state
    return reconcile(layout, items)


def read_markers(paths: RunPaths) -> dict[int, dict[str, dict[str, Any]]]:
    """{attempt: {"started": {...}, "exit": {...}}} from the run's events folder."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    try:
        names = os.listdir(paths.events)
    except OSError:
        return out
    for name in names:
        key = marker_name(name)
        if key is None:
            continue
        try:
            data = safeio.load_json_file(paths.events / name, what="event")
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except (OSError, ValueError) as exc:
            data = {"unreadable": str(exc)}
        out.setdefault(key[0], {})[key[1]] = data
    return out

