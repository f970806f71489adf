"""The end-to-end environment is real: an ordinary user, a real Apptainer, a real Slurm."""

from __future__ import annotations

import os
import subprocess

import pytest


@pytest.mark.e2e
def test_e2e_runs_as_ordinary_user() -> None:
    assert os.geteuid() != 0, "end-to-end tests must run as an ordinary user"
    assert os.getuid() != 0


@pytest.mark.e2e
def test_real_apptainer_runs_rootless(busybox_sif) -> None:
    proc = subprocess.run(["apptainer", "exec", str(busybox_sif), "/bin/busybox", "id", "-u"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(os.getuid())


@pytest.mark.slurm
def test_real_slurm_controller_answers() -> None:
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] in ("idle", "mixed", "allocated", "completing")
