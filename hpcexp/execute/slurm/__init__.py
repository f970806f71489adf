"""The Slurm executor: argv builders, output parsers, submission, reconcile, stop, doctor.

Why it is built this way
  - Every Slurm command goes through :mod:`hpcexp.infra.process` with an argument list; the
    argv builders and parsers are pure and tested against golden scheduler output.
  - A status query costs one ``squeue`` call for all runs, plus at most one
    ``scontrol show job`` (no accounting: the controller still remembers finished jobs
    for ``MinJobAge`` seconds) and at most one ``sacct`` (skipped for an hour once it has
    said that accounting is disabled) for the runs that left the queue.
  - The job records its own state with plain shell (``events/attempt-N.started`` and
    ``.exit``, see :mod:`hpcexp.execute.slurm.sbatch`), so the record is right even when the job left
    ``squeue`` long ago and ``sacct`` has nothing.
  - No evidence is never success: ``succeeded`` needs the job's exit marker saying 0.
    A job gone from every source with no marker is ``lost``, with what was checked.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from hpcexp.core import runs
from hpcexp.core.config import MEM_RE, TIME_RE, SlurmResources
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.errors import EnvironmentProblem, HpcexpError, SchedulerError, UsageError, shown
from hpcexp.execute import base
from hpcexp.execute.base import LaunchRequest, LogFile
from hpcexp.infra import atomic, process, safeio
from hpcexp.infra import host as hostinfo

log = logging.getLogger(__name__)

TIMEOUT = 60.0
SBATCH_TIMEOUT = 180.0
SUBMIT_GRACE = 120.0          # a "submitting" record younger than this may still get its job id
FACTS_TTL = 3600.0
JOB_PREFIX = "hpcexp-"
SQUEUE_FORMAT = "%i|%A|%a|%T|%r|%j|%N|%M"
SACCT_FIELDS = "JobID,JobName,State,ExitCode,DerivedExitCode,Elapsed,MaxRSS,Start,End,NodeList"
WORD_RE = re.compile(r"^[A-Za-z0-9_.,:@+=-]+$")
GPUS_RE = re.compile(r"^([A-Za-z0-9_.-]+:)?\d+$")

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


# --------------------------------------------------------------------------------------
# Resources and argv builders (pure)
# --------------------------------------------------------------------------------------

def check_resources(res: SlurmResources, where: str = "command line") -> SlurmResources:
    """Validate resources given on the command line with the rules hpcexp.yaml uses."""
    checks = (("partition", WORD_RE), ("account", WORD_RE), ("qos", WORD_RE), ("time", TIME_RE),
              ("mem", MEM_RE), ("gpus", GPUS_RE))
    for name, rx in checks:
        value = getattr(res, name)
        if value is not None and not rx.match(str(value)):
            raise UsageError(f"{where}: invalid --{name} {value!r}")
    if res.cpus is not None and not 1 <= res.cpus <= 4096:
        raise UsageError(f"{where}: --cpus must be from 1 to 4096, got {res.cpus}")
    if res.max_parallel is not None and res.max_parallel < 1:
        raise UsageError(f"{where}: --max-parallel must be at least 1, got {res.max_parallel}")
    return res


def resource_options(res: SlurmResources) -> dict[str, str | None]:
    """sbatch long options (without dashes) for the resources that are set."""
    out: dict[str, str | None] = {}
    if res.partition:
        out["partition"] = res.partition
    if res.time:
        out["time"] = res.time
    if res.cpus:
        out["cpus-per-task"] = str(res.cpus)
    if res.mem:
        out["mem"] = res.mem
    if res.gpus and res.gpus != "0":
        out["gpus"] = res.gpus
    if res.account:
        out["account"] = res.account
    if res.qos:
        out["qos"] = res.qos
    return out


def resources_dict(res: SlurmResources) -> dict[str, Any]:
    """What goes into the run record's ``resources``."""
    out: dict[str, Any] = {k: getattr(res, k) for k in ("partition", "time", "cpus", "mem", "gpus", "account",
                                                        "qos", "max_parallel") if getattr(res, k) is not None}
    if res.sbatch_args:
        out["sbatch_args"] = list(res.sbatch_args)
    return out


def array_spec(n: int, max_parallel: int | None) -> str:
    """``--array`` value for tasks 0..n-1, throttled to ``max_parallel`` at once."""
    if n < 1:
        raise ValueError("an array needs at least one task")
    spec = "0" if n == 1 else f"0-{n - 1}"
    return spec + (f"%{max_parallel}" if max_parallel else "")


def sbatch_argv(script: Path, *, hold: bool = False, after: str | None = None) -> list[str]:
    """``sbatch --parsable [--hold] [--dependency=afterany:JOB] SCRIPT``."""
    argv = ["sbatch", "--parsable"]
    if hold:
        argv.append("--hold")
    if after:
        argv.append(f"--dependency=afterany:{after}")
    return argv + [str(script)]


def squeue_argv(users: Sequence[str]) -> list[str]:
    """All jobs of these users, one line per array task (``-r``); parsed by :func:`parse_squeue`."""
    return ["squeue", "-h", "-r", "-u", ",".join(sorted(set(users))), "-o", SQUEUE_FORMAT]


def sacct_argv(job_ids: Iterable[str]) -> list[str]:
    return ["sacct", "-n", "-P", "-D", "-o", SACCT_FIELDS, "-j", ",".join(sorted(set(job_ids), key=_id_key))]


def scontrol_jobs_argv() -> list[str]:
    return ["scontrol", "show", "job", "-o"]


def scancel_argv(job_ids: Sequence[str]) -> list[str]:
    return ["scancel", *job_ids]


def _id_key(job_id: str) -> tuple[int, int]:
    base, _, task = job_id.partition("_")
    return (int(base) if base.isdigit() else 0, int(task) if task.isdigit() else -1)


# --------------------------------------------------------------------------------------
# Parsers (pure)
# --------------------------------------------------------------------------------------

def parse_sbatch(stdout: str) -> str:
    """The job id from ``sbatch --parsable`` output (``123`` or ``123;cluster``)."""
    for line in stdout.splitlines():
        line = line.strip()
        if line:
            job = line.split(";")[0]
            if job.isdigit():
                return job
    raise SchedulerError(f"sbatch printed no job id: {stdout.strip()[:200]!r}")


@dataclass(frozen=True)
class JobInfo:
    """What one scheduler source says about one job (or array task)."""

    job_id: str                 # "123" or "123_4"
    state: str                  # Slurm's state word, e.g. CANCELLED (by-uid detail in ``detail``)
    source: str                 # squeue | scontrol | sacct
    name: str = ""
    reason: str = ""
    detail: str = ""
    exit_code: int | None = None
    exit_signal: int | None = None
    derived_exit: str | None = None
    elapsed: str | None = None
    max_rss: str | None = None
    start: str | None = None
    end: str | None = None
    node: str | None = None
    restarts: int | None = None


