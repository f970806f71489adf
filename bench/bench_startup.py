"""Startup time of `hpcexp --help` and `hpcexp list --json` against `python -c "import click, yaml"`.

Target (issue 2): each at most 1.5x the baseline, median of 10 runs, all measured in this run.
Usage: python bench/bench_startup.py [--runs 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def median_time(argv: list[str], runs: int, cwd: str, env: dict[str, str]) -> float:
    times = []
    subprocess.run(argv, cwd=cwd, env=env, capture_output=True, check=True)  # warm the page cache
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, cwd=cwd, env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Compare like with like: click and yaml load from bytecode compiled at install time, so
    # hpcexp must too (pip compiles an installed package; a bare checkout may not be).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "hpcexp")], env=env, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "hpcexp", "init", f"{tmp}/p"], env=env, check=True,
                       capture_output=True)
        base = median_time([sys.executable, "-c", "import click, yaml"], args.runs, tmp, env)
        help_t = median_time([sys.executable, "-m", "hpcexp", "--help"], args.runs, tmp, env)
        list_t = median_time([sys.executable, "-m", "hpcexp", "list", "--json"], args.runs, f"{tmp}/p", env)
    print(f"baseline  python -c 'import click, yaml'  {base * 1000:7.1f} ms")
    print(f"hpcexp --help                          {help_t * 1000:7.1f} ms  ratio {help_t / base:.2f}x")
    print(f"hpcexp list --json                     {list_t * 1000:7.1f} ms  ratio {list_t / base:.2f}x")
    print(f"target: <= 1.5x  -> {'PASS' if max(help_t, list_t) / base <= 1.5 else 'FAIL'}")


if __name__ == "__main__":
    main()
