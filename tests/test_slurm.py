"""The Slurm executor without a cluster: parsers against golden scheduler output, the state
decision table, and submit/reconcile/stop through PATH shims that log every call."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from hpcexp.core import runs
from hpcexp.core.config import SlurmResources, load_project
from hpcexp.core.layout import Layout
from hpcexp.errors import SchedulerError, UsageError
from hpcexp.execute import base as executors
from hpcexp.execute import slurm, sweep
from tests.conftest import HOSTILE_VALUES, assert_clean_error, run_cli

GOLDEN = Path(__file__).parent / "golden" / "sbatch" / "scheduler"

SHIM = r'''#!{python}
import json, os, sys
d = os.environ["FAKE_SLURM"]
name = os.path.basename(sys.argv[0])
with open(os.path.join(d, "calls.jsonl"), "a") as fh:
    fh.write(json.dumps(sys.argv) + "\n")
def read(suffix, default=""):
    p = os.path.join(d, name + suffix)
    return open(p).read() if os.path.exists(p) else default
if os.path.exists(os.path.join(d, name + ".sleep")):
    import time
    time.sleep(float(read(".sleep")))
if name == "sbatch" and not os.path.exists(os.path.join(d, "sbatch.rc")):
    counter = os.path.join(d, "next_job")
    job = int(open(counter).read()) if os.path.exists(counter) else 1000
    open(counter, "w").write(str(job + 1))
    script = sys.argv[-1]
    open(os.path.join(d, "script-%d.sbatch" % job), "w").write(open(script).read())
    print(job)
    sys.exit(0)
sys.stdout.write(read(".out"))
sys.stderr.write(read(".err"))
sys.exit(int(read(".rc", "0") or 0))
'''


class FakeSlurm:
    def __init__(self, root: Path) -> None:
        self.root = root

    def set(self, cmd: str, out: str = "", err: str = "", rc: int = 0) -> None:
        (self.root / f"{cmd}.out").write_text(out)
        (self.root / f"{cmd}.err").write_text(err)
        (self.root / f"{cmd}.rc").write_text(str(rc))

    def calls(self, cmd: str | None = None) -> list[list[str]]:
        path = self.root / "calls.jsonl"
        if not path.exists():
            return []
        out = [json.loads(line) for line in path.read_text().splitlines()]
        return [c for c in out if cmd is None or os.path.basename(c[0]) == cmd]

    def reset_calls(self) -> None:
        (self.root / "calls.jsonl").unlink(missing_ok=True)


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSlurm:
    root = tmp_path / "fake-slurm"
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    for cmd in ("sbatch", "squeue", "sacct", "scontrol", "scancel", "sinfo"):
        p = bin_dir / cmd
        p.write_text(SHIM.format(python=sys.executable))
        p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("FAKE_SLURM", str(root))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    fake = FakeSlurm(root)
    fake.set("scontrol", "MaxArraySize            = 1001\nMinJobAge               = 300 sec\n"
                         "AccountingStorageType   = accounting_storage/none\nSLURM_VERSION           = 22.05.8\n")
    fake.set("sinfo", "debug*|infinite|up\n")
    fake.set("sacct", "", "Slurm accounting storage is disabled\n", 1)
    return fake


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    root = tmp_path / "proj"
    exp = root / "experiments" / "echo"
    exp.mkdir(parents=True)
    (exp / "Dockerfile").write_text("FROM busybox:latest\nCOPY . /app\n")
    (root / "hpcexp.yaml").write_text("slurm:\n  partition: debug\n  time: '10'\n"
                                      "experiments:\n  echo:\n    command: [/bin/sh, /app/run.sh]\n"
                                      "    slurm: {mem: 1G}\n")
    (root / "images").mkdir()
    (root / "images" / "echo.sif").write_text("sif")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return load_project(root)


def _submit(project: Any, sets: list[dict[str, str]], **kw: Any) -> slurm.Submission:
    exp = project.experiment("echo")
    res = kw.pop("resources", exp.slurm)
    return slurm.submit_runs(project, exp, project.images_dir / "echo.sif", sets, res, **kw)


# ---------------------------------------------------------------------------------------------
# Parsers (golden scheduler output)
# ---------------------------------------------------------------------------------------------

def test_parse_real_scontrol_output() -> None:
    jobs = slurm.parse_scontrol_jobs((GOLDEN / "scontrol_show_job.txt").read_text())
    assert jobs["4"].state == "COMPLETED" and jobs["4"].exit_code == 0 and jobs["4"].node == "localhost"
    assert jobs["5_2"].state == "COMPLETED" and jobs["5_2"].name.startswith("hpcexp-sweep-")
    assert jobs["14"].state == "CANCELLED" and jobs["14"].reason == "JobHeldUser"
    assert jobs["15"].exit_code == 146 and jobs["15"].elapsed == "00:00:04"


def test_parse_oom_node_fail_and_collapsed_array_from_scontrol() -> None:
    jobs = slurm.parse_scontrol_jobs((GOLDEN / "scontrol_oom.txt").read_text())
    assert jobs["201"].state == "OUT_OF_MEMORY" and jobs["201"].reason == "OutOfMemory"
    assert jobs["200_1"].state == "NODE_FAIL"
    assert {f"203_{i}" for i in range(2, 6)} <= set(jobs)


def test_parse_sacct_states_exit_codes_and_maxrss() -> None:
    jobs = slurm.parse_sacct((GOLDEN / "sacct_oom.txt").read_text())
    assert jobs["101"].state == "OUT_OF_MEMORY" and jobs["101"].max_rss == "1048576K"
    assert jobs["101"].exit_signal == 125
    assert jobs["102_3"].state == "CANCELLED" and jobs["102_3"].detail == "by 1001"
    assert {"102_4", "102_5", "102_6"} <= set(jobs)
    assert jobs["103"].state == "TIMEOUT" and jobs["104"].exit_code == 1


def test_parse_squeue_sbatch_and_config() -> None:
    live = slurm.parse_squeue("16|16|(null)|RUNNING|None|hpcexp-r|localhost|0:12\n"
                              "20_3|20|3|PENDING|JobArrayTaskLimit|hpcexp-sweep-s-0||0:00\n")
    assert live["16"].state == "RUNNING" and live["20_3"].reason == "JobArrayTaskLimit"
    assert slurm.parse_sbatch("123\n") == "123" and slurm.parse_sbatch("124;cluster\n") == "124"
    with pytest.raises(SchedulerError):
        slurm.parse_sbatch("Submitted batch job\n")
    cfg = slurm.parse_config("MaxArraySize            = 1001\nMinJobAge               = 300 sec\n")
    assert cfg == {"MaxArraySize": "1001", "MinJobAge": "300 sec"}
    assert slurm.expand_indices("[0-3%2]") == [0, 1, 2, 3] and slurm.expand_indices("1,4-5") == [1, 4, 5]
    assert slurm.array_spec(6, 4) == "0-5%4" and slurm.array_spec(1, None) == "0"


# ---------------------------------------------------------------------------------------------
# The decision table
# ---------------------------------------------------------------------------------------------

def _rec(**ids: Any) -> runs.RunRecord:
    r = runs.RunRecord(experiment="e", run_id="r", state="pending", executor="slurm")
    r.executor_ids = {"job_id": "101", "base_attempt": 1, **ids}
    return r


def _ev(live: dict | None = None, final: dict | None = None, ok: bool = True) -> slurm.Evidence:
    return slurm.Evidence(live=live or {}, final=final or {}, squeue_ok=ok, squeue_error=None if ok else "down",
                          checked=["squeue", "sacct (accounting disabled)", "scontrol show job"])


def _exit(code: int, **kw: Any) -> dict:
    return {1: {"started": {"time": "2026-01-01T00:00:00.000Z", "host": "n1"},
                "exit": {"exit_code": code, "time": "2026-01-01T00:00:05.000Z", "launch_error": None, **kw}}}


def _info(state: str, **kw: Any) -> slurm.JobInfo:
    return slurm.JobInfo("101", state, "scontrol", **kw)


@pytest.mark.parametrize("markers, final, state", [
    (_exit(0), None, "succeeded"),
    (_exit(3), None, "failed"),
    (_exit(0), _info("COMPLETED"), "succeeded"),
    ({}, _info("COMPLETED"), "unknown"),                 # Slurm says COMPLETED, the job never said 0
    ({}, _info("FAILED", exit_code=1), "failed"),
    ({}, None, "lost"),                                  # gone everywhere, nothing written
    (_exit(143, term_received=True), _info("CANCELLED", detail="by 1001"), "cancelled"),
    (_exit(143, term_received=True), _info("TIMEOUT"), "timeout"),
    # a payload that handles the time limit's SIGTERM and exits 0 did not finish: Slurm's word stands
    (_exit(0, term_received=True), _info("TIMEOUT"), "timeout"),
    (_exit(0, term_received=True), _info("CANCELLED", detail="by 1001"), "cancelled"),
    (_exit(0), _info("TIMEOUT"), "succeeded"),           # it exited 0 on its own, just at the limit
    (_exit(0, term_received=True), None, "succeeded"),   # no word from Slurm: the exit marker stands
    ({}, _info("OUT_OF_MEMORY", reason="OutOfMemory", exit_code=0, exit_signal=125), "out_of_memory"),
    (_exit(137), _info("OUT_OF_MEMORY"), "out_of_memory"),
    ({}, _info("NODE_FAIL"), "node_fail"),
    ({}, _info("BOOT_FAIL"), "node_fail"),
    ({}, _info("DEADLINE"), "timeout"),
    ({}, _info("PREEMPTED"), "failed"),
    (_exit(1, launch_error='"image gone"'), None, "failed"),
])
def test_decide_final_states(markers: dict, final: slurm.JobInfo | None, state: str) -> None:
    ev = _ev(final={"101": final} if final else {})
    new = slurm.decide(_rec(), markers, ev)
    assert new.state == state, new.reason
    if state == "lost":
        assert "squeue" in new.reason and "sacct" in new.reason and "no exit marker" in new.reason
    if state == "unknown":
        assert "not counted as success" in new.reason
    if state == "cancelled":
        assert "by 1001" in new.reason
    if state == "out_of_memory":
        assert "memory" in new.reason


def test_decide_live_states_and_unreachable_scheduler() -> None:
    assert slurm.decide(_rec(), {}, _ev(live={"101": slurm.JobInfo("101", "PENDING", "squeue",
                                                                   reason="Priority")})).state == "pending"
    assert slurm.decide(_rec(), {}, _ev(live={"101": slurm.JobInfo("101", "RUNNING", "squeue")})).state == "running"
    kept = slurm.decide(_rec(), {}, _ev(ok=False))
    assert kept.state == "pending" and "unreachable" in kept.reason


def test_decide_requeue_continues_the_record_with_an_attempt_counter() -> None:
    markers = {1: {"started": {"time": "t1", "host": "n1"}, "exit": {"exit_code": 143, "time": "t2"}},
               2: {"started": {"time": "t3", "host": "n2"}}}
    new = slurm.decide(_rec(), markers, _ev(live={"101": slurm.JobInfo("101", "RUNNING", "squeue")}))
    assert new.state == "running" and new.attempt == 2 and new.started_at == "t3"
    assert new.attempts == [{"attempt": 1, "job_id": "101", "started_at": "t1", "ended_at": "t2",
                             "exit_code": 143, "host": "n1", "note": "requeued"}]
    again = slurm.decide(new, markers, _ev(live={"101": slurm.JobInfo("101", "RUNNING", "squeue")}))
    assert len(again.attempts) == 1
    # requeued by Slurm before the new attempt started: the restart count says so
    pend = slurm.decide(_rec(), {1: markers[1]}, _ev(final={"101": _info("PENDING", restarts=1)}))
    assert pend.attempt == 2


def test_decide_orphan_without_job_id() -> None:
    r = _rec()
    r.executor_ids = {"job_name": "hpcexp-r"}
    r.state = "submitting"
    assert slurm.decide(r, {}, _ev()).state == "submitting"           # may still be submitting
    r.created_at = "2000-01-01T00:00:00.000Z"
    lost = slurm.decide(r, {}, _ev())
    assert lost.state == "lost" and "hpcexp-r" in lost.reason


# ---------------------------------------------------------------------------------------------
# Submission through shims
# ---------------------------------------------------------------------------------------------

def test_single_submit_writes_record_before_sbatch_and_keeps_script(project: Any, fake_slurm: FakeSlurm) -> None:
    sub = _submit(project, [{"msg": "hi"}])
    assert sub.job_ids == ["1000"] and sub.sweep_id is None
    paths, rec = sub.runs[0]
    disk = runs.read_record(paths)
    assert disk.state == "pending" and disk.executor == "slurm" and disk.executor_ids["job_id"] == "1000"
    assert disk.params == {"msg": "hi"} and disk.resources == {"partition": "debug", "time": "10", "mem": "1G"}
    script = paths.script.read_text()
    assert script == (fake_slurm.root / "script-1000.sbatch").read_text()
    assert "#SBATCH --partition=debug" in script and "#SBATCH --mem=1G" in script
    assert f"#SBATCH --job-name=hpcexp-{rec.run_id}" in script
    assert fake_slurm.calls("sbatch") == [["sbatch", "--parsable", str(paths.script)]] or \
        fake_slurm.calls("sbatch")[0][1:] == ["--parsable", str(paths.script)]
    assert 'mkdir -p "$HPCEXP_RUN_DIR/results" "$HPCEXP_RUN_DIR/events"' in script   # made by the job


def _seen(project: Any, sub: Any) -> list[runs.RunRecord]:
    """The sweep's records as every reader sees them: through reconcile."""
    return [r for _, r in executors.reconcile(Layout(project), [(p, runs.read_record(p)) for p, _ in sub.runs])]


