"""Readers of what Slurm prints and of the names of the markers a job writes. Pure.

Owns :class:`JobInfo` (what one scheduler source says about one job or array task) and
one parser per output: ``sbatch --parsable``, ``squeue`` (in :data:`.commands.SQUEUE_FORMAT`),
``scontrol show job -o``, ``sacct -P`` (in :data:`.commands.SACCT_FIELDS`), ``scontrol show
config``; and the shape of the job's own markers (``events/attempt-N.started|exit``).
Nothing here runs a command or reads a file: every function is tested against golden
scheduler output (``tests/golden/sbatch/scheduler/``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from hpcexp.errors import SchedulerError

if TYPE_CHECKING:  # pragma: no cover
    from hpcexp.infra import process


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
    earlier: tuple[str, ...] = ()  # sacct -D: the states of the job's earlier attempts, oldest first


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
    """sacct -P output: allocation lines give the state, ``.batch`` steps give MaxRSS.

    With ``-D`` a requeued job has one allocation line per attempt, oldest first: the last
    one is the job now, the states before it (PREEMPTED, NODE_FAIL, REQUEUED...) go to
    ``earlier`` so that a closed attempt can say how Slurm ended it."""
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
            prev = out.get(one)
            out[one] = JobInfo(one, words[0] if words else "UNKNOWN", "sacct", name=name,
                               detail=" ".join(words[1:]), exit_code=code, exit_signal=sig, derived_exit=derived,
                               elapsed=elapsed or None, start=_none(start), end=_none(end), node=_none(node),
                               earlier=(*prev.earlier, prev.state) if prev else ())
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


MARKER_RE = re.compile(r"^attempt-(\d+)\.(started|exit|services)$")   # services: docs/services.md


def marker_name(name: str) -> tuple[int, str] | None:
    """``attempt-3.exit`` -> (3, "exit"); None for a file in ``events/`` that is no marker."""
    m = MARKER_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None
