"""Startup time of `hpcexp --help` and `hpcexp list --json` against `python -c "import click, yaml"`.

Target (issue 2): each at most 1.5x the baseline, median of 15 interleaved runs, all measured in this run.
Usage: python bench/bench_startup.py [--runs 10] [--before DIR]

--before DIR: another checkout of hpcexp (e.g. `git worktree add /tmp/before REV`), measured
in the same rounds, so that a change's cost is a ratio against the code before it. CPU time
(user + system of the child) is given beside wall time: on a loaded machine it is the
figure that counts.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def median_times(commands: dict[str, tuple[list[str], str, dict[str, str]]], runs: int
                 ) -> dict[str, tuple[float, float]]:
    """Median wall and CPU time of each command, sampled round-robin so that a burst of load
    on a shared machine hits the baseline and the subjects alike."""
    for argv, cwd, env in commands.values():  # warm the page cache
        subprocess.run(argv, cwd=cwd, env=env, capture_output=True, check=True)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, (argv, cwd, env) in commands.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(argv, cwd=cwd, env=env, capture_output=True, check=True)
            wall = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            samples[name].append((wall, cpu))
    return {name: (statistics.median(s[0] for s in got), statistics.median(s[1] for s in got))
            for name, got in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--before", type=Path, default=None, help="another checkout to compare against")
    args = parser.parse_args()
    trees = {"": REPO} | ({"before ": args.before.resolve()} if args.before else {})
    envs = {}
    for label, tree in trees.items():
        env = {**os.environ, "PYTHONPATH": str(tree)}
        # Compare like with like: click and yaml load from bytecode compiled at install time, so
        # hpcexp must too (pip compiles an installed package; a bare checkout may not be).
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "hpcexp")], env=env, check=True)
        envs[label] = env
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "hpcexp", "init", f"{tmp}/p"], env=envs[""], check=True,
                       capture_output=True)
        commands = {"base": ([sys.executable, "-c", "import click, yaml"], tmp, envs[""])}
        for label, env in envs.items():
            commands[f"{label}help"] = ([sys.executable, "-m", "hpcexp", "--help"], tmp, env)
            commands[f"{label}list"] = ([sys.executable, "-m", "hpcexp", "list", "--json"], f"{tmp}/p", env)
        t = median_times(commands, args.runs)
    base = t["base"]
    print(f"{'command':40} {'wall':>9} {'ratio':>7} {'CPU':>9} {'ratio':>7}")
    for name, (wall, cpu) in t.items():
        print(f"{name:40} {wall * 1000:7.1f}ms {wall / base[0]:6.2f}x {cpu * 1000:7.1f}ms {cpu / base[1]:6.2f}x")
    for label in trees:
        if label:
            for cmd in ("help", "list"):
                now, then = t[cmd], t[f"{label}{cmd}"]
                print(f"{cmd}: this tree / {label.strip()}: wall {now[0] / then[0]:.2f}x, CPU {now[1] / then[1]:.2f}x")
    worst = max(t["help"][0], t["list"][0]) / base[0]
    print(f"target: <= 1.5x  -> {'PASS' if worst <= 1.5 else 'FAIL'}")


if __name__ == "__main__":
    main()
