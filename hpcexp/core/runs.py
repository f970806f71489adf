"""Run records: the one contract shared by the local and the Slurm executor.

A run is a folder ``runs/NAME/RUN_ID/`` (see :mod:`hpcexp.core.layout`) holding ``run.json``.
The record is written before anything starts (invariant I1) and replaced atomically at
each state change (I2). ``logs``, ``status``, ``stop`` and ``archive`` read only this
record and the files beside it, never caring which executor ran the run.

States
    created      folder and record exist, nothing started yet
    submitting   (Slurm) sbatch is being called
    pending      (Slurm) queued
    running      the payload is running
    succeeded    exit code 0, proven by the executor (never assumed)
    failed       non-zero exit code, a killing signal, or a launch error
    cancelled    stopped by the user (hpcexp stop, Ctrl-C, scancel)
    timeout      (Slurm) hit its time limit
    out_of_memory(Slurm) killed for memory
    node_fail    (Slurm) the node failed
    lost         the owner is gone and no exit was recorded (evidence in ``reason``)
    unknown      no evidence either way yet (never shown as success)

Run ids sort by creation time and are allocated by exclusive ``mkdir`` of the run
folder (atomic on local file systems and NFS), never by max+1, so concurrent starts from
many users and hosts cannot collide (I8).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from hpcexp import __version__
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.errors import NotFound, StorageError, UsageError, shown
from hpcexp.infra import atomic
from hpcexp.infra import host as hostinfo

log = logging.getLogger(__name__)

SCHEMA = 1
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "timeout", "out_of_memory", "node_fail", "lost"})
ACTIVE = frozenset({"created", "submitting", "pending", "running"})
STATES = TERMINAL | ACTIVE | {"unknown"}


def utcnow() -> str:
    """Wall-clock time as ISO 8601 UTC with milliseconds (records are read by people and scripts)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: str | None) -> float | None:
    """Seconds since the epoch from a record time, or None."""
    if not value:
        return None
    try:
        return _dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass
class RunRecord:
    """Everything known about one run. Serialised as run.json (unknown keys are kept)."""

    experiment: str
    run_id: str
    state: str = "created"
    executor: str = "local"
    created_at: str = field(default_factory=utcnow)
    started_at: str | None = None
    ended_at: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    launch_error: str | None = None
    reason: str | None = None
    host: str = field(default_factory=hostinfo.hostname)
    user: str = field(default_factory=hostinfo.user)
    arch: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    image: str | None = None
    image_sha256: str | None = None
    input_hash: str | None = None
    recipe_sha256: str | None = None
    hpcexp_version: str = __version__
    apptainer_version: str | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None
    executor_ids: dict[str, Any] = field(default_factory=dict)
    sweep_id: str | None = None
    task_index: int | None = None
    attempt: int = 1
    attempts: list[dict[str, Any]] = field(default_factory=list)
    resources: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA
    # Not a field (never serialised): set on the stand-in for a damaged run.json, saying why
    # and where (``status --json`` shows it as ``error``); such a record is never written back.
    error = None
    # Not a field either: True for a sweep task's record read from its sweep's table (its
    # folder and run.json are made by the first write of a new state; core/sweeptable.py).
    from_table = False

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def duration(self) -> float | None:
        start = parse_time(self.started_at)
        if start is None:
            return None
        end = parse_time(self.ended_at)
        if end is None:
            end = _dt.datetime.now(_dt.timezone.utc).timestamp() if self.state == "running" else None
        return None if end is None else max(0.0, end - start)

    def to_dict(self, *, copy: bool = True) -> dict[str, Any]:
        """The record as run.json holds it; containers are copied one level deep (not with
        ``asdict``'s recursive copies: ``status --json`` turns thousands of records into rows),
        or not at all with ``copy=False`` (rows printed at once, never changed)."""
        if not copy:
            data = {f: getattr(self, f) for f in _FIELDS}
            data.update({k: v for k, v in self.extra.items() if k not in data})
            return data
        data = {}
        for f in _FIELDS:
            v = getattr(self, f)
            data[f] = dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v
        data.update({k: v for k, v in self.extra.items() if k not in data})
        return data

    def json_text(self) -> str:
        """run.json's text, as every writer writes it: one top-level key a line, sorted,
        each value by the C encoder (``indent=`` would run the pure-Python encoder, the
        larger part of writing a sweep's thousand records)."""
        return self.json_texts()[0]

    def json_texts(self) -> tuple[str, str]:
        """(run.json's text, the same record as one line), each value encoded once."""
        data = {f: getattr(self, f) for f in _FIELDS}
        data.update({k: v for k, v in self.extra.items() if k not in data})
        enc, text = _encode_value, _json_str
        parts = []
        for k in sorted(data):
            v = data[k]
            parts.append((text(k), text(v) if type(v) is str else "null" if v is None else enc(v)))
        return ("{\n" + ",\n".join(f"  {k}: {v}" for k, v in parts) + "\n}\n",
                "{" + ", ".join(f"{k}: {v}" for k, v in parts) + "}")

    def copy(self) -> "RunRecord":
        """An independent copy (containers copied one level deep, as executors mutate them)."""
        import copy as _copy

        new = _copy.copy(self)
        new.params = dict(self.params)
        new.args = list(self.args)
        new.command = list(self.command)
        new.executor_ids = dict(self.executor_ids)
        new.attempts = [dict(a) for a in self.attempts]
        new.resources = dict(self.resources)
        new.extra = dict(self.extra)
        return new

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known and k != "extra"}
        extra = {k: v for k, v in data.items() if k not in known}
        rec = cls(**kwargs)
        rec.extra = extra
        return rec