def test_sweep_is_one_array_with_one_record_per_task(project: Any, fake_slurm: FakeSlurm) -> None:
    sets = sweep.product({"msg": "x"}, [("a", ["1", "2", "3"]), ("b", ["x", "y"])], [])
    sub = _submit(project, sets, sweep=True)
    assert len(fake_slurm.calls("sbatch")) == 1
    assert len(sub.runs) == 6 and len({p.dir for p, _ in sub.runs}) == 6
    recs = [runs.read_record(p) for p, _ in sub.runs]
    # no folder per task at submit (the job makes it); the script is the sweep's
    assert not any(p.dir.exists() for p, _ in sub.runs) and sub.scripts[0].parent == Layout(project).sweep_dir(
        str(sub.sweep_id))
    assert [r.params for r in recs] == [{"msg": "x", "a": a, "b": b} for a in "123" for b in "xy"]
    assert {r.sweep_id for r in recs} == {sub.sweep_id}
    # written once, before sbatch: on disk each task is `submitting` with its array position;
    # its job id comes from the sweep record for every reader (and in what submit returns)
    assert {r.state for r in recs} == {"submitting"} and "job_id" not in recs[0].executor_ids
    assert [r.executor_ids["job_id"] for _, r in sub.runs] == [f"1000_{i}" for i in range(6)]
    assert [r.executor_ids["job_id"] for r in _seen(project, sub)] == [f"1000_{i}" for i in range(6)]
    assert [r.task_index for r in recs] == list(range(6))
    script = (fake_slurm.root / "script-1000.sbatch").read_text()
    assert "#SBATCH --array=0-5\n" in script
    record = sweep.read_sweep(Layout(project), sub.sweep_id)
    assert record["size"] == 6 and record["submissions"][0]["array_job_id"] == "1000"