def expand_indices(text: str) -> list[int]:
    """Array task ids ``3``, ``[0-5%2]``, ``1,4-6`` -> list of ints (empty if not such a spec)."""
    text = text.strip().strip("[]").split("%")[0]
    out: list[int] = []
    for part in text.split(","):
        if re.fullmatch(r"\d+", part):
            out.append(int(part))
        elif re.fullmatch(r"\d+-\d+", part):
            lo, hi = (int(x) for x in part.split("-"))
            out.extend(range(lo, hi + 1))
        else:
            return []
    return out


def _ids_of(job_field: str) -> list[str]:
    """``123``, ``123_4``, ``123_[0-5%2]`` -> individual ids."""
    base, sep, tasks = job_field.partition("_")
    if not sep:
        return [base]
    idx = expand_indices(tasks)
    return [f"{base}_{i}" for i in idx] if idx else [job_field]


def _exit_pair(text: str | None) -> tuple[int | None, int | None]:
    if not text or ":" not in text:
        return None, None
    a, _, b = text.partition(":")
    try:
        return int(a), int(b)
    except ValueError:
        return None, None


def parse_squeue(stdout: str) -> dict[str, JobInfo]:
    out: dict[str, JobInfo] = {}
    for line in stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 6:
            continue
        jid, _array_job, _array_task, state, reason, name = parts[:6]
        node = parts[6] if len(parts) > 6 else ""
        for one in _ids_of(jid):
            out[one] = JobInfo(one, state.split()[0], "squeue", name=name, reason=reason, node=node or None)
    return out


def _kv_line(line: str) -> dict[str, str]:
    """``Key=Value Key2=Value two`` (scontrol -o): values may hold spaces, keys never do."""
    out: dict[str, str] = {}
    for m in re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9/:_]*)=(.*?)(?=\s+[A-Za-z][A-Za-z0-9/:_]*=|\s*$)", line):
        out.setdefault(m.group(1), m.group(2))
    return out


def parse_scontrol_jobs(stdout: str) -> dict[str, JobInfo]:
    out: dict[str, JobInfo] = {}
    for line in stdout.splitlines():
        if "JobId=" not in line:
            continue
        kv = _kv_line(line.strip())
        ids = [kv.get("JobId", "")]
        if kv.get("ArrayJobId") and kv.get("ArrayTaskId") not in (None, "", "N/A"):
            ids = [f"{kv['ArrayJobId']}_{i}" for i in expand_indices(kv["ArrayTaskId"])]
        code, sig = _exit_pair(kv.get("ExitCode"))
        restarts = kv.get("Restarts")
        for one in ids:
            out[one] = JobInfo(
                one, kv.get("JobState", "UNKNOWN"), "scontrol", name=kv.get("JobName", ""),
                reason=kv.get("Reason", "") if kv.get("Reason") not in ("None", "(null)") else "",
                exit_code=code, exit_signal=sig, derived_exit=kv.get("DerivedExitCode"),
                elapsed=kv.get("RunTime"), start=_none(kv.get("StartTime")), end=_none(kv.get("EndTime")),
                node=_none(kv.get("NodeList")), restarts=int(restarts) if restarts and restarts.isdigit() else None)
    return out


def _none(v: str | None) -> str | None:
    return None if v in (None, "", "Unknown", "None", "(null)", "N/A") else v


def parse_sacct(stdout: str) -> dict[str, JobInfo]:
    """sacct -P output: allocation lines give the state, ``.batch`` steps give MaxRSS."""
    out: dict[str, JobInfo] = {}
    rss: dict[str, str] = {}
    for line in stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 10:
            continue
        jid, name, state, exit_code, derived, elapsed, maxrss, start, end, node = parts[:10]
        base, dot, step = jid.partition(".")
        if dot:
            if maxrss and step == "batch":
                rss[base] = maxrss
            continue
        words = state.split()
        code, sig = _exit_pair(exit_code)
        for one in _ids_of(base):
            out[one] = JobInfo(one, words[0] if words else "UNKNOWN", "sacct", name=name,
                               detail=" ".join(words[1:]), exit_code=code, exit_signal=sig, derived_exit=derived,
                               elapsed=elapsed or None, start=_none(start), end=_none(end), node=_none(node))
    for base, value in rss.items():
        if base in out:
            out[base] = replace(out[base], max_rss=value)
    return out


def accounting_disabled(res: process.Result) -> bool:
    text = (res.stderr + res.stdout).lower()
    return "accounting storage is disabled" in text or "slurmdbd" in text and "connect" in text


def parse_config(stdout: str) -> dict[str, str]:
    """``scontrol show config``: ``Key = Value`` lines."""
    out: dict[str, str] = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and " " not in key.strip():
            out[key.strip()] = value.strip()
    return out


# --------------------------------------------------------------------------------------
# Markers the job writes (events/attempt-N.started / .exit)
# --------------------------------------------------------------------------------------

MARKER_RE = re.compile(r"^attempt-(\d+)\.(started|exit)$")


def read_markers(paths: RunPaths) -> dict[int, dict[str, dict[str, Any]]]:
    """{attempt: {"started": {...}, "exit": {...}}} from the run's events folder."""
    out: dict[int, dict[str, dict[str, Any]]] = {}
    try:
        names = os.listdir(paths.events)
    except OSError:
        return out
    for name in names:
        m = MARKER_RE.match(name)
        if not m:
            continue
        try:
            data = safeio.load_json_file(paths.events / name, what="event")
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except (OSError, ValueError) as exc:
            data = {"unreadable": str(exc)}
        out.setdefault(int(m.group(1)), {})[m.group(2)] = data
    return out


# --------------------------------------------------------------------------------------
# Deciding a run's state (pure)
# --------------------------------------------------------------------------------------

@dataclass
class Evidence:
    """Everything one status query learned, shared by all runs it looks at."""

    live: dict[str, JobInfo] = field(default_factory=dict)
    squeue_ok: bool = True
    squeue_error: str | None = None
    final: dict[str, JobInfo] = field(default_factory=dict)   # sacct first, else scontrol
    checked: list[str] = field(default_factory=list)          # human summary of sources consulted
    scontrol: dict[str, JobInfo] = field(default_factory=dict)
    min_job_age: str | None = None


def _payload_failed(rec: runs.RunRecord, exit_info: Mapping[str, Any]) -> None:
    code = exit_info.get("exit_code")
    rec.exit_code = int(code) if isinstance(code, int) else None
    if exit_info.get("launch_error"):
        rec.launch_error = str(exit_info["launch_error"])
    if rec.exit_code is not None and rec.exit_code > 128 and exit_info.get("term_received"):
        rec.signal = rec.exit_code - 128


