"""How to make a thousand new run records durable: the choice behind docs/records.md.

Writes N records (a sweep task's real record, about 2-3 KiB each) into fresh run folders
in a temporary project, in each of these ways, rounds interleaved, and prints the median
wall and CPU time of each:

  fsync-each     every run.json by temp, fsync, rename, fsync of the folder (8 threads)
                 (what a sweep did before, twice: before and after sbatch)
  table          one table of all N records published durably (one fsync of the file,
                 one of its folder), then each run.json by temp and rename, no fsync
                 (what a sweep does now, once)
  syncfs         each run.json by temp and rename, then one syncfs(2) of the file system
  nosync         each run.json by temp and rename, nothing made durable (the floor)

    python bench/bench_records.py [--records 1000] [--rounds 7] [--dir /path/on/the/fs/to/test]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    from hpcexp.core import runs
    from hpcexp.core.layout import RunPaths

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dir", type=Path, default=None)
    a = ap.parse_args()
    libc = ctypes.CDLL(None, use_errno=True)
    base = Path(tempfile.mkdtemp(prefix="hpcexp-bench-records-", dir=a.dir))
    env = {f"K{i}": "x" * 40 for i in range(12)}

    def batch(tag: str) -> list[tuple[RunPaths, runs.RunRecord]]:
        out = []
        folder = base / tag
        folder.mkdir()
        for i in range(a.records):
            d = folder / f"20261201-000000.{i:06d}"
            d.mkdir()
            rec = runs.RunRecord(experiment=tag, run_id=d.name, state="submitting", executor="slurm",
                                 params={"i": str(i)}, command=["apptainer", "run", "--containall"] + ["--bind"] * 10,
                                 sweep_id="sweep-x", task_index=i, executor_ids={"job_name": "j", "array_task_id": i})
            rec.extra = {"container_env": env}
            out.append((RunPaths(d), rec))
        return out

    def fsync_each(items):
        runs.write_records(items)

    def table(items):
        runs.create_records(base / f"table-{time.monotonic_ns()}.jsonl", items)

    def syncfs(items):
        for p, r in items:
            runs.replace_record_nosync(p, r)
        fd = os.open(base, os.O_RDONLY)
        try:
            libc.syncfs(fd)
        finally:
            os.close(fd)

    def nosync(items):
        for p, r in items:
            runs.replace_record_nosync(p, r)

    ways = {"fsync-each": fsync_each, "table": table, "syncfs": syncfs, "nosync": nosync}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in ways}
    try:
        for r in range(a.rounds):
            names = list(ways)
            names = names[r % len(names):] + names[:r % len(names)]
            for name in names:
                items = batch(f"{name}-{r}")
                c0, t0 = time.process_time(), time.perf_counter()
                ways[name](items)
                times[name].append((time.perf_counter() - t0, time.process_time() - c0))
                shutil.rmtree(base / f"{name}-{r}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{a.records} records, {a.rounds} rounds, on {base.parent} (load {os.getloadavg()[0]:.1f})")
    floor = statistics.median(w for w, _ in times["fsync-each"])
    for name, ts in times.items():
        w = statistics.median(x for x, _ in ts)
        c = statistics.median(x for _, x in ts)
        print(f"  {name:11s} wall {w * 1000:8.1f} ms  CPU {c * 1000:7.1f} ms  ({w / floor:.2f}x fsync-each)  "
              f"[{', '.join(f'{x * 1000:.0f}' for x, _ in ts)}]")


if __name__ == "__main__":
    main()
