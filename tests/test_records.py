"""Run records at scale (docs/records.md): a sweep is written once with a handful of
fsyncs, and each reference reads only the records it returns."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from hpcexp.core import runs
from hpcexp.core.layout import Layout
from hpcexp.errors import NotFound, UsageError
from hpcexp.execute import base as executors
from tests import test_slurm
from tests.test_slurm import FakeSlurm, _submit

# the fake Slurm and the project of test_slurm.py, shared under the names the tests ask for
fake_slurm = test_slurm.fake_slurm
project = test_slurm.project

sys_fsync = os.fsync


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def counting(fd: int) -> None:
        calls.append(fd)
        sys_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Run ids whose run.json was read."""
    seen: list[str] = []
    real_file, real_table = runs._read_file, runs.table_record

    def counting(paths: runs.RunPaths) -> runs.RunRecord:
        rec = real_file(paths)
        seen.append(paths.dir.name)
        return rec

    def counting_table(paths: runs.RunPaths, data: Any = None, **kw: Any) -> runs.RunRecord | None:
        rec = real_table(paths, data, **kw)
        if rec is not None:
            seen.append(paths.dir.name)
        return rec

    monkeypatch.setattr(runs, "_read_file", counting)
    monkeypatch.setattr(runs, "table_record", counting_table)
    return seen


def test_a_sweep_is_written_once_with_a_few_fsyncs(project: Any, fake_slurm: FakeSlurm, fsyncs: list[int]) -> None:
    sub = _submit(project, [{"i": str(i)} for i in range(300)], sweep=True)
    # table, script, sweep record before sbatch and once after, each with its folder: not 2 per record
    assert 4 <= len(fsyncs) <= 10, len(fsyncs)
    layout = Layout(project)
    table = layout.sweep_table(str(sub.sweep_id), 0)
    lines = [json.loads(line) for line in table.read_text(encoding="utf-8").splitlines()]
    assert [d["run_id"] for d in lines] == [r.run_id for _, r in sub.runs]
    # no folder and no run.json per task: the table is each task's record until it changes
    assert not any(p.dir.exists() for p, _ in sub.runs)
    assert all(runs.read_record(p).to_dict() == d for (p, _), d in zip(sub.runs, lines))
    assert {d["state"] for d in lines} == {"submitting"}
    record = json.loads(layout.sweep(str(sub.sweep_id)).read_text())
    assert record["submissions"][0]["records"] == table.name and record["submissions"][0]["array_job_id"] == "1000"


def test_a_single_run_is_still_fsynced_before_and_after_sbatch(project: Any, fake_slurm: FakeSlurm,
                                                               fsyncs: list[int]) -> None:
    sub = _submit(project, [{}])
    paths, rec = sub.runs[0]
    assert runs.read_record(paths).executor_ids["job_id"] == rec.executor_ids["job_id"] == "1000"
    assert runs.read_record(paths).state == "pending"
    assert 4 <= len(fsyncs) <= 8


def _finished(layout: Layout, exp: str, n: int) -> list[runs.RunPaths]:
    """N finished runs of the past, a millisecond apart, oldest first."""
    out = []
    for k in range(n):
        paths = layout.run(exp, f"20260101-000000.{k:03d}-{abs(hash(exp)) % 0xffffff:06x}")
        paths.dir.mkdir(parents=True)
        runs.replace_record_nosync(paths, runs.RunRecord(experiment=exp, run_id=paths.dir.name, state="succeeded",
                                                         executor="slurm", exit_code=0,
                                                         created_at=f"2026-01-01T00:00:00.{k:03d}Z"))
        out.append(paths)
    return out


