"""Each way a Slurm job ends, produced for real on the test cluster, as an ordinary user.

Every test runs the same ending twice at once, in two projects: one seen through the
cluster's accounting (``sacct``), one through the client profile without accounting
(``SLURM_CONF`` = the provisioned ``/etc/slurm/noacct/slurm.conf``: ``sacct`` answers
"accounting storage is disabled", as on a cluster without slurmdbd, so hpcexp has only
``squeue``, ``scontrol`` and the job's own markers). Both must end in the same state, and
each record must say what Slurm says (``sacct`` / ``scontrol`` asked by the test itself).
Running both at once keeps the cost of the one slow ending (a time limit, at least a
minute in Slurm) paid once. ``-m noacct`` selects these tests.

The root step (the node set down under a running job) goes through the one command the
provisioning lets the test user run as root: ``sudo -n /usr/local/sbin/hpcexp-test-node``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conftest import run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slurm, pytest.mark.noacct]

NOACCT_CONF = Path(os.environ.get("HPCEXP_TEST_NOACCT_CONF", "/etc/slurm/noacct/slurm.conf"))
NODE_TOOL = "/usr/local/sbin/hpcexp-test-node"
TERMINAL = {"succeeded", "failed", "cancelled", "timeout", "out_of_memory", "node_fail", "lost", "unknown"}

# The payload: busybox sh. It notes each start and each signal it gets in results/, so a
# test can tell that a signal reached it; `sleep` loops in 1 s steps so a trap runs at once.
RUN_SH = r'''
echo "start $(date +%s)" >> results/starts.txt
trap 'echo TERM >> results/signals.txt; exit 143' TERM
trap 'echo USR1 >> results/signals.txt' USR1
case "${HPCEXP_PARAM_mode:-ok}" in
  exit3) echo "fails on purpose" >&2; exit 3 ;;
  oom) x=$(head -c 400000000 /dev/zero | tr '\0' a); echo "${#x}" ;;
  sleep)
    n=${HPCEXP_PARAM_secs:-600}
    # a requeued attempt (second start) finishes quickly
    [ "$(wc -l < results/starts.txt)" -gt 1 ] && n=${HPCEXP_PARAM_again:-$n}
    i=0; while [ "$i" -lt "$n" ]; do sleep 1; i=$((i + 1)); done ;;
esac
echo done
'''


def _project(root: Path, busybox_sif: Path, env: dict[str, str]) -> dict[str, Any]:
    exp = root / "experiments" / "end"
    exp.mkdir(parents=True)
    (exp / "Dockerfile").write_text("FROM busybox:latest\nCOPY . /app\nWORKDIR /app\n")
    (exp / "run.sh").write_text(RUN_SH)
    (root / "hpcexp.yaml").write_text(
        f'bases:\n  "busybox:latest": {{sif: {busybox_sif}}}\n'
        "slurm:\n  time: '5'\n"
        "experiments:\n  end:\n    command: [/bin/sh, /app/run.sh]\n    slurm: {mem: 200M}\n")
    return {"root": root, "env": env}


@pytest.fixture
def profiles(tmp_path: Path, busybox_sif: Path) -> Iterator[dict[str, dict[str, Any]]]:
    """Two projects on the same cluster: ``acct`` (sacct works) and ``noacct`` (the client
    profile without accounting). The image is built once per project, before any job."""
    if not NOACCT_CONF.is_file():
        pytest.fail(f"{NOACCT_CONF} is missing: run scripts/provision-test-env", pytrace=False)
    base = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = {"acct": _project(tmp_path / "acct", busybox_sif, dict(base)),
           "noacct": _project(tmp_path / "noacct", busybox_sif, dict(base, SLURM_CONF=str(NOACCT_CONF)))}
    for p in out.values():
        built = cli(p, "build", "end")
        assert built.returncode == 0, built.stderr
    yield out
    # a failed test must not leave its jobs holding the node's two CPUs
    for p in out.values():
        listing = cli(p, "status", "--json")
        jobs = [r["executor_ids"].get("job_id") for r in json.loads(listing.stdout or "[]")
                if r["state"] not in TERMINAL] if listing.returncode == 0 else []
        if any(jobs):
            subprocess.run(["scancel", *filter(None, jobs)], capture_output=True)


def cli(p: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=p["root"], env=p["env"])


def submit(p: dict[str, Any], *args: str) -> dict[str, Any]:
    proc = cli(p, "submit", "end", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["runs"][0]


def status(p: dict[str, Any], run_id: str) -> dict[str, Any]:
    proc = cli(p, "status", run_id, "--json")
    assert proc.returncode == 0, proc.stderr
    (rec,) = json.loads(proc.stdout)
    return rec


def wait_for(p: dict[str, Any], run_id: str, states: set[str], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rec = status(p, run_id)
        if rec["state"] in states:
            return rec
        assert time.monotonic() < deadline, f"{run_id} never reached {sorted(states)}: {rec}"
        time.sleep(0.5)


def wait_running(p: dict[str, Any], run_id: str, timeout: float = 180) -> dict[str, Any]:
    """Until the payload itself has started (its first line in results/), not only the job."""
    rec = wait_for(p, run_id, {"running"} | TERMINAL, timeout)
    starts = Path(rec["dir"]) / "results" / "starts.txt"
    deadline = time.monotonic() + 60
    while not starts.exists():
        assert time.monotonic() < deadline, f"{run_id}: the payload never started"
        time.sleep(0.2)
    return rec


def sacct_alloc(job: str) -> list[dict[str, str]]:
    """The job's allocation lines in the cluster's accounting, one per attempt, oldest first."""
    out = subprocess.run(["sacct", "-n", "-P", "-D", "-X", "-j", job, "-o", "JobID,State,ExitCode,Elapsed"],
                         capture_output=True, text=True, check=True).stdout
    keys = ("job", "state", "exit", "elapsed")
    return [dict(zip(keys, line.split("|"))) for line in out.splitlines() if line.strip()]


def sacct_batch_maxrss(job: str) -> str:
    out = subprocess.run(["sacct", "-n", "-P", "-j", job, "-o", "JobID,MaxRSS"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split("|") for line in out.splitlines()]
    return next((r[1] for r in rows if r[0] == f"{job}.batch"), "")


def scontrol_state(job: str, conf: Path | None = None) -> tuple[str, str]:
    env = dict(os.environ, **({"SLURM_CONF": str(conf)} if conf else {}))
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True,
                         env=env, check=True).stdout
    fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
    return fields["JobState"], fields.get("Reason", "")


def job_of(rec: dict[str, Any]) -> str:
    return str(rec["executor_ids"]["job_id"])


def check_against_slurm(acct: dict[str, Any], noacct: dict[str, Any], state: str, slurm_state: str) -> None:
    """Both records end in ``state``; each says Slurm's own final word, from its own source."""
    assert acct["state"] == noacct["state"] == state, (acct, noacct)
    a_ids, n_ids = acct["executor_ids"], noacct["executor_ids"]
    assert a_ids["slurm_source"] == "sacct", a_ids
    assert n_ids["slurm_source"] == "scontrol", n_ids
    (final,) = sacct_alloc(job_of(acct))[-1:]
    assert a_ids["slurm_state"] == final["state"], (a_ids, final)          # e.g. "CANCELLED by 1001"
    assert a_ids["slurm_state"].split()[0] == slurm_state
    s_state, _ = scontrol_state(job_of(noacct), NOACCT_CONF)
    assert n_ids["slurm_state"] == s_state == slurm_state, (n_ids, s_state)
    for rec in (acct, noacct):
        assert rec["reason"].startswith(f"Slurm: {slurm_state}"), rec["reason"]