def test_sweep_larger_than_max_array_size_is_split_under_one_sweep_id(project: Any, fake_slurm: FakeSlurm) -> None:
    fake_slurm.set("scontrol", "MaxArraySize            = 4\n")
    sub = _submit(project, [{"i": str(i)} for i in range(10)], sweep=True,
                  resources=SlurmResources(max_parallel=2))
    assert len(fake_slurm.calls("sbatch")) == 3 and sub.job_ids == ["1000", "1001", "1002"]
    # with a throttle, each part waits for the previous one so the limit holds across parts
    assert [c[2:-1] for c in fake_slurm.calls("sbatch")] == [[], ["--dependency=afterany:1000"],
                                                             ["--dependency=afterany:1001"]]
    recs = _seen(project, sub)
    assert {r.sweep_id for r in recs} == {sub.sweep_id}
    assert [r.executor_ids["job_id"] for r in recs][-3:] == ["1001_3", "1002_0", "1002_1"]
    assert "#SBATCH --array=0-3%2\n" in (fake_slurm.root / "script-1000.sbatch").read_text()
    assert "#SBATCH --array=0-1%2\n" in (fake_slurm.root / "script-1002.sbatch").read_text()


@pytest.mark.parametrize("bad", ["x\n#SBATCH --mem=1T", "x\nrm -rf ~/canary", "a\rb"])
def test_newline_in_a_value_is_refused_before_anything(project: Any, fake_slurm: FakeSlurm, bad: str) -> None:
    with pytest.raises(UsageError, match="control character"):
        _submit(project, [{"ok": "1"}, {"msg": bad}], sweep=True)
    with pytest.raises(UsageError, match="control character"):
        _submit(project, [{"ok": "1"}], args=[bad])
    with pytest.raises(UsageError, match="control character"):
        _submit(project, [{"ok": "1"}], resources=SlurmResources(sbatch_args=(f"--comment={bad}",)))
    assert fake_slurm.calls("sbatch") == []
    assert not project.runs_dir.exists() or not any(project.runs_dir.rglob("run.json"))


