"""Build cache speed: a no-op `hpcexp build --all` and the first hashing of a 1 GiB file.

Targets (issue 4):
* a no-op `hpcexp build --all` over 20 experiments, one with a 1 GiB file in its
  context, takes at most 0.5 s after the first build (median of N, wall clock, Python
  start-up included; `hpcexp --version` is measured alongside as the floor);
* the first hashing of that 1 GiB file (hpcexp's stat-cache hasher, cold cache) runs
  within 1.5x of `sha256sum` on the same file (both measured here, alternating, page cache
  warm for both).

Must run as an ordinary user (Apptainer fails as root on the test machines).

Usage: python bench/bench_build.py [--repeat 5] [--size-mib 1024] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def busybox_sif(tmp: Path) -> Path:
    busybox = shutil.which("busybox") or "/bin/busybox"
    rootfs = tmp / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    for applet in ("sh", "true", "echo", "cat", "mkdir", "cp", "dirname", "ls"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    for d in ("tmp", "etc", "root", "home"):
        (rootfs / d).mkdir()
    sif = tmp / "busybox.sif"
    subprocess.run(["apptainer", "build", "-F", str(sif), str(rootfs)], check=True, capture_output=True)
    return sif


def make_project(tmp: Path, n: int, size_mib: int) -> tuple[Path, Path]:
    root = tmp / "proj"
    sif = busybox_sif(tmp)
    (root / "experiments").mkdir(parents=True)
    (root / "hpcexp.yaml").write_text(f'bases:\n  "busybox:latest": {{sif: "{sif}"}}\n')
    big = None
    for i in range(n):
        exp = root / "experiments" / f"exp{i:02d}"
        exp.mkdir()
        (exp / "Dockerfile").write_text("FROM busybox:latest\nCOPY . /app\nRUN true\nWORKDIR /app\n")
        (exp / "main.sh").write_text(f"echo experiment {i}\n")
        (exp / "params.txt").write_text("lr=0.1\n" * 10)
        if i == 0:
            big = exp / "big.bin"
            block = (b"hpcexp build bench " * 3450)[: 1 << 16]  # compressible: the first build stays quick
            with open(big, "wb") as fh:
                for _ in range(size_mib * 16):
                    fh.write(block)
            old = time.time() - 60  # not "racily clean": the stat cache may keep it
            os.utime(big, (old, old))
    assert big is not None
    return root, big


def timed(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed ({proc.returncode}): {proc.stderr.strip()}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--experiments", type=int, default=20)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if os.geteuid() == 0:
        raise SystemExit("run as an ordinary user (Apptainer fails as root here)")

    tmp = Path(tempfile.mkdtemp(prefix="hpcexp-bench-build-"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    hpcexp = [sys.executable, "-m", "hpcexp"]
    try:
        root, big = make_project(tmp, args.experiments, args.size_mib)

        # 1. first hashing of the big file vs sha256sum (alternating; the first read warms the cache)
        subprocess.run(["sha256sum", str(big)], check=True, capture_output=True)
        probe = ("import sys,time; from hpcexp.infra.hashing import StatCache; c=StatCache(None); "
                 "t=time.perf_counter(); c.digest(sys.argv[1]); print(time.perf_counter()-t)")
        ours, theirs = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run(["sha256sum", str(big)], check=True, capture_output=True)
            theirs.append(time.perf_counter() - t0)
            out = subprocess.run([sys.executable, "-c", probe, str(big)], check=True, capture_output=True,
                                 text=True, env=env).stdout
            ours.append(float(out))
        hash_ours, hash_base = statistics.median(ours), statistics.median(theirs)

        # 2. first build of everything (informative), then no-op builds
        t_first = timed([*hpcexp, "build", "--all", "-q"], root, env)
        noop = [timed([*hpcexp, "build", "--all"], root, env) for _ in range(args.repeat)]
        floor = [timed([*hpcexp, "--version"], root, env) for _ in range(args.repeat)]
        calls = tmp / "calls.log"
        shim = tmp / "shim"
        shim.mkdir()
        (shim / "apptainer").write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\nexec "{shutil.which("apptainer")}" "$@"\n')
        (shim / "apptainer").chmod(0o755)
        timed([*hpcexp, "build", "--all"], root, dict(env, PATH=f"{shim}:{env['PATH']}"))
        apptainer_calls = len(calls.read_text().splitlines()) if calls.exists() else 0

        noop_med = statistics.median(noop)
        print(f"experiments: {args.experiments}, big file: {args.size_mib} MiB")
        print(f"first `hpcexp build --all`: {t_first:.1f} s")
        print(f"no-op `hpcexp build --all`: median {noop_med * 1000:.0f} ms of {args.repeat} "
              f"(target <= 500 ms) {'OK' if noop_med <= 0.5 else 'MISSED'}; apptainer calls: {apptainer_calls}")
        print(f"`hpcexp --version` (floor): median {statistics.median(floor) * 1000:.0f} ms")
        print(f"first hashing of the big file: hpcexp {hash_ours:.2f} s, sha256sum {hash_base:.2f} s, "
              f"ratio {hash_ours / hash_base:.2f}x (target <= 1.5x) "
              f"{'OK' if hash_ours / hash_base <= 1.5 else 'MISSED'}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
