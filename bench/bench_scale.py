"""Costs that grow with the work asked, not with the project's history (issue 18).

Two parts, each against baselines measured in the same run, rounds interleaved (the order
of the contenders rotates each round), wall and CPU time (user+sys of the child) given:

``submit``: a sweep of N tasks (100, 1,000, 10,000; 10,000 is several arrays under one
sweep id, as MaxArraySize asks), all held and cancelled right after, by
  - a bare ``sbatch --parsable --hold --array=...`` per array (the floor),
  - submitit's ``AutoExecutor.map_array`` in one script (its whole run: interpreter, import,
    pickles, sbatch; at 10,000 one ``map_array`` per 1,000 items, as submitit cannot split
    an array beyond MaxArraySize itself), from a separate venv (``--submitit-python``),
  - ``hpcexp submit EXP --sweep i=0,...,N-1 --hold --json`` (the whole process);
then ``hpcexp status SWEEP --json`` of those N pending tasks against ``squeue -r -j`` of
their jobs. Targets: 1,000-task submit at most submitit's time (median of the per-round
ratios); 10,000 within 10x of 1,000.

``history``: two projects, each with a held 1,000-task sweep, one holding 1,000 other
(finished, synthetic) runs, the other 100,000. ``status SWEEP --json`` must be at most
0.3 s and the same in both (within 1.2x); ``status RUN``, ``logs RUN``, ``status @last``,
``status EXPERIMENT`` and ``status PREFIX`` are measured in both too.

Run as an ordinary user with the real Slurm and Apptainer:

    runuser -u hpcexp-ci -- env HOME=/home/hpcexp-ci PYTHONPATH=$PWD \\
        /home/hpcexp-ci/.cache/hpcexp-test-venv/bin/python bench/bench_scale.py \\
        --submitit-python /path/to/venv-with-submitit/bin/python [--sizes 100,1000,10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_slurm import make_project  # noqa: E402
from synth_runs import synth  # noqa: E402

SUBMITIT_CHILD = r'''
import sys, time
t0 = time.perf_counter()
import submitit
folder, n, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
ex.update_parameters(timeout_min=1, slurm_mem="10M", slurm_array_parallelism=chunk,
                     slurm_additional_parameters={"hold": True})
ids = []
for start in range(0, n, chunk):
    jobs = ex.map_array(abs, range(start, min(n, start + chunk)))
    ids.append(jobs[0].job_id.split("_")[0])
print(" ".join(ids))
'''


def timed(argv: list[str], *, env: dict[str, str], cwd: Path | None = None) -> tuple[float, float, str]:
    """(wall s, CPU s of the child, stdout); fails loudly."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall, r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, proc.stdout


def hpcexp(proj: Path, *args: str, env: dict[str, str]) -> tuple[float, float, str]:
    return timed([sys.executable, "-m", "hpcexp", *args], env=env, cwd=proj)


def scancel(ids: list[str], env: dict[str, str] | None = None) -> None:
    if env is not None and env.get("BENCH_STANDIN_STATE"):
        open(env["BENCH_STANDIN_STATE"], "w").close()   # the stand-in forgets them
    elif ids:
        subprocess.run(["scancel", *ids], check=False, capture_output=True, env=env)


def max_array_size() -> int:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.split("=")[0].strip() == "MaxArraySize":
            return int(line.split("=")[1])
    return 1001


