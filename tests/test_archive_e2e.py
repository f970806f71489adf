"""`hpcexp archive` / `--verify` / `extract` after real runs through Apptainer (busybox images).

The run folders are produced by `hpcexp run` itself, so the archive sees exactly what an
executor leaves behind; the odd files (a link to a canary outside the project, a FIFO, a
link loop) are made by the payload inside the container.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, assert_clean_error, run_cli

pytestmark = pytest.mark.e2e

RES_SH = r"""
echo "seed=$HPCEXP_PARAM_seed run=$HPCEXP_RUN_ID" > "$HPCEXP_RESULTS/result.txt"
mkdir -p "$HPCEXP_RESULTS/sub"
dd if=/dev/urandom of="$HPCEXP_RESULTS/sub/data.bin" bs=1024 count=1500 2>/dev/null
echo "seed $HPCEXP_PARAM_seed done"
"""

ODD_SH = r"""
ln -s "$HPCEXP_PARAM_canary" "$HPCEXP_RESULTS/k"
mkfifo "$HPCEXP_RESULTS/pipe"
ln -s loop2 "$HPCEXP_RESULTS/loop1"
ln -s loop1 "$HPCEXP_RESULTS/loop2"
echo fine > "$HPCEXP_RESULTS/ok.txt"
"""

CANARY = "CANARY-e2e-5c1d private key material"


@pytest.fixture(scope="module")
def world(busybox_sif: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A project with two real runs of `res` and one of `odd`, and a canary outside it."""
    secret = tmp_path_factory.mktemp("outside") / "id_rsa"
    secret.write_text(CANARY + "\n")
    root = tmp_path_factory.mktemp("archproj")
    (root / "hpcexp.yaml").write_text("bases:\n" f"  \"busybox:latest\": {{sif: {json.dumps(str(busybox_sif))}}}\n")
    for name, script in (("res", RES_SH), ("odd", ODD_SH)):
        d = root / "experiments" / name
        d.mkdir(parents=True)
        (d / "Dockerfile").write_text('FROM busybox:latest\nENTRYPOINT ["sh", "/experiment/run.sh"]\n')
        (d / "run.sh").write_text(script)
    run_ids = []
    for seed in ("1", "2"):
        proc = run_cli("run", "res", "-p", f"seed={seed}", cwd=root)
        assert proc.returncode == 0, proc.stderr
        run_ids.append(sorted(os.listdir(root / "runs" / "res"))[-1])
    proc = run_cli("run", "odd", "-p", f"canary={secret}", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "runs": run_ids, "secret": secret}


