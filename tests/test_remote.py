"""Remote calls without Apptainer: the `remote:` section, the instance argv builders and
list parser, and the shipped server with its client on this host (the same files the
container runs; tests/test_remote_e2e.py runs them in real instances)."""

from __future__ import annotations

import ast
import json
import math
import os
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest
from conftest import assert_clean_error, run_cli

from hpcexp.core.config import load_project
from hpcexp.errors import ConfigError, RemoteError, RemoteTimeout
from hpcexp.runtime import instances, remote_server
from hpcexp.runtime.apptainer import Mount
from hpcexp.runtime.remote_client import Connection

SERVER = Path(remote_server.__file__)

BENCH = textwrap.dedent('''
    import time

    class Bench:
        def __init__(self, scale="1"):
            self.scale = float(scale)
            self.calls = 0

        def objective(self, x):
            self.calls += 1
            return sum(v * v for v in x) * self.scale

        def echo(self, *args, **kwargs):
            return {"args": list(args), "kwargs": kwargs}

        def boom(self, why="bad x"):
            raise ValueError(why)

        def slow(self, seconds):
            time.sleep(seconds)
            return seconds

        def not_json(self):
            return {1, 2}

        def big(self, n):
            return "x" * n

        def _private(self):
            return "secret"

    def make(**params):
        return Bench(**params)

    def broken(**params):
        raise RuntimeError("cannot load the benchmark data")
''')


def _project(root: Path, remote_yaml: str) -> Path:
    (root / "experiments" / "bench").mkdir(parents=True)
    (root / "experiments" / "bench" / "Dockerfile").write_text("FROM python:3.11-slim\n")
    (root / "hpcexp.yaml").write_text(f"experiments:\n  bench:\n    remote: {remote_yaml}\n")
    return root


# --------------------------------------------------------------------------------------
# hpcexp.yaml: remote:
# --------------------------------------------------------------------------------------

def test_remote_section_is_read_with_defaults(tmp_path: Path) -> None:
    spec = load_project(_project(tmp_path, "{module: pkg.bench, factory: make}")).experiments["bench"].remote
    assert spec is not None
    assert (spec.module, spec.factory, spec.python, spec.timeout, spec.max_message_mb) == \
        ("pkg.bench", "make", "python3", 60.0, 64.0)
    spec = load_project(_project(tmp_path / "b", "{module: b, factory: f, python: /usr/bin/python3.6, timeout: 2.5, "
                                                 "max_message_mb: 1}")).experiments["bench"].remote
    assert spec is not None and (spec.python, spec.timeout, spec.max_message_mb) == ("/usr/bin/python3.6", 2.5, 1.0)


def test_an_experiment_without_remote_serves_nothing(tmp_path: Path) -> None:
    root = _project(tmp_path, "null")
    assert load_project(root).experiments["bench"].remote is None


@pytest.mark.parametrize(("yaml", "needles"), [
    ("{module: bench, factory: make, modul: x}", ["experiments.bench.remote.modul", "unknown key 'modul'"]),
    ("{module: bench}", ["experiments.bench.remote", "needs factory"]),
    ("{factory: make}", ["experiments.bench.remote", "needs module"]),
    ("{module: 'bench; rm -rf', factory: make}", ["experiments.bench.remote.module", "a Python module name"]),
    ("{module: bench, factory: 'a.b'}", ["experiments.bench.remote.factory", "a Python name"]),
    ("{module: bench, factory: make, timeout: 0}", ["experiments.bench.remote.timeout", "must be a number"]),
    ("{module: bench, factory: make, timeout: .nan}", ["experiments.bench.remote.timeout", "must be a number"]),
    ("{module: bench, factory: make, timeout: fast}", ["experiments.bench.remote.timeout", "must be a number"]),
    ("{module: bench, factory: make, max_message_mb: 4096}", ["remote.max_message_mb", "must be a number"]),
    ("{module: bench, factory: make, python: '-c'}", ["experiments.bench.remote.python", "interpreter"]),
    ("[bench, make]", ["experiments.bench.remote", "must be a mapping"]),
])
def test_bad_remote_sections_are_refused_naming_the_field(tmp_path: Path, yaml: str, needles: list[str]) -> None:
    root = _project(tmp_path, yaml)
    with pytest.raises(ConfigError) as info:
        load_project(root)
    text = "\n".join(info.value.problems)
    for needle in needles:
        assert needle in text, (needle, text)
    proc = run_cli("list", cwd=root)
    assert_clean_error(proc, 2, "hpcexp.yaml:", needles[0])