def test_payload_exit_3_is_failed_with_its_code_and_sacct_times(profiles: dict[str, dict[str, Any]]) -> None:
    a, n = (submit(profiles[k], "-p", "mode=exit3") for k in ("acct", "noacct"))
    acct = wait_for(profiles["acct"], a["run_id"], TERMINAL)
    noacct = wait_for(profiles["noacct"], n["run_id"], TERMINAL)
    for rec in (acct, noacct):
        assert rec["state"] == "failed" and rec["exit_code"] == 3, rec
        assert rec["reason"] == "the payload exited with code 3", rec
        assert rec["executor_ids"]["slurm_state"] == "FAILED" and rec["executor_ids"]["slurm_exit_code"] == "3:0"
        assert "fails on purpose" in (Path(rec["dir"]) / "stderr.log").read_text()
    assert acct["executor_ids"]["slurm_source"] == "sacct" and noacct["executor_ids"]["slurm_source"] == "scontrol"
    (final,) = sacct_alloc(job_of(acct))
    assert (final["state"], final["exit"]) == ("FAILED", "3:0")
    # status shows elapsed time and MaxRSS as sacct has them
    assert acct["executor_ids"]["elapsed"] == final["elapsed"]
    text = cli(profiles["acct"], "status", a["run_id"]).stdout
    assert "slurm: FAILED (exit 3:0, from sacct)" in text and f"elapsed: {final['elapsed']}" in text, text
    rss = sacct_batch_maxrss(job_of(acct))
    assert acct["executor_ids"].get("max_rss", "") == rss
    assert (f"max_rss: {rss}" if rss else "max_rss: not reported by sacct") in text, text
    text = cli(profiles["noacct"], "status", n["run_id"]).stdout
    assert "slurm: FAILED (exit 3:0, from scontrol)" in text and "max_rss: not known to scontrol" in text, text


