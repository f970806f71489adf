"""`hpcexp run/logs/stop/status` end to end: real Apptainer, ordinary user, busybox images.

Every test goes through the CLI as a user would (`python -m hpcexp`), with the image built
by `hpcexp run` itself (ensure_image) from the busybox stand-in for Docker Hub.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HOSTILE_VALUES, REPO, run_cli

pytestmark = pytest.mark.e2e

RUN_SH = r"""
printf 'hello from the container\n'
printf '%s' "$HPCEXP_PARAM_msg" > "$HPCEXP_RESULTS/param-env.bin"
printf '%s' "$HPCEXP_PARAMS" > "$HPCEXP_RESULTS/params.json"
for a in "$@"; do printf '%s\0' "$a"; done > "$HPCEXP_RESULTS/args.bin"
echo "$HPCEXP_RUN_ID" > "$HPCEXP_RESULTS/result.txt"
echo "to stderr" >&2
if [ -e /leak ]; then echo leaked > "$HPCEXP_RESULTS/leak.txt"; fi
exit "${HPCEXP_PARAM_code:-0}"
"""

SLOW_SH = r"""
i=0
while [ "$i" -lt "${HPCEXP_PARAM_n:-600}" ]; do echo "tick $i"; i=$((i+1)); sleep "${HPCEXP_PARAM_s:-0.3}"; done
echo finished > "$HPCEXP_RESULTS/done.txt"
"""


@pytest.fixture(scope="module")
def project(busybox_sif: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runproj")
    (root / "hpcexp.yaml").write_text(
        "bases:\n"
        f"  \"busybox:latest\": {{sif: {json.dumps(str(busybox_sif))}}}\n"
        "experiments:\n"
        "  bad:\n"
        "    command: [/no/such/program]\n"
    )
    for name, script in (("hello", RUN_SH), ("slow", SLOW_SH), ("bad", "true\n")):
        d = root / "experiments" / name
        d.mkdir(parents=True)
        (d / "Dockerfile").write_text('FROM busybox:latest\nENTRYPOINT ["sh", "/experiment/run.sh"]\n')
        (d / "run.sh").write_text(script)
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "experiments"], check=True)
    return root


def _record(project: Path, exp: str, run_id: str) -> dict:
    return json.loads((project / "runs" / exp / run_id / "run.json").read_text())


def _marked_pids(run_id: str) -> list[int]:
    """Every process (of any kind) whose environment names this run: none may survive it."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            env = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        if any(item.endswith(b"HPCEXP_RUN_ID=" + run_id.encode()) for item in env.split(b"\0")):
            found.append(int(name))
    return found


