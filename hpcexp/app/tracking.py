"""Use cases of experiment tracking: what run, submit, status, doctor and export call.

Every function here is a no-op costing an attribute check when the experiment has no
``tracking:`` setting: nothing imports the MLflow client, nothing touches the network.
Tracking never fails a run: a server that does not answer only means the export waits
in the run folder (``tracking.mlflow.json``) until ``hpcexp export mlflow`` sends it.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

from hpcexp.core.config import Experiment, Project
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.core.runs import RunRecord

log = logging.getLogger(__name__)


def _draft(exp: Experiment, paths: RunPaths, params: Mapping[str, str] | None, executor: str,
           sweep_id: str | None = None, index: int | None = None) -> RunRecord:
    merged = dict(exp.params)
    merged.update(params or {})
    return RunRecord(experiment=exp.name, run_id=paths.dir.name, state="created", executor=executor,
                     params=merged, sweep_id=sweep_id, task_index=index)


def local_payload_env(project: Project, exp: Experiment, params: Mapping[str, str] | None
                      ) -> Callable[[RunPaths], Mapping[str, str]] | None:
    """For ``local.start_run(payload_env=...)``: create the run's MLflow run when the server
    answers from here, and give the payload MLFLOW_TRACKING_URI and MLFLOW_RUN_ID."""
    if exp.tracking is None:
        return None

    def env(paths: RunPaths) -> Mapping[str, str]:
        try:
            from hpcexp.track import mlflow

            got = mlflow.begin(Layout(project), [(paths, _draft(exp, paths, params, "local"))])
        except Exception as exc:  # noqa: BLE001 - tracking never fails a run (client missing, server down)
            log.info("tracking: %s", exc)
            return {}
        return got.get(paths.dir.name, {})

    return env


def slurm_payload_env(project: Project, exp: Experiment, param_sets: Sequence[Mapping[str, str]]
                      ) -> tuple[Callable[[Sequence[RunPaths], str | None], Mapping[str, Mapping[str, str]]] | None,
                                 tuple[str, int] | None]:
    """For ``slurm.submit_runs(payload_env=..., env_probe=...)``: (callback, probe address).

    ``reachable_from_nodes: false`` gives jobs nothing (the runs are created at export);
    ``auto`` (the default) lets each job check at its start that the server answers."""
    settings = exp.tracking
    if settings is None or settings.reachable_from_nodes == "false":
        return None, None
    from hpcexp.track import export as ex

    def env(allocated: Sequence[RunPaths], sweep_id: str | None) -> Mapping[str, Mapping[str, str]]:
        items = [(p, _draft(exp, p, param_sets[i] if i < len(param_sets) else None, "slurm", sweep_id,
                            i if sweep_id else None)) for i, p in enumerate(allocated)]
        try:
            from hpcexp.track import mlflow

            return mlflow.begin(Layout(project), items, sweep_id=sweep_id)
        except Exception as exc:  # noqa: BLE001 - tracking never fails a submission
            log.info("tracking: %s", exc)
            return {}

    probe = ex.host_port(settings.uri) if settings.reachable_from_nodes == "auto" else None
    return env, probe


def after_local_run(project: Project, paths: RunPaths, rec: RunRecord) -> str | None:
    """Export a finished foreground run at once when its server answers; a one-line note
    for the terminal, or None. Never raises."""
    exp = project.experiments.get(rec.experiment)
    if exp is None or exp.tracking is None or not rec.terminal:
        return None
    try:
        from hpcexp.track import mlflow

        out = mlflow.export(Layout(project), [(paths, rec)], threads=1)
    except Exception as exc:  # noqa: BLE001 - the run is recorded; the export waits
        msg = getattr(exc, "message", None) or str(exc)
        return f"tracking: not exported yet ({msg}); `hpcexp export mlflow {rec.run_id}` sends it later"
    if out.errors:
        return f"tracking: {out.errors[0]}; the export waits in the run folder"
    notes = "".join(f"\ntracking: {n}" for n in out.notes)
    if out.exported:
        return f"tracking: exported to {', '.join(sorted(out.targets))}{notes}"
    return notes.strip() or None


def all_tasks(layout: Layout) -> Callable[[str], list[RunRecord]]:
    from hpcexp.core.runs import iter_runs

    cache: dict[str, list[RunRecord]] = {}

    def tasks(sweep_id: str) -> list[RunRecord]:
        if not cache:
            for _, rec in iter_runs(layout):
                if rec.sweep_id:
                    cache.setdefault(rec.sweep_id, []).append(rec)
        return cache.get(sweep_id, [])

    return tasks


def export_runs(project: Project, items: Sequence[tuple[RunPaths, RunRecord]], *, threads: int = 4) -> Any:
    """``hpcexp export mlflow``: send what waits (the Outcome of :func:`hpcexp.track.mlflow.export`)."""
    from hpcexp.track import mlflow

    layout = Layout(project)
    return mlflow.export(layout, items, threads=threads, all_tasks=all_tasks(layout))


def kick(project: Project, items: Sequence[tuple[RunPaths, RunRecord]]) -> int:
    """From ``status``: start a background export when finished runs wait. Free when tracking is off."""
    from hpcexp.track import export as ex

    if not ex.tracking_configured(project):
        return 0
    try:
        return ex.kick(Layout(project), items)
    except Exception as exc:  # noqa: BLE001 - status must never fail because of tracking
        log.debug("tracking: background export not started: %s", exc)
        return 0


def describe(project: Project, paths: RunPaths, rec: RunRecord) -> dict[str, Any] | None:
    """Whether and where a run was exported (for ``status RUN``), or None when not tracked."""
    from hpcexp.track import export as ex

    state_path = ex.state_file(paths)
    settings = ex.settings_for(project, rec.experiment)
    if settings is None and not state_path.exists():
        return None
    state = ex.read_state(state_path)
    out: dict[str, Any] = {"tracker": "mlflow"}
    if settings is not None:
        out["target"] = f"{ex.redact(settings.uri)} experiment {ex.target_experiment(settings, rec.experiment)!r}"
    for key in ("uri", "experiment", "experiment_id", "run_id", "exported_at", "exported_state", "status",
                "metrics_logged", "metrics_skipped", "artifacts_sent", "artifacts_skipped", "last_error"):
        if key in state:
            out[key] = state[key]
    if settings is not None and ex.is_exported(state, rec, settings, ex.target_experiment(settings, rec.experiment)):
        out["exported"] = True
    else:
        out["exported"] = False
    return out


def describe_line(info: Mapping[str, Any]) -> str:
    if info.get("exported"):
        return (f"mlflow: exported to {info.get('uri')} experiment {info.get('experiment')!r}, run "
                f"{info.get('run_id')} ({info.get('status')}, {info.get('metrics_logged', 0)} metric points"
                f"{', %s bad metric lines' % info['metrics_skipped'] if info.get('metrics_skipped') else ''}) "
                f"at {info.get('exported_at')}")
    where = info.get("target") or f"{info.get('uri')} experiment {info.get('experiment')!r}"
    why = f"; last attempt: {info['last_error']}" if info.get("last_error") else ""
    have = f" (MLflow run {info['run_id']} created)" if info.get("run_id") else ""
    return f"mlflow: not exported yet to {where}{have}{why}"