def test_sbatch_refusal_names_the_option_exit_6_and_keeps_no_run(project: Any, fake_slurm: FakeSlurm) -> None:
    fake_slurm.set("sbatch", "", "sbatch: error: Invalid partition name specified\n", 1)
    with pytest.raises(SchedulerError, match="Invalid partition") as err:
        _submit(project, [{"a": "1"}, {"a": "2"}], sweep=True)
    assert err.value.exit_code == 6 and "nothing was submitted" in str(err.value)
    assert "the option it refused: --partition=debug" in str(err.value)
    # a submission that never happened leaves no run (and no sweep record) behind
    assert list(runs.iter_runs(Layout(project))) == []
    assert not Layout(project).sweeps_dir().exists() or not any(Layout(project).sweeps_dir().iterdir())


def test_dry_run_writes_and_submits_nothing(project: Any, fake_slurm: FakeSlurm) -> None:
    sub = _submit(project, [{"a": "1"}, {"a": "2"}], sweep=True, dry_run=True)
    assert sub.dry_run and len(sub.texts) == 1 and "#SBATCH --array=0-1" in sub.texts[0]
    assert fake_slurm.calls("sbatch") == [] and not project.runs_dir.exists()


def test_template_selection_and_errors(project: Any, fake_slurm: FakeSlurm) -> None:
    slurm_dir = project.slurm_dir
    slurm_dir.mkdir()
    from hpcexp.execute.slurm.sbatch import default_template

    (slurm_dir / "default.sbatch").write_text(default_template().replace("set -euo pipefail",
                                                                         "set -euo pipefail\n# DEFAULT-MARK"))
    (slurm_dir / "echo.sbatch").write_text(default_template().replace("set -euo pipefail",
                                                                      "set -euo pipefail\n# ECHO-MARK\n{{ nope }}"))
    with pytest.raises(UsageError, match=r"^slurm/echo.sbatch:\d+: unknown placeholder \{\{ nope \}\}$"):
        _submit(project, [{}])
    (slurm_dir / "echo.sbatch").unlink()
    sub = _submit(project, [{}])
    assert "# DEFAULT-MARK" in sub.runs[0][0].script.read_text()
    assert len(fake_slurm.calls("sbatch")) == 1


# ---------------------------------------------------------------------------------------------
# Reconcile and stop through shims
# ---------------------------------------------------------------------------------------------