def test_each_reference_reads_only_what_it_returns(project: Any, fake_slurm: FakeSlurm, reads: list[str]) -> None:
    layout = Layout(project)
    others = _finished(layout, "other", 150) + _finished(layout, "echo", 50)
    sub = _submit(project, [{"i": str(i)} for i in range(20)], sweep=True)
    newest_other = others[149]
    del reads[:]
    tasks = runs.resolve(layout, str(sub.sweep_id))
    assert [r.task_index for _, r in tasks] == list(range(20))
    assert sorted(reads) == sorted(r.run_id for _, r in sub.runs)            # the sweep's own, once each
    del reads[:]
    rid = others[70].dir.name
    assert [r.run_id for _, r in runs.resolve(layout, rid)] == [rid] and reads == [rid]
    del reads[:]
    (last,) = runs.resolve(layout, "@last")                                   # the sweep's newest task
    assert last[1].sweep_id == sub.sweep_id and len(reads) <= 25
    del reads[:]
    (latest,) = runs.resolve(layout, "other")
    assert latest[1].run_id == newest_other.dir.name and reads == [newest_other.dir.name]
    del reads[:]
    with pytest.raises(UsageError, match="ambiguous"):
        runs.resolve(layout, rid[:8])                                         # the date: many runs
    assert reads == []
    prefix = rid[:-2]
    assert [r.run_id for _, r in runs.resolve(layout, prefix)] == [rid] and reads == [rid]
    del reads[:]
    assert [r.task_index for _, r in runs.resolve(layout, str(sub.sweep_id)[:-1])] == list(range(20))
    assert len(reads) == 20


def test_references_keep_their_meaning(project: Any, fake_slurm: FakeSlurm) -> None:
    layout = Layout(project)
    with pytest.raises(NotFound, match="no runs yet"):
        runs.resolve(layout, "@last")
    with pytest.raises(NotFound, match="has no runs yet"):
        runs.resolve(layout, "echo")
    first = []
    for k in range(3):   # a millisecond apart, so the newest is known
        paths = layout.run("echo", f"20260101-000000.00{k}-abcdef")
        paths.dir.mkdir(parents=True)
        runs.replace_record_nosync(paths, runs.RunRecord(experiment="echo", run_id=paths.dir.name,
                                                         created_at=f"2026-01-01T00:00:00.00{k}Z"))
        first.append(paths)
    # a damaged newest record is passed over while a usable one exists
    first[-1].record.write_text("{not json")
    assert runs.resolve(layout, "echo")[0][0] == first[1]
    assert runs.resolve(layout, "@last")[0][0] == first[1]
    # a damaged record named by its id is shown, not hidden
    (hit,) = runs.resolve(layout, first[-1].dir.name)
    assert hit[1].state == "unknown" and hit[1].error
    # a symlinked run folder is never followed
    link = layout.experiment_runs("echo") / "20991231-235959.999-abcdef"
    link.symlink_to(first[0].dir)
    (hit,) = runs.resolve(layout, link.name)
    assert hit[1].error and "symbolic link" in hit[1].error
    link.unlink()
    with pytest.raises(NotFound, match="no run, sweep or experiment"):
        runs.resolve(layout, "nothing-like-it")
    with pytest.raises(UsageError, match="invalid run reference"):
        runs.resolve(layout, "../etc")


def test_a_sweep_without_its_sweep_record_is_found_from_the_records(project: Any, fake_slurm: FakeSlurm) -> None:
    sub = _submit(project, [{"i": str(i)} for i in range(4)], sweep=True)
    layout = Layout(project)
    os.unlink(layout.sweep(str(sub.sweep_id)))
    assert [r.task_index for _, r in runs.resolve(layout, str(sub.sweep_id))] == [0, 1, 2, 3]
    layout.sweep(str(sub.sweep_id)).write_text("{damaged")
    assert [r.task_index for _, r in runs.resolve(layout, str(sub.sweep_id))] == [0, 1, 2, 3]


def test_a_task_is_its_table_line_until_it_changes_and_a_lost_run_json_falls_back_to_it(
        project: Any, fake_slurm: FakeSlurm) -> None:
    sub = _submit(project, [{"i": str(i)} for i in range(5)], sweep=True)
    layout = Layout(project)
    fake_slurm.set("squeue", "".join(f"1000_{i}|1000|{i}|PENDING|JobHeldUser|x||0:00\n" for i in range(5)))
    items = executors.reconcile(layout, runs.resolve(layout, str(sub.sweep_id)))
    assert [r.executor_ids["job_id"] for _, r in items] == [f"1000_{i}" for i in range(5)]
    assert [r.state for _, r in items] == ["pending"] * 5
    # found by id, by prefix, in listings and as the experiment's latest, with no folder
    (hit,) = runs.resolve(layout, sub.runs[3][1].run_id)
    assert hit[1].params == sub.runs[3][1].params and hit[1].from_table
    with pytest.raises(UsageError, match=f"ambiguous: matches {sub.runs[0][1].run_id}"):
        runs.resolve(layout, sub.runs[3][1].run_id[:-1])
    assert [r.task_index for _, r in runs.iter_runs(layout, "echo")] == [0, 1, 2, 3, 4]
    assert runs.resolve(layout, "echo")[0][1].task_index == 4
    # a task that ran has its own run.json; when a machine crash takes that away (it is written
    # without fsync when only the tables and sweep record hold what it says), the table is back
    fake_slurm.set("squeue", "1000_1|1000|1|RUNNING|None|x|n1|0:01\n"
                   + "".join(f"1000_{i}|1000|{i}|PENDING|JobHeldUser|x||0:00\n" for i in (0, 2, 3, 4)))
    executors.reconcile(layout, runs.resolve(layout, str(sub.sweep_id)))
    ran = sub.runs[1][0]
    assert json.loads(ran.record.read_text())["state"] == "running"
    ran.record.unlink()
    again = runs.read_record(ran)
    assert again.params == sub.runs[1][1].params and again.state == "submitting" and again.run_id == ran.dir.name


