"""The run table and damaged-record warnings, printed: what the run commands (``status``,
``runs``, ``stop``) and the Slurm commands (``submit --wait``) show on a terminal.

The rows and lines themselves come from :mod:`hpcexp.app.views` (the dashboard shows the
same); this module only prints them, which is why it is separate from both command
modules: neither imports the other. Imported inside the commands (with the application
layer), never by ``hpcexp --help``.
"""

from __future__ import annotations

from typing import Sequence

from hpcexp.app.views import RUN_HEADERS, run_rows
from hpcexp.cli.common import echo_table, warn
from hpcexp.core.layout import RunPaths
from hpcexp.core.runs import RunRecord

__all__ = ["echo_runs", "warn_damaged"]

Item = tuple[RunPaths, RunRecord]


def warn_damaged(items: Sequence[Item]) -> None:
    """One warning line per damaged record (the table shows those runs as `unknown`)."""
    from hpcexp.app.runs import damaged

    for line in damaged(items):
        warn(line)


def echo_runs(items: Sequence[Item]) -> None:
    echo_table(run_rows(items), RUN_HEADERS)
