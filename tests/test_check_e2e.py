"""``hpcexp check [--repair]`` and ``hpcexp unlock`` end to end, through the real Slurm, as
the ordinary user: planted damage is found, the safe part repaired, the rest marked, and
nothing else in the project changes (compared with a snapshot of the whole tree)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.slurm]


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """path -> (sha256 or 'dir'/'link:...', mode) of every entry under root."""
    out: dict[str, tuple[str, int]] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = (f"link:{os.readlink(p)}", st.st_mode)
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode)
            else:
                out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mode)
    return out


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def proj(tmp_path: Path, busybox_sif: Path) -> dict[str, Any]:
    root = tmp_path / "proj"
    exp = root / "experiments" / "echo"
    exp.mkdir(parents=True)
    (exp / "Dockerfile").write_text("FROM busybox:latest\n")
    (root / "hpcexp.yaml").write_text(
        f'bases:\n  "busybox:latest": {{sif: {busybox_sif}}}\n'
        "experiments:\n  echo:\n    command: [/bin/sh, -c, 'echo hi > results/out.txt']\n"
        "    slurm: {mem: 100M, time: '2'}\n")
    return {"root": root, "env": {"XDG_CACHE_HOME": str(tmp_path / "cache")}}


def cli(p: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=p["root"], env=p["env"])


def test_check_finds_plants_repair_fixes_the_safe_part_marks_the_rest_and_changes_nothing_else(
        proj: dict[str, Any]) -> None:
    root = proj["root"]
    done = cli(proj, "submit", "echo", "--wait", "--json")
    assert done.returncode == 0, done.stderr
    good = json.loads(done.stdout)[0]
    assert good["state"] == "succeeded"
    clean = cli(proj, "check", "--json")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert json.loads(clean.stdout)["findings"] == []

    good_dir = root / "runs" / "echo" / good["run_id"]
    # 1. an orphaned temporary file (its writer, on this host, is gone)
    orphan = good_dir / f".hpcexp-tmp-{socket.gethostname().split('.')[0]}-{dead_pid()}-0badf00d-run.json"
    orphan.write_text('{"half": ')
    # a temporary file of a live writer (this test) is no finding and stays
    live_tmp = good_dir / "events" / f".hpcexp-tmp-{socket.gethostname().split('.')[0]}-{os.getpid()}-1234abcd-x"
    live_tmp.write_text("")
    # 2. a truncated record
    trunc = root / "runs" / "echo" / "20260101-000000.000-aaaaaa"
    trunc.mkdir()
    text = (good_dir / "run.json").read_text().replace(good["run_id"], trunc.name)
    (trunc / "run.json").write_text(text[: len(text) // 2])
    (trunc / "results").mkdir()
    (trunc / "results" / "keep.txt").write_text("user output")
    # 3. a record whose job Slurm has forgotten (never ran here; left the queue long ago)
    forgot = root / "runs" / "echo" / "20260101-000000.000-bbbbbb"
    forgot.mkdir()
    rec = json.loads((good_dir / "run.json").read_text())
    rec.update(run_id=forgot.name, state="running", ended_at=None, exit_code=None)
    rec["executor_ids"] = {"job_id": "987654321", "base_attempt": 1}
    (forgot / "run.json").write_text(json.dumps(rec))

    before = snapshot(root)
    found = cli(proj, "check", "--json")
    assert found.returncode == 1, found.stderr
    assert "check found 3 problem(s)" in found.stderr and "Traceback" not in found.stderr
    findings = {f["path"]: f for f in json.loads(found.stdout)["findings"]}
    assert findings[str(orphan)]["kind"] == "orphaned temporary file"
    assert findings[str(trunc / "run.json")]["kind"] == "damaged record"
    assert "says lost" in findings[str(forgot / "run.json")]["detail"]
    assert "987654321" in findings[str(forgot / "run.json")]["detail"]
    assert all(f["action"] == "found" for f in findings.values()) and len(findings) == 3
    assert snapshot(root) == before                      # checking changes nothing

    repaired = cli(proj, "check", "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "removed    orphaned temporary file" in repaired.stdout
    assert "marked     damaged record" in repaired.stdout and "marked     state" in repaired.stdout
    after = snapshot(root)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    damaged_copy = [k for k in after if k.startswith(f"runs/echo/{trunc.name}/run.json.damaged-")]
    assert len(damaged_copy) == 1
    assert changed == {str(orphan.relative_to(root)), f"runs/echo/{trunc.name}/run.json",
                       f"runs/echo/{forgot.name}/run.json", damaged_copy[0]}, changed
    assert (root / damaged_copy[0]).read_text() == text[: len(text) // 2]     # kept byte for byte
    assert (trunc / "results" / "keep.txt").read_text() == "user output" and live_tmp.exists()

    by_id = {rid: json.loads(cli(proj, "status", rid, "--json").stdout)[0] for rid in (trunc.name, forgot.name)}
    assert by_id[trunc.name]["state"] == "lost" and "damaged" in by_id[trunc.name]["reason"]
    assert by_id[forgot.name]["state"] == "lost" and "987654321" in by_id[forgot.name]["reason"]
    again = cli(proj, "check", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["findings"] == [], again.stdout


def test_unlock_breaks_a_dead_owners_lock_and_refuses_a_live_one_unless_forced(proj: dict[str, Any]) -> None:
    root = proj["root"]
    locks = root / "images" / ".locks"
    locks.mkdir(parents=True)
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    host = socket.gethostname()
    dead = locks / "echo-amd64-0000000000000000.lock"
    dead.write_text(json.dumps({"host": host, "pid": dead_pid(), "user": "someone", "started": "2026-01-01T00:00:00Z",
                                "boot_id": boot, "purpose": "build echo"}))
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        live = locks / "echo-amd64-1111111111111111.lock"
        live.write_text(json.dumps({"host": host, "pid": sleeper.pid, "user": "someone",
                                    "started": "2026-01-01T00:00:00Z", "boot_id": boot, "purpose": "build echo"}))
        out = cli(proj, "unlock")
        assert out.returncode == 0, out.stderr
        assert f"broke {dead}: it was held by someone@{host}" in out.stdout and "(build echo)" in out.stdout
        assert f"kept {live}" in out.stdout and not dead.exists() and live.exists()
        refused = cli(proj, "unlock", str(live))
        assert refused.returncode == 75 and f"pid {sleeper.pid}" in refused.stderr and live.exists()
        assert "--force" in refused.stderr
        forced = cli(proj, "unlock", "--force", str(live.relative_to(root)))
        assert forced.returncode == 0, forced.stderr
        assert f"it was held by someone@{host} pid {sleeper.pid}" in forced.stdout and not live.exists()
        notalock = cli(proj, "unlock", "hpcexp.yaml")
        assert notalock.returncode == 2 and "is not a lock file" in notalock.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
