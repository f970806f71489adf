"""MLflow export against a real ``mlflow server`` (127.0.0.1, SQLite): records made here,
no Apptainer needed. The runs through Apptainer and Slurm are in test_track_e2e.py."""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from hpcexp.core import runs
from hpcexp.core.config import load_project
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.track import export as ex
from tests.conftest import assert_clean_error, run_cli
from tests.mlflowserver import free_port, sqlite_server

mlflow = pytest.importorskip("mlflow")


def MlflowClient(tracking_uri: str) -> Any:  # noqa: N802 - reads like the class it returns
    mlflow.set_tracking_uri(tracking_uri)  # proxied artifacts resolve against the global URI
    return mlflow.tracking.MlflowClient(tracking_uri=tracking_uri)

ENV = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def make_project(root: Path, uri: str, experiment: str | None = None, extra: str = "") -> Path:
    experiment = experiment or root.parent.name   # one MLflow experiment per test
    (root / "experiments" / "train").mkdir(parents=True)
    (root / "experiments" / "train" / "Dockerfile").write_text("FROM busybox\n")
    (root / "hpcexp.yaml").write_text(
        f"tracking: {{mlflow: {{uri: '{uri}', experiment: {experiment}{extra}}}}}\n")
    return root


def add_run(root: Path, state: str = "succeeded", *, params: dict[str, str] | None = None,
            metrics: str | None = None, sweep: str | None = None, index: int | None = None,
            files: dict[str, bytes] | None = None, **fields: Any) -> tuple[RunPaths, runs.RunRecord]:
    layout = Layout(load_project(root))
    paths = runs.allocate_run(layout, "train")
    paths.results.mkdir()
    rec = runs.RunRecord(experiment="train", run_id=paths.dir.name, state=state, executor="slurm",
                         params=params or {"lr": "0.1"}, started_at=runs.utcnow(), ended_at=runs.utcnow(),
                         exit_code=0 if state == "succeeded" else 3, image="/x/train.sif",
                         image_sha256="ab" * 32, input_hash="cd" * 32, recipe_sha256="ef" * 32,
                         git_commit="1234abcd", git_dirty=True, sweep_id=sweep, task_index=index,
                         executor_ids={"job_id": "77_1", "array_job_id": "77", "array_task_id": 1, "host": "node1"},
                         **fields)
    runs.write_record(paths, rec)
    paths.stdout.write_text("hello\n")
    if metrics is not None:
        (paths.results / "metrics.jsonl").write_text(metrics)
    for name, data in (files or {}).items():
        (paths.results / name).parent.mkdir(parents=True, exist_ok=True)
        (paths.results / name).write_bytes(data)
    return paths, rec


def cli(root: Path, *args: str) -> Any:
    return run_cli(*args, cwd=root, env=ENV)


def mlflow_runs(uri: str, experiment: str | None = None) -> list[Any]:
    experiment = experiment or CURRENT["experiment"]
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return list(client.search_runs([exp.experiment_id], max_results=5000))


def by_hpcexp_id(found: list[Any]) -> dict[str, Any]:
    return {r.data.tags["hpcexp.run_id"]: r for r in found if "hpcexp.run_id" in r.data.tags}


CURRENT: dict[str, str] = {}


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    CURRENT["experiment"] = tmp_path.name


