"""How runs, sizes and ages are shown, as plain data and strings: the run table's rows,
one run's details, the ``--json`` row of a run, sizes and ages for people.

Both edges use it: the CLI (``status``, ``runs``, ``stop``, ``submit --wait``, ``images``)
prints these strings and the dashboard renders them in pages and returns the same rows
from its JSON API, so a run looks the same in both. Nothing here prints or reads the
terminal; it sits in the application layer, below both edges, which is why it is a
module of its own. Importing it costs the standard library and
:mod:`hpcexp.infra.jsonable` only (the run records are
imported when a function needs them).
"""

from __future__ import annotations

import shlex
import time
from typing import TYPE_CHECKING, Any, Sequence

from hpcexp.infra.jsonable import to_jsonable
from hpcexp.infra.units import human_size

if TYPE_CHECKING:  # pragma: no cover
    from hpcexp.core.layout import RunPaths
    from hpcexp.core.runs import RunRecord

__all__ = ["RUN_HEADERS", "age_of", "details", "exit_cell", "format_params", "human_age", "human_size",
           "json_rows", "run_rows", "to_jsonable"]

RUN_HEADERS = ("RUN_ID", "EXPERIMENT", "STATE", "AGE", "DURATION", "EXIT", "PARAMS")


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


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


def exit_cell(rec: "RunRecord") -> str:
    if rec.launch_error:
        return "launch"
    if rec.exit_code is not None:
        return str(rec.exit_code)
    if rec.signal is not None:
        return f"sig{rec.signal}"
    return "-"


def age_of(rec: "RunRecord", now: float | None = None) -> float | None:
    """Seconds since the run was created (None: no creation time)."""
    from hpcexp.core.runs import parse_time

    created = parse_time(rec.created_at)
    return None if created is None else (time.time() if now is None else now) - created


def run_rows(items: Sequence[tuple["RunPaths", "RunRecord"]]) -> list[list[str]]:
    """Rows of the run table: RUN_ID, EXPERIMENT, STATE, AGE, DURATION, EXIT, PARAMS."""
    now = time.time()
    return [[rec.run_id, rec.experiment, rec.state, human_age(age_of(rec, now)), human_age(rec.duration()),
             exit_cell(rec), format_params(rec.params)] for _, rec in items]


def json_rows(items: Sequence[tuple["RunPaths", "RunRecord"]]) -> list[dict[str, Any]]:
    """Records for ``--json``: every row has the same keys; ``error`` says why a record is
    damaged (path and reason) and is null otherwise."""
    return [{**rec.to_dict(copy=False), "dir": str(paths.dir), "error": rec.error} for paths, rec in items]


def details(paths: "RunPaths", rec: "RunRecord") -> list[str]:
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
        *slurm_lines(rec),
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
    services = rec.extra.get("services")
    if isinstance(services, list) and services:   # docs/services.md
        lines.append("services: " + ", ".join(_service_cell(s) for s in services if isinstance(s, dict))
                     + f" (logs in {paths.services})")
    return lines


def _service_cell(svc: dict[str, Any]) -> str:
    """``redis (port 24363, stopped)``: a service of a run as the details show it."""
    facts = [f"{k} {v}" for k, v in sorted((svc.get("port_numbers") or {}).items())]
    if svc.get("state"):
        facts.append(str(svc["state"]) + (f" with code {svc['exit_code']}" if svc.get("state") == "exited" else ""))
    return f"{svc.get('name', '?')}" + (f" ({', '.join(facts)})" if facts else "")
def slurm_lines(rec: "RunRecord") -> list[str]:
    """What Slurm last said about a run's job: its state and exit, and the elapsed time and
    peak memory (MaxRSS of the batch step) with the source they came from: ``sacct`` when
    the cluster keeps accounting, else ``scontrol`` (elapsed only; it has no MaxRSS)."""
    ids = rec.executor_ids
    if rec.executor != "slurm" or not ids.get("slurm_state"):
        return []
    source = ids.get("slurm_source") or "?"
    rss = ids.get("max_rss") or ("not reported by sacct" if source == "sacct" else f"not known to {source}")
    return [f"slurm: {ids['slurm_state']} (exit {ids.get('slurm_exit_code', '-')}, from {source})",
            f"elapsed: {ids.get('elapsed') or '-'}",
            f"max_rss: {rss}"]
