"""Fast synthetic run records for the scale benchmarks (bench/bench_scale.py).

Writes ``runs/EXP/RUN_ID/run.json`` (and a small ``stdout.log``) for N finished runs in
well under a minute for 100,000, the records shaped exactly as hpcexp writes them (one
template record, its ids and times changed), without fsync: a benchmark project, not data.

    python bench/synth_runs.py PROJECT_ROOT --runs 100000 [--experiments 10]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import secrets
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def synth(runs_dir: Path, n: int, *, experiments: int = 10, prefix: str = "old",
          start: _dt.datetime | None = None) -> list[tuple[str, str]]:
    """N finished runs spread over ``experiments`` experiments named PREFIX-K, one a
    millisecond apart, ending an hour before now. Returns [(experiment, run_id)]."""
    from hpcexp.core.runs import RunRecord

    start = start or (_dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(hours=1, milliseconds=n))
    tmpl = RunRecord(experiment="x", run_id="x", state="succeeded", executor="slurm", exit_code=0,
                     params={"lr": "0.1", "seed": "1"}, command=["apptainer", "run", "--containall", "img.sif"],
                     image="/images/x.sif", executor_ids={"job_id": "1", "base_attempt": 1},
                     resources={"time": "1", "mem": "10M"}).to_dict()
    out: list[tuple[str, str]] = []
    made: set[Path] = set()
    for i in range(n):
        t = start + _dt.timedelta(milliseconds=i)
        run_id = f"{t:%Y%m%d-%H%M%S}.{t.microsecond // 1000:03d}-{secrets.token_hex(3)}"
        exp = f"{prefix}-{i % experiments}"
        folder = runs_dir / exp
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        d = folder / run_id
        d.mkdir()
        iso = t.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        rec = dict(tmpl, experiment=exp, run_id=run_id, created_at=iso, started_at=iso, ended_at=iso,
                   executor_ids={"job_id": str(100000 + i), "base_attempt": 1})
        with open(d / "run.json", "w", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, indent=2, sort_keys=True) + "\n")
        with open(d / "stdout.log", "w", encoding="utf-8") as fh:
            fh.write(f"run {i}\n")
        out.append((exp, run_id))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--runs", type=int, default=100_000)
    ap.add_argument("--experiments", type=int, default=10)
    a = ap.parse_args()
    synth(a.root / "runs", a.runs, experiments=a.experiments)


if __name__ == "__main__":
    main()