def test_reconcile_one_squeue_call_and_sacct_skipped_once_disabled(project: Any, fake_slurm: FakeSlurm) -> None:
    # the config claims accounting, but sacct says it is disabled: hpcexp learns and stops asking
    fake_slurm.set("scontrol", "MaxArraySize = 1001\nAccountingStorageType = accounting_storage/slurmdbd\n")
    sub = _submit(project, [{"i": str(i)} for i in range(5)], sweep=True)
    layout = Layout(project)
    fake_slurm.set("squeue", "".join(f"1000_{i}|1000|{i}|PENDING|Priority|hpcexp-x||0:00\n" for i in range(5)))
    fake_slurm.reset_calls()
    items = executors.reconcile(layout, list(runs.iter_runs(layout)))
    assert [r.state for _, r in items] == ["pending"] * 5
    assert len(fake_slurm.calls("squeue")) == 1 and fake_slurm.calls("sacct") == []
    # tasks 0-2 finished (markers), 3 vanished without a trace, 4 still queued
    for i, (paths, _) in enumerate(sub.runs[:3]):
        paths.events.mkdir(parents=True)   # as the job script does (mkdir -p)
        (paths.events / "attempt-1.started").write_text('{"time": "t", "host": "n1"}')
        (paths.events / "attempt-1.exit").write_text(json.dumps({"exit_code": i, "time": "t2", "launch_error": None}))
    fake_slurm.set("squeue", "1000_4|1000|4|PENDING|Priority|hpcexp-x||0:00\n")
    fake_slurm.set("scontrol", "")
    fake_slurm.reset_calls()
    items = sorted(executors.reconcile(layout, list(runs.iter_runs(layout))), key=lambda t: t[1].task_index)
    assert [r.state for _, r in items] == ["succeeded", "failed", "failed", "lost", "pending"]
    assert items[1][1].exit_code == 1 and "accounting disabled" in items[3][1].reason
    assert [len(fake_slurm.calls(c)) for c in ("squeue", "sacct", "scontrol")] == [1, 1, 1]
    assert sweep.summary(r.state for _, r in items) == "1 succeeded, 2 failed, 1 lost, 1 pending"
    fake_slurm.reset_calls()
    executors.reconcile(layout, list(runs.iter_runs(layout)))
    assert fake_slurm.calls("sacct") == []          # remembered: accounting is disabled


def test_reconcile_attaches_a_job_submitted_by_a_dead_hpcexp(project: Any, fake_slurm: FakeSlurm) -> None:
    sub = _submit(project, [{}])
    paths, rec = sub.runs[0]
    rec = runs.read_record(paths)
    rec.state, rec.executor_ids = "submitting", {"job_name": rec.executor_ids["job_name"], "base_attempt": 1}
    runs.write_record(paths, rec)
    fake_slurm.set("squeue", f"1000|1000|N/A|RUNNING|None|{rec.executor_ids['job_name']}|n1|0:03\n")
    (_, new), = executors.reconcile(Layout(project), [(paths, rec)])
    assert new.state == "running" and new.executor_ids["job_id"] == "1000" and "attached_by" in new.executor_ids


def test_stop_cancels_whole_array_or_single_tasks(project: Any, fake_slurm: FakeSlurm) -> None:
    sub = _submit(project, [{"i": str(i)} for i in range(3)], sweep=True)
    layout = Layout(project)
    fake_slurm.set("squeue", "".join(f"1000_{i}|1000|{i}|PENDING|Priority|hpcexp-x||0:00\n" for i in range(3)))
    fake_slurm.set("scontrol", "")
    slurm.stop(layout, [(p, runs.read_record(p)) for p, _ in sub.runs[:1]])
    slurm.stop(layout, [(p, runs.read_record(p)) for p, _ in sub.runs])
    assert [c[1:] for c in fake_slurm.calls("scancel")] == [["1000_0"], ["1000"]]
    fake_slurm.set("squeue", "")
    fake_slurm.set("scontrol", "".join(f"JobId={1001 + i} ArrayJobId=1000 ArrayTaskId={i} JobName=x "
                                       "JobState=CANCELLED Reason=None ExitCode=0:0\n" for i in range(3)))
    items = executors.reconcile(layout, [(p, runs.read_record(p)) for p, _ in sub.runs])
    assert [r.state for _, r in items] == ["cancelled"] * 3