def test_user_scancel_is_cancelled(profiles: dict[str, dict[str, Any]]) -> None:
    runs = {k: submit(p, "-p", "mode=sleep") for k, p in profiles.items()}
    recs = {k: wait_running(profiles[k], r["run_id"]) for k, r in runs.items()}
    subprocess.run(["scancel", *(job_of(r) for r in recs.values())], check=True)
    acct, noacct = (wait_for(profiles[k], runs[k]["run_id"], TERMINAL, 60) for k in ("acct", "noacct"))
    check_against_slurm(acct, noacct, "cancelled", "CANCELLED")
    assert acct["executor_ids"]["slurm_state"] == f"CANCELLED by {os.getuid()}"
    assert "the job was cancelled" in acct["reason"] and "the job was cancelled" in noacct["reason"]
    for rec in (acct, noacct):
        assert set((Path(rec["dir"]) / "results" / "signals.txt").read_text().split()) == {"TERM"}


def test_job_over_its_memory_limit_is_out_of_memory(profiles: dict[str, dict[str, Any]]) -> None:
    runs = {k: submit(p, "-p", "mode=oom", "--mem", "100M") for k, p in profiles.items()}
    acct, noacct = (wait_for(profiles[k], runs[k]["run_id"], TERMINAL, 120) for k in ("acct", "noacct"))
    check_against_slurm(acct, noacct, "out_of_memory", "OUT_OF_MEMORY")
    for rec in (acct, noacct):
        assert "killed for using too much memory" in rec["reason"], rec["reason"]
        assert not (Path(rec["dir"]) / "stdout.log").read_text().strip().endswith("done")


