"""Creating and starting a local run: its folder and ``created`` record, then its supervisor.

:func:`prepare_run` allocates ``runs/NAME/RUN_ID/`` and writes the ``created`` record with
the full argv and container environment before anything starts (invariant I1).
:func:`start_run` then supervises in this process (foreground) or starts the detached
supervisor, ``python -m hpcexp.execute.local RUN_DIR`` in a new session
(:func:`spawn_detached`), and waits until it has started the container.

Split from the supervisor: this side runs once in ``hpcexp run``, before the container;
the supervisor owns the record from the moment the container starts.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import hpcexp
from hpcexp.core import runs
from hpcexp.core.config import Experiment, Project
from hpcexp.core.layout import Layout, RunPaths
from hpcexp.errors import UsageError
from hpcexp.execute.local.supervisor import DEFAULT_GRACE, mark, supervise
from hpcexp.infra import host as hostinfo
from hpcexp.infra import process
from hpcexp.runtime import apptainer
from hpcexp.runtime.versions import known_version, version_cache


def _image_fields(image: Any) -> dict[str, Any]:
    """The provenance of an ImageInfo-like object (or a bare path)."""
    if isinstance(image, (str, os.PathLike)):
        return {"path": Path(image)}
    return {name: getattr(image, name, None)
            for name in ("path", "sha256", "input_hash", "recipe_sha256", "workdir", "apptainer_version",
                         "cmd", "entrypoint", "stopsignal", "source_ref")}


def prepare_run(project: Project, exp: Experiment, image: Any, *, params: Mapping[str, str] | None = None,
                args: Sequence[str] | None = None, arch: str | None = None, gpu: bool | None = None,
                writable: bool | None = None, allow_binds: bool = False, grace: float = DEFAULT_GRACE,
                cmdline: Sequence[str] | None = None,
                payload_env: Callable[[RunPaths], Mapping[str, str]] | None = None,
                service_images: Mapping[str, Path] | None = None,
                ) -> tuple[RunPaths, runs.RunRecord]:
    """Allocate the run folder and write its ``created`` record (before anything starts).

    ``service_images`` (service name -> SIF) are the images of ``exp.services``, which the
    supervisor starts before the payload (docs/services.md).

    ``payload_env(run_paths)`` may add environment for the container once the run id is
    known (tracking creates the payload's MLflow run there)."""
    from hpcexp.core.config import host_arch
    from hpcexp.runtime import launch

    info = _image_fields(image)
    if info.get("path") is None:
        raise UsageError("no image to run")
    program = _runtime_path()
    layout = Layout(project)
    run_paths = runs.allocate_run(layout, exp.name)
    run_id = run_paths.dir.name
    try:
        run_paths.results.mkdir()
        extra = dict(payload_env(run_paths)) if payload_env is not None else None
        the_plan = launch.plan(project, exp, Path(info["path"]), run_paths, run_id=run_id, params=params,
                               args=args, image_workdir=info.get("workdir"), image_cmd=info.get("cmd"),
                               image_entrypoint=info.get("entrypoint"), gpu=gpu, writable=writable,
                               allow_binds=allow_binds, program=program, extra_env=extra)
    except BaseException:
        # nothing was started: leave no half-made run behind
        import shutil

        shutil.rmtree(run_paths.dir, ignore_errors=True)
        raise
    merged = dict(exp.params)
    merged.update(params or {})
    commit, dirty = runs.git_state(project.root)
    rec = runs.RunRecord(
        experiment=exp.name, run_id=run_id, state="created", executor="local",
        arch=arch or host_arch(), params=merged, args=list(args or exp.args),
        command=list(the_plan.argv), image=str(info["path"]), image_sha256=info.get("sha256"),
        input_hash=info.get("input_hash"), recipe_sha256=info.get("recipe_sha256"),
        apptainer_version=known_version(program, project.cache_dir), git_commit=commit, git_dirty=dirty,
        executor_ids={"host": hostinfo.hostname(), "boot_id": hostinfo.boot_id(), "launcher_pid": os.getpid(),
                      "launcher_start": hostinfo.pid_start_ticks(os.getpid())},
    )
    container_env = dict(the_plan.container_env)
    if exp.checkpoint is not None:
        # the checkpoint contract of Slurm jobs, for `hpcexp stop --checkpoint`
        container_env.update(HPCEXP_CHECKPOINT_DIR=container_env["HPCEXP_RESULTS"] + "/checkpoint", HPCEXP_ATTEMPT="1")
        (run_paths.results / "checkpoint").mkdir(exist_ok=True)
    rec.extra = {"container_env": container_env, "grace": float(grace),
                 "stop_signal": info.get("stopsignal") or "SIGTERM",  # the Dockerfile's STOPSIGNAL
                 "hpcexp_argv": list(cmdline) if cmdline is not None else list(sys.argv),
                 "pwd": the_plan.pwd, "runtime": os.path.basename(program),
                 "version_cache": str(version_cache(project.cache_dir))}
    if info.get("source_ref"):
        rec.extra["image_ref"] = info["source_ref"]   # the registry digest the image was pulled/pushed as
    if exp.services:
        from hpcexp.execute.services import describe

        rec.extra["services"] = describe(exp, service_images or {}, run_id)
    if exp.checkpoint is not None:
        rec.extra["checkpoint"] = {"signal": exp.checkpoint.signal, "before": exp.checkpoint.before}
    runs.write_record(run_paths, rec)
    return run_paths, rec


def _runtime_path() -> str:
    """Where apptainer (or singularity) is. Its version is asked while the payload runs
    (see :func:`supervise`), so a run does not wait for ``apptainer --version`` first."""
    found = process.which("apptainer") or process.which("singularity")
    if found is None:
        apptainer.require()  # raises EnvironmentProblem with the fix
        raise AssertionError("unreachable")
    return found


def start_run(project: Project, exp: Experiment, image: Any, *, params: Mapping[str, str] | None = None,
              args: Sequence[str] | None = None, arch: str | None = None, gpu: bool | None = None,
              writable: bool | None = None, allow_binds: bool = False, detach: bool = False,
              grace: float = DEFAULT_GRACE, tee: bool = True, interactive: bool = True,
              cmdline: Sequence[str] | None = None,
              on_created: Callable[[RunPaths, runs.RunRecord], None] | None = None,
              payload_env: Callable[[RunPaths], Mapping[str, str]] | None = None,
              service_images: Mapping[str, Path] | None = None,
              ) -> tuple[RunPaths, runs.RunRecord]:
    """Run ``exp`` from ``image`` (an ImageInfo-like object with ``.path``, ``.sha256``...).

    Foreground: supervise here and return the final record (never raises for a payload
    failure: the caller decides what the state means). Detached: start the supervisor in
    a new session and return once it has started the container (state ``running``) or
    already finished.
    """
    run_paths, rec = prepare_run(project, exp, image, params=params, args=args, arch=arch, gpu=gpu,
                                 writable=writable, allow_binds=allow_binds, grace=grace, cmdline=cmdline,
                                 payload_env=payload_env, service_images=service_images)
    try:
        if on_created is not None:
            on_created(run_paths, rec)
        if not detach:
            return run_paths, supervise(run_paths, tee=tee, interactive=interactive)
        return run_paths, spawn_detached(run_paths)
    except BaseException as exc:
        # interrupted (or failed) before the container started: say so in the record
        with contextlib.suppress(Exception):
            current = runs.read_record(run_paths)
            if current.state == "created":
                if isinstance(exc, KeyboardInterrupt):
                    mark(run_paths, current, "cancelled", reason="interrupted before the container started")
                else:
                    mark(run_paths, current, "failed",
                          launch_error=f"hpcexp failed before the container started: {type(exc).__name__}: {exc}")
        raise


def spawn_detached(run_paths: RunPaths, *, wait: float = 60.0) -> runs.RunRecord:
    """Start ``python -m hpcexp.execute.local RUN_DIR`` in a new session; wait until it left ``created``."""
    env = apptainer.clean_env()
    pkg_root = str(Path(hpcexp.__file__).resolve().parents[1])  # the folder holding the hpcexp package
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = process.spawn(
        [sys.executable, "-m", "hpcexp.execute.local", str(run_paths.dir)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=str(run_paths.dir), env=env, start_new_session=True, close_fds=True,
    )
    deadline = time.monotonic() + wait
    while True:
        rec = runs.read_record(run_paths)
        if rec.state != "created":
            proc.returncode = 0  # do not reap later: it outlives us on purpose
            return rec
        code = proc.poll()
        if code is not None:
            rec = runs.read_record(run_paths)
            if rec.state != "created":
                return rec
            return mark(run_paths, rec, "failed",
                         launch_error=f"the run's supervisor exited with code {code} before starting the container")
        if time.monotonic() > deadline:
            return rec
        time.sleep(0.01)
