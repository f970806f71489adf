"""How runs are shown to people: the run table, one run's details, ``--json`` rows.

Shared by the run commands (``status``, ``runs``, ``stop``) and the Slurm commands
(``submit --wait``), which is why it is a module of its own: neither imports the other.
Imported inside the commands (with the application layer), never by ``hpcexp --help``.
"""

from __future__ import annotations

import shlex
import time
from typing import Any, Sequence

from hpcexp.app.runs import STATE_ORDER, summarize
from hpcexp.cli.common import echo_table, human_age, warn
from hpcexp.core.layout import RunPaths
from hpcexp.core.runs import RunRecord, parse_time

__all__ = ["RUN_HEADERS", "STATE_ORDER", "details", "echo_runs", "exit_cell", "format_params", "json_rows",
           "run_rows", "summarize", "warn_damaged"]

Item = tuple[RunPaths, RunRecord]
RUN_HEADERS = ("RUN_ID", "EXPERIMENT", "STATE", "AGE", "DURATION", "EXIT", "PARAMS")


def _cell(value: str, limit: int = 24) -> str:
    """A parameter value made safe for one table cell: control characters escaped, long values cut."""
    out = []
    for ch in value:
        if ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    text = "".join(out)
    if " " in text or text == "":
        text = repr(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_params(params: dict[str, str], limit: int = 60) -> str:
    text = " ".join(f"{k}={_cell(str(v))}" for k, v in sorted(params.items()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def exit_cell(rec: RunRecord) -> str:
    if rec.launch_error:
        return "launch"
    if rec.exit_code is not None:
        return str(rec.exit_code)
    if rec.signal is not None:
        return f"sig{rec.signal}"
    return "-"


def run_rows(items: Sequence[Item]) -> list[list[str]]:
    """Rows of the run table: RUN_ID, EXPERIMENT, STATE, AGE, DURATION, EXIT, PARAMS."""
    now = time.time()
    rows = []
    for _, rec in items:
        created = parse_time(rec.created_at)
        rows.append([rec.run_id, rec.experiment, rec.state, human_age(None if created is None else now - created),
                     human_age(rec.duration()), exit_cell(rec), format_params(rec.params)])
    return rows


def json_rows(items: Sequence[Item]) -> list[dict[str, Any]]:
    """Records for ``--json``: every row has the same keys; ``error`` says why a record is
    damaged (path and reason) and is null otherwise."""
    return [{**rec.to_dict(), "dir": str(paths.dir), "error": rec.error} for paths, rec in items]


def warn_damaged(items: Sequence[Item]) -> None:
    """One warning line per damaged record (the table shows those runs as `unknown`)."""
    from hpcexp.app.runs import damaged

    for line in damaged(items):
        warn(line)


def echo_runs(items: Sequence[Item]) -> None:
    echo_table(run_rows(items), RUN_HEADERS)


def details(paths: RunPaths, rec: RunRecord) -> list[str]:
    """key: value lines describing one run (status RUN)."""
    lines = [f"run: {rec.run_id}", f"experiment: {rec.experiment}", f"state: {rec.state}"]
    if rec.reason:
        lines.append(f"reason: {rec.reason}")
    if rec.launch_error:
        lines.append(f"launch_error: {rec.launch_error}")
    lines += [
        f"exit_code: {'-' if rec.exit_code is None else rec.exit_code}",
        f"signal: {'-' if rec.signal is None else rec.signal}",
        f"created: {rec.created_at}",
        f"started: {rec.started_at or '-'}",
        f"ended: {rec.ended_at or '-'}",
        f"duration: {human_age(rec.duration())}",
        f"executor: {rec.executor} {' '.join(f'{k}={v}' for k, v in sorted(rec.executor_ids.items()))}".rstrip(),
        f"host: {rec.host}",
        f"user: {rec.user}",
        f"params: {format_params(rec.params, limit=10_000) or '-'}",
        f"image: {rec.image or '-'}",
        f"image_sha256: {rec.image_sha256 or '-'}",
        f"recipe_sha256: {rec.recipe_sha256 or '-'}",
        f"git: {rec.git_commit or '-'}{' (dirty)' if rec.git_dirty else ''}",
        f"versions: hpcexp {rec.hpcexp_version}, apptainer {rec.apptainer_version or '-'}",
        f"command: {shlex.join(rec.command) if rec.command else '-'}",
        f"folder: {paths.dir}",
        f"stdout: {paths.stdout}",
        f"stderr: {paths.stderr}",
        f"results: {paths.results}",
    ]
    return lines
