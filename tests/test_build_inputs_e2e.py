"""A cached `hpcexp run` through the real Apptainer: it checks the image's recorded inputs
without importing the converter or the builder, and every kind of input change still
rebuilds (the new image shows the change)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e

FORBIDDEN = ("hpcexp.convert", "hpcexp.build.builder")


def _project(root: Path, base: Path) -> Path:
    exp = root / "experiments" / "hello"
    (exp / "data").mkdir(parents=True)
    (root / "hpcexp.yaml").write_text(f'bases:\n  "busybox:latest": {{sif: "{base}"}}\n')
    (exp / "Dockerfile").write_text('FROM busybox:latest\nARG GREETING=hi\nCOPY hello.sh data/ /app/\n'
                                    'RUN echo "$GREETING" > /app/greeting\nCMD ["sh", "/app/hello.sh"]\n')
    (exp / "hello.sh").write_text("cat /app/keep.txt /app/greeting; cat /base-marker 2>/dev/null; ls /app\n")
    (exp / "data" / "keep.txt").write_text("data v1\n")
    (exp / "data" / "skip.tmp").write_text("ignored\n")
    (exp / ".dockerignore").write_text("**/*.tmp\n")
    return root


def test_cached_run_checks_recorded_inputs_and_each_change_rebuilds(tmp_path: Path, busybox_rootfs: Path,
                                                                   busybox_sif: Path) -> None:
    real = shutil.which("apptainer")
    assert real
    shim = tmp_path / "shim"
    shim.mkdir()
    log = tmp_path / "calls.log"
    (shim / "apptainer").write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec "{real}" "$@"\n')
    (shim / "apptainer").chmod(0o755)
    base = tmp_path / "base.sif"
    shutil.copy2(busybox_sif, base)
    root = _project(tmp_path / "p", base)
    exp = root / "experiments" / "hello"
    env = dict(os.environ, PATH=f"{shim}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(REPO),
               XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env.pop("HPCEXP_PROJECT", None)

    def builds() -> int:
        return sum(1 for ln in log.read_text().splitlines() if ln.startswith("build")) if log.exists() else 0

    def run(*flags: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, *flags, "-m", "hpcexp", "run", "-q", "hello"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    first = run()
    assert builds() == 1 and "data v1\nhi\n" in first.stdout
    log.write_text("")
    cached = run("-X", "importtime")
    assert builds() == 0 and "data v1\nhi\n" in cached.stdout
    imported = [ln.split("|")[-1].strip() for ln in cached.stderr.splitlines() if ln.startswith("import time:")]
    assert "hpcexp.build.inputs" in imported
    bad = [m for m in imported if m.split(".")[0] == "spython" or m.startswith(FORBIDDEN)]
    assert not bad, f"a cached run imported {bad}"
    assert [ln.split()[0] for ln in log.read_text().splitlines()] == ["run"], "only the container itself"

    # each kind of input change: one build, and the new image shows the change
    marked = tmp_path / "marked-rootfs"
    shutil.copytree(busybox_rootfs, marked, symlinks=True)
    (marked / "base-marker").write_text("base v2\n")
    changes = [
        ("Dockerfile", lambda: (exp / "Dockerfile").write_text(
            (exp / "Dockerfile").read_text() + "RUN touch /app/from-new-step\n"), "from-new-step"),
        ("context file", lambda: (exp / "data" / "keep.txt").write_text("data v2\n"), "data v2"),
        (".dockerignore", lambda: (exp / ".dockerignore").write_text("# nothing ignored\n"), "skip.tmp"),
        ("base", lambda: subprocess.run(["apptainer", "build", "-F", str(base), str(marked)], check=True,
                                        capture_output=True), "base v2"),
        ("build option", lambda: (root / "hpcexp.yaml").write_text(
            (root / "hpcexp.yaml").read_text() + "build_args: {GREETING: hello}\n"), "\nhello\n"),
    ]
    for what, change, shows in changes:
        change()
        before = builds()
        out = run()
        assert builds() == before + 1, f"{what}: not rebuilt"
        assert shows in out.stdout, (what, out.stdout)
        again = run()
        assert builds() == before + 1, f"{what}: the rebuilt image was not recorded"
        assert shows in again.stdout
