"""Services beside a run, without Apptainer: the `services:` section of hpcexp.yaml, the
placeholders, the instance argv, port reservations, and the job script's generated shell
(run with bash and a stand-in `apptainer` that runs the service's command on the host)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from conftest import assert_clean_error, run_cli

from hpcexp.core.config import load_project
from hpcexp.core.model import expand_service_text, service_placeholder_problem
from hpcexp.errors import ConfigError
from hpcexp.execute import services
from hpcexp.execute.slurm import sbatch, services_sh
from hpcexp.runtime import instances
from hpcexp.runtime.apptainer import Mount


def _project(root: Path, services_yaml: str, extra_exps: tuple[str, ...] = ("redis",)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in ("web", *extra_exps):
        d = root / "experiments" / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "Dockerfile").write_text("FROM busybox:latest\n")
    body = textwrap.indent(textwrap.dedent(services_yaml).strip("\n"), "      ")
    (root / "hpcexp.yaml").write_text(f"experiments:\n  web:\n    services:\n{body}\n")
    return root


def test_a_full_service_entry_becomes_the_model(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", """
        redis:
          image: redis
          command: redis-server --port {port} --bind {host}
          env: {GREETING: "at {host}:{port.port}"}
          ready: {tcp: port}
          timeout: 12.5
          optional: true
        cache-2:
          image: images/cache.sif
          ports: [main, admin]
          ready: {command: [cli, -p, "{port.admin}", ping]}
        worker:
          image: redis
          ports: []
        """)
    exp = load_project(root).experiment("web")
    by = {s.name: s for s in exp.services}
    assert [s.name for s in exp.services] == ["redis", "cache-2", "worker"]   # declared order
    r = by["redis"]
    assert (r.image, r.sif, r.command, r.ports, r.timeout, r.optional) == (
        "redis", None, ("redis-server", "--port", "{port}", "--bind", "{host}"), ("port",), 12.5, True)
    assert r.env == {"GREETING": "at {host}:{port.port}"} and r.ready.tcp == "port"
    c = by["cache-2"]
    assert c.image is None and c.sif == root / "images" / "cache.sif" and c.ports == ("main", "admin")
    assert c.ready.tcp is None and c.ready.command == ("cli", "-p", "{port.admin}", "ping")
    assert c.timeout == 60.0 and not c.optional and c.env_name == "CACHE_2"
    w = by["worker"]
    assert w.ports == () and w.ready.tcp is None and not w.ready.command   # ready once started
    assert not load_project(root).experiment("redis").services


@pytest.mark.parametrize("yaml_text, needles", [
    ("redis: {image: redis, colour: red}", ["experiments.web.services.redis.colour", "unknown key 'colour'"]),
    ("redis: {image: redis, readyy: tcp}", ["services.redis.readyy", "did you mean 'ready'"]),
    ("redis: {command: [x]}", ["services.redis", "needs image"]),
    ("redis: {image: rediss}", ["services.redis.image", "no experiment 'rediss'", "did you mean 'redis'"]),
    ("redis: {image: web}", ["services.redis.image", "own image"]),
    ("redis: {image: ../outside.sif}", ["services.redis.image", "escapes the project"]),
    ("redis: {image: 'a b'}", ["services.redis.image", "invalid value"]),
    ("'-x': {image: redis}", ["services.-x", "invalid service name"]),
    ("redis: {image: redis, ports: [port, port]}", ["services.redis.ports[1]", "named twice"]),
    ("redis: {image: redis, ports: ['9bad']}", ["services.redis.ports[0]", "invalid port name"]),
    ("redis: {image: redis, ready: {tcp: port, command: [x]}}", ["services.redis.ready", "exactly one"]),
    ("redis: {image: redis, ready: {}}", ["services.redis.ready", "exactly one"]),
    ("redis: {image: redis, ready: {tcp: admin}}", ["services.redis.ready.tcp", "not one of this service's ports"]),
    ("redis: {image: redis, ports: [], ready: tcp}", ["services.redis.ready.tcp", "it has none"]),
    ("redis: {image: redis, ready: {command: []}}", ["services.redis.ready.command", "must not be empty"]),
    ("redis: {image: redis, command: [x, '{prot}']}", ["services.redis.command[1]", "unknown placeholder {prot}"]),
    ("redis: {image: redis, ports: [], command: [x, '{port}']}", ["services.redis.command[1]", "{port}"]),
    ("redis: {image: redis, command: [x, 'a{b']}", ["services.redis.command[1]", "unbalanced"]),
    ("redis: {image: redis, env: {A: '{nope}'}}", ["services.redis.env.A", "unknown placeholder"]),
    ("redis: {image: redis, env: {'1A': x}}", ["services.redis.env.1A", "invalid name"]),
    ("redis: {image: redis, ready: {command: [x, '{port.x}']}}", ["services.redis.ready.command[1]", "{port.x}"]),
    ("redis: {image: redis, timeout: 0}", ["services.redis.timeout", "number of seconds"]),
    ("redis: {image: redis, timeout: soon}", ["services.redis.timeout", "number of seconds"]),
    ("redis: {image: redis, timeout: true}", ["services.redis.timeout", "number of seconds"]),
    ("redis: {image: redis, optional: maybe}", ["services.redis.optional", "true or false"]),
    ("redis: [image, redis]", ["services.redis", "must be a mapping"]),
    ("{a-b: {image: redis}, a_b: {image: redis}}", ["services.a_b", "HPCEXP_SERVICE_A_B_"]),
])
def test_each_bad_service_entry_is_named(tmp_path: Path, yaml_text: str, needles: list[str]) -> None:
    root = _project(tmp_path / "p", yaml_text)
    with pytest.raises(ConfigError) as info:
        load_project(root)
    text = str(info.value)
    for needle in needles:
        assert needle in text, (needle, text)


def test_bad_services_are_one_clean_line_from_the_cli(tmp_path: Path) -> None:
    root = _project(tmp_path / "p", "redis: {image: redis, colour: red}")
    proc = run_cli("list", cwd=root)
    assert_clean_error(proc, 2, "hpcexp.yaml", "experiments.web.services.redis.colour")


def test_placeholders_expand_and_escape() -> None:
    ports = {"port": 2000, "admin": 2001}
    order = ["port", "admin"]
    assert expand_service_text("--port={port}", "127.0.0.1", ports, order) == "--port=2000"
    assert expand_service_text("{host}:{port.admin}", "127.0.0.1", ports, order) == "127.0.0.1:2001"
    assert expand_service_text("{{port}} {{}}", "h", ports, order) == "{port} {}"
    assert service_placeholder_problem("{{literal}}", []) is None
    assert "unknown placeholder {port}" in (service_placeholder_problem("{port}", []) or "")
    assert "unbalanced" in (service_placeholder_problem("}", ["port"]) or "")


def test_instance_argv_builders_and_list_parser() -> None:
    name = instances.instance_name("20260101-000000.000-abcdef", "redis")
    assert name == "hpcexp-20260101-000000.000-abcdef-redis"
    assert instances.instance_name("r1", "a b") == "hpcexp-r1-a_b"
    argv = instances.instance_start_argv("/i/r.sif", name, binds=[Mount("/h", "/c", readonly=True)],
                                         env={"A": "1"}, program="/usr/bin/apptainer")
    assert argv == ["/usr/bin/apptainer", "instance", "start", "--containall", "--writable-tmpfs", "--no-eval",
                    "--bind", "/h:/c:ro", "/i/r.sif", name]
    with pytest.raises(ValueError):
        instances.instance_start_argv("/i/r.sif", name, env={"1A": "x"})
    with pytest.raises(ValueError):
        instances.instance_start_argv("/i/r.sif", "bad name")
    assert instances.instance_exec_argv(name, ["redis-cli", "ping"]) == [
        "apptainer", "exec", "--cleanenv", "--no-eval", "--pwd", "/", f"instance://{name}", "redis-cli", "ping"]
    assert instances.instance_stop_argv(name, timeout=5) == ["apptainer", "instance", "stop", "--timeout", "5", name]
    assert instances.instance_stop_argv(name, force=True)[3] == "--force"
    assert instances.instance_list_argv(pattern="hpcexp-*") == ["apptainer", "instance", "list", "--json",
                                                                "hpcexp-*"]
    listed = instances.parse_instance_list(json.dumps({"instances": [
        {"instance": name, "pid": 42, "img": "/i/r.sif", "ip": "", "logErrPath": "/l.err", "logOutPath": "/l.out"}]}))
    assert listed == [instances.InstanceInfo(name, 42, "/i/r.sif", "/l.out", "/l.err")]
    assert instances.parse_instance_list('{"instances": null}') == []
    for bad in ('[1]', '{"instances": [{"pid": 1}]}', "not json"):
        with pytest.raises(ValueError):
            instances.parse_instance_list(bad)


def test_service_env_names_every_port() -> None:
    specs = [{"name": "redis", "ports": ["port"]}, {"name": "my-db", "ports": ["main", "admin"]},
             {"name": "worker", "ports": []}]
    env = services.service_env(specs, {"redis": {"port": 2000}, "my-db": {"main": 2001, "admin": 2002}})
    assert env == {
        "HPCEXP_SERVICES": "redis my-db worker",
        "HPCEXP_SERVICE_REDIS_HOST": "127.0.0.1", "HPCEXP_SERVICE_REDIS_PORT": "2000",
        "HPCEXP_SERVICE_REDIS_PORT_PORT": "2000",
        "HPCEXP_SERVICE_MY_DB_HOST": "127.0.0.1", "HPCEXP_SERVICE_MY_DB_PORT": "2001",
        "HPCEXP_SERVICE_MY_DB_PORT_MAIN": "2001", "HPCEXP_SERVICE_MY_DB_PORT_ADMIN": "2002",
        "HPCEXP_SERVICE_WORKER_HOST": "127.0.0.1",
    }
    assert not any(k.endswith("HPCEXP_RUN_ID") for k in env)   # services never carry the run's kill marker


@pytest.fixture
def reservations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "ports"
    monkeypatch.setattr(services, "port_reservations", lambda uid: folder)
    return folder


def test_reserved_ports_are_free_distinct_and_released(reservations: Path) -> None:
    ports, held = services.reserve_ports(5)
    assert len(set(ports)) == 5 and all(services.PORT_RANGE[0] <= p <= services.PORT_RANGE[1] for p in ports)
    assert sorted(p.name for p in reservations.iterdir()) == sorted(str(p) for p in ports)
    assert (reservations.stat().st_mode & 0o777) == 0o700
    assert all((h / "owner").read_text().strip() == str(os.getpid()) for h in held)
    # a second run at the same time never gets one of them, even with the same random choices
    seed = 1234
    first, held1 = services.reserve_ports(3, rng=random.Random(seed))
    second, held2 = services.reserve_ports(3, rng=random.Random(seed))
    assert not set(first) & set(second)
    services.release_ports(held + held1 + held2)
    assert list(reservations.iterdir()) == []


def test_a_port_someone_listens_on_is_never_chosen(reservations: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        assert not services._bindable(busy)


def test_a_dead_owners_reservation_is_taken_over_and_a_live_ones_is_not(reservations: Path) -> None:
    port = random.Random(7).randint(*services.PORT_RANGE)
    reservations.mkdir(mode=0o700)
    (reservations / str(port)).mkdir()
    (reservations / str(port) / "owner").write_text(f"{os.getpid()}\n")   # alive: skipped
    ports, held = services.reserve_ports(1, rng=random.Random(7))
    assert ports[0] != port
    services.release_ports(held)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (reservations / str(port)).mkdir(exist_ok=True)
    (reservations / str(port) / "owner").write_text(f"{dead.pid}\n")      # gone: taken over
    ports, held = services.reserve_ports(1, rng=random.Random(7))
    assert ports == [port] and (reservations / str(port) / "owner").read_text().strip() == str(os.getpid())
    services.release_ports(held)


def test_a_planted_reservation_folder_is_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "ports"
    link.symlink_to(target)
    monkeypatch.setattr(services, "port_reservations", lambda uid: link)
    ports, held = services.reserve_ports(2)
    assert len(ports) == 2 and held == [] and list(target.iterdir()) == []


# --------------------------------------------------------------------------------------
# The job script's services, run with bash and a stand-in apptainer
# --------------------------------------------------------------------------------------

FAKE_APPTAINER = r"""#!/bin/bash
# a stand-in: instances are folders, a command "in" one runs here with its pid noted
state="$FAKE_STATE"
echo "$*" >> "$state/calls"
case "$1 $2" in
  "instance start") name="${@: -1}"; mkdir "$state/$name"; exit 0 ;;
  "instance stop") name="${@: -1}"
                   for f in "$state/$name"/*.pid; do [ -e "$f" ] && kill "$(cat "$f")" 2>/dev/null; done
                   rm -rf "$state/$name"; exit 0 ;;
esac
if [ "$1" = exec ]; then
  shift
  while [[ "$1" != instance://* ]]; do shift; done
  name="${1#instance://}"; shift
  [ -d "$state/$name" ] || { echo "FATAL: no instance $name" >&2; exit 255; }
  echo $$ > "$state/$name/$$.pid"
  exec "$@"
fi
exit 0
"""

SERVER = ("import socket, sys, os; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
          "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); print('listening', sys.argv[1], "
          "os.environ.get('APPTAINERENV_GREETING'), flush=True); "
          "[c.sendall(b'+PONG') or c.close() for c in iter(lambda: s.accept()[0], None)]")


RUN_ID = f"t{os.getpid()}-{random.randrange(1 << 30):x}"   # unique: the monitor signals by this marker


def _service(name: str = "web", **over: object) -> dict[str, object]:
    spec: dict[str, object] = {"name": name, "instance": "ignored", "image": "/i/web.sif",
                               "command": ["python3", "-c", SERVER, "{port}"], "env": {"GREETING": "hi {port}"},
                               "ports": ["port"], "ready": {"tcp": "port", "command": []}, "timeout": 10,
                               "optional": False}
    spec.update(over)
    return spec


def _job(tmp_path: Path, specs: list[dict[str, object]], payload: str) -> tuple[Path, str]:
    run_dir = tmp_path / "runs" / "x" / RUN_ID
    run_dir.mkdir(parents=True)
    image = tmp_path / "x.sif"
    image.write_text("stand-in")
    task = sbatch.TaskSpec(run_id=RUN_ID, run_dir=run_dir, argv=("sh", "-c", payload),
                           container_env={"HPCEXP_RUN_ID": RUN_ID})
    spec = sbatch.JobSpec(experiment="x", project_root=tmp_path, image=image, tasks=(task,),
                          options={"job-name": "t"},
                          services_start=services_sh.start_block(specs, program="apptainer",
                                                                 env_prefix_="APPTAINERENV_"),
                          services_end=services_sh.end_block(specs))
    return run_dir, sbatch.render(sbatch.default_template(), spec)


def _run(tmp_path: Path, text: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    state = tmp_path / "fake-state"
    state.mkdir(exist_ok=True)
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "apptainer").write_text(FAKE_APPTAINER)
    (bindir / "apptainer").chmod(0o755)
    script = tmp_path / "job.sh"
    script.write_text(text)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "HOME": str(tmp_path), "FAKE_STATE": str(state)}
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=timeout)


def _events(run_dir: Path) -> dict[str, dict[str, object]]:
    return {p.name: json.loads(p.read_text()) for p in (run_dir / "events").iterdir() if not p.name.startswith(".")}


def _no_instances_left(tmp_path: Path) -> None:
    state = tmp_path / "fake-state"
    assert sorted(p.name for p in state.iterdir()) == ["calls"], list(state.iterdir())


def test_job_script_starts_a_service_tells_the_payload_and_stops_it(tmp_path: Path) -> None:
    payload = ('echo "port=$APPTAINERENV_HPCEXP_SERVICE_WEB_PORT host=$APPTAINERENV_HPCEXP_SERVICE_WEB_HOST"; '
               "python3 -c 'import socket,os; s=socket.create_connection((\"127.0.0.1\", "
               "int(os.environ[\"APPTAINERENV_HPCEXP_SERVICE_WEB_PORT\"]))); print(s.recv(100))'")
    run_dir, text = _job(tmp_path, [_service()], payload)
    res = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    proc = _run(tmp_path, text)
    assert proc.returncode == 0, proc.stderr
    out = (run_dir / "stdout.log").read_text()
    port = int((run_dir / "services" / "web.ports").read_text().strip().split("=")[1])
    assert f"port={port} host=127.0.0.1" in out and "+PONG" in out
    assert f"listening {port} hi {port}" in (run_dir / "services" / "web.out").read_text()
    assert _events(run_dir)["attempt-1.exit"]["exit_code"] == 0
    assert "attempt-1.services" not in _events(run_dir)
    calls = (tmp_path / "fake-state" / "calls").read_text()
    assert f"instance start --containall --writable-tmpfs --no-eval /i/web.sif hpcexp-{RUN_ID}-web" in calls
    assert f"instance stop --timeout 5 hpcexp-{RUN_ID}-web" in calls
    _no_instances_left(tmp_path)
    assert not (Path(f"/tmp/hpcexp-ports-{os.getuid()}") / str(port)).exists()   # released


def test_job_script_service_never_ready_fails_with_its_name_and_stops_it(tmp_path: Path) -> None:
    run_dir, text = _job(tmp_path, [_service(command=["sleep", "30"], timeout=1)], "echo payload-ran")
    t0 = time.monotonic()
    proc = _run(tmp_path, text)
    assert time.monotonic() - t0 < 15
    assert proc.returncode == 1
    assert "hpcexp: service 'web' was not ready after 1 s (its port did not answer)" in proc.stderr
    exit_marker = _events(run_dir)["attempt-1.exit"]
    assert exit_marker["launch_error"].startswith("service 'web' was not ready after 1 s")
    assert not (run_dir / "stdout.log").exists() or "payload-ran" not in (run_dir / "stdout.log").read_text()
    _no_instances_left(tmp_path)


def test_job_script_service_exiting_early_and_a_readiness_command(tmp_path: Path) -> None:
    run_dir, text = _job(tmp_path, [_service(command=["sh", "-c", "exit 3"])], "echo payload-ran")
    proc = _run(tmp_path, text)
    assert proc.returncode == 1 and "service 'web' exited before it was ready" in proc.stderr
    _no_instances_left(tmp_path)
    tmp2 = tmp_path / "second"
    tmp2.mkdir()
    ready = {"tcp": None, "command": ["sh", "-c", "test -e /proc/$$ && exit 0"]}
    run_dir2, text2 = _job(tmp2, [_service(ports=[], command=["sleep", "30"], env={}, ready=ready)], "echo ran")
    proc2 = _run(tmp2, text2)
    assert proc2.returncode == 0, proc2.stderr
    assert "ran" in (run_dir2 / "stdout.log").read_text()
    _no_instances_left(tmp2)


def test_job_script_required_service_dying_stops_the_payload_and_fails_the_run(tmp_path: Path) -> None:
    dying = ["sh", "-c", "python3 -c \"$0\" {port} & sleep 2; kill $!; exit 3", SERVER]
    run_dir, text = _job(tmp_path, [_service(command=dying)], "sleep 40; echo payload-finished")
    t0 = time.monotonic()
    proc = _run(tmp_path, text)
    assert time.monotonic() - t0 < 30, "the payload was not stopped"
    assert "service 'web' exited during the run" in proc.stderr
    marker = _events(run_dir)["attempt-1.services"]
    assert marker["failure"].startswith("service 'web' exited during the run")
    assert "payload-finished" not in (run_dir / "stdout.log").read_text()
    _no_instances_left(tmp_path)


def test_job_script_optional_service_dying_lets_the_payload_finish(tmp_path: Path) -> None:
    dying = ["sh", "-c", "python3 -c \"$0\" {port} & sleep 1; kill $!; exit 3", SERVER]
    run_dir, text = _job(tmp_path, [_service(command=dying, optional=True)], "sleep 3; echo payload-finished")
    proc = _run(tmp_path, text)
    assert proc.returncode == 0, proc.stderr
    assert "payload-finished" in (run_dir / "stdout.log").read_text()
    assert "attempt-1.services" not in _events(run_dir)
    _no_instances_left(tmp_path)


def test_service_words_are_quoted_once(tmp_path: Path) -> None:
    hostile = "$(touch /tmp/hpcexp-pwned) `id` a'b\"c"
    words = services_sh._word(f"{hostile}{{port}}{{{{x}}}}", 0, ["port"])
    out = subprocess.run(["bash", "-c", f"HPCEXP_SP_0_0=1234; printf '%s' {words}"], capture_output=True, text=True)
    assert out.stdout == f"{hostile}1234{{x}}"
    assert not Path("/tmp/hpcexp-pwned").exists()


def test_job_script_killed_with_sigkill_leaves_the_guard_to_stop_its_services(tmp_path: Path) -> None:
    """As Slurm does KillWait seconds after scancel: every process of the job's group gets
    SIGKILL at once; the double-forked guard still stops the instance and frees the port."""
    import signal

    run_dir, text = _job(tmp_path, [_service()], "sleep 60")
    state = tmp_path / "fake-state"
    state.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "apptainer").write_text(FAKE_APPTAINER)
    (bindir / "apptainer").chmod(0o755)
    (tmp_path / "job.sh").write_text(text)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "HOME": str(tmp_path), "FAKE_STATE": str(state)}
    job = subprocess.Popen(["bash", str(tmp_path / "job.sh")], env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (run_dir / "stdout.log").exists():
            assert time.monotonic() < deadline and job.poll() is None, "the payload never started"
            time.sleep(0.1)
        port = int((run_dir / "services" / "web.ports").read_text().strip().split("=")[1])
        assert (state / f"hpcexp-{RUN_ID}-web").is_dir()
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    deadline = time.monotonic() + 15
    while (state / f"hpcexp-{RUN_ID}-web").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    _no_instances_left(tmp_path)
    assert "instance stop --force" in (state / "calls").read_text()
    assert not (Path(f"/tmp/hpcexp-ports-{os.getuid()}") / str(port)).exists()


def test_run_details_name_the_services_their_ports_and_how_they_ended(tmp_path: Path) -> None:
    from hpcexp.app.views import details
    from hpcexp.core.layout import RunPaths
    from hpcexp.core.runs import RunRecord

    rec = RunRecord(experiment="web", run_id="r1")
    paths = RunPaths(tmp_path / "r1")
    assert not any(line.startswith("services:") for line in details(paths, rec))
    rec.extra["services"] = [{"name": "redis", "port_numbers": {"port": 2000}, "state": "exited", "exit_code": 7},
                             {"name": "db", "state": "stopped"}, {"name": "queued"}]
    line = [x for x in details(paths, rec) if x.startswith("services:")]
    assert line == [f"services: redis (port 2000, exited with code 7), db (stopped), queued "
                    f"(logs in {tmp_path / 'r1' / 'services'})"]


def test_job_script_stopping_early_after_its_services_started_stops_them(tmp_path: Path) -> None:
    """A job script that ends before its payload's exit is recorded (here: the payload's
    command cannot be started, which `set -e` does not forgive in the launch line's place)
    still stops its services through the EXIT trap."""
    run_dir, text = _job(tmp_path, [_service()], "exit 0")
    text = text.replace('"${HPCEXP_CMD[@]}" >"$HPCEXP_STDOUT"', 'false; "${HPCEXP_CMD[@]}" >"$HPCEXP_STDOUT"')
    assert "false; " in text
    proc = _run(tmp_path, text)
    assert proc.returncode == 1
    assert "before the payload's exit was recorded" in _events(run_dir)["attempt-1.exit"]["launch_error"]
    assert "instance stop --timeout 5" in (tmp_path / "fake-state" / "calls").read_text()
    _no_instances_left(tmp_path)
