"""`hpcexp pull` of a 100 MB image against `apptainer pull` of the same reference.

Target (issue 13): hpcexp pull within 1.2x of apptainer pull, median of the per-round
ratios, interleaved rounds (the order alternates each round), all in this run, against a
real registry (Debian's docker-registry on 127.0.0.1 with TLS, started here, stopped
after). Both pull the same ``oras://...@sha256:`` reference with ``--disable-cache`` (what
hpcexp passes: the images folder is its cache), so every round downloads the full image.
hpcexp's extra work: start-up, the project and lock, computing the current input hash,
the image lock, the sha256 check against the lock, the sidecar and the rename.

Usage (as an ordinary user, on a provisioned machine):
    python bench/bench_registry.py [--rounds 7] [--mb 100]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import registry_server  # noqa: E402


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child tree) of one command that must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def make_sif(work: Path, name: str, mb: int) -> Path:
    """A busybox SIF with ``mb`` MB of incompressible payload (so the SIF really is that big)."""
    root = work / f"rootfs-{name}"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    with open(root / "payload.bin", "wb") as f:
        for _ in range(mb):
            f.write(os.urandom(1 << 20))
    sif = work / f"{name}.sif"
    subprocess.run(["apptainer", "build", "-F", str(sif), str(root)], check=True, capture_output=True)
    shutil.rmtree(root)
    return sif


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--mb", type=int, default=100)
    args = parser.parse_args()
    why = registry_server.missing()
    if why:
        raise SystemExit(why)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="bench-registry-") as tmp, registry_server.running(Path(tmp)) as reg:
        work = Path(tmp)
        big = make_sif(work, "big", args.mb)
        base = make_sif(work, "base", 0)
        size = big.stat().st_size
        # A project (FROM a tiny local base) whose experiment the lock pins to the big image.
        proj = work / "proj"
        (proj / "experiments" / "big").mkdir(parents=True)
        (proj / "experiments" / "big" / "Dockerfile").write_text("FROM busybox:latest\n")
        (proj / "hpcexp.yaml").write_text(f"registry: {reg.url()}\nbases:\n  \"busybox:latest\": "
                                          f"{{sif: {json.dumps(str(base))}}}\n")
        from hpcexp.build import image, registry
        from hpcexp.core.config import host_arch, load_project

        project = load_project(proj)
        exp = project.experiment("big")
        arch = host_arch()
        h = image.prepare(project, exp, arch, write=False).input_hash
        ref = registry.Ref("oras", reg.host, "lab/big", tag=registry.image_tag(arch, h))
        subprocess.run(["apptainer", "push", str(big), ref.uri()], check=True, capture_output=True)
        manifest = registry.Client(reg.host).manifest(ref)
        from hpcexp.infra import hashing

        pin = registry.Pin(experiment="big", arch=arch, input_hash=h, sha256=hashing.sha256_file(big),
                           ref=ref.by_digest(manifest.digest).uri(), size=size, tag=ref.tag)
        registry.update_lock(project, lambda lk: lk.images.__setitem__(pin.key, pin))
        final = proj / "images" / f"big-{arch}-{h[:16]}.sif"

        def hpcexp_pull() -> tuple[float, float]:
            for p in (final, final.with_suffix(".json")):
                p.unlink(missing_ok=True)
            t = timed([sys.executable, "-m", "hpcexp", "pull", "-q", "big"], proj, env)
            assert hashing.sha256_file(final) == pin.sha256
            return t

        def apptainer_pull() -> tuple[float, float]:
            out = work / "plain.sif"
            out.unlink(missing_ok=True)
            return timed(["apptainer", "pull", "--disable-cache", str(out), pin.ref], work, env)

        layer = manifest.sif_layer()
        assert layer is not None

        def transfer_only() -> tuple[float, float]:
            """hpcexp's download path alone, in this process (no interpreter start-up): informative."""
            out = work / "inproc.sif"
            out.unlink(missing_ok=True)
            c0, t0 = time.process_time(), time.perf_counter()
            sha, _ = registry.Client(reg.host).fetch_blob("lab/big", str(layer["digest"]), out)
            assert sha == pin.sha256
            return time.perf_counter() - t0, time.process_time() - c0

        apptainer_pull()   # warm: page cache of the registry's blob, apptainer's own start-up
        hpcexp_pull()
        rows = []
        for i in range(args.rounds):
            order = [("apptainer", apptainer_pull), ("hpcexp", hpcexp_pull), ("transfer", transfer_only)]
            if i % 2:
                order.reverse()
            got = {name: fn() for name, fn in order}
            rows.append(got)
        ratios = [r["hpcexp"][0] / r["apptainer"][0] for r in rows]
        cpu_ratios = [r["hpcexp"][1] / r["apptainer"][1] for r in rows]
        med = statistics.median(ratios)
        load = os.getloadavg()[0]
        print(f"image {size / 1e6:.1f} MB, {args.rounds} interleaved rounds, load {load:.1f}, registry {reg.host}")
        print("round  apptainer pull  (cpu)    hpcexp pull  (cpu)    ratio   transfer only (cpu)")
        for i, (r, q) in enumerate(zip(rows, ratios), 1):
            print(f"{i:5d}  {r['apptainer'][0]:8.2f} s  ({r['apptainer'][1]:.2f} s)  "
                  f"{r['hpcexp'][0]:8.2f} s  ({r['hpcexp'][1]:.2f} s)  {q:5.2f}x  "
                  f"{r['transfer'][0]:8.2f} s  ({r['transfer'][1]:.2f} s)")
        print(f"median apptainer {statistics.median(r['apptainer'][0] for r in rows):.2f} s, "
              f"hpcexp {statistics.median(r['hpcexp'][0] for r in rows):.2f} s, "
              f"transfer only {statistics.median(r['transfer'][0] for r in rows):.2f} s")
        print(f"median of CPU-time ratios {statistics.median(cpu_ratios):.2f}x")
        print(f"median of wall-time ratios {med:.2f}x; target <= 1.2x -> {'PASS' if med <= 1.2 else 'FAIL'}")
        with urllib.request.urlopen(f"https://{reg.host}/v2/", timeout=5):  # still up: nothing crashed it
            pass


if __name__ == "__main__":
    main()
