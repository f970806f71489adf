"""The one owner of hpcexp's on-disk layout.

Nothing else in hpcexp builds these paths by hand: recipes, reports, images, sidecars,
run folders and the files inside them are all named here, so that local runs, Slurm
runs, ``logs``, ``status`` and ``archive`` agree on where things live.

    recipes/NAME.ARCH.def              generated recipe (deterministic)
    recipes/NAME.ARCH.report.json      fidelity report of the conversion
    images/NAME-ARCH-HASH.sif          built image, HASH = first 16 hex of the input hash
    images/NAME-ARCH-HASH.json         provenance sidecar
    images/.locks/NAME-ARCH-HASH.lock  build lock (owner recorded inside)
    images/.logs/NAME-ARCH-HASH.log    full build log of the last build attempt
    images/.inputs/NAME-ARCH-HASH.json what the image was built from (checked by a cached run)
    hpcexp.lock                        images pinned by registry digest (hpcexp push), registry bases
    runs/NAME/RUN_ID/run.json          run record
    runs/NAME/RUN_ID/stdout.log        payload stdout   (Slurm: one pair per attempt, see RunPaths)
    runs/NAME/RUN_ID/stderr.log        payload stderr
    runs/NAME/RUN_ID/job.sbatch        rendered job script (Slurm runs)
    runs/NAME/RUN_ID/results/          the run's own artifacts folder
    runs/NAME/RUN_ID/stop.json         stop request (local runs: who, when, grace)
    runs/.sweeps/SWEEP_ID.json         sweep record (Slurm job arrays)
    runs/NAME/RUN_ID/tracking.mlflow.json  what was exported to MLflow (hpcexp.track)
    runs/NAME/RUN_ID/remote/call.sock  an instance session's socket (folder 0700, socket 0600)
    runs/NAME/RUN_ID/instance.log      Apptainer's own log of that session's instance
    runs/.sweeps/SWEEP_ID/             array job scripts, Slurm's slurm-%A_%a.out files
    runs/.sweeps/SWEEP_ID/array-K.records.jsonl  the part's task records as first written (fsynced once)
    runs/.tracking/                    background exporter's lock and log
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hpcexp.core.config import Project


@dataclass(frozen=True)
class RunPaths:
    """Every file of one run folder."""

    dir: Path

    @property
    def record(self) -> Path:
        return self.dir / "run.json"

    @property
    def stdout(self) -> Path:
        return self.dir / "stdout.log"

    @property
    def stderr(self) -> Path:
        return self.dir / "stderr.log"

    @property
    def script(self) -> Path:
        return self.dir / "job.sbatch"

    @property
    def results(self) -> Path:
        return self.dir / "results"

    @property
    def events(self) -> Path:
        """One JSON file per state change written by the job itself (append-only history)."""
        return self.dir / "events"

    @property
    def supervisor_log(self) -> Path:
        """What the detached supervisor could not put in the record (its own failures)."""
        return self.dir / "supervisor.log"

    @property
    def stop_request(self) -> Path:
        """Written by ``hpcexp stop`` (who, when, grace) before it signals the run's supervisor."""
        return self.dir / "stop.json"

    def tracking_state(self, tracker: str) -> Path:
        """What was exported to a tracking server (``tracking.mlflow.json``); see hpcexp.track."""
        return self.dir / f"tracking.{tracker}.json"

    def tracking_lock(self, tracker: str) -> Path:
        return self.dir / f".tracking.{tracker}.lock"

    @property
    def remote_dir(self) -> Path:
        """An instance session's private folder (0700), bound into the container: its socket."""
        return self.dir / "remote"

    @property
    def remote_socket(self) -> Path:
        """The unix socket the in-container server listens on (0600)."""
        return self.remote_dir / "call.sock"

    @property
    def instance_log(self) -> Path:
        """What Apptainer logged of an instance session's instance, collected when it stopped."""
        return self.dir / "instance.log"

    def attempt_stdout(self, attempt: int) -> Path:
        """stdout of Slurm attempt N (N >= 2 after a requeue); attempt 1 is stdout.log."""
        return self.stdout if attempt <= 1 else self.dir / f"stdout.{attempt}.log"

    def attempt_stderr(self, attempt: int) -> Path:
        return self.stderr if attempt <= 1 else self.dir / f"stderr.{attempt}.log"

    @property
    def services(self) -> Path:
        """The logs of the services beside the run (docs/services.md)."""
        return self.dir / "services"

    def service_log(self, service: str, stream: str) -> Path:
        """``services/NAME.out`` or ``services/NAME.err`` (``stream``: out or err)."""
        return self.services / f"{service}.{stream}"


