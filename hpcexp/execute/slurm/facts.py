"""Facts about the Slurm cluster that bite, their cache, and the rows ``hpcexp doctor`` prints.

Owns :func:`facts` (one ``scontrol show config`` and one ``sinfo`` call: version,
MaxArraySize, MinJobAge, accounting, requeue, the default partition), the per-project
cache ``.hpcexp/cache/slurm-facts.json`` (facts for an hour, and whether ``sacct`` works,
which :mod:`.reconcile` consults), and :func:`doctor_checks`. A cache is never a reason to
fail: an unreadable one is empty, an unwritable one is skipped.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Mapping

from hpcexp.core.layout import Layout
from hpcexp.errors import EnvironmentProblem, HpcexpError
from hpcexp.execute.slurm.commands import run
from hpcexp.execute.slurm.parse import parse_config
from hpcexp.infra import atomic

log = logging.getLogger(__name__)

FACTS_TTL = 3600.0


def _cache_file(layout: Layout) -> Path:
    return layout.project.cache_dir / "slurm-facts.json"


def read_cache(layout: Layout) -> dict[str, Any]:
    try:
        data = json.loads(_cache_file(layout).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_cache(layout: Layout, data: Mapping[str, Any]) -> None:
    path = _cache_file(layout)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, dict(data))
    except (OSError, HpcexpError) as exc:  # a cache is never a reason to fail
        log.debug("could not write %s: %s", path, exc)


def facts() -> dict[str, Any]:
    """Slurm facts that bite: one ``scontrol show config`` and one ``sinfo`` call."""
    out: dict[str, Any] = {"available": False}
    try:
        res = run(["scontrol", "show", "config"])
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
        si = run(["sinfo", "-h", "-o", "%P|%l|%a"])
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
    cache = read_cache(layout)
    if cache.get("facts") and time.time() - float(cache.get("facts_checked", 0)) < FACTS_TTL:
        return dict(cache["facts"])
    f = facts()
    if f.get("available"):
        cache.update(facts=f, facts_checked=time.time(), min_job_age=f"{f.get('min_job_age')} s",
                     accounting=f.get("accounting"), accounting_checked=time.time())
        write_cache(layout, cache)
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

