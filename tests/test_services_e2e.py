"""Services beside a run through the real Apptainer (instances) and the real Slurm, as the
ordinary user: a Redis service (Debian's redis-server in an image hpcexp builds like any
other, once per session) that the payload writes and reads keys in through the port it
was given, with nothing of it left afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_clean_error, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REDIS_DOCKERFILE = """\
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/*
CMD ["redis-server"]
"""

# A tiny RESP client: busybox nc in the payload's image. Each run writes its own id under
# one key, waits, and reads it back: two runs sharing one Redis would read the other's.
CLIENT_SH = r"""#!/bin/sh
set -e
resp() { printf "$1" | nc -w 5 "$HPCEXP_SERVICE_REDIS_HOST" "$HPCEXP_SERVICE_REDIS_PORT"; }
echo "redis at $HPCEXP_SERVICE_REDIS_HOST:$HPCEXP_SERVICE_REDIS_PORT"
resp "SET owner $HPCEXP_RUN_ID\r\nQUIT\r\n" > results/set.txt
sleep "${SLEEP:-0}"
resp 'GET owner\r\nQUIT\r\n' > results/get.txt
cat results/get.txt
"""

REDIS_SERVICE = """\
      redis:
        image: redis
        command: [redis-server, --port, "{port}", --bind, "{host}", --save, "", --appendonly, "no"]
        ready: {tcp: port}
        timeout: 60"""


@pytest.fixture(scope="session")
def project(tmp_path_factory: pytest.TempPathFactory, busybox_sif: Path) -> Path:
    """One project for the session, so the Redis image is built once: experiments
    `redis` (the service's image), `web` (the payload) and variants of web."""
    root = tmp_path_factory.mktemp("services") / "proj"
    (root / "experiments" / "redis").mkdir(parents=True)
    (root / "experiments" / "redis" / "Dockerfile").write_text(REDIS_DOCKERFILE)
    web = root / "experiments" / "web"
    web.mkdir()
    (web / "Dockerfile").write_text("FROM busybox:latest\nCOPY . /app\nWORKDIR /app\n")
    (web / "client.sh").write_text(CLIENT_SH)
    payload = "    path: experiments/web\n    command: [/bin/sh, /app/client.sh]\n"
    (root / "hpcexp.yaml").write_text(
        f'bases:\n  "busybox:latest": {{sif: {busybox_sif}}}\n'
        "slurm:\n  time: '5'\n"
        "experiments:\n"
        f"  web:\n{payload}    services:\n{REDIS_SERVICE}\n"
        f"  slow:\n{payload}    env: {{SLEEP: '10'}}\n    services:\n{REDIS_SERVICE}\n"
        f"  long:\n{payload}    env: {{SLEEP: '120'}}\n    services:\n{REDIS_SERVICE}\n"
        f"  never:\n{payload}    services:\n      stuck:\n        image: redis\n"
        "        command: [sleep, '600']\n        timeout: 3\n"
        f"  dies:\n{payload}    env: {{SLEEP: '60'}}\n    services:\n      redis:\n        image: redis\n"
        "        command: [sh, -c, \"redis-server --port {port} --bind {host} --save '' & sleep 3; kill $!; "
        "exit 7\"]\n")
    proc = run_cli("build", "redis", "web", cwd=root, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


def cli(root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=root, timeout=timeout)


def record(root: Path, ref: str) -> dict[str, Any]:
    proc = cli(root, "status", ref, "--json")
    assert proc.returncode == 0, proc.stderr
    (rec,) = json.loads(proc.stdout)
    return rec


def run_json(root: Path, exp: str, run_id: str) -> dict[str, Any]:
    return json.loads((root / "runs" / exp / run_id / "run.json").read_text())


def instances() -> list[str]:
    proc = subprocess.run(["apptainer", "instance", "list", "--json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [i["instance"] for i in json.loads(proc.stdout).get("instances") or []]


def processes_mentioning(*needles: str) -> list[str]:
    """This user's processes whose command line holds one of ``needles``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != os.getuid():
                continue
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if any(n in cmd for n in needles):
            found.append(f"{name}: {cmd}")
    return found


def processes_holding(paths: list[str]) -> list[str]:
    """This user's processes with one of ``paths`` open (a squashfuse mount of an image)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{name}/fd/{fd}") in paths:
                    found.append(name)
                    break
            except OSError:
                continue
    return found


def assert_nothing_left(run_id: str, ports: list[int], within: float = 20.0, *, also: tuple[str, ...] = (),
                        images: tuple[str, ...] = ()) -> None:
    """No instance of the run, no process naming its instance or holding its ports (or
    naming ``also``, or holding ``images`` open), no reservation of the ports: checked
    until ``within`` seconds have passed."""
    deadline = time.monotonic() + within
    while True:
        mine = [i for i in instances() if run_id in i]
        procs = processes_mentioning(f"hpcexp-{run_id}", *[f":{p}" for p in ports],
                                     *[f"--port {p}" for p in ports], *also) + processes_holding(list(images))
        held = [p for p in ports if (Path(f"/tmp/hpcexp-ports-{os.getuid()}") / str(p)).exists()]
        if not (mine or procs or held) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not mine, mine
    assert not procs, procs
    assert not held, held


def rec_services(root: Path, exp: str, run_id: str) -> str:
    """The image file of the run's (first) service."""
    return str(run_json(root, exp, run_id)["services"][0]["image"])


def service_ports(rec: dict[str, Any]) -> list[int]:
    return [p for s in rec.get("services") or [] for p in (s.get("port_numbers") or {}).values()]


def test_payload_writes_and_reads_redis_through_its_port_and_nothing_is_left(project: Path) -> None:
    proc = cli(project, "run", "web")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rec = record(project, "@last")
    full = run_json(project, "web", rec["run_id"])
    run_dir = project / "runs" / "web" / rec["run_id"]
    (svc,) = full["services"]
    port = svc["port_numbers"]["port"]
    assert svc["state"] == "stopped" and svc["instance"] == f"hpcexp-{rec['run_id']}-redis"
    assert full["container_env"]["HPCEXP_SERVICE_REDIS_PORT"] == str(port)
    assert f"redis at 127.0.0.1:{port}" in proc.stdout
    assert (run_dir / "results" / "set.txt").read_text().startswith("+OK")
    assert rec["run_id"] in (run_dir / "results" / "get.txt").read_text()
    assert "Ready to accept connections" in (run_dir / "services" / "redis.out").read_text()
    assert_nothing_left(rec["run_id"], [port], within=0.5, images=(svc["image"],))


def test_two_runs_at_once_get_their_own_redis_on_their_own_port(project: Path) -> None:
    ids = []
    for _ in range(2):
        proc = cli(project, "run", "slow", "--detach")
        assert proc.returncode == 0, proc.stderr
        ids.append(record(project, "@last")["run_id"])
    recs = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        recs = [run_json(project, "slow", i) for i in ids]
        if all(r["state"] in ("succeeded", "failed", "cancelled", "lost") for r in recs):
            break
        time.sleep(0.5)
    assert [r["state"] for r in recs] == ["succeeded", "succeeded"], [r.get("reason") for r in recs]
    # both ran at the same time: each one's services were ready before the other ended
    assert recs[0]["started_at"] < recs[1]["ended_at"] and recs[1]["started_at"] < recs[0]["ended_at"]
    ports = [service_ports(r) for r in recs]
    assert ports[0] != ports[1] and not set(ports[0]) & set(ports[1])
    for run_id in ids:   # each read back its own value: no shared Redis, no collision
        assert run_id in (project / "runs" / "slow" / run_id / "results" / "get.txt").read_text()
    for run_id, p in zip(ids, ports):
        assert_nothing_left(run_id, p)


def test_service_that_never_becomes_ready_fails_the_run_with_one_line(project: Path) -> None:
    t0 = time.monotonic()
    proc = cli(project, "run", "never")
    assert time.monotonic() - t0 < 60
    assert_clean_error(proc, 3, "service 'stuck' was not ready after 3 s")
    assert len([line for line in proc.stderr.splitlines() if line.startswith("hpcexp: error:")]) == 1
    rec = record(project, "@last")
    assert rec["state"] == "failed" and "service 'stuck' was not ready" in (rec.get("reason") or "")
    full = run_json(project, "never", rec["run_id"])
    assert full["launch_error"].startswith("service 'stuck'") and full["started_at"] is None
    assert not (project / "runs" / "never" / rec["run_id"] / "stdout.log").exists()   # payload never ran
    assert_nothing_left(rec["run_id"], service_ports(full), within=5, also=("sleep 600",))


def _running_detached(project: Path, exp: str) -> tuple[str, dict[str, Any]]:
    """Start ``exp`` detached and wait until its supervisor records it running: (run id, run.json)."""
    proc = cli(project, "run", exp, "--detach")
    assert proc.returncode == 0, proc.stderr
    run_id = record(project, "@last")["run_id"]
    deadline = time.monotonic() + 120
    while run_json(project, exp, run_id)["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return run_id, run_json(project, exp, run_id)


def test_stop_of_a_running_payload_stops_its_services(project: Path) -> None:
    run_id, full = _running_detached(project, "long")
    assert f"hpcexp-{run_id}-redis" in instances()
    stop = cli(project, "stop", run_id)
    assert stop.returncode == 0, stop.stderr
    rec = record(project, run_id)
    assert rec["state"] == "cancelled"
    assert_nothing_left(run_id, service_ports(full), within=5)


def test_killed_supervisor_leaves_no_service_behind(project: Path) -> None:
    run_id, full = _running_detached(project, "long")
    os.kill(full["executor_ids"]["supervisor_pid"], signal.SIGKILL)
    assert_nothing_left(run_id, service_ports(full), within=20, images=(full["services"][0]["image"],))
    assert record(project, run_id)["state"] == "lost"


def test_a_required_service_that_dies_fails_the_run(project: Path) -> None:
    t0 = time.monotonic()
    proc = cli(project, "run", "dies")
    assert time.monotonic() - t0 < 50, "the payload was not stopped when its service died"
    assert_clean_error(proc, 5, "service 'redis' exited with code 7 during the run")
    rec = record(project, "@last")
    assert rec["state"] == "failed"
    full = run_json(project, "dies", rec["run_id"])
    assert full["services"][0]["state"] == "exited" and full["services"][0]["exit_code"] == 7
    assert_nothing_left(rec["run_id"], service_ports(full), within=0.5)


# --------------------------------------------------------------------------------------
# Slurm: the same on the compute node, by the job script's generated shell
# --------------------------------------------------------------------------------------

def _ports_of_job(run_dir: Path, service: str = "redis") -> list[int]:
    text = (run_dir / "services" / f"{service}.ports").read_text().split()
    return [int(t.split("=")[1]) for t in text]


@pytest.mark.slurm
def test_slurm_job_runs_redis_beside_its_payload_and_leaves_nothing(project: Path) -> None:
    proc = cli(project, "submit", "web", "--wait")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rec = record(project, "@last")
    assert rec["state"] == "succeeded", rec
    run_dir = project / "runs" / "web" / rec["run_id"]
    ports = _ports_of_job(run_dir)
    assert f"redis at 127.0.0.1:{ports[0]}" in (run_dir / "stdout.log").read_text()
    assert rec["run_id"] in (run_dir / "results" / "get.txt").read_text()
    assert "Ready to accept connections" in (run_dir / "services" / "redis.out").read_text()
    assert_nothing_left(rec["run_id"], ports, within=10)


@pytest.mark.slurm
def test_slurm_job_with_a_never_ready_service_fails_with_its_name(project: Path) -> None:
    proc = cli(project, "submit", "never", "--wait")
    assert proc.returncode != 0
    rec = record(project, "@last")
    assert rec["state"] == "failed" and "service 'stuck' was not ready after 3 s" in (rec.get("reason") or "")
    assert_nothing_left(rec["run_id"], _ports_of_job(project / "runs" / "never" / rec["run_id"], "stuck"), within=10,
                        also=("sleep 600",))


@pytest.mark.slurm
def test_scancel_mid_run_stops_the_services(project: Path) -> None:
    proc = cli(project, "submit", "long")
    assert proc.returncode == 0, proc.stderr
    rec = record(project, "@last")
    run_id = rec["run_id"]
    run_dir = project / "runs" / "long" / run_id
    deadline = time.monotonic() + 180
    while not (run_dir / "stdout.log").exists() or f"hpcexp-{run_id}-redis" not in instances():
        assert time.monotonic() < deadline, "the job's payload never started"
        time.sleep(0.5)
    job_id = run_json(project, "long", run_id)["executor_ids"]["job_id"]
    ports = _ports_of_job(run_dir)
    subprocess.run(["scancel", str(job_id)], check=True, timeout=60)
    # the job's guard stops them: instance stop waits STOP_GRACE before SIGKILL, slower under load
    assert_nothing_left(run_id, ports, within=60, images=(rec_services(project, "long", run_id),))
    deadline = time.monotonic() + 120
    while record(project, run_id)["state"] not in ("cancelled", "failed"):
        assert time.monotonic() < deadline
        time.sleep(1)


@pytest.mark.slurm
def test_slurm_job_whose_required_service_dies_fails_with_the_reason(project: Path) -> None:
    proc = cli(project, "submit", "dies", "--wait")
    assert proc.returncode != 0
    rec = record(project, "@last")
    assert rec["state"] == "failed" and "service 'redis' exited during the run" in (rec.get("reason") or ""), rec
    run_dir = project / "runs" / "dies" / rec["run_id"]
    full = run_json(project, "dies", rec["run_id"])
    ended, started = (datetime.fromisoformat(full[k].rstrip("Z")) for k in ("ended_at", "started_at"))
    ran = ended - started
    assert ran.total_seconds() < 40, "the payload (sleep 60) was not stopped when its service died"
    assert json.loads((run_dir / "events" / "attempt-1.services").read_text())["failure"].startswith(
        "service 'redis' exited during the run")
    assert_nothing_left(rec["run_id"], _ports_of_job(run_dir), within=10)


@pytest.mark.slurm
def test_two_array_tasks_at_once_on_one_node_get_their_own_redis(project: Path) -> None:
    proc = cli(project, "submit", "slow", "--sweep", "task=1,2", "--max-parallel", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    deadline = time.monotonic() + 300
    while True:
        cli(project, "status", out["sweep_id"])   # folds the job's markers into the records
        # a task's run.json exists once a new state was recorded (until then its record is the table's)
        recs = [run_json(project, "slow", r["run_id"]) if (project / "runs" / "slow" / r["run_id"] / "run.json")
                .exists() else r for r in out["runs"]]
        if all(r["state"] not in ("submitting", "pending", "running") for r in recs):
            break
        assert time.monotonic() < deadline, [r["state"] for r in recs]
        time.sleep(1)
    assert [r["state"] for r in recs] == ["succeeded", "succeeded"], [r.get("reason") for r in recs]
    dirs = [project / "runs" / "slow" / r["run_id"] for r in recs]
    ports = [_ports_of_job(d) for d in dirs]
    assert not set(ports[0]) & set(ports[1])
    for rec, d in zip(recs, dirs):
        assert rec["run_id"] in (d / "results" / "get.txt").read_text()   # its own Redis, not the other's
    # they overlapped (the node has room for both): the case this test is about
    times = [(r["started_at"], r["ended_at"]) for r in recs]
    assert times[0][0] < times[1][1] and times[1][0] < times[0][1], f"the tasks did not run at once: {times}"
    for rec, p in zip(recs, ports):
        assert_nothing_left(rec["run_id"], p, within=10)


def test_a_sif_file_of_the_project_as_a_service_and_a_missing_one_refused(tmp_path: Path, busybox_sif: Path) -> None:
    root = tmp_path / "proj"
    web = root / "experiments" / "web"
    web.mkdir(parents=True)
    (web / "Dockerfile").write_text("FROM busybox:latest\n")
    (root / "sifs").mkdir()
    (root / "sifs" / "bb.sif").write_bytes(busybox_sif.read_bytes())
    fetch = 'wget -q -O - "http://$HPCEXP_SERVICE_HTTP_HOST:$HPCEXP_SERVICE_HTTP_PORT/motd"'
    (root / "hpcexp.yaml").write_text(
        f'bases:\n  "busybox:latest": {{sif: {busybox_sif}}}\n'
        "experiments:\n"
        f"  web:\n    command: [/bin/sh, -c, '{fetch}']\n"
        "    services:\n      http:\n        image: sifs/bb.sif\n"
        '        command: [sh, -c, "echo served-by-busybox > /tmp/motd; exec httpd -f -p {host}:{port} -h /tmp"]\n'
        f"  gone:\n    path: experiments/web\n    command: [/bin/sh, -c, '{fetch}']\n"
        "    services:\n      http:\n        image: sifs/missing.sif\n")
    proc = cli(root, "run", "web")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "served-by-busybox" in proc.stdout
    rec = run_json(root, "web", record(root, "@last")["run_id"])
    assert rec["services"][0]["image"] == str(root / "sifs" / "bb.sif")
    assert_nothing_left(rec["run_id"], service_ports(rec), within=0.5)
    proc = cli(root, "run", "gone")
    assert_clean_error(proc, 2, "experiments.gone.services.http.image", "sifs/missing.sif does not exist")
    assert not (root / "runs" / "gone").exists() and not list((root / "images").glob("gone-*"))