def test_instance_start_of_an_experiment_that_serves_nothing_is_one_line(tmp_path: Path) -> None:
    root = _project(tmp_path, "null")
    proc = run_cli("instance", "start", "bench", cwd=root)
    assert_clean_error(proc, 2, "experiment 'bench' serves nothing", "experiments.bench.remote")
    assert not (root / "runs").exists() and not (root / "images").exists()
    proc = run_cli("instance", "start", "nope", cwd=root)
    assert_clean_error(proc, 2, "no experiment 'nope'")
    proc = run_cli("instance", "start", "bench", "-p", "no-dash=1", cwd=_project(tmp_path / "b", "{module: b, "
                                                                               "factory: f}"))
    assert_clean_error(proc, 2, "invalid parameter name 'no-dash'")


def test_instance_stop_and_list_with_nothing_serving(tmp_path: Path) -> None:
    root = _project(tmp_path, "{module: bench, factory: make}")
    assert_clean_error(run_cli("instance", "stop", "bench", cwd=root), 2, "has no serving session")
    proc = run_cli("instance", "list", "--json", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


# --------------------------------------------------------------------------------------
# argv builders and the list parser
# --------------------------------------------------------------------------------------

def test_instance_argv_builders() -> None:
    argv = instances.instance_start_argv("/img/b.sif", "hpcexp-b-1", binds=[Mount("/h/a", "/c/a"),
                                                                          Mount("/h/r", "/c/r", readonly=False)],
                                         env={"HPCEXP_RUN_ID": "1"}, program="/usr/bin/apptainer")
    assert argv == ["/usr/bin/apptainer", "instance", "start", "--containall", "--writable-tmpfs", "--no-eval",
                    "--bind", "/h/a:/c/a:ro", "--bind", "/h/r:/c/r:rw", "/img/b.sif", "hpcexp-b-1"]
    assert "HPCEXP_RUN_ID" not in " ".join(argv), "the environment never goes on the command line"
    assert instances.instance_stop_argv("n1") == ["apptainer", "instance", "stop", "n1"]
    assert instances.instance_stop_argv("n1", force=True, timeout=10) == \
        ["apptainer", "instance", "stop", "--force", "--timeout", "10", "n1"]
    assert instances.instance_list_argv() == ["apptainer", "instance", "list", "--json"]
    assert instances.instance_exec_argv("n1", ["python3", "-V"], pwd="/w", cleanenv=False) == \
        ["apptainer", "exec", "--no-eval", "--pwd", "/w", "instance://n1", "python3", "-V"]
    for bad in ("", "-x", "a b", "a/b", "x" * 101):
        with pytest.raises(ValueError):
            instances.instance_stop_argv(bad)
    with pytest.raises(ValueError):
        instances.instance_start_argv("/i.sif", "n", env={"A-B": "1"})
    assert instances.instance_name_for("hpcexp-b", "20260101-000000.000-abcdef") == \
        "hpcexp-b-20260101-000000.000-abcdef"


def test_instance_list_json_is_parsed() -> None:
    text = ('{\n\t"instances": [\n\t\t{\n\t\t\t"instance": "a1",\n\t\t\t"pid": 30646,\n\t\t\t"img": "/x/a.sif",'
            '\n\t\t\t"ip": "",\n\t\t\t"logErrPath": "/l/a1.err",\n\t\t\t"logOutPath": "/l/a1.out"\n\t\t}\n\t]\n}\n')
    (one,) = instances.parse_instance_list(text)
    assert (one.name, one.pid, one.image, one.log_err) == ("a1", 30646, "/x/a.sif", "/l/a1.err")
    assert instances.parse_instance_list('{"instances": []}') == []
    assert instances.parse_instance_list("") == []
    for bad in ("not json", '{"instances": {}}', '{"instances": [{"pid": 1}]}'):
        with pytest.raises(ValueError):
            instances.parse_instance_list(bad)


# --------------------------------------------------------------------------------------
# the server and its client, on this host
# --------------------------------------------------------------------------------------

def test_the_server_is_python_3_6_and_standard_library_only() -> None:
    tree = ast.parse(SERVER.read_text(), feature_version=(3, 6))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    # standard-library modules that exist unchanged from Python 3.6 on (no pickle, no hpcexp)
    allowed = {"argparse", "importlib", "json", "os", "signal", "socket", "struct", "sys", "threading", "traceback"}
    assert imported <= allowed, imported - allowed
    assert not any(isinstance(n, ast.AnnAssign) for n in ast.walk(tree)), "variable annotations are 3.6+; keep none"


class Served:
    def __init__(self, proc: "subprocess.Popen[bytes]", path: Path) -> None:
        self.proc, self.path = proc, path


def _serve(folder: Path, factory: str = "make", *, max_message: int | None = None,
           params: dict[str, str] | None = None) -> Served:
    (folder / "bench.py").write_text(BENCH)
    sock = folder / "s.sock"
    argv = [sys.executable, str(SERVER), "--socket", str(sock), "--module", "bench", "--factory", factory,
            "--path", str(folder), "--watch-stdin"]
    if max_message is not None:
        argv += ["--max-message", str(max_message)]
    env = dict(os.environ, HPCEXP_PARAMS=json.dumps(params or {}))
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 20
    while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return Served(proc, sock)


def _stop(s: Served) -> None:
    if s.proc.poll() is None:
        s.proc.kill()
    s.proc.wait(timeout=10)
    for f in (s.proc.stdin, s.proc.stdout, s.proc.stderr):
        if f:
            f.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = _serve(tmp_path, params={"scale": "2"})
    assert s.path.exists(), s.proc.stderr.read() if s.proc.stderr else ""
    try:
        yield s
    finally:
        _stop(s)


def test_calls_return_json_results_and_the_factory_gets_the_parameters(served: Served) -> None:
    with Connection(served.path, timeout=10) as c:
        assert c.call("objective", x=[0.1, 0.2]) == pytest.approx(0.1)       # scale=2 from HPCEXP_PARAMS
        assert c.call("objective", [1.0, 2.0]) == pytest.approx(10.0)
        assert c.call("echo", 1, "ä€😀", None, True, k={"n": [1.5]}) == \
            {"args": [1, "ä€😀", None, True], "kwargs": {"k": {"n": [1.5]}}}
        assert math.isnan(c.call("echo", float("nan"))["args"][0])
        info = c.ping()
        assert info["protocol"] == remote_server.PROTOCOL and info["pid"] == served.proc.pid
    assert stat.S_IMODE(os.stat(served.path).st_mode) == 0o600


def test_a_remote_exception_arrives_as_one_with_the_remote_traceback(served: Served) -> None:
    with Connection(served.path, timeout=10) as c:
        with pytest.raises(RemoteError) as info:
            c.call("boom", why="x must be positive")
        err = info.value
        assert (err.kind, err.remote_type) == ("call", "ValueError")
        assert "boom() raised ValueError: x must be positive" in err.message
        assert "Traceback (most recent call last)" in err.remote_traceback
        assert 'raise ValueError(why)' in err.remote_traceback and "bench.py" in err.remote_traceback
        assert err.remote_traceback.rstrip() in str(err)
        assert c.call("objective", x=[1.0]) == 2.0, "the connection goes on after a remote exception"


@pytest.mark.parametrize(("method", "kind", "needle"), [
    ("_private", "protocol", "public method"),
    ("__class__", "protocol", "public method"),
    ("nope", "protocol", "no method 'nope'"),
    ("not_json", "result", "not JSON"),
])
def test_what_may_not_be_called_or_returned_is_refused(served: Served, method: str, kind: str, needle: str) -> None:
    with Connection(served.path, timeout=10) as c:
        with pytest.raises(RemoteError) as info:
            c.call(method)
        assert info.value.kind == kind and needle in info.value.message, info.value.message
        assert c.call("objective", x=[1.0]) == 2.0


def test_arguments_that_are_not_json_are_refused_before_sending(served: Served) -> None:
    with Connection(served.path, timeout=10) as c:
        with pytest.raises(RemoteError, match="not JSON"):
            c.call("echo", {1, 2})
        with pytest.raises(RemoteError, match="exceeds the limit"):
            Connection(served.path, max_message=100).call("echo", "x" * 200)
        assert c.call("objective", x=[1.0]) == 2.0


def _raw(sock: socket.socket, payload: bytes) -> dict:
    sock.sendall(payload)
    head = b""
    while len(head) < 4:
        head += sock.recv(4 - len(head))
    (n,) = struct.unpack(">I", head)
    body = b""
    while len(body) < n:
        body += sock.recv(n - len(body))
    return json.loads(body)


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"[1, 2]", b'"call"', b'{"call": 5}',
                                  b'{"call": "objective", "args": {}}'])
