"""Checkpoint signal and requeue policy, end to end through the real Slurm and Apptainer.

The payload counts to N, saving its position in ``$HPCEXP_CHECKPOINT_DIR``; its job has
``--time=1`` and the warning signal 50 s before the limit, so Slurm signals each attempt
after 10-40 s (its timer runs every 30 s or so). Slurm delays a requeued job's start by
about two minutes (BeginTime); the test, as the job's owner may, brings it forward.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slurm]

COUNT_SH = r'''
ck="$HPCEXP_CHECKPOINT_DIR/position"
i=0
if [ -f "$ck" ]; then i=$(cat "$ck"); fi
echo "attempt $HPCEXP_ATTEMPT starts at $i"
stop=0
trap 'stop=1' USR1
while [ "$i" -lt "${HPCEXP_PARAM_n:-10}" ]; do
  if [ "$stop" = 1 ]; then echo "checkpoint at $i"; exit 0; fi
  sleep 0.5
  i=$((i + 1))
  echo "$i" > "$ck.tmp" && mv "$ck.tmp" "$ck"
done
echo "$i" > results/final.txt
echo "counted to $i"
if [ "${HPCEXP_PARAM_fail:-0}" = 1 ]; then exit 3; fi
if [ -n "${HPCEXP_PARAM_sleep:-}" ]; then sleep "$HPCEXP_PARAM_sleep"; fi
'''

# no checkpoint: the first attempt runs into the time limit, the second finishes at once
FIRST_TIMES_OUT_SH = r'''
echo "attempt $HPCEXP_ATTEMPT"
if [ "$HPCEXP_ATTEMPT" = 1 ]; then sleep 300; fi
echo "second try" > results/final.txt
'''


@pytest.fixture
def proj(tmp_path: Path, busybox_sif: Path) -> dict[str, Any]:
    root = tmp_path / "proj"
    exp = root / "experiments" / "count"
    exp.mkdir(parents=True)
    (exp / "Dockerfile").write_text("FROM busybox:latest\nCOPY . /app\nWORKDIR /app\n")
    (exp / "count.sh").write_text(COUNT_SH)
    (exp / "first.sh").write_text(FIRST_TIMES_OUT_SH)
    (root / "hpcexp.yaml").write_text(
        f'bases:\n  "busybox:latest": {{sif: {busybox_sif}}}\n'
        "experiments:\n"
        "  count:\n"
        "    command: [/bin/sh, /app/count.sh]\n"
        "    slurm: {mem: 200M, time: '1'}\n"
        "    checkpoint: {signal: USR1, before: 50s}\n"
        "    requeue: {on: [timeout, preempted, node_fail], max_attempts: 6}\n"
        "  spent:\n"
        "    path: experiments/count\n"
        "    command: [/bin/sh, /app/count.sh]\n"
        "    slurm: {mem: 200M, time: '1'}\n"
        "    checkpoint: {signal: USR1, before: 50s}\n"
        "    requeue: {on: [timeout], max_attempts: 2}\n"
        "  plain:\n"
        "    path: experiments/count\n"
        "    command: [/bin/sh, /app/first.sh]\n"
        "    slurm: {mem: 200M, time: '1'}\n"
        "    requeue: {on: [timeout], max_attempts: 2}\n")
    return {"root": root, "env": {"XDG_CACHE_HOME": str(tmp_path / "cache")}}


def cli(p: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=p["root"], env=p["env"])


def submit(p: dict[str, Any], *args: str) -> dict[str, Any]:
    proc = cli(p, "submit", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["runs"][0]


def hurry_requeued(job_ids: set[str]) -> None:
    """Start a requeued job now instead of after Slurm's BeginTime delay (the owner may)."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %r", "-j", ",".join(sorted(job_ids))],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        job, _, reason = line.partition(" ")
        if reason.strip() == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)


def wait_all(p: dict[str, Any], run_ids: list[str], jobs: set[str], timeout: float = 420) -> dict[str, dict]:
    terminal = {"succeeded", "failed", "cancelled", "timeout", "out_of_memory", "node_fail", "lost", "unknown"}
    deadline = time.monotonic() + timeout
    while True:
        recs = {}
        for rid in run_ids:
            proc = cli(p, "status", rid, "--json")
            assert proc.returncode == 0, proc.stderr
            recs[rid] = json.loads(proc.stdout)[0]
        if all(r["state"] in terminal for r in recs.values()):
            return recs
        assert time.monotonic() < deadline, recs
        hurry_requeued(jobs)
        time.sleep(1)


