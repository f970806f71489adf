"""End to end through the real single-node Slurm and Apptainer, as an ordinary user.

Lean on purpose: a busybox image, jobs of a second or two. Each way a job ends (time
limit, scancel, memory, preemption, node failure, payload failure) is produced for real,
with and without accounting, in test_slurm_endings_e2e.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import assert_clean_error, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slurm]

RUN_SH = r'''
for a in "$@"; do printf 'arg[%s]\n' "$a"; done
printf 'env[%s]\n' "${HPCEXP_PARAM_msg:-}"
printf '%s\n' "$@" > results/args.txt
printf '%s' "${HPCEXP_PARAM_msg:-}" > results/env.txt
if [ "${HPCEXP_PARAM_fail:-0}" = 1 ]; then echo "task fails on purpose" >&2; exit 3; fi
if [ -n "${HPCEXP_PARAM_sleep:-}" ]; then sleep "$HPCEXP_PARAM_sleep"; fi
echo done
'''


@pytest.fixture
def proj(tmp_path: Path, busybox_sif: Path) -> dict[str, Any]:
    return make_proj(tmp_path, busybox_sif, tmp_path / "proj")


def make_proj(tmp_path: Path, busybox_sif: Path, root: Path) -> dict[str, Any]:
    exp = root / "experiments" / "echo"
    exp.mkdir(parents=True)
    (exp / "Dockerfile").write_text("FROM busybox:latest\nCOPY . /app\nWORKDIR /app\n")
    (exp / "run.sh").write_text(RUN_SH)
    (root / "hpcexp.yaml").write_text(
        f'bases:\n  "busybox:latest": {{sif: {busybox_sif}}}\n'
        "slurm:\n  time: '5'\n"
        "experiments:\n  echo:\n    command: [/bin/sh, /app/run.sh]\n    slurm: {mem: 200M}\n")
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    log = tmp_path / "sbatch-calls.log"
    real = subprocess.run(["bash", "-c", "command -v sbatch"], capture_output=True, text=True).stdout.strip()
    (shim_dir / "sbatch").write_text(f'#!/bin/bash\nprintf "%s\\n" "$*" >> {log}\nexec {real} "$@"\n')
    (shim_dir / "sbatch").chmod(0o755)
    env = {"PATH": f"{shim_dir}{os.pathsep}{os.environ['PATH']}", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    return {"root": root, "env": env, "log": log, "tmp": tmp_path}


def cli(p: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=p["root"], env=p["env"])


def sbatch_calls(p: dict[str, Any]) -> list[str]:
    return p["log"].read_text().splitlines() if p["log"].exists() else []


def wait_terminal(p: dict[str, Any], ref: str, timeout: float = 120) -> list[dict[str, Any]]:
    terminal = {"succeeded", "failed", "cancelled", "timeout", "out_of_memory", "node_fail", "lost", "unknown"}
    deadline = time.monotonic() + timeout
    while True:
        proc = cli(p, "status", ref, "--json")
        assert proc.returncode == 0, proc.stderr
        recs = json.loads(proc.stdout)
        if all(r["state"] in terminal for r in recs) or time.monotonic() > deadline:
            return recs
        time.sleep(1)


def test_submit_runs_and_status_logs_and_script_are_right(proj: dict[str, Any]) -> None:
    canary = proj["tmp"] / "pwned"
    hostile = f"a b; $(touch {canary}) `touch {canary}` \"q\" 'x' \\z"
    proc = cli(proj, "submit", "echo", "-p", f"msg={hostile}", "--json")
    assert proc.returncode == 0, proc.stderr
    run = json.loads(proc.stdout)["runs"][0]
    assert run["state"] == "pending" and run["executor_ids"]["job_id"]
    (rec,) = wait_terminal(proj, run["run_id"])
    assert rec["state"] == "succeeded" and rec["exit_code"] == 0, rec
    run_dir = Path(rec["dir"])
    assert (run_dir / "job.sbatch").read_text().startswith("#!/bin/bash\n#SBATCH ")
    assert (run_dir / "results" / "args.txt").read_text() == f"--msg={hostile}\n"
    assert (run_dir / "results" / "env.txt").read_text() == hostile       # verbatim through APPTAINERENV_
    assert not canary.exists()
    logs = cli(proj, "logs", run["run_id"])
    assert logs.returncode == 0 and "done" in logs.stdout and f"env[{hostile}]" in logs.stdout
    status = cli(proj, "status", run["run_id"])
    assert "succeeded" in status.stdout
    assert len(sbatch_calls(proj)) == 1


def test_sweep_is_one_array_and_resubmit_failed_submits_only_those(proj: dict[str, Any]) -> None:
    proc = cli(proj, "submit", "echo", "--sweep", "a=1,2,3", "--sweep", "fail=0,1", "--max-parallel", "3",
               "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    sweep_id = out["sweep_id"]
    assert len(out["job_ids"]) == 1 and len(out["runs"]) == 6
    assert len(sbatch_calls(proj)) == 1
    recs = wait_terminal(proj, sweep_id)
    assert [r["params"] for r in recs] == [{"a": a, "fail": f} for a in "123" for f in "01"]
    assert [r["state"] for r in recs] == ["succeeded", "failed"] * 3
    assert {r["executor_ids"]["array_job_id"] for r in recs} == {out["job_ids"][0]}
    assert all((Path(r["dir"]) / "results" / "args.txt").read_text() == f"--a={r['params']['a']}\n"
               f"--fail={r['params']['fail']}\n" for r in recs)
    summary = cli(proj, "status", sweep_id)
    assert "3 succeeded, 3 failed" in summary.stdout
    logs = cli(proj, "logs", sweep_id)
    assert logs.returncode == 0 and logs.stdout.count("done") == 3
    # resubmit --failed: one new array with exactly the three failed tasks
    proc = cli(proj, "resubmit", sweep_id, "--failed", "--json")
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert [r["task_index"] for r in again["runs"]] == [1, 3, 5]
    assert len(sbatch_calls(proj)) == 2 and "--array=0-2" not in sbatch_calls(proj)[1]
    recs = wait_terminal(proj, sweep_id)
    failed = [r for r in recs if r["task_index"] in (1, 3, 5)]
    assert all(r["attempt"] == 2 and r["attempts"][0]["exit_code"] == 3 for r in failed)
    assert all((Path(r["dir"]) / "stderr.log").exists() and (Path(r["dir"]) / "stderr.2.log").exists()
               for r in failed)


def test_cancel_pending_and_vanished_image(proj: dict[str, Any]) -> None:
    proc = cli(proj, "submit", "echo", "--hold", "--json")
    assert proc.returncode == 0, proc.stderr
    held = json.loads(proc.stdout)["runs"][0]
    stop = cli(proj, "stop", held["run_id"])
    assert stop.returncode == 0, stop.stderr
    (rec,) = wait_terminal(proj, held["run_id"], timeout=30)
    assert rec["state"] == "cancelled", rec
    # `hpcexp stop SWEEP` cancels the whole array in one scancel
    proc = cli(proj, "submit", "echo", "--sweep", "a=1,2,3", "--hold", "--json")
    sweep_id = json.loads(proc.stdout)["sweep_id"]
    assert cli(proj, "stop", sweep_id).returncode == 0
    recs = wait_terminal(proj, sweep_id, timeout=30)
    assert [r["state"] for r in recs] == ["cancelled"] * 3, recs
    # the image vanishes between submission and start: the job fails fast and says why
    proc = cli(proj, "submit", "echo", "--hold", "--json")
    run = json.loads(proc.stdout)["runs"][0]
    Path(run["image"]).unlink()
    subprocess.run(["scontrol", "release", run["executor_ids"]["job_id"]], check=True)
    (rec,) = wait_terminal(proj, run["run_id"], timeout=60)
    assert rec["state"] == "failed" and "is gone" in (rec["launch_error"] or ""), rec


def test_control_characters_refused_before_any_sbatch_call(proj: dict[str, Any]) -> None:
    proc = cli(proj, "submit", "echo", "-p", "msg=x\n#SBATCH --mem=1T")
    assert_clean_error(proc, 2, "control character")
    proc = cli(proj, "submit", "echo", "--sweep", "a=1,2", "-p", "c=x\nrm -rf ~/canary")
    assert_clean_error(proc, 2, "control character")
    dry = cli(proj, "submit", "echo", "--sweep", "a=1,2", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("#!/bin/bash\n#SBATCH --array=0-1\n") and "set -euo pipefail" in dry.stdout
    assert sbatch_calls(proj) == []
    assert not (proj["root"] / "runs").exists() or not list((proj["root"] / "runs").rglob("run.json"))


def test_requeued_job_continues_the_same_record_and_keeps_earlier_logs(proj: dict[str, Any]) -> None:
    proc = cli(proj, "submit", "echo", "-p", "sleep=6", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    run_id, job = out["runs"][0]["run_id"], out["job_ids"][0]
    deadline = time.monotonic() + 60
    while json.loads(cli(proj, "status", run_id, "--json").stdout)[0]["state"] != "running":
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.5)
    time.sleep(1)
    subprocess.run(["scontrol", "requeue", job], check=True)
    # Slurm delays a requeued job's start (BeginTime); the owner may bring it forward
    time.sleep(1)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    (rec,) = wait_terminal(proj, run_id, timeout=120)
    assert rec["state"] == "succeeded" and rec["attempt"] == 2, rec
    assert rec["attempts"][0]["attempt"] == 1 and rec["attempts"][0]["note"] == "requeued"
    run_dir = Path(rec["dir"])
    assert (run_dir / "stdout.log").exists() and (run_dir / "stdout.2.log").read_text().endswith("done\n")


def test_run_dash_dash_slurm_is_an_alias_of_submit(proj: dict[str, Any]) -> None:
    proc = cli(proj, "run", "--slurm", "echo", "-p", "msg=alias")
    assert proc.returncode == 0, proc.stderr
    assert "submitted as job" in proc.stdout and len(sbatch_calls(proj)) == 1
    (rec,) = wait_terminal(proj, "@last", timeout=60)
    assert rec["executor"] == "slurm" and rec["state"] == "succeeded" and rec["params"] == {"msg": "alias"}


def test_awkward_project_path_works_end_to_end(tmp_path: Path, busybox_sif: Path) -> None:
    p = make_proj(tmp_path, busybox_sif, tmp_path / "ä b" / "it's:here%x")
    proc = cli(p, "submit", "echo", "--sweep", "a=1,2", "--json")
    assert proc.returncode == 0, proc.stderr
    sweep_id = json.loads(proc.stdout)["sweep_id"]
    recs = wait_terminal(p, sweep_id, timeout=60)
    assert [r["state"] for r in recs] == ["succeeded", "succeeded"], recs
    outs = sorted((p["root"] / "runs" / ".sweeps" / sweep_id).glob("slurm-*_*.out"))
    assert len(outs) == 2          # '%' in the path was escaped for Slurm's file name patterns


def test_death_between_sbatch_and_recording_the_job_id_is_reconciled(proj: dict[str, Any]) -> None:
    env = dict(proj["env"], HPCEXP_TEST_FAULT="slurm.after_sbatch:kill")
    proc = run_cli("submit", "echo", "--sweep", "a=1,2", cwd=proj["root"], env=env)
    assert proc.returncode == -9, (proc.returncode, proc.stderr)
    assert len(sbatch_calls(proj)) == 1
    # the tasks' records: their part's durable table (no task folder exists before its job starts)
    (table,) = (proj["root"] / "runs" / ".sweeps").glob("sweep-*/array-0.records.jsonl")
    before = [json.loads(line) for line in table.read_text().splitlines()]
    assert not list((proj["root"] / "runs" / "echo").glob("*/run.json"))
    assert len(before) == 2 and all(r["state"] == "submitting" and "job_id" not in r["executor_ids"]
                                    for r in before)
    sweep_id = before[0]["sweep_id"]
    recs = wait_terminal(proj, sweep_id, timeout=60)
    assert [r["state"] for r in recs] == ["succeeded", "succeeded"], recs
    assert all(r["executor_ids"]["job_id"].endswith(f"_{r['task_index']}") and r["executor_ids"]["attached_by"]
               for r in recs)
    assert len(sbatch_calls(proj)) == 1


def test_submit_wait_returns_when_every_task_has_settled(proj: dict[str, Any]) -> None:
    """`submit --wait` blocks until the sweep is done, prints the final table, and exits 5
    when a task failed (0 when all succeeded), like `sbatch --wait`."""
    proc = cli(proj, "submit", "echo", "--sweep", "fail=0,1", "-p", "msg=w", "--wait")
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "1 succeeded, 1 failed" in proc.stderr and "Traceback" not in proc.stderr
    sweep_id = json.loads(cli(proj, "status", "--json").stdout)[0]["sweep_id"]
    states = sorted(r["state"] for r in json.loads(cli(proj, "status", sweep_id, "--json").stdout))
    assert states == ["failed", "succeeded"], "--wait returned before every task had settled"
    assert len(sbatch_calls(proj)) == 1

    proc = cli(proj, "submit", "echo", "-p", "msg=ok", "--wait", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (rec,) = json.loads(proc.stdout)
    assert rec["state"] == "succeeded" and rec["exit_code"] == 0
    assert_clean_error(cli(proj, "submit", "echo", "--wait", "--hold"), 2, "--hold")
    assert len(sbatch_calls(proj)) == 2, "--wait --hold must be refused before submitting"


def _run_folders(p: dict[str, Any]) -> list[str]:
    runs_dir = p["root"] / "runs"
    if not runs_dir.exists():
        return []
    return sorted(str(x.relative_to(runs_dir)) for x in runs_dir.rglob("*"))


def test_unknown_partition_is_named_before_sbatch_and_leaves_no_run(proj: dict[str, Any]) -> None:
    ok = cli(proj, "submit", "echo", "--wait")  # builds the image; one real run to keep untouched
    assert ok.returncode == 0, ok.stderr
    before, calls = _run_folders(proj), len(sbatch_calls(proj))
    proc = cli(proj, "submit", "echo", "--partition", "nosuch")
    assert_clean_error(proc, 6, "--partition=nosuch", "no such partition")
    assert len([x for x in proc.stderr.splitlines() if x.startswith("hpcexp: error:")]) == 1
    assert len(sbatch_calls(proj)) == calls, "refused before any sbatch call"
    assert _run_folders(proj) == before


@pytest.mark.parametrize("sweep", [False, True])
def test_sbatch_refusal_names_the_option_and_leaves_no_run(proj: dict[str, Any], sweep: bool) -> None:
    ok = cli(proj, "build", "echo")
    assert ok.returncode == 0, ok.stderr
    before, calls = _run_folders(proj), len(sbatch_calls(proj))
    extra = ["--sweep", "msg=a,b"] if sweep else []
    proc = cli(proj, "submit", "echo", "--mem", "100T", *extra)
    assert_clean_error(proc, 6, "--mem=100T", "no run was kept")
    assert len([x for x in proc.stderr.splitlines() if x.startswith("hpcexp: error:")]) == 1
    assert len(sbatch_calls(proj)) == calls + 1, "sbatch itself refused it"
    assert _run_folders(proj) == before, "a submission that never happened leaves nothing behind"
    listing = cli(proj, "runs")
    assert listing.returncode == 0 and "failed" not in listing.stdout