_FIELDS = tuple(f.name for f in fields(RunRecord) if f.name != "extra")
_json_str = json.encoder.encode_basestring  # type: ignore[attr-defined]


def _value_encoder() -> Any:
    """JSON of one value, sorted keys, UTF-8 kept: the C encoder made once (``json.dumps``
    and ``JSONEncoder.encode`` make a new one at every call, most of encoding a record's
    small values), or the pure-Python one where the C accelerator is missing."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - CPython has it
        return json.JSONEncoder(sort_keys=True, ensure_ascii=False).encode

    def fail(obj: Any) -> Any:
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")

    enc = make(None, fail, _json_str, None, ": ", ", ", True, False, True)
    return lambda value: "".join(enc(value, 0))


_encode_value = _value_encoder()


@contextlib.contextmanager
def bulk() -> Iterator[None]:
    """Hold back Python's cyclic garbage collector while thousands of records are made or
    read: records hold no cycles, and its full passes over a growing heap were a third of
    the time of reading a sweep. Nested uses and an already disabled collector are kept."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def new_run_id() -> str:
    """A fresh candidate id: UTC time to the millisecond, then 6 random hex digits."""
    now = _dt.datetime.now(_dt.timezone.utc)
    # Milliseconds keep ids of one second in start order; the random part keeps them unique.
    return f"{now:%Y%m%d-%H%M%S}.{now.microsecond // 1000:03d}-{secrets.token_hex(3)}"


def allocate_run(layout: Layout, experiment: str, *, attempts: int = 50) -> RunPaths:
    """Create a new, unique run folder by exclusive mkdir and return its paths."""
    parent = layout.experiment_runs(experiment)
    atomic.ensure_dir(parent)
    for _ in range(attempts):
        paths = layout.run(experiment, new_run_id())
        try:
            paths.dir.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise atomic.storage_error(exc, paths.dir) from exc
        return paths
    raise StorageError(f"could not allocate a unique run folder under {parent} after {attempts} tries")


def _refuse_damaged(paths: RunPaths, record: RunRecord) -> None:
    if record.error is not None:
        raise UsageError(f"run record {paths.record} is damaged ({record.error}); not replacing it",
                         hint="inspect or remove that run folder by hand")


def _ensure_folder(paths: RunPaths, record: RunRecord) -> None:
    """A sweep task read from its table gets its folder at its first write (its job may
    have made it already): only such records, so a run folder somebody removed is never
    made again by a stray write."""
    if record.from_table:
        atomic.ensure_dir(paths.dir)


def write_record(paths: RunPaths, record: RunRecord) -> None:
    """Atomically replace run.json (temp, fsync, rename, fsync dir)."""
    _refuse_damaged(paths, record)
    _ensure_folder(paths, record)
    atomic.write_text(paths.record, record.json_text())
    record.from_table = False


def mark(paths: RunPaths, rec: RunRecord, state: str, **changes: Any) -> RunRecord:
    """Move ``rec`` to ``state`` with the given field changes, stamp ``ended_at`` on a terminal
    state, and write it durably: the one way a process that owns a run records a transition."""
    rec.state = state
    for key, value in changes.items():
        setattr(rec, key, value)
    if state in TERMINAL and rec.ended_at is None:
        rec.ended_at = utcnow()
    write_record(paths, rec)
    return rec


