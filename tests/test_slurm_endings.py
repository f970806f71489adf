"""How a Slurm run's record tells its endings apart, without a cluster: ``sacct -D`` text
recorded on the test cluster (a job preempted, requeued, then completed), the closed
attempt's ``slurm_state``, the source of Slurm's last word, and the lines ``status RUN``
prints from them. The same endings are produced for real in test_slurm_endings_e2e.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpcexp.app.views import details, slurm_lines
from hpcexp.core import runs
from hpcexp.core.layout import RunPaths
from hpcexp.execute import slurm

GOLDEN = Path(__file__).parent / "golden" / "sbatch" / "scheduler"


def _preempted() -> dict[str, slurm.JobInfo]:
    return slurm.parse_sacct((GOLDEN / "sacct_preempted_requeued.txt").read_text())


def _rec(job: str = "942", attempt: int = 1, **ids: Any) -> runs.RunRecord:
    r = runs.RunRecord(experiment="e", run_id="r", state="running", executor="slurm", attempt=attempt)
    r.executor_ids = {"job_id": job, "base_attempt": 1, **ids}
    return r


def _markers(*attempts: int) -> dict[int, dict[str, dict[str, Any]]]:
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for a in attempts:
        code = 143 if a < max(attempts) else 0
        out[a] = {"started": {"time": f"2026-12-01T11:46:{40 + 10 * a}.000Z", "host": "localhost"},
                  "exit": {"exit_code": code, "time": f"2026-12-01T11:46:{45 + 10 * a}.000Z",
                           "term_received": code != 0, "launch_error": None}}
    return out


def test_sacct_duplicates_keep_the_earlier_attempts_states_oldest_first() -> None:
    info = _preempted()["942"]
    assert (info.state, info.source, info.exit_code) == ("COMPLETED", "sacct", 0)
    assert info.earlier == ("PREEMPTED",)
    assert info.elapsed == "00:00:01"                     # the current attempt's, not the first's
    text = "\n".join(["7|j|NODE_FAIL|0:0|0:0|00:00:20||a|b|n", "7|j|PREEMPTED|0:0|0:0|00:00:03||a|b|n",
                      "7|j|RUNNING|0:0|0:0|00:00:01||a|Unknown|n", "8|k|COMPLETED|0:0|0:0|00:00:01||a|b|n"])
    parsed = slurm.parse_sacct(text)
    assert parsed["7"].earlier == ("NODE_FAIL", "PREEMPTED") and parsed["7"].state == "RUNNING"
    assert parsed["8"].earlier == ()


def test_a_preempted_attempt_says_so_once_sacct_is_asked() -> None:
    ev = slurm.Evidence(final=_preempted(), checked=["squeue", "sacct"])
    new = slurm.decide(_rec(), _markers(1, 2), ev)
    assert new.state == "succeeded" and new.attempt == 2
    (first,) = new.attempts
    assert first["attempt"] == 1 and first["note"] == "requeued" and first["exit_code"] == 143
    assert first["slurm_state"] == "PREEMPTED"
    assert new.executor_ids["slurm_source"] == "sacct" and new.executor_ids["slurm_state"] == "COMPLETED"


def test_an_attempt_closed_while_queued_gets_slurms_word_later() -> None:
    # attempt 2 was seen running (squeue only): attempt 1 closed without Slurm's word
    running = slurm.Evidence(live={"942": slurm.JobInfo("942", "RUNNING", "squeue")}, checked=["squeue"])
    mid = slurm.decide(_rec(), {1: _markers(1, 2)[1], 2: {"started": _markers(1, 2)[2]["started"]}}, running)
    assert mid.state == "running" and mid.attempt == 2 and "slurm_state" not in mid.attempts[0]
    # the job has left the queue: sacct -D remembers how attempt 1 ended
    done = slurm.decide(mid, _markers(1, 2), slurm.Evidence(final=_preempted(), checked=["squeue", "sacct"]))
    assert done.state == "succeeded" and done.attempts[0]["slurm_state"] == "PREEMPTED"


def test_nothing_is_guessed_without_a_history() -> None:
    # scontrol (accounting off) has no history of earlier attempts: the attempt says only "requeued"
    final = {"942": slurm.JobInfo("942", "COMPLETED", "scontrol", exit_code=0, exit_signal=0, restarts=1)}
    new = slurm.decide(_rec(), _markers(1, 2), slurm.Evidence(final=final, checked=["squeue", "scontrol"]))
    assert new.state == "succeeded" and "slurm_state" not in new.attempts[0]
    assert new.executor_ids["slurm_source"] == "scontrol"
    # an attempt of an earlier job (before a resubmit) is never given this job's history
    rec = _rec(attempt=2, base_attempt=2)
    rec.attempts = [{"attempt": 1, "job_id": "900", "note": "resubmitted"}]
    final2 = {"942": slurm.JobInfo("942", "COMPLETED", "sacct", earlier=("PREEMPTED",))}
    new = slurm.decide(rec, {2: _markers(2)[2]}, slurm.Evidence(final=final2, checked=["sacct"]))
    assert "slurm_state" not in new.attempts[0]


def test_status_lines_show_slurms_state_elapsed_and_maxrss_with_their_source() -> None:
    rec = _rec(slurm_state="FAILED", slurm_exit_code="3:0", slurm_source="sacct", elapsed="00:00:04",
               max_rss="5120K")
    assert slurm_lines(rec) == ["slurm: FAILED (exit 3:0, from sacct)", "elapsed: 00:00:04", "max_rss: 5120K"]
    del rec.executor_ids["max_rss"]
    assert slurm_lines(rec)[-1] == "max_rss: not reported by sacct"
    rec.executor_ids["slurm_source"] = "scontrol"
    assert slurm_lines(rec)[-1] == "max_rss: not known to scontrol"
    assert slurm_lines(_rec()) == []                      # no word from Slurm yet
    local = runs.RunRecord(experiment="e", run_id="r", state="succeeded", executor="local")
    assert slurm_lines(local) == []
    rec.executor_ids.update(slurm_source="sacct", max_rss="5120K")
    lines = details(RunPaths(Path("/p/runs/e/r")), rec)
    at = lines.index("slurm: FAILED (exit 3:0, from sacct)")
    assert lines[at + 1:at + 3] == ["elapsed: 00:00:04", "max_rss: 5120K"]


def test_a_requeued_job_running_again_before_its_new_start_marker_is_running_not_failed() -> None:
    # found by the preemption e2e test: attempt 1's exit marker (143) exists, the job runs again
    first = {1: _markers(1, 2)[1]}
    live = slurm.Evidence(live={"942": slurm.JobInfo("942", "RUNNING", "squeue")}, checked=["squeue"])
    new = slurm.decide(_rec(), first, live)
    assert new.state == "running" and not new.terminal
    # the same marker (the payload was told to stop) while Slurm finishes the job
    # (COMPLETING): not ended yet, Slurm's own verdict (TIMEOUT, PREEMPTED...) decides it
    ending = slurm.Evidence(live={"942": slurm.JobInfo("942", "COMPLETING", "squeue")}, checked=["squeue"])
    done = slurm.decide(_rec(), first, ending)
    assert not done.terminal and "ending" in (done.reason or "")
