"""Overhead of `hpcexp run` (cached image) against a bare `apptainer` call of the same image.

Target (issue 18): `hpcexp run` of a trivial experiment costs at most +100 ms of CPU time
over the bare `apptainer run` with the same flags, binds and environment (median of N,
CPU time of the whole process tree: user + system of every child waited for, so the
watchdog, git and apptainer's own processes count). Issue 5's wall-time target (+200 ms)
is printed too. Both are measured here, in interleaved rounds, so that machine noise hits
both alike. Must run as an ordinary user (Apptainer fails as root on the test machines).

Usage: python bench/bench_run.py [--repeat 15] [--project DIR --experiment NAME] [--before DIR]
Without --project, a throw-away project with a one-file busybox image is made.
--before DIR: another checkout of hpcexp (e.g. `git worktree add /tmp/before REV`), run on
the same project in the same rounds, so a change is measured against the code before it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# What pip's `hpcexp` script runs: entry() (main() in trees older than it).
SCRIPT = ("import sys\ntry:\n    from hpcexp.cli.main import entry\nexcept ImportError:\n"
          "    from hpcexp.cli.main import main\n    entry = lambda: sys.exit(main())\nentry()\n")
sys.path.insert(0, str(REPO))


def make_project(tmp: Path) -> tuple[Path, str]:
    """A project whose experiment `trivial` runs `true` in a busybox image."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    rootfs = tmp / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    for applet in ("sh", "true", "echo"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    for d in ("tmp", "etc", "root", "home"):
        (rootfs / d).mkdir()
    sif = tmp / "busybox.sif"
    subprocess.run(["apptainer", "build", "-F", str(sif), str(rootfs)], check=True, capture_output=True)
    proj = tmp / "proj"
    (proj / "experiments" / "trivial").mkdir(parents=True)
    (proj / "experiments" / "trivial" / "Dockerfile").write_text('FROM busybox:latest\nCMD ["true"]\n')
    (proj / "hpcexp.yaml").write_text(f'bases:\n  "busybox:latest": {{sif: {json.dumps(str(sif))}}}\n')
    return proj, "trivial"


CPU: dict[str, list[float]] = {}


def timed(argv: list[str], cwd: Path, env: dict[str, str], label: str = "") -> float:
    """Wall time of one call; its CPU time (user+sys of it and its children) goes to CPU[label]."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:4]} exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-500:]}")
    if label:
        CPU.setdefault(label, []).append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--project", type=Path)
    parser.add_argument("--experiment")
    parser.add_argument("--before", type=Path, default=None, help="another checkout to compare against")
    args = parser.parse_args()
    if os.geteuid() == 0:
        raise SystemExit("run as an ordinary user: Apptainer fails as root here")

    from hpcexp.runtime import apptainer

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("HPCEXP_PROJECT", None)
    with tempfile.TemporaryDirectory() as tmpdir:
        # an installed package has its bytecode cached; a read-only checkout would not
        env["PYTHONPYCACHEPREFIX"] = str(Path(tmpdir) / "pycache")
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        if args.project:
            proj, exp = args.project, args.experiment or "hello"
        else:
            proj, exp = make_project(Path(tmpdir))
        # as pip's `hpcexp` script runs it (no -m, no runpy); `python -m hpcexp` is measured beside it
        hpcexp = [sys.executable, "-c", SCRIPT,
                  "run", "-q", exp]
        hpcexp_m = [sys.executable, "-m", "hpcexp", "run", "-q", exp]
        before_env = None
        if args.before:
            before_env = dict(env, PYTHONPATH=str(args.before.resolve()),
                              PYTHONPYCACHEPREFIX=str(Path(tmpdir) / "pycache-before"))
            timed(hpcexp, proj, before_env)  # the old tree builds (or finds) its image first
        timed(hpcexp, proj, env)  # builds (or finds) the image: not measured
        timed(hpcexp, proj, env)  # and again: the bytecode is cached now, as in an installed package
        recs = [json.loads((d / "run.json").read_text()) for d in (proj / "runs" / exp).iterdir()
                if (d / "run.json").exists()]
        rec = max(recs, key=lambda r: (r["created_at"], r["run_id"]))  # the warm-up run just made
        run_dir = proj / "runs" / exp / rec["run_id"]
        # the bare call: exactly the command and container environment hpcexp used
        bare = list(rec["command"])
        bare_env = apptainer.payload_env(bare[0], rec["container_env"], env)
        timed(bare, run_dir, bare_env)
        if before_env is not None:
            timed(hpcexp, proj, before_env)
        t_run, t_bare, t_before, t_m = [], [], [], []
        for _ in range(args.repeat):
            t_bare.append(timed(bare, run_dir, bare_env, "bare"))
            t_run.append(timed(hpcexp, proj, env, "run"))
            t_m.append(timed(hpcexp_m, proj, env, "run -m"))
            if before_env is not None:
                t_before.append(timed(hpcexp, proj, before_env, "before"))
    load = os.getloadavg()[0]
    m_bare = statistics.median(t_bare)
    c_bare = statistics.median(CPU["bare"])
    print(f"load average {load:.1f}; median of {args.repeat} interleaved rounds; "
          "CPU = user+sys of the whole process tree")
    print(f"{'command':44} {'wall':>9} {'overhead':>10} {'CPU':>9} {'overhead':>10}")
    print(f"{'bare apptainer run (same flags, binds, env)':44} {m_bare * 1000:7.1f}ms {'':>10} {c_bare * 1000:7.1f}ms")
    rows = [("hpcexp run -q (cached image)", t_run, "run"), ("python -m hpcexp run -q", t_m, "run -m")]
    if t_before:
        rows.append(("hpcexp run -q, --before tree", t_before, "before"))
    for label, walls, key in rows:
        wall, cpu = statistics.median(walls), statistics.median(CPU[key])
        print(f"{label:44} {wall * 1000:7.1f}ms {(wall - m_bare) * 1000:+8.1f}ms {cpu * 1000:7.1f}ms "
              f"{(cpu - c_bare) * 1000:+8.1f}ms")
    cpu_over = statistics.median(CPU["run"]) - c_bare
    wall_over = statistics.median(t_run) - m_bare
    print(f"target: CPU overhead <= +100 ms -> {'PASS' if cpu_over <= 0.1 else 'FAIL'} ({cpu_over * 1000:+.1f} ms); "
          f"wall overhead <= +200 ms -> {'PASS' if wall_over <= 0.2 else 'FAIL'} ({wall_over * 1000:+.1f} ms)")


if __name__ == "__main__":
    main()
