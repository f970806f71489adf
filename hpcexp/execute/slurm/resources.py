"""Slurm resources: checking them, turning them into sbatch options, and checking them
against the cluster before anything is created.

Owns the rules for resources given on the command line (the same hpcexp.yaml uses),
their ``#SBATCH`` option names, the form a run record keeps them in, the mapping from
sbatch's own refusals to the option the user set, and the cheap pre-flight check of a
partition, account or QOS (one ``sinfo``; ``sacctmgr`` only with accounting storage).
"""

from __future__ import annotations

import re
from typing import Any

from hpcexp.core.config import MEM_RE, TIME_RE, SlurmResources
from hpcexp.core.layout import Layout
from hpcexp.errors import HpcexpError, SchedulerError, UsageError, shown
from hpcexp.execute.slurm.facts import cached_facts
from hpcexp.infra import process

WORD_RE = re.compile(r"^[A-Za-z0-9_.,:@+=-]+$")
GPUS_RE = re.compile(r"^([A-Za-z0-9_.-]+:)?\d+$")


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

