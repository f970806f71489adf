"""The repository's own example experiment works end to end, offline, as documented.

`hello` is `FROM python:3.11-slim` with no `bases:` entry, so hpcexp builds its python
stand-in with debootstrap from the machine's Debian mirror (no image registry is reachable here).
The base is cached per user, so only the first run of the suite pays for it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli


def _copy_example(dest: Path) -> Path:
    dest.mkdir()
    for name in ("hpcexp.yaml", "experiments", "slurm"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("results", "__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def _records(project: Path) -> list[dict]:
    proc = run_cli("status", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.e2e
@pytest.mark.slurm
@pytest.mark.slow
def test_example_builds_offline_runs_locally_and_through_slurm(tmp_path: Path) -> None:
    project = _copy_example(tmp_path / "example")

    proc = run_cli("build", "hello", cwd=project, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run_cli("build", "hello", "--json", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["built"] is False, "an unchanged experiment must not rebuild"
    listed = json.loads(run_cli("list", "--json", cwd=project).stdout)[0]
    assert listed["recipe"]["amd64"] == "current" and listed["image"]["amd64"] == "built", listed
    assert listed["image"]["arm64"] == "none"

    proc = run_cli("run", "hello", "-p", "greeting=hi; $(touch /tmp/x) 'q'", "-p", "count=2", cwd=project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "hi; $(touch /tmp/x) 'q' #2" in proc.stdout
    (local,) = _records(project)
    assert local["state"] == "succeeded" and local["exit_code"] == 0
    result = json.loads((project / "runs" / "hello" / local["run_id"] / "results" / "result.json").read_text())
    assert result == {"greeting": "hi; $(touch /tmp/x) 'q'", "count": 2,
                      "lines": ["hi; $(touch /tmp/x) 'q' #1", "hi; $(touch /tmp/x) 'q' #2"],
                      "run_id": local["run_id"]}

    proc = run_cli("submit", "hello", "-p", "greeting=from slurm", cwd=project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    deadline = time.monotonic() + 300
    while True:
        slurm_runs = [r for r in _records(project) if r["executor"] == "slurm"]
        assert len(slurm_runs) == 1
        if slurm_runs[0]["state"] in ("succeeded", "failed", "cancelled", "timeout", "lost", "node_fail"):
            break
        assert time.monotonic() < deadline, slurm_runs[0]
        time.sleep(1)
    run = slurm_runs[0]
    assert run["state"] == "succeeded" and run["exit_code"] == 0, run
    out = project / "runs" / "hello" / run["run_id"]
    assert json.loads((out / "results" / "result.json").read_text())["greeting"] == "from slurm"
    assert (out / "job.sbatch").is_file()


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_committed_recipes_are_current(arch: str) -> None:
    """recipes/ in this repository is generated; `convert --check` is how CI keeps it honest."""
    proc = run_cli("convert", "--all", "--check", "--arch", arch, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "up to date" in proc.stdout + proc.stderr
