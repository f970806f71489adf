"""The MLflow exporter: one MLflow run per hpcexp run, a sweep as a parent run with children.

Only this module imports the MLflow client (``pip install 'hpcexp[mlflow]'``, which
installs ``mlflow-skinny``), and only when a command needs it.

Idempotency: every MLflow run carries the tag ``hpcexp.run_id`` (a sweep's parent carries
``hpcexp.sweep_id`` and ``hpcexp.kind=sweep``). The MLflow run id is kept in the run
folder (``tracking.mlflow.json``); when that file is missing (lost, or a crash right after
``create_run``) the run is found by its tag before one is created, so exporting again
updates the same run and never makes a second one. Metrics already sent are remembered
by byte offset in the metrics file, params and artifacts by a flag, so nothing is sent
twice; the run's status and end time are set last.

Batches follow MLflow's limits: at most 1000 metrics, 100 params and 100 tags per
``log_batch`` call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hpcexp.core.config import MlflowTracking, Project
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.core.runs import TERMINAL, RunRecord, parse_time, read_record, utcnow
from hpcexp.errors import EnvironmentProblem, HpcexpError, TrackingError
from hpcexp.track import export as ex

log = logging.getLogger(__name__)

TRACKER = "mlflow"
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100
MAX_PARAM_LEN, MAX_TAG_LEN = 6000, 8000
STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "timeout": "FAILED", "out_of_memory": "FAILED",
          "node_fail": "FAILED", "lost": "FAILED", "cancelled": "KILLED", "running": "RUNNING",
          "pending": "SCHEDULED", "submitting": "SCHEDULED", "created": "SCHEDULED"}
INSTALL_HINT = "pip install 'hpcexp[mlflow]'   (or: pip install mlflow-skinny)"


def _client_module() -> Any:
    # A server that does not answer must fail an export within seconds, not after
    # MLflow's default of 7 retries with exponential backoff (minutes). A user's own
    # settings win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    try:
        import mlflow.entities
        import mlflow.tracking
    except ImportError:
        raise EnvironmentProblem("exporting to MLflow needs the MLflow client, which is not installed",
                                 hint=INSTALL_HINT) from None
    return mlflow


def client(uri: str) -> Any:
    mlflow = _client_module()
    return mlflow.tracking.MlflowClient(tracking_uri=uri)


def _ms(value: str | None) -> int | None:
    t = parse_time(value)
    return None if t is None else int(t * 1000)


def _mlflow_error(exc: BaseException, uri: str) -> TrackingError:
    """One line for an error the client raised (no traceback, no credentials)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for secret in (os.environ.get("MLFLOW_TRACKING_PASSWORD"), os.environ.get("MLFLOW_TRACKING_TOKEN")):
        if secret:
            text = text.replace(secret, "***")
    return TrackingError(f"MLflow at {ex.redact(uri)}: {text[:300]}")


# --------------------------------------------------------------------------------------
# What a run becomes
# --------------------------------------------------------------------------------------

