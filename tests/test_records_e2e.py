"""The submit promise under kill -9, through the real Slurm (docs/records.md).

When ``hpcexp submit`` of a 1,000-task sweep is killed at any point, ``status`` shows
every task either absent or with a record whose job id matches Slurm's, and Slurm holds
no task hpcexp has no record of. The kills come at each fault point of the submission
(``HPCEXP_TEST_FAULT``) and at random moments of an uninterrupted submit's duration (the
seed is printed so a failure can be replayed with ``HPCEXP_KILL_SEED``). Jobs are held and
cancelled at the end, so nothing runs on the cluster.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, run_cli
from tests.test_slurm_e2e import make_proj

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.slow]

TASKS = 1000
FAULTS = ("slurm.before_records", "slurm.after_part_records", "slurm.before_sbatch", "slurm.after_sbatch",
          "slurm.after_sweep_record")
RANDOM_KILLS = 6


def _slurm_tasks() -> dict[str, set[str]]:
    """{job name: {task job ids}} of this user's queued jobs, one line per array task."""
    out = subprocess.run(["squeue", "-h", "-r", "--me", "-o", "%i|%j"], capture_output=True, text=True, check=True)
    tasks: dict[str, set[str]] = {}
    for line in out.stdout.splitlines():
        job, _, name = line.strip().partition("|")
        tasks.setdefault(name, set()).add(job)
    return tasks


def _wait_for_orphaned_sbatch(timeout: float = 120) -> None:
    """A submit killed while its ``sbatch`` runs leaves that ``sbatch`` running: it may still
    create the job after the kill. Wait until no ``sbatch`` of this user runs, so the queue
    and the records are compared once the job exists or never will (else the queue is read
    before the job appears, and status, run after, attaches it by name: a race of the test)."""
    deadline = time.monotonic() + timeout
    while subprocess.run(["pgrep", "-x", "-u", str(os.getuid()), "sbatch"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "an sbatch of the killed submit never finished"
        time.sleep(0.1)


def _sweeps(root: Path) -> set[str]:
    d = root / "runs" / ".sweeps"
    return {p.name for p in d.iterdir() if p.is_dir()} if d.is_dir() else set()


def _submit_argv() -> list[str]:
    return ["submit", "echo", "--sweep", "i=" + ",".join(str(i) for i in range(TASKS)), "--hold", "--json"]


def _check_promise(p: dict[str, Any], sweep_id: str, what: str) -> tuple[int, int]:
    """Every Slurm task of the sweep has a record holding its job id; every record's job id
    is a task Slurm has. Returns (records, tasks in Slurm)."""
    queued = {job for name, jobs in _slurm_tasks().items() if name.startswith(f"hpcexp-{sweep_id}-")
              for job in jobs}
    proc = run_cli("status", sweep_id, "--json", cwd=p["root"], env=p["env"])
    if proc.returncode == 2 and "no run" in proc.stderr:
        rows: list[dict[str, Any]] = []
    else:
        assert proc.returncode == 0, (what, proc.stderr)
        rows = json.loads(proc.stdout)
    recorded = {r["executor_ids"].get("job_id") for r in rows} - {None}
    assert queued <= recorded, (what, f"{len(queued - recorded)} task(s) in Slurm without a record, e.g. "
                                      f"{sorted(queued - recorded)[:3]}")
    assert recorded <= queued, (what, f"record(s) naming jobs Slurm does not have: {sorted(recorded - queued)[:3]}")
    for r in rows:
        if r["executor_ids"].get("job_id"):
            assert r["state"] == "pending", (what, r["run_id"], r["state"], r.get("reason"))
        else:  # never submitted: young, so still `submitting` (later `lost`), never pending or failed
            assert r["state"] == "submitting", (what, r["run_id"], r["state"])
    assert len({r["task_index"] for r in rows}) == len(rows), (what, "a task listed twice")
    return len(rows), len(queued)


def test_kill_9_at_any_point_of_a_1000_task_submit_loses_nothing_it_reported(tmp_path: Path,
                                                                             busybox_sif: Path) -> None:
    p = make_proj(tmp_path, busybox_sif, tmp_path / "proj")
    built = run_cli("build", "echo", cwd=p["root"], env=p["env"])
    assert built.returncode == 0, built.stderr
    seed = int(os.environ.get("HPCEXP_KILL_SEED") or time.time())
    print(f"kill seed: {seed} (HPCEXP_KILL_SEED={seed} replays it)")
    rng = random.Random(seed)
    env = dict(os.environ, **p["env"])
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    env.pop("HPCEXP_PROJECT", None)
    seen: set[str] = set()
    outcomes: list[tuple[str, int, int]] = []
    try:
        # an uninterrupted submit: every task recorded with Slurm's job id, and how long it takes
        t0 = time.monotonic()
        proc = run_cli(*_submit_argv(), cwd=p["root"], env=p["env"])
        full = time.monotonic() - t0
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        seen |= _sweeps(p["root"])
        assert len(out["runs"]) == TASKS and all(r["state"] == "pending" for r in out["runs"])
        assert _check_promise(p, out["sweep_id"], "uninterrupted") == (TASKS, TASKS)

        trials = [(f"fault {f}", {"HPCEXP_TEST_FAULT": f"{f}:kill"}, None) for f in FAULTS]
        # random moments: a third anywhere, the rest in the part after start-up and the image
        # check (about the first 40 % of the time), where the records and sbatch are
        delays = [rng.uniform(0, full) for _ in range(RANDOM_KILLS // 3)]
        delays += [rng.uniform(0.4 * full, full) for _ in range(RANDOM_KILLS - len(delays))]
        trials += [(f"kill -9 after {d:.2f} s", {}, d) for d in delays]
        for what, extra, delay in trials:
            child = subprocess.Popen([sys.executable, "-m", "hpcexp", *_submit_argv()], cwd=p["root"],
                                     env=dict(env, **extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
            if delay is not None:
                time.sleep(delay)
                child.send_signal(signal.SIGKILL)
            _, err = child.communicate(timeout=600)
            _wait_for_orphaned_sbatch()
            new = _sweeps(p["root"]) - seen
            seen |= new
            if delay is None:
                assert child.returncode == -9, (what, child.returncode, err)
            assert len(new) <= 1, (what, new)
            for sweep_id in new:
                outcomes.append((what, *_check_promise(p, sweep_id, what)))
            if not new:
                outcomes.append((what, 0, 0))
        # a fault point before sbatch leaves records but no job; after it, every task has both
        by_what = {w: (n, q) for w, n, q in outcomes}
        assert by_what["fault slurm.before_sbatch"] == (TASKS, 0)
        assert by_what["fault slurm.after_sbatch"] == (TASKS, TASKS)
        assert by_what["fault slurm.after_sweep_record"] == (TASKS, TASKS)
        print("\n".join(f"{w}: {n} records, {q} tasks in Slurm" for w, n, q in outcomes))
    finally:
        names = [n for n in _slurm_tasks() if any(n.startswith(f"hpcexp-{s}-") for s in seen)]
        for name in names:
            subprocess.run(["scancel", "--name", name], check=False)
