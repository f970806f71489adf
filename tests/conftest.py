"""Shared fixtures.

End-to-end tests (marker ``e2e``) go through the real Apptainer and Slurm as an ordinary
user. When ``HPCEXP_E2E_REQUIRED=1`` (set by scripts/run-tests, hence in CI) a missing
tool or running as root FAILS those tests instead of skipping them, so CI can never go
green by skipping the real thing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
REQUIRED = os.environ.get("HPCEXP_E2E_REQUIRED") == "1"

# Names that have broken real schedulers' and launchers' quoting (submitit's weird_dir).
HOSTILE_VALUES = [
    "a 0",
    "a'; echo foo",
    'a"=0"',
    "a\\=0",
    "$(touch /tmp/hpcexp-pwned)",
    "`id`",
    "a;b|c&d",
    "ä€😀",
    "--rf",
]


def _missing_e2e_reason(need_slurm: bool) -> str | None:
    if os.geteuid() == 0:
        return "end-to-end tests must run as an ordinary user (Apptainer fails as root here); use scripts/run-tests"
    if shutil.which("apptainer") is None:
        return "apptainer is not on PATH (run scripts/provision-test-env as root)"
    if need_slurm:
        for tool in ("sbatch", "squeue", "scancel", "sinfo"):
            if shutil.which(tool) is None:
                return f"{tool} is not on PATH (run scripts/provision-test-env as root)"
        probe = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True)
        if probe.returncode != 0:
            return f"no Slurm controller answers: {probe.stderr.strip()}"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("e2e") or item.get_closest_marker("slurm"):
        reason = _missing_e2e_reason(need_slurm=item.get_closest_marker("slurm") is not None)
        if reason:
            if REQUIRED:
                pytest.fail(f"e2e prerequisite missing: {reason}", pytrace=False)
            pytest.skip(reason)


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root file system holding one static busybox and its applet links."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.exists(busybox):
        pytest.fail("busybox-static is not installed (run scripts/provision-test-env)") if REQUIRED else \
            pytest.skip("busybox not installed")
    root = tmp_path_factory.mktemp("busybox-rootfs")
    (root / "bin").mkdir()
    shutil.copy2(busybox, root / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    for d in ("tmp", "etc", "root", "usr/bin", "var/tmp", "home"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "usr" / "bin" / "env").symlink_to("/bin/busybox")
    return root


@pytest.fixture(scope="session")
def busybox_sif(busybox_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real SIF (about 1 MB, built in ~0.2 s) to stand in for Docker Hub bases."""
    reason = _missing_e2e_reason(need_slurm=False)
    if reason:
        pytest.fail(reason, pytrace=False) if REQUIRED else pytest.skip(reason)
    out = tmp_path_factory.mktemp("busybox-sif") / "busybox.sif"
    subprocess.run(["apptainer", "build", "-F", str(out), str(busybox_rootfs)],
                   check=True, capture_output=True)
    return out


def run_cli(*args: str, cwd: Path | str | None = None, env: dict[str, str] | None = None,
            timeout: float = 600, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m hpcexp ARGS`` in a child process, as a user would."""
    full_env = dict(os.environ)
    full_env.pop("HPCEXP_PROJECT", None)
    if env:
        full_env.update(env)
    # The child imports this checkout's hpcexp whether or not it is installed.
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "hpcexp", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout, input=input)


@pytest.fixture
def cli():
    """The :func:`run_cli` helper as a fixture."""
    return run_cli


def assert_clean_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """A user error: the given exit code, one line (plus an optional hint), no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


@pytest.fixture
def chdir_tmp(tmp_path: Path) -> Iterator[Path]:
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(old)


# The real MLflow server (and its PostgreSQL) for the tracking tests.
from tests.mlflowserver import mlflow_postgres_server, mlflow_server  # noqa: E402, F401
