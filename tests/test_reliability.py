"""Checkpoint signal, requeue policy, ``hpcexp check`` and ``hpcexp unlock`` without a cluster.

The job script's checkpoint lines are run for real with bash (a shell payload in place of
apptainer, a fake scontrol); the decision rules with hand-made markers and evidence; the
reconcile-side requeue with the fake Slurm of test_slurm.py. The real cluster is in
test_requeue_e2e.py and test_check_e2e.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hpcexp.core import fsck, runs
from hpcexp.core.config import load_project
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.core.model import CheckpointPolicy, parse_checkpoint_signal
from hpcexp.errors import ConfigError, LockBusy, UsageError
from hpcexp.execute import local, slurm
from hpcexp.execute.slurm import requeue, sbatch
from hpcexp.infra import host as hostinfo
from hpcexp.infra.lock import Lock, break_lock
from tests.conftest import assert_clean_error, run_cli
from tests.test_slurm import _ev, _info, _rec, fake_slurm, project  # noqa: F401 - fixtures

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

def _load(tmp_path: Path, section: str) -> Any:
    exp = tmp_path / "experiments" / "e"
    exp.mkdir(parents=True, exist_ok=True)
    (exp / "Dockerfile").write_text("FROM busybox:latest\n")
    (tmp_path / "hpcexp.yaml").write_text("experiments:\n  e:\n" + section)
    return load_project(tmp_path).experiment("e")


def test_checkpoint_and_requeue_sections_are_read(tmp_path: Path) -> None:
    exp = _load(tmp_path, "    checkpoint: {signal: SIGUSR2, before: 2m}\n"
                          "    requeue: {on: [timeout, node_fail], max_attempts: 5}\n")
    assert exp.checkpoint == CheckpointPolicy("USR2", 120)
    assert exp.requeue.on == ("timeout", "node_fail") and exp.requeue.max_attempts == 5
    exp = _load(tmp_path, "    checkpoint: {}\n    requeue:\n      on: timeout\n")   # YAML's `on` is true
    assert exp.checkpoint == CheckpointPolicy("USR1", 90)
    assert exp.requeue.on == ("timeout",) and exp.requeue.max_attempts == 3
    assert _load(tmp_path, "    command: [a]\n").checkpoint is None


@pytest.mark.parametrize("section, field, words", [
    ("checkpoint: {signal: KILL}", "experiments.e.checkpoint.signal", "invalid signal 'KILL'"),
    ("checkpoint: {signal: 9}", "experiments.e.checkpoint.signal", "invalid signal"),
    ("checkpoint: {before: soon}", "experiments.e.checkpoint.before", "invalid duration 'soon'"),
    ("checkpoint: {before: 0}", "experiments.e.checkpoint.before", "from 1 second"),
    ("checkpoint: {before: 70000}", "experiments.e.checkpoint.before", "65535"),
    ("checkpoint: {signal: USR1, when: 3}", "experiments.e.checkpoint.when", "unknown key"),
    ("checkpoint: USR1", "experiments.e.checkpoint", "must be a mapping"),
    ("requeue: {on: [finished]}", "experiments.e.requeue.on[0]", "never requeued"),
    ("requeue: {on: [timeout], max_attempts: 0}", "experiments.e.requeue.max_attempts", "from 1 to 1000"),
    ("requeue: {on: [timeout], max_attempts: two}", "experiments.e.requeue.max_attempts", "whole number"),
    ("requeue: {tries: 3}", "experiments.e.requeue.tries", "unknown key"),
])
def test_bad_policy_values_are_refused_naming_the_field(tmp_path: Path, section: str, field: str,
                                                        words: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, f"    {section}\n")
    assert field in err.value.message and words in err.value.message, err.value.message


@pytest.mark.parametrize("text, sig, before", [("USR1@90", "USR1", 90), ("SIGUSR2@2m", "USR2", 120),
                                               ("usr1", "USR1", 90), ("TERM@1h", "TERM", 3600)])
def test_checkpoint_signal_option(text: str, sig: str, before: int) -> None:
    assert parse_checkpoint_signal(text) == CheckpointPolicy(sig, before)


@pytest.mark.parametrize("text", ["KILL", "FOO@10", "USR1@", "USR1@-3", "USR1@70000", "@90", "USR1@1d"])
def test_bad_checkpoint_signal_option_names_it(text: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_checkpoint_signal(text)
    assert err.value.message.startswith("--checkpoint-signal: ")


def test_submit_refuses_a_bad_checkpoint_signal_before_anything(tmp_path: Path, fake_slurm: Any) -> None:  # noqa: F811
    exp = tmp_path / "experiments" / "e"
    exp.mkdir(parents=True)
    (exp / "Dockerfile").write_text("FROM busybox:latest\n")
    (tmp_path / "hpcexp.yaml").write_text("experiments: {e: {}}\n")
    proc = run_cli("submit", "e", "--checkpoint-signal", "KILL@30", cwd=tmp_path)
    assert_clean_error(proc, 2, "--checkpoint-signal: invalid signal 'KILL'")
    assert fake_slurm.calls("sbatch") == [] and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# The job script's checkpoint lines, run for real with bash
# ---------------------------------------------------------------------------------------------

PAYLOAD = r'''
echo "attempt=${APPTAINERENV_HPCEXP_ATTEMPT:-none} dir=${APPTAINERENV_HPCEXP_CHECKPOINT_DIR:-none}"
trap 'echo "saved at attempt $APPTAINERENV_HPCEXP_ATTEMPT" > "$RUN/results/checkpoint/state"; exit 0' USR1
touch "$RUN/ready"
n=0
while [ "$n" -lt "${STEPS:-600}" ]; do sleep 0.05; n=$((n + 1)); done
echo finished
'''


def _script(tmp_path: Path, *, checkpoint: tuple[str, int] | None = ("USR1", 90), requeue_on=("timeout",),
            max_attempts: int | None = 2) -> tuple[Path, Path]:
    run_dir = tmp_path / "runs" / "e" / "r1"
    run_dir.mkdir(parents=True)
    image = tmp_path / "img.sif"
    image.write_text("sif")
    payload = tmp_path / "payload.sh"
    payload.write_text(PAYLOAD)
    task = sbatch.TaskSpec(run_id="r1", run_dir=run_dir, argv=("/bin/sh", str(payload)),
                           container_env={"HPCEXP_CHECKPOINT_DIR": "/experiment/results/checkpoint"})
    spec = sbatch.JobSpec(experiment="e", project_root=tmp_path, image=image, tasks=(task,),
                          options={"job-name": "hpcexp-r1"}, checkpoint=checkpoint, requeue_on=requeue_on,
                          max_attempts=max_attempts)
    script = run_dir / "job.sbatch"
    script.write_text(sbatch.render(sbatch.default_template(), spec))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    (bin_dir / "scontrol").chmod(0o755)
    return script, run_dir


def _start(tmp_path: Path, script: Path, run_dir: Path, restarts: int, **env: str) -> subprocess.Popen[bytes]:
    full = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
                SLURM_RESTART_COUNT=str(restarts), RUN=str(run_dir), **env)
    return subprocess.Popen(["bash", str(script)], env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(path: Path, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.02)


def test_checkpoint_signal_reaches_the_payload_and_the_job_requeues_itself(tmp_path: Path) -> None:
    script, run_dir = _script(tmp_path)
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "trap hpcexp_checkpoint USR1" in text and 'scontrol requeue "${SLURM_JOB_ID:-}"' in text
    proc = _start(tmp_path, script, run_dir, 0)
    _wait_for(run_dir / "ready")
    os.kill(proc.pid, signal.SIGUSR1)                      # as Slurm's --signal=B:USR1 does
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert (run_dir / "results" / "checkpoint" / "state").read_text() == "saved at attempt 1\n"
    assert (run_dir / "stdout.log").read_text().startswith("attempt=1 dir=/experiment/results/checkpoint")
    marker = json.loads((run_dir / "events" / "attempt-1.exit").read_text())
    assert marker["checkpoint_signal"] is True and marker["requeue"] == "requested" and marker["exit_code"] == 0
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert b"SIGUSR1 received" in err and b"job requeued" in err

    # the next attempt is the last one the budget allows: it saves, but is not requeued
    (run_dir / "ready").unlink()
    proc = _start(tmp_path, script, run_dir, 1)
    _wait_for(run_dir / "ready")
    os.kill(proc.pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=20)
    marker = json.loads((run_dir / "events" / "attempt-2.exit").read_text())
    assert marker["checkpoint_signal"] is True and marker["requeue"] == "spent"
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"     # no second requeue
    assert (run_dir / "stdout.2.log").read_text().startswith("attempt=2 ")
    assert b"requeue budget spent" in err


def test_a_payload_that_finishes_is_never_requeued(tmp_path: Path) -> None:
    script, run_dir = _script(tmp_path)
    proc = _start(tmp_path, script, run_dir, 0, STEPS="2")
    proc.communicate(timeout=20)
    marker = json.loads((run_dir / "events" / "attempt-1.exit").read_text())
    assert marker["checkpoint_signal"] is False and marker["requeue"] == "off" and marker["exit_code"] == 0
    assert not (tmp_path / "scontrol.log").exists()
    assert (run_dir / "stdout.log").read_text().endswith("finished\n")


def test_checkpoint_without_requeue_on_timeout_saves_and_stops(tmp_path: Path) -> None:
    script, run_dir = _script(tmp_path, requeue_on=("node_fail",), max_attempts=3)
    proc = _start(tmp_path, script, run_dir, 0)
    _wait_for(run_dir / "ready")
    os.kill(proc.pid, signal.SIGUSR1)
    proc.communicate(timeout=20)
    marker = json.loads((run_dir / "events" / "attempt-1.exit").read_text())
    assert marker["checkpoint_signal"] is True and marker["requeue"] == "off"
    assert not (tmp_path / "scontrol.log").exists()


def test_scripts_without_a_policy_are_unchanged(tmp_path: Path) -> None:
    script, _ = _script(tmp_path, checkpoint=None, requeue_on=(), max_attempts=None)
    text = script.read_text()
    assert "hpcexp_checkpoint" not in text and "scontrol" not in text and "HPCEXP_ATTEMPT=" not in \
        text.replace("HPCEXP_ATTEMPT=$((", "")


def test_submit_puts_the_policy_into_the_header_the_record_and_the_environment(project: Any,  # noqa: F811
                                                                               fake_slurm: Any) -> None:  # noqa: F811
    exp = project.experiment("echo")
    from dataclasses import replace

    from hpcexp.core.model import RequeuePolicy

    exp = replace(exp, requeue=RequeuePolicy(("timeout",), 4))
    sub = slurm.submit_runs(project, exp, project.images_dir / "echo.sif", [{}], exp.slurm,
                            checkpoint=CheckpointPolicy("USR2", 45))
    text = sub.texts[0]
    assert "#SBATCH --signal=B:USR2@45" in text and "#SBATCH --requeue" in text
    assert "trap hpcexp_checkpoint USR2" in text and '"$HPCEXP_ATTEMPT" -lt 4' in text
    rec = sub.runs[0][1]
    assert rec.extra["checkpoint"] == {"signal": "USR2", "before": 45}
    assert rec.extra["requeue"] == {"on": ["timeout"], "max_attempts": 4}
    assert rec.extra["container_env"]["HPCEXP_CHECKPOINT_DIR"].endswith("/results/checkpoint")
    # a policy that lists no ending forbids Slurm's own requeues
    exp = replace(exp, requeue=RequeuePolicy((), 1))
    text = slurm.submit_runs(project, exp, project.images_dir / "echo.sif", [{}], exp.slurm).texts[0]
    assert "#SBATCH --no-requeue" in text and "--signal" not in text


# ---------------------------------------------------------------------------------------------
# Deciding with checkpoint markers; hpcexp's own requeue
# ---------------------------------------------------------------------------------------------

def _ck_rec(attempt: int = 1, max_attempts: int = 3) -> runs.RunRecord:
    rec = _rec()
    rec.attempt = attempt
    rec.extra = {"checkpoint": {"signal": "USR1", "before": 50}, "requeue": {"on": ["timeout"],
                                                                            "max_attempts": max_attempts}}
    return rec


def _marker(attempt: int, requeue: str, code: int = 0) -> dict:
    return {attempt: {"started": {"time": "2026-01-01T00:00:00.000Z", "host": "n1"},
                      "exit": {"exit_code": code, "time": "2026-01-01T00:00:09.000Z", "launch_error": None,
                               "checkpoint_signal": True, "requeue": requeue, "term_received": False}}}


def test_decide_a_self_requeued_attempt_waits_and_the_next_one_closes_it() -> None:
    new = slurm.decide(_ck_rec(), _marker(1, "requested"), _ev(live={"101": _info("PENDING", reason="BeginTime")}))
    assert new.state == "pending" and "requeued itself" in new.reason
    markers = {**_marker(1, "requested"), 2: {"started": {"time": "2026-01-01T00:01:00.000Z", "host": "n1"}}}
    new = slurm.decide(new, markers, _ev(live={"101": _info("RUNNING")}))
    assert new.state == "running" and new.attempt == 2
    (closed,) = new.attempts
    assert closed["note"] == "saved a checkpoint and requeued itself" and closed["checkpointed"] is True
    assert closed["ended_at"] == "2026-01-01T00:00:09.000Z"


def test_decide_budget_spent_and_lost_requeue_end_in_timeout_with_the_reason() -> None:
    new = slurm.decide(_ck_rec(3, 3), _marker(3, "spent"), _ev(final={"101": _info("COMPLETED", exit_code=0)}))
    assert new.state == "timeout" and "attempt 3 of max_attempts=3" in new.reason
    assert "saved a checkpoint on SIGUSR1" in new.reason
    new = slurm.decide(_ck_rec(), _marker(1, "requested"), _ev())        # gone: the requeue never happened
    assert new.state == "timeout" and "did not take effect" in new.reason
    new = slurm.decide(_ck_rec(), _marker(1, "off"), _ev(final={"101": _info("COMPLETED")}))
    assert new.state == "timeout" and "requeue.on does not list timeout" in new.reason
    # cancelled by the user after the checkpoint: cancelled wins
    new = slurm.decide(_ck_rec(), _marker(1, "off"), _ev(final={"101": _info("CANCELLED", detail="by 1")}))
    assert new.state == "cancelled"


def _ended(state: str, attempt: int = 1, slurm_state: str = "TIMEOUT", max_attempts: int = 3,
           on: tuple[str, ...] = ("timeout", "preempted", "node_fail")) -> tuple[RunPaths, runs.RunRecord]:
    rec = _rec(slurm_state=slurm_state)
    rec.state, rec.attempt, rec.reason = state, attempt, f"Slurm: {slurm_state}"
    rec.extra = {"requeue": {"on": list(on), "max_attempts": max_attempts}}
    return RunPaths(Path(f"/nonexistent/{state}-{attempt}")), rec


def test_hpcexp_requeues_listed_endings_while_the_budget_lasts(fake_slurm: Any) -> None:  # noqa: F811
    items = [_ended("timeout"), _ended("node_fail", slurm_state="NODE_FAIL"),
             _ended("failed", slurm_state="PREEMPTED"), _ended("timeout", attempt=3),
             _ended("succeeded", slurm_state="COMPLETED"), _ended("failed", slurm_state="FAILED"),
             _ended("cancelled", slurm_state="CANCELLED"), _ended("node_fail", on=("timeout",))]
    requeue.apply(items, {})
    states = [r.state for _, r in items]
    assert states == ["pending", "pending", "pending", "timeout", "succeeded", "failed", "cancelled", "node_fail"]
    assert [c[1:] for c in fake_slurm.calls("scontrol")] == [["requeue", "101"]] * 3
    assert items[0][1].executor_ids["requeued_after"] == {"1": "timeout"}
    assert "hpcexp requeued job 101 after preempted (attempt 1 of max_attempts=3)" in items[2][1].reason
    assert "requeue budget spent (attempt 3 of max_attempts=3)" in items[3][1].reason
    # an ending seen before is not acted on again
    fake_slurm.reset_calls()
    again = [_ended("timeout")]
    requeue.apply(again, {again[0][0].dir: again[0][1]})
    assert again[0][1].state == "timeout" and fake_slurm.calls("scontrol") == []


def test_a_refused_requeue_keeps_the_ending_and_says_why(fake_slurm: Any) -> None:  # noqa: F811
    fake_slurm.set("scontrol", "", "scontrol: error: Invalid job id specified\n", 1)
    items = [_ended("timeout")]
    requeue.apply(items, {})
    assert items[0][1].state == "timeout"
    assert "not requeued: scontrol requeue 101 failed (scontrol: error: Invalid job id specified)" in \
        items[0][1].reason


# ---------------------------------------------------------------------------------------------
# Local runs: stop --checkpoint
# ---------------------------------------------------------------------------------------------

def test_stop_checkpoint_sends_the_checkpoint_signal_first_and_lets_the_payload_save(tmp_path: Path) -> None:
    code = ("import signal,sys,time,os\n"
            "def save(*a):\n"
            "    open(os.path.join('results','saved'),'w').write('yes'); sys.exit(0)\n"
            "signal.signal(signal.SIGUSR2, save)\n"
            "print('ready', flush=True)\n"
            "time.sleep(600)\n")
    run_dir = tmp_path / "exp" / "r1"
    run_dir.mkdir(parents=True)
    paths = RunPaths(run_dir)
    paths.results.mkdir()
    rec = runs.RunRecord(experiment="exp", run_id="r1", command=[sys.executable, "-c", code],
                         executor_ids={"host": hostinfo.hostname(), "boot_id": hostinfo.boot_id(),
                                       "launcher_pid": os.getpid(),
                                       "launcher_start": hostinfo.pid_start_ticks(os.getpid())})
    rec.extra = {"container_env": {}, "grace": 10.0, "checkpoint": {"signal": "USR2", "before": 90}}
    runs.write_record(paths, rec)

    def stopper() -> None:
        end = time.monotonic() + 20
        while not (paths.stdout.exists() and b"ready" in paths.stdout.read_bytes()
                   and runs.read_record(paths).state == "running"):
            assert time.monotonic() < end
            time.sleep(0.02)
        from hpcexp.execute.local.control import checkpoint_signal

        paths.stop_request.write_text(json.dumps({"grace": 10, "user": "t", "host": "h", "pid": 1,
                                                  "checkpoint": checkpoint_signal(runs.read_record(paths))}))
        os.kill(os.getpid(), signal.SIGUSR1)

    th = threading.Thread(target=stopper)
    th.start()
    started = time.monotonic()
    rec = local.supervise(paths)
    th.join(timeout=30)
    assert (paths.results / "saved").read_text() == "yes"
    assert rec.state == "cancelled" and rec.exit_code == 0 and time.monotonic() - started < 9
    assert "hpcexp stop --checkpoint" in rec.reason and "checkpoint signal SIGUSR2" in rec.reason


def test_stop_checkpoint_refuses_slurm_runs(project: Any, fake_slurm: Any) -> None:  # noqa: F811
    from hpcexp.app import runs as app

    sub = slurm.submit_runs(project, project.experiment("echo"), project.images_dir / "echo.sif", [{}],
                            project.experiment("echo").slurm)
    with pytest.raises(UsageError) as err:
        app.stop(project, app.StopRequest(refs=(sub.runs[0][1].run_id,), checkpoint=True))
    assert "stop --checkpoint is for local runs" in err.value.message
    assert fake_slurm.calls("scancel") == []


# ---------------------------------------------------------------------------------------------
# check and unlock
# ---------------------------------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def plain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    root = tmp_path / "proj"
    (root / "experiments" / "e").mkdir(parents=True)
    (root / "experiments" / "e" / "Dockerfile").write_text("FROM busybox:latest\n")
    (root / "hpcexp.yaml").write_text("experiments: {e: {}}\n")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return load_project(root)


def _local_run(proj: Any, run_id: str, **changes: Any) -> RunPaths:
    paths = Layout(proj).run("e", run_id)
    paths.dir.mkdir(parents=True)
    rec = runs.RunRecord(experiment="e", run_id=run_id, state="succeeded", executor="local", **changes)
    runs.write_record(paths, rec)
    return paths


def test_check_reports_then_repairs_only_what_is_safe(plain: Any) -> None:
    from hpcexp.app import check as app

    host = hostinfo.short_hostname()
    good = _local_run(plain, "r-good")
    (good.results).mkdir()
    in_results = good.results / f".hpcexp-tmp-{host}-{_dead_pid()}-aaaaaaaa-user.txt"
    in_results.write_text("the user's own file: never ours to judge")
    orphan = good.dir / f".hpcexp-tmp-{host}-{_dead_pid()}-bbbbbbbb-run.json"
    orphan.write_text("{")
    foreign = good.dir / ".hpcexp-tmp-elsewhere-123-cccccccc-run.json"
    foreign.write_text("{")
    live = good.dir / f".hpcexp-tmp-{host}-{os.getpid()}-dddddddd-run.json"
    live.write_text("{")
    bad = _local_run(plain, "r-bad")
    bad.record.write_text('{"experiment": "e", "run_id": "r-bad", "sta')
    moved = _local_run(plain, "r-moved")
    moved.record.write_text(moved.record.read_text().replace('"r-moved"', '"r-other"'))
    gone = _local_run(plain, "r-gone", executor_ids={"host": hostinfo.hostname(), "supervisor_pid": _dead_pid()})
    rec = runs.read_record(gone)
    rec.state = "running"
    runs.write_record(gone, rec)
    lock_dir = plain.images_dir / ".locks"
    lock_dir.mkdir(parents=True)
    dead_lock = lock_dir / "x.lock"
    dead_lock.write_text(json.dumps({"host": hostinfo.hostname(), "pid": _dead_pid(), "user": "u", "started": "t",
                                     "boot_id": hostinfo.boot_id()}))
    before = _tree(plain.root)

    result = app.check(plain, app.CheckRequest())
    kinds = {(f.kind, Path(f.path).name, f.action) for f in result.findings}
    assert kinds == {("orphaned temporary file", orphan.name, "found"), ("temporary file", foreign.name, "kept"),
                     ("damaged record", "run.json", "found"), ("stale lock", "x.lock", "found"),
                     ("state", "run.json", "found")}, kinds
    assert len([f for f in result.findings if f.kind == "damaged record"]) == 2
    assert result.runs == 4 and len(result.problems) == 5
    assert _tree(plain.root) == before                                     # a check changes nothing

    result = app.check(plain, app.CheckRequest(repair=True))
    assert {f.action for f in result.findings} == {"removed", "kept", "marked", "broken"}
    assert result.problems == []
    after = _tree(plain.root)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    damaged = sorted(k for k in after if ".damaged-" in k)
    assert [Path(k).parent.name for k in damaged] == ["r-bad", "r-moved"]
    assert changed == {str(orphan.relative_to(plain.root)), "images/.locks/x.lock",
                       "runs/e/r-bad/run.json", "runs/e/r-moved/run.json", "runs/e/r-gone/run.json", *damaged}
    assert after[damaged[0]] == before["runs/e/r-bad/run.json"]            # kept byte for byte
    assert in_results.exists() and foreign.exists() and live.exists()
    for rid in ("r-bad", "r-moved", "r-gone"):
        assert runs.read_record(Layout(plain).run("e", rid)).state == "lost"
    assert "kept as run.json.damaged-" in runs.read_record(bad).reason
    assert app.check(plain, app.CheckRequest()).problems == []


def test_check_cli_exit_codes_and_json(plain: Any) -> None:
    clean = run_cli("check", "--json", cwd=plain.root)
    assert clean.returncode == 0 and json.loads(clean.stdout)["findings"] == []
    bad = _local_run(plain, "r1")
    bad.record.write_text("")
    proc = run_cli("check", cwd=plain.root)
    assert_clean_error(proc, 1, "check found 1 problem(s) left")
    assert "damaged record" in proc.stdout and "--repair" in proc.stderr
    proc = run_cli("check", "--repair", "--json", cwd=plain.root)
    assert proc.returncode == 0 and json.loads(proc.stdout)["findings"][0]["action"] == "marked"


def test_unlock_dead_live_forced_and_bad_names(plain: Any) -> None:
    from hpcexp.app import check as app

    lock_dir = plain.images_dir / ".locks"
    lock_dir.mkdir(parents=True)
    dead = lock_dir / "dead.lock"
    dead.write_text(json.dumps({"host": hostinfo.hostname(), "pid": _dead_pid(), "user": "ann", "started": "t",
                                "boot_id": hostinfo.boot_id(), "purpose": "build x"}))
    held = Lock(lock_dir / "live.lock", purpose="build y")
    assert held.try_acquire() is None
    try:
        out = app.unlock(plain, app.UnlockRequest())
        assert out.broken == [(str(dead), f"ann@{hostinfo.hostname()} pid " + out.broken[0][1].split(" pid ")[1])]
        assert "(build x)" in out.broken[0][1] and not dead.exists()
        assert out.kept and out.kept[0][0] == str(held.path) and held.path.exists()
        with pytest.raises(LockBusy) as err:
            app.unlock(plain, app.UnlockRequest(lock=held.path))
        assert f"pid {os.getpid()}" in err.value.message and "--force" in (err.value.hint or "")
        out = app.unlock(plain, app.UnlockRequest(lock=Path("images/.locks/live.lock"), force=True))
        assert "which may still be alive (--force)" in out.broken[0][1] and not held.path.exists()
    finally:
        held.release()
    with pytest.raises(UsageError, match="is not a lock file"):
        app.unlock(plain, app.UnlockRequest(lock=plain.root / "hpcexp.yaml"))
    with pytest.raises(UsageError, match="no lock file"):
        app.unlock(plain, app.UnlockRequest(lock=Path("nope.lock")))
    with pytest.raises(UsageError, match="needs the lock"):
        app.unlock(plain, app.UnlockRequest(force=True))


def test_break_lock_never_breaks_a_live_owner_without_force(tmp_path: Path) -> None:
    lock = Lock(tmp_path / "a.lock")
    assert lock.try_acquire() is None
    assert break_lock(lock.path) is None and lock.path.exists()
    assert break_lock(lock.path, force=True) is not None and not lock.path.exists()
    assert break_lock(lock.path, force=True) is None          # nothing there any more
    garbage = tmp_path / "g.lock"
    garbage.write_text("not json")
    assert break_lock(garbage) is None and garbage.exists()
    assert break_lock(garbage, force=True) is not None and not garbage.exists()
    assert fsck.tmp_owner(".hpcexp-tmp-elsewhere-1-abcdabcd-x") == ("pid 1 on host elsewhere", None)


def test_an_attempt_past_the_budget_does_not_start_the_payload(tmp_path: Path) -> None:
    # Slurm requeued the job itself (a preemption) after the last attempt the budget allows
    script, run_dir = _script(tmp_path, requeue_on=("preempted",), max_attempts=2)
    proc = _start(tmp_path, script, run_dir, 2)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and b"past max_attempts=2" in err
    assert not (run_dir / "ready").exists() and not (run_dir / "stdout.3.log").exists()
    marker = json.loads((run_dir / "events" / "attempt-3.exit").read_text())
    assert marker["over_budget"] is True
    rec = _ck_rec(2, 2)
    markers = {2: {"started": {"time": "t"}, "exit": {"exit_code": 143, "term_received": True}}, 3: {"exit": marker}}
    new = slurm.decide(rec, markers, _ev(final={"101": _info("COMPLETED", exit_code=0)}))
    assert new.state == "failed" and new.attempt == 3
    assert "requeue budget is spent (max_attempts=2)" in new.reason and "attempt 3 did not start" in new.reason


def test_a_job_told_to_stop_waits_for_slurms_verdict_while_it_leaves_the_queue() -> None:
    # the time limit's SIGTERM ended the payload and its marker is written, but squeue still
    # lists the job (COMPLETING): deciding now would say `failed` for good, not `timeout`
    markers = {1: {"started": {"time": "t", "host": "n1"},
                   "exit": {"exit_code": 143, "term_received": True, "time": "t2", "launch_error": None}}}
    rec = _rec()
    rec.state = "running"
    new = slurm.decide(rec, markers, _ev(live={"101": _info("COMPLETING")}))
    assert new.state == "running" and "ending" in new.reason and not new.terminal
    new = slurm.decide(new, markers, _ev(final={"101": _info("TIMEOUT")}))
    assert new.state == "timeout"
    # a payload that failed on its own is decided at once
    markers[1]["exit"]["term_received"] = False
    assert slurm.decide(rec, markers, _ev(live={"101": _info("COMPLETING")})).state == "failed"