def replace_record_nosync(paths: RunPaths, record: RunRecord) -> None:
    """Replace run.json atomically (temp + rename) WITHOUT fsync: readers still see a whole
    old or new version, but a machine crash may bring back the previous one.

    Only for records whose content is also stored durably elsewhere: a sweep's task records
    are in their part's fsynced table (:func:`create_records`), their job ids in the
    fsynced sweep record, from which :func:`sweep_runs` and ``reconcile`` redo them.
    """
    _refuse_damaged(paths, record)
    _ensure_folder(paths, record)
    atomic.write_text_nosync(paths.record, record.json_text())
    record.from_table = False


def write_records(items: Iterable[tuple[RunPaths, RunRecord]], *, threads: int = 8, durable: bool = True) -> None:
    """:func:`write_record` for many records, with the same guarantees, overlapping the fsyncs.

    For updates of many existing records (``status`` after a sweep ended: each changed
    record once); new records of a submission go through :func:`create_records` (one
    fsync). One after the other, each write waits for its own fsync; from a few threads the
    file system commits them together (ext4/xfs group their journal commits). A
    whole-file-system ``syncfs`` would be fewer calls but flushes every other user's dirty
    data too, which on a shared login node can take far longer.
    The first error is raised after all writes were attempted.
    """
    items = list(items)
    if len(items) < 16 or threads <= 1:
        for paths, rec in items:
            (write_record if durable else replace_record_nosync)(paths, rec)
        return
    from concurrent.futures import ThreadPoolExecutor

    def one(item: tuple[RunPaths, RunRecord]) -> BaseException | None:
        try:
            (write_record if durable else replace_record_nosync)(*item)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others
            return exc
        return None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        errors = [e for e in pool.map(one, items) if e is not None]
    if errors:
        raise errors[0]


def create_records(table: Path, items: Sequence[tuple[RunPaths, RunRecord]], *, run_json: bool = True) -> None:
    """Write the records of one batch (an array part before its ``sbatch``) with ONE
    fsync: their table, one record a line, published durably (temp, fsync, rename, fsync
    of the folder); with ``run_json``, then each ``run.json`` by temp and rename without fsync.

    A new sweep's tasks (``run_json=False``) have no folder yet: the table is their record
    until their first new state is written (:mod:`hpcexp.core.sweeptable`), so a reader
    finds every one of them as soon as this returns. Tasks submitted again have folders and
    a ``run.json`` saying how their last attempt ended, replaced here. After a machine
    crash the table still holds every record as written here. A thousand fsyncs cost
    seconds on a busy disk; one costs milliseconds (docs/records.md has the measurements)."""
    from hpcexp.infra import atomic as _atomic

    for paths, rec in items:
        _refuse_damaged(paths, rec)
    texts = [rec.json_texts() for _, rec in items]
    _atomic.write_text(table, "\n".join(line for _, line in texts) + "\n")
    if not run_json:
        for _, rec in items:
            rec.from_table = True
        return
    jobs = [(paths.record, text) for (paths, _), (text, _) in zip(items, texts)]
    if len(jobs) < 64:
        for final, text in jobs:
            atomic.write_text_nosync(final, text)
        return
    # The first file of a new folder costs the file system most (its directory block is
    # allocated then): from a few threads those costs overlap on several cores.
    from concurrent.futures import ThreadPoolExecutor

    def one(job: tuple[Path, str]) -> BaseException | None:
        try:
            atomic.write_text_nosync(*job)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others
            return exc
        return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        errors = [e for e in pool.map(one, jobs, chunksize=32) if e is not None]
    if errors:
        raise errors[0]


MAX_RECORD_BYTES = 4 << 20
"""A run.json larger than this is damaged (a sweep task's record is a few KiB)."""

