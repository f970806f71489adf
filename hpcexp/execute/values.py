"""The one rule for a value that reaches a batch job: no newline, no control character.

A parameter value, an argument, an ``--sbatch-arg``, a job name: each ends up in a job
script, where a newline would add a ``#SBATCH`` directive or a command (reliability test
6). The rule lives here, below both the sweep model (:mod:`hpcexp.execute.sweep`, which
refuses such a value before any run exists) and the job-script renderer
(:mod:`hpcexp.execute.slurm.sbatch`, which refuses it again where the text is made), so
that neither imports the other.
"""

from __future__ import annotations

import re

from hpcexp.errors import UsageError, shown

CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def check_value(what: str, value: str) -> str:
    """Refuse a value that holds a newline or another control character (it could add
    a ``#SBATCH`` directive or a command); return it unchanged otherwise."""
    m = CONTROL_RE.search(value)
    if m:
        raise UsageError(f"{what} {shown(value)} holds a control character ({m.group(0)!r}); "
                         "newlines and control characters cannot be passed to a Slurm job",
                         hint="remove it; values reach the payload byte for byte otherwise")
    return value
