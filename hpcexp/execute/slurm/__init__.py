"""The Slurm executor: one job, or one job array per sweep; state from the job's own markers.

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

The package, by noun (each module says what it owns):

  ``commands``   the argv of sbatch, squeue, sacct, scontrol, scancel, and how they run
  ``parse``      readers of their output and of the markers' names (pure)
  ``decide``     a record + markers + the scheduler's evidence -> the new state (pure)
  ``reconcile``  gathering that evidence in one call of each, writing back, ``stop``
  ``submit``     ``submit_runs``, ``resubmit_runs``, ``resubmit_sweep``, ``wait``
  ``sbatch``     the job-script renderer (pure)
  ``resources``  resource rules, sbatch options, the pre-flight check against the cluster
  ``facts``      the cluster's facts, their cache, ``doctor`` rows
  ``executor``   :class:`SlurmExecutor`, registered in :mod:`hpcexp.execute.base`

This module is the package's face: it re-exports what other packages and tests use, so
``from hpcexp.execute import slurm; slurm.decide(...)`` keeps working. A test that
monkeypatches a name must patch it in the module that looks it up (for example
``hpcexp.execute.slurm.commands.SBATCH_TIMEOUT``), not here.

Three modules share their name with the function they are for: ``decide``, ``reconcile``
and ``facts``. Here those names are the functions (as before the split), so
``import hpcexp.execute.slurm.reconcile as m`` and a monkeypatch target written as the
string ``"hpcexp.execute.slurm.reconcile.run"`` find the function, not the module; reach
the module with ``importlib.import_module("hpcexp.execute.slurm.reconcile")``.
"""

from __future__ import annotations

from hpcexp.execute.slurm.commands import (
    JOB_PREFIX,
    SACCT_FIELDS,
    SBATCH_TIMEOUT,
    SQUEUE_FORMAT,
    TIMEOUT,
    SubmitUncertain,
    array_spec,
    sacct_argv,
    sbatch_argv,
    scancel_argv,
    scontrol_jobs_argv,
    squeue_argv,
    submit_script,
)
from hpcexp.execute.slurm.decide import (
    KILLED_STATES,
    PENDING_STATES,
    QUEUE_REASONS,
    RUNNING_STATES,
    SUBMIT_GRACE,
    Evidence,
    decide,
    settled,
)
from hpcexp.execute.slurm.executor import EXECUTOR, SlurmExecutor
from hpcexp.execute.slurm.facts import FACTS_TTL, cached_facts, doctor_checks, facts
from hpcexp.execute.slurm.parse import (
    MARKER_RE,
    JobInfo,
    accounting_disabled,
    expand_indices,
    parse_config,
    parse_sacct,
    parse_sbatch,
    parse_scontrol_jobs,
    parse_squeue,
)
from hpcexp.execute.slurm.reconcile import _check_scancel as _check_scancel  # not public: tests/test_review_fixes.py
from hpcexp.execute.slurm.reconcile import gather, read_markers, reconcile, stop
from hpcexp.execute.slurm.resources import (
    check_against_cluster,
    check_resources,
    offending_option,
    resource_options,
    resources_dict,
)
from hpcexp.execute.slurm.submit import Submission, resubmit_runs, resubmit_sweep, submit_runs, wait

__all__ = [
    "EXECUTOR", "FACTS_TTL", "JOB_PREFIX", "KILLED_STATES", "MARKER_RE", "PENDING_STATES", "QUEUE_REASONS",
    "RUNNING_STATES", "SACCT_FIELDS", "SBATCH_TIMEOUT", "SQUEUE_FORMAT", "SUBMIT_GRACE", "TIMEOUT",
    "Evidence", "JobInfo", "SlurmExecutor", "Submission", "SubmitUncertain",
    "accounting_disabled", "array_spec", "cached_facts", "check_against_cluster", "check_resources", "decide",
    "doctor_checks", "expand_indices", "facts", "gather", "offending_option", "parse_config", "parse_sacct",
    "parse_sbatch", "parse_scontrol_jobs", "parse_squeue", "read_markers", "reconcile", "resource_options",
    "resources_dict", "resubmit_runs", "resubmit_sweep", "sacct_argv", "sbatch_argv", "scancel_argv",
    "scontrol_jobs_argv", "settled", "squeue_argv", "stop", "submit_runs", "submit_script", "wait",
]