@pytest.mark.slow
def test_checkpointing_payload_finishes_over_several_attempts_and_budget_ends_in_timeout(
        proj: dict[str, Any]) -> None:
    done = submit(proj, "count", "-p", "n=90")                 # 45 s of work, each attempt 10-40 s
    spent = submit(proj, "spent", "-p", "n=100000")             # never finishes: 2 attempts, then timeout
    jobs = {done["executor_ids"]["job_id"], spent["executor_ids"]["job_id"]}
    recs = wait_all(proj, [done["run_id"], spent["run_id"]], jobs)

    rec = recs[done["run_id"]]
    run_dir = Path(rec["dir"])
    assert rec["state"] == "succeeded", rec
    assert (run_dir / "results" / "final.txt").read_text() == "90\n"
    assert rec["attempt"] >= 2 and len(rec["attempts"]) == rec["attempt"] - 1, rec
    starts = []
    for a in range(1, rec["attempt"] + 1):
        out = (run_dir / ("stdout.log" if a == 1 else f"stdout.{a}.log")).read_text()
        assert f"attempt {a} starts at" in out, out
        starts.append(int(out.split("starts at ")[1].split()[0]))
    assert starts[0] == 0 and starts == sorted(starts) and len(set(starts)) == len(starts), starts
    for entry in rec["attempts"]:
        assert entry["note"] == "saved a checkpoint and requeued itself" and entry["checkpointed"] is True
        assert entry["started_at"] and entry["ended_at"] and entry["exit_code"] == 0
        assert (run_dir / entry["stdout"]).is_file() and (run_dir / entry["stderr"]).exists()
        assert "checkpoint at" in (run_dir / entry["stdout"]).read_text()
    assert "counted to 90" in (run_dir / f"stdout.{rec['attempt']}.log").read_text()
    script = (run_dir / "job.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@50" in script and "#SBATCH --requeue" in script

    rec = recs[spent["run_id"]]
    assert rec["state"] == "timeout", rec
    assert rec["attempt"] == 2 and len(rec["attempts"]) == 1, rec
    assert "requeue budget is spent (attempt 2 of max_attempts=2)" in rec["reason"], rec
    assert "saved a checkpoint on SIGUSR1" in rec["reason"]
    assert int((Path(rec["dir"]) / "results" / "checkpoint" / "position").read_text()) > 0


def test_finished_failed_and_cancelled_jobs_are_never_requeued(proj: dict[str, Any]) -> None:
    ok = submit(proj, "count", "-p", "n=2")
    bad = submit(proj, "count", "-p", "n=2", "-p", "fail=1")
    cancel = submit(proj, "count", "-p", "n=2", "-p", "sleep=300")
    deadline = time.monotonic() + 60
    while json.loads(cli(proj, "status", cancel["run_id"], "--json").stdout)[0]["state"] != "running":
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.5)
    assert cli(proj, "stop", cancel["run_id"]).returncode == 0
    jobs = {r["executor_ids"]["job_id"] for r in (ok, bad, cancel)}
    recs = wait_all(proj, [ok["run_id"], bad["run_id"], cancel["run_id"]], set(), timeout=120)
    assert [recs[r["run_id"]]["state"] for r in (ok, bad, cancel)] == ["succeeded", "failed", "cancelled"], recs
    assert recs[bad["run_id"]]["exit_code"] == 3
    time.sleep(2)  # a requeue would show up in the queue now
    assert subprocess.run(["squeue", "-h", "-j", ",".join(sorted(jobs))], capture_output=True,
                          text=True).stdout.strip() == ""
    for r in (ok, bad, cancel):
        rec = json.loads(cli(proj, "status", r["run_id"], "--json").stdout)[0]
        assert rec["attempt"] == 1 and rec["attempts"] == [] and "requeue" not in (rec["reason"] or ""), rec


@pytest.mark.slow
def test_a_timeout_without_checkpoint_is_requeued_by_hpcexp_on_status(proj: dict[str, Any]) -> None:
    run = submit(proj, "plain")
    job = run["executor_ids"]["job_id"]
    recs = wait_all(proj, [run["run_id"]], {job}, timeout=300)
    rec = recs[run["run_id"]]
    assert rec["state"] == "succeeded" and rec["attempt"] == 2, rec
    (first,) = rec["attempts"]
    assert first["note"] == "requeued by hpcexp after timeout", first
    assert rec["executor_ids"]["requeued_after"] == {"1": "timeout"}
    run_dir = Path(rec["dir"])
    assert (run_dir / "stdout.log").read_text() == "attempt 1\n"
    assert (run_dir / "stdout.2.log").read_text() == "attempt 2\n"
    assert (run_dir / "results" / "final.txt").read_text() == "second try\n"
