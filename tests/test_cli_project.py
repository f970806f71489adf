"""init / list / doctor / --version through the real CLI, and the error edge."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, assert_clean_error, run_cli

from hpcexp.app.scaffold import template_files


def test_version_and_help() -> None:
    from hpcexp import __version__

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"hpcexp {__version__}"
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("init", "list", "doctor"):
        assert cmd in proc.stdout


def test_help_does_not_import_spython() -> None:
    code = ("import sys; from hpcexp.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('spython' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.strip().splitlines()[-1] == "False", proc.stdout


def test_init_then_list_json_shows_both_arches(tmp_path: Path) -> None:
    target = tmp_path / "p"
    proc = run_cli("init", str(target))
    assert proc.returncode == 0, proc.stderr
    for rel in ("hpcexp.yaml", "experiments/hello/Dockerfile", "experiments/hello/Dockerfile.arm64",
                "experiments/hello/hello.py", ".gitignore", "experiments/hello/.dockerignore",
                "slurm/default.sbatch"):
        assert (target / rel).is_file(), rel
    proc = run_cli("list", "--json", cwd=target)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    hello = next(e for e in data if e["name"] == "hello")
    assert hello["arches"] == ["amd64", "arm64"]
    assert hello["dockerfiles"] == {"amd64": "Dockerfile", "arm64": "Dockerfile.arm64"}
    assert hello["recipe"] == {"amd64": "missing", "arm64": "missing"}


def test_init_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "p"
    target.mkdir()
    (target / "hpcexp.yaml").write_text("mine: true\n")
    proc = run_cli("init", str(target))
    assert_clean_error(proc, 2, "refusing to overwrite", "hpcexp.yaml")
    assert (target / "hpcexp.yaml").read_text() == "mine: true\n"
    assert not (target / "experiments").exists()


def test_init_template_is_the_repository_example() -> None:
    """`hpcexp init` scaffolds exactly the example experiment this repository ships."""
    files = template_files()
    for rel in ("experiments/hello/Dockerfile", "experiments/hello/Dockerfile.arm64",
                "experiments/hello/hello.py", "experiments/hello/.dockerignore", "hpcexp.yaml",
                "slurm/default.sbatch"):
        assert (REPO / rel).read_bytes() == files[rel], rel


def test_example_program_takes_parameters_and_writes_result(tmp_path: Path) -> None:
    script = REPO / "experiments" / "hello" / "hello.py"
    env = {**os.environ, "HPCEXP_RESULTS": str(tmp_path / "out")}
    proc = subprocess.run([sys.executable, str(script), "--greeting=hi there", "--count=2"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["hi there #1", "hi there #2"]
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["greeting"] == "hi there" and result["count"] == 2


def _path_without(program: str, tmp_path: Path) -> str:
    """A PATH that has python and the usual tools but not ``program``."""
    shim = tmp_path / f"bin-without-{program}"
    shim.mkdir(exist_ok=True)
    for tool in ("sinfo", "sbatch", "squeue", "scancel", "sacct", "squashfuse", "git"):
        found = shutil.which(tool)
        if found and tool != program and not (shim / tool).exists():
            (shim / tool).symlink_to(found)
    return f"{shim}:{os.path.dirname(sys.executable)}"


def test_doctor_without_apptainer_fails_with_fix(tmp_path: Path) -> None:
    proc = run_cli("doctor", env={"PATH": _path_without("apptainer", tmp_path)})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.split()[1:2] == ["apptainer"])
    assert line.startswith("fail") and "fix:" in line and "Apptainer >= 1.1" in line
    proc = run_cli("doctor", "--json", env={"PATH": _path_without("apptainer", tmp_path)})
    data = json.loads(proc.stdout)
    assert data["ok"] is False
    assert any(c["name"] == "apptainer" and c["status"] == "fail" for c in data["checks"])


def test_doctor_with_fake_old_apptainer(tmp_path: Path) -> None:
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "apptainer").write_text("#!/bin/sh\necho 'apptainer version 1.0.3'\n")
    (fake / "apptainer").chmod(0o755)
    path = f"{fake}:{_path_without('apptainer', tmp_path)}"
    proc = run_cli("doctor", env={"PATH": path})
    assert proc.returncode == 3
    assert "1.0.3 is too old" in proc.stdout


def test_unexpected_error_has_no_traceback(tmp_path: Path) -> None:
    proc = run_cli("--project", str(tmp_path / "nope"), "list")
    assert_clean_error(proc, 2, "does not exist")


def test_errors_exit_codes_documented() -> None:
    from hpcexp.errors import EXIT_CODES

    readme = (REPO / "README.md").read_text()
    for code in EXIT_CODES:
        assert f"| {code} |" in readme, f"exit code {code} missing from README"


@pytest.mark.e2e
def test_doctor_passes_on_provisioned_machine(tmp_path: Path) -> None:
    proc = run_cli("init", str(tmp_path / "p"))
    assert proc.returncode == 0
    proc = run_cli("doctor", "--json", cwd=tmp_path / "p")
    data = json.loads(proc.stdout)
    assert proc.returncode == 0, [c for c in data["checks"] if c["status"] == "fail"]
    names = {c["name"]: c["status"] for c in data["checks"]}
    assert names["apptainer"] == "ok" and names["user"] == "ok" and names["fakeroot"] == "ok"