_STR = (str,)
_OPT_STR = (str, type(None))
_OPT_INT = (int, type(None))
_SCHEMA_TYPES: dict[str, tuple[type, ...]] = {
    "experiment": _STR, "run_id": _STR, "state": _STR, "executor": _STR, "created_at": _STR, "host": _STR,
    "user": _STR, "hpcexp_version": _STR,
    **{k: _OPT_STR for k in ("started_at", "ended_at", "launch_error", "reason", "arch", "image", "image_sha256",
                             "input_hash", "recipe_sha256", "apptainer_version", "git_commit", "sweep_id")},
    "exit_code": _OPT_INT, "signal": _OPT_INT, "task_index": _OPT_INT, "git_dirty": (bool, type(None)),
    "attempt": (int,), "schema": (int,),
    "params": (dict,), "executor_ids": (dict,), "resources": (dict,),
    "args": (list,), "command": (list,), "attempts": (list,),
}
_ID_INTS = ("supervisor_pid", "supervisor_start", "launcher_pid", "launcher_start", "pgid", "array_size",
            "array_task_id")
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true/false", dict: "an object", list: "a list",
               type(None): "null"}


def _schema_problem(data: dict[str, Any], paths: RunPaths) -> str | None:
    """The first way ``data`` breaks run.json's schema (field types, ids matching the folder), or None."""
    for key, types in _SCHEMA_TYPES.items():
        if key not in data:
            continue
        value = data[key]
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
            return f"field {key!r} is {type(value).__name__}, not {want}"
    for key in ("experiment", "run_id"):
        if key not in data:
            return f"field {key!r} is missing"
    if data["run_id"] != paths.dir.name or data["experiment"] != paths.dir.parent.name:
        return "its experiment/run_id do not match the folder it is in"
    if data.get("state", "created") not in STATES:
        return f"unknown state {str(data['state'])[:40]!r}"
    for key in ("args", "command"):
        if not all(isinstance(v, str) for v in data.get(key, [])):
            return f"field {key!r} holds something other than strings"
    if not all(isinstance(v, dict) for v in data.get("attempts", [])):
        return "field 'attempts' holds something other than objects"
    if not all(isinstance(v, (str, int, float, bool)) for v in data.get("params", {}).values()):
        return "field 'params' holds something other than plain values"
    ids = data.get("executor_ids", {})
    for key in _ID_INTS:
        v = ids.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            return f"field 'executor_ids.{key}' is {type(v).__name__}, not an integer"
    for key in ("host", "job_id", "job_name", "boot_id"):
        v = ids.get(key)
        if v is not None and not isinstance(v, (str, int)):
            return f"field 'executor_ids.{key}' is {type(v).__name__}, not a string"
    return None


def damaged_record(paths: RunPaths, why: str) -> RunRecord:
    """The stand-in for a run whose run.json cannot be used: state ``unknown``, the reason
    and the path in ``reason`` and ``error``; never written back (``error`` is set)."""
    from hpcexp.infra.safeio import owner_name

    try:
        owner = owner_name(os.lstat(paths.record).st_uid)
    except OSError:
        owner = "?"
    msg = f"{paths.record}: {why}"
    rec = RunRecord(experiment=paths.dir.parent.name, run_id=paths.dir.name, state="unknown",
                    executor="unknown", host="?", user=owner, created_at="", hpcexp_version="?",
                    reason=f"run record is damaged or unreadable ({msg}); left in place for inspection")
    rec.error = msg
    return rec


def read_record(paths: RunPaths) -> RunRecord:
    """Read run.json. A record that cannot be used (unreadable, a symlink, a FIFO or other
    special file, too big, too deeply nested, not JSON, wrong field types) comes back as
    state ``unknown`` with the reason and the path (``error``), never as success and never
    as an exception, so one damaged run cannot hide the others. Nothing blocks: special
    files are refused before they are opened.

    A sweep task with no run.json yet is read from its sweep's table (``from_table``)."""
    try:
        return _read_file(paths)
    except NotFound:
        rec = table_record(paths)
        if rec is None:
            raise
        return rec


def _read_file(paths: RunPaths) -> RunRecord:
    """:func:`read_record` of run.json alone (NotFound when there is none)."""
    from hpcexp.infra.safeio import Unreadable, Unsafe, load_json, read_regular

    try:
        raw = read_regular(paths.record, max_bytes=MAX_RECORD_BYTES, what="run record")
    except FileNotFoundError:
        raise NotFound(f"no run record at {paths.record}") from None
    except (Unsafe, Unreadable) as exc:
        return damaged_record(paths, exc.why)
    except OSError as exc:
        return damaged_record(paths, f"cannot read it ({exc.strerror or exc})")
    try:
        data = load_json(raw)
    except ValueError as exc:
        return damaged_record(paths, str(exc))
    if not isinstance(data, dict):
        return damaged_record(paths, f"not a JSON object but {type(data).__name__}")
    problem = _schema_problem(data, paths)
    if problem:
        return damaged_record(paths, problem)
    try:
        return RunRecord.from_dict(data)
    except (TypeError, ValueError) as exc:  # pragma: no cover - the schema check comes first
        return damaged_record(paths, str(exc))


