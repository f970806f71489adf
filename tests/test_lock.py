"""Owner-recording locks: taken once, broken only when the owner is provably dead."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from hpcexp.errors import LockBusy
from hpcexp.infra import host as hostinfo
from hpcexp.infra.lock import Lock, Owner, read_owner


def test_lock_records_owner_and_excludes_others(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "x.lock"
    a, b = Lock(path), Lock(path)
    assert a.try_acquire() is None
    data = json.loads(path.read_text())
    assert data["pid"] == os.getpid() and data["host"] == socket.gethostname()
    assert data["boot_id"] == hostinfo.boot_id() and data["user"] and data["started"]
    holder = b.try_acquire()
    assert holder is not None and holder.pid == os.getpid()
    with pytest.raises(LockBusy) as ei:
        b.acquire(wait=False, what="image x")
    assert ei.value.exit_code == 75 and f"pid {os.getpid()}" in ei.value.message
    a.release()
    assert not path.exists()
    assert b.try_acquire() is None
    b.release()
    assert not list(path.parent.iterdir()), "no temporary files left behind"


def _dead_pid() -> int:
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=lambda: None)
    p.start()
    p.join()
    return p.pid  # type: ignore[return-value]


def test_dead_owner_on_this_host_is_broken(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    dead = Owner(host=socket.gethostname(), pid=_dead_pid(), user="u", started="t", boot_id=hostinfo.boot_id())
    path.write_text(dead.to_json())
    assert Lock(path).try_acquire() is None
    assert read_owner(path).pid == os.getpid()  # type: ignore[union-attr]


def test_zombie_counts_as_dead(tmp_path: Path) -> None:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 10
    while time.time() < deadline and "Z" not in Path(f"/proc/{child.pid}/stat").read_text().split(")")[1][:3]:
        time.sleep(0.02)
    try:
        assert not hostinfo.pid_alive(child.pid)
    finally:
        child.wait()


def test_reused_pid_counts_as_dead(tmp_path: Path) -> None:
    me = Owner.me()
    reused = Owner(host=me.host, pid=os.getpid(), user="u", started="t", boot_id=me.boot_id,
                   pid_start=(me.pid_start or 0) + 12345)
    assert reused.is_dead()
    assert not me.is_dead()


@pytest.mark.parametrize("owner", [
    Owner(host="another-host", pid=1, user="u", started="2000-01-01T00:00:00Z", boot_id="b"),
    Owner(host=socket.gethostname(), pid=999999999, user="u", started="2000-01-01T00:00:00Z", boot_id=None),
])
def test_never_broken_by_age_or_without_proof(tmp_path: Path, owner: Owner) -> None:
    path = tmp_path / "x.lock"
    path.write_text(owner.to_json())
    old = time.time() - 10 * 365 * 86400
    os.utime(path, (old, old))
    holder = Lock(path).try_acquire()
    assert holder == owner
    assert read_owner(path) == owner


def test_garbage_lock_is_not_broken(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    path.write_text("not json")
    assert Lock(path).try_acquire() is not None
    assert path.read_text() == "not json"


def test_waiter_is_told_who_holds_it_and_gets_it_after_release(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    a = Lock(path)
    a.try_acquire()
    told: list[Owner] = []
    got = threading.Event()

    def waiter() -> None:
        Lock(path).acquire(on_wait=told.append, poll=0.05)
        got.set()

    t = threading.Thread(target=waiter)
    t.start()
    deadline = time.time() + 10
    while time.time() < deadline and not told:
        time.sleep(0.02)
    time.sleep(0.2)
    assert not got.is_set() and len(told) == 1 and told[0].pid == os.getpid()
    a.release()
    t.join(5)
    assert got.is_set()


def test_release_does_not_remove_someone_elses_lock(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    a = Lock(path)
    a.try_acquire()
    other = Owner(host="h2", pid=2, user="v", started="s")
    path.write_text(other.to_json())
    a.release()
    assert read_owner(path) == other
