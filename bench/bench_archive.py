"""Speed and memory of `hpcexp archive` against `tar czf` and `zip -qr` on the same tree.

Target (issue 7): archiving ~2 GiB of mixed results (100,000 small files plus a few large
ones) as tar.gz within 1.2x of `tar czf` and as zip within 1.2x of `zip -qr`, with a peak
RSS of at most 100 MiB. Both sides are measured here, in the same run, on the same run
folder (page cache warm for both: the tree is read once before the first measurement).

hpcexp does more work than the baselines (it reads every file twice: once to hash it for
the manifest that comes first, once to write it, re-hashing to catch changes), so the
ratio includes the price of MANIFEST.json.

Usage: python bench/bench_archive.py [--small 100000] [--large-mib 1840] [--repeat 1] [--keep DIR]
Not part of the test suite; takes a few minutes.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_tree(root: Path, small: int, large_mib: int) -> tuple[Path, str, int]:
    """A project with one run whose results hold `small` small files and 4 large ones."""
    from hpcexp.core import runs
    from hpcexp.core.config import host_arch, load_project
    from hpcexp.core.layout import Layout

    (root / "experiments" / "bench").mkdir(parents=True)
    (root / "hpcexp.yaml").write_text("")
    (root / "experiments" / "bench" / "Dockerfile").write_text("FROM busybox:latest\nCMD true\n")
    (root / "recipes").mkdir()
    (root / "recipes" / f"bench.{host_arch()}.def").write_text("Bootstrap: localimage\nFrom: busybox.sif\n")
    layout = Layout(load_project(root))
    paths = runs.allocate_run(layout, "bench")
    runs.write_record(paths, runs.RunRecord(experiment="bench", run_id=paths.dir.name, state="succeeded",
                                            arch=host_arch(), image_sha256="0" * 64))
    paths.stdout.write_text("bench\n")
    paths.stderr.write_text("")
    rng = random.Random(7)
    # text-like material (compressible, like CSV/log results) and random bytes (like model weights)
    words = [f"{w}" for w in ("loss", "acc", "epoch", "step", "lr", "seed", "val", "train", "0.", "1e-")]
    lines = []
    size = 0
    while size < 8 << 20:
        line = ",".join(f"{rng.choice(words)}{rng.random():.6f}" for _ in range(8)) + "\n"
        lines.append(line)
        size += len(line)
    text = "".join(lines).encode()
    total = 0
    res = paths.results
    for i in range(small):
        d = res / f"shard{i // 1000:03d}"
        if i % 1000 == 0:
            d.mkdir(parents=True)
        n = rng.randint(200, 3800)
        off = rng.randrange(0, len(text) - n)
        (d / f"metrics-{i:06d}.csv").write_bytes(text[off:off + n])
        total += n
    big = res / "large"
    big.mkdir()
    per = (large_mib << 20) // 4
    for j in range(4):
        with open(big / f"part{j}.bin", "wb") as fh:
            left = per
            while left:
                n = min(left, 8 << 20)
                # half the large files are incompressible, half are text
                fh.write(os.urandom(n) if j % 2 == 0 else text[:n])
                left -= n
        total += per
    return root, paths.dir.name, total


def measure(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (KiB) of one child process.

    The peak and the CPU time come from /usr/bin/time (%M, %U, %S): a child's ru_maxrss as
    seen by this Python process would include the memory it inherited before exec. CPU
    time is what to compare on a loaded machine, where wall time depends on the neighbours.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        t0 = time.monotonic()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", rss.name, *argv], cwd=cwd, env=env,
                              stdout=subprocess.DEVNULL)
        elapsed = time.monotonic() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{argv[:4]} failed with exit code {proc.returncode}")
        peak, user, system = rss.read().strip().splitlines()[-1].split()
        return elapsed, float(user) + float(system), int(peak)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", type=int, default=100_000)
    ap.add_argument("--large-mib", type=int, default=1840)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--keep", type=Path, default=None, help="build the tree here and keep it")
    args = ap.parse_args()
    for tool in ("tar", "zip", "/usr/bin/time"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")

    tmp = Path(tempfile.mkdtemp(prefix="hpcexp-bench-archive-"))
    try:
        t0 = time.monotonic()
        root, run_id, total = make_tree(args.keep or tmp / "proj", args.small, args.large_mib)
        print(f"tree: {args.small} small files + 4 large, {total / 2**30:.2f} GiB, "
              f"made in {time.monotonic() - t0:.0f} s")
        exp_dir = root / "runs" / "bench"
        out = tmp / "out"
        out.mkdir()
        # warm the page cache for everyone
        subprocess.run(["tar", "cf", "/dev/null", "-C", str(exp_dir), run_id], check=True)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("HPCEXP_PROJECT", None)
        hpcexp = [sys.executable, "-m", "hpcexp"]
        cases = {
            "tar czf": ["tar", "czf", str(out / "base.tar.gz"), "-C", str(exp_dir), run_id],
            "hpcexp tar.gz": [*hpcexp, "archive", run_id, "-o", str(out / "h.tar.gz"), "--force"],
            "zip -qr": ["zip", "-qr", str(out / "base.zip"), run_id],
            "hpcexp zip": [*hpcexp, "archive", run_id, "-o", str(out / "h.zip"), "--force"],
        }
        best: dict[str, tuple[float, float, int]] = {}
        for _ in range(args.repeat):
            for name, argv in cases.items():
                if name == "zip -qr":
                    (out / "base.zip").unlink(missing_ok=True)  # zip -r would update, not rewrite
                cwd = exp_dir if name == "zip -qr" else root
                secs, cpu, rss = measure(argv, cwd, env if name.startswith("hpcexp") else None)
                print(f"  {name:14s} {secs:7.1f} s  CPU {cpu:7.1f} s  peak RSS {rss / 1024:6.1f} MiB")
                prev = best.get(name)
                best[name] = (min(secs, prev[0]) if prev else secs, min(cpu, prev[1]) if prev else cpu,
                              max(rss, prev[2]) if prev else rss)
        sizes = {p.name: p.stat().st_size for p in out.iterdir()}
        verify = measure([*hpcexp, "archive", "--verify", str(out / "h.tar.gz")], root, env)
        print()
        def ratio(ours: str, base: str) -> str:
            return (f"wall {best[ours][0] / best[base][0]:.2f}, CPU {best[ours][1] / max(best[base][1], 0.01):.2f}"
                    "  (target <= 1.2)")

        print(f"tar.gz ratio (hpcexp / tar czf): {ratio('hpcexp tar.gz', 'tar czf')}  "
              f"sizes {sizes['h.tar.gz'] / 2**20:.0f} / {sizes['base.tar.gz'] / 2**20:.0f} MiB")
        print(f"zip ratio    (hpcexp / zip -qr): {ratio('hpcexp zip', 'zip -qr')}  "
              f"sizes {sizes['h.zip'] / 2**20:.0f} / {sizes['base.zip'] / 2**20:.0f} MiB")
        peak = max(best["hpcexp tar.gz"][2], best["hpcexp zip"][2])
        print(f"hpcexp peak RSS: {peak / 1024:.1f} MiB (target <= 100)")
        print(f"verify of the tar.gz: {verify[0]:.1f} s, CPU {verify[1]:.1f} s, peak RSS {verify[2] / 1024:.1f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