def table_record(paths: RunPaths, data: dict[str, Any] | None = None, *, fresh: bool = False
                 ) -> RunRecord | None:
    """The record of a sweep task that has no run.json yet, from its sweep's table (or
    ``data``, its line: ``fresh`` when decoded for this call alone, so not copied), marked
    ``from_table``; None when the table holds no usable one."""
    if data is None:
        from hpcexp.core import sweeptable

        data = sweeptable.task_record(paths.dir)
    if data is None or _schema_problem(data, paths):
        return None
    if os.path.islink(paths.dir):
        return damaged_record(paths, "the run folder is a symbolic link; not followed")
    rec = RunRecord.from_dict(data)
    if not fresh:
        rec = rec.copy()   # the table's dicts stay the cache's
    rec.from_table = True
    return rec


def iter_runs(layout: Layout, experiment: str | None = None) -> Iterator[tuple[RunPaths, RunRecord]]:
    """Every run of the project (or of one experiment), oldest first by id.

    Never follows a symlinked experiment or run folder (such a run is listed as damaged)
    and never fails as a whole: an unreadable folder is skipped with a warning, a damaged
    record is listed as ``unknown`` (see :func:`read_record`)."""
    root = layout.project.runs_dir
    if not root.is_dir():
        return

    def entries(folder: Path) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(folder) as it:
                return [e for e in it if not e.name.startswith(".")]
        except OSError as exc:
            log.warning("cannot read %s (%s); its runs are not listed", folder, exc.strerror or exc)
            return []

    if experiment:
        exp_dirs = [root / experiment]
    else:
        exp_dirs = sorted(Path(e.path) for e in entries(root) if e.is_dir(follow_symlinks=False))
    from hpcexp.core import sweeptable

    items: list[tuple[str, RunPaths, Any]] = []
    lazy = sweeptable.by_experiment(layout.sweeps_dir()) if exp_dirs else {}
    for exp_dir in exp_dirs:
        if not exp_dir.is_dir() or exp_dir.is_symlink():
            continue
        seen: set[str] = set()
        for entry in entries(exp_dir):
            paths = RunPaths(Path(entry.path))
            if entry.is_symlink():
                if entry.is_dir():
                    items.append((entry.name, paths, True))
                    seen.add(entry.name)
            elif entry.is_dir(follow_symlinks=False) and os.path.lexists(paths.record):
                items.append((entry.name, paths, False))
                seen.add(entry.name)
        # sweep tasks whose record is still their sweep's table alone
        for idx in lazy.get(exp_dir.name, ()):
            missing = [rid for rid in idx.run_ids if rid not in seen]
            if missing:
                table = idx.records()
                for rid in missing:
                    if rid in table:
                        items.append((rid, RunPaths(exp_dir / rid), table[rid]))
    for _, paths, how in sorted(items, key=lambda t: t[0]):
        if how is True:
            yield paths, damaged_record(paths, "the run folder is a symbolic link; not followed")
        elif how is False:
            yield paths, read_record(paths)
        else:
            rec = table_record(paths, how)
            if rec is not None:
                yield paths, rec


def _load(paths: RunPaths) -> RunRecord:
    """The record of one run folder found by name (a symlinked folder is not followed)."""
    if paths.dir.is_symlink():
        return damaged_record(paths, "the run folder is a symbolic link; not followed")
    return read_record(paths)


def _names(folder: Path) -> list[str]:
    """The entry names of a folder (no stat, no record read), hidden ones left out."""
    try:
        with os.scandir(folder) as it:
            return [e.name for e in it if not e.name.startswith(".")]
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot read %s (%s); its runs are not listed", folder, exc.strerror or exc)
        return []


def experiment_names(layout: Layout) -> list[str]:
    """Experiments with a runs folder (real folders only: a symlinked one is never followed)."""
    root = layout.project.runs_dir
    out = []
    for name in _names(root):
        p = root / name
        if p.is_dir() and not p.is_symlink():
            out.append(name)
    return sorted(out)