def test_export_single_run_params_tags_status_metrics_artifacts(tmp_path: Path, mlflow_server: Any) -> None:
    root = make_project(tmp_path / "p", mlflow_server.uri)
    metrics = "".join(json.dumps({"name": "loss", "value": 1.0 / (s + 1), "step": s}) + "\n" for s in range(5))
    metrics += '{"name": "acc", "value": 0.9, "step": 4, "timestamp": 1700000000000}\n'
    paths, rec = add_run(root, params={"lr": "0.1", "seed": "3"}, metrics=metrics,
                         files={"model.txt": b"weights", "sub/out.csv": b"a,b\n"})
    proc = cli(root, "export", "mlflow", rec.run_id)
    assert proc.returncode == 0, proc.stderr
    assert "1 exported" in proc.stderr
    found = mlflow_runs(mlflow_server.uri)
    assert len(found) == 1
    run = found[0]
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "seed": "3"}
    tags = run.data.tags
    assert tags["hpcexp.run_id"] == rec.run_id
    assert tags["hpcexp.image_sha256"] == "ab" * 32 and tags["hpcexp.input_hash"] == "cd" * 32
    assert tags["hpcexp.recipe_sha256"] == "ef" * 32
    assert tags["hpcexp.git_commit"] == "1234abcd" and tags["hpcexp.git_dirty"] == "true"
    assert tags["hpcexp.slurm_job_id"] == "77_1" and tags["hpcexp.slurm_array_job_id"] == "77"
    assert tags["hpcexp.host"] == "node1" and tags["hpcexp.attempts"] == "1" and tags["hpcexp.executor"] == "slurm"
    assert run.info.end_time == int(runs.parse_time(rec.ended_at) * 1000)
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    hist = client.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in hist) == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert [m.timestamp for m in client.get_metric_history(run.info.run_id, "acc")] == [1700000000000]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results", "logs", "hpcexp-manifest.json"} <= arts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "results/sub")} == {"results/sub/out.csv"}
    state = json.loads(paths.tracking_state("mlflow").read_text())
    assert state["run_id"] == run.info.run_id and state["exported_state"] == "succeeded"
    # status RUN says where it went
    shown = cli(root, "status", rec.run_id)
    assert (f"mlflow: exported to {mlflow_server.uri} experiment {tmp_path.name!r}, run {run.info.run_id}"
            in shown.stdout)
    # exporting again sends nothing and makes no second run
    again = cli(root, "export", "mlflow", rec.run_id)
    assert again.returncode == 0 and "1 already exported" in again.stderr
    assert len(mlflow_runs(mlflow_server.uri)) == 1
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 5


def test_lost_state_file_finds_the_run_by_its_tag(tmp_path: Path, mlflow_server: Any) -> None:
    root = make_project(tmp_path / "p", mlflow_server.uri)
    paths, rec = add_run(root, metrics='{"name": "m", "value": 1}\n')
    assert cli(root, "export", "mlflow", rec.run_id).returncode == 0
    first = mlflow_runs(mlflow_server.uri)[0].info.run_id
    paths.tracking_state("mlflow").unlink()      # lost, as after a crash right after create_run
    assert cli(root, "export", "mlflow", rec.run_id).returncode == 0
    found = mlflow_runs(mlflow_server.uri)
    assert [r.info.run_id for r in found] == [first]
    assert json.loads(paths.tracking_state("mlflow").read_text())["run_id"] == first


