"""hpcexp.execute.local with a fake container runtime (a Python script in place of apptainer).

The supervisor, exit decoding, stop, watchdog and reconcile are exercised for real;
only apptainer is replaced. The real thing is in test_local_e2e.py.
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

import pytest

from hpcexp.core import runs
from hpcexp.core.layout import RunPaths
from hpcexp.execute import local
from hpcexp.execute.local import supervisor
from hpcexp.infra import host as hostinfo
from hpcexp.runtime import versions


def _record(run_dir: Path, code: str, *, run_id: str | None = None, grace: float = 10.0) -> RunPaths:
    run_dir.mkdir(parents=True)
    paths = RunPaths(run_dir)
    paths.results.mkdir()
    rid = run_id or run_dir.name
    rec = runs.RunRecord(experiment=run_dir.parent.name, run_id=rid, command=[sys.executable, "-c", code],
                         executor_ids={"host": hostinfo.hostname(), "boot_id": hostinfo.boot_id(),
                                       "launcher_pid": os.getpid(),
                                       "launcher_start": hostinfo.pid_start_ticks(os.getpid())})
    rec.extra = {"container_env": {"HPCEXP_RUN_ID": rid, "ODD": "a b\n$(x);'\""}, "grace": grace}
    runs.write_record(paths, rec)
    return paths


def _wait(pred, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.mark.parametrize("rc,fatal,state,exit_code,sig,launch", [
    (0, None, "succeeded", 0, None, None),
    (7, None, "failed", 7, None, None),
    (139, None, "failed", 139, 11, None),
    (255, "FATAL:   container creation failed: x", "failed", None, None, "FATAL:   container creation failed: x"),
    (255, None, "failed", 255, None, None),         # a payload's own 255 without FATAL stays its code
    (-9, None, "failed", None, 9, None),
])
def test_decode_exit(rc, fatal, state, exit_code, sig, launch) -> None:
    out = supervisor._decode_exit(rc, fatal, supervisor._StopState(10))
    assert out["state"] == state
    assert out.get("exit_code") == exit_code
    assert out.get("signal") == sig
    assert out.get("launch_error") == launch


def test_decode_exit_when_stopped_is_cancelled() -> None:
    stop = supervisor._StopState(10)
    stop.requested, stop.signal_sent = True, signal.SIGKILL
    out = supervisor._decode_exit(137, None, stop)
    assert out == {"state": "cancelled", "exit_code": 137, "signal": 9}


def test_alive_knows_pid_reuse_and_zombies() -> None:
    me = os.getpid()
    assert hostinfo.pid_alive(me, hostinfo.pid_start_ticks(me))
    assert not hostinfo.pid_alive(me, (hostinfo.pid_start_ticks(me) or 0) + 1)  # same pid, another process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    _wait(lambda: hostinfo.pid_start_ticks(child.pid) is None)  # exited, not yet reaped: a zombie is not alive
    assert not hostinfo.pid_alive(child.pid)
    child.wait()
    assert not hostinfo.pid_alive(None)


def test_supervise_success_writes_logs_record_and_passes_env_verbatim(tmp_path: Path) -> None:
    code = ("import os,sys; sys.stdout.write('out\\n'); sys.stderr.write('err\\n');"
            "open('env.txt','w').write(os.environ['APPTAINERENV_ODD'])")
    paths = _record(tmp_path / "exp" / "r1", code)
    rec = local.supervise(paths)
    assert rec.state == "succeeded" and rec.exit_code == 0
    assert paths.stdout.read_bytes() == b"out\n" and paths.stderr.read_bytes() == b"err\n"
    assert (paths.dir / "env.txt").read_text() == "a b\n$(x);'\""
    disk = runs.read_record(paths)
    assert disk.state == "succeeded" and disk.started_at and disk.ended_at
    assert disk.executor_ids["supervisor_pid"] == os.getpid()
    assert not hostinfo.pid_alive(disk.executor_ids["watchdog_pid"])


def test_supervise_failure_and_launch_error(tmp_path: Path) -> None:
    rec = local.supervise(_record(tmp_path / "exp" / "r1", "import sys; sys.exit(3)"))
    assert (rec.state, rec.exit_code, rec.launch_error) == ("failed", 3, None)
    code = "import sys; sys.stderr.write('WARNING: x\\nFATAL:   bind source missing\\n'); sys.exit(255)"
    rec = local.supervise(_record(tmp_path / "exp" / "r2", code))
    assert (rec.state, rec.exit_code) == ("failed", None)
    assert rec.launch_error == "FATAL:   bind source missing"


def test_supervise_never_blocks_on_big_output(tmp_path: Path) -> None:
    code = "import sys; [sys.stdout.write('x' * 1023 + '\\n') for _ in range(20000)]"
    paths = _record(tmp_path / "exp" / "r1", code)
    rec = local.supervise(paths, tee=False)
    assert rec.state == "succeeded"
    assert paths.stdout.stat().st_size == 20000 * 1024


def test_stop_request_cancels_with_sigterm_then_sigkill(tmp_path: Path) -> None:
    # the payload ignores SIGTERM and forks a child: the grace period ends in SIGKILL of the group
    code = ("import signal,subprocess,sys,time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            "subprocess.Popen([sys.executable,'-c','import time; time.sleep(600)']);"
            "print('ready', flush=True); time.sleep(600)")
    paths = _record(tmp_path / "exp" / "r1", code, grace=0.5)
    seen: dict[str, object] = {}

    def stopper() -> None:
        # stop as `hpcexp stop` does: a request file naming the grace, then SIGUSR1 to the supervisor (us).
        # The payload can print before the supervisor has recorded `running` (it records after the
        # container started), so wait for both: this test is about stopping a running payload.
        _wait(lambda: (b"ready" in paths.stdout.read_bytes() if paths.stdout.exists() else False)
              and runs.read_record(paths).state == "running")
        rec = runs.read_record(paths)
        seen["marked"] = len(hostinfo.pids_with_marker(rec.run_id))
        paths.stop_request.write_text(json.dumps({"grace": 0.5, "user": "t", "host": "h", "pid": 1}))
        os.kill(os.getpid(), signal.SIGUSR1)

    th = threading.Thread(target=stopper)
    th.start()
    rec = local.supervise(paths)
    th.join(timeout=30)
    rid = rec.run_id
    assert seen == {"marked": 2}  # the payload and its child, both found by the run's marker
    assert rec.state == "cancelled" and rec.signal == 9
    assert "SIGKILL after 0.5 s" in (rec.reason or "")
    assert hostinfo.pids_with_marker(rid) == []


def test_supervise_in_main_thread_handles_sigterm_as_stop(tmp_path: Path) -> None:
    paths = _record(tmp_path / "exp" / "r1", "import time; print('go', flush=True); time.sleep(600)")
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.start()
    rec = local.supervise(paths)
    timer.join()
    assert rec.state == "cancelled" and rec.signal == 15
    assert "SIGTERM" in (rec.reason or "")


def test_detached_run_stop_and_stop_of_finished_run(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(Path(local.__file__).resolve().parent.parent))
    paths = _record(tmp_path / "exp" / "r1", "import time; print('go', flush=True); time.sleep(600)")
    rec = local.spawn_detached(paths)
    assert rec.state == "running"
    sup = rec.executor_ids["supervisor_pid"]
    assert sup != os.getpid() and hostinfo.pid_alive(sup)
    [(p, stopped)] = local.stop(None, [(paths, rec)], grace=5)  # type: ignore[arg-type]
    assert stopped.state == "cancelled" and stopped.signal == 15
    assert "hpcexp stop" in stopped.reason
    _wait(lambda: not hostinfo.pid_alive(sup))
    assert hostinfo.pids_with_marker(rec.run_id) == []
    [(p, again)] = local.stop(None, [(paths, stopped)], grace=5)  # type: ignore[arg-type]
    assert again.state == "cancelled"


def test_killed_supervisor_is_lost_and_leaves_no_process(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(Path(local.__file__).resolve().parent.parent))
    paths = _record(tmp_path / "exp" / "r1", "import time; print('go', flush=True); time.sleep(600)")
    rec = local.spawn_detached(paths)
    sup = rec.executor_ids["supervisor_pid"]
    os.kill(sup, signal.SIGKILL)
    _wait(lambda: not hostinfo.pid_alive(sup))
    # the watchdog kills the payload although the supervisor could not
    _wait(lambda: hostinfo.pids_with_marker(rec.run_id) == [])
    [(p, after)] = local.reconcile(None, [(paths, runs.read_record(paths))])  # type: ignore[arg-type]
    assert after.state == "lost"
    assert f"supervisor pid {sup} on host {hostinfo.hostname()} is gone" in after.reason
    assert runs.read_record(paths).state == "lost"


def test_reconcile_leaves_live_foreign_and_terminal_runs(tmp_path: Path) -> None:
    paths = _record(tmp_path / "exp" / "alive", "pass")
    rec = runs.read_record(paths)
    [(_, same)] = local.reconcile(None, [(paths, rec)])  # type: ignore[arg-type]
    assert same.state == "created"  # its launcher (this process) is alive
    other = _record(tmp_path / "exp" / "other", "pass")
    orec = runs.read_record(other)
    orec.executor_ids = {"host": "elsewhere.example", "supervisor_pid": 1, "supervisor_start": 1}
    orec.state = "running"
    runs.write_record(other, orec)
    [(_, o)] = local.reconcile(None, [(other, orec)])  # type: ignore[arg-type]
    assert o.state == "running"
    gone = _record(tmp_path / "exp" / "gone", "pass")
    grec = runs.read_record(gone)
    grec.executor_ids["launcher_pid"] = 2 ** 22 + 12345  # above pid_max: never a live process
    runs.write_record(gone, grec)
    [(_, young)] = local.reconcile(None, [(gone, grec)])  # type: ignore[arg-type]
    assert young.state == "created"  # a detached supervisor may still be starting
    grec.created_at = "2020-01-01T00:00:00.000Z"
    runs.write_record(gone, grec)
    [(_, g)] = local.reconcile(None, [(gone, grec)])  # type: ignore[arg-type]
    assert g.state == "lost" and "launching hpcexp pid" in g.reason
    rebooted = _record(tmp_path / "exp" / "rebooted", "pass")
    rrec = runs.read_record(rebooted)
    rrec.executor_ids["boot_id"] = "not-this-boot"
    runs.write_record(rebooted, rrec)
    [(_, r)] = local.reconcile(None, [(rebooted, rrec)])  # type: ignore[arg-type]
    assert r.state == "lost" and "rebooted" in r.reason


def test_stop_before_start_cancels_without_running(tmp_path: Path) -> None:
    paths = _record(tmp_path / "exp" / "r1", "open('ran','w').write('x')")
    paths.stop_request.write_text("{}")
    rec = local.supervise(paths)
    assert rec.state == "cancelled"
    assert not (paths.dir / "ran").exists()


def test_second_ctrl_c_kills_at_once(tmp_path: Path) -> None:
    code = ("import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            "print('ready', flush=True); time.sleep(600)")
    paths = _record(tmp_path / "exp" / "r1", code, grace=300)

    def presser() -> None:
        _wait(lambda: b"ready" in paths.stdout.read_bytes() if paths.stdout.exists() else False)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)

    th = threading.Thread(target=presser)
    th.start()
    started = time.monotonic()
    rec = local.supervise(paths, interactive=True)
    th.join()
    assert time.monotonic() - started < 60  # not the 300 s grace
    assert rec.state == "cancelled" and rec.signal == 9 and "Ctrl-C" in rec.reason


def test_trusted_pgid_refuses_a_stale_group() -> None:
    # A process group of our own, so the test does not depend on who leads pytest's group.
    leader = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        pgid = os.getpgid(leader.pid)
        assert pgid == leader.pid
        leader_start = hostinfo.pid_start_ticks(pgid)
        assert leader_start is not None
        ids = {"pgid": pgid, "apptainer_pid": pgid, "apptainer_start": leader_start}
        assert local.trusted_pgid(ids) == pgid
        assert local.trusted_pgid({**ids, "apptainer_start": leader_start + 1}) is None
        assert local.trusted_pgid({"pgid": pgid, "apptainer_pid": pgid}) is None
        assert local.trusted_pgid({}) is None
    finally:
        leader.kill()
        leader.wait()
    assert local.trusted_pgid(ids) is None, "a group whose leader is gone is never trusted"


def test_start_run_with_a_fake_apptainer_records_everything(tmp_path: Path, monkeypatch) -> None:
    """The library entry point, with an ImageInfo-like object and a stand-in apptainer on PATH."""
    from types import SimpleNamespace

    from hpcexp.core.config import load_project

    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "apptainer"
    fake.write_text("#!/bin/sh\n"
                    "if [ \"$1\" = --version ]; then echo 'apptainer version 9.8.7'; exit 0; fi\n"
                    "printf '%s\\n' \"$@\" > argv.txt\n"
                    "printf '%s' \"$APPTAINERENV_HPCEXP_PARAM_msg\" > msg.txt\n"
                    "printf '%s' \"${APPTAINER_BIND-unset}\" > bind.txt\n"
                    "echo payload-out; exit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("APPTAINER_BIND", "/:/host")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "proj"
    (root / "experiments" / "hello").mkdir(parents=True)
    (root / "experiments" / "hello" / "Dockerfile").write_text("FROM busybox:latest\n")
    (root / "hpcexp.yaml").write_text("experiments:\n  hello:\n    params: {msg: default, lr: '0.1'}\n")
    project = load_project(root)
    image = SimpleNamespace(path=tmp_path / "img.sif", sha256="ab" * 32, input_hash="cd" * 32,
                            recipe_sha256="ef" * 32, workdir=None, apptainer_version="1.0")
    value = "x $(y) 'z'\nw"
    paths, rec = local.start_run(project, project.experiment("hello"), image, params={"msg": value},
                                 tee=False, interactive=False, cmdline=["hpcexp", "run", "hello"])
    assert rec.state == "failed" and rec.exit_code == 3
    assert paths.dir.parent == root / "runs" / "hello" and paths.results.is_dir()
    assert rec.params == {"msg": value, "lr": "0.1"}
    assert rec.image == str(tmp_path / "img.sif") and rec.image_sha256 == "ab" * 32
    assert rec.recipe_sha256 == "ef" * 32 and rec.input_hash == "cd" * 32
    assert rec.apptainer_version == "9.8.7"  # asked while the payload ran, then remembered:
    assert local.known_version(str(fake), tmp_path / "cache" / "hpcexp") == "9.8.7"
    assert rec.extra["hpcexp_argv"] == ["hpcexp", "run", "hello"]
    argv = (paths.dir / "argv.txt").read_text().splitlines()
    assert argv[0] == "run" and "--no-eval" in argv and "--containall" in argv
    assert (paths.dir / "msg.txt").read_text() == value
    assert paths.stdout.read_text() == "payload-out\n"
    disk = runs.read_record(paths)
    assert disk.to_dict() == rec.to_dict()
    assert (paths.dir / "bind.txt").read_text() == "unset"  # the caller's APPTAINER_BIND was scrubbed


def test_a_terminal_that_stops_reading_never_blocks_the_payload(tmp_path: Path, monkeypatch) -> None:
    stuck = threading.Event()

    class StuckBuffer:
        def write(self, data: bytes) -> int:
            stuck.wait(120)  # a terminal nobody reads
            return len(data)

        def flush(self) -> None:
            pass

    class StuckStream:
        buffer = StuckBuffer()

    monkeypatch.setattr(sys, "stdout", StuckStream())
    code = "import sys; [sys.stdout.write('y' * 1023 + '\\n') for _ in range(30000)]"
    paths = _record(tmp_path / "exp" / "r1", code)
    try:
        rec = local.supervise(paths, tee=True)
    finally:
        stuck.set()
    assert rec.state == "succeeded"
    assert paths.stdout.stat().st_size == 30000 * 1024  # the log is complete
    assert "not shown on the terminal" in rec.reason


def test_runtime_version_is_remembered_per_binary(tmp_path: Path) -> None:
    prog = tmp_path / "apptainer"
    prog.write_text("#!/bin/sh\necho 'apptainer version 1.2.3'\n")
    prog.chmod(0o755)
    cache_dir = tmp_path / "cache"
    assert local.known_version(str(prog), cache_dir) is None
    versions.remember_version(str(prog), "1.2.3", versions.version_cache(cache_dir))
    assert local.known_version(str(prog), cache_dir) == "1.2.3"
    prog.write_text("#!/bin/sh\necho 'apptainer version 1.2.4 (a new install)'\n")
    assert local.known_version(str(prog), cache_dir) is None
