"""hpcexp.infra.host: the one answer to "who am I" and "is that process alive"."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from hpcexp.infra import host as hostinfo


def test_identity_of_this_process() -> None:
    me = os.getpid()
    ticks = hostinfo.pid_start_ticks(me)
    assert ticks is not None and hostinfo.pid_alive(me) and hostinfo.pid_alive(me, ticks)
    assert not hostinfo.pid_alive(me, ticks + 1)            # same pid, another process
    assert not hostinfo.pid_alive(None) and not hostinfo.pid_alive(0) and not hostinfo.pid_alive(-5)
    assert hostinfo.user() and hostinfo.hostname().startswith(hostinfo.short_hostname())


def test_an_exited_child_is_dead_even_before_it_is_reaped() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while hostinfo.pid_start_ticks(child.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not hostinfo.pid_alive(child.pid)                 # a zombie has exited
    child.wait()
    assert not hostinfo.pid_alive(child.pid)


def test_a_process_hidden_by_hidepid_counts_as_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """With /proc mounted hidepid=2 another user's process has no /proc entry; kill(0) says EPERM."""
    monkeypatch.setattr(hostinfo, "pid_start_ticks", lambda pid: None)
    real_exists = os.path.exists
    monkeypatch.setattr(hostinfo.os.path, "exists",
                        lambda p: False if str(p).startswith("/proc/4242") else real_exists(p))

    def kill(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(hostinfo.os, "kill", kill)
    assert hostinfo.pid_alive(4242, 12345)

    def gone(pid: int, sig: int) -> None:
        raise ProcessLookupError(3, "No such process")

    monkeypatch.setattr(hostinfo.os, "kill", gone)
    assert not hostinfo.pid_alive(4242)