def test_status_mapping_and_sweep_parent(tmp_path: Path, mlflow_server: Any) -> None:
    root = make_project(tmp_path / "p", mlflow_server.uri)
    states = ["succeeded", "failed", "cancelled", "timeout", "lost", "out_of_memory"]
    made = [add_run(root, s, sweep="sw-1", index=i, params={"i": str(i)}) for i, s in enumerate(states)]
    proc = cli(root, "export", "mlflow", "sw-1")
    assert proc.returncode == 0, proc.stderr
    assert "6 exported" in proc.stderr
    found = mlflow_runs(mlflow_server.uri)
    parents = [r for r in found if r.data.tags.get("hpcexp.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    children = by_hpcexp_id(found)
    want = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED", "timeout": "FAILED",
            "lost": "FAILED", "out_of_memory": "FAILED"}
    for (_, rec), state in zip(made, states):
        child = children[rec.run_id]
        assert child.info.status == want[state], state
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.data.tags["hpcexp.sweep_id"] == "sw-1"
    assert len(found) == 7
    # nothing changes on a second export
    again = cli(root, "export", "mlflow", "sw-1")
    assert again.returncode == 0 and "6 already exported" in again.stderr
    assert sorted(r.info.run_id for r in mlflow_runs(mlflow_server.uri)) == sorted(r.info.run_id for r in found)


def test_garbage_metric_lines_are_skipped_and_good_ones_logged(tmp_path: Path, mlflow_server: Any) -> None:
    root = make_project(tmp_path / "p", mlflow_server.uri)
    lines = ['{"name": "loss", "value": 0.5, "step": 1}', "not json at all", '{"name": "loss"}',
             '[1, 2]', '{"name": "bad name!", "value": 1}', '{"name": "loss", "value": "high"}',
             '{"name": "loss", "value": 0.25, "step": 2}', '\xff\xfe', '{"name": "loss", "value": 0.125, "step": 3}']
    paths, rec = add_run(root, metrics="\n".join(lines))  # no newline at the end: the run has ended
    before = paths.record.read_bytes()
    proc = cli(root, "export", "mlflow", rec.run_id)
    assert proc.returncode == 0, proc.stderr
    assert "6 line(s) skipped (line 2: not JSON; line 3: value of 'loss' is not a number; line 4: not a JSON" \
        in proc.stderr
    assert "Traceback" not in proc.stderr
    assert paths.record.read_bytes() == before      # the run record is untouched
    run = mlflow_runs(mlflow_server.uri)[0]
    hist = MlflowClient(tracking_uri=mlflow_server.uri).get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in hist) == [(1, 0.5), (2, 0.25), (3, 0.125)]
    assert "6 bad metric lines" in cli(root, "status", rec.run_id).stdout


def test_artifact_cap_skips_big_files_and_says_so(tmp_path: Path, mlflow_server: Any) -> None:
    root = make_project(tmp_path / "p", mlflow_server.uri, extra=", max_artifact_mb: 0.01")
    paths, rec = add_run(root, files={"small.txt": b"x" * 100, "big.bin": b"y" * 20000})
    proc = cli(root, "export", "mlflow", rec.run_id)
    assert proc.returncode == 0, proc.stderr
    assert "1 artifact(s) not uploaded" in proc.stderr
    run = mlflow_runs(mlflow_server.uri)[0]
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "results")} == {"results/small.txt"}
    local = client.download_artifacts(run.info.run_id, "hpcexp-manifest.json", str(tmp_path))
    manifest = json.loads(Path(local).read_text())
    assert [s["path"] for s in manifest["skipped"]] == ["results/big.bin"]
    assert manifest["skipped"][0]["size"] == 20000
    assert "results/small.txt" in [f["path"] for f in manifest["files"]]


def test_server_down_nothing_lost_then_exported_once(tmp_path: Path) -> None:
    port = free_port()
    server = sqlite_server(tmp_path / "mlflow", port)
    root = make_project(tmp_path / "p", server.uri)
    made = [add_run(root, "succeeded", sweep="sw-2", index=i, metrics='{"name": "m", "value": %d}\n' % i)
            for i in range(3)]
    before = [p.record.read_bytes() for p, _ in made]
    proc = cli(root, "export", "mlflow", "sw-2")
    assert_clean_error(proc, 6, f"tracking server {server.uri} does not answer")
    assert [p.record.read_bytes() for p, _ in made] == before
    assert all(not p.tracking_state("mlflow").exists() for p, _ in made)
    # status notices finished, unexported runs and tries in the background; the server is down
    assert cli(root, "status").returncode == 0
    server.start()
    try:
        proc = cli(root, "export", "mlflow")        # everything pending
        assert proc.returncode == 0, proc.stderr
        assert "3 exported" in proc.stderr
        found = mlflow_runs(server.uri)
        assert len(found) == 4                       # parent + 3
        again = cli(root, "export", "mlflow", "sw-2")
        assert again.returncode == 0 and "3 already exported" in again.stderr
        assert sorted(r.info.run_id for r in mlflow_runs(server.uri)) == sorted(r.info.run_id for r in found)
    finally:
        server.stop()


