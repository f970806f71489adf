"""Overhead of `hpcexp run` (cached image) against a bare `apptainer` call of the same image.

Target (issue 5): `hpcexp run` of a trivial experiment at most 0.2 s slower than the bare
`apptainer run` with the same flags, binds and environment (median of N, both measured
here, alternating so that machine noise hits both alike). Must run as an ordinary user
(Apptainer fails as root on the test machines).

Usage: python bench/bench_run.py [--repeat 10] [--project DIR --experiment NAME]
Without --project, a throw-away project with a one-file busybox image is made.
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
        hpcexp = [sys.executable, "-m", "hpcexp", "run", "-q", exp]
        timed(hpcexp, proj, env)  # builds (or finds) the image: not measured
        recs = [json.loads((d / "run.json").read_text()) for d in (proj / "runs" / exp).iterdir()
                if (d / "run.json").exists()]
        rec = max(recs, key=lambda r: (r["created_at"], r["run_id"]))  # the warm-up run just made
        run_dir = proj / "runs" / exp / rec["run_id"]
        # the bare call: exactly the command and container environment hpcexp used
        bare = list(rec["command"])
        bare_env = apptainer.payload_env(bare[0], rec["container_env"], env)
        timed(bare, run_dir, bare_env)
        t_run, t_bare = [], []
        for _ in range(args.repeat):
            t_bare.append(timed(bare, run_dir, bare_env, "bare"))
            t_run.append(timed(hpcexp, proj, env, "run"))
    m_run, m_bare = statistics.median(t_run), statistics.median(t_bare)
    diff = m_run - m_bare
    print(f"bare apptainer run (same flags, binds, env)  median {m_bare * 1000:7.1f} ms  (n={args.repeat})")
    print(f"hpcexp run -q (cached image)                 median {m_run * 1000:7.1f} ms  (n={args.repeat})")
    c_run, c_bare = statistics.median(CPU["run"]), statistics.median(CPU["bare"])
    print(f"CPU time (user+sys, incl. children) median: bare {c_bare * 1000:.1f} ms, hpcexp {c_run * 1000:.1f} ms, "
          f"hpcexp's own {(c_run - c_bare) * 1000:+.1f} ms (less sensitive to other load on the machine)")
    print(f"overhead {diff * 1000:+.1f} ms  ratio {m_run / m_bare:.2f}x  target <= +200 ms -> "
          f"{'PASS' if diff <= 0.2 else 'FAIL'}")


if __name__ == "__main__":
    main()
