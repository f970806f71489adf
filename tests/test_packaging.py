"""`pip install .` gives a working `hpcexp` with its templates (package data is easy to lose)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO


@pytest.mark.slow
def test_wheel_has_templates_and_entry_point(tmp_path: Path) -> None:
    src = tmp_path / "src"
    subprocess.run(["cp", "-r", str(REPO), str(src)], check=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    wheel = next((tmp_path / "dist").glob("hpcexp-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("hpcexp/py.typed", "hpcexp/templates/project/hpcexp.yaml",
                   "hpcexp/templates/project/experiments/hello/hello.py",
                   "hpcexp/templates/project/experiments/hello/dockerignore",
                   "hpcexp/templates/project/gitignore", "hpcexp/cli/main.py",
                   "hpcexp/server/templates/run.html", "hpcexp/server/static/app.js"):
        assert needed in names, needed
    if (REPO / "hpcexp" / "templates" / "default.sbatch").exists():
        assert "hpcexp/templates/default.sbatch" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "hpcexp = hpcexp.cli.main:entry" in zipfile.ZipFile(wheel).read(entry).decode()