def latest_run(layout: Layout, experiment: str) -> tuple[RunPaths, RunRecord] | None:
    """The newest run of one experiment, reading only the newest records.

    Run ids begin with their creation time to the millisecond, so the folder names are the
    index: the newest names are read until one holds a usable record (a damaged or half-made
    one is passed over while a usable one exists, as the full scan ordered by ``created_at``
    did)."""
    folder = layout.experiment_runs(experiment)
    if folder.is_symlink():
        return None
    names = sorted(_names(folder), reverse=True)
    fallback: tuple[RunPaths, RunRecord] | None = None
    best: tuple[RunPaths, RunRecord] | None = None
    for name in names:
        paths = RunPaths(folder / name)
        if best is not None and name[:19] != best[1].run_id[:19]:
            break  # older than the second of the best one: nothing newer can follow
        if not os.path.lexists(paths.record):
            continue
        rec = _load(paths)
        if rec.error is not None:
            fallback = fallback or (paths, rec)
            continue
        if best is None or (rec.created_at, rec.run_id) > (best[1].created_at, best[1].run_id):
            best = (paths, rec)
    # a newer sweep whose tasks have no folder yet: its last task (sweep ids sort by time)
    from hpcexp.core import sweeptable

    for idx in sweeptable.sweeps_of(layout.sweeps_dir(), experiment, since=best[1].run_id[:15] if best else ""):
        if not idx.run_ids:
            continue
        paths = RunPaths(folder / idx.run_ids[-1])
        try:
            rec = _load(paths)
        except NotFound:
            continue
        if rec.error is None and (best is None or (rec.created_at, rec.run_id) > (best[1].created_at,
                                                                                 best[1].run_id)):
            best = (paths, rec)
        break
    return best or fallback


def sweep_runs(layout: Layout, sweep_id: str) -> list[tuple[RunPaths, RunRecord]] | None:
    """Every task of a sweep, in task order, reading only its own records.

    The sweep record (``runs/.sweeps/SWEEP_ID.json``, fsynced before any ``sbatch``) names
    every run id it submitted: it is the sweep's index. A task with no ``run.json`` (not
    started yet, or its run.json lost in a machine crash: those are written without fsync)
    is its record in its part's durable table (``from_table``: written at its next change).
    None when there is no usable sweep record (the caller falls back to reading the records).
    """
    from hpcexp.core import sweeptable

    idx = sweeptable.index(layout.sweeps_dir(), sweep_id)
    if idx is None:
        return None
    out: list[tuple[RunPaths, RunRecord]] = []
    missing: list[RunPaths] = []
    folder = layout.experiment_runs(idx.experiment)
    with bulk():
        for rid in idx.run_ids:
            paths = RunPaths(folder / rid)
            try:
                mode = os.lstat(paths.dir).st_mode
            except FileNotFoundError:
                missing.append(paths)     # a task whose job has not started: no folder yet
                continue
            except OSError:
                mode = 0
            if stat.S_ISLNK(mode):
                out.append((paths, damaged_record(paths, "the run folder is a symbolic link; not followed")))
                continue
            try:
                out.append((paths, _read_file(paths)))
            except NotFound:
                missing.append(paths)
        if missing and idx.tables:
            from hpcexp.core.sweeptable import read_tables

            table = read_tables(idx.tables)   # decoded for this call: its records need no copy
            for paths in missing:
                data = table.get(paths.dir.name)
                rec = table_record(paths, data, fresh=True) if data is not None else None
                if rec is not None:   # else never written before its sbatch: nothing of it can run
                    out.append((paths, rec))
    return sorted(out, key=lambda t: (t[1].task_index or 0, t[1].run_id))


