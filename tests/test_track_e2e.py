"""Tracking end to end: real Apptainer runs and Slurm sweeps exported to a real ``mlflow
server`` on 127.0.0.1, as the ordinary user.

"A payload that logs itself": the busybox image has no Python and no MLflow client, so
the payload speaks MLflow's REST API with busybox ``wget``, using exactly the two
variables a payload's ``mlflow.log_metric`` would use (MLFLOW_TRACKING_URI and
MLFLOW_RUN_ID). Its metric must land in the same MLflow run as the exported ones.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_cli
from tests.mlflowserver import free_port, sqlite_server

pytestmark = [pytest.mark.e2e]
mlflow = pytest.importorskip("mlflow")

RUN_SH = r'''
i=0
while [ $i -lt 3 ]; do
  printf '{"name": "loss", "value": %s, "step": %s}\n' "$i.5" "$i" >> results/metrics.jsonl
  i=$((i+1))
done
echo "garbage line" >> results/metrics.jsonl
echo "weights" > results/model.txt
if [ -n "${MLFLOW_RUN_ID:-}" ]; then
  body="{\"run_id\": \"$MLFLOW_RUN_ID\", \"key\": \"self_logged\", \"value\": 42, \"step\": 1"
  body="$body, \"timestamp\": $(date +%s)000}"
  wget -q -O /dev/null --header 'Content-Type: application/json' --post-data "$body" \
    "$MLFLOW_TRACKING_URI/api/2.0/mlflow/runs/log-metric" && echo "logged myself"
fi
if [ -n "${HPCEXP_PARAM_sleep:-}" ]; then sleep "$HPCEXP_PARAM_sleep"; fi
if [ "${HPCEXP_PARAM_fail:-0}" = 1 ]; then echo "fails on purpose" >&2; exit 3; fi
echo done
'''

ENV = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def client(uri: str) -> Any:
    mlflow.set_tracking_uri(uri)
    return mlflow.tracking.MlflowClient(tracking_uri=uri)


def make(tmp_path: Path, busybox_sif: Path, uri: str) -> dict[str, Any]:
    root = tmp_path / "proj"
    exp = root / "experiments" / "train"
    exp.mkdir(parents=True)
    (exp / "Dockerfile").write_text("FROM busybox:latest\nCOPY . /app\nWORKDIR /app\n")
    (exp / "run.sh").write_text(RUN_SH)
    name = f"e2e-{tmp_path.name}"
    (root / "hpcexp.yaml").write_text(
        f'bases:\n  "busybox:latest": {{sif: {busybox_sif}}}\n'
        "slurm:\n  time: '5'\n"
        f"tracking: {{mlflow: {{uri: '{uri}', experiment: {name}}}}}\n"
        "experiments:\n  train:\n    command: [/bin/sh, /app/run.sh]\n    params_as: [env]\n"
        "    slurm: {mem: 200M}\n")
    env = {**ENV, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    return {"root": root, "env": env, "experiment": name}


def cli(p: dict[str, Any], *args: str) -> Any:
    return run_cli(*args, cwd=p["root"], env=p["env"])


def found_runs(uri: str, name: str) -> list[Any]:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    return [] if exp is None else list(c.search_runs([exp.experiment_id], max_results=1000))


def by_id(found: list[Any]) -> dict[str, Any]:
    return {r.data.tags["hpcexp.run_id"]: r for r in found if "hpcexp.run_id" in r.data.tags}


def wait_terminal(p: dict[str, Any], ref: str, timeout: float = 180) -> list[dict[str, Any]]:
    terminal = {"succeeded", "failed", "cancelled", "timeout", "out_of_memory", "node_fail", "lost"}
    deadline = time.monotonic() + timeout
    while True:
        proc = cli(p, "status", ref, "--json")
        assert proc.returncode == 0, proc.stderr
        recs = json.loads(proc.stdout)
        if all(r["state"] in terminal for r in recs) or time.monotonic() > deadline:
            return recs
        time.sleep(1)


def check_run(c: Any, run: Any, params: dict[str, str], *, self_logged: bool) -> None:
    assert run.data.params == params
    hist = c.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in hist) == [(0, 0.5), (1, 1.5), (2, 2.5)]
    assert ("self_logged" in run.data.metrics) is self_logged
    if self_logged:
        assert run.data.metrics["self_logged"] == 42
    assert {"results/metrics.jsonl", "results/model.txt"} <= {a.path for a in c.list_artifacts(run.info.run_id,
                                                                                                "results")}
    tags = run.data.tags
    for key in ("hpcexp.image_sha256", "hpcexp.input_hash", "hpcexp.host", "hpcexp.executor"):
        assert tags.get(key), key


def test_local_runs_exported_with_own_metrics_and_matching_status(tmp_path: Path, busybox_sif: Path,
                                                                  mlflow_server: Any) -> None:
    p = make(tmp_path, busybox_sif, mlflow_server.uri)
    ok = cli(p, "run", "train", "-p", "lr=0.5")
    assert ok.returncode == 0, ok.stderr
    assert "logged myself" in ok.stdout
    assert "tracking: exported to" in ok.stderr
    assert "1 line(s) skipped (line 4: not JSON)" in ok.stderr
    failed = cli(p, "run", "train", "-p", "fail=1")
    assert failed.returncode == 5, failed.stderr
    started = cli(p, "run", "train", "--detach", "-p", "sleep=60")
    assert started.returncode == 0, started.stderr
    killed_id = started.stdout.strip().splitlines()[-1]
    assert cli(p, "stop", killed_id, "--grace", "1").returncode == 0
    exp = cli(p, "export", "mlflow", killed_id)
    assert exp.returncode == 0, exp.stderr
    c = client(mlflow_server.uri)
    runs_json = {r["params"].get("lr", r["params"].get("fail", r["params"].get("sleep"))): r
                 for r in json.loads(cli(p, "runs", "--json").stdout)}
    found = by_id(found_runs(mlflow_server.uri, p["experiment"]))
    assert len(found) == 3
    good = found[runs_json["0.5"]["run_id"]]
    assert good.info.status == "FINISHED"
    check_run(c, good, {"lr": "0.5"}, self_logged=True)
    assert found[runs_json["1"]["run_id"]].info.status == "FAILED"
    assert found[runs_json["60"]["run_id"]].info.status == "KILLED"
    shown = cli(p, "status", runs_json["0.5"]["run_id"])
    assert f"run {good.info.run_id} (FINISHED" in shown.stdout


@pytest.mark.slurm
def test_sweep_3x2_through_slurm_parent_and_six_children(tmp_path: Path, busybox_sif: Path,
                                                         mlflow_server: Any) -> None:
    p = make(tmp_path, busybox_sif, mlflow_server.uri)
    sub = cli(p, "submit", "train", "--sweep", "a=1,2,3", "--sweep", "b=x,y", "--wait", "--json")
    assert sub.returncode == 0, sub.stderr
    sweep_id = json.loads(sub.stdout)[0]["sweep_id"]   # --wait --json: the final records
    exp = cli(p, "export", "mlflow", sweep_id)
    assert exp.returncode == 0, exp.stderr
    assert "6 exported" in exp.stderr
    c = client(mlflow_server.uri)
    found = found_runs(mlflow_server.uri, p["experiment"])
    parents = [r for r in found if r.data.tags.get("hpcexp.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = by_id(found)
    assert len(kids) == 6 and len(found) == 7
    recs = json.loads(cli(p, "status", sweep_id, "--json").stdout)
    for rec in recs:
        run = kids[rec["run_id"]]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["hpcexp.slurm_array_job_id"] == rec["executor_ids"]["array_job_id"]
        check_run(c, run, {"a": rec["params"]["a"], "b": rec["params"]["b"]}, self_logged=True)
    assert sorted((r["params"]["a"], r["params"]["b"]) for r in recs) == sorted(
        (a, b) for a in "123" for b in "xy")
    again = cli(p, "export", "mlflow", sweep_id)
    assert again.returncode == 0 and "6 already exported" in again.stderr
    assert len(found_runs(mlflow_server.uri, p["experiment"])) == 7


@pytest.mark.slurm
def test_server_down_during_sweep_then_exported_once(tmp_path: Path, busybox_sif: Path) -> None:
    port = free_port()
    server = sqlite_server(tmp_path / "mlflow", port)
    p = make(tmp_path, busybox_sif, server.uri)
    sub = cli(p, "submit", "train", "--sweep", "a=1,2,3", "--sweep", "b=x,y", "--wait", "--json")
    assert sub.returncode == 0, sub.stderr           # every run succeeds without the server
    sweep_id = json.loads(sub.stdout)[0]["sweep_id"]   # --wait --json: the final records
    recs = json.loads(cli(p, "status", sweep_id, "--json").stdout)
    assert [r["state"] for r in recs] == ["succeeded"] * 6
    assert all(not r["tracking"]["exported"] and "run_id" not in r["tracking"] for r in recs)
    for r in recs:
        assert "logged myself" not in (Path(r["dir"]) / "stdout.log").read_text()
    # a sweep task cancelled through Slurm (scancel of one array task) while the server is down, too
    two = cli(p, "submit", "train", "--sweep", "sleep=0,120", "--json")
    assert two.returncode == 0, two.stderr
    second = json.loads(two.stdout)
    sweep2, (quick, slow) = second["sweep_id"], [r["run_id"] for r in second["runs"]]
    deadline = time.monotonic() + 90
    while json.loads(cli(p, "status", slow, "--json").stdout)[0]["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(1)
    assert cli(p, "stop", slow).returncode == 0
    states = {r["run_id"]: r["state"] for r in wait_terminal(p, sweep2)}
    assert states == {quick: "succeeded", slow: "cancelled"}
    cancelled_id = slow
    server.start()
    try:
        exp = cli(p, "export", "mlflow", sweep_id, sweep2)
        assert exp.returncode == 0, exp.stderr
        # a background export that `status` started may be sending some runs at the same
        # time (they show as "being exported by another process"): wait for both to finish
        deadline = time.monotonic() + 60
        while not all(r["tracking"]["exported"] for ref in (sweep_id, sweep2)
                      for r in json.loads(cli(p, "status", ref, "--json").stdout)):
            assert time.monotonic() < deadline, exp.stderr
            time.sleep(1)
        found = found_runs(server.uri, p["experiment"])
        kids = by_id(found)
        assert len(found) == 10                         # 2 parents, 6 + 2 tasks
        assert kids[cancelled_id].info.status == "KILLED"
        assert kids[quick].info.status == "FINISHED"
        parents = {r.data.tags["hpcexp.sweep_id"]: r for r in found if r.data.tags.get("hpcexp.kind") == "sweep"}
        assert parents[sweep2].info.status == "KILLED" and parents[sweep_id].info.status == "FINISHED"
        c = client(server.uri)
        for r in recs:
            check_run(c, kids[r["run_id"]], {"a": r["params"]["a"], "b": r["params"]["b"]}, self_logged=False)
        ids = sorted(x.info.run_id for x in found)
        again = cli(p, "export", "mlflow", sweep_id)
        assert again.returncode == 0 and "6 already exported" in again.stderr
        assert cli(p, "export", "mlflow").returncode == 0       # nothing pending: changes nothing
        assert sorted(x.info.run_id for x in found_runs(server.uri, p["experiment"])) == ids
    finally:
        server.stop()
