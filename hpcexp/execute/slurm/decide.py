"""Deciding a Slurm run's state: a record + the job's markers + the scheduler's evidence
-> the record brought up to date. Pure: no command and no file; the clock only for what
the evidence cannot give (an end time nobody recorded, the age of a ``submitting`` record).

This is the heart of the Slurm executor, kept apart so that it can be read and tested as
a decision table (``tests/test_slurm.py``) without a cluster. The rules, in order of trust:

1. The job's own markers (``events/attempt-N.started`` / ``.exit``, written with plain
   shell by the job script, see :mod:`.sbatch`) say which attempt is current, when it
   started, where, and the payload's exit code. A requeued job (a newer marker, or
   Slurm's restart count) closes the earlier attempt in ``attempts``.
2. A job still in ``squeue`` is ``pending`` or ``running`` as the queue says, unless its
   exit marker already exists and the queue no longer says RUNNING (COMPLETING...): a
   requeued job runs again before it writes its new attempt's start marker.
3. The scheduler did not answer: the last known state is kept, with the reason.
4. For a job that left the queue: an exit marker saying 0 is ``succeeded`` (nothing else
   is); Slurm's terminal state says how a job was ended from outside (cancelled, time
   limit, memory, node failure) and wins over a non-zero marker; a non-zero marker
   alone is ``failed``; Slurm's FAILED without a marker is ``failed``; COMPLETED without
   a marker is ``unknown`` (never counted as success).
5. No marker and no scheduler record: ``lost``, with the sources that were checked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from hpcexp.core import runs
from hpcexp.execute.slurm.parse import JobInfo

SUBMIT_GRACE = 120.0          # a "submitting" record younger than this may still get its job id
PENDING_STATES = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD",
                            "SPECIAL_EXIT", "SUSPENDED", "STOPPED", "RESIZING"})
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING"})
# Reasons a job waits in the queue: stale once it has ended, so not repeated in a final reason.
QUEUE_REASONS = frozenset({"None", "JobHeldUser", "JobHeldAdmin", "Priority", "Resources", "Dependency",
                           "BeginTime", "JobArrayTaskLimit", "ReqNodeNotAvail", "QOSMaxJobsPerUserLimit"})
# Slurm's terminal states that say how a job was ended from outside (they win over a non-zero marker).
KILLED_STATES: dict[str, str] = {
    "CANCELLED": "cancelled",
    "TIMEOUT": "timeout",
    "DEADLINE": "timeout",
    "OUT_OF_MEMORY": "out_of_memory",
    "NODE_FAIL": "node_fail",
    "BOOT_FAIL": "node_fail",
    "PREEMPTED": "failed",
    "REVOKED": "cancelled",
}
# How each of those ends the reason a user reads.
KILLED_WHY: dict[str, str] = {
    "cancelled": "the job was cancelled", "timeout": "the job hit its time limit",
    "out_of_memory": "the job was killed for using too much memory", "node_fail": "its node failed",
    "failed": "the job was preempted",
}


@dataclass
class Evidence:
    """Everything one status query learned, shared by all runs it looks at (made by
    :func:`hpcexp.execute.slurm.reconcile.gather`; a test builds one by hand)."""

    live: dict[str, JobInfo] = field(default_factory=dict)    # squeue: jobs still in the queue
    squeue_ok: bool = True                                    # False: the scheduler did not answer
    squeue_error: str | None = None
    final: dict[str, JobInfo] = field(default_factory=dict)   # jobs that left it: sacct first, else scontrol
    checked: list[str] = field(default_factory=list)          # human summary of sources consulted
    scontrol: dict[str, JobInfo] = field(default_factory=dict)
    min_job_age: str | None = None


def _payload_failed(rec: runs.RunRecord, exit_info: Mapping[str, Any]) -> None:
    """Copy the payload's exit code (and the signal a SIGTERM'd payload died of) from its marker."""
    code = exit_info.get("exit_code")
    rec.exit_code = int(code) if isinstance(code, int) else None
    if exit_info.get("launch_error"):
        rec.launch_error = str(exit_info["launch_error"])
    if rec.exit_code is not None and rec.exit_code > 128 and exit_info.get("term_received"):
        rec.signal = rec.exit_code - 128


def decide(rec: runs.RunRecord, markers: Mapping[int, Mapping[str, Mapping[str, Any]]], ev: Evidence,
           now: float | None = None) -> runs.RunRecord:
    """The record brought up to date with the markers and the scheduler's evidence. Pure.

    ``markers`` is :func:`hpcexp.execute.slurm.reconcile.read_markers` of the run's folder
    ({attempt: {"started": {...}, "exit": {...}}}); ``now`` (seconds since the epoch) is
    the current time unless given. The given record is not changed; a copy is returned.

    Order of trust: the job's own exit marker for the payload's exit code; Slurm's
    terminal state for how the job was ended from outside (cancel, time limit, memory,
    node); no marker and no scheduler record -> ``lost`` with what was checked. The steps
    (module docstring): the current attempt, a record without a job id, the queue, the end.
    """
    rec = rec.copy()
    ids = rec.executor_ids
    job_id = ids.get("job_id")
    live = ev.live.get(job_id) if job_id else None
    final = ev.final.get(job_id) if job_id else None

    _advance_attempt(rec, markers, final)
    _annotate_attempts(rec, final)
    cur = markers.get(rec.attempt, {})
    started, exited = cur.get("started"), cur.get("exit")
    # a service the payload needed died while it ran (the job's services marker, docs/services.md)
    service_failure = (cur.get("services") or {}).get("failure")
    if service_failure:
        rec.extra["service_failure"] = str(service_failure)
    else:
        rec.extra.pop("service_failure", None)   # an earlier attempt's
    if started and not rec.started_at:
        rec.started_at = started.get("time")
        if started.get("host"):
            ids["node"] = started["host"]

    if job_id is None:
        return _without_job_id(rec, ev, now)
    if exited and exited.get("over_budget") is True:
        # Slurm requeued the job itself (preemption, node failure) once too often: the job
        # script did not start the payload; the run ends with the earlier attempt's cause
        budget = (rec.extra.get("requeue") or {}).get("max_attempts", "?")
        rec.state = "failed"
        rec.ended_at = rec.ended_at or exited.get("time") or runs.utcnow()
        rec.exit_code = None
        rec.reason = (f"Slurm requeued the job again after attempt {rec.attempt - 1} (a preemption or a node "
                      f"failure); the requeue budget is spent (max_attempts={budget}), so attempt "
                      f"{rec.attempt} did not start the payload")
        return rec
    if exited and exited.get("requeue") == "requested":
        # the attempt saved a checkpoint and requeued its job: not an ending, unless the job
        # is gone from the queue (then the requeue did not take effect)
        if live is not None or (final is not None and final.state in PENDING_STATES):
            ids["slurm_state"] = live.state if live is not None else final.state  # type: ignore[union-attr]
            rec.state = "pending"
            rec.reason = (f"attempt {rec.attempt} saved a checkpoint and requeued itself; attempt "
                          f"{rec.attempt + 1} waits (Slurm: {ids['slurm_state']})")
            return rec
        exited = dict(exited, requeue="lost")
    if _queued(rec, live, exited, ev):
        return rec
    return _ended(rec, str(job_id), live, final, started, exited, ev)


# Why a checkpointed attempt was not followed by another (the exit marker's "requeue").
CHECKPOINT_END_WHY = {
    "spent": "the requeue budget is spent",
    "off": "requeue.on does not list timeout",
    "failed": "scontrol requeue failed (see the Slurm output file)",
    "lost": "its requeue did not take effect (the job left the queue)",
}


def _checkpointed(rec: runs.RunRecord, exited: Mapping[str, Any], info: JobInfo | None) -> runs.RunRecord:
    """The payload saved a checkpoint on the warning signal and stopped, and no next attempt
    follows: the run ends ``timeout`` (its work was cut short by the limit), saying why."""
    rec.state = "timeout"
    _payload_failed(rec, exited)
    sig = (rec.extra.get("checkpoint") or {}).get("signal", "?")
    budget = (rec.extra.get("requeue") or {}).get("max_attempts")
    why = CHECKPOINT_END_WHY.get(str(exited.get("requeue")), "it was not requeued")
    if exited.get("requeue") == "spent" and budget:
        why = f"the requeue budget is spent (attempt {rec.attempt} of max_attempts={budget})"
    rec.reason = (f"attempt {rec.attempt} saved a checkpoint on SIG{sig} before the time limit and stopped; "
                  f"{why}" + (f" (Slurm: {info.state})" if info is not None else ""))
    return rec


def _advance_attempt(rec: runs.RunRecord, markers: Mapping[int, Mapping[str, Mapping[str, Any]]],
                     final: JobInfo | None) -> None:
    """Step 1: the newest marker, or Slurm's restart count, tells which attempt is current.
    A requeue closes each earlier attempt in ``attempts`` (with what its markers said) and
    clears the fields that belonged to it."""
    ids = rec.executor_ids
    job_id = ids.get("job_id")
    base = int(ids.get("base_attempt", rec.attempt) or 1)
    attempt = max([rec.attempt, *[a for a in markers if a >= base]])
    if final is not None and final.restarts is not None:
        attempt = max(attempt, base + final.restarts)
    if attempt > rec.attempt:
        done = {a.get("attempt") for a in rec.attempts}
        for a in range(rec.attempt, attempt):
            if a in done:
                continue
            m = markers.get(a, {})
            s, e = m.get("started", {}), m.get("exit", {})
            note = "requeued" if e or s else "requeued before it started"
            if e.get("requeue") == "requested":
                note = "saved a checkpoint and requeued itself"
            elif ids.get("requeued_after", {}).get(str(a)):
                note = f"requeued by hpcexp after {ids['requeued_after'][str(a)]}"
            entry = {"attempt": a, "job_id": job_id, "started_at": s.get("time"),
                     "ended_at": e.get("time"), "exit_code": e.get("exit_code"),
                     "host": s.get("host"), "note": note}
            if "checkpoint_signal" in e:
                entry["checkpointed"] = e["checkpoint_signal"] is True
            rec.attempts.append(entry)
        rec.attempt = attempt
        rec.started_at = rec.ended_at = None
        rec.exit_code = rec.signal = None
        rec.reason = None


def _annotate_attempts(rec: runs.RunRecord, final: JobInfo | None) -> None:
    """Say how Slurm ended each closed attempt of this job (``slurm_state``: PREEMPTED,
    NODE_FAIL...), once a source remembers it: only ``sacct -D`` does (one line per
    attempt), asked after the job left the queue, so attempts closed while it was still
    queued get it then. Nothing is guessed when no source says."""
    if final is None or not final.earlier:
        return
    ids = rec.executor_ids
    base = int(ids.get("base_attempt", 1) or 1)
    for att in rec.attempts:
        index = int(att.get("attempt") or 0) - base
        if att.get("job_id") == ids.get("job_id") and "slurm_state" not in att and 0 <= index < len(final.earlier):
            att["slurm_state"] = final.earlier[index]


def _without_job_id(rec: runs.RunRecord, ev: Evidence, now: float | None) -> runs.RunRecord:
    """Step 2: no job id (reconcile found no job by name or sweep record either): a
    ``submitting`` record may still get one for :data:`SUBMIT_GRACE` seconds, then is ``lost``."""
    if rec.state == "submitting":
        age = (now or time.time()) - (runs.parse_time(rec.created_at) or 0)
        if age > SUBMIT_GRACE:
            rec.state = "lost"
            name = rec.executor_ids.get("job_name", "?")
            rec.reason = ("sbatch never gave a job id and no job named "
                          f"{name} is known to Slurm (checked: {', '.join(ev.checked)})")
            rec.ended_at = rec.ended_at or runs.utcnow()
    return rec


def _queued(rec: runs.RunRecord, live: JobInfo | None, exited: Mapping[str, Any] | None, ev: Evidence) -> bool:
    """Step 3: the job is still in the queue (``pending``, or ``running`` until its exit
    marker exists), or the scheduler did not answer (the last known state is kept, with
    the reason). True when this decided the record."""
    ids = rec.executor_ids
    if live is not None and live.state in PENDING_STATES:
        ids["slurm_state"] = live.state
        rec.state = "pending" if live.state != "SUSPENDED" else "running"
        rec.reason = f"Slurm: {live.state}" + (f" ({live.reason})" if live.reason and live.reason != "None" else "")
        return True
    # RUNNING with the current attempt's exit marker: either the moment between the trailer
    # and the job's end, or a requeued job started again before its new start marker. Both
    # are still running (the next query sees the end). Past RUNNING (COMPLETING) the marker
    # ends the run, unless the payload was told to stop: then Slurm's verdict decides (below).
    if live is not None and live.state in RUNNING_STATES and (not exited or live.state == "RUNNING"):
        ids["slurm_state"] = live.state
        rec.state = "running"
        rec.reason = None
        if live.node:
            ids["node"] = live.node
        return True
    if live is not None and live.state in RUNNING_STATES and exited and exited.get("term_received") \
            and not exited.get("checkpoint_signal"):
        # told to stop (time limit, scancel, preemption) and still leaving the queue: Slurm's
        # own verdict, which decides the state, comes once the job is gone
        ids["slurm_state"] = live.state
        rec.reason = f"the job is ending (Slurm: {live.state})"
        return True
    if live is None and not ev.squeue_ok and not exited:
        # the scheduler did not answer: keep the last known state, say why
        rec.reason = f"scheduler unreachable ({ev.squeue_error}); last known state kept"
        return True
    return False


def _ended(rec: runs.RunRecord, job_id: str, live: JobInfo | None, final: JobInfo | None,
           started: Mapping[str, Any] | None, exited: Mapping[str, Any] | None, ev: Evidence) -> runs.RunRecord:
    """Steps 4 and 5: the job has ended (or left every source). Slurm's last word is noted in
    ``executor_ids``; then, in this order: exit marker 0 -> ``succeeded``; killed from
    outside -> that state; a non-zero marker -> ``failed``; Slurm FAILED -> ``failed``;
    Slurm COMPLETED without a marker -> ``unknown``; nothing at all -> ``lost``."""
    ids = rec.executor_ids
    info = live if (live is not None and live.state not in RUNNING_STATES) else final
    if info is not None:
        ids["slurm_state"] = info.state + (f" {info.detail}" if info.detail else "")
        ids["slurm_source"] = info.source
        if info.exit_code is not None:
            ids["slurm_exit_code"] = f"{info.exit_code}:{info.exit_signal or 0}"
        for key in ("elapsed", "max_rss", "node"):
            if getattr(info, key):
                ids[key] = getattr(info, key)
    killed = KILLED_STATES.get(info.state) if info is not None else None
    rec.ended_at = rec.ended_at or (exited or {}).get("time") or (info.end if info else None) or runs.utcnow()

    # Exit 0 is success unless Slurm had already asked the job to stop: a payload that
    # handles the SIGTERM of a time limit, a preemption or an scancel and exits 0 did not
    # finish its work (Slurm itself says TIMEOUT), and must not read as done.
    stopped_by_slurm = killed is not None and bool(exited and (exited.get("term_received")
                                                               or exited.get("checkpoint_signal") is True))
    service_failure = rec.extra.get("service_failure")
    if exited and exited.get("checkpoint_signal") is True and killed in (None, "timeout"):
        return _checkpointed(rec, exited, info)
    if exited and exited.get("exit_code") == 0 and not exited.get("launch_error") and not stopped_by_slurm \
            and not service_failure:
        rec.state = "succeeded"
        rec.exit_code = 0
        rec.reason = None if killed is None else f"the payload exited 0 before Slurm reported {info.state}"  # type: ignore[union-attr]
        return rec
    if killed is not None:
        assert info is not None
        rec.state = killed
        if exited:
            _payload_failed(rec, exited)
        elif info.exit_code is not None:
            rec.exit_code = info.exit_code
            rec.signal = info.exit_signal or None
        rec.reason = f"Slurm: {info.state}{' ' + info.detail if info.detail else ''} ({KILLED_WHY[killed]})"
        if stopped_by_slurm and exited and exited.get("exit_code") == 0:
            rec.reason += "; the payload exited 0 after the job was told to stop"
        if info.reason and info.reason not in QUEUE_REASONS:
            rec.reason += f"; reason {info.reason}"
        return rec
    if exited:
        rec.state = "failed"
        _payload_failed(rec, exited)
        rec.reason = (f"launch error: {rec.launch_error}" if rec.launch_error else
                      str(service_failure) if service_failure else
                      f"the payload exited with code {rec.exit_code}")
        if rec.signal:
            rec.reason += f" (killed by signal {rec.signal})"
        return rec
    if info is not None and info.state == "FAILED":
        rec.state = "failed"
        rec.exit_code = info.exit_code
        rec.signal = info.exit_signal or None
        rec.reason = (f"Slurm: FAILED ExitCode={info.exit_code}:{info.exit_signal or 0}; the job wrote no exit "
                      "marker (did it start? see the Slurm output file)")
        return rec
    if info is not None and info.state == "COMPLETED":
        rec.state = "unknown"
        rec.reason = ("Slurm says COMPLETED but the job wrote no exit marker (a template without "
                      "{{ record_end }}, or an unreadable run folder); not counted as success")
        return rec
    rec.state = "lost"
    where = f" on {started.get('host')}" if started else ""
    rec.reason = (f"job {job_id} is no longer known to squeue; it {'started' + where if started else 'never started'} "
                  f"but wrote no exit marker; checked: {', '.join(ev.checked)}")
    return rec


def settled(rec: runs.RunRecord) -> bool:
    """Nothing more will happen to this run without a new attempt: terminal, or ``unknown``
    (the job left every queue and no evidence came back; waiting longer would be forever)."""
    return rec.terminal or rec.state == "unknown"

