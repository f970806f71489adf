"""A sweep's durable tables: the record of each task until the task's own ``run.json`` exists.

Why: submitting a 1,000-task sweep used to make 1,000 run folders and 1,000 ``run.json``
files before ``sbatch``; on this kind of file system the first file of a new folder costs
more than the whole ``sbatch`` call, and the folders are empty until the jobs start. Now
``submit`` writes one fsynced table per array part (``runs/.sweeps/SWEEP_ID/array-K.records.jsonl``,
every task's record as first written) and the fsynced sweep record naming every task. A
task's folder is made by its own job when it starts (``mkdir -p``), and its ``run.json``
by the first writer of a new state (``status`` seeing it run, ``stop``, ``check --repair``).
Until then the table is the record (docs/records.md).

Readers find a task's record from its run id alone: a task id is
``SWEEP_TIME.mmm-SWEEP_RAND-INDEX`` where the sweep id is ``sweep-SWEEP_TIME-SWEEP_RAND``,
which exclusive ``mkdir`` made unique, so the id names its sweep and no index or search is
needed (and two sweeps can never make the same task id).

Only sweeps whose ids have this form are read here; tasks of older sweeps all have a
``run.json`` of their own.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from hpcexp.errors import HpcexpError

SWEEP_ID_RE = re.compile(r"^sweep-(\d{8}-\d{6})-([0-9a-f]{6})$")
TASK_ID_RE = re.compile(r"^(\d{8}-\d{6})\.\d{3}-([0-9a-f]{6})-(\d+)$")
MAX_SWEEP_RECORD = 64 << 20
MAX_TABLE = 1 << 30


def task_run_ids(sweep_id: str, count: int, *, now: _dt.datetime | None = None) -> list[str]:
    """The run ids of a new sweep's ``count`` tasks, in task order.

    They sort with the other runs by time (the sweep's second, and the milliseconds of now
    when still in that second) and carry the sweep's random part and the task index."""
    m = SWEEP_ID_RE.match(sweep_id)
    if m is None:
        raise ValueError(f"not a sweep id: {sweep_id!r}")
    stamp, rand = m.groups()
    now = now or _dt.datetime.now(_dt.timezone.utc)
    ms = now.microsecond // 1000 if f"{now:%Y%m%d-%H%M%S}" == stamp else 999
    width = max(4, len(str(max(0, count - 1))))
    head = f"{stamp}.{ms:03d}-{rand}-"
    return [f"{head}{i:0{width}d}" for i in range(count)]


def sweep_of(run_id: str) -> str | None:
    """The sweep id a task's run id names, or None for any other run id."""
    m = TASK_ID_RE.match(run_id)
    return f"sweep-{m.group(1)}-{m.group(2)}" if m else None


@dataclass
class SweepIndex:
    """What a sweep record says about its tasks: their experiment, ids and tables, and its
    array parts (``submissions``: job name, array job id, submission time...)."""

    sweep_id: str
    experiment: str
    run_ids: list[str]
    tables: list[Path]
    submissions: list[dict[str, Any]] = field(default_factory=list)
    _records: dict[str, dict[str, Any]] | None = field(default=None, repr=False)

    def records(self) -> dict[str, dict[str, Any]]:
        """Every task's record as its tables hold it (read once; a later part wins: a task
        submitted again is in the newer part's table)."""
        if self._records is None:
            self._records = read_tables(self.tables)
        return self._records


_CACHE: dict[str, tuple[tuple[int, int, int], SweepIndex | None]] = {}


def index(sweeps_dir: Path, sweep_id: str) -> SweepIndex | None:
    """The sweep record's index (cached while the record's file is unchanged), or None when
    the record is missing, unreadable or not a sweep's."""
    from hpcexp.infra.safeio import load_json, read_regular

    path = sweeps_dir / f"{sweep_id}.json"
    try:
        st = os.stat(path)
    except OSError:
        return _from_tables(sweeps_dir, sweep_id)
    key = (st.st_ino, st.st_mtime_ns, st.st_size)
    hit = _CACHE.get(str(path))
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        data = load_json(read_regular(path, max_bytes=MAX_SWEEP_RECORD, what="sweep record"))
    except (OSError, ValueError, HpcexpError):
        data = None
    idx = None
    if isinstance(data, dict) and isinstance(data.get("experiment"), str):
        ids: dict[str, None] = {}
        tables: list[Path] = []
        subs = [sub for sub in data.get("submissions") or [] if isinstance(sub, dict)]
        for sub in subs:
            for rid in sub.get("run_ids") or []:
                if isinstance(rid, str):
                    ids[rid] = None
            if isinstance(sub.get("records"), str):
                tables.append(sweeps_dir / sweep_id / Path(sub["records"]).name)
        idx = SweepIndex(sweep_id, data["experiment"], list(ids), tables, subs)
    else:
        idx = _from_tables(sweeps_dir, sweep_id)
    _CACHE[str(path)] = (key, idx)
    return idx