def port_reservations(uid: int) -> Path:
    """Where this user's runs reserve the TCP ports of their services on this machine
    (``PORT/`` folders made by exclusive mkdir; the Slurm job script uses the same path).
    Not below TMPDIR: Slurm may give each job its own."""
    return Path("/tmp") / f"hpcexp-ports-{int(uid)}"


@dataclass(frozen=True)
class Layout:
    """Paths of one project."""

    project: Project

    def recipe(self, name: str, arch: str) -> Path:
        return self.project.recipes_dir / f"{name}.{arch}.def"

    def report(self, name: str, arch: str) -> Path:
        return self.project.recipes_dir / f"{name}.{arch}.report.json"

    def image(self, name: str, arch: str, input_hash: str) -> Path:
        return self.project.images_dir / f"{name}-{arch}-{input_hash[:16]}.sif"

    def image_sidecar(self, image: Path) -> Path:
        return image.with_suffix(".json")

    def build_lock(self, image: Path) -> Path:
        return image.parent / ".locks" / (image.stem + ".lock")

    def build_log(self, image: Path) -> Path:
        return image.parent / ".logs" / (image.stem + ".log")

    def image_inputs_dir(self) -> Path:
        """Where each image's input record lives (``hpcexp.build.inputs``)."""
        return self.project.images_dir / ".inputs"

    def image_inputs(self, image: Path) -> Path:
        """What the image was built from, so a cached run checks it without converting."""
        return image.parent / ".inputs" / (image.stem + ".json")

    def lock_file(self) -> Path:
        """hpcexp.lock: images (and registry bases) pinned by digest; committed like a package lock."""
        return self.project.root / "hpcexp.lock"

    def stat_cache(self) -> Path:
        """Hash cache keyed by (path, size, mtime_ns, inode), as git's index."""
        return self.project.images_dir / ".hash-cache.json"

    def experiment_runs(self, name: str) -> Path:
        return self.project.runs_dir / name

    def run(self, name: str, run_id: str) -> RunPaths:
        return RunPaths(self.project.runs_dir / name / run_id)

    def sweeps_dir(self) -> Path:
        return self.project.runs_dir / ".sweeps"

    def sweep(self, sweep_id: str) -> Path:
        return self.sweeps_dir() / f"{sweep_id}.json"

    def sweep_dir(self, sweep_id: str) -> Path:
        """runs/.sweeps/SWEEP_ID/: the array job scripts and Slurm's own per-task output files."""
        return self.sweeps_dir() / sweep_id

    def sweep_table(self, sweep_id: str, part: int) -> Path:
        """The records of array part K as written before its ``sbatch``, one JSON object a
        line, fsynced once: the durable copy from which a lost ``run.json`` is made again
        (docs/records.md)."""
        return self.sweep_dir(sweep_id) / f"array-{part}.records.jsonl"

    def sweep_tracking_state(self, sweep_id: str, tracker: str) -> Path:
        """The sweep's parent run at a tracking server (``runs/.sweeps/SWEEP_ID/tracking.mlflow.json``)."""
        return self.sweep_dir(sweep_id) / f"tracking.{tracker}.json"

    def tracking_dir(self) -> Path:
        """runs/.tracking/: the background exporter's lock and log."""
        return self.project.runs_dir / ".tracking"

    def slurm_template(self, name: str | None) -> Path:
        """slurm/NAME.sbatch if it exists, else slurm/default.sbatch."""
        if name:
            specific = self.project.slurm_dir / f"{name}.sbatch"
            if specific.is_file():
                return specific
        return self.project.slurm_dir / "default.sbatch"