def decide(rec: runs.RunRecord, markers: Mapping[int, Mapping[str, Mapping[str, Any]]], ev: Evidence,
           now: float | None = None) -> runs.RunRecord:
    """The record brought up to date with the markers and the scheduler's evidence. Pure.

    Order of trust: the job's own exit marker for the payload's exit code; Slurm's
    terminal state for how the job was ended from outside (cancel, time limit, memory,
    node); no marker and no scheduler record -> ``lost`` with what was checked.
    """
    rec = rec.copy()
    ids = rec.executor_ids
    job_id = ids.get("job_id")
    base = int(ids.get("base_attempt", rec.attempt) or 1)
    live = ev.live.get(job_id) if job_id else None
    final = ev.final.get(job_id) if job_id else None

    # attempts: the newest marker, or Slurm's restart count, tells which attempt is current
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
            rec.attempts.append({"attempt": a, "job_id": job_id, "started_at": s.get("time"),
                                 "ended_at": e.get("time"), "exit_code": e.get("exit_code"),
                                 "host": s.get("host"), "note": "requeued" if e or s else "requeued before it started"})
        rec.attempt = attempt
        rec.started_at = rec.ended_at = None
        rec.exit_code = rec.signal = None
        rec.reason = None
    cur = markers.get(rec.attempt, {})
    started, exited = cur.get("started"), cur.get("exit")
    if started and not rec.started_at:
        rec.started_at = started.get("time")
        if started.get("host"):
            ids["node"] = started["host"]

    if job_id is None:
        if rec.state == "submitting":
            age = (now or time.time()) - (runs.parse_time(rec.created_at) or 0)
            if age > SUBMIT_GRACE:
                rec.state = "lost"
                rec.reason = ("sbatch never gave a job id and no job named "
                              f"{ids.get('job_name', '?')} is known to Slurm (checked: {', '.join(ev.checked)})")
                rec.ended_at = rec.ended_at or runs.utcnow()
        return rec

    if live is not None and live.state in PENDING_STATES:
        ids["slurm_state"] = live.state
        rec.state = "pending" if live.state != "SUSPENDED" else "running"
        rec.reason = f"Slurm: {live.state}" + (f" ({live.reason})" if live.reason and live.reason != "None" else "")
        return rec
    if live is not None and live.state in RUNNING_STATES and not exited:
        ids["slurm_state"] = live.state
        rec.state = "running"
        rec.reason = None
        if live.node:
            ids["node"] = live.node
        return rec
    if live is None and not ev.squeue_ok and not exited:
        # the scheduler did not answer: keep the last known state, say why
        rec.reason = f"scheduler unreachable ({ev.squeue_error}); last known state kept"
        return rec

    info = live if (live is not None and live.state not in RUNNING_STATES) else final
    if info is not None:
        ids["slurm_state"] = info.state + (f" {info.detail}" if info.detail else "")
        if info.exit_code is not None:
            ids["slurm_exit_code"] = f"{info.exit_code}:{info.exit_signal or 0}"
        for key in ("elapsed", "max_rss", "node"):
            if getattr(info, key):
                ids[key] = getattr(info, key)
    killed = KILLED_STATES.get(info.state) if info is not None else None
    rec.ended_at = rec.ended_at or (exited or {}).get("time") or (info.end if info else None) or runs.utcnow()

    if exited and exited.get("exit_code") == 0 and not exited.get("launch_error"):
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
        what = {"cancelled": "the job was cancelled", "timeout": "the job hit its time limit",
                "out_of_memory": "the job was killed for using too much memory", "node_fail": "its node failed",
                "failed": "the job was preempted"}[killed]
        rec.reason = f"Slurm: {info.state}{' ' + info.detail if info.detail else ''} ({what})"
        if info.reason and info.reason not in QUEUE_REASONS:
            rec.reason += f"; reason {info.reason}"
        return rec
    if exited:
        rec.state = "failed"
        _payload_failed(rec, exited)
        rec.reason = (f"launch error: {rec.launch_error}" if rec.launch_error else
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


# --------------------------------------------------------------------------------------
# Talking to Slurm
# --------------------------------------------------------------------------------------

def _cache_file(layout: Layout) -> Path:
    return layout.project.cache_dir / "slurm-facts.json"


def _read_cache(layout: Layout) -> dict[str, Any]:
    try:
        data = json.loads(_cache_file(layout).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(layout: Layout, data: Mapping[str, Any]) -> None:
    path = _cache_file(layout)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, dict(data))
    except (OSError, HpcexpError) as exc:  # a cache is never a reason to fail
        log.debug("could not write %s: %s", path, exc)


def _run(argv: Sequence[str]) -> process.Result:
    return process.run(argv, timeout=TIMEOUT)


def gather(layout: Layout, records: Sequence[runs.RunRecord], markers: Mapping[str, Mapping[int, Any]]
           ) -> Evidence:
    """One squeue call, then (only for runs that left the queue without a final answer)
    one sacct call unless accounting is known to be off, and one scontrol call."""
    ev = Evidence()
    users = sorted({r.user for r in records if _known_user(r.user)} | {hostinfo.user()})
    try:
        res = _run(squeue_argv(users))
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
    cache = _read_cache(layout)
    acct_off = cache.get("accounting") is False and time.time() - float(cache.get("accounting_checked", 0)) < FACTS_TTL
    if gone and not acct_off:
        try:
            res = _run(sacct_argv({r.executor_ids["job_id"].split("_")[0] for r in gone}))
            if res.ok:
                ev.final.update(parse_sacct(res.stdout))
                ev.checked.append("sacct")
                cache.update(accounting=True, accounting_checked=time.time())
            elif accounting_disabled(res):
                ev.checked.append("sacct (accounting disabled)")
                cache.update(accounting=False, accounting_checked=time.time())
            else:
                ev.checked.append(f"sacct (failed: {res.last_line()})")
            _write_cache(layout, cache)
        except EnvironmentProblem as exc:
            ev.checked.append(f"sacct (unavailable: {exc.message})")
    elif gone:
        ev.checked.append("sacct (accounting disabled)")
    need_scontrol = orphans or any(r.executor_ids["job_id"] not in ev.final for r in gone)
    if need_scontrol:
        try:
            res = _run(scontrol_jobs_argv())
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


def _known_user(name: str) -> bool:
    """squeue -u fails outright on a user unknown here (records copied from another cluster)."""
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except (KeyError, TypeError):
        return False


def _attach_orphans(layout: Layout, items: list[tuple[RunPaths, runs.RunRecord]], ev: Evidence) -> None:
    """Records left in ``submitting`` (hpcexp died between sbatch and recording the id):
    find their job by the name hpcexp gave it, or by the sweep record, and attach it."""
    by_name: dict[str, list[JobInfo]] = {}
    for info in list(ev.live.values()) + list(ev.scontrol.values()):
        by_name.setdefault(info.name, []).append(info)
    sweep_cache: dict[str, dict[str, Any]] = {}
    for _paths, rec in items:
        ids = rec.executor_ids
        if ids.get("job_id") or rec.state != "submitting":
            continue
        chunk_job = None
        if rec.sweep_id:
            if rec.sweep_id not in sweep_cache:
                try:
                    sweep_cache[rec.sweep_id] = safeio.load_json_file(layout.sweep(rec.sweep_id), max_bytes=64 << 20)
                except (OSError, ValueError):
                    sweep_cache[rec.sweep_id] = {}
            for sub in sweep_cache[rec.sweep_id].get("submissions", []):
                if sub.get("job_name") == ids.get("job_name") and sub.get("array_job_id"):
                    chunk_job = str(sub["array_job_id"])
        if chunk_job is None:
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
    ev = gather(layout, [r for _, r in todo], {})
    _attach_orphans(layout, todo, ev)
    # markers are read after squeue: a job gone from the queue has written its exit already
    changed: list[tuple[RunPaths, runs.RunRecord]] = []
    updated: dict[Path, runs.RunRecord] = {}
    for paths, rec in todo:
        new = decide(rec, read_markers(paths), ev)
        if _worth_writing(rec, new):
            changed.append((paths, new))
        updated[paths.dir] = new
    _write_many(changed)
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


def _write_many(items: Sequence[tuple[RunPaths, runs.RunRecord]], *, strict: bool = False,
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
        _check_scancel(_run(scancel_argv(sorted(set(targets), key=_id_key))))
    for name in sorted(set(names)):
        _check_scancel(_run(["scancel", "--name", name]))
    time.sleep(0.3)  # let slurmctld settle the cancelled state
    return reconcile(layout, items)


# --------------------------------------------------------------------------------------
# Facts for doctor and for chunking sweeps
# --------------------------------------------------------------------------------------

def facts() -> dict[str, Any]:
    """Slurm facts that bite: one ``scontrol show config`` and one ``sinfo`` call."""
    out: dict[str, Any] = {"available": False}
    try:
        res = _run(["scontrol", "show", "config"])
    except EnvironmentProblem as exc:
        out["error"] = exc.message
        return out
    if not res.ok:
        out["error"] = res.last_line()
        return out
    cfg = parse_config(res.stdout)
    out["available"] = True
    out["version"] = cfg.get("SLURM_VERSION")
    out["cluster"] = cfg.get("ClusterName")
    out["max_array_size"] = _int(cfg.get("MaxArraySize"))
    out["min_job_age"] = _int((cfg.get("MinJobAge") or "").split()[0] if cfg.get("MinJobAge") else None)
    acct = cfg.get("AccountingStorageType", "")
    out["accounting"] = bool(acct) and acct != "accounting_storage/none"
    out["accounting_storage"] = acct
    out["job_requeue"] = cfg.get("JobRequeue") == "1"
    out["kill_wait"] = _int((cfg.get("KillWait") or "").split()[0] if cfg.get("KillWait") else None)
    m = re.search(r"max_script_size=(\d+)", cfg.get("SchedulerParameters", ""))
    out["max_script_size"] = int(m.group(1)) if m else 4 * 1024 * 1024
    out["task_plugin"] = cfg.get("TaskPlugin")
    out["default_partition"] = None
    out["default_time_limit"] = None
    try:
        si = _run(["sinfo", "-h", "-o", "%P|%l|%a"])
        if si.ok:
            for line in si.stdout.splitlines():
                part = line.strip().split("|")
                if len(part) >= 2 and part[0].endswith("*"):
                    out["default_partition"] = part[0].rstrip("*")
                    out["default_time_limit"] = part[1]
    except EnvironmentProblem:
        pass
    return out


def _int(v: str | None) -> int | None:
    try:
        return int(str(v).split()[0]) if v is not None else None
    except ValueError:
        return None


def cached_facts(layout: Layout) -> dict[str, Any]:
    """:func:`facts`, cached for an hour (submit needs MaxArraySize, not a new query each time)."""
    cache = _read_cache(layout)
    if cache.get("facts") and time.time() - float(cache.get("facts_checked", 0)) < FACTS_TTL:
        return dict(cache["facts"])
    f = facts()
    if f.get("available"):
        cache.update(facts=f, facts_checked=time.time(), min_job_age=f"{f.get('min_job_age')} s",
                     accounting=f.get("accounting"), accounting_checked=time.time())
        _write_cache(layout, cache)
    return f


def doctor_checks(f: Mapping[str, Any] | None = None) -> list[tuple[str, str, str, str]]:
    """(name, ok|warn|fail, detail, fix) rows for ``hpcexp doctor``."""
    f = facts() if f is None else f
    if not f.get("available"):
        return [("slurm", "warn", f"no Slurm controller answers ({f.get('error', 'unknown')})",
                 "only needed for `hpcexp submit`: run on a login node or `module load slurm`")]
    rows = [("slurm.version", "ok", f"Slurm {f.get('version')} (cluster {f.get('cluster')})", "")]
    mas = f.get("max_array_size")
    rows.append(("slurm.max_array_size", "ok" if (mas or 0) > 1 else "warn",
                 f"MaxArraySize={mas}: larger sweeps are split into several arrays under one sweep id",
                 "" if (mas or 0) > 1 else "job arrays are disabled; each sweep task becomes its own array"))
    acct = f.get("accounting")
    age = f.get("min_job_age")
    rows.append(("accounting", "ok" if acct else "warn",
                 f"accounting {'enabled' if acct else 'disabled'} ({f.get('accounting_storage')})",
                 "" if acct else "no final state/elapsed/MaxRSS from sacct; hpcexp relies on the markers its job "
                                 "scripts write, so keep run folders on a file system the nodes share"))
    rows.append(("slurm.min_job_age", "ok" if (age or 0) >= 60 else "warn",
                 f"MinJobAge={age} s: scontrol forgets a finished job after that",
                 "" if (age or 0) >= 60 else "run `hpcexp status` soon after jobs end to catch Slurm's final state"))
    part, limit = f.get("default_partition"), f.get("default_time_limit")
    rows.append(("slurm.default_partition", "ok" if part else "warn",
                 f"default partition {part or '(none)'}, time limit {limit or '?'}",
                 "" if part else "set slurm.partition in hpcexp.yaml"))
    rows.append(("slurm.requeue", "ok", f"JobRequeue={'1' if f.get('job_requeue') else '0'}; KillWait="
                 f"{f.get('kill_wait')} s", ""))
    return rows


# --------------------------------------------------------------------------------------
# Submission
# --------------------------------------------------------------------------------------

def _fault(point: str) -> None:
    """Test hook (reliability test 35): ``HPCEXP_TEST_FAULT=slurm.after_sbatch:kill`` kills
    this process right after sbatch accepted a job and before any record holds its id."""
    spec = os.environ.get("HPCEXP_TEST_FAULT", "")
    if spec == f"{point}:kill":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


# sbatch's own refusals -> the option they are about (Slurm says "Invalid partition name
# specified" without the value; the user needs to know which of their settings it was).
_REFUSALS: tuple[tuple[str, str], ...] = (
    ("invalid account", "account"), ("invalid qos", "qos"), ("invalid partition", "partition"),
    ("time limit", "time"), ("memory", "mem"), ("mem-per", "mem"), ("gres", "gpus"), ("gpu", "gpus"),
    ("cpu count", "cpus"), ("cpus", "cpus"), ("partition", "partition"), ("account", "account"), ("qos", "qos"),
)


def offending_option(message: str, res: SlurmResources) -> str | None:
    """``--partition=nosuch``: the option (and the value asked for) an sbatch error is about."""
    low = message.lower()
    for needle, attr in _REFUSALS:
        if needle in low:
            value = getattr(res, attr, None)
            if value is not None:
                return f"--{attr}={shown(str(value), 60)[1:-1]}"
            return f"--{attr}"
    if "node configuration" in low:  # the node cannot give what was asked: name every size asked for
        asked = [f"--{a}={shown(str(getattr(res, a)), 40)[1:-1]}" for a in ("cpus", "mem", "gpus")
                 if getattr(res, a, None) is not None]
        return " or ".join(asked) if asked else None
    return None


def check_against_cluster(layout: Layout, res: SlurmResources) -> None:
    """Refuse a partition, account or QOS the cluster does not have, naming the option and
    value, before any run is created (exit 6, as when sbatch refuses). Cheap: one ``sinfo``; ``sacctmgr`` only when
    accounting storage exists. When a tool cannot answer, sbatch decides as before."""
    def listing(argv: list[str]) -> set[str] | None:
        try:
            r = process.run(argv, timeout=15)
        except HpcexpError:
            return None
        if not r.ok:
            return None
        names = {w.split("|")[0].strip().rstrip("*") for w in r.stdout.split()}
        return {n for n in names if n} or None

    if res.partition:
        parts = listing(["sinfo", "-h", "-o", "%P"])
        for p in res.partition.split(","):
            if parts is not None and p not in parts:
                raise SchedulerError(f"--partition={shown(p, 60)[1:-1]}: no such partition on this cluster "
                                 f"(it has: {', '.join(sorted(parts))}); nothing was submitted",
                                 hint="set slurm.partition in hpcexp.yaml or pass --partition")
    if not (res.account or res.qos):
        return
    if not cached_facts(layout).get("accounting"):
        return  # without accounting storage Slurm does not check accounts or QOS either
    for attr, argv in (("account", ["sacctmgr", "-n", "-P", "show", "account", "format=account"]),
                       ("qos", ["sacctmgr", "-n", "-P", "show", "qos", "format=name"])):
        value = getattr(res, attr)
        if not value:
            continue
        known = listing(argv)
        if known is not None and value not in known:
            raise SchedulerError(f"--{attr}={shown(value, 60)[1:-1]}: no such {attr} on this cluster "
                             f"(it has: {', '.join(sorted(known)[:20])}); nothing was submitted")


class SubmitUncertain(SchedulerError):
    """sbatch did not answer in time: the job may exist. Records stay ``submitting``."""


def submit_script(script: Path, *, hold: bool = False, cwd: Path | None = None, after: str | None = None) -> str:
    """``sbatch --parsable SCRIPT`` -> job id, or SchedulerError with Slurm's own reason."""
    try:
        res = process.run(sbatch_argv(script, hold=hold, after=after), cwd=cwd, timeout=SBATCH_TIMEOUT)
    except EnvironmentProblem as exc:
        if "did not answer" in exc.message:
            # the controller may have queued the job anyway: that is not a refusal
            raise SubmitUncertain(f"{exc.message}; the job may or may not have been queued",
                                  hint="`hpcexp status` finds it by its job name and attaches it, or reports "
                                       "the runs lost after a few minutes") from exc
        raise SchedulerError(exc.message, hint=exc.hint) from exc
    if not res.ok:
        # sbatch often gives the cause on an earlier line ("Memory specification can not be
        # satisfied") than the last one ("Requested node configuration is not available")
        errs = [ln.strip().removeprefix("sbatch: error: ") for ln in res.stderr.splitlines()
                if ln.strip().startswith("sbatch: error:")]
        reason = "; ".join(dict.fromkeys(errs))[:500] if errs else res.last_line()
        raise SchedulerError(f"sbatch refused {script}: {reason}",
                             hint="see `hpcexp doctor`; resources come from hpcexp.yaml then the command line")
    return parse_sbatch(res.stdout)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------------------
# Submitting runs and sweeps
# --------------------------------------------------------------------------------------

@dataclass
class Submission:
    """What ``submit`` did (or, with dry_run, would do)."""

    experiment: str
    sweep_id: str | None
    runs: list[tuple[RunPaths, runs.RunRecord]]
    job_ids: list[str]                      # one per sbatch call (array job ids for sweeps)
    scripts: list[Path]
    texts: list[str]                        # the rendered scripts
    dry_run: bool = False


@dataclass
class _Task:
    paths: RunPaths
    record: runs.RunRecord
    spec: Any                               # sbatch.TaskSpec


def _template(layout: Layout, name: str, template: str | None) -> tuple[str, str]:
    """(text, label) of slurm/TEMPLATE.sbatch, slurm/NAME.sbatch, slurm/default.sbatch, or the built-in one."""
    from hpcexp.execute.slurm import sbatch

    proj = layout.project
    if template:
        path = proj.slurm_dir / f"{template}.sbatch"
        if not path.is_file():
            raise UsageError(f"slurm template {template!r} not found: {path} does not exist",
                             hint=f"create it from {proj.slurm_dir / 'default.sbatch'} or drop slurm.template")
    else:
        path = layout.slurm_template(name)
    if path.is_file():
        try:
            label = str(path.relative_to(proj.root))
        except ValueError:
            label = str(path)
        try:
            return path.read_text(encoding="utf-8"), label
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read slurm template {label}: {exc}") from exc
    return sbatch.default_template(), "(built-in default.sbatch)"


def _runtime_program() -> tuple[str, str | None, str]:
    """(program name to call on the node, version, env prefix)."""
    from hpcexp.runtime import apptainer

    inst = apptainer.detect()
    program = inst.program if inst else "apptainer"
    prefix = "SINGULARITYENV_" if program == "singularity" else "APPTAINERENV_"
    return program, (inst.version if inst else None), prefix


def _image_fields(image: Any) -> dict[str, Any]:
    if isinstance(image, (str, os.PathLike)):
        return {"path": Path(image)}
    return {name: getattr(image, name, None)
            for name in ("path", "sha256", "input_hash", "recipe_sha256", "workdir", "apptainer_version",
                         "cmd", "entrypoint", "source_ref")}


def _chunks(n: int, size: int) -> list[range]:
    size = max(1, size)
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def _link_script(script: Path, target: Path) -> None:
    """Keep the job script in the run folder: a hard link to the array's script (no copies of
    a large table), or a copy where links are not possible."""
    try:
        if target.exists() or target.is_symlink():
            target.unlink()
        os.link(script, target)
    except OSError:
        atomic.write_bytes(target, script.read_bytes())


def _submit_tasks(layout: Layout, exp_name: str, image: Path, tasks: list[_Task], res: SlurmResources, *,
                  sweep_id: str | None, array: bool, hold: bool, dry_run: bool, label_hint: str,
                  first_chunk: int = 0, sweep_record: dict[str, Any] | None = None,
                  fresh: bool = False,
                  env_probe: tuple[str, int, tuple[str, ...]] | None = None) -> Submission:
    """Render, keep and submit the job script(s) for ``tasks`` (records already written).

    ``fresh``: the runs were created for this submission; when sbatch refuses the first
    part, their folders (and the sweep's) are removed again instead of kept as ``failed``."""
    from hpcexp.execute import sweep as sweep_mod
    from hpcexp.execute.slurm import sbatch

    proj = layout.project
    text, label = _template(layout, exp_name, res.template)
    f = cached_facts(layout) if array else {}
    max_size = int(f.get("max_array_size") or 1001)
    # the largest index is MaxArraySize-1 and each array's indices start at 0
    sizes = _chunks(len(tasks), max(1, max_size)) if array else [range(0, 1)]
    base_opts = resource_options(res)
    base_opts["open-mode"] = "append"
    base_opts["chdir"] = str(proj.root)
    renders: list[tuple[range, str, str, Path]] = []
    pending = list(sizes)
    k = first_chunk
    while pending:
        rng = pending.pop(0)
        part = [tasks[i] for i in rng]
        opts = dict(base_opts)
        if array:
            job_name = f"{JOB_PREFIX}{sweep_id}-{k}"
            opts["array"] = array_spec(len(part), res.max_parallel)
            opts["output"] = sbatch.slurm_path(layout.sweep_dir(str(sweep_id))) + "/slurm-%A_%a.out"
            opts["comment"] = f"hpcexp sweep {sweep_id} part {k}"
            script = layout.sweep_dir(str(sweep_id)) / f"array-{k}.sbatch"
        else:
            job_name = f"{JOB_PREFIX}{part[0].record.run_id}"
            opts["output"] = sbatch.slurm_path(part[0].paths.dir) + "/slurm-%j.out"
            opts["comment"] = f"hpcexp run {part[0].record.run_id}"
            script = part[0].paths.script
        opts["job-name"] = job_name
        spec = sbatch.JobSpec(experiment=exp_name, project_root=proj.root, image=image,
                              tasks=tuple(t.spec for t in part), options=opts, extra_args=tuple(res.sbatch_args),
                              sweep_id=sweep_id, array=array, launch_error_hint=label_hint, template_label=label,
                              env_if_reachable=env_probe)
        rendered = sbatch.render(text, spec)
        if len(rendered.encode()) > min(sbatch.MAX_SCRIPT_BYTES, int(f.get("max_script_size") or 4 << 20) - 65536) \
                and len(part) > 1:
            half = len(rng) // 2
            pending[:0] = [range(rng.start, rng.start + half), range(rng.start + half, rng.stop)]
            continue
        renders.append((rng, job_name, rendered, script))
        k += 1

    if dry_run:
        return Submission(exp_name, sweep_id, [(t.paths, t.record) for t in tasks], [],
                          [r[3] for r in renders], [r[2] for r in renders], dry_run=True)

    # keep the scripts and note every part in the sweep record before any sbatch call
    for rng, job_name, rendered, script in renders:
        atomic.write_text(script, rendered)
        for pos, i in enumerate(rng):
            t = tasks[i]
            t.record.executor_ids["job_name"] = job_name
            if array:
                t.record.executor_ids.update(array_task_id=pos, array_size=len(rng))
                _link_script(script, t.paths.script)
    if array and sweep_record is not None:
        subs = sweep_record.setdefault("submissions", [])
        for rng, job_name, _, script in renders:
            subs.append({"job_name": job_name, "script": str(script), "array_job_id": None,
                         "run_ids": [tasks[i].record.run_id for i in rng],
                         "task_indexes": [tasks[i].record.task_index for i in rng], "submitted_at": None})
        sweep_mod.write_sweep(layout, sweep_record)
    _write_many([(t.paths, t.record) for t in tasks], strict=True)

    job_ids: list[str] = []
    for n, (rng, job_name, _, script) in enumerate(renders):
        # A sweep split into several arrays: --max-parallel throttles each array, so with a
        # throttle each part waits for the previous one (afterany), keeping the global limit.
        after = job_ids[-1] if (array and res.max_parallel and job_ids) else None
        try:
            job = submit_script(script, hold=hold, cwd=proj.root, after=after)
        except SubmitUncertain as exc:
            done = f"; already submitted before it: job(s) {', '.join(job_ids)}" if job_ids else ""
            rest = [tasks[i] for r in renders[n + 1:] for i in r[0]]
            for t in rest:
                t.record.state = "failed"
                t.record.launch_error = t.record.reason = "not submitted: an earlier sbatch call did not answer"
                t.record.ended_at = runs.utcnow()
            _write_many([(t.paths, t.record) for t in rest])
            raise SubmitUncertain(exc.message + done, hint=exc.hint) from exc
        except SchedulerError as exc:
            which = offending_option(exc.message, res)
            if which:
                exc = SchedulerError(f"{exc.message} (the option it refused: {which})", hint=exc.hint)
            failed = [tasks[i] for r in renders[n:] for i in r[0]]
            if fresh and not job_ids:
                # nothing was ever queued: leave no run behind (the records were ours alone)
                _discard_unsubmitted(layout, tasks, sweep_id if array else None)
                raise SchedulerError(exc.message + "; nothing was submitted and no run was kept",
                                     hint=exc.hint) from exc
            for t in failed:
                t.record.state = "failed"
                t.record.launch_error = f"not submitted: {exc.message}"
                t.record.reason = t.record.launch_error
                t.record.ended_at = runs.utcnow()
            _write_many([(t.paths, t.record) for t in failed])
            if array and sweep_record is not None:
                sweep_mod.write_sweep(layout, sweep_record)
            done = f"; already submitted: job(s) {', '.join(job_ids)} (`hpcexp stop {sweep_id}` cancels them)" \
                if job_ids else "; nothing was submitted"
            raise SchedulerError(exc.message + done, hint=exc.hint) from exc
        _fault("slurm.after_sbatch")
        job_ids.append(job)
        now = runs.utcnow()
        for pos, i in enumerate(rng):
            t = tasks[i]
            ids = t.record.executor_ids
            t.record.state = "pending"
            ids["submitted_at"] = now
            if array:
                ids.update(job_id=f"{job}_{pos}", array_job_id=job, array_task_id=pos, array_size=len(rng),
                           slurm_output=str(layout.sweep_dir(str(sweep_id)) / f"slurm-{job}_{pos}.out"))
            else:
                ids.update(job_id=job, slurm_output=str(t.paths.dir / f"slurm-{job}.out"))
        if array and sweep_record is not None:
            for sub in sweep_record["submissions"]:
                if sub["job_name"] == job_name:
                    sub.update(array_job_id=job, submitted_at=now, held=hold, after=after)
            sweep_mod.write_sweep(layout, sweep_record)
        # the array job id is now durable in the sweep record (and the job name), from which
        # reconcile re-attaches it: the task records need not be fsynced one by one again
        _write_many([(tasks[i].paths, tasks[i].record) for i in rng], strict=True, durable=not array)
    return Submission(exp_name, sweep_id, [(t.paths, t.record) for t in tasks], job_ids,
                      [r[3] for r in renders], [r[2] for r in renders])


def submit_runs(project: Any, exp: Any, image: Any, param_sets: Sequence[Mapping[str, str]],
                resources: SlurmResources, *, args: Sequence[str] | None = None, sweep: bool | None = None,
                arch: str | None = None, hold: bool = False, dry_run: bool = False, allow_binds: bool = False,
                cmdline: Sequence[str] | None = None,
                payload_env: Callable[[Sequence[RunPaths], str | None], Mapping[str, Mapping[str, str]]] | None = None,
                env_probe: tuple[str, int] | None = None) -> Submission:
    """Submit one run per parameter set: one job for a single run, ONE job array for a sweep.

    ``payload_env(run_paths, sweep_id)`` may add container environment per run id once
    the run folders exist (tracking); with ``env_probe`` (host, port) each job gives its
    payload those variables only if that server answers from the compute node.

    Every value is checked before anything is created; every run record exists (state
    ``submitting``) before ``sbatch`` runs, then holds its job id (state ``pending``).
    ``image`` is an ImageInfo (or a path) already built on this login node.
    """
    from hpcexp.core.config import host_arch
    from hpcexp.execute import sweep as sweep_mod
    from hpcexp.execute.slurm import sbatch
    from hpcexp.runtime import launch

    layout = Layout(project)
    check_resources(resources)
    if not dry_run:
        check_against_cluster(layout, resources)
    for arg in resources.sbatch_args:
        sbatch.check_value("--sbatch-arg", arg)
    if not param_sets:
        raise UsageError("nothing to submit: the sweep has no parameter sets")
    for ps in param_sets:
        for k, v in ps.items():
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$", k):
                raise UsageError(f"invalid parameter name {k!r}")
            sbatch.check_value(f"parameter {k}", v)
    for k, v in exp.params.items():
        sbatch.check_value(f"hpcexp.yaml parameter {k}", v)
    for a in (args or ()):
        sbatch.check_value("argument", a)
    info = _image_fields(image)
    image_path = Path(info["path"])
    if not dry_run and not image_path.is_file():
        raise UsageError(f"image {image_path} does not exist", hint=f"build it with `hpcexp build {exp.name}`")
    is_array = bool(sweep) if sweep is not None else len(param_sets) > 1
    program, version, prefix = _runtime_program()
    commit, dirty = runs.git_state(project.root) if not dry_run else (None, None)
    sweep_id = (sweep_mod.new_sweep_id() if dry_run else sweep_mod.allocate_sweep(layout)) if is_array else None
    res_dict = resources_dict(resources)
    hpcexp_argv = list(cmdline) if cmdline is not None else None
    host, user = hostinfo.hostname(), hostinfo.user()

    tasks: list[_Task] = []
    allocated: list[RunPaths] = []
    try:
        if dry_run:
            allocated = [layout.run(exp.name, runs.new_run_id()) for _ in param_sets]
        elif len(param_sets) < 16:
            allocated = [runs.allocate_run(layout, exp.name) for _ in param_sets]
        else:
            # exclusive mkdirs are independent syscalls: overlap them (a sweep makes a thousand)
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=8) as pool:
                futures = [pool.submit(runs.allocate_run, layout, exp.name) for _ in param_sets]
                for fut in futures:
                    try:
                        allocated.append(fut.result())
                    except HpcexpError:
                        pass
            if len(allocated) != len(param_sets):
                futures[[f.exception() is not None for f in futures].index(True)].result()
        extra_envs = payload_env(allocated, sweep_id) if (payload_env is not None and not dry_run) else {}
        for index, ps in enumerate(param_sets):
            paths = allocated[index]
            run_id = paths.dir.name
            plan = launch.plan(project, exp, image_path, paths, run_id=run_id, params=ps, args=args,
                               image_workdir=info.get("workdir"), image_cmd=info.get("cmd"),
                               image_entrypoint=info.get("entrypoint"), allow_binds=allow_binds, program=program,
                               extra_env=extra_envs.get(run_id))
            merged = dict(exp.params)
            merged.update(ps)
            rec = runs.RunRecord(
                experiment=exp.name, run_id=run_id, state="submitting", executor="slurm",
                arch=arch or host_arch(), params=merged, args=list(args if args is not None else exp.args),
                command=list(plan.argv), image=str(image_path), image_sha256=info.get("sha256"),
                input_hash=info.get("input_hash"), recipe_sha256=info.get("recipe_sha256"),
                apptainer_version=info.get("apptainer_version") or version, git_commit=commit, git_dirty=dirty,
                sweep_id=sweep_id, task_index=index if is_array else None, resources=dict(res_dict),
                executor_ids={"base_attempt": 1}, host=host, user=user,
            )
            rec.extra = {"container_env": dict(plan.container_env), "pwd": plan.pwd, "runtime": program}
            if info.get("source_ref"):
                rec.extra["image_ref"] = info["source_ref"]   # the registry digest of the image
            if hpcexp_argv is not None:
                rec.extra["hpcexp_argv"] = hpcexp_argv
            # results/ and events/ are made by the job script (mkdir -p): a thousand mkdirs here
            # would cost more than the whole sbatch call on a busy shared file system
            spec = sbatch.TaskSpec(run_id=run_id, run_dir=paths.dir, argv=tuple(plan.argv),
                                   container_env=dict(plan.container_env), attempt=1, env_prefix=prefix)
            tasks.append(_Task(paths, rec, spec))
    except BaseException:
        if not dry_run:  # nothing was submitted: leave no half-made runs behind
            import shutil

            for p in allocated:
                shutil.rmtree(p.dir, ignore_errors=True)
            if sweep_id:
                shutil.rmtree(layout.sweep_dir(sweep_id), ignore_errors=True)
        raise
    sweep_record = None
    if is_array:
        sweep_record = {"sweep_id": sweep_id, "experiment": exp.name, "created_at": runs.utcnow(),
                        "size": len(tasks), "params": sorted({k for ps in param_sets for k in ps}),
                        "resources": res_dict, "image": str(image_path), "submissions": []}
    probe = None
    if env_probe is not None and extra_envs:
        names = sorted({k for env in extra_envs.values() for k in env})
        probe = (env_probe[0], int(env_probe[1]), tuple(names))
    return _submit_tasks(layout, exp.name, image_path, tasks, resources, sweep_id=sweep_id, array=is_array,
                         hold=hold, dry_run=dry_run, label_hint=f"; rebuild with `hpcexp build {exp.name}`",
                         sweep_record=sweep_record, fresh=True, env_probe=probe)


def _discard_unsubmitted(layout: Layout, tasks: Sequence[_Task], sweep_id: str | None) -> None:
    """Remove the run folders (and sweep record) of a submission sbatch refused outright."""
    import shutil

    for t in tasks:
        shutil.rmtree(t.paths.dir, ignore_errors=True)
    if sweep_id:
        shutil.rmtree(layout.sweep_dir(sweep_id), ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(layout.sweep(sweep_id))
    # and the folders made for them, when nothing else is in there (rmdir refuses otherwise)
    for folder in {t.paths.dir.parent for t in tasks} | ({layout.sweeps_dir()} if sweep_id else set()):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def resubmit_runs(project: Any, sweep_id: str, chosen: Sequence[tuple[RunPaths, runs.RunRecord]], *,
                  hold: bool = False, dry_run: bool = False, resources: SlurmResources | None = None
                  ) -> Submission:
    """Submit these runs of a sweep again as one new array: same run records and folders, a
    new attempt each (the previous attempt is kept in ``attempts`` and its logs stay)."""
    from hpcexp.execute import sweep as sweep_mod
    from hpcexp.execute.slurm import sbatch

    layout = Layout(project)
    record = sweep_mod.read_sweep(layout, sweep_id)
    exp_name = str(record.get("experiment") or chosen[0][1].experiment)
    image = Path(chosen[0][1].image or record.get("image") or "")
    if not image.is_file():
        raise UsageError(f"image {image} of sweep {sweep_id} no longer exists",
                         hint=f"rebuild it with `hpcexp build {exp_name}` (same inputs give the same image) "
                              "and resubmit")
    _, _, prefix = _runtime_program()
    base = dict(record.get("resources") or {})
    res = SlurmResources(partition=base.get("partition"), time=base.get("time"), cpus=base.get("cpus"),
                         mem=base.get("mem"), gpus=base.get("gpus"), account=base.get("account"),
                         qos=base.get("qos"), max_parallel=base.get("max_parallel"),
                         sbatch_args=tuple(base.get("sbatch_args") or ()))
    if resources is not None:
        res = res.merged(resources)
    check_resources(res)
    tasks: list[_Task] = []
    for paths, rec in chosen:
        rec = rec.copy()
        env = rec.extra.get("container_env")
        if not isinstance(env, dict) or not rec.command:
            raise UsageError(f"run {rec.run_id} has no stored command to resubmit (made by an older hpcexp?)")
        rec.attempts.append({"attempt": rec.attempt, "job_id": rec.executor_ids.get("job_id"),
                             "state": rec.state, "started_at": rec.started_at, "ended_at": rec.ended_at,
                             "exit_code": rec.exit_code, "reason": rec.reason,
                             "slurm_state": rec.executor_ids.get("slurm_state"),
                             "slurm_output": rec.executor_ids.get("slurm_output")})
        rec.attempt += 1
        rec.state = "submitting"
        rec.started_at = rec.ended_at = None
        rec.exit_code = rec.signal = None
        rec.reason = rec.launch_error = None
        rec.executor_ids = {"base_attempt": rec.attempt, "resubmitted_at": runs.utcnow()}
        rec.resources = resources_dict(res)
        if not dry_run and paths.script.exists():
            old = paths.dir / f"job.attempt-{rec.attempt - 1}.sbatch"
            if not old.exists():
                os.replace(paths.script, old)
        spec = sbatch.TaskSpec(run_id=rec.run_id, run_dir=paths.dir, argv=tuple(rec.command),
                               container_env={str(k): str(v) for k, v in env.items()}, attempt=rec.attempt,
                               env_prefix=prefix)
        tasks.append(_Task(paths, rec, spec))
    first = len(record.get("submissions") or [])
    return _submit_tasks(layout, exp_name, image, tasks, res, sweep_id=sweep_id, array=True, hold=hold,
                         dry_run=dry_run, label_hint=f"; rebuild with `hpcexp build {exp_name}`",
                         first_chunk=first, sweep_record=record,
                         env_probe=_tracking_probe([t.spec.container_env for t in tasks]))


def _tracking_probe(envs: Sequence[Mapping[str, str]]) -> tuple[str, int, tuple[str, ...]] | None:
    """A resubmitted task keeps the MLflow variables of its first submission: its job checks
    again, at its start, that the server answers from the node (see sbatch.env_if_reachable)."""
    from urllib.parse import urlsplit

    for env in envs:
        uri = env.get("MLFLOW_TRACKING_URI")
        if uri:
            parts = urlsplit(uri)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            names = tuple(sorted(k for k in env if k.startswith("MLFLOW_")))
            return (parts.hostname or "", port, names) if parts.hostname else None
    return None


# --------------------------------------------------------------------------------------
# Waiting for submitted runs (submit --wait)
# --------------------------------------------------------------------------------------

def settled(rec: runs.RunRecord) -> bool:
    """Nothing more will happen to this run without a new attempt: terminal, or ``unknown``
    (the job left every queue and no evidence came back; waiting longer would be forever)."""
    return rec.terminal or rec.state == "unknown"


def wait(layout: Layout, run_dirs: Sequence[Path], *, poll: float = 2.0,
         on_change: Any = None, sleep: Any = time.sleep) -> list[runs.RunRecord]:
    """Block until every run in ``run_dirs`` has settled; return their final records.

    Each round is one :func:`hpcexp.execute.base.reconcile` over all of them, that is one squeue
    call (and at most one sacct/scontrol call), whatever the number of tasks, so waiting on
    a large sweep does not load the controller. ``on_change(records)`` is called whenever
    the set of states changes (to print progress).
    """
    last: tuple[str, ...] | None = None
    while True:
        items = [(RunPaths(d), runs.read_record(RunPaths(d))) for d in run_dirs]
        items = base.reconcile(layout, items)
        records = [rec for _, rec in items]
        states = tuple(sorted(rec.state for rec in records))
        if states != last and on_change is not None:
            on_change(records)
        last = states
        if all(settled(rec) for rec in records):
            return records
        sleep(poll)


class SlurmExecutor:
    """The Slurm executor as an :class:`hpcexp.execute.base.Executor`: one job, or one job array."""

    name = "slurm"
    poll_interval = 10.0
    OPTIONS = frozenset({"resources", "sweep", "hold", "dry_run"})

    def launch(self, request: LaunchRequest) -> Submission:
        unknown = sorted(set(request.options) - self.OPTIONS)
        if unknown:
            raise UsageError(f"the Slurm executor has no option {unknown[0]!r}")
        opts = dict(request.options)
        resources = opts.pop("resources", None) or request.experiment.slurm
        return submit_runs(request.project, request.experiment, request.image, list(request.param_sets),
                           resources, args=request.args, arch=request.arch, allow_binds=request.allow_binds,
                           cmdline=request.cmdline, **opts)

    def reconcile(self, layout: Layout, items: Sequence[tuple[RunPaths, runs.RunRecord]]
                  ) -> list[tuple[RunPaths, runs.RunRecord]]:
        return reconcile(layout, items)

    def stop(self, layout: Layout, items: Sequence[tuple[RunPaths, runs.RunRecord]], *,
             grace: float | None = None) -> list[tuple[RunPaths, runs.RunRecord]]:
        # Slurm applies its own KillWait between SIGTERM and SIGKILL; grace is not ours to set
        return stop(layout, items)

    def log_files(self, paths: RunPaths, rec: runs.RunRecord) -> list[LogFile]:
        return [LogFile("stdout", paths.attempt_stdout(rec.attempt)),
                LogFile("stderr", paths.attempt_stderr(rec.attempt))]

    def doctor_checks(self) -> list[tuple[str, str, str, str]]:
        return doctor_checks()


EXECUTOR = SlurmExecutor()