def test_low_job_preempted_by_a_high_one_is_requeued_and_finishes(profiles: dict[str, dict[str, Any]]) -> None:
    # Two low jobs of 40% of the node's memory each; the high job asks for 70%, which the
    # node has only once both are preempted (the default partition is never preempted:
    # PreemptMode=OFF, and its jobs here ask for a few hundred MB).
    node_mb = int(subprocess.run(["sinfo", "-h", "-N", "-o", "%m"], capture_output=True, text=True,
                                 check=True).stdout.split()[0])
    low_mb, high_mb = node_mb * 40 // 100, node_mb * 70 // 100
    runs = {k: submit(p, "-p", "mode=sleep", "-p", "secs=300", "-p", "again=1", "--partition", "low",
                      "--mem", f"{low_mb}M") for k, p in profiles.items()}
    recs = {k: wait_running(profiles[k], r["run_id"], 180) for k, r in runs.items()}
    assert all(r["state"] == "running" for r in recs.values()), recs
    high = subprocess.run(["sbatch", "--parsable", "-p", "high", f"--mem={high_mb}M", "-t", "2", "-o", "/dev/null",
                           "--wrap", "sleep 1"], capture_output=True, text=True, check=True).stdout.strip()
    jobs = [job_of(r) for r in recs.values()]
    deadline = time.monotonic() + 60
    while not all(int(scontrol_info(j).get("Restarts", "0")) >= 1 for j in jobs):
        assert time.monotonic() < deadline, f"high job {high} never preempted {jobs}"
        time.sleep(0.5)
    mid = {k: status(profiles[k], r["run_id"]) for k, r in runs.items()}
    for rec in mid.values():
        assert rec["state"] in ("pending", "running"), rec     # requeued, not ended
    # Slurm holds a requeued job back (BeginTime, about 120 s); its owner may bring the start
    # forward, as often as it takes: a job still being requeued gets its BeginTime only later
    deadline = time.monotonic() + 180
    done: dict[str, dict[str, Any]] = {}
    while len(done) < len(runs):
        for j in jobs:
            try:
                info = scontrol_info(j)
            except subprocess.CalledProcessError:     # gone from the controller: nothing to bring forward
                continue
            if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
                subprocess.run(["scontrol", "update", f"JobId={j}", "StartTime=now"], check=False,
                               capture_output=True)
        for k, r in runs.items():
            rec = status(profiles[k], r["run_id"])
            if rec["state"] in TERMINAL:
                done[k] = rec
        assert time.monotonic() < deadline, f"never ended after the preemption: {mid}"
        time.sleep(1)
    acct, noacct = done["acct"], done["noacct"]
    for rec in (acct, noacct):
        assert rec["state"] == "succeeded" and rec["attempt"] == 2, rec
        (first,) = rec["attempts"]
        assert first["attempt"] == 1 and first["note"] == "requeued" and first["exit_code"] == 143, first
        # the preemption's signal reached the payload of the first attempt
        assert set((Path(rec["dir"]) / "results" / "signals.txt").read_text().split()) == {"TERM"}
        assert (Path(rec["dir"]) / "stdout.2.log").read_text().endswith("done\n")
    states = [x["state"] for x in sacct_alloc(job_of(acct))]
    assert states == ["PREEMPTED", "COMPLETED"], states
    assert acct["attempts"][0]["slurm_state"] == "PREEMPTED"            # told apart from a time limit
    assert "slurm_state" not in noacct["attempts"][0]                   # scontrol keeps no history
    assert sacct_alloc(high)[-1]["state"] == "COMPLETED"


def scontrol_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _node_state() -> str:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True).stdout
    return (out.split() or ["unknown"])[0]     # one line per partition the node is in


