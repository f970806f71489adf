"""hpcexp.infra.process: the watchdog kills a child's process tree when its owner dies,
and only then; kill_group finds marked processes that left the group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hpcexp.infra import host as hostinfo
from hpcexp.infra import process

REPO = Path(__file__).resolve().parents[1]

OWNER = textwrap.dedent("""
    import subprocess, sys, time
    from hpcexp.infra import process
    child = process.spawn(["sleep", "60"], start_new_session=True)
    dog = process.Watchdog.start(child.pid, grace=0.5)
    print(child.pid, dog.pid, flush=True)
    if sys.argv[1] == "release":
        dog.release()
        print("released", flush=True)
    time.sleep(60)
""")


def _owner(mode: str) -> tuple[subprocess.Popen[str], int, int]:
    owner = subprocess.Popen([sys.executable, "-c", OWNER, mode], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert owner.stdout is not None
    child, dog = (int(x) for x in owner.stdout.readline().split())
    if mode == "release":
        assert owner.stdout.readline().strip() == "released"
    return owner, child, dog


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not hostinfo.pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_the_group_dies_with_its_owner() -> None:
    owner, child, dog = _owner("keep")
    try:
        assert hostinfo.pid_alive(child) and hostinfo.pid_alive(dog)
        owner.kill()   # SIGKILL: no chance to clean up
        owner.wait()
        assert _gone(child, 10), "the watchdog did not kill the orphaned group"
        assert _gone(dog, 10)
    finally:
        with_kill(child)
        owner.stdout.close()


def test_the_waiting_watchdog_is_a_shell_that_ignores_stop_signals() -> None:
    """Every run and build starts one, so it waits as a shell (no interpreter start-up);
    SIGTERM (`pkill -f hpcexp`), SIGINT and SIGHUP do not end it, its owner's death still does."""
    owner, child, dog = _owner("keep")
    try:
        assert os.path.realpath(f"/proc/{dog}/exe") == os.path.realpath("/bin/sh")
        time.sleep(0.2)  # past the shell's first command (its trap)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(dog, sig)
        time.sleep(0.3)
        assert hostinfo.pid_alive(dog) and hostinfo.pid_alive(child)
        owner.kill()
        owner.wait()
        assert _gone(child, 10), "the watchdog did not kill the orphaned group"
        assert _gone(dog, 10)
    finally:
        with_kill(child)
        owner.stdout.close()


def test_a_released_watchdog_kills_nothing() -> None:
    owner, child, dog = _owner("release")
    try:
        assert _gone(dog, 10)
        owner.kill()
        owner.wait()
        time.sleep(0.5)
        assert hostinfo.pid_alive(child)
    finally:
        with_kill(child)
        owner.stdout.close()


def with_kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def test_kill_group_finds_marked_processes_outside_the_group() -> None:
    marker = f"test-{os.getpid()}-{time.monotonic_ns()}"
    env = dict(os.environ, APPTAINERENV_HPCEXP_RUN_ID=marker)
    stray = subprocess.Popen(["sleep", "60"], env=env, start_new_session=True)  # its own group
    try:
        assert hostinfo.pids_with_marker(marker) == [stray.pid]
        assert process.kill_group(None, marker=marker, grace=0.5) == 1
        stray.wait(timeout=10)
        assert hostinfo.pids_with_marker(marker) == []
    finally:
        with_kill(stray.pid)


def test_spawn_takes_argument_lists_only() -> None:
    with pytest.raises(ValueError):
        process.spawn([])
    proc = process.spawn(["sh", "-c", "exit 3"], shell=True)   # the shell flag is dropped, never honoured
    assert proc.wait(timeout=10) == 3


@pytest.mark.parametrize("path", [None, "", "/usr/bin:/bin", "/nonexistent:/bin", ":/usr/bin", "/bin:/bin"])
@pytest.mark.parametrize("program", ["sh", "git", "no-such-program-here", "/bin/sh", "/bin", "./sh"])
def test_which_answers_as_shutil_which(program: str, path: str | None, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """process.which avoids importing shutil (start-up of a run); the answers are shutil's."""
    import shutil

    (tmp_path / "sh").write_text("#!/bin/sh\n")
    (tmp_path / "sh").chmod(0o755)
    monkeypatch.chdir(tmp_path)  # "" and "./sh" name the current folder
    assert process._which(program, path) == shutil.which(program, path=path)