def run_tags(rec: RunRecord, parent_id: str | None = None) -> dict[str, str]:
    """Provenance tags of one run (the ``hpcexp.run_id`` tag is the idempotency key)."""
    ids = rec.executor_ids
    tags: dict[str, Any] = {
        "hpcexp.run_id": rec.run_id, "hpcexp.experiment": rec.experiment, "hpcexp.state": rec.state,
        "hpcexp.executor": rec.executor, "hpcexp.host": ids.get("host") or rec.host, "hpcexp.user": rec.user,
        "hpcexp.arch": rec.arch, "hpcexp.image": rec.image, "hpcexp.image_sha256": rec.image_sha256,
        "hpcexp.input_hash": rec.input_hash, "hpcexp.recipe_sha256": rec.recipe_sha256,
        "hpcexp.git_commit": rec.git_commit,
        "hpcexp.git_dirty": None if rec.git_dirty is None else str(bool(rec.git_dirty)).lower(),
        "hpcexp.attempts": str(rec.attempt), "hpcexp.exit_code": rec.exit_code, "hpcexp.signal": rec.signal,
        "hpcexp.reason": rec.reason or rec.launch_error, "hpcexp.version": rec.hpcexp_version,
        "hpcexp.apptainer_version": rec.apptainer_version, "hpcexp.sweep_id": rec.sweep_id,
        "hpcexp.task_index": rec.task_index,
        "hpcexp.slurm_job_id": ids.get("job_id") if rec.executor == "slurm" else None,
        "hpcexp.slurm_array_job_id": ids.get("array_job_id"),
        "hpcexp.slurm_array_task_id": ids.get("array_task_id") if ids.get("array_job_id") else None,
        "mlflow.runName": f"{rec.experiment}-{rec.task_index}" if rec.sweep_id and rec.task_index is not None
        else f"{rec.experiment}-{rec.run_id}",
        "mlflow.source.name": f"hpcexp:{rec.experiment}", "mlflow.source.type": "JOB", "mlflow.user": rec.user,
        "mlflow.source.git.commit": rec.git_commit,
    }
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    return {k: str(v)[:MAX_TAG_LEN] for k, v in tags.items() if v is not None and v != ""}


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)] or [[]]


@dataclass
class Outcome:
    """What one export call did, for the one-line summary."""

    exported: list[str] = field(default_factory=list)        # hpcexp run ids sent (or updated)
    unchanged: list[str] = field(default_factory=list)       # already exported
    busy: list[str] = field(default_factory=list)            # another exporter holds the run
    skipped: list[str] = field(default_factory=list)         # not finished, or not tracked
    notes: list[str] = field(default_factory=list)           # garbage metric lines, skipped artifacts
    errors: list[str] = field(default_factory=list)
    targets: set[str] = field(default_factory=set)