def test_resubmit_failed_submits_only_those_tasks(project: Any, fake_slurm: FakeSlurm) -> None:
    sub = _submit(project, [{"i": str(i)} for i in range(4)], sweep=True)
    for i, (paths, _) in enumerate(sub.runs):
        paths.events.mkdir(parents=True)
        (paths.events / "attempt-1.exit").write_text(json.dumps({"exit_code": 1 if i == 2 else 0, "time": "t"}))
    fake_slurm.set("squeue", "")
    fake_slurm.set("scontrol", "")
    res = slurm.resubmit_sweep(project, sub.sweep_id)
    assert res.job_ids == ["1001"] and [r.task_index for _, r in res.runs] == [2]
    fake_slurm.set("squeue", "1001_0|1001|0|PENDING|Priority|x||0:00\n")
    rec = _seen(project, res)[0]
    assert rec.attempt == 2 and rec.state == "pending" and rec.attempts[0]["exit_code"] == 1
    assert rec.executor_ids["job_id"] == "1001_0" and rec.executor_ids["base_attempt"] == 2
    script = (fake_slurm.root / "script-1001.sbatch").read_text()
    assert "HPCEXP_ATTEMPT_BASE=2" in script and script.count("HPCEXP_RUN_DIR=") == 1
    assert (sub.runs[2][0].dir / "job.attempt-1.sbatch").exists()
    with pytest.raises(UsageError, match="no task is"):
        (sub.runs[2][0].events / "attempt-2.exit").write_text('{"exit_code": 0, "time": "t"}')
        slurm.resubmit_sweep(project, sub.sweep_id)


def test_facts_and_doctor_checks(fake_slurm: FakeSlurm) -> None:
    f = slurm.facts()
    assert f["max_array_size"] == 1001 and f["min_job_age"] == 300 and f["accounting"] is False
    assert f["default_partition"] == "debug" and f["default_time_limit"] == "infinite"
    checks = {name: (status, detail) for name, status, detail, _ in slurm.doctor_checks(f)}
    assert checks["accounting"][0] == "warn" and checks["slurm.max_array_size"][0] == "ok"
    assert slurm.doctor_checks({"available": False, "error": "x"})[0][1] == "warn"


# ---------------------------------------------------------------------------------------------
# Sweep expansion
# ---------------------------------------------------------------------------------------------

def test_sweep_expansion_and_files(tmp_path: Path) -> None:
    assert sweep.parse_sweep_option("lr=0.1,0.01") == ("lr", ["0.1", "0.01"])
    with pytest.raises(UsageError):
        sweep.parse_sweep_option("lr")
    with pytest.raises(UsageError):
        sweep.parse_sweep_option("1x=a")
    sets = sweep.product({"f": "1"}, [("a", ["1", "2"]), ("b", ["x"]), ("a", ["3"])], [{"c": "k"}, {"c": "l"}])
    assert len(sets) == 6 and sets[0] == {"f": "1", "c": "k", "a": "1", "b": "x"}
    yml = tmp_path / "s.yaml"
    yml.write_text("- {lr: 0.1, seed: 1}\n- {lr: 0.2, seed: 2}\n")
    assert sweep.load_sweep_file(yml) == [{"lr": "0.1", "seed": "1"}, {"lr": "0.2", "seed": "2"}]
    grid = tmp_path / "g.yaml"
    grid.write_text("lr: [1, 2]\nseed: 3\n")
    assert sweep.load_sweep_file(grid) == [{"lr": "1", "seed": "3"}, {"lr": "2", "seed": "3"}]
    csvf = tmp_path / "s.csv"
    csvf.write_text('lr,msg\n0.1,"a, b"\n0.2,"$(x)"\n')
    assert sweep.load_sweep_file(csvf) == [{"lr": "0.1", "msg": "a, b"}, {"lr": "0.2", "msg": "$(x)"}]
    bad = tmp_path / "bad.csv"
    bad.write_text('msg\n"a\nb"\n')
    with pytest.raises(UsageError, match="control character"):
        sweep.load_sweep_file(bad)


# ---------------------------------------------------------------------------------------------
# CLI (child process): refusal before sbatch, dry run
# ---------------------------------------------------------------------------------------------

def test_cli_refuses_newline_before_any_sbatch_call(project: Any, fake_slurm: FakeSlurm) -> None:
    env = {"PATH": os.environ["PATH"], "FAKE_SLURM": str(fake_slurm.root)}
    proc = run_cli("submit", "echo", "-p", "msg=x\n#SBATCH --mem=1T", cwd=project.root, env=env)
    assert_clean_error(proc, 2, "control character")
    proc = run_cli("submit", "echo", "--sweep", "a=1,2", "--sbatch-arg", "--comment=a\nb", cwd=project.root, env=env)
    assert_clean_error(proc, 2, "control character")
    proc = run_cli("submit", "echo", "--time", "soon", cwd=project.root, env=env)
    assert_clean_error(proc, 2, "--time")
    assert fake_slurm.calls("sbatch") == []
    assert not project.runs_dir.exists()


def test_cli_hostile_values_reach_the_script_quoted_once(project: Any, fake_slurm: FakeSlurm) -> None:
    sub = _submit(project, [{f"v{i}": v for i, v in enumerate(HOSTILE_VALUES)}])
    text = sub.runs[0][0].script.read_text()
    import shlex

    line = next(ln for ln in text.splitlines() if ln.startswith("HPCEXP_CMD=("))
    words = shlex.split(line[len("HPCEXP_CMD=("):-1])
    for i, v in enumerate(HOSTILE_VALUES):
        assert f"--v{i}={v}" in words