def resolve(layout: Layout, spec: str) -> list[tuple[RunPaths, RunRecord]]:
    """Runs named by ``spec``: a run id, a unique prefix of one, an experiment name (its
    latest run), ``@last`` (the newest run of the project), or a sweep id (all its tasks).

    Each costs what it returns, not the size of the project: a run id or a sweep id is
    found by name (one stat per experiment; the sweep record), an experiment's latest run
    and ``@last`` read the newest records only, a prefix lists folder names and reads the
    records it matches (docs/records.md)."""
    from hpcexp.core.config import NAME_RE

    # Checked like a name before anything touches the disk: a ref is a run id, a sweep id,
    # an experiment name or a prefix of one, all names ([A-Za-z0-9][A-Za-z0-9._-]{0,63}).
    if spec != "@last" and not (isinstance(spec, str) and NAME_RE.match(spec)):
        raise UsageError(f"invalid run reference {shown(spec)}: a run id, a unique prefix of one, an experiment "
                         "name, a sweep id or @last (letters, digits, '.', '_', '-'; at most 64 characters)")
    exps = experiment_names(layout)
    if spec == "@last":
        newest = [r for r in (latest_run(layout, e) for e in exps) if r is not None]
        if not newest:
            raise NotFound("no runs yet in this project")
        return [max(newest, key=lambda t: (t[1].error is None, t[1].created_at, t[1].run_id))]
    exact = [layout.run(e, spec) for e in exps]
    exact = [p for p in exact if os.path.lexists(p.record) and (p.dir.is_dir() or p.dir.is_symlink())]
    if exact:
        return [(p, _load(p)) for p in exact]
    task = _table_task(layout, spec)
    if task is not None:
        return [task]
    if os.path.lexists(layout.sweep(spec)):
        tasks = sweep_runs(layout, spec)
        if tasks is None:  # a damaged sweep record: the records say which runs are its
            tasks = sorted([r for r in iter_runs(layout) if r[1].sweep_id == spec],
                           key=lambda t: (t[1].task_index or 0))
        if tasks:
            return tasks
    if spec in layout.project.experiments or spec in exps:
        mine = latest_run(layout, spec)
        if mine is None:
            raise NotFound(f"experiment {shown(spec)} has no runs yet")
        return [mine]
    ids = sorted((layout.run(e, n) for e in exps for n in _names(layout.experiment_runs(e)) if n.startswith(spec)),
                 key=lambda p: (p.dir.name, str(p.dir)))
    ids = [p for p in ids if os.path.lexists(p.record)]
    from hpcexp.core import sweeptable

    have = {p.dir.name for p in ids}
    for idx in sweeptable.prefix_sweeps(layout.sweeps_dir(), spec):
        ids += [layout.run(idx.experiment, rid) for rid in idx.run_ids if rid.startswith(spec) and rid not in have]
    sweeps = {n[:-5] for n in _names(layout.sweeps_dir()) if n.startswith(spec) and n.endswith(".json")}
    names = {p.dir.name for p in ids} | sweeps
    if len(names) == 1 and ids:
        return [(p, _load(p)) for p in ids]
    if len(names) == 1 and sweeps:
        return resolve(layout, next(iter(sweeps)))
    if not names:
        # Nothing by name: the records are the truth, so a sweep whose sweep record is gone
        # (or was never written, as by hand-made records) is still found, by reading them
        # all. Only a reference that names nothing else pays for this.
        tasks = [r for r in iter_runs(layout) if (r[1].sweep_id or "").startswith(spec)]
        sweeps = {r[1].sweep_id for r in tasks if r[1].sweep_id}
        if len(sweeps) == 1:
            return sorted(tasks, key=lambda t: (t[1].task_index or 0))
        names = sweeps
    if names:
        sample = ", ".join(sorted(names)[:5])
        raise UsageError(f"run reference {shown(spec)} is ambiguous: matches {sample}"
                         + (" ..." if len(names) > 5 else ""))
    raise NotFound(f"no run, sweep or experiment matches {shown(spec)}",
                   hint="`hpcexp runs` lists runs; use a run id, a unique prefix, an experiment name or @last")


def _table_task(layout: Layout, run_id: str) -> tuple[RunPaths, RunRecord] | None:
    """A sweep task found by its id alone (its id names its sweep; see core/sweeptable.py)."""
    from hpcexp.core import sweeptable

    sweep_id = sweeptable.sweep_of(run_id)
    idx = sweeptable.index(layout.sweeps_dir(), sweep_id) if sweep_id else None
    if idx is None or run_id not in idx.run_ids:
        return None
    paths = layout.run(idx.experiment, run_id)
    try:
        return paths, _load(paths)
    except NotFound:
        return None


def git_state(root: Path) -> tuple[str | None, bool | None]:
    """The project's git commit and whether the work tree is dirty (None when not a repo)."""
    from hpcexp.infra import process

    if process.which("git") is None:
        return None, None
    try:
        head = process.run(["git", "-C", str(root), "rev-parse", "HEAD"], timeout=10)
        if not head.ok:
            return None, None
        dirty = process.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                            timeout=20)
        return head.stdout.strip(), bool(dirty.stdout.strip()) if dirty.ok else None
    except Exception:  # noqa: BLE001 - provenance is best effort, never a reason to fail a run
        return None, None