class Exporter:
    """Exports runs of one target (server URI + MLflow experiment)."""

    def __init__(self, layout: Layout, settings: MlflowTracking, experiment_name: str) -> None:
        self.layout = layout
        self.settings = settings
        self.name = experiment_name
        self.uri = settings.uri
        self.mlflow = _client_module()
        self.client = self.mlflow.tracking.MlflowClient(tracking_uri=self.uri)
        # artifacts proxied by the server (mlflow-artifacts:/...) are resolved against the
        # process-wide tracking URI, not the client's
        self.mlflow.set_tracking_uri(self.uri)
        self._experiment_id: str | None = None
        self._lock = threading.Lock()

    # -- server objects -----------------------------------------------------------------
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            try:
                exp = self.client.get_experiment_by_name(self.name)
                if exp is None:
                    try:
                        self._experiment_id = self.client.create_experiment(self.name)
                    except Exception:  # noqa: BLE001 - created meanwhile by another exporter
                        exp = self.client.get_experiment_by_name(self.name)
                        if exp is None:
                            raise
                        self._experiment_id = exp.experiment_id
                else:
                    if getattr(exp, "lifecycle_stage", "active") == "deleted":
                        raise TrackingError(f"MLflow experiment {self.name!r} at {ex.redact(self.uri)} is deleted",
                                            hint="restore it (mlflow experiments restore) or set "
                                                 "tracking.mlflow.experiment to another name")
                    self._experiment_id = exp.experiment_id
            except HpcexpError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise _mlflow_error(exc, self.uri) from None
        return self._experiment_id

    def find_by_tag(self, tag: str, value: str, extra: str = "") -> dict[str, str]:
        """hpcexp.run_id -> MLflow run id for runs carrying ``tag = value`` (all pages)."""
        found: dict[str, str] = {}
        token = None
        flt = f"tags.`{tag}` = '{value}'" + (f" and {extra}" if extra else "")
        while True:
            page = self.client.search_runs([self.experiment_id()], filter_string=flt, max_results=1000,
                                           page_token=token, order_by=["attributes.start_time ASC"])
            for run in page:
                key = run.data.tags.get("hpcexp.run_id") or run.data.tags.get("hpcexp.sweep_id")
                if key and key not in found:
                    found[key] = run.info.run_id
            token = getattr(page, "token", None)
            if not token:
                return found

    def create(self, tags: Mapping[str, str], start_ms: int | None) -> str:
        run = self.client.create_run(self.experiment_id(), start_time=start_ms, tags=dict(tags))
        return str(run.info.run_id)

    # -- one run ------------------------------------------------------------------------
    def ensure_run(self, paths: RunPaths, rec: RunRecord, parent_id: str | None,
                   known: Mapping[str, str] | None) -> tuple[str, dict[str, Any]]:
        """The MLflow run of ``rec`` (found or created) and the export state. Call under the run's lock."""
        sf = ex.state_file(paths, TRACKER)
        state = ex.read_state(sf)
        if not ex.same_target(state, self.settings, self.name):
            state = {"uri": ex.redact(self.uri), "experiment": self.name}
        run_id = state.get("run_id")
        if not run_id:
            # known: what one search for the whole sweep found; None: search for this run
            run_id = (known.get(rec.run_id) if known is not None
                      else self.find_by_tag("hpcexp.run_id", rec.run_id).get(rec.run_id))
            if not run_id:
                run_id = self.create(run_tags(rec, parent_id), _ms(rec.started_at) or _ms(rec.created_at))
                state["created_at"] = utcnow()
            state.update(run_id=run_id, experiment_id=self.experiment_id())
            ex.write_state(sf, state)
        return str(run_id), state

    def export_run(self, paths: RunPaths, rec: RunRecord, parent_id: str | None,
                   known: Mapping[str, str] | None, out: Outcome) -> None:
        from hpcexp.infra.lock import Lock

        lock = Lock(paths.tracking_lock(TRACKER), purpose=f"export of {rec.run_id}")
        if lock.try_acquire() is not None:
            with self._lock:
                out.busy.append(rec.run_id)
            return
        try:
            rec = read_record(paths)  # the newest state, under the lock
            if rec.state not in TERMINAL:
                with self._lock:
                    out.skipped.append(rec.run_id)
                return
            sf = ex.state_file(paths, TRACKER)
            if ex.is_exported(ex.read_state(sf), rec, self.settings, self.name):
                with self._lock:
                    out.unchanged.append(rec.run_id)
                return
            run_id, state = self.ensure_run(paths, rec, parent_id, known)
            try:
                self._send(paths, rec, run_id, parent_id, state, out)
            except BaseException as exc:
                state["last_error"] = str(_mlflow_error(exc, self.uri) if not isinstance(exc, HpcexpError) else exc)
                with contextlib.suppress(HpcexpError):
                    ex.write_state(sf, state)
                raise
            state.update(exported_state=rec.state, exported_at=utcnow(), status=STATUS.get(rec.state, "FAILED"))
            state.pop("last_error", None)
            ex.write_state(sf, state)
            with self._lock:
                out.exported.append(rec.run_id)
        finally:
            lock.release()

    def _send(self, paths: RunPaths, rec: RunRecord, run_id: str, parent_id: str | None,
              state: dict[str, Any], out: Outcome) -> None:
        ent = self.mlflow.entities
        tags = run_tags(rec, parent_id)
        params: list[Any] = []
        if not state.get("params"):
            params = [ent.Param(str(k), str(v)[:MAX_PARAM_LEN]) for k, v in sorted(rec.params.items())]
        default_ts = _ms(rec.ended_at) or _ms(rec.started_at) or _ms(rec.created_at) or 0
        mpath = paths.results / ex.METRICS_FILE
        read = ex.read_metrics(mpath, offset=int(state.get("metrics_offset") or 0),
                               first_line=int(state.get("metrics_next_line") or 1), default_ts=default_ts)
        metrics = [ent.Metric(n, v, ts, step) for n, v, ts, step in read.metrics]
        if read.skipped:
            note = ex.skipped_note(mpath, read.skipped)
            state["metrics_skipped"] = int(state.get("metrics_skipped") or 0) + len(read.skipped)
            with self._lock:
                out.notes.append(note)
        tag_objs = [ent.RunTag(k, v) for k, v in sorted(tags.items()) if k != "mlflow.runName"]
        # first batch: up to 100 params and tags with the first 1000 metrics; then the rest
        p_chunks, t_chunks, m_chunks = (_chunks(params, MAX_PARAMS), _chunks(tag_objs, MAX_TAGS),
                                        _chunks(metrics, MAX_METRICS))
        for i in range(max(len(p_chunks), len(t_chunks), len(m_chunks))):
            p = p_chunks[i] if i < len(p_chunks) else []
            t = t_chunks[i] if i < len(t_chunks) else []
            m = m_chunks[i] if i < len(m_chunks) else []
            if p or t or m:
                self.client.log_batch(run_id, metrics=list(m), params=list(p), tags=list(t), synchronous=True)
        state["params"] = True
        state["metrics_offset"] = read.offset
        state["metrics_next_line"] = read.first_line
        state["metrics_logged"] = int(state.get("metrics_logged") or 0) + len(metrics)
        ex.write_state(ex.state_file(paths, TRACKER), state)
        if self.settings.artifacts and not state.get("artifacts"):
            self._artifacts(paths, rec, run_id, state, out)
            state["artifacts"] = True
        status = STATUS.get(rec.state, "FAILED")
        end = _ms(rec.ended_at)
        self.client.set_terminated(run_id, status=status, end_time=end)

    def _artifacts(self, paths: RunPaths, rec: RunRecord, run_id: str, state: dict[str, Any], out: Outcome) -> None:
        import json
        import tempfile

        cap = int(self.settings.max_artifact_mb * 1024 * 1024)
        arts = ex.select_artifacts(paths, rec, cap)
        for local, folder in arts.files:
            self.client.log_artifact(run_id, str(local), artifact_path=folder or None)
        with tempfile.TemporaryDirectory(prefix="hpcexp-manifest-") as tmp:
            mf = Path(tmp) / ex.MANIFEST_NAME
            mf.write_text(json.dumps(arts.manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            self.client.log_artifact(run_id, str(mf))
        skipped = arts.manifest["skipped"]
        state["artifacts_sent"] = len(arts.files)
        state["artifacts_skipped"] = len(skipped)
        if skipped:
            with self._lock:
                out.notes.append(f"run {rec.run_id}: {len(skipped)} artifact(s) not uploaded (over the "
                                 f"{self.settings.max_artifact_mb:g} MB cap or not regular files); see "
                                 f"{ex.MANIFEST_NAME} in the MLflow run")

    # -- a sweep's parent -----------------------------------------------------------------
    def parent(self, sweep_id: str, tasks: Sequence[RunRecord], *, create: bool = True) -> str | None:
        """The sweep's parent run, found or created under the sweep's lock (two exporters
        starting at once must not make two parents)."""
        from hpcexp.infra.lock import Lock

        sf = self.layout.sweep_tracking_state(sweep_id, TRACKER)
        sf.parent.mkdir(parents=True, exist_ok=True)
        with Lock(sf.with_name(f".tracking.{TRACKER}.lock"), purpose=f"export of sweep {sweep_id}").hold():
            return self._parent(sf, sweep_id, tasks, create)

    def _parent(self, sf: Path, sweep_id: str, tasks: Sequence[RunRecord], create: bool) -> str | None:
        state = ex.read_state(sf)
        if ex.same_target(state, self.settings, self.name) and state.get("run_id"):
            return str(state["run_id"])
        found = self.find_by_tag("hpcexp.sweep_id", sweep_id, "tags.`hpcexp.kind` = 'sweep'").get(sweep_id)
        if not found:
            if not create:
                return None
            first = tasks[0] if tasks else None
            tags = {"hpcexp.kind": "sweep", "hpcexp.sweep_id": sweep_id,
                    "hpcexp.experiment": first.experiment if first else "", "hpcexp.tasks": str(len(tasks)),
                    "mlflow.runName": f"{first.experiment if first else 'sweep'}-sweep-{sweep_id}",
                    "mlflow.source.type": "JOB"}
            starts = [t for t in (_ms(r.created_at) for r in tasks) if t is not None]
            found = self.create({k: v for k, v in tags.items() if v}, min(starts) if starts else None)
        ex.write_state(sf, {"uri": ex.redact(self.uri), "experiment": self.name, "run_id": found,
                            "experiment_id": self.experiment_id(), "created_at": utcnow()})
        return found

    def finish_parent(self, sweep_id: str, parent_id: str, tasks: Sequence[RunRecord]) -> None:
        """The parent's status from its tasks: running while any runs, else failed if any
        failed, killed if any was cancelled, finished when all succeeded."""
        states = [t.state for t in tasks]
        ent = self.mlflow.entities
        counts: dict[str, int] = {}
        for s in states:
            counts[s] = counts.get(s, 0) + 1
        tags = [ent.RunTag("hpcexp.states", ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))]
        self.client.log_batch(parent_id, tags=tags, synchronous=True)
        if any(s not in TERMINAL for s in states):
            return
        if all(s == "succeeded" for s in states):
            status = "FINISHED"
        elif any(STATUS.get(s) == "FAILED" for s in states):
            status = "FAILED"
        else:
            status = "KILLED"
        ends = [t for t in (_ms(r.ended_at) for r in tasks) if t is not None]
        self.client.set_terminated(parent_id, status=status, end_time=max(ends) if ends else None)


# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------

def _groups(project: Project, items: Sequence[tuple[RunPaths, RunRecord]], out: Outcome
            ) -> dict[tuple[str, str], tuple[MlflowTracking, list[tuple[RunPaths, RunRecord]]]]:
    groups: dict[tuple[str, str], tuple[MlflowTracking, list[tuple[RunPaths, RunRecord]]]] = {}
    for paths, rec in items:
        settings = ex.settings_for(project, rec.experiment)
        if settings is None:
            out.skipped.append(rec.run_id)
            continue
        name = ex.target_experiment(settings, rec.experiment)
        groups.setdefault((settings.uri, name), (settings, []))[1].append((paths, rec))
    return groups


def export(layout: Layout, items: Sequence[tuple[RunPaths, RunRecord]], *, threads: int = 4,
           all_tasks: Callable[[str], Sequence[RunRecord]] | None = None) -> Outcome:
    """Export finished runs (already exported ones are left alone). Raises TrackingError
    when a server cannot be used at all; per-run failures are collected in ``errors``."""
    out = Outcome()
    groups = _groups(layout.project, items, out)
    for (uri, name), (settings, group) in groups.items():
        _export_group(layout, uri, name, settings, group, out, threads, all_tasks)
    return out


def _export_group(layout: Layout, uri: str, name: str, settings: MlflowTracking,
                  group: Sequence[tuple[RunPaths, RunRecord]], out: Outcome, threads: int,
                  all_tasks: Callable[[str], Sequence[RunRecord]] | None) -> None:
    ex.probe(uri, name)
    out.targets.add(f"{ex.redact(uri)} (experiment {name!r})")
    exporter = Exporter(layout, settings, name)
    todo: list[tuple[RunPaths, RunRecord]] = []
    for paths, rec in group:
        if rec.state not in TERMINAL:
            out.skipped.append(rec.run_id)
        elif ex.is_exported(ex.read_state(ex.state_file(paths, TRACKER)), rec, settings, name):
            out.unchanged.append(rec.run_id)
        else:
            todo.append((paths, rec))
    sweeps: dict[str, list[RunRecord]] = {}
    for _, rec in group:
        if rec.sweep_id:
            sweeps.setdefault(rec.sweep_id, [])
    try:
        parents: dict[str, str | None] = {}
        known: dict[str, str] = {}
        for sweep_id in sweeps:
            tasks = list(all_tasks(sweep_id)) if all_tasks else [r for _, r in group if r.sweep_id == sweep_id]
            sweeps[sweep_id] = tasks
            if any(r.sweep_id == sweep_id for _, r in todo):
                parents[sweep_id] = exporter.parent(sweep_id, tasks)
                # one search finds every task run already at the server (no search per run)
                if any(not ex.read_state(ex.state_file(p, TRACKER)).get("run_id")
                       for p, r in todo if r.sweep_id == sweep_id):
                    known.update(exporter.find_by_tag("hpcexp.sweep_id", sweep_id))
    except HpcexpError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _mlflow_error(exc, uri) from None

    def one(item: tuple[RunPaths, RunRecord]) -> None:
        paths, rec = item
        try:
            exporter.export_run(paths, rec, parents.get(rec.sweep_id or ""), known if rec.sweep_id else None,
                                out)
        except HpcexpError as exc:
            with exporter._lock:
                out.errors.append(f"run {rec.run_id}: {exc.message}")
        except Exception as exc:  # noqa: BLE001 - one run's failure must not stop the others
            with exporter._lock:
                out.errors.append(f"run {rec.run_id}: {_mlflow_error(exc, uri).message}")

    if threads > 1 and len(todo) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(one, todo))
    else:
        for item in todo:
            one(item)
    for sweep_id, parent_id in parents.items():
        if parent_id:
            try:
                fresh = list(all_tasks(sweep_id)) if all_tasks else sweeps[sweep_id]
                exporter.finish_parent(sweep_id, parent_id, fresh)
            except Exception as exc:  # noqa: BLE001
                out.errors.append(f"sweep {sweep_id}: {_mlflow_error(exc, uri).message}")


