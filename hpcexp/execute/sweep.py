"""Parameter sweeps: expansion, sweep ids and records, summaries. The pure sweep model.

A sweep is the cartesian product of ``--sweep KEY=V1,V2,...`` options (and/or the
parameter sets listed in a sweep file), submitted as ONE Slurm job array with one run
record, parameter set and output folder per task, all sharing a sweep id. A sweep larger
than the cluster's ``MaxArraySize`` becomes several arrays under the same sweep id; the
sweep record (``runs/.sweeps/SWEEP_ID.json``) lists every array submitted for it.

Values are kept byte for byte; one holding a newline or another control character is
refused here, before any run folder or ``sbatch`` call exists.

This module imports nothing of the Slurm executor: submitting a sweep, and resubmitting
its failed tasks (:func:`hpcexp.execute.slurm.resubmit_sweep`), live there and use this.
"""

from __future__ import annotations

import csv
import datetime as _dt
import itertools
import os
import secrets
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from hpcexp.core.config import PARAM_RE
from hpcexp.core.layout import Layout
from hpcexp.errors import NotFound, StorageError, UsageError, shown
from hpcexp.execute.values import check_value
from hpcexp.infra import atomic, safeio

MAX_SWEEP = 1_000_000
FAILED_STATES = ("failed", "timeout", "out_of_memory", "node_fail", "lost")


def _check_param(key: str, value: str, where: str) -> None:
    if not isinstance(key, str) or not PARAM_RE.match(key):
        raise UsageError(f"{where}: invalid parameter name {shown(key, 40)}: letters, digits and _, "
                         "not starting with a digit")
    check_value(f"{where}: parameter {key}", value)


def parse_sweep_option(item: str) -> tuple[str, list[str]]:
    """``KEY=V1,V2,V3`` -> (KEY, [V1, V2, V3]). Values are split on ',' only."""
    key, sep, values = item.partition("=")
    if not sep:
        raise UsageError(f"--sweep {item!r} is not KEY=V1,V2,...")
    vals = values.split(",")
    for v in vals:
        _check_param(key, v, "--sweep")
    return key, vals


