"""Exporting a sweep to MLflow vs the same data logged with MLflow's own batch API.

Target: ``hpcexp export mlflow SWEEP`` for a 1,000-task sweep with 100 metric points per
task takes at most 2x the time of one script that logs the same data (one run per task
under a parent, params, the same tags, the 100 points in one ``log_batch``, the same
two artifact files, the end status) with ``MlflowClient``, against the same server.

    python bench/bench_track.py [--tasks 1000] [--points 100]

Needs the MLflow client (``hpcexp[mlflow]``) and an ``mlflow`` server program
(HPCEXP_MLFLOW_SERVER, default the test venv from scripts/provision.d/30-mlflow.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hpcexp.core import runs  # noqa: E402
from hpcexp.core.config import load_project  # noqa: E402
from hpcexp.core.layout import Layout  # noqa: E402
from tests.mlflowserver import sqlite_server  # noqa: E402


def make_sweep(root: Path, uri: str, tasks: int, points: int) -> list[tuple[Path, runs.RunRecord]]:
    (root / "experiments" / "train").mkdir(parents=True)
    (root / "experiments" / "train" / "Dockerfile").write_text("FROM busybox\n")
    (root / "hpcexp.yaml").write_text(f"tracking: {{mlflow: {{uri: '{uri}', experiment: hpcexp}}}}\n")
    layout = Layout(load_project(root))
    made = []
    for i in range(tasks):
        paths = runs.allocate_run(layout, "train")
        paths.results.mkdir()
        rec = runs.RunRecord(experiment="train", run_id=paths.dir.name, state="succeeded", executor="slurm",
                             params={"lr": str(0.1 * (i % 10)), "seed": str(i)}, started_at=runs.utcnow(),
                             ended_at=runs.utcnow(), exit_code=0, image_sha256="ab" * 32, input_hash="cd" * 32,
                             git_commit="1234abcd", git_dirty=False, sweep_id="bench", task_index=i,
                             executor_ids={"job_id": f"9_{i}", "array_job_id": "9", "array_task_id": i})
        runs.write_record(paths, rec)
        (paths.results / "metrics.jsonl").write_text("".join(
            json.dumps({"name": "loss", "value": 1.0 / (s + 1), "step": s}) + "\n" for s in range(points)))
        made.append((paths.dir, rec))
    return made


BASELINE = r'''
import json, os, sys, tempfile, time
import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
uri, data = sys.argv[1], json.load(open(sys.argv[2]))
mlflow.set_tracking_uri(uri)
c = MlflowClient(tracking_uri=uri)
t0 = time.perf_counter()
exp = c.create_experiment("baseline")
parent = c.create_run(exp, tags={"hpcexp.kind": "sweep", "hpcexp.sweep_id": "bench"}).info.run_id
tmp = tempfile.mkdtemp()
for task in data:
    tags = dict(task["tags"], **{"mlflow.parentRunId": parent})
    run = c.create_run(exp, tags=tags).info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric("loss", v, now, s) for s, v in task["points"]]
    c.log_batch(run, metrics=metrics, params=[Param(k, v) for k, v in task["params"].items()],
                tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
    c.log_artifact(run, task["metrics_file"], artifact_path="results")
    manifest = os.path.join(tmp, "hpcexp-manifest.json")
    with open(manifest, "w") as fh:
        json.dump({"files": [task["metrics_file"]]}, fh)
    c.log_artifact(run, manifest)
    c.set_terminated(run, status="FINISHED")
c.set_terminated(parent, status="FINISHED")
print(time.perf_counter() - t0)
'''


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--points", type=int, default=100)
    args = ap.parse_args()
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    from hpcexp.track.mlflow import run_tags

    with tempfile.TemporaryDirectory(prefix="bench-track-") as tmp:
        server = sqlite_server(Path(tmp) / "mlflow").start()
        try:
            made = make_sweep(Path(tmp) / "proj", server.uri, args.tasks, args.points)
            data = [{"tags": run_tags(rec), "params": rec.params,
                     "points": [(s, 1.0 / (s + 1)) for s in range(args.points)],
                     "metrics_file": str(d / "results" / "metrics.jsonl")} for d, rec in made]
            spec = Path(tmp) / "baseline.json"
            spec.write_text(json.dumps(data))
            script = Path(tmp) / "baseline.py"
            script.write_text(BASELINE)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            base = subprocess.run([sys.executable, str(script), server.uri, str(spec)], capture_output=True,
                                  text=True)
            base_wall = time.perf_counter() - t0
            mid = resource.getrusage(resource.RUSAGE_CHILDREN)
            if base.returncode != 0:
                print(base.stderr[-2000:], file=sys.stderr)
                return 1
            env = dict(os.environ, PYTHONPATH=str(REPO))
            t1 = time.perf_counter()
            ours = subprocess.run([sys.executable, "-m", "hpcexp", "--project", str(Path(tmp) / "proj"), "export",
                                   "mlflow", "bench"], capture_output=True, text=True, env=env)
            ours_wall = time.perf_counter() - t1
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if ours.returncode != 0:
                print(ours.stderr[-2000:], file=sys.stderr)
                return 1
        finally:
            server.stop()
    cpu_base = (mid.ru_utime + mid.ru_stime) - (before.ru_utime + before.ru_stime)
    cpu_ours = (after.ru_utime + after.ru_stime) - (mid.ru_utime + mid.ru_stime)
    ratio = ours_wall / base_wall
    print(f"tasks={args.tasks} points={args.points}")
    print(f"baseline (MlflowClient, one script): wall {base_wall:.1f} s, client CPU {cpu_base:.1f} s")
    print(f"hpcexp export mlflow SWEEP:          wall {ours_wall:.1f} s, client CPU {cpu_ours:.1f} s")
    print(f"ratio {ratio:.2f} (target <= 2.0): {'PASS' if ratio <= 2.0 else 'FAIL'}")
    print(ours.stderr.strip().splitlines()[-1] if ours.stderr.strip() else "")
    return 0 if ratio <= 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
