"""How a run's container is launched: the same plan for the local and the Slurm executor.

:func:`plan` is pure: from an experiment, an image and a run folder it produces the
``apptainer`` argument list, the environment to inject into the container and the
mounts, so that ``hpcexp run`` and a Slurm job run the payload identically and the run
record can store the exact command.

What the payload sees
  - the experiment folder at ``exp.mount`` (default ``/experiment``), read-only unless
    ``writable``;
  - the run's own ``results/`` folder at ``<mount>/<artifacts>`` and, when the working
    directory differs from the mount, also at ``<workdir>/<artifacts>``, so code that
    writes ``results/...`` relative to its Dockerfile WORKDIR lands in this run's folder
    and concurrent runs never share results;
  - parameters as arguments ``--KEY=VALUE`` appended to the command (``params_as: args``)
    and/or environment variables ``HPCEXP_PARAM_KEY`` (``params_as: env``), plus
    ``HPCEXP_PARAMS`` (all of them as JSON), ``HPCEXP_RUN_ID``, ``HPCEXP_EXPERIMENT`` and
    ``HPCEXP_RESULTS``; values reach the payload byte for byte (no shell in between:
    ``--no-eval`` stops Apptainer from shell-evaluating the injected environment);
  - ``--containall`` (own PID/IPC namespaces, clean environment, no host $HOME) with the
    configured environment passed explicitly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from hpcexp.core.config import PARAM_RE, Experiment, Project
from hpcexp.core.layout import RunPaths
from hpcexp.errors import UsageError
from hpcexp.runtime import apptainer

# Without --no-eval Apptainer writes each APPTAINERENV_ value into a generated script as
# export KEY="VALUE" and sources it: `$(...)` in a parameter value would run inside the
# container and quotes break the script (checked with 1.4.5). With it, values are single
# quoted and arrive byte for byte (newlines included).
NO_EVAL = ("--no-eval",)

# Folders (and files) below $HOME that hold credentials: a bind of one, of anything inside
# one, or of a folder containing one (~/.config, $HOME and its parents) is refused unless
# --allow-bind, so a payload never sees keys it was not meant to.
CREDENTIAL_PATHS = (".ssh", ".gnupg", ".aws", ".azure", ".kube", ".docker", ".config/gcloud", ".config/gh",
                    ".config/hub", ".oci", ".password-store", ".local/share/keyrings", ".netrc", ".pgpass",
                    ".git-credentials", ".vault-token", ".terraform.d", ".config/rclone", ".s3cfg", ".boto")

SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/root", "/run", "/sbin", "/sys",
               "/usr", "/var")


@dataclass(frozen=True)
class LaunchPlan:
    """Everything needed to start one run's container."""

    argv: tuple[str, ...]                # apptainer run|exec ... IMAGE PAYLOAD...
    container_env: Mapping[str, str]     # injected as APPTAINERENV_* (see apptainer.payload_env)
    mounts: tuple[apptainer.Mount, ...]
    pwd: str
    payload: tuple[str, ...]             # what runs inside: runscript args, or the command

    def process_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of the apptainer process itself."""
        return apptainer.payload_env(self.argv[0], self.container_env, base)


def parse_params(items: Sequence[str]) -> dict[str, str]:
    """``-p KEY=VALUE`` options into a dict; the value is kept byte for byte."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"parameter {item!r} is not KEY=VALUE")
        if not PARAM_RE.match(key):
            raise UsageError(f"invalid parameter name {key!r}: letters, digits and _, not starting with a digit")
        if "\x00" in value:
            raise UsageError(f"parameter {key!r} holds a NUL byte, which no process argument can carry")
        out[key] = value
    return out


def canonical_bind_source(src: str, project: Project, *, allow_any: bool = False) -> str:
    """Resolve a bind's host path and refuse ones that expose too much.

    Refused unless ``allow_any``: ``/``, the user's home itself and its parents, any parent
    of the project, system directories, and credential folders (``~/.ssh``, ``~/.gnupg``,
    cloud credentials: :data:`CREDENTIAL_PATHS`), anything inside one or containing one.
    The path is canonicalised (symlinks resolved), so a link to
    ``/`` is caught too.
    """
    path = os.path.realpath(os.path.expanduser(src))
    if not os.path.exists(path):
        raise UsageError(f"bind source {src!r} does not exist")
    if allow_any:
        return path
    home = os.path.realpath(os.path.expanduser("~"))
    root = str(project.root)
    if path == "/" or path == home:
        raise UsageError(f"refusing to bind {src!r} (resolves to {path}): it exposes too much",
                         hint="bind a narrower folder, or allow it explicitly with --allow-bind")
    if root == path or root.startswith(path.rstrip("/") + "/"):
        if path != root:
            raise UsageError(f"refusing to bind {src!r} (resolves to {path}): it is a parent of the project",
                             hint="bind a narrower folder, or allow it explicitly with --allow-bind")
    if path in SYSTEM_DIRS:
        raise UsageError(f"refusing to bind system folder {path}", hint="allow it explicitly with --allow-bind")
    if home.startswith(path.rstrip("/") + "/"):
        raise UsageError(f"refusing to bind {src!r} (resolves to {path}): it is a parent of your home {home}",
                         hint="bind a narrower folder, or allow it explicitly with --allow-bind")
    for rel in CREDENTIAL_PATHS:
        cred = os.path.join(home, rel)
        if path == cred or path.startswith(cred + "/") or cred.startswith(path.rstrip("/") + "/"):
            what = "is" if path == cred else "is inside" if path.startswith(cred + "/") else "contains"
            raise UsageError(f"refusing to bind {src!r} (resolves to {path}): it {what} the credential folder "
                             f"~/{rel}", hint="bind a narrower folder, or allow it explicitly with --allow-bind")
    return path