def begin(layout: Layout, items: Sequence[tuple[RunPaths, RunRecord]], *, sweep_id: str | None = None,
          threads: int = 8, timeout: float = 3.0) -> dict[str, dict[str, str]]:
    """Create the MLflow runs before the payloads start, so that a payload's own
    ``mlflow.log_*`` calls land in them: hpcexp run id -> environment for the container
    (``MLFLOW_TRACKING_URI``, ``MLFLOW_RUN_ID``, ``MLFLOW_EXPERIMENT_ID``).

    Best effort: when the server does not answer, or the client is missing, returns {}
    and the runs are exported later; the run never fails because of tracking.
    """
    if not items:
        return {}
    rec0 = items[0][1]
    settings = ex.settings_for(layout.project, rec0.experiment)
    if settings is None:
        return {}
    name = ex.target_experiment(settings, rec0.experiment)
    if not ex.reachable(settings.uri, name, timeout=timeout):
        return {}
    try:
        exporter = Exporter(layout, settings, name)
        parent_id = exporter.parent(sweep_id, [r for _, r in items]) if sweep_id else None
    except (HpcexpError, Exception) as exc:  # noqa: BLE001 - tracking never fails a run
        log.info("tracking: cannot prepare MLflow runs: %s", exc)
        return {}
    uri = ex.strip_userinfo(settings.uri)

    def one(item: tuple[RunPaths, RunRecord]) -> tuple[str, dict[str, str]] | None:
        paths, rec = item
        try:
            run_id, _ = exporter.ensure_run(paths, rec, parent_id, {})
        except Exception as exc:  # noqa: BLE001
            log.info("tracking: cannot create the MLflow run of %s: %s", rec.run_id, exc)
            return None
        return rec.run_id, {"MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": run_id,
                            "MLFLOW_EXPERIMENT_ID": exporter.experiment_id()}

    if threads > 1 and len(items) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = list(pool.map(one, items))
    else:
        results = [one(i) for i in items]
    return {r[0]: r[1] for r in results if r is not None}
