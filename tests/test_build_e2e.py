"""Image builds through the real Apptainer as an ordinary user, with no registry reachable.

Apptainer calls are counted with a PATH shim that logs its arguments and then execs the
real apptainer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_clean_error, run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture
def shim(tmp_path: Path) -> tuple[dict[str, str], Path]:
    real = shutil.which("apptainer")
    assert real
    bindir = tmp_path / "shim"
    bindir.mkdir()
    log = tmp_path / "apptainer-calls.log"
    script = bindir / "apptainer"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec "{real}" "$@"\n')
    script.chmod(0o755)
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    return env, log


def processes_mentioning(text: str) -> list[str]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                found.append(cmd)
    return found


def builds(log: Path) -> list[str]:
    return [ln for ln in log.read_text().splitlines() if ln.startswith("build")] if log.exists() else []


def project(root: Path, base: Path, run: str = "echo built > /app/stamp") -> Path:
    exp = root / "experiments" / "hello"
    exp.mkdir(parents=True)
    (root / "hpcexp.yaml").write_text(f'bases:\n  "busybox:latest": {{sif: "{base}"}}\n')
    (exp / "Dockerfile").write_text(f"FROM busybox:latest\nCOPY hello.sh data/ /app/\nRUN {run}\n"
                                    "WORKDIR /app\nCMD [\"sh\", \"/app/hello.sh\"]\n")
    (exp / "hello.sh").write_text("echo hello\n")
    (exp / "data").mkdir()
    (exp / "data" / "keep.txt").write_text("data\n")
    (exp / "data" / "skip.tmp").write_text("ignored\n")
    (exp / ".dockerignore").write_text("**/*.tmp\n")
    return root


def test_offline_build_cache_hit_and_what_triggers_a_rebuild(tmp_path: Path, busybox_sif: Path, shim) -> None:
    env, log = shim
    root = project(tmp_path / "p", busybox_sif)
    first = run_cli("build", "hello", cwd=root, env=env)
    assert first.returncode == 0, first.stderr
    assert "hello amd64: built in" in first.stdout
    assert len(builds(log)) == 1
    sifs = list((root / "images").glob("hello-amd64-*.sif"))
    assert len(sifs) == 1
    side = json.loads(sifs[0].with_suffix(".json").read_text())
    labels = subprocess.run(["apptainer", "inspect", "--json", "--labels", str(sifs[0])],
                            capture_output=True, text=True, check=True).stdout
    assert side["input_hash"] in labels and "org.hpcexp.base.0.digest" in labels

    calls_before = log.read_text()
    second = run_cli("build", "hello", cwd=root, env=env)
    assert second.returncode == 0, second.stderr
    assert "hello amd64: cached (" in second.stdout
    assert log.read_text() == calls_before, "a cache hit must not call apptainer at all"

    # outside the context (a run's results) and a .dockerignored file: still cached
    results = root / "runs" / "hello" / "r1" / "results"
    results.mkdir(parents=True)
    (results / "out.txt").write_text("result\n")
    (root / "experiments" / "hello" / "data" / "skip.tmp").write_text("changed\n")
    third = run_cli("build", "hello", "--json", cwd=root, env=env)
    assert third.returncode == 0, third.stderr
    info = json.loads(third.stdout)
    assert info[0]["built"] is False and info[0]["workdir"] == "/app"
    assert len(builds(log)) == 1

    # a copied file changes: rebuilt, and the new image has the new content
    (root / "experiments" / "hello" / "data" / "keep.txt").write_text("new data\n")
    fourth = run_cli("build", "hello", cwd=root, env=env)
    assert fourth.returncode == 0, fourth.stderr
    assert "built in" in fourth.stdout and len(builds(log)) == 2
    images = run_cli("images", "--json", cwd=root, env=env)
    states = sorted(e["state"] for e in json.loads(images.stdout))
    assert states == ["current", "stale"]
    new = [e["path"] for e in json.loads(images.stdout) if e["state"] == "current"][0]
    cat = subprocess.run(["apptainer", "exec", new, "cat", "/app/keep.txt"], capture_output=True, text=True)
    assert cat.stdout == "new data\n", cat.stderr
    clean = run_cli("clean", cwd=root, env=env)
    assert clean.returncode == 0 and "removed" in clean.stdout
    assert [e["state"] for e in json.loads(run_cli("images", "--json", cwd=root, env=env).stdout)] == ["current"]


def test_failing_run_step(tmp_path: Path, busybox_sif: Path, shim) -> None:
    env, _ = shim
    root = project(tmp_path / "p", busybox_sif, run="echo about to fail && false")
    proc = run_cli("build", "hello", cwd=root, env=env)
    assert_clean_error(proc, 4, "build of hello amd64 failed", "log: ")
    first = [ln for ln in proc.stderr.splitlines() if ln.startswith("hpcexp: error:")]
    assert len(first) == 1
    log_path = Path(first[0].rsplit("log: ", 1)[1].split(";")[0].strip())
    assert log_path.is_file() and "about to fail" in log_path.read_text()
    assert "about to fail" in proc.stderr  # the last lines are shown
    assert proc.stderr.splitlines().count("  | about to fail") == 1, "the tail is shown once"
    assert not list((root / "images").glob("*.sif"))
    assert not [p for p in (root / "images").iterdir() if p.name.startswith(".hpcexp-tmp-")]
    # `run` needs the same image: the same tail and error, exit 4, and no run started
    proc = run_cli("run", "hello", cwd=root, env=env)
    assert_clean_error(proc, 4, "build of hello amd64 failed", "| about to fail")
    assert not (root / "runs").exists() or not any((root / "runs").rglob("run.json"))


def test_killed_build_leaves_no_image_and_next_build_succeeds(tmp_path: Path, busybox_sif: Path, shim) -> None:
    env, log = shim
    root = project(tmp_path / "p", busybox_sif, run="echo sleeping && sleep 4")
    full_env = dict(os.environ, **env, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "hpcexp", "build", "hello"], cwd=root, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    logs = root / "images" / ".logs"
    deadline = time.time() + 60
    while time.time() < deadline:
        if logs.is_dir() and any("sleeping" in p.read_text(errors="replace") for p in logs.glob("*.log")):
            break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("the build never reached its RUN step")
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    # the whole apptainer tree dies with hpcexp (its watchdog kills the build's process group)
    deadline = time.time() + 10
    while time.time() < deadline and processes_mentioning(str(root / "images")):
        time.sleep(0.1)
    assert processes_mentioning(str(root / "images")) == []
    assert not list((root / "images").glob("*.sif"))
    listed = run_cli("images", "--json", cwd=root, env=env)
    assert json.loads(listed.stdout) == []
    again = run_cli("build", "hello", cwd=root, env=env)
    assert again.returncode == 0, again.stderr
    assert "built in" in again.stdout
    clean = run_cli("clean", cwd=root, env=env)
    assert clean.returncode == 0, clean.stderr
    assert not [p for p in (root / "images").iterdir() if p.name.startswith(".hpcexp-tmp-")]
    assert not list((root / "images" / ".locks").glob("*"))


def test_interrupted_build_cleans_up_and_exits_130(tmp_path: Path, busybox_sif: Path, shim) -> None:
    env, _ = shim
    root = project(tmp_path / "p", busybox_sif, run="echo sleeping && sleep 300")
    full_env = dict(os.environ, **env, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "hpcexp", "build", "hello"], cwd=root, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = root / "images" / ".logs"
    # The RUN step sleeps far longer than this wait, so under any load the signal lands
    # while apptainer is still building, whenever its output reaches the log.
    deadline = time.time() + 60
    while time.time() < deadline and not (
            logs.is_dir() and any("sleeping" in p.read_text(errors="replace") for p in logs.glob("*.log"))):
        time.sleep(0.1)
    assert proc.poll() is None, "the build must still be running when it is interrupted"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    leftovers = [p.name for p in (root / "images").rglob("*")
                 if p.is_file() and not p.name.endswith(".log") and p.name != ".hash-cache.json"]
    assert leftovers == [], leftovers


def test_two_concurrent_builds_run_apptainer_once(tmp_path: Path, busybox_sif: Path, shim) -> None:
    env, log = shim
    root = project(tmp_path / "p", busybox_sif, run="sleep 5")
    full_env = dict(os.environ, **env, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-m", "hpcexp", "build", "hello"], cwd=root, env=full_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    locks = root / "images" / ".locks"
    deadline = time.time() + 60
    while time.time() < deadline and not (locks.is_dir() and list(locks.glob("*.lock"))):
        time.sleep(0.05)
    busy = run_cli("build", "hello", "--no-wait", cwd=root, env=env)
    outs = [p.communicate(timeout=300) for p in procs]
    assert_clean_error(busy, 75, "is being built by", "pid ")
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(builds(log)) == 1, log.read_text()
    joined = "".join(o[0] for o in outs)
    assert "built in" in joined and "cached" in joined
    assert "waiting for" in "".join(o[1] for o in outs)
    assert len(list((root / "images").glob("*.sif"))) == 1


def test_no_subuid_range_falls_back_with_a_warning(tmp_path: Path, busybox_sif: Path) -> None:
    real = shutil.which("apptainer")
    bindir = tmp_path / "shim"
    bindir.mkdir()
    # Make Apptainer behave as for a user without a subuid range, as `--ignore-subuid` does.
    (bindir / "apptainer").write_text(
        f'#!/bin/sh\nif [ "$1" = build ]; then shift; exec "{real}" build --ignore-subuid "$@"; fi\n'
        f'exec "{real}" "$@"\n')
    (bindir / "apptainer").chmod(0o755)
    empty = tmp_path / "subuid"
    empty.write_text("")
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "HPCEXP_SUBUID_FILE": str(empty)}
    root = project(tmp_path / "p", busybox_sif)
    proc = run_cli("build", "hello", cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "warning: no /etc/subuid range" in proc.stderr and "fakeroot" in proc.stderr


@pytest.mark.slow
def test_example_experiment_builds_offline_on_a_debootstrap_base(tmp_path: Path) -> None:
    """The one slow test: the project's own example experiment (FROM python:3.11-slim, no
    `bases:` entry, so hpcexp's python stand-in) builds with no registry: the base comes from
    debootstrap and the mirror in this machine's apt configuration. The base is cached in
    the user's cache folder, so a rerun only builds the image on top."""
    root = tmp_path / "example"
    shutil.copytree(REPO / "experiments" / "hello", root / "experiments" / "hello")
    shutil.copy(REPO / "hpcexp.yaml", root / "hpcexp.yaml")
    proc = run_cli("build", "hello", cwd=root, timeout=900)
    assert proc.returncode == 0, proc.stderr
    sif = next((root / "images").glob("hello-*.sif"))
    out = subprocess.run(["apptainer", "exec", str(sif), "python3", "-c", "import sys; print(sys.version_info[0])"],
                         capture_output=True, text=True)
    assert out.stdout == "3\n", out.stderr
    side = json.loads(sif.with_suffix(".json").read_text())
    assert side["bases"][0]["ref"] == "python:3.11-slim"
    assert side["bases"][0]["digest"].startswith("sha256:") and "?" not in side["bases"][0]["digest"]
    labels = json.loads(subprocess.run(["apptainer", "inspect", "--json", "--labels", str(sif)],
                                       capture_output=True, text=True, check=True).stdout)
    labels = labels["data"]["attributes"]["labels"]
    # the image's own labels win over the base's (same keys)
    assert labels["org.hpcexp.built-at"] == side["built_at"]
    assert labels["org.hpcexp.input-hash"] == side["input_hash"]
    again = run_cli("build", "hello", cwd=root)
    assert again.returncode == 0 and "cached" in again.stdout


def test_fallback_build_failure_says_why_and_what_to_do(tmp_path: Path, busybox_sif: Path) -> None:
    """The real Apptainer without a subuid range (`--ignore-subuid`, chosen by hpcexp from the
    subuid database it is pointed at): a recipe giving a file another owner fails, and the
    one error line names the missing range, what the fallback cannot do and the fix."""
    empty = tmp_path / "subuid"
    empty.write_text("")
    root = project(tmp_path / "p", busybox_sif, run="touch /app/owned && chown 1234:1234 /app/owned")
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_cli("build", "hello", cwd=root, env={"HPCEXP_SUBUID_FILE": str(empty)})
    assert_clean_error(proc, 4, "no /etc/subuid+/etc/subgid range for", "cannot give files other owners",
                       "usermod --add-subuids")
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("hpcexp: error:")]
    assert len(errors) == 1, proc.stderr
    assert not list((root / "images").glob("*.sif")), "no image published"
    assert not [p for p in (root / "images").iterdir() if p.name.startswith(".hpcexp-tmp-")]
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "nothing written beside the project"
