"""Remote calls into real Apptainer instances, as the ordinary user.

One image for the module: `FROM python:3.11-slim` (the python stand-in, built from the
Debian mirror and cached per user, as the example experiment's), serving
experiments/bench/bench.py through `remote: {module: bench, factory: make}`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest
from conftest import REPO, assert_clean_error, run_cli

pytestmark = [pytest.mark.e2e]

SECOND_USER = os.environ.get("HPCEXP_SECOND_USER", "hpcexp-ci2")

BENCH = textwrap.dedent('''
    import os

    class Bench:
        def __init__(self, scale="1"):
            self.scale = float(scale)

        def objective(self, x):
            return sum(v * v for v in x) * self.scale

        def where(self):
            return {"run_id": os.environ.get("HPCEXP_RUN_ID"), "pid": os.getpid(),
                    "container": os.environ.get("APPTAINER_CONTAINER", "")}

        def boom(self, why):
            raise ValueError(why)

        def nap(self, seconds):
            import time
            time.sleep(seconds)
            return seconds

    def make(**params):
        return Bench(**params)
''')


@pytest.fixture(scope="module")
def project() -> Iterator[Path]:
    """The project, in a folder others may traverse (so that only hpcexp's own modes keep
    them out of a session), with its image built once."""
    root = Path(tempfile.mkdtemp(prefix="hpcexp-remote-e2e-", dir="/tmp"))
    try:
        root.chmod(0o755)
        exp = root / "experiments" / "bench"
        exp.mkdir(parents=True)
        (exp / "Dockerfile").write_text("FROM python:3.11-slim\n")
        (exp / "bench.py").write_text(BENCH)
        (root / "hpcexp.yaml").write_text("experiments:\n  bench:\n    remote: {module: bench, factory: make, "
                                          "timeout: 30}\n")
        proc = run_cli("build", "bench", cwd=root, timeout=1800)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield root
    finally:
        _stop_all(root)
        shutil.rmtree(root, ignore_errors=True)


def _stop_all(root: Path) -> None:
    """Whatever a failed test left serving, stopped by its own session id."""
    proc = run_cli("instance", "list", "--json", cwd=root, timeout=120)
    if proc.returncode == 0:
        for row in json.loads(proc.stdout):
            run_cli("instance", "stop", row["run_id"], cwd=root, timeout=120)


def _instances() -> set[str]:
    proc = subprocess.run(["apptainer", "instance", "list", "--json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return {i["instance"] for i in json.loads(proc.stdout).get("instances") or []}


def _record(root: Path, run_id: str) -> dict:
    return json.loads((root / "runs" / "bench" / run_id / "run.json").read_text())


def _processes_of(name: str) -> list[int]:
    """This user's processes that name the instance on their command line or in their environment."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != os.getuid():
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read()
            with open(f"/proc/{pid}/environ", "rb") as fh:
                environ = fh.read()
        except OSError:
            continue
        if name.encode() in cmdline or name.encode() in environ:
            found.append(int(pid))
    return found


