"""An ordinary user's PATH has no sbin folder, and Debian installs debootstrap in /usr/sbin:
doctor and a real build (real Apptainer, real debootstrap, cold cache) must work anyway.

The build test gives hpcexp an empty cache, so the debootstrap base is really built: with a
cached base the debootstrap lookup is skipped and the test would prove nothing. Its base is
the smallest one hpcexp can ask for (Debian's minbase, no extra package): about a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REQUIRED, run_cli

pytestmark = pytest.mark.e2e

# What a login shell gives an ordinary Debian user, plus the folder of the python running
# the tests (the venv's bin under scripts/run-tests).
USER_PATH = os.pathsep.join([os.path.dirname(sys.executable), "/usr/local/bin", "/usr/bin", "/bin"])
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")


@pytest.fixture
def debootstrap_in_sbin_only() -> str:
    """The installed debootstrap, which must be in an sbin folder and not on USER_PATH."""
    found = shutil.which("debootstrap", path=os.pathsep.join(SBIN))
    if found is None:
        msg = "debootstrap is not installed in an sbin folder (run scripts/provision-test-env)"
        pytest.fail(msg) if REQUIRED else pytest.skip(msg)
    assert shutil.which("debootstrap", path=USER_PATH) is None, "the test needs a PATH without debootstrap"
    return found


def _project(root: Path) -> Path:
    (root / "experiments" / "deb").mkdir(parents=True)
    (root / "hpcexp.yaml").write_text('bases:\n  "debian:12": {debootstrap: bookworm}\n')
    (root / "experiments" / "deb" / "Dockerfile").write_text(
        "FROM debian:12\nRUN echo built-by-hpcexp > /built.txt\nCMD [\"cat\", \"/etc/debian_version\"]\n")
    return root


def test_doctor_finds_debootstrap_in_sbin_with_an_ordinary_users_path(tmp_path: Path,
                                                                      debootstrap_in_sbin_only: str) -> None:
    root = _project(tmp_path / "p")
    env = {"PATH": USER_PATH, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = run_cli("doctor", cwd=root, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.split()[1:2] == ["debootstrap"]), None)
    assert line is not None, proc.stdout
    assert line.split()[0] == "ok" and debootstrap_in_sbin_only in line, line
    data = json.loads(run_cli("doctor", "--json", cwd=root, env=env).stdout)
    (check,) = [c for c in data["checks"] if c["name"] == "debootstrap"]
    assert check["status"] == "ok", check


@pytest.mark.slow
def test_build_on_a_cold_debootstrap_base_with_an_ordinary_users_path(tmp_path: Path,
                                                                      debootstrap_in_sbin_only: str) -> None:
    root = _project(tmp_path / "p")
    cache = tmp_path / "cache"
    env = {"PATH": USER_PATH, "XDG_CACHE_HOME": str(cache)}
    proc = run_cli("build", "deb", cwd=root, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "base debian:12: building" in proc.stdout + proc.stderr  # built now, not found in a cache

    (base,) = (cache / "hpcexp" / "bases").glob("*/debootstrap-bookworm-*.sif")
    side = json.loads(base.with_suffix(".json").read_text())
    assert side["kind"] == "debootstrap-base" and side["ref"] == "debian:12"
    # Apptainer ran debootstrap itself, with the user's PATH first and the sbin folders after it.
    log = Path(side["build_log"]).read_text()
    handed = next(ln for ln in log.splitlines() if ln.startswith("# PATH="))[len("# PATH="):].split(os.pathsep)
    assert handed[:4] == USER_PATH.split(os.pathsep) and set(SBIN) <= set(handed[4:]), handed
    assert "Base system installed successfully" in log

    (sif,) = (root / "images").glob("deb-*.sif")
    out = subprocess.run(["apptainer", "exec", str(sif), "cat", "/etc/debian_version", "/built.txt"],
                         capture_output=True, text=True, env={**os.environ, "PATH": USER_PATH})
    assert out.returncode == 0, out.stderr
    version, marker = out.stdout.split()
    assert version.startswith("12.") and marker == "built-by-hpcexp", out.stdout