def _wait(pred, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def _latest(project: Path, exp: str) -> str:
    """The newest run (ids sort by second only: two runs in one second are ordered by created_at)."""
    recs = [_record(project, exp, r) for r in os.listdir(project / "runs" / exp)
            if (project / "runs" / exp / r / "run.json").exists()]
    return max(recs, key=lambda r: (r["created_at"], r["run_id"]))["run_id"]


def test_foreground_success_and_failure(project: Path, tmp_path: Path) -> None:
    # a bind exported in the caller's shell must not reach the container silently
    proc = run_cli("run", "hello", cwd=project, env={"APPTAINER_BIND": f"{tmp_path}:/leak"})
    assert proc.returncode == 0, proc.stderr
    assert "ignoring APPTAINER_BIND" in proc.stderr
    assert "hello from the container" in proc.stdout
    run_id = _latest(project, "hello")
    rec = _record(project, "hello", run_id)
    assert rec["state"] == "succeeded" and rec["exit_code"] == 0
    run_dir = project / "runs" / "hello" / run_id
    assert (run_dir / "results" / "result.txt").read_text().strip() == run_id
    assert not (run_dir / "results" / "leak.txt").exists()
    assert (run_dir / "stdout.log").read_text() == "hello from the container\n"
    assert "to stderr" in (run_dir / "stderr.log").read_text()
    for key in ("image", "image_sha256", "recipe_sha256", "apptainer_version", "git_commit", "git_dirty",
                "hpcexp_version", "host", "user", "started_at", "ended_at", "command"):
        assert rec[key] not in (None, "", []), key
    assert "--containall" in rec["command"]
    # Apptainer may create the mount point in the experiment folder, but nothing lands there
    src_results = project / "experiments" / "hello" / "results"
    assert not src_results.exists() or not any(src_results.iterdir())

    proc = run_cli("run", "hello", "-p", "code=7", cwd=project)
    assert proc.returncode == 5, proc.stderr
    assert "exit code 7" in proc.stderr and "Traceback" not in proc.stderr
    rec = _record(project, "hello", _latest(project, "hello"))
    assert rec["state"] == "failed" and rec["exit_code"] == 7 and rec["launch_error"] is None


def test_launch_error_is_not_a_payload_exit_code(project: Path) -> None:
    proc = run_cli("run", "bad", cwd=project)
    assert proc.returncode == 3, proc.stderr
    rec = _record(project, "bad", _latest(project, "bad"))
    assert rec["state"] == "failed" and rec["exit_code"] is None
    assert rec["launch_error"].startswith("FATAL:")


def test_hostile_parameter_arrives_verbatim_and_executes_nothing(project: Path) -> None:
    value = "a b 'q' \"dq\" $(touch /experiment/results/pwned) `id` ; echo x\nsecond line"
    others = {f"h{i}": v for i, v in enumerate(HOSTILE_VALUES + ["$HOME ${HOME} \\u000A \\n", "tab\there"])}
    argv = ["run", "hello", "-p", f"msg={value}"]
    for key, val in others.items():
        argv += ["-p", f"{key}={val}"]
    proc = run_cli(*argv, cwd=project)
    assert proc.returncode == 0, proc.stderr
    results = project / "runs" / "hello" / _latest(project, "hello") / "results"
    assert (results / "param-env.bin").read_bytes() == value.encode()
    args = (results / "args.bin").read_bytes().split(b"\0")[:-1]
    assert args == [f"--{k}={v}".encode() for k, v in {"msg": value, **others}.items()]
    assert json.loads((results / "params.json").read_text()) == {"msg": value, **others}
    assert not (results / "pwned").exists()
    assert not Path("/tmp/hpcexp-pwned").exists()
    assert _record(project, "hello", results.parent.name)["params"] == {"msg": value, **others}


def test_detach_then_follow_shows_lines_before_the_end(project: Path) -> None:
    proc = run_cli("run", "--detach", "slow", "-p", "n=16", "-p", "s=0.5", cwd=project)
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.strip()
    assert _record(project, "slow", run_id)["state"] == "running"
    env = dict(os.environ)
    env.pop("HPCEXP_PROJECT", None)
    follower = subprocess.Popen([sys.executable, "-m", "hpcexp", "logs", "-f", run_id], cwd=project, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert follower.stdout is not None
    first = follower.stdout.readline()
    assert first == b"tick 0\n"
    assert _record(project, "slow", run_id)["state"] == "running"  # we saw a line while it still ran
    rest, err = follower.communicate(timeout=120)
    assert follower.returncode == 0, err
    assert rest.decode().splitlines()[-1] == "tick 15"
    assert _record(project, "slow", run_id)["state"] == "succeeded"
    assert (project / "runs" / "slow" / run_id / "results" / "done.txt").exists()


def test_stop_detached_run_leaves_no_process(project: Path) -> None:
    proc = run_cli("run", "-d", "slow", cwd=project)
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.strip()
    _wait(lambda: (project / "runs" / "slow" / run_id / "stdout.log").read_text().startswith("tick"))
    assert _marked_pids(run_id)
    proc = run_cli("stop", run_id, cwd=project)
    assert proc.returncode == 0, proc.stderr
    rec = _record(project, "slow", run_id)
    assert rec["state"] == "cancelled" and rec["signal"] == 15
    _wait(lambda: not _marked_pids(run_id), timeout=15)
    status = json.loads(run_cli("status", run_id, "--json", cwd=project).stdout)
    assert status[0]["state"] == "cancelled"


def test_killed_hpcexp_gives_lost_and_no_surviving_payload(project: Path) -> None:
    env = dict(os.environ)
    env.pop("HPCEXP_PROJECT", None)
    fg = subprocess.Popen([sys.executable, "-m", "hpcexp", "run", "slow"], cwd=project, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert fg.stdout is not None
    assert fg.stdout.readline() == b"tick 0\n"
    run_id = _latest(project, "slow")
    assert _record(project, "slow", run_id)["executor_ids"]["supervisor_pid"] == fg.pid
    fg.send_signal(signal.SIGKILL)
    fg.wait()
    fg.stdout.close()
    _wait(lambda: not _marked_pids(run_id), timeout=15)
    proc = run_cli("status", run_id, cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "state: lost" in proc.stdout
    assert f"supervisor pid {fg.pid}" in proc.stdout and "no exit was recorded" in proc.stdout


def test_ctrl_c_on_foreground_run_cancels_and_exits_130(project: Path) -> None:
    env = dict(os.environ)
    env.pop("HPCEXP_PROJECT", None)
    fg = subprocess.Popen([sys.executable, "-m", "hpcexp", "run", "slow"], cwd=project, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert fg.stdout is not None
    assert fg.stdout.readline() == b"tick 0\n"
    run_id = _latest(project, "slow")
    fg.send_signal(signal.SIGINT)
    _, err = fg.communicate(timeout=60)
    assert fg.returncode == 130, err
    assert b"Traceback" not in err
    assert _record(project, "slow", run_id)["state"] == "cancelled"
    _wait(lambda: not _marked_pids(run_id), timeout=15)


def test_twenty_concurrent_detached_runs(project: Path) -> None:
    run_cli("run", "hello", cwd=project)  # image cached first: the test is about run ids, not builds
    env = dict(os.environ)
    env.pop("HPCEXP_PROJECT", None)
    procs = [subprocess.Popen([sys.executable, "-m", "hpcexp", "run", "-q", "-d", "hello", "-p", f"msg={i}"],
                              cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(20)]
    ids = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        ids.append(out.decode().strip())
    assert len(set(ids)) == 20

    def all_done() -> bool:
        return all(_record(project, "hello", r)["state"] in ("succeeded", "failed") for r in ids)

    _wait(all_done, timeout=300)
    msgs = set()
    for r in ids:
        rec = _record(project, "hello", r)
        assert rec["state"] == "succeeded" and rec["run_id"] == r
        results = project / "runs" / "hello" / r / "results"
        assert (results / "result.txt").read_text().strip() == r
        msgs.add((results / "param-env.bin").read_text())
    assert msgs == {str(i) for i in range(20)}
    table = run_cli("runs", "hello", cwd=project).stdout
    assert all(r in table for r in ids)


def test_bench_script_runs(project: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_run.py"), "--repeat", "3",
                           "--project", str(project), "--experiment", "hello"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "median" in proc.stdout


def test_awkward_project_path_with_colon_comma_quote_and_spaces(busybox_sif: Path, tmp_path: Path) -> None:
    root = tmp_path / "ä b" / "it's:here,x"
    d = root / "experiments" / "hello"
    d.mkdir(parents=True)
    (root / "hpcexp.yaml").write_text(f"bases:\n  \"busybox:latest\": {{sif: {json.dumps(str(busybox_sif))}}}\n")
    (d / "Dockerfile").write_text('FROM busybox:latest\nENTRYPOINT ["sh", "/experiment/run.sh"]\n')
    (d / "run.sh").write_text(RUN_SH)
    proc = run_cli("run", "hello", cwd=root)
    assert proc.returncode == 0, proc.stderr
    run_id = _latest(root, "hello")
    assert (root / "runs" / "hello" / run_id / "results" / "result.txt").read_text().strip() == run_id
    assert "--mount" in _record(root, "hello", run_id)["command"]  # --bind cannot carry ':' or ','


def test_cmd_only_dockerfile_gets_parameters_after_its_command(tmp_path: Path, busybox_sif: Path) -> None:
    """The common research Dockerfile has only CMD; `-p` must reach that program as arguments."""
    root = tmp_path / "cmdproj"
    d = root / "experiments" / "train"
    d.mkdir(parents=True)
    (root / "hpcexp.yaml").write_text(f"bases:\n  \"busybox:latest\": {{sif: {json.dumps(str(busybox_sif))}}}\n")
    (d / "Dockerfile").write_text('FROM busybox:latest\nWORKDIR /app\nCOPY train.sh /app/train.sh\n'
                                  'CMD ["sh", "train.sh", "--epochs=1"]\n')
    (d / "train.sh").write_text('for a in "$@"; do echo "arg:$a"; done\npwd\n')
    proc = run_cli("run", "train", "-p", "lr=0.1", cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == ["arg:--epochs=1", "arg:--lr=0.1", "/app"]
    proc = run_cli("run", "train", cwd=root)  # no parameters: CMD exactly as in Docker
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == ["arg:--epochs=1", "/app"]
