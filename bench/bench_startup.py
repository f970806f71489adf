"""Startup time of `hpcexp --help` and `hpcexp list --json` against `python -c "import click, yaml"`.

Target (issue 2): each at most 1.5x the baseline, median of 15 interleaved runs, all measured in this run.
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


def median_times(commands: dict[str, tuple[list[str], str]], runs: int, env: dict[str, str]) -> dict[str, float]:
    """Median wall time of each command, sampled round-robin so that a burst of load on a
    shared machine hits the baseline and the subjects alike."""
    for argv, cwd in commands.values():  # warm the page cache
        subprocess.run(argv, cwd=cwd, env=env, capture_output=True, check=True)
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, (argv, cwd) in commands.items():
            start = time.perf_counter()
            subprocess.run(argv, cwd=cwd, env=env, capture_output=True, check=True)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # Compare like with like: click and yaml load from bytecode compiled at install time, so
    # hpcexp must too (pip compiles an installed package; a bare checkout may not be).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "hpcexp")], env=env, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "hpcexp", "init", f"{tmp}/p"], env=env, check=True,
                       capture_output=True)
        t = median_times({
            "base": ([sys.executable, "-c", "import click, yaml"], tmp),
            "help": ([sys.executable, "-m", "hpcexp", "--help"], tmp),
            "list": ([sys.executable, "-m", "hpcexp", "list", "--json"], f"{tmp}/p"),
        }, args.runs, env)
        base, help_t, list_t = t["base"], t["help"], t["list"]
    print(f"baseline  python -c 'import click, yaml'  {base * 1000:7.1f} ms")
    print(f"hpcexp --help                          {help_t * 1000:7.1f} ms  ratio {help_t / base:.2f}x")
    print(f"hpcexp list --json                     {list_t * 1000:7.1f} ms  ratio {list_t / base:.2f}x")
    print(f"target: <= 1.5x  -> {'PASS' if max(help_t, list_t) / base <= 1.5 else 'FAIL'}")


if __name__ == "__main__":
    main()
