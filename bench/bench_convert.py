"""Conversion speed: hpcexp's converter against spython's own parse+write, same files, one run.

    python bench/bench_convert.py [--rounds 5]

Takes 100 Dockerfiles (the golden cases and the ML fixtures of the test suite, cycled to
100), drops any that spython itself crashes on (so both sides convert the same set), then
times converting all of them with spython (DockerParser + SingularityWriter.convert) and
with ``hpcexp.convert.recipe.convert``, alternating, ``--rounds`` times. Prints the median of each
and the ratio. Target: ratio <= 1.5.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def corpus() -> list[tuple[Path, Path, dict]]:
    import json

    out = []
    for base in (REPO / "tests" / "golden" / "convert", REPO / "tests" / "fixtures" / "dockerfiles"):
        for d in sorted(base.iterdir()):
            if (d / "Dockerfile").is_file():
                ctx = d / "context" if (d / "context").is_dir() else d
                args = json.loads((d / "build-args.json").read_text()) if (d / "build-args.json").is_file() else {}
                out.append((d / "Dockerfile", ctx, args))
    return out


def spython_one(path: Path) -> str:
    from spython.main.parse.parsers import DockerParser
    from spython.main.parse.writers import SingularityWriter

    parser = DockerParser(str(path))
    return SingularityWriter(parser.recipe).convert()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("-n", type=int, default=100)
    opts = ap.parse_args()

    from spython.logger import bot

    from hpcexp.convert import recipe

    recipe._spython_mod()  # imports spython and silences its logger (same for both sides)
    bot.level = -10
    files = corpus()
    usable = []
    for path, ctx, args in files:
        try:
            spython_one(path)
        except (Exception, SystemExit):  # noqa: BLE001
            continue
        usable.append((path, ctx, args))
    skipped = len(files) - len(usable)
    work = [usable[i % len(usable)] for i in range(opts.n)]

    def one_round() -> tuple[float, float]:
        """Both converters on every file, interleaved file by file so that load from other
        processes on a shared machine hits both sides alike."""
        sp = hp = 0.0
        clock = time.process_time  # CPU time of this process: other jobs on a shared machine do not count
        for path, ctx, args in work:
            t0 = clock()
            spython_one(path)
            t1 = clock()
            recipe.convert(path, context=ctx, arch="amd64", build_args=args, source_label="Dockerfile")
            t2 = clock()
            sp += t1 - t0
            hp += t2 - t1
        return sp, hp

    one_round()  # warm caches (imports, page cache)
    sp, hp = [], []
    for _ in range(opts.rounds):
        gc.collect()
        a, b = one_round()
        sp.append(a)
        hp.append(b)
    s, h = statistics.median(sp), statistics.median(hp)
    print(f"files: {len(work)} conversions ({len(usable)} distinct Dockerfiles; "
          f"{skipped} left out because spython crashes on them)")
    print(f"spython parse+write: {s * 1000:.1f} ms  (median of {opts.rounds})")
    print(f"hpcexp convert:      {h * 1000:.1f} ms  (median of {opts.rounds})")
    print(f"ratio hpcexp/spython: {h / s:.2f}x  (target <= 1.5x)")


if __name__ == "__main__":
    main()