def test_status_exports_finished_runs_in_the_background(tmp_path: Path, mlflow_server: Any) -> None:
    root = make_project(tmp_path / "p", mlflow_server.uri)
    _, rec = add_run(root, metrics='{"name": "m", "value": 1}\n')
    t0 = time.monotonic()
    assert cli(root, "status").returncode == 0
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not by_hpcexp_id(mlflow_runs(mlflow_server.uri)).get(rec.run_id):
        time.sleep(0.5)
    found = by_hpcexp_id(mlflow_runs(mlflow_server.uri))
    assert rec.run_id in found
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "mlflow: exported" not in cli(root, "status", rec.run_id).stdout:
        time.sleep(0.5)
    assert "mlflow: exported" in cli(root, "status", rec.run_id).stdout


def test_status_without_tracking_imports_nothing(tmp_path: Path) -> None:
    root = tmp_path / "p"
    (root / "experiments" / "train").mkdir(parents=True)
    (root / "experiments" / "train" / "Dockerfile").write_text("FROM busybox\n")
    (root / "hpcexp.yaml").write_text("{}\n")
    add_run(root)
    code = ("import sys; from hpcexp.cli.main import main\n"
            "try:\n    main(['status'])\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in sys.modules if m.startswith(('mlflow', 'hpcexp.track', 'urllib.request'))]\n"
            "print('IMPORTED', bad)")
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert "IMPORTED []" in proc.stdout, proc.stdout + proc.stderr
    assert not (root / "runs" / ".tracking").exists()


class _Refuse(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
        self.end_headers()
        self.wfile.write(b"You are not authenticated.")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def refusing_server() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_refused_credentials_and_wrong_uri_are_one_line(tmp_path: Path, refusing_server: str,
                                                        mlflow_server: Any) -> None:
    root = make_project(tmp_path / "p", refusing_server)
    paths, rec = add_run(root)
    before = paths.record.read_bytes()
    proc = run_cli("export", "mlflow", rec.run_id, cwd=root,
                   env={**ENV, "MLFLOW_TRACKING_USERNAME": "ann", "MLFLOW_TRACKING_PASSWORD": "s3cret-pw"})
    assert_clean_error(proc, 6, "answered HTTP 401: the credentials were refused")
    assert "s3cret-pw" not in proc.stderr + proc.stdout
    assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("hpcexp: error:")]) == 1
    assert paths.record.read_bytes() == before
    doctor = run_cli("doctor", cwd=root, env=ENV)
    assert "tracking" in doctor.stdout and "HTTP 401" in doctor.stdout
    # a URL that is not an MLflow server (a path that answers 404 without MLflow's error)
    (root / "hpcexp.yaml").write_text(f"tracking: {{mlflow: {{uri: '{mlflow_server.uri}/nothing-here'}}}}\n")
    proc = cli(root, "export", "mlflow", rec.run_id)
    assert_clean_error(proc, 6, "is this the URL of an MLflow tracking server?")
    assert paths.record.read_bytes() == before
    # and the working server: doctor says it answers
    (root / "hpcexp.yaml").write_text(f"tracking: {{mlflow: {{uri: '{mlflow_server.uri}'}}}}\n")
    doctor = run_cli("doctor", cwd=root, env=ENV)
    assert f"MLflow tracking server at {mlflow_server.uri} answers" in doctor.stdout