def test_batched_record_writes_publish_whole_records(tmp_path: Path, project: Any) -> None:
    layout = Layout(project)
    items = []
    for i in range(40):
        paths = runs.allocate_run(layout, "echo")
        items.append((paths, runs.RunRecord(experiment="echo", run_id=paths.dir.name, params={"i": str(i)})))
    runs.write_records(items)
    assert [runs.read_record(p).params for p, _ in items] == [{"i": str(i)} for i in range(40)]
    assert not [f for p, _ in items for f in os.listdir(p.dir) if f.startswith(".hpcexp-tmp-")]


def test_array_task_ids_are_reattached_from_the_sweep_record(project: Any, fake_slurm: FakeSlurm) -> None:
    sub = _submit(project, [{"i": str(i)} for i in range(3)], sweep=True)
    layout = Layout(project)
    paths, _ = sub.runs[2]
    fake_slurm.set("squeue", "".join(f"1000_{i}|1000|{i}|PENDING|Priority|x||0:00\n" for i in range(3)))
    # the tasks' records are the part's durable table, their job ids the sweep record's
    items = executors.reconcile(layout, runs.resolve(layout, str(sub.sweep_id)))
    assert [r.executor_ids["job_id"] for _, r in items] == ["1000_0", "1000_1", "1000_2"]
    assert {r.state for _, r in items} == {"pending"}
    assert runs.read_record(paths).run_id == paths.dir.name and runs.read_record(paths).from_table
    # still queued, job id durable in the sweep record: no folder and no run.json was made for it
    assert not any(p.dir.exists() for p, _ in sub.runs)
    # once a task started (its job made its folder), its record says so, written durably
    paths.events.mkdir(parents=True)
    (paths.events / "attempt-1.started").write_text('{"time": "t", "host": "n1"}')
    fake_slurm.set("squeue", "1000_2|1000|2|RUNNING|None|x|n1|0:01\n"
                   + "".join(f"1000_{i}|1000|{i}|PENDING|Priority|x||0:00\n" for i in range(2)))
    items = executors.reconcile(layout, runs.resolve(layout, str(sub.sweep_id)))
    on_disk = json.loads(paths.record.read_text())
    assert on_disk["state"] == "running" and on_disk["executor_ids"]["job_id"] == "1000_2"
    assert not runs.read_record(paths).from_table
    assert not sub.runs[0][0].dir.exists()                       # the others are still the table's