def test_messages_that_are_not_valid_requests_are_refused_and_the_server_goes_on(served: Served, body: bytes) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(served.path))
        reply = _raw(s, struct.pack(">I", len(body)) + body)
        assert reply["error"]["kind"] == "protocol", reply
        # the same connection still works
        ok = _raw(s, remote_server.encode({"id": 7, "call": "objective", "kwargs": {"x": [3.0]}}))
        assert ok == {"id": 7, "result": 18.0}
    assert served.proc.poll() is None


def test_a_message_over_the_limit_is_refused_without_killing_the_server(tmp_path: Path) -> None:
    s = _serve(tmp_path, max_message=1024 * 1024)
    try:
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(str(s.path))
            size = 100 * 1024 * 1024
            reply = _raw(raw, struct.pack(">I", size) + b"x" * size)
            assert reply["error"]["type"] == "MessageTooLarge", reply
            assert f"{size} bytes exceeds the limit of {1024 * 1024}" in reply["error"]["message"]
            ok = _raw(raw, remote_server.encode({"id": 1, "call": "objective", "args": [[2.0]]}))
            assert ok["result"] == 4.0
        with Connection(s.path, timeout=10) as c:
            assert c.call("objective", x=[1.0]) == 1.0
            too_big = r"the result of 2097\d\d\d bytes exceeds the limit of 1048576"
            with pytest.raises(RemoteError, match=too_big) as info:
                c.call("big", 2 * 1024 * 1024)
            assert info.value.kind == "result"
            assert len(c.call("big", 1000)) == 1000
        assert s.proc.poll() is None
    finally:
        _stop(s)