def check_binds(project: Project, exp: Experiment, *, allow_binds: bool = False) -> None:
    """Every configured bind of ``exp`` checked as :func:`plan` will, before anything is
    built or written (so a refused bind costs no image build and leaves no run)."""
    for b in exp.binds:
        canonical_bind_source(b.src, project, allow_any=allow_binds)


def plan(project: Project, exp: Experiment, image: Path, run: RunPaths, *, run_id: str,
         params: Mapping[str, str] | None = None, args: Sequence[str] | None = None,
         image_workdir: str | None = None, image_cmd: Sequence[str] | None = None,
         image_entrypoint: Sequence[str] | None = None, gpu: bool | None = None, writable: bool | None = None,
         allow_binds: bool = False, program: str = "apptainer",
         extra_env: Mapping[str, str] | None = None) -> LaunchPlan:
    """Plan the container launch for one run. Pure, apart from resolving bind paths.

    Parameters as arguments follow Docker's rules (they are run arguments: appended to an
    ENTRYPOINT, replacing CMD), with one exception a researcher expects: an image with a
    CMD and no ENTRYPOINT (``CMD ["python", "train.py"]``), run with parameters and no
    other arguments, runs that CMD with ``--KEY=VALUE`` appended, rather than trying to
    execute ``--lr=0.1`` as the program.

    ``extra_env`` is environment a layer above the executors adds (tracking: the MLflow
    run the payload may log to); hpcexp's own ``HPCEXP_*`` variables always win.
    """
    merged = dict(exp.params)
    merged.update(params or {})
    for key in merged:
        if not PARAM_RE.match(key):
            raise UsageError(f"invalid parameter name {key!r}")

    mount = exp.mount
    workdir = exp.workdir or image_workdir or mount
    results_dst = f"{mount.rstrip('/')}/{exp.artifacts}"
    is_writable = exp.writable if writable is None else writable

    mounts: list[apptainer.Mount] = [
        apptainer.Mount(str(exp.path.resolve()), mount, readonly=not is_writable),
        apptainer.Mount(str(run.results), results_dst, readonly=False),
    ]
    wd_results = f"{workdir.rstrip('/')}/{exp.artifacts}"
    if workdir != mount and wd_results != results_dst:
        mounts.append(apptainer.Mount(str(run.results), wd_results, readonly=False))
    for b in exp.binds:
        mounts.append(apptainer.Mount(canonical_bind_source(b.src, project, allow_any=allow_binds), b.dst,
                                      readonly=b.mode != "rw"))

    env: dict[str, str] = dict(exp.env)
    env.update(extra_env or {})  # e.g. MLFLOW_TRACKING_URI/MLFLOW_RUN_ID from hpcexp.track
    env.update({
        "HPCEXP_RUN_ID": run_id,
        "HPCEXP_EXPERIMENT": exp.name,
        "HPCEXP_RESULTS": results_dst,
        "HPCEXP_PARAMS": json.dumps(merged, sort_keys=True, ensure_ascii=False),
    })
    if "env" in exp.params_as:
        for key, value in merged.items():
            env[f"HPCEXP_PARAM_{key}"] = value

    payload: list[str] = list(exp.command or ())
    payload += list(args) if args else list(exp.args)
    action = "exec" if exp.command else "run"
    params_as_args = "args" in exp.params_as and bool(merged)
    if params_as_args and not payload and image_cmd and not image_entrypoint:
        payload, action = list(image_cmd), "exec"  # CMD + parameters (see the docstring)
    if params_as_args:
        payload += [f"--{key}={value}" for key, value in merged.items()]

    argv = apptainer.action_argv(
        program, action, image, args=payload, mounts=mounts,
        containall=True, cleanenv=True, nv=exp.gpu if gpu is None else gpu, pwd=workdir,
        writable_tmpfs=True, extra=NO_EVAL,
    )
    return LaunchPlan(argv=tuple(argv), container_env=env, mounts=tuple(mounts), pwd=workdir,
                      payload=tuple(payload))


def ensure_mount_point(exp: Experiment) -> None:
    """Create the experiment folder's results/ (where the run's own results are bound) once,
    before any container starts.

    Apptainer creates a nested bind's mount point in the host folder itself when it is
    missing; array tasks starting at the same moment then race on that mkdir and the loser
    fails with "file exists" before its payload runs. An existing folder is left as it is;
    a folder hpcexp may not write is left to Apptainer, as before."""
    target = Path(exp.path) / exp.artifacts
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