def _gone_within(name: str, seconds: float) -> float:
    """Seconds until neither the instance nor a process of it is left (fails after ``seconds``)."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if name not in _instances() and not _processes_of(name):
            return time.monotonic() - started
        time.sleep(0.2)
    pytest.fail(f"instance {name} still there after {seconds} s: listed={name in _instances()}, "
                f"processes={_processes_of(name)}")


def _connect(root: Path, **kw):  # type: ignore[no-untyped-def]
    import hpcexp.remote

    return hpcexp.remote.connect("bench", project=str(root), **kw)


def test_ten_thousand_calls_from_the_host_are_correct_and_the_session_is_a_run(project: Path) -> None:
    with _connect(project, params={"scale": 3}) as b:
        assert b.owned
        name = _record(project, b.run_id)["instance"]
        assert name in _instances()
        where = b.call("where")
        assert where["run_id"] == b.run_id and where["container"].endswith(".sif"), where
        for i in range(10_000):
            x = [i * 0.001, 1.0 - i * 0.0001]
            got = b.call("objective", x=x)
            assert got == pytest.approx(3.0 * (x[0] ** 2 + x[1] ** 2), rel=1e-12), (i, got)
        rec = _record(project, b.run_id)
        assert rec["state"] == "running" and rec["kind"] == "instance"
        assert rec["params"] == {"scale": "3"}
        run_dir = project / "runs" / "bench" / b.run_id
        assert oct((run_dir / "remote").stat().st_mode & 0o777) == "0o700"
        assert oct((run_dir / "remote" / "call.sock").stat().st_mode & 0o777) == "0o600"
    # the client closed: the instance stopped, the record says so
    _gone_within(name, 5)
    rec = _record(project, b.run_id)
    assert rec["state"] == "succeeded" and rec["reason"] == "the client closed the session", rec
    assert "hpcexp-remote: ready" in (project / "runs" / "bench" / b.run_id / "stdout.log").read_text()
    logs = rec["instance_logs"]
    assert len(logs) == 2 and all(name in p for p in logs), logs
    assert not any(os.path.exists(p) for p in logs), "Apptainer's own log files of the instance are cleaned up"
    assert rec["executor_ids"]["instance_pid"] > 0
    status = json.loads(run_cli("status", b.run_id, "--json", cwd=project).stdout)
    assert status[0]["state"] == "succeeded"


def test_a_remote_exception_arrives_as_one_with_the_traceback_from_the_container(project: Path) -> None:
    from hpcexp.errors import RemoteError

    with _connect(project) as b:
        with pytest.raises(RemoteError) as info:
            b.call("boom", "x must be positive")
        err = info.value
        assert err.kind == "call" and err.remote_type == "ValueError"
        assert "boom() raised ValueError: x must be positive" in err.message
        assert 'File "/experiment/bench.py"' in err.remote_traceback, err.remote_traceback
        assert "raise ValueError(why)" in err.remote_traceback
        assert b.call("objective", x=[2.0]) == 4.0, "the session goes on after a remote exception"


def test_invalid_json_and_a_100_mb_message_are_refused_and_the_server_survives(project: Path) -> None:
    with _connect(project) as b:
        pid = b.ping()["pid"]
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(b.socket)
            reply = _raw(raw, struct.pack(">I", 9) + b"{'no': 1}")
            assert reply["error"]["type"] == "InvalidJSON", reply
            size = 100 * 1024 * 1024
            reply = _raw(raw, struct.pack(">I", size) + b"\0" * size)
            assert reply["error"]["type"] == "MessageTooLarge", reply
            assert f"a message of {size} bytes exceeds the limit" in reply["error"]["message"]
            body = b'{"id":1,"call":"objective","args":[[3.0]]}'
            ok = _raw(raw, struct.pack(">I", len(body)) + body)
            assert ok == {"id": 1, "result": 9.0}
        assert b.call("objective", x=[1.0]) == 1.0
        assert b.ping()["pid"] == pid, "the same server answered throughout"


def _raw(sock: socket.socket, payload: bytes) -> dict:
    sock.sendall(payload)
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        assert chunk, "the server closed the connection"
        head += chunk
    (n,) = struct.unpack(">I", head)
    body = b""
    while len(body) < n:
        body += sock.recv(n - len(body))
    return json.loads(body)


CLIENT = textwrap.dedent('''
    import sys, time
    import hpcexp.remote
    b = hpcexp.remote.connect("bench", project=sys.argv[1], attach=False)
    assert b.call("objective", x=[1.0, 1.0]) == 2.0
    print(b.run_id, flush=True)
    time.sleep(600)
''')


def test_a_client_killed_with_sigkill_leaves_no_instance_behind(project: Path, tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    child = subprocess.Popen([sys.executable, str(script), str(project)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        run_id = child.stdout.readline().strip()
        assert run_id, "the client did not start its session"
        name = _record(project, run_id)["instance"]
        assert name in _instances()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        took = _gone_within(name, 5)
        assert took < 5
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        if child.stdout:
            child.stdout.close()
    deadline = time.monotonic() + 10
    while _record(project, run_id)["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    rec = _record(project, run_id)
    assert rec["state"] == "cancelled" and "went away" in rec["reason"], rec


def test_instance_start_list_attach_and_stop_from_the_command_line(project: Path) -> None:
    proc = run_cli("instance", "start", "bench", "-p", "scale=2", "--json", cwd=project, timeout=600)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    run_id, name = row["run_id"], row["instance"]
    try:
        assert row["state"] == "running" and not row["owned"] and name in _instances()
        listed = json.loads(run_cli("instance", "list", "--json", cwd=project).stdout)
        assert [(r["run_id"], r["alive"]) for r in listed] == [(run_id, True)]
        # connect() attaches to it, and closing the connection leaves it serving
        with _connect(project) as b:
            assert b.run_id == run_id and not b.owned
            assert b.call("objective", x=[1.0, 2.0]) == 10.0
        with _connect(project) as b:
            assert b.call("objective", x=[1.0]) == 2.0
        assert name in _instances()
        proc = run_cli("instance", "list", cwd=project)
        assert run_id in proc.stdout and "cli" in proc.stdout
    finally:
        proc = run_cli("instance", "stop", "bench", cwd=project, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"session {run_id}: succeeded (stopped on request by" in proc.stderr
    _gone_within(name, 5)
    assert json.loads(run_cli("instance", "list", "--json", cwd=project).stdout) == []
    assert _record(project, run_id)["state"] == "succeeded"
    assert_clean_error(run_cli("instance", "stop", "bench", cwd=project), 2, "has no serving session")


def test_a_factory_that_fails_is_one_line_and_leaves_nothing(project: Path) -> None:
    before = _instances()
    proc = run_cli("instance", "start", "bench", "-p", "scale=not-a-number", cwd=project, timeout=600)
    assert_clean_error(proc, 5, "is not serving", "could not convert string to float")
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("hpcexp: error:")] == [
        ln for ln in proc.stderr.splitlines() if "could not convert" in ln], proc.stderr
    assert "ValueError: could not convert string to float: 'not-a-number'" in proc.stderr
    rows = json.loads(run_cli("status", "--json", cwd=project).stdout)
    run_id = max(rows, key=lambda r: r["created_at"])["run_id"]
    rec = _record(project, run_id)
    assert rec["state"] == "failed" and rec["exit_code"] == 3 and "server exited with code 3" in rec["reason"]
    assert _instances() <= before, "no instance is left"
    assert not _processes_of(rec["instance"])


def _as_second(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sudo", "-n", "-u", SECOND_USER, "/usr/bin/python3", "-c", script],
                          capture_output=True, text=True, timeout=60)


CONNECT_AS_OTHER = textwrap.dedent('''
    import socket, sys
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(sys.argv[1] if len(sys.argv) > 1 else {path!r})
    except PermissionError as exc:
        print("refused:", exc.strerror)
    else:
        print("CONNECTED")
''')


def test_another_user_cannot_connect_to_a_session(project: Path) -> None:
    probe = subprocess.run(["sudo", "-n", "-u", SECOND_USER, "true"], capture_output=True, text=True) \
        if shutil.which("sudo") else None
    if probe is None or probe.returncode != 0:
        msg = f"cannot run commands as {SECOND_USER} (scripts/provision-test-env sets that up)"
        pytest.fail(msg) if os.environ.get("HPCEXP_E2E_REQUIRED") == "1" else pytest.skip(msg)
    with _connect(project) as b:
        run_dir = Path(b.run_dir)
        # the folders above the socket's are open to others here: the project, the run folder
        listed = _as_second(f"import os; print(sorted(os.listdir({str(run_dir)!r})))")
        assert listed.returncode == 0 and "'remote'" in listed.stdout, listed.stdout + listed.stderr
        proc = _as_second(CONNECT_AS_OTHER.format(path=b.socket))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "refused: Permission denied", proc.stdout
        # even with the socket's folder opened up, the socket itself (0600) refuses
        (run_dir / "remote").chmod(0o755)
        try:
            proc = _as_second(CONNECT_AS_OTHER.format(path=b.socket))
            assert proc.stdout.strip() == "refused: Permission denied", proc.stdout + proc.stderr
        finally:
            (run_dir / "remote").chmod(0o700)
        assert b.call("objective", x=[1.0]) == 1.0


def test_a_call_over_its_timeout_raises_and_the_session_goes_on(project: Path) -> None:
    from hpcexp.errors import RemoteTimeout

    with _connect(project, timeout=20) as b:
        started = time.monotonic()
        with pytest.raises(RemoteTimeout, match="'nap' did not answer within 0.5 s"):
            b.call("nap", 3, _timeout=0.5)
        assert time.monotonic() - started < 3
        assert b.call("nap", 0) == 0, "the next call gets its own answer, not the late one"
        assert b.call("objective", x=[2.0]) == 4.0


def test_a_killed_keeper_leaves_no_instance_and_the_session_is_lost(project: Path) -> None:
    proc = run_cli("instance", "start", "bench", "--json", cwd=project, timeout=600)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    rec = _record(project, row["run_id"])
    keeper = rec["executor_ids"]["supervisor_pid"]
    assert row["instance"] in _instances()
    os.kill(keeper, signal.SIGKILL)   # the session's own keeper, by its recorded pid
    _gone_within(row["instance"], 10)
    proc = run_cli("status", row["run_id"], "--json", cwd=project)
    assert json.loads(proc.stdout)[0]["state"] == "lost", proc.stdout


def test_hpcexp_stop_stops_a_session_like_any_run(project: Path) -> None:
    proc = run_cli("instance", "start", "bench", "--json", cwd=project, timeout=600)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    proc = run_cli("stop", row["run_id"], cwd=project, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "succeeded (stopped on request by" in proc.stderr
    _gone_within(row["instance"], 5)
    assert not (project / "runs" / "bench" / row["run_id"] / "remote" / "call.sock").exists()


def test_a_session_that_does_not_serve_in_time_is_one_line_and_leaves_nothing(project: Path) -> None:
    before = _instances()
    proc = run_cli("instance", "start", "bench", "--wait", "0.05", cwd=project, timeout=600)
    assert_clean_error(proc, 5, "is not serving", "the server did not listen within 0.05 s")
    rows = json.loads(run_cli("status", "--json", cwd=project).stdout)
    rec = max(rows, key=lambda r: r["created_at"])
    assert rec["state"] == "cancelled" and rec["reason"] == "the server did not listen within 0.05 s", rec
    _gone_within(rec["instance"], 5)
    assert _instances() <= before