def quiet_queue(timeout: float = 120) -> None:
    """Wait until this user's cancelled arrays have left the queue (slurmctld is slow to
    purge thousands of tasks; the next round must not pay for the previous one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "--me", "-t", "CG"], capture_output=True, text=True).stdout
        if not out.strip():
            return
        time.sleep(1)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


STANDIN = r'''#!/usr/bin/env python3
"""A stand-in sbatch/squeue/scancel: accepts every (array) job at once and lists them as held."""
import json, os, re, sys
state = os.environ["BENCH_STANDIN_STATE"]
name = os.path.basename(sys.argv[0])
args = sys.argv[1:]
if name == "sbatch":
    text = open(args[-1]).read()
    def opt(key):
        for a in args:
            if a.startswith(f"--{key}="):
                return a.split("=", 1)[1]
        m = re.search(rf"^#SBATCH --{key}=(\S+)", text, re.M)
        return m.group(1) if m else None
    spec = (opt("array") or "0-0").split("%")[0]
    size = int(spec.split("-")[1]) + 1 if "-" in spec else 1
    counter = state + ".next"
    job = int(open(counter).read()) if os.path.exists(counter) else 500000
    open(counter, "w").write(str(job + 1))
    with open(state, "a") as fh:
        fh.write(json.dumps([job, size, opt("job-name") or "x"]) + "\n")
    print(job if "--parsable" in args else f"Submitted batch job {job}")
elif name == "squeue":
    if os.path.exists(state):
        for line in open(state):
            job, size, jname = json.loads(line)
            print(f"{job}_[0-{size - 1}]|{job}|0-{size - 1}|PENDING|JobHeldUser|{jname}||0:00")
'''


def standin(root: Path, env: dict[str, str]) -> dict[str, str]:
    """PATH and state of the stand-in Slurm (for sizes the test cluster cannot hold)."""
    d = root / "standin"
    d.mkdir(exist_ok=True)
    for cmd in ("sbatch", "squeue", "scancel"):
        (d / cmd).write_text(STANDIN)
        (d / cmd).chmod(0o755)
    return dict(env, PATH=f"{d}{os.pathsep}{env['PATH']}", BENCH_STANDIN_STATE=str(root / "standin.jsonl"))


def max_job_count() -> int:
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.split("=")[0].strip() == "MaxJobCount":
            return int(line.split("=")[1])
    return 10000


def tasks_held_by_slurm() -> int:
    """Job records the controller counts against MaxJobCount: each array counts its tasks,
    cancelled ones too until MinJobAge has passed."""
    out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True).stdout
    total = 0
    for line in out.splitlines():
        m = re.search(r"ArrayTaskId=(\d+)-(\d+)", line)
        total += int(m.group(2)) - int(m.group(1)) + 1 if m else 1
    return total


def capacity_wait(n: int, limit: int, timeout: float = 400) -> None:
    """Wait until the controller can take N more tasks (MaxJobCount, with room for others)."""
    deadline = time.monotonic() + timeout
    while tasks_held_by_slurm() + n > limit - 300 and time.monotonic() < deadline:
        time.sleep(5)


def sbatch_shim(root: Path, env: dict[str, str]) -> tuple[dict[str, str], Path]:
    """A PATH where ``sbatch`` logs how long the real one took: the controller of a small
    test cluster sometimes stalls for seconds after thousands of tasks were cancelled, and
    that time is the controller's, not the submitter's (reported apart as "own")."""
    shim = root / "shim"
    shim.mkdir(exist_ok=True)
    log = root / "sbatch-seconds.log"
    real = shutil.which("sbatch")
    (shim / "sbatch").write_text(f'#!/bin/bash\nt0=$(date +%s.%N)\n{real} "$@"\nrc=$?\n'
                                 f'echo "$t0 $(date +%s.%N)" >> {log}\nexit $rc\n')
    (shim / "sbatch").chmod(0o755)
    return dict(env, PATH=f"{shim}{os.pathsep}{env['PATH']}"), log


def sbatch_seconds(log: Path) -> float:
    if not log.exists():
        return 0.0
    return sum(float(b) - float(a) for a, b in (line.split() for line in log.read_text().splitlines()))


def submit_part(root: Path, env: dict[str, str], sizes: list[int], rounds: int, submitit_py: str | None) -> None:
    env, shim_log = sbatch_shim(root, env)
    proj = make_project(root / "submit")
    hpcexp(proj, "build", "bench", env=env)
    _, _, warm = hpcexp(proj, "submit", "bench", "--hold", "--json", env=env)   # facts, bytecode
    scancel(json.loads(warm)["job_ids"])
    chunk = max_array_size()
    bare_script = root / "bare.sbatch"
    bare_script.write_text(f"#!/bin/bash\n#SBATCH --time=1\n#SBATCH --mem=10M\n#SBATCH --output={root}/bare-%A_%a.out\n"
                           "true\n")
    results: dict[int, dict[str, list[tuple[float, float]]]] = {}
    ratios: dict[int, list[float]] = {}
    limit = max_job_count()
    real_env = env
    for n in sizes:
        # MaxJobCount counts every array task (cancelled ones for MinJobAge): a sweep the test
        # cluster cannot hold at all is submitted by every contender to the same stand-in
        fake = n + 300 > limit
        env = standin(root, real_env) if fake else real_env
        if fake:
            print(f"\n{n} tasks exceed this cluster's MaxJobCount ({limit}): all three submit to a stand-in "
                  "sbatch that accepts at once (the real sbatch of 1,000 tasks takes 10-30 ms), squeue lists them")
        res: dict[str, list[tuple[float, float]]] = {k: [] for k in ("bare", "submitit", "hpcexp", "status",
                                                                    "squeue")}
        own: dict[str, list[float]] = {k: [] for k in ("bare", "submitit", "hpcexp")}
        ratios[n] = []
        for r in range(rounds):
            order = ["bare", "submitit", "hpcexp"]
            order = order[r % 3:] + order[:r % 3]
            this: dict[str, float] = {}
            for who in order:
                if not fake:
                    capacity_wait(n, limit)
                sb0 = sbatch_seconds(shim_log)
                if who == "bare":
                    t0 = time.perf_counter()
                    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    ids = []
                    for start in range(0, n, chunk):
                        size = min(chunk, n - start)
                        ids.append(subprocess.run(["sbatch", "--parsable", "--hold", f"--array=0-{size - 1}",
                                                   str(bare_script)], capture_output=True, text=True, env=env,
                                                  check=True).stdout.strip())
                    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    res["bare"].append((time.perf_counter() - t0,
                                        c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime))
                    own["bare"].append(res["bare"][-1][0])   # all of it is sbatch
                    scancel(ids, env)
                elif who == "submitit":
                    if not submitit_py:
                        continue
                    folder = root / f"submitit-{n}-{r}"
                    wall, cpu, out = timed([submitit_py, "-c", SUBMITIT_CHILD, str(folder), str(n),
                                            str(min(n, 1000))], env=env)
                    res["submitit"].append((wall, cpu))
                    this["submitit"] = wall
                    own["submitit"].append(wall - (sbatch_seconds(shim_log) - sb0))
                    scancel(out.split(), env)
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    values = ",".join(str(i) for i in range(n))
                    wall, cpu, out = hpcexp(proj, "submit", "bench", "--sweep", f"i={values}", "--hold", "--json",
                                            env=env)
                    res["hpcexp"].append((wall, cpu))
                    this["hpcexp"] = wall
                    own["hpcexp"].append(wall - (sbatch_seconds(shim_log) - sb0))
                    sub = json.loads(out)
                    assert len(sub["runs"]) == n and len(sub["job_ids"]) == -(-n // chunk), sub["job_ids"]
                    # status of those N pending tasks, and the bare squeue of the same jobs
                    for _ in range(2):
                        wall_s, cpu_s, st = hpcexp(proj, "status", sub["sweep_id"], "--json", env=env)
                        res["status"].append((wall_s, cpu_s))
                        assert sum(1 for row in json.loads(st) if row["state"] == "pending") == n
                        res["squeue"].append(timed(["squeue", "-h", "-r", "-j", ",".join(sub["job_ids"])],
                                                   env=env)[:2])
                    scancel(sub["job_ids"], env)
                    shutil.rmtree(proj / "runs" / "bench", ignore_errors=True)
                quiet_queue()
            if "submitit" in this:
                ratios[n].append(this["hpcexp"] / this["submitit"])
        results[n] = res
        print(f"\n== submit, {n} tasks, {rounds} rounds (load {os.getloadavg()[0]:.1f}) ==")
        for k, v in res.items():
            if v:
                walls, cpus = [w for w, _ in v], [c for _, c in v]
                print(f"  {k:9s} wall median {med(walls):7.3f} s  CPU median {med(cpus):7.3f} s"
                      f"   [{', '.join(f'{w:.2f}' for w in walls)}]")
        for k in ("submitit", "hpcexp"):
            if own[k]:
                print(f"  {k:9s} own time (wall minus its sbatch calls) median {med(own[k]):7.3f} s"
                      f"   [{', '.join(f'{w:.2f}' for w in own[k])}]")
        if ratios[n]:
            print(f"  hpcexp / submitit, median of per-round ratios: {med(ratios[n]):.2f}x"
                  f"  [{', '.join(f'{x:.2f}' for x in ratios[n])}]")
            own_r = [h / s_ for h, s_ in zip(own["hpcexp"], own["submitit"])]
            print(f"  the same, own time: {med(own_r):.2f}x;  CPU: "
                  f"{med([h[1] / s_[1] for h, s_ in zip(res['hpcexp'], res['submitit'])]):.2f}x")
    if 1000 in results and 10000 in results:
        g = med([w for w, _ in results[10000]["hpcexp"]]) / med([w for w, _ in results[1000]["hpcexp"]])
        print(f"\nhpcexp submit 10,000 / 1,000 tasks: {g:.2f}x (target <= 10x)")
        gs = med([w for w, _ in results[10000]["status"]]) / med([w for w, _ in results[1000]["status"]])
        print(f"hpcexp status SWEEP 10,000 / 1,000 tasks: {gs:.2f}x")


def history_part(root: Path, env: dict[str, str], rounds: int, others: int) -> None:
    projects: dict[str, dict[str, Any]] = {}
    for label, count in (("small", 1000), ("large", others)):
        proj = make_project(root / label)
        hpcexp(proj, "build", "bench", env=env)
        t0 = time.perf_counter()
        made = synth(proj / "runs", count, experiments=10)
        print(f"{label}: {count} synthetic finished runs written in {time.perf_counter() - t0:.1f} s")
        values = ",".join(str(i) for i in range(1000))
        _, _, out = hpcexp(proj, "submit", "bench", "--sweep", f"i={values}", "--hold", "--json", env=env)
        sub = json.loads(out)
        exp, rid = made[len(made) // 2]
        projects[label] = {"proj": proj, "sweep": sub["sweep_id"], "jobs": sub["job_ids"], "run": rid,
                           "prefix": rid[:22], "exp": exp}
    queries = {
        "status SWEEP --json (1,000 pending)": lambda p: ("status", p["sweep"], "--json"),
        "status RUN": lambda p: ("status", p["run"]),
        "logs RUN": lambda p: ("logs", p["run"]),
        "status PREFIX": lambda p: ("status", p["prefix"]),
        "status EXPERIMENT (its latest run)": lambda p: ("status", p["exp"]),
        "status @last": lambda p: ("status", "@last"),
        "--version (the floor: interpreter, click)": lambda p: ("--version",),
    }
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        for r in range(rounds):
            for q, argv in queries.items():
                labels = ["small", "large"] if r % 2 == 0 else ["large", "small"]
                for label in labels:
                    p = projects[label]
                    wall, cpu, out = hpcexp(p["proj"], *argv(p), env=env)
                    if q.startswith("status SWEEP"):
                        assert sum(1 for row in json.loads(out) if row["state"] == "pending") == 1000
                    times.setdefault((q, label), []).append((wall, cpu))
    finally:
        for p in projects.values():
            scancel(p["jobs"])
    print(f"\n== history: 1,000 vs {others:,} other runs in the project, {rounds} rounds "
          f"(load {os.getloadavg()[0]:.1f}) ==")
    for q in queries:
        s, lg = times[(q, "small")], times[(q, "large")]
        ws, wl = med([w for w, _ in s]), med([w for w, _ in lg])
        cs, cl = med([c for _, c in s]), med([c for _, c in lg])
        print(f"  {q:42s} 1k: {ws:6.3f} s (CPU {cs:5.3f})  {others // 1000}k: {wl:6.3f} s (CPU {cl:5.3f})"
              f"  ratio {wl / ws:4.2f}x wall, {cl / cs:4.2f}x CPU")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--history-rounds", type=int, default=7)
    ap.add_argument("--others", type=int, default=100_000)
    ap.add_argument("--submitit-python", default=None, help="a python with submitit installed (bench only)")
    ap.add_argument("--only", choices=("submit", "history"), default=None)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    if os.geteuid() == 0:
        raise SystemExit("run as an ordinary user (Apptainer fails as root here)")
    root = Path(tempfile.mkdtemp(prefix="hpcexp-bench-scale-"))
    code = root / "code"   # a private copy of the package, so bytecode is cached as when installed
    shutil.copytree(REPO / "hpcexp", code / "hpcexp", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(code), XDG_CACHE_HOME=str(root / "cache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("HPCEXP_PROJECT", None)
    print(f"MaxArraySize {max_array_size()}, python {sys.version.split()[0]}, {os.cpu_count()} cores")
    try:
        if a.only in (None, "submit"):
            submit_part(root, env, [int(x) for x in a.sizes.split(",")], a.rounds, a.submitit_python)
        if a.only in (None, "history"):
            history_part(root, env, a.history_rounds, a.others)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
