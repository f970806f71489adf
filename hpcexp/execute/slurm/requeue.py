"""The requeue policy applied by hpcexp on reconcile (``requeue: {on, max_attempts}``).

The job script requeues its own job after a checkpoint (see :mod:`.checkpoint`); every
other ending the policy lists (a time limit the payload did not checkpoint for, a
preemption, a node failure) is requeued here, when ``status`` (or ``submit --wait``)
first sees it: ``scontrol requeue JOB`` puts an ended job that slurmctld still knows back
in the queue under the same id, and the next attempt continues the same run record and
folder. A run that succeeded, failed on its own (the payload's exit) or was cancelled is
never requeued. When the budget is spent, or Slurm has forgotten the job, the ending
stays and the reason says so.
"""

from __future__ import annotations

from typing import Any, Sequence

from hpcexp.core import runs
from hpcexp.core.layout import RunPaths
from hpcexp.errors import EnvironmentProblem
from hpcexp.execute.slurm.commands import run, scontrol_requeue_argv


def ending(rec: runs.RunRecord) -> str | None:
    """The policy's name for how this run ended (timeout, preempted, node_fail), or None."""
    slurm_state = str(rec.executor_ids.get("slurm_state") or "")
    if slurm_state.startswith("PREEMPTED"):
        return "preempted"
    if rec.state in ("timeout", "node_fail"):
        return rec.state
    return None


def policy(rec: runs.RunRecord) -> tuple[tuple[str, ...], int] | None:
    """(endings, max attempts) of the run's requeue policy, or None."""
    rq: Any = rec.extra.get("requeue")
    if not isinstance(rq, dict):
        return None
    try:
        return tuple(str(e) for e in rq.get("on") or ()), int(rq.get("max_attempts") or 1)
    except (TypeError, ValueError):
        return None


def apply(items: Sequence[tuple[RunPaths, runs.RunRecord]], old: dict[Any, runs.RunRecord]) -> None:
    """Requeue (in place) each run that has just ended in a way its policy lists while its
    budget lasts; otherwise note in the reason that the budget is spent. ``old`` maps a run
    folder to its record before this reconcile (only new endings are acted on)."""
    for paths, rec in items:
        before = old.get(paths.dir)
        pol = policy(rec)
        why = ending(rec)
        if pol is None or why is None or why not in pol[0] or not rec.terminal:
            continue
        if before is not None and before.terminal:
            continue          # decided earlier: acted on then
        job = rec.executor_ids.get("job_id")
        if rec.attempt >= pol[1]:
            rec.reason = (rec.reason or why) + f"; requeue budget spent (attempt {rec.attempt} of " \
                                               f"max_attempts={pol[1]})"
            continue
        if not job:
            continue
        try:
            res = run(scontrol_requeue_argv(str(job)))
            ok, err = res.ok, res.last_line()
        except EnvironmentProblem as exc:
            ok, err = False, exc.message
        if not ok:
            rec.reason = (rec.reason or why) + f"; not requeued: scontrol requeue {job} failed ({err})"
            continue
        after = dict(rec.executor_ids.get("requeued_after") or {})
        after[str(rec.attempt)] = why
        rec.executor_ids["requeued_after"] = after
        rec.executor_ids["slurm_state"] = "REQUEUED"
        rec.reason = (f"hpcexp requeued job {job} after {why} (attempt {rec.attempt} of max_attempts={pol[1]}); "
                      f"attempt {rec.attempt + 1} waits")
        rec.state = "pending"
        rec.ended_at = None
        rec.exit_code = rec.signal = None       # the attempt's own exit stays in its marker


def attempt_logs(paths: RunPaths, rec: runs.RunRecord) -> None:
    """Name each closed attempt's own log files in its ``attempts`` entry."""
    for entry in rec.attempts:
        a = entry.get("attempt")
        if isinstance(a, int) and "stdout" not in entry:
            entry["stdout"] = paths.attempt_stdout(a).name
            entry["stderr"] = paths.attempt_stderr(a).name