def test_config_refuses_credentials_in_the_uri(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p", "http://ann:pw@127.0.0.1:5000")
    proc = cli(root, "list")
    assert_clean_error(proc, 2, "tracking.mlflow.uri: must not hold credentials")
    assert "pw@" not in proc.stderr


def test_redact_and_metrics_reader(tmp_path: Path) -> None:
    assert ex.redact("https://ann:pw@host:5000/x") == "https://***@host:5000/x"
    assert ex.strip_userinfo("https://ann:pw@host:5000/x") == "https://host:5000/x"
    f = tmp_path / "m.jsonl"
    f.write_text('{"name": "a", "value": 1, "step": 2}\n{"name": "a", "value": 2')
    part = ex.read_metrics(f, default_ts=5, final=False)
    assert part.metrics == [("a", 1.0, 5, 2)] and part.offset == len('{"name": "a", "value": 1, "step": 2}\n')
    rest = ex.read_metrics(f, offset=part.offset, first_line=part.first_line, default_ts=5)
    assert rest.metrics == [] and rest.skipped == [(2, "not JSON")]


def test_postgresql_backend(tmp_path: Path, mlflow_postgres_server: Any) -> None:
    root = make_project(tmp_path / "p", mlflow_postgres_server.uri)
    made = [add_run(root, s, sweep="sw-pg", index=i, metrics="".join(
        json.dumps({"name": "loss", "value": v, "step": v}) + "\n" for v in range(3)))
        for i, s in enumerate(["succeeded", "cancelled"])]
    proc = cli(root, "export", "mlflow", "sw-pg")
    assert proc.returncode == 0, proc.stderr
    found = mlflow_runs(mlflow_postgres_server.uri)
    kids = by_hpcexp_id(found)
    assert kids[made[0][1].run_id].info.status == "FINISHED"
    assert kids[made[1][1].run_id].info.status == "KILLED"
    assert len(found) == 3
    again = cli(root, "export", "mlflow", "sw-pg")
    assert again.returncode == 0 and len(mlflow_runs(mlflow_postgres_server.uri)) == 3


def test_config_levels_and_bad_values(tmp_path: Path) -> None:
    root = make_project(tmp_path / "p", "http://127.0.0.1:5000/")
    (root / "experiments" / "other").mkdir()
    (root / "experiments" / "other" / "Dockerfile").write_text("FROM busybox\n")
    (root / "hpcexp.yaml").write_text(
        "tracking: {mlflow: {uri: 'http://127.0.0.1:5000/', experiment: lab}}\n"
        "experiments:\n  train: {tracking: {mlflow: {experiment: ablation, reachable_from_nodes: false}}}\n"
        "  other: {tracking: false}\n")
    project = load_project(root)
    assert project.tracking is not None and project.tracking.uri == "http://127.0.0.1:5000"
    train = project.experiments["train"].tracking
    assert train is not None and (train.experiment, train.reachable_from_nodes, train.uri) == (
        "ablation", "false", "http://127.0.0.1:5000")
    assert project.experiments["other"].tracking is None
    (root / "hpcexp.yaml").write_text(
        "tracking: {mlflow: {uri: 'ftp://x', experimnt: a, reachable_from_nodes: maybe, max_artifact_mb: -1}}\n")
    proc = cli(root, "list")
    assert_clean_error(proc, 2, "tracking.mlflow.uri: must be an http:// or https:// URL",
                       "unknown key 'experimnt' (did you mean 'experiment'?)",
                       "reachable_from_nodes: must be true, false or auto", "max_artifact_mb: must be a number")


def test_job_script_drops_tracking_env_when_the_server_does_not_answer_from_the_node(tmp_path: Path) -> None:
    import subprocess

    from hpcexp.execute.slurm.sbatch import _reach_check

    def run(port: int) -> list[str]:
        lines = ["set -euo pipefail",
                 "HPCEXP_CMD=(env APPTAINERENV_A=1 APPTAINERENV_MLFLOW_RUN_ID=r APPTAINERENV_MLFLOW_TRACKING_URI=u "
                 "apptainer exec img APPTAINERENV_MLFLOW_RUN_ID=keep-me)"]
        lines += _reach_check(("127.0.0.1", port, ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI")), "APPTAINERENV_")
        lines += ['printf "%s\\n" "${HPCEXP_CMD[@]}"']
        proc = subprocess.run(["bash", "-c", "\n".join(lines)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    closed = free_port()
    assert run(closed) == ["env", "APPTAINERENV_A=1", "apptainer", "exec", "img", "APPTAINERENV_MLFLOW_RUN_ID=keep-me"]
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        assert run(port) == ["env", "APPTAINERENV_A=1", "APPTAINERENV_MLFLOW_RUN_ID=r",
                             "APPTAINERENV_MLFLOW_TRACKING_URI=u", "apptainer", "exec", "img",
                             "APPTAINERENV_MLFLOW_RUN_ID=keep-me"]


def test_export_without_the_client_says_how_to_install_it(tmp_path: Path, mlflow_server: Any) -> None:
    root = make_project(tmp_path / "p", mlflow_server.uri)
    paths, rec = add_run(root)
    shim = tmp_path / "shim"
    (shim / "mlflow").mkdir(parents=True)
    (shim / "mlflow" / "__init__.py").write_text("raise ImportError('no mlflow here')\n")
    proc = run_cli("export", "mlflow", rec.run_id, cwd=root,
                   env={**ENV, "PYTHONPATH": f"{shim}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert_clean_error(proc, 3, "exporting to MLflow needs the MLflow client, which is not installed",
                       "pip install 'hpcexp[mlflow]'")
    assert not paths.tracking_state("mlflow").exists()


def test_two_exporters_at_once_send_everything_once(tmp_path: Path, mlflow_server: Any) -> None:
    import subprocess
    import sys

    root = make_project(tmp_path / "p", mlflow_server.uri)
    made = [add_run(root, sweep="sw-3", index=i, metrics="".join(
        json.dumps({"name": "loss", "value": s, "step": s}) + "\n" for s in range(4))) for i in range(8)]
    env = {**os.environ, **ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-m", "hpcexp", "export", "mlflow", "sw-3", "--threads", "2"],
                              cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    found = mlflow_runs(mlflow_server.uri)
    assert len([r for r in found if r.data.tags.get("hpcexp.kind") == "sweep"]) == 1
    kids = by_hpcexp_id(found)
    assert sorted(kids) == sorted(rec.run_id for _, rec in made) and len(found) == 9
    c = MlflowClient(tracking_uri=mlflow_server.uri)
    for run in kids.values():
        assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "loss")) == [0, 1, 2, 3]
        assert run.info.status == "FINISHED"


def test_a_resubmitted_task_updates_its_mlflow_run_in_place(tmp_path: Path, mlflow_server: Any) -> None:
    root = make_project(tmp_path / "p", mlflow_server.uri)
    paths, rec = add_run(root, "failed", sweep="sw-4", index=0, metrics='{"name": "m", "value": 1, "step": 0}\n')
    assert cli(root, "export", "mlflow", "sw-4").returncode == 0
    first = mlflow_runs(mlflow_server.uri)
    assert {r.info.status for r in first} == {"FAILED"}
    # attempt 2 succeeds and appends a point (as `hpcexp resubmit SWEEP --failed` would)
    rec = runs.read_record(paths)
    rec.state, rec.attempt, rec.exit_code = "succeeded", 2, 0
    runs.write_record(paths, rec)
    with open(paths.results / "metrics.jsonl", "a") as fh:
        fh.write('{"name": "m", "value": 2, "step": 1}\n')
    proc = cli(root, "export", "mlflow", "sw-4")
    assert proc.returncode == 0 and "1 exported" in proc.stderr, proc.stderr
    again = mlflow_runs(mlflow_server.uri)
    assert sorted(r.info.run_id for r in again) == sorted(r.info.run_id for r in first)
    child = by_hpcexp_id(again)[rec.run_id]
    assert child.info.status == "FINISHED" and child.data.tags["hpcexp.attempts"] == "2"
    hist = MlflowClient(tracking_uri=mlflow_server.uri).get_metric_history(child.info.run_id, "m")
    assert sorted((m.step, m.value) for m in hist) == [(0, 1.0), (1, 2.0)]
    parent = [r for r in again if r.data.tags.get("hpcexp.kind") == "sweep"][0]
    assert parent.info.status == "FINISHED"
