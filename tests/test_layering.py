"""The package's layering holds: the import-linter contracts in pyproject.toml, and no
import cycle between modules (in-function imports count: they are still dependencies)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp  # comes with import-linter (the test extra)

REPO = Path(__file__).resolve().parents[1]


def _lint_imports() -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([exe, "--config", str(REPO / "pyproject.toml")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_import_contracts_are_kept() -> None:
    proc = _lint_imports()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_no_import_cycles_between_modules() -> None:
    graph = grimp.build_graph("hpcexp", cache_dir=None)
    modules = sorted(m for m in graph.modules if m.startswith("hpcexp"))
    cycles = []
    for a in modules:
        for b in graph.find_modules_directly_imported_by(a):
            # a imports b: a cycle exists when b (transitively) imports a back
            if b != a and b.startswith("hpcexp") and graph.chain_exists(importer=b, imported=a):
                chain = graph.find_shortest_chain(importer=b, imported=a)
                cycles.append(f"{a} -> " + " -> ".join(chain or (b, a)))
    # a package's __init__ importing its own submodules (a façade) is not a cycle of modules
    real = [c for c in cycles if not _facade_only(c)]
    assert not real, "import cycles:\n" + "\n".join(sorted(set(real)))


def _facade_only(cycle: str) -> bool:
    parts = [p.strip() for p in cycle.split("->")]
    return all(b.startswith(a + ".") or a.startswith(b + ".") for a, b in zip(parts, parts[1:]))


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    """The check can fail: a copy of the package where the records module imports the CLI."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "hpcexp", copy / "hpcexp", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    runs_py = copy / "hpcexp" / "core" / "runs.py"
    runs_py.write_text(runs_py.read_text() + "\n\nfrom hpcexp.cli import common as _upward  # noqa\n")
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    proc = subprocess.run([exe, "--config", str(copy / "pyproject.toml"), "--no-cache"], cwd=copy,
                          env=dict(os.environ, PYTHONPATH=str(copy)), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "hpcexp.core.runs -> hpcexp.cli.common" in proc.stdout


def test_every_import_of_hpcexp_names_resolves() -> None:
    """In-function imports (kept lazy for start-up time) are only checked when they run: a
    name moved by a re-layout must not wait for its one rare code path to fail."""
    import ast
    import importlib

    bad = []
    files = [*REPO.glob("hpcexp/**/*.py"), *REPO.glob("tests/*.py"), *REPO.glob("bench/*.py")]
    for f in sorted(files):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                    and node.module.split(".")[0] == "hpcexp"):
                continue
            mod = importlib.import_module(node.module)
            for alias in node.names:
                if alias.name == "*" or hasattr(mod, alias.name):
                    continue
                try:
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    bad.append(f"{f.relative_to(REPO)}:{node.lineno}: {node.module} has no {alias.name}")
    assert not bad, "\n".join(bad)
