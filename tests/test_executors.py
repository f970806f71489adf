"""The Executor protocol and registry: every registered executor implements it, and a run
record naming an executor this version does not know is shown, never skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_clean_error, run_cli

from hpcexp.core import runs
from hpcexp.core.layout import RunPaths
from hpcexp.errors import UsageError
from hpcexp.execute import base


@pytest.mark.parametrize("name", base.names())
def test_every_registered_executor_implements_the_protocol(name: str) -> None:
    executor = base.get(name)
    assert isinstance(executor, base.Executor)
    assert executor.name == name
    assert executor.poll_interval > 0


def test_unknown_names_are_none_or_a_usage_error() -> None:
    assert base.get("kubernetes") is None
    with pytest.raises(UsageError, match="unknown executor 'kubernetes'"):
        base.require("kubernetes")


def test_log_files_follow_the_attempt(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path / "r")
    rec = runs.RunRecord(experiment="e", run_id="r", state="running", executor="slurm", attempt=2)
    got = {f.stream: f.path for f in base.log_files(paths, rec)}
    assert got == {"stdout": paths.attempt_stdout(2), "stderr": paths.attempt_stderr(2)}
    rec.executor = "from-the-future"
    assert {f.stream for f in base.log_files(paths, rec)} == {"stdout", "stderr"}


def _project(tmp_path: Path) -> Path:
    (tmp_path / "hpcexp.yaml").write_text("{}\n")
    d = tmp_path / "experiments" / "hello"
    d.mkdir(parents=True)
    (d / "Dockerfile").write_text("FROM busybox:latest\n")
    return tmp_path


def _add(project: Path, run_id: str, state: str, executor: str) -> RunPaths:
    paths = RunPaths(project / "runs" / "hello" / run_id)
    paths.dir.mkdir(parents=True)
    rec = runs.RunRecord(experiment="hello", run_id=run_id, state=state, executor=executor)
    rec.created_at = f"2026-01-0{run_id[-1]}T00:00:00.000Z"
    runs.write_record(paths, rec)
    return paths


def test_status_shows_a_record_of_an_unknown_executor_as_unknown(tmp_path: Path) -> None:
    project = _project(tmp_path)
    odd = _add(project, "20260101-000000-aaaaa1", "running", "kubernetes")
    _add(project, "20260101-000000-bbbbb2", "succeeded", "local")
    before = odd.record.read_bytes()
    proc = run_cli("status", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr
    data = {d["run_id"][-6:]: d for d in json.loads(proc.stdout)}
    assert data["aaaaa1"]["state"] == "unknown"
    assert "executor 'kubernetes' is unknown" in data["aaaaa1"]["reason"]
    assert data["bbbbb2"]["state"] == "succeeded"
    table = run_cli("status", cwd=project)
    assert table.returncode == 0 and "unknown" in table.stdout and "aaaaa1" in table.stdout
    assert odd.record.read_bytes() == before  # shown, never rewritten: a newer hpcexp may know it


def test_stop_refuses_runs_of_an_unknown_executor_before_stopping_any(tmp_path: Path) -> None:
    project = _project(tmp_path)
    odd = _add(project, "20260101-000000-aaaaa1", "running", "kubernetes")
    before = odd.record.read_bytes()
    proc = run_cli("stop", "20260101-000000-aaaaa1", cwd=project)
    assert_clean_error(proc, 2, "executor 'kubernetes' is unknown")
    assert odd.record.read_bytes() == before
