"""`hpcexp status`, `runs`, `logs` and `stop` on hand-made run records (no container needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import assert_clean_error, run_cli

from hpcexp.app.runs import summarize
from hpcexp.app.views import format_params
from hpcexp.core import runs
from hpcexp.core.layout import RunPaths
from hpcexp.infra import host as hostinfo


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "hpcexp.yaml").write_text("{}\n")
    for name in ("hello", "other"):
        d = tmp_path / "experiments" / name
        d.mkdir(parents=True)
        (d / "Dockerfile").write_text("FROM busybox:latest\n")
    return tmp_path


def _add(project: Path, exp: str, run_id: str, state: str, **kw) -> RunPaths:
    paths = RunPaths(project / "runs" / exp / run_id)
    paths.dir.mkdir(parents=True)
    rec = runs.RunRecord(experiment=exp, run_id=run_id, state=state, **kw)
    rec.created_at = f"2026-01-0{run_id[-1]}T00:00:00.000Z"
    runs.write_record(paths, rec)
    return paths


def test_summarize_and_params_cells() -> None:
    recs = [runs.RunRecord("e", str(i), state=s) for i, s in
            enumerate(["pending", "failed", "succeeded", "succeeded", "pending"])]
    assert summarize(recs) == "2 succeeded, 1 failed, 2 pending"
    assert summarize([]) == "no runs"
    cell = format_params({"msg": "a b\nc", "lr": "0.1"})
    assert "\n" not in cell and "lr=0.1" in cell and "\\n" in cell


def test_runs_table_json_and_status_details(project: Path) -> None:
    _add(project, "hello", "20260101-000000-aaaaa1", "succeeded", exit_code=0, params={"lr": "0.1"},
         started_at="2026-01-01T00:00:00.000Z", ended_at="2026-01-01T00:01:05.000Z")
    _add(project, "hello", "20260101-000000-bbbbb2", "failed", exit_code=7, params={"msg": "x y"})
    _add(project, "other", "20260101-000000-ccccc3", "failed", launch_error="FATAL:   nope")
    proc = run_cli("runs", "hello", cwd=project)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["RUN_ID", "EXPERIMENT", "STATE", "AGE", "DURATION", "EXIT", "PARAMS"]
    assert len(lines) == 3
    assert "succeeded" in lines[1] and "1m05s" in lines[1] and "lr=0.1" in lines[1]
    assert "failed" in lines[2] and " 7 " in lines[2] and "msg='x y'" in lines[2]
    proc = run_cli("status", "--json", cwd=project)
    data = json.loads(proc.stdout)
    assert [d["run_id"][-6:] for d in data] == ["aaaaa1", "bbbbb2", "ccccc3"]
    assert data[2]["launch_error"] == "FATAL:   nope"
    proc = run_cli("status", "20260101-000000-c", cwd=project)  # unique prefix
    assert "state: failed" in proc.stdout and "launch_error: FATAL:   nope" in proc.stdout
    proc = run_cli("status", "@last", cwd=project)
    assert "run: 20260101-000000-ccccc3" in proc.stdout
    proc = run_cli("status", "hello", cwd=project)  # experiment name: its latest run
    assert "run: 20260101-000000-bbbbb2" in proc.stdout


def test_unknown_and_ambiguous_references_are_clean_errors(project: Path) -> None:
    _add(project, "hello", "20260101-000000-aaaaa1", "succeeded")
    _add(project, "hello", "20260101-000000-aaaaa2", "succeeded")
    assert_clean_error(run_cli("status", "nope", cwd=project), 2, "no run")
    assert_clean_error(run_cli("logs", "20260101", cwd=project), 2, "ambiguous")
    assert_clean_error(run_cli("runs", "../x", cwd=project), 2, "invalid")
    assert_clean_error(run_cli("runs", "helo", cwd=project), 2, "hello")


def test_logs_prints_stdout_stderr_both_and_tail(project: Path) -> None:
    paths = _add(project, "hello", "20260101-000000-aaaaa1", "succeeded")
    paths.stdout.write_bytes(b"".join(b"out %d\n" % i for i in range(5)) + b"bad \xff\n")
    paths.stderr.write_bytes(b"err 0\n")
    proc = run_cli("logs", "@last", cwd=project)
    assert proc.stdout.startswith("out 0\n") and proc.stdout.endswith("bad \ufffd\n")
    assert run_cli("logs", "-n", "2", "hello", cwd=project).stdout == "out 4\nbad \ufffd\n"
    assert run_cli("logs", "--stderr", "20260101-000000-a", cwd=project).stdout == "err 0\n"
    both = run_cli("logs", "--both", "-n", "1", "@last", cwd=project).stdout
    assert both == "out: bad \ufffd\nerr: err 0\n"
    # -f on a finished run prints and returns
    proc = run_cli("logs", "-f", "@last", cwd=project, timeout=30)
    assert proc.returncode == 0 and proc.stdout.count("\n") == 6


def test_follow_of_a_run_whose_owner_is_gone_ends_as_lost(project: Path) -> None:
    paths = _add(project, "hello", "20260101-000000-aaaaa1", "running",
                 executor_ids={"host": hostinfo.hostname(), "boot_id": hostinfo.boot_id(),
                               "supervisor_pid": 2 ** 22 + 77, "supervisor_start": 1})
    paths.stdout.write_text("partial\n")
    proc = run_cli("logs", "-f", "@last", cwd=project, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "partial\n"
    rec = runs.read_record(paths)
    assert rec.state == "lost" and f"supervisor pid {2 ** 22 + 77}" in rec.reason
    status = run_cli("status", "--json", cwd=project)
    assert json.loads(status.stdout)[0]["state"] == "lost"


def test_stop_of_a_finished_run_says_so(project: Path) -> None:
    _add(project, "hello", "20260101-000000-aaaaa1", "succeeded", exit_code=0)
    proc = run_cli("stop", "@last", cwd=project)
    assert proc.returncode == 0 and "already ended: succeeded" in proc.stderr


def test_stop_of_a_run_on_another_host_is_refused(project: Path) -> None:
    _add(project, "hello", "20260101-000000-aaaaa1", "running",
         executor_ids={"host": "elsewhere.example", "supervisor_pid": 1})
    assert_clean_error(run_cli("stop", "@last", cwd=project), 2, "elsewhere.example")


def test_run_refuses_bad_parameters_before_anything(project: Path) -> None:
    proc = run_cli("run", "hello", "-p", "noequals", cwd=project)
    assert_clean_error(proc, 2, "KEY=VALUE")
    proc = run_cli("run", "hello", "-p", "1bad=x", cwd=project)
    assert_clean_error(proc, 2, "invalid parameter name")
    assert not (project / "runs").exists()
    assert_clean_error(run_cli("run", "nope", cwd=project), 2, "no experiment")
    assert not os.path.exists(project / "runs")