def _scalar(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    raise UsageError(f"{where}: values must be strings or numbers, got {type(value).__name__} {shown(value, 40)}")


def load_sweep_file(path: Path, *, inside: Path | None = None) -> list[dict[str, str]]:
    """Parameter sets from a file: YAML/JSON (a list of mappings, or a mapping KEY -> list of
    values meaning their product) or CSV/TSV (a header row of names, one set per row).

    ``inside``: the project root; a symlinked sweep file leading out of it is refused unread."""
    import io

    from hpcexp.infra.safeio import Unreadable, Unsafe, read_regular
    from hpcexp.infra.yamlload import MAX_CONFIG_BYTES

    label = str(path)
    if not os.path.lexists(path):
        raise NotFound(f"sweep file {label} does not exist")
    sets: list[dict[str, str]] = []
    if path.suffix.lower() in (".csv", ".tsv"):
        try:
            raw = read_regular(path, max_bytes=16 * MAX_CONFIG_BYTES, what="sweep file",
                               inside=inside if inside is not None else "/")
            text = raw.decode("utf-8")
        except (Unsafe, Unreadable):
            raise
        except FileNotFoundError:
            raise NotFound(f"sweep file {label} does not exist") from None
        except UnicodeDecodeError as exc:
            raise UsageError(f"{label}: not valid UTF-8 (byte {exc.start})") from None
        except OSError as exc:
            raise UsageError(f"cannot read sweep file {label}: {exc.strerror or exc}") from None
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        try:
            for i, row in enumerate(reader, start=2):
                if None in row:
                    raise UsageError(f"{label}:{i}: more fields than the header names")
                sets.append({k: v for k, v in row.items() if v is not None})
        except csv.Error as exc:
            raise UsageError(f"{label}:{reader.line_num}: not valid CSV ({exc})") from None
    else:
        from hpcexp.infra.yamlload import load_yaml

        data, _lines = load_yaml(path, label=label, inside=inside)
        if isinstance(data, dict):
            grid = [(str(k), [_scalar(v, f"{label}: {k}") for v in (vals if isinstance(vals, list) else [vals])])
                    for k, vals in data.items()]
            return product({}, grid, [], where=label)
        if not isinstance(data, list):
            raise UsageError(f"{label}: must be a list of parameter mappings, or a mapping of name -> values")
        for i, item in enumerate(data):
            if not isinstance(item, dict):
                raise UsageError(f"{label}: item {i} must be a mapping of parameter -> value")
            sets.append({str(k): _scalar(v, f"{label}: item {i}.{k}") for k, v in item.items()})
    for i, s in enumerate(sets):
        for k, v in s.items():
            _check_param(k, v, f"{label}: set {i}")
    if not sets:
        raise UsageError(f"{label}: no parameter sets")
    return sets


def product(fixed: Mapping[str, str], grid: Sequence[tuple[str, Sequence[str]]],
            file_sets: Sequence[Mapping[str, str]], *, where: str = "--sweep") -> list[dict[str, str]]:
    """Every parameter set: file sets x cartesian product of the grid, on top of ``fixed``.

    Order is deterministic (the file's order, then the grid with the last key varying
    fastest), so task N is the same parameter set every time the sweep is expanded.
    """
    for k, v in fixed.items():
        _check_param(k, v, "-p")
    merged: dict[str, list[str]] = {}
    for key, values in grid:
        for v in values:
            _check_param(key, v, where)
        merged.setdefault(key, [])
        merged[key] += [v for v in values if v not in merged[key]]
    size = max(1, len(file_sets))
    for values in merged.values():
        size *= len(values)
    if size > MAX_SWEEP:
        raise UsageError(f"{where}: the sweep has {size} parameter sets, more than {MAX_SWEEP}")
    keys = list(merged)
    out: list[dict[str, str]] = []
    for base in (file_sets or [{}]):
        for combo in itertools.product(*(merged[k] for k in keys)):
            s = dict(fixed)
            s.update(base)
            s.update(zip(keys, combo))
            out.append(s)
    return out


def new_sweep_id() -> str:
    now = _dt.datetime.now(_dt.timezone.utc)
    return f"sweep-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def allocate_sweep(layout: Layout, *, attempts: int = 50) -> str:
    """A new sweep id, made unique by exclusive mkdir of runs/.sweeps/SWEEP_ID/."""
    parent = layout.sweeps_dir()
    atomic.ensure_dir(parent)
    for _ in range(attempts):
        sweep_id = new_sweep_id()
        try:
            layout.sweep_dir(sweep_id).mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise atomic.storage_error(exc, parent) from exc
        return sweep_id
    raise StorageError(f"could not allocate a unique sweep id under {parent}")


def read_sweep(layout: Layout, sweep_id: str) -> dict[str, Any]:
    try:
        data = safeio.load_json_file(layout.sweep(sweep_id), max_bytes=64 << 20, what="sweep record")
    except FileNotFoundError:
        raise NotFound(f"no sweep record {layout.sweep(sweep_id)}") from None
    except ValueError as exc:
        raise UsageError(f"sweep record {layout.sweep(sweep_id)} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"sweep record {layout.sweep(sweep_id)} is not a JSON object")
    return data


def write_sweep(layout: Layout, record: Mapping[str, Any]) -> None:
    atomic.write_json(layout.sweep(str(record["sweep_id"])), dict(record))


def summary(states: Iterable[str]) -> str:
    """``8 succeeded, 2 failed, 5 pending`` (most advanced states first)."""
    order = ["succeeded", "failed", "timeout", "out_of_memory", "node_fail", "cancelled", "lost", "unknown",
             "running", "pending", "submitting", "created"]
    counts = Counter(states)
    parts = [f"{counts[s]} {s}" for s in order if counts.get(s)]
    parts += [f"{n} {s}" for s, n in sorted(counts.items()) if s not in order]
    return ", ".join(parts) or "no tasks"

