"""Speed of `hpcexp submit` for a 1,000-task sweep and of `hpcexp status` over 1,000 runs.

Targets (issue 6):
  - a 1,000-task sweep is submitted in at most 3 s of hpcexp time with ONE sbatch call, and
    within 1.5x of the baseline: a bare `sbatch --array=0-999` of a trivial script plus
    writing 1,000 run records (hpcexp's own atomic, fsynced writer) into fresh folders;
  - `hpcexp status` over those 1,000 runs answers in at most 1 s.

Both sides are measured in this run on this machine. Jobs are submitted held (--hold) and
cancelled right after, so the 2-core box is never flooded. Must run as an ordinary user
with the real Slurm and Apptainer (the image is built once before timing):

    runuser -u hpcexp-ci -- env HOME=/home/hpcexp-ci PYTHONPATH=$PWD \\
        /home/hpcexp-ci/.cache/hpcexp-test-venv/bin/python bench/bench_slurm.py [--tasks 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def sh(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True, **kw)  # type: ignore[call-overload]


def make_project(root: Path) -> Path:
    rootfs = root / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    busybox = shutil.which("busybox") or "/bin/busybox"
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    for applet in ("sh", "true", "echo"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    sif = root / "busybox.sif"
    sh("apptainer", "build", "-F", str(sif), str(rootfs))
    proj = root / "proj"
    (proj / "experiments" / "bench").mkdir(parents=True)
    (proj / "experiments" / "bench" / "Dockerfile").write_text("FROM busybox:latest\nCMD true\n")
    (proj / "hpcexp.yaml").write_text(f'bases:\n  "busybox:latest": {{sif: {sif}}}\n'
                                      "slurm:\n  time: '1'\n  mem: 10M\n")
    return proj


CPU: list[float] = []


def hpcexp(proj: Path, *args: str, env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    import resource

    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hpcexp", *args], cwd=proj, env=env, capture_output=True,
                          text=True)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"hpcexp {' '.join(args)} failed: {proc.stderr}")
    return dt, proc


def baseline(root: Path, tasks: int) -> tuple[float, float]:
    """sbatch --hold --array=0-(N-1) of a trivial script + N run records written by hpcexp's writer."""
    from hpcexp.core import runs
    from hpcexp.core.config import load_project
    from hpcexp.core.layout import Layout

    proj = load_project(root / "proj")
    layout = Layout(proj)
    script = root / "bare.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --time=1\n#SBATCH --mem=10M\n"
                      f"#SBATCH --output={root}/bare-%A_%a.out\ntrue\n")
    t0 = time.perf_counter()
    job = sh("sbatch", "--parsable", "--hold", f"--array=0-{tasks - 1}", str(script)).stdout.strip()
    t_sbatch = time.perf_counter() - t0
    for i in range(tasks):
        paths = runs.allocate_run(layout, "baseline")
        runs.write_record(paths, runs.RunRecord(experiment="baseline", run_id=paths.dir.name, state="pending",
                                                executor="slurm", params={"i": str(i)},
                                                executor_ids={"job_id": f"{job}_{i}"}))
    dt = time.perf_counter() - t0
    subprocess.run(["scancel", job], check=False)
    shutil.rmtree(layout.experiment_runs("baseline"), ignore_errors=True)
    return dt, t_sbatch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    if os.geteuid() == 0:
        raise SystemExit("run as an ordinary user (Apptainer fails as root here)")
    root = Path(tempfile.mkdtemp(prefix="hpcexp-bench-slurm-"))
    shim = root / "shim"
    shim.mkdir()
    log = root / "sbatch-calls.log"
    real = shutil.which("sbatch")
    # the shim logs how long the real sbatch took, so hpcexp's own time can be told apart from
    # the controller's (slurmctld on this shared 2-core box is sometimes slow to answer)
    (shim / "sbatch").write_text(f'#!/bin/bash\nt0=$(date +%s.%N)\n{real} "$@"\nrc=$?\n'
                                 f'echo "$t0 $(date +%s.%N)" >> {log}\nexit $rc\n')
    (shim / "sbatch").chmod(0o755)
    # a private copy of the package, so bytecode is cached as in an installed package
    code = root / "code"
    shutil.copytree(REPO / "hpcexp", code / "hpcexp", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PATH=f"{shim}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(code),
               XDG_CACHE_HOME=str(root / "cache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    proj = make_project(root)
    hpcexp(proj, "build", "bench", env=env)            # the image is cached before timing
    _, warm = hpcexp(proj, "submit", "bench", "--hold", "--json", env=env)  # warm caches (facts, bytecode)
    subprocess.run(["scancel", *json.loads(warm.stdout)["job_ids"]], check=False)
    sweep_values = ",".join(str(i) for i in range(a.tasks))
    submit_t, own_t, status_t, status_cancel_t, base_t, base_sb, calls = [], [], [], [], [], [], []
    cpu_t: list[float] = []
    try:
        for _ in range(a.repeat):
            total, sb = baseline(root, a.tasks)
            base_t.append(total)
            base_sb.append(sb)
            time.sleep(5)
            before = len(log.read_text().splitlines()) if log.exists() else 0
            dt, proc = hpcexp(proj, "submit", "bench", "--sweep", f"i={sweep_values}", "--hold", "--json", env=env)
            submit_t.append(dt)
            cpu_t.append(CPU[-1])
            lines = log.read_text().splitlines()[before:]
            calls.append(len(lines))
            own_t.append(dt - sum(float(b) - float(a_) for a_, b in (ln.split() for ln in lines)))
            out = json.loads(proc.stdout)
            sweep_id = out["sweep_id"]
            dt, proc = hpcexp(proj, "status", sweep_id, env=env)
            status_t.append(dt)
            assert f"{a.tasks} pending" in proc.stdout, proc.stdout[:300]
            for job in out["job_ids"]:
                subprocess.run(["scancel", job], check=False)
            time.sleep(1)
            dt, proc = hpcexp(proj, "status", sweep_id, env=env)
            status_cancel_t.append(dt)
            assert f"{a.tasks} cancelled" in proc.stdout, proc.stdout[:300]
            dt, proc = hpcexp(proj, "status", sweep_id, env=env)
            status_t.append(dt)
            time.sleep(5)  # let slurmctld finish purging the cancelled arrays before the next round
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    med = statistics.median

    def fmt(xs: list[float]) -> str:
        return f"median {med(xs):.3f} s  [" + ", ".join(f"{x:.2f}" for x in xs) + "]"

    print(f"tasks: {a.tasks}, repeat: {a.repeat}")
    print(f"baseline: bare sbatch --array + {a.tasks} records ........ {fmt(base_t)}")
    print(f"  of which the bare sbatch call ..................... {fmt(base_sb)}")
    print(f"hpcexp submit --sweep ({a.tasks} tasks), wall ........... {fmt(submit_t)}; sbatch calls: {calls}")
    print(f"  hpcexp's own time (wall minus its sbatch call) .... {fmt(own_t)}  target <= 3 s")
    print(f"  CPU time of the hpcexp process (user+sys) ......... {fmt(cpu_t)}")
    print(f"load average during the run: {os.getloadavg()}")
    print(f"ratio submit/baseline (medians): {med(submit_t) / med(base_t):.2f}x  target <= 1.5x")
    print(f"ratio own time / baseline records only: {med(own_t) / max(1e-9, med(base_t) - med(base_sb)):.2f}x")
    print(f"hpcexp status over {a.tasks} runs (nothing changed) .... {fmt(status_t)}  target <= 1 s")
    print(f"hpcexp status right after scancel ({a.tasks} records rewritten): {fmt(status_cancel_t)}")


if __name__ == "__main__":
    main()