def _tree_digest(folder: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_two_runs_as_zip_and_targz_verify_and_detect_a_flipped_byte(world: dict, tmp_path: Path) -> None:
    root, (r1, r2) = world["root"], world["runs"]
    before = _tree_digest(root / "runs")
    for fmt in ("zip", "tar.gz"):
        out = tmp_path / f"two.{fmt}"
        proc = run_cli("archive", r1, r2, "-o", str(out), "--strict", "--json", cwd=root)
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["runs"] == [f"res/{r1}", f"res/{r2}"] and summary["warnings"] == []
        proc = run_cli("archive", "--verify", str(out))
        assert proc.returncode == 0, proc.stderr
    assert _tree_digest(root / "runs") == before  # the archived runs were only read

    # the manifest carries the provenance the run recorded
    with zipfile.ZipFile(tmp_path / "two.zip") as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read("MANIFEST.json"))
    record = json.loads((root / "runs" / "res" / r1 / "run.json").read_text())
    assert names[0] == "MANIFEST.json"
    for rel in ("run.json", "stdout.log", "stderr.log", "results/result.txt", "results/sub/data.bin",
                "recipe/Dockerfile"):
        assert f"res/{r1}/{rel}" in names, rel
    assert any(n.startswith(f"res/{r1}/recipe/res.") and n.endswith(".def") for n in names)
    assert manifest["image_sha256"] == record["image_sha256"]
    run_info = {r["run_id"]: r for r in manifest["runs"]}[r1]
    assert run_info["recipe"]["matches_record"] is True
    data = (root / "runs" / "res" / r1 / "results" / "sub" / "data.bin").read_bytes()
    entry = {f["path"]: f for f in manifest["files"]}[f"res/{r1}/results/sub/data.bin"]
    assert entry == {"path": f"res/{r1}/results/sub/data.bin", "type": "file", "size": len(data),
                     "sha256": hashlib.sha256(data).hexdigest()}

    # flip one byte of a member: tar.gz (inside the tar stream, recompressed)
    victim = f"res/{r2}/results/result.txt"
    raw = bytearray(gzip.decompress((tmp_path / "two.tar.gz").read_bytes()))
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tf:
        offset = tf.getmember(victim).offset_data
    raw[offset] ^= 0x01
    (tmp_path / "flipped.tar.gz").write_bytes(gzip.compress(bytes(raw)))
    proc = run_cli("archive", "--verify", str(tmp_path / "flipped.tar.gz"))
    assert_clean_error(proc, 1, victim, "differs")

    # ... and zip (inside the member's compressed data)
    victim = f"res/{r1}/results/sub/data.bin"
    with zipfile.ZipFile(tmp_path / "two.zip") as zf:
        zi = zf.getinfo(victim)
    zraw = bytearray((tmp_path / "two.zip").read_bytes())
    zraw[zi.header_offset + 30 + len(zi.filename.encode()) + len(zi.extra) + zi.compress_size // 2] ^= 0x01
    (tmp_path / "flipped.zip").write_bytes(bytes(zraw))
    proc = run_cli("archive", "--verify", str(tmp_path / "flipped.zip"))
    assert_clean_error(proc, 1, victim)

    # the intact archive restores byte for byte
    proc = run_cli("extract", str(tmp_path / "two.zip"), str(tmp_path / "restored"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "restored" / "res" / r1 / "results" / "sub" / "data.bin").read_bytes() == data


def test_links_fifo_and_loop_from_a_real_container(world: dict, tmp_path: Path) -> None:
    root, secret = world["root"], world["secret"]
    for fmt in ("tar.gz", "zip"):
        out = tmp_path / f"odd.{fmt}"
        proc = run_cli("archive", "odd", "-o", str(out), cwd=root, timeout=120)  # a FIFO must not hang it
        assert proc.returncode == 0, proc.stderr
        for name in ("results/k", "results/pipe", "results/loop1", "results/loop2"):
            assert name in proc.stderr, (name, proc.stderr)
        assert str(secret) in proc.stderr  # the warning says where the link points
        if fmt == "zip":
            with zipfile.ZipFile(out) as zf:
                content = b"".join(zf.read(n) for n in zf.namelist())
        else:
            content = gzip.decompress(out.read_bytes())
        assert CANARY.encode() not in content
        assert run_cli("archive", "--verify", str(out)).returncode == 0
    proc = run_cli("archive", "odd", "-o", str(tmp_path / "strict.tar.gz"), "--strict", cwd=root, timeout=120)
    assert_clean_error(proc, 2, "--strict")
    assert not (tmp_path / "strict.tar.gz").exists()


@pytest.mark.parametrize("member,kind,payload", [
    ("../x", "file", b"escaped"),
    ("/tmp/hpcexp-e2e-abs-evil", "file", b"evil"),
    ("etc", "symlink", "/etc"),
])
def test_extract_refuses_crafted_archive(world: dict, tmp_path: Path, member: str, kind: str,
                                         payload: object) -> None:
    root, (r1, _) = world["root"], world["runs"]
    good = tmp_path / "good.tar.gz"
    assert run_cli("archive", r1, "-o", str(good), cwd=root).returncode == 0
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(good, "r:gz") as tin, tarfile.open(evil, "w:gz", format=tarfile.PAX_FORMAT) as tout:
        for m in tin.getmembers():
            tout.addfile(m, tin.extractfile(m) if m.isreg() else None)
        ti = tarfile.TarInfo(member)
        if kind == "symlink":
            ti.type, ti.linkname = tarfile.SYMTYPE, str(payload)
            tout.addfile(ti)
            follow = tarfile.TarInfo(f"{member}/hpcexp-e2e-written")
            follow.size = 1
            tout.addfile(follow, io.BytesIO(b"x"))
        else:
            ti.size = len(payload)  # type: ignore[arg-type]
            tout.addfile(ti, io.BytesIO(payload))  # type: ignore[arg-type]
    area = tmp_path / "area"
    area.mkdir()
    proc = run_cli("extract", str(evil), str(area / "dest"))
    assert_clean_error(proc, 2, member)
    assert list(area.iterdir()) == []
    assert not (tmp_path / "x").exists() and not (area / "x").exists()
    assert not Path("/tmp/hpcexp-e2e-abs-evil").exists() and not Path("/etc/hpcexp-e2e-written").exists()


def test_kill_midway_leaves_no_archive_at_the_final_path(world: dict, tmp_path: Path) -> None:
    root, (r1, r2) = world["root"], world["runs"]
    before = _tree_digest(root / "runs")
    out = tmp_path / "killed.tar.gz"
    env = dict(os.environ, HPCEXP_TEST_FAULT="archive.write:sleep", HPCEXP_TEST_FAULT_SECONDS="120",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    env.pop("HPCEXP_PROJECT", None)
    child = subprocess.Popen([sys.executable, "-m", "hpcexp", "archive", r1, r2, "-o", str(out)], cwd=root,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".hpcexp-tmp-*killed.tar.gz")):  # the manifest is being written
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the archive never started writing"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert not out.exists()
    assert _tree_digest(root / "runs") == before
    # the orphan names its owner (host and pid) so `hpcexp clean` can judge it; a new archive works
    orphans = list(tmp_path.glob(".hpcexp-tmp-*"))
    assert len(orphans) == 1 and f"-{child.pid}-" in orphans[0].name
    proc = run_cli("archive", r1, r2, "-o", str(out), cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert run_cli("archive", "--verify", str(out)).returncode == 0


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_sigterm_inside_a_real_runs_data_is_one_line_and_leaves_nothing(world: dict, tmp_path: Path,
                                                                       fmt: str) -> None:
    """SIGTERM (kill, scancel) while a real run's 1.5 MB data.bin is being compressed: the
    gzip or zip stream is closed before its file on every Python (-X dev makes 3.9-3.12
    report what 3.13 reports by default), so stderr is the one error line."""
    root, (r1, r2) = world["root"], world["runs"]
    before = _tree_digest(root / "runs")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"a.{fmt}"
    env = dict(os.environ, HPCEXP_TEST_FAULT="archive.member:sigterm",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    env.pop("HPCEXP_PROJECT", None)
    proc = subprocess.run([sys.executable, "-X", "dev", "-m", "hpcexp", "archive", r1, r2, "-o", str(out)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines() == [f"hpcexp: error: interrupted while writing {out}; no archive was written"]
    assert list(out_dir.iterdir()) == []
    assert _tree_digest(root / "runs") == before
    proc = run_cli("archive", r1, r2, "-o", str(out), cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert run_cli("archive", "--verify", str(out)).returncode == 0
