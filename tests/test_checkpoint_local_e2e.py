"""``hpcexp stop --checkpoint`` end to end: real Apptainer, ordinary user, a busybox payload
that saves its position in ``$HPCEXP_CHECKPOINT_DIR`` on the checkpoint signal."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.e2e

COUNT_SH = r'''
ck="$HPCEXP_CHECKPOINT_DIR/position"
i=0
trap 'echo "$i" > "$ck"; echo "saved at $i (attempt $HPCEXP_ATTEMPT)"; exit 0' USR2
while :; do i=$((i + 1)); echo "tick $i"; sleep 0.2; done
'''


def test_stop_checkpoint_lets_the_payload_save_before_it_stops(tmp_path: Path, busybox_sif: Path) -> None:
    root = tmp_path / "proj"
    exp = root / "experiments" / "count"
    exp.mkdir(parents=True)
    (exp / "Dockerfile").write_text("FROM busybox:latest\n")
    (exp / "count.sh").write_text(COUNT_SH)
    (root / "hpcexp.yaml").write_text(
        f'bases:\n  "busybox:latest": {{sif: {busybox_sif}}}\n'
        "experiments:\n  count:\n    command: [/bin/sh, /experiment/count.sh]\n"
        "    checkpoint: {signal: USR2, before: 60}\n")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = run_cli("run", "-d", "count", cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.strip()
    run_dir = root / "runs" / "count" / run_id
    end = time.monotonic() + 60
    while "tick 3" not in ((run_dir / "stdout.log").read_text() if (run_dir / "stdout.log").exists() else ""):
        assert time.monotonic() < end, "the payload never started"
        time.sleep(0.1)
    started = time.monotonic()
    stop = run_cli("stop", "--checkpoint", "--grace", "20", run_id, cwd=root, env=env)
    assert stop.returncode == 0, stop.stderr
    assert time.monotonic() - started < 15                 # it stopped on its own, well before the grace
    saved = int((run_dir / "results" / "checkpoint" / "position").read_text())
    assert saved >= 3
    assert f"saved at {saved} (attempt 1)" in (run_dir / "stdout.log").read_text()
    rec = json.loads(run_cli("status", run_id, "--json", cwd=root, env=env).stdout)[0]
    assert rec["state"] == "cancelled" and rec["exit_code"] == 0, rec
    assert "stop --checkpoint" in rec["reason"] and "checkpoint signal SIGUSR2" in rec["reason"]