def test_a_call_over_its_timeout_raises_and_the_next_call_works(served: Served) -> None:
    with Connection(served.path, timeout=10) as c:
        started = time.monotonic()
        with pytest.raises(RemoteTimeout, match="did not answer within 0.3 s"):
            c.call("slow", 1.0, _timeout=0.3)
        assert time.monotonic() - started < 2
        # the late reply of `slow` is never taken for this call's
        assert c.call("slow", 0.0) == 0.0
        assert c.call("objective", x=[1.0]) == 2.0


def test_a_gone_server_is_a_connection_error(tmp_path: Path) -> None:
    with pytest.raises(RemoteError, match="no remote session answers") as info:
        Connection(tmp_path / "nothing.sock").call("objective")
    assert info.value.kind == "connection"


def test_a_long_socket_path_is_reached_through_the_folder(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    s = _serve(tmp_path)
    try:
        long_path = deep / "s.sock"
        os.symlink(s.path, long_path)
        assert len(str(long_path)) > 108
        with Connection(long_path, timeout=10) as c:
            assert c.call("objective", x=[2.0]) == 4.0
    finally:
        _stop(s)


def test_the_server_ends_when_its_stdin_closes(served: Served) -> None:
    assert served.proc.stdin is not None
    served.proc.stdin.close()
    assert served.proc.wait(timeout=10) == 0


def test_a_factory_that_raises_ends_the_server_with_its_traceback(tmp_path: Path) -> None:
    s = _serve(tmp_path, factory="broken")
    try:
        assert s.proc.wait(timeout=20) == 3
        err = s.proc.stderr.read().decode() if s.proc.stderr else ""
        assert "could not make the served object bench.broken" in err
        assert "RuntimeError: cannot load the benchmark data" in err
        assert not s.path.exists()
    finally:
        _stop(s)


def test_connect_to_an_experiment_that_serves_nothing_is_the_same_one_line_error(tmp_path: Path) -> None:
    import hpcexp.remote
    from hpcexp.errors import UsageError

    root = _project(tmp_path, "null")
    with pytest.raises(UsageError, match="experiment 'bench' serves nothing"):
        hpcexp.remote.connect("bench", project=str(root))
    assert not (root / "runs").exists()


def test_instance_stop_refuses_a_run_that_is_not_a_session(tmp_path: Path) -> None:
    from hpcexp.core import runs
    from hpcexp.core.layout import Layout

    root = _project(tmp_path, "{module: bench, factory: make}")
    layout = Layout(load_project(root))
    paths = layout.run("bench", "20260101-000000.000-abcdef")
    paths.dir.mkdir(parents=True)
    runs.write_record(paths, runs.RunRecord(experiment="bench", run_id=paths.dir.name, state="succeeded"))
    assert_clean_error(run_cli("instance", "stop", "20260101-000000.000-abcdef", cwd=root), 2,
                       "is not an instance session")
    proc = run_cli("instance", "list", "--all", "--json", cwd=root)
    assert proc.returncode == 0 and json.loads(proc.stdout) == [], proc.stdout + proc.stderr


def _old_pythons() -> list[str]:
    """Python 3.6-3.8 interpreters of this machine (pyenv's), to run the server with."""
    import glob
    import shutil

    found = []
    roots = [os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")]
    if shutil.which("pyenv"):
        proc = subprocess.run(["pyenv", "root"], capture_output=True, text=True)
        roots.append(proc.stdout.strip())
    for root in roots:
        for minor in (6, 7, 8):
            found += sorted(glob.glob(f"{root}/versions/3.{minor}.*/bin/python3.{minor}"))[-1:]
    return sorted(set(found))


@pytest.mark.parametrize("python", _old_pythons() or [pytest.param(None, marks=pytest.mark.skip(
    reason="no Python 3.6-3.8 here (pyenv's versions); the syntax check above still holds"))])
def test_the_server_runs_on_old_pythons(tmp_path: Path, python: str) -> None:
    (tmp_path / "bench.py").write_text(BENCH)
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen([python, str(SERVER), "--socket", str(sock), "--module", "bench", "--factory", "make",
                             "--path", str(tmp_path), "--watch-stdin"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    served = Served(proc, sock)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        with Connection(sock, timeout=10) as c:
            assert c.ping()["python"].startswith(python.rsplit("python", 1)[1])
            assert c.call("objective", x=[1.0, 2.0]) == 5.0
            with pytest.raises(RemoteError) as info:
                c.call("boom")
            assert info.value.remote_type == "ValueError" and "bad x" in info.value.remote_traceback
    finally:
        _stop(served)