def test_sweep_task_killed_between_sbatch_and_the_sweep_record_is_attached_by_name(
        project: Any, fake_slurm: FakeSlurm, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = _submit(project, [{"i": str(i)} for i in range(3)], sweep=True)
    layout = Layout(project)
    record = sweep.read_sweep(layout, str(sub.sweep_id))
    name = record["submissions"][0]["job_name"]
    record["submissions"][0]["array_job_id"] = None      # as if killed before it was updated
    sweep.write_sweep(layout, record)
    fake_slurm.set("squeue", "".join(f"1000_{i}|1000|{i}|PENDING|Priority|{name}||0:00\n" for i in range(3)))
    items = executors.reconcile(layout, runs.resolve(layout, str(sub.sweep_id)))
    assert [r.executor_ids["job_id"] for _, r in items] == ["1000_0", "1000_1", "1000_2"]
    assert all("attached_by" in runs.read_record(p).executor_ids for p, _ in items)  # made durable


def test_sbatch_that_does_not_answer_leaves_records_submitting(project: Any, fake_slurm: FakeSlurm,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm.commands, "SBATCH_TIMEOUT", 0.5)  # looked up where sbatch runs
    (fake_slurm.root / "sbatch.sleep").write_text("3")
    with pytest.raises(slurm.SubmitUncertain, match="may or may not have been queued") as err:
        _submit(project, [{"a": "1"}, {"a": "2"}], sweep=True)
    assert err.value.exit_code == 6
    recs = [r for _, r in runs.iter_runs(Layout(project))]
    assert len(recs) == 2 and all(r.state == "submitting" and not r.launch_error for r in recs)


def test_record_json_text_and_copy_match_the_contract(tmp_path: Path) -> None:
    rec = runs.RunRecord(experiment="e", run_id="r", params={"a": "ä\n\"\\"}, attempts=[{"attempt": 1}],
                         exit_code=0, git_dirty=False, signal=None)
    rec.extra = {"container_env": {"A": "1"}, "state": "ignored: a real field wins"}
    text = rec.json_text()
    assert json.loads(text) == rec.to_dict() and rec.to_dict()["state"] == "created"
    lines = text.splitlines()   # one top-level key a line, sorted, the rest compact
    assert lines[0] == "{" and lines[-1] == "}" and len(lines) == len(rec.to_dict()) + 2
    keys = [json.loads("{" + ln.rstrip(",") + "}").popitem()[0] for ln in lines[1:-1]]
    assert keys == sorted(rec.to_dict())
    assert "ä" in text     # kept as UTF-8, not escaped
    paths = runs.RunPaths(tmp_path / "e" / "r")
    paths.dir.mkdir(parents=True)
    runs.write_record(paths, rec)    # the durable writer writes the same text
    assert paths.record.read_text(encoding="utf-8") == text
    dup = rec.copy()
    dup.executor_ids["job_id"] = "1"
    dup.attempts[0]["attempt"] = 2
    dup.params["a"] = "b"
    assert rec.executor_ids == {} and rec.attempts == [{"attempt": 1}] and rec.params == {"a": "ä\n\"\\"}


def test_status_when_the_scheduler_does_not_answer_keeps_the_last_state(project: Any, fake_slurm: FakeSlurm) -> None:
    sub = _submit(project, [{}])
    fake_slurm.set("squeue", "", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)\n", 1)
    (paths, rec), = executors.reconcile(Layout(project), [(sub.runs[0][0], runs.read_record(sub.runs[0][0]))])
    assert rec.state == "pending" and "scheduler unreachable" in rec.reason and "connect failure" in rec.reason
    assert runs.read_record(paths).state == "pending"
    assert fake_slurm.calls("sacct") == [] and fake_slurm.calls("scancel") == []


def test_wait_polls_until_every_run_settles(tmp_path, monkeypatch):
    """One reconcile (= one squeue call) per round for all runs; unknown counts as settled."""
    from hpcexp.core import runs as runs_mod
    from hpcexp.core.config import load_project
    from hpcexp.core.layout import Layout
    from hpcexp.execute import slurm as slurm_mod

    (tmp_path / "hpcexp.yaml").write_text("")
    layout = Layout(load_project(tmp_path))
    dirs = []
    for _ in range(3):
        paths = runs_mod.allocate_run(layout, "exp")
        runs_mod.write_record(paths, runs_mod.RunRecord(experiment="exp", run_id=paths.dir.name,
                                                         state="pending", executor="slurm"))
        dirs.append(paths.dir)
    script = [["pending", "running", "pending"], ["running", "succeeded", "running"],
              ["failed", "succeeded", "unknown"]]
    rounds = []

    def fake_reconcile(layout_, items):
        states = script[len(rounds)]
        rounds.append(len(items))
        for (_, rec), state in zip(items, states):
            rec.state = state
        return items

    monkeypatch.setattr(executors, "reconcile", fake_reconcile)
    seen = []
    final = slurm_mod.wait(layout, dirs, on_change=lambda recs: seen.append([r.state for r in recs]),
                           sleep=lambda s: None)
    assert [r.state for r in final] == ["failed", "succeeded", "unknown"]
    assert rounds == [3, 3, 3]
    assert seen == script


def test_the_sweep_model_loads_nothing_of_the_slurm_executor() -> None:
    """sweep.py is the pure sweep model: expanding a sweep imports neither the executor nor
    the job-script renderer (resubmitting a sweep lives in the executor, which uses sweep)."""
    import subprocess

    code = ("import sys, hpcexp.execute.sweep as s; s.product({}, [('a', ['1', '2'])], []); "
            "print(sorted(m for m in sys.modules if m.startswith('hpcexp.execute')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    loaded = json.loads(out.stdout.replace("'", '"'))
    assert "hpcexp.execute.sweep" in loaded and "hpcexp.execute.values" in loaded
    assert not [m for m in loaded if m.startswith("hpcexp.execute.slurm")], loaded
    with pytest.raises(UsageError, match="control character"):
        sweep.parse_sweep_option("a=1\n#SBATCH --mem=1T")
    assert slurm.resubmit_sweep is slurm.submit.resubmit_sweep and not hasattr(sweep, "resubmit")


def test_the_package_face_exports_what_it_lists_and_the_pure_modules_stay_pure() -> None:
    """``from hpcexp.execute.slurm import X`` works for every listed name, and the modules
    that decide and parse import nothing that runs a command or touches a file."""
    import ast
    import importlib
    import types

    missing = [name for name in slurm.__all__ if not hasattr(slurm, name)]
    # the names shared by a module and its function are the functions, as before the split
    for name in ("decide", "reconcile", "facts"):
        assert callable(getattr(slurm, name)) and not isinstance(getattr(slurm, name), types.ModuleType)
        assert getattr(importlib.import_module(f"hpcexp.execute.slurm.{name}"), name) is getattr(slurm, name)
    assert not missing and "decide" in slurm.__all__ and "resubmit_sweep" in slurm.__all__
    assert slurm.EXECUTOR is executors.get("slurm") and isinstance(slurm.EXECUTOR, executors.Executor)
    folder = Path(slurm.__file__).parent
    for module, allowed in (("decide", {"hpcexp.core.runs", "hpcexp.execute.slurm.parse"}),
                            ("parse", {"hpcexp.errors"}), ("sbatch", {"hpcexp.errors", "hpcexp.execute.values",
                                                                      "hpcexp.runtime.apptainer",
                                                                      "hpcexp.execute.slurm.checkpoint"}),
                            ("checkpoint", set())):
        tree = ast.parse((folder / f"{module}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hpcexp"):
                imported |= {node.module} if node.module != "hpcexp.core" else {f"hpcexp.core.{a.name}"
                                                                                 for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name.startswith("hpcexp")}
        type_only = {"hpcexp.infra"} if module == "parse" else set()   # process.Result, for annotations
        assert imported - type_only <= allowed, (module, imported - allowed)