def _from_tables(sweeps_dir: Path, sweep_id: str) -> SweepIndex | None:
    """The index of a sweep whose sweep record is gone or damaged, from its tables alone
    (the records stay the truth: such a sweep's tasks are still found, in table order)."""
    if SWEEP_ID_RE.match(sweep_id) is None:
        return None
    try:
        with os.scandir(sweeps_dir / sweep_id) as it:
            names = [e.name for e in it if re.fullmatch(r"array-\d+\.records\.jsonl", e.name)]
    except OSError:
        return None
    tables = [sweeps_dir / sweep_id / n for n in sorted(names, key=lambda n: int(n.split("-")[1].split(".")[0]))]
    records = read_tables(tables)
    exps = {d.get("experiment") for d in records.values()}
    if len(exps) != 1 or not isinstance(next(iter(exps)), str):
        return None
    return SweepIndex(sweep_id, str(next(iter(exps))), list(records), tables, [], records)


def read_tables(tables: list[Path]) -> dict[str, dict[str, Any]]:
    """Records by run id from a sweep's tables (a table that cannot be read is passed over:
    its tasks are then only what their own ``run.json`` says)."""
    from hpcexp.infra.safeio import load_json, read_regular

    out: dict[str, dict[str, Any]] = {}
    for table in tables:
        try:
            raw = read_regular(table, max_bytes=MAX_TABLE, what="sweep table")
        except (OSError, HpcexpError):
            continue
        for line in raw.splitlines():
            try:
                data = load_json(line)
            except ValueError:
                continue  # a torn line cannot be: the table is published by rename
            if isinstance(data, dict) and isinstance(data.get("run_id"), str):
                out[data["run_id"]] = data
    return out


def task_record(run_dir: Path) -> dict[str, Any] | None:
    """The table's record of the sweep task whose folder is ``run_dir``
    (``runs/EXP/RUN_ID``), or None when that id is no sweep task of experiment EXP."""
    sweep_id = sweep_of(run_dir.name)
    if sweep_id is None:
        return None
    idx = index(run_dir.parent.parent / ".sweeps", sweep_id)
    if idx is None or idx.experiment != run_dir.parent.name:
        return None
    return idx.records().get(run_dir.name)


def _sweep_names(sweeps_dir: Path) -> list[tuple[str, str]]:
    """(sweep id, its YYYYMMDD-HHMMSS) of each sweep of the new form under ``runs/.sweeps``
    (by record, or by folder when the record is gone), sorted."""
    try:
        with os.scandir(sweeps_dir) as it:
            names = {e.name[:-5] if e.name.endswith(".json") else e.name for e in it}
    except OSError:
        return []
    found = ((n, SWEEP_ID_RE.match(n)) for n in names)
    return sorted((n, m.group(1)) for n, m in found if m is not None)


def sweeps_of(sweeps_dir: Path, experiment: str, *, since: str = "") -> Iterator[SweepIndex]:
    """The sweeps of ``experiment`` whose tasks may live in their tables alone, newest first;
    ``since`` (``YYYYMMDD-HHMMSS``) passes over older ones without reading them."""
    for sweep_id, stamp in reversed(_sweep_names(sweeps_dir)):
        if stamp < since:
            continue
        idx = index(sweeps_dir, sweep_id)
        if idx is not None and idx.experiment == experiment:
            yield idx


def by_experiment(sweeps_dir: Path) -> dict[str, list[SweepIndex]]:
    """Every sweep whose tasks may live in their tables alone, by experiment (one listing)."""
    out: dict[str, list[SweepIndex]] = {}
    for sweep_id, _ in _sweep_names(sweeps_dir):
        idx = index(sweeps_dir, sweep_id)
        if idx is not None:
            out.setdefault(idx.experiment, []).append(idx)
    return out


def prefix_sweeps(sweeps_dir: Path, prefix: str) -> Iterator[SweepIndex]:
    """The sweeps whose task ids could begin with ``prefix`` (a run-id prefix)."""
    for sweep_id, stamp in _sweep_names(sweeps_dir):
        if not (stamp.startswith(prefix) or prefix.startswith(stamp)):
            continue
        idx = index(sweeps_dir, sweep_id)
        if idx is not None:
            yield idx