def test_status_json_of_many_runs_is_the_same_json(project: Any, fake_slurm: FakeSlurm, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    layout = Layout(project)
    _finished(layout, "echo", 130)
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": os.environ["PATH"], "FAKE_SLURM": str(fake_slurm.root)}
    long = run_cli("status", "--json", cwd=project.root, env=env)
    assert long.returncode == 0, long.stderr
    rows = json.loads(long.stdout)
    assert len(rows) == 130 and len(long.stdout.splitlines()) == 132          # one record a line
    one = run_cli("status", rows[5]["run_id"], "--json", cwd=project.root, env=env)
    assert json.loads(one.stdout) == [rows[5]]                                 # indented when short
    assert len(one.stdout.splitlines()) > 20


def test_a_long_sweep_command_line_is_kept_once_not_in_every_task(project: Any, fake_slurm: FakeSlurm) -> None:
    values = ",".join(str(i) for i in range(600))
    argv = ["hpcexp", "submit", "echo", "--sweep", f"i={values}"]
    sub = _submit(project, [{"i": str(i)} for i in range(600)], sweep=True, cmdline=argv)
    layout = Layout(project)
    assert json.loads(layout.sweep(str(sub.sweep_id)).read_text())["hpcexp_argv"] == argv
    sizes = {len(runs.read_record(p).json_text()) for p, _ in sub.runs}
    assert max(sizes) < 4096 and "hpcexp_argv" not in runs.read_record(sub.runs[0][0]).extra
    short = _submit(project, [{"i": "1"}, {"i": "2"}], sweep=True, cmdline=["hpcexp", "submit", "echo"])
    assert runs.read_record(short.runs[0][0]).extra["hpcexp_argv"] == ["hpcexp", "submit", "echo"]


def test_every_reader_and_writer_of_a_task_that_has_no_folder_yet(project: Any, fake_slurm: FakeSlurm,
                                                                   tmp_path: Path) -> None:
    """The commands a user points at a queued sweep task: logs, stop, archive, check."""
    import tarfile

    from hpcexp.archive import create_archive
    from hpcexp.core import fsck
    from hpcexp.execute import slurm

    sub = _submit(project, [{"i": str(i)} for i in range(3)], sweep=True)
    layout = Layout(project)
    paths = sub.runs[0][0]
    assert not paths.dir.exists()
    # check: nothing damaged, every task sound
    found, sound = fsck.check_records(layout, repair=False)
    assert found == [] and sorted(r.run_id for _, r in sound) == sorted(r.run_id for _, r in sub.runs)
    # archive: the task's record goes in as its run.json, though it had none
    out = tmp_path / "a.tar.gz"
    create_archive(layout, [sub.runs[0][1].run_id], output=out, fmt="tar.gz")
    with tarfile.open(out) as tar:
        member = next(m for m in tar.getnames() if m.endswith(f"{paths.dir.name}/run.json"))
        assert json.loads(tar.extractfile(member).read())["run_id"] == paths.dir.name
    # stop: the cancelled state is written, the folder made for it
    fake_slurm.set("squeue", "")
    fake_slurm.set("scontrol", "".join(f"JobId={1001 + i} ArrayJobId=1000 ArrayTaskId={i} JobName=x "
                                       "JobState=CANCELLED Reason=None ExitCode=0:0\n" for i in range(3)))
    items = slurm.stop(layout, runs.resolve(layout, str(sub.sweep_id)))
    assert [r.state for _, r in items] == ["cancelled"] * 3
    assert all(json.loads(p.record.read_text())["state"] == "cancelled" for p, _ in sub.runs)