def _node_down_under(profiles: dict[str, dict[str, Any]], runs: dict[str, dict[str, Any]],
                     until: set[str]) -> dict[str, dict[str, Any]]:
    """Set the node down (the root step) once both runs' payloads run; the records once
    they reach ``until``. The node is back up afterwards, whatever happened."""
    probe = subprocess.run(["sudo", "-n", NODE_TOOL], capture_output=True, text=True)
    if probe.returncode != 2:
        pytest.fail(f"the test user cannot run {NODE_TOOL} as root (sudo -n): {probe.stderr.strip()}; "
                    "run scripts/provision-test-env", pytrace=False)
    for k, r in runs.items():
        wait_running(profiles[k], r["run_id"])
    try:
        subprocess.run(["sudo", "-n", NODE_TOOL, "down"], check=True)
        return {k: wait_for(profiles[k], r["run_id"], until, 90) for k, r in runs.items()}
    finally:
        # ReturnToService=2 brings the node back once slurmd answers; make sure of it
        deadline = time.monotonic() + 60
        while _node_state() not in ("idle", "mixed", "allocated"):
            subprocess.run(["sudo", "-n", NODE_TOOL, "resume"], capture_output=True)
            assert time.monotonic() < deadline, f"the node stayed {_node_state()}"
            time.sleep(1)


def test_node_set_down_under_a_running_job_is_node_fail(profiles: dict[str, dict[str, Any]]) -> None:
    # --no-requeue: a node failure ends the job (with JobRequeue=1 Slurm would requeue it)
    runs = {k: submit(p, "-p", "mode=sleep", "--sbatch-arg=--no-requeue") for k, p in profiles.items()}
    recs = _node_down_under(profiles, runs, TERMINAL)
    acct, noacct = recs["acct"], recs["noacct"]
    check_against_slurm(acct, noacct, "node_fail", "NODE_FAIL")
    assert "its node failed" in acct["reason"] and "its node failed" in noacct["reason"]
    assert "reason NodeDown" in noacct["reason"], noacct["reason"]      # scontrol's Reason= field


def test_node_failure_requeues_a_requeueable_job_which_then_finishes(profiles: dict[str, dict[str, Any]]) -> None:
    runs = {k: submit(p, "-p", "mode=sleep", "-p", "again=1") for k, p in profiles.items()}
    jobs = {k: str(r["executor_ids"]["job_id"]) for k, r in runs.items()}

    def requeued(rec: dict[str, Any]) -> bool:
        return int(scontrol_info(job_of(rec)).get("Restarts", "0")) >= 1

    _node_down_under(profiles, runs, {"pending", "running"} | TERMINAL)
    deadline = time.monotonic() + 60
    while not all(requeued(status(profiles[k], r["run_id"])) for k, r in runs.items()):
        assert time.monotonic() < deadline, f"{jobs} were not requeued after the node failure"
        time.sleep(0.5)
    for k, r in runs.items():
        assert status(profiles[k], r["run_id"])["state"] in ("pending", "running")   # back in the queue, not ended
    for job in jobs.values():
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    acct, noacct = (wait_for(profiles[k], runs[k]["run_id"], TERMINAL, 120) for k in ("acct", "noacct"))
    for rec in (acct, noacct):
        assert rec["state"] == "succeeded" and rec["attempt"] == 2, rec
        assert rec["attempts"][0]["note"] == "requeued", rec["attempts"]
    assert [x["state"] for x in sacct_alloc(jobs["acct"])] == ["NODE_FAIL", "COMPLETED"]
    assert acct["attempts"][0]["slurm_state"] == "NODE_FAIL"            # how Slurm ended attempt 1
    assert "slurm_state" not in noacct["attempts"][0]                   # scontrol keeps no history


@pytest.mark.slow
def test_job_past_its_time_limit_is_timeout(profiles: dict[str, dict[str, Any]]) -> None:
    # Slurm's smallest limit is one minute, checked about every 30 s: this is the one slow test.
    runs = {k: submit(p, "-p", "mode=sleep", "--time", "1") for k, p in profiles.items()}
    acct, noacct = (wait_for(profiles[k], runs[k]["run_id"], TERMINAL, 200) for k in ("acct", "noacct"))
    check_against_slurm(acct, noacct, "timeout", "TIMEOUT")
    for rec in (acct, noacct):
        assert "the job hit its time limit" in rec["reason"], rec["reason"]
        assert set((Path(rec["dir"]) / "results" / "signals.txt").read_text().split()) == {"TERM"}
