"""The project: hpcexp.yaml found, read and validated strictly at load into frozen dataclasses.

A project is a folder with ``hpcexp.yaml`` (found by walking up from the working
directory, as git finds ``.git``, or named with ``--project``/``HPCEXP_PROJECT``).
Experiments are discovered: every folder under ``experiments/`` holding a Dockerfile is
one, with nothing to declare. ``hpcexp.yaml`` adds to or overrides each of them.

Validation happens at load, all at once (:mod:`hpcexp.core.schema`): every problem (unknown key with a did-you-mean,
wrong type, bad name, control character, path escaping the project) is collected with
file, line and dotted key path, then raised as one ConfigError (exit code 2). A bad value
therefore fails at ``hpcexp list``, never halfway through a submission.

Three modules: :mod:`hpcexp.core.model` (the dataclasses and name rules),
:mod:`hpcexp.core.schema` (the validator) and this one (finding and loading the project),
which also re-exports the model and the key lists, so callers import from one place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hpcexp.core.model import (
    ARCHES,
    CONFIG_NAME,
    CONTROL_RE,
    DOCKERFILE_NAMES,
    ENV_RE,
    MEM_RE,
    NAME_RE,
    PARAM_RE,
    TIME_RE,
    BaseResolver,
    BaseSpec,
    Bind,
    Experiment,
    MlflowTracking,
    Project,
    RegistrySpec,
    SlurmResources,
    VerifyPolicy,
    check_name,
    discover_dockerfiles,
    host_arch,
    with_experiment,
)
from hpcexp.core.schema import (
    BASE_KEYS,
    BIND_KEYS,
    BUILD_KEYS,
    COMPONENT_RE,
    EXP_KEYS,
    LOOPBACK_HOSTS,
    MLFLOW_KEYS,
    REGISTRY_KEYS,
    REGISTRY_URL_RE,
    SLURM_KEYS,
    TOP_KEYS,
    TRACKING_KEYS,
    VERIFY_KEYS,
    _Validator,
)
from hpcexp.errors import ConfigError, NotFound
from hpcexp.infra.yamlload import load_yaml

# The model and the key lists, re-exported: callers import the project's names from here.
__all__ = [
    "ARCHES",
    "BASE_KEYS",
    "BIND_KEYS",
    "BUILD_KEYS",
    "BaseResolver",
    "BaseSpec",
    "Bind",
    "COMPONENT_RE",
    "CONFIG_NAME",
    "CONTROL_RE",
    "DOCKERFILE_NAMES",
    "ENV_RE",
    "EXP_KEYS",
    "Experiment",
    "LOOPBACK_HOSTS",
    "MEM_RE",
    "MLFLOW_KEYS",
    "MlflowTracking",
    "NAME_RE",
    "PARAM_RE",
    "Project",
    "REGISTRY_KEYS",
    "REGISTRY_URL_RE",
    "RegistrySpec",
    "SLURM_KEYS",
    "SlurmResources",
    "TIME_RE",
    "TOP_KEYS",
    "TRACKING_KEYS",
    "VERIFY_KEYS",
    "VerifyPolicy",
    "check_name",
    "discover_dockerfiles",
    "find_project_root",
    "host_arch",
    "load_project",
    "with_experiment",
]

# --------------------------------------------------------------------------------------
# Finding the project
# --------------------------------------------------------------------------------------

def find_project_root(start: Path | None = None, explicit: str | os.PathLike[str] | None = None) -> Path:
    """The project folder: ``explicit`` (--project / HPCEXP_PROJECT), else walk up to hpcexp.yaml."""
    if explicit:
        root = Path(explicit).expanduser()
        if not root.is_dir():
            raise NotFound(f"project folder {root} does not exist")
        return root.resolve()
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise NotFound(f"no {CONFIG_NAME} in {here} or any parent folder",
                   hint="run `hpcexp init` to create a project, or pass --project DIR")


def load_project(root: Path | str | None = None, *, explicit: str | os.PathLike[str] | None = None) -> Project:
    """Find and load a project; raise ConfigError listing every problem at once."""
    if root is None:
        root = find_project_root(explicit=explicit or os.environ.get("HPCEXP_PROJECT") or None)
    root = Path(root).resolve()
    cfg_path = root / CONFIG_NAME
    data: Any = {}
    lines: dict[str, int] = {}
    if cfg_path.exists():
        data, lines = load_yaml(cfg_path, label=CONFIG_NAME, inside=root)
        if data is None:
            data = {}
    v = _Validator(CONFIG_NAME, lines, root)
    project = v.project(data, cfg_path if cfg_path.exists() else None)
    if v.problems:
        raise ConfigError(v.problems, hint=f"fix {cfg_path}" if len(v.problems) > 1 else None)
    assert project is not None
    return project
