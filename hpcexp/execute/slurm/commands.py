"""Slurm's client commands: the argument lists hpcexp gives them, and the one way they run.

Owns every ``sbatch``/``squeue``/``sacct``/``scontrol``/``scancel`` argv the executor
builds (pure functions, so a test can compare them with what a shim recorded), the
formats asked of ``squeue`` and ``sacct`` (which :mod:`.parse` reads back), and the two
ways they run, both through :mod:`hpcexp.infra.process`: :func:`run` for queries and
``scancel``, and :func:`submit_script` for ``sbatch``, with its own timeout, telling a
refusal (with Slurm's reason) from no answer (:class:`SubmitUncertain`: the job may exist).
Kept apart from the parsers so that "what we ask" and "how we read the answer" can be
checked against each other in one glance at two short modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from hpcexp.errors import EnvironmentProblem, SchedulerError
from hpcexp.execute.slurm.parse import parse_sbatch
from hpcexp.infra import process

TIMEOUT = 60.0
SBATCH_TIMEOUT = 180.0       # sbatch may wait for a busy controller; a query may not
JOB_PREFIX = "hpcexp-"
SQUEUE_FORMAT = "%i|%A|%a|%T|%r|%j|%N|%M"
SACCT_FIELDS = "JobID,JobName,State,ExitCode,DerivedExitCode,Elapsed,MaxRSS,Start,End,NodeList"


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
    return ["sacct", "-n", "-P", "-D", "-o", SACCT_FIELDS, "-j", ",".join(sorted(set(job_ids), key=id_key))]


def scontrol_jobs_argv() -> list[str]:
    return ["scontrol", "show", "job", "-o"]


def scontrol_requeue_argv(job_id: str) -> list[str]:
    """Requeue a job (running, or ended but still known to slurmctld): same job id, next attempt."""
    return ["scontrol", "requeue", job_id]


def scancel_argv(job_ids: Sequence[str]) -> list[str]:
    return ["scancel", *job_ids]


def id_key(job_id: str) -> tuple[int, int]:
    base, _, task = job_id.partition("_")
    return (int(base) if base.isdigit() else 0, int(task) if task.isdigit() else -1)


def scancel_name_argv(job_name: str) -> list[str]:
    """Cancel by job name: for a record whose job id was never learnt."""
    return ["scancel", "--name", job_name]


def run(argv: Sequence[str]) -> process.Result:
    """Run one Slurm query or ``scancel`` (``sbatch`` has its own, longer timeout)."""
    return process.run(argv, timeout=TIMEOUT)


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
