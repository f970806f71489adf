"""The project: hpcexp.yaml, validated strictly at load into frozen dataclasses.

A project is a folder with ``hpcexp.yaml`` (found by walking up from the working
directory, as git finds ``.git``, or named with ``--project``/``HPCEXP_PROJECT``).
Experiments are discovered: every folder under ``experiments/`` holding a Dockerfile is
one, with nothing to declare. ``hpcexp.yaml`` adds to or overrides each of them.

Validation happens here, all at once: every problem (unknown key with a did-you-mean,
wrong type, bad name, control character, path escaping the project) is collected with
file, line and dotted key path, then raised as one ConfigError (exit code 2). A bad value
therefore fails at ``hpcexp list``, never halfway through a submission.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from hpcexp.errors import ConfigError, NotFound, UsageError, shown
from hpcexp.infra.yamlload import load_yaml

CONFIG_NAME = "hpcexp.yaml"
ARCHES = ("amd64", "arm64")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PARAM_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
TIME_RE = re.compile(r"^(\d+-\d{1,2}(:\d{1,2}){0,2}|\d+(:\d{1,2}){0,2})$")
MEM_RE = re.compile(r"^\d+[KMGT]?$")
CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

# Dockerfile names recognised per architecture, in order of preference.
DOCKERFILE_NAMES: dict[str, tuple[str, ...]] = {
    "amd64": ("Dockerfile", "Containerfile", "Dockerfile.amd64", "Dockerfile.x86_64",
              "Dockerfile-amd64", "Dockerfile-x86_64"),
    "arm64": ("Dockerfile.arm64", "Dockerfile.aarch64", "Dockerfile-arm64", "Dockerfile-aarch64",
              "Containerfile.arm64", "Containerfile.aarch64"),
}


def host_arch() -> str:
    """This machine's architecture in Docker's spelling (amd64 or arm64)."""
    machine = os.uname().machine.lower()  # not platform.machine(): importing platform costs startup time
    if machine in ("aarch64", "arm64", "armv8l"):
        return "arm64"
    return "amd64"


def check_name(value: str, what: str = "name") -> str:
    """Validate a user-supplied name (experiment, run, sweep) against the one rule for names."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise UsageError(f"invalid {what} {shown(value)}: must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}} "
                         "(letters, digits, '.', '_', '-'; no '/', no leading '.' or '-')")
    return value


# --------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BaseSpec:
    """Where a Dockerfile ``FROM`` reference really comes from (offline or mirrored bases).

    kind is one of:
      ``sif``         a local SIF file (``Bootstrap: localimage``);
      ``image``       a URI Apptainer can bootstrap from (``docker://mirror/...``, ``oras://...``);
      ``debootstrap`` a Debian/Ubuntu base that hpcexp builds itself from a package mirror.
    """

    ref: str
    kind: str
    sif: Path | None = None
    image: str | None = None
    suite: str | None = None
    mirror: str | None = None
    include: tuple[str, ...] = ()
    components: tuple[str, ...] = ("main",)
    contract: str | None = None      # "python": a stand-in keeping the python:* image's contract


@dataclass(frozen=True)
class SlurmResources:
    """Slurm resources; ``None`` means "not set here" so layers can be merged."""

    partition: str | None = None
    time: str | None = None
    cpus: int | None = None
    mem: str | None = None
    gpus: str | None = None
    account: str | None = None
    qos: str | None = None
    max_parallel: int | None = None
    sbatch_args: tuple[str, ...] = ()
    template: str | None = None

    def merged(self, over: "SlurmResources") -> "SlurmResources":
        """These resources overridden by every field ``over`` sets (sbatch_args are appended)."""
        values = {}
        for f in self.__dataclass_fields__:
            if f == "sbatch_args":
                continue
            mine, theirs = getattr(self, f), getattr(over, f)
            values[f] = theirs if theirs is not None else mine
        return SlurmResources(sbatch_args=self.sbatch_args + over.sbatch_args, **values)


@dataclass(frozen=True)
class MlflowTracking:
    """Where runs are exported: ``tracking: {mlflow: {...}}`` (see docs/tracking.md).

    ``uri`` never holds credentials (MLflow's own MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN
    environment variables do). ``experiment`` defaults to the hpcexp experiment's name.
    ``reachable_from_nodes``: ``auto`` lets each Slurm job check at its start whether the
    server answers before giving the payload MLFLOW_TRACKING_URI/MLFLOW_RUN_ID; ``false``
    never gives them to Slurm jobs (offline compute nodes); ``true`` skips the check.
    """

    uri: str
    experiment: str | None = None
    reachable_from_nodes: str = "auto"
    artifacts: bool = True
    max_artifact_mb: float = 100.0


@dataclass(frozen=True)
class RegistrySpec:
    """Where ``hpcexp push`` puts images (``registry:``): an ``oras://HOST[:PORT]/NAMESPACE`` URL.

    ``insecure`` means plain HTTP (Apptainer's ``--no-https``); it is accepted for loopback
    hosts only. Credentials are never part of it (Apptainer's registry login or the
    environment provide them).
    """

    url: str
    host: str
    namespace: str
    insecure: bool = False


@dataclass(frozen=True)
class VerifyPolicy:
    """``verify:``: what a pulled image's signature must show before it is published or run.

    mode: ``off`` (no check), ``warn`` (check, warn on failure), ``require`` (refuse).
    keys: allowed PGP fingerprints (40 hex, from Apptainer's keyring); key_files: PEM
    public keys (``apptainer verify --key``). ``require`` needs at least one of them.
    """

    mode: str = "off"
    keys: tuple[str, ...] = ()
    key_files: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Bind:
    """An extra bind: host path (absolute, as configured), container path, ro or rw."""

    src: str
    dst: str
    mode: str = "ro"


@dataclass(frozen=True)
class Experiment:
    """One experiment: its folder, Dockerfiles, and everything hpcexp.yaml says of it."""

    name: str
    path: Path
    dockerfiles: Mapping[str, Path]
    declared: bool = False
    ref: str | None = None
    code: str | None = None
    description: str | None = None
    command: tuple[str, ...] | None = None
    args: tuple[str, ...] = ()
    artifacts: str = "results"
    mount: str = "/experiment"
    workdir: str | None = None
    writable: bool = False
    gpu: bool = False
    binds: tuple[Bind, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    params_as: tuple[str, ...] = ("args", "env")
    build_args: Mapping[str, str] = field(default_factory=dict)
    bases: Mapping[str, BaseSpec] = field(default_factory=dict)
    slurm: SlurmResources = field(default_factory=SlurmResources)
    tracking: MlflowTracking | None = None
    root: Path | None = None            # the project root its files must resolve inside
    allow_outside: bool = False         # allow_outside_project: true in hpcexp.yaml

    def outside_problem(self) -> str | None:
        """Why this experiment's folder may not be used: it resolves outside the project
        (a symlink or a `path:` leading out) and hpcexp.yaml does not allow that."""
        if self.root is None or self.allow_outside:
            return None
        real = os.path.realpath(self.path)
        if _inside(real, os.path.realpath(self.root)):
            return None
        return (f"experiment {self.name!r}: folder {self.path} resolves to {real}, outside the project "
                f"{self.root}; refusing to use it")

    def check_inside(self) -> None:
        """Raise UsageError (exit 2) when :meth:`outside_problem` finds one."""
        problem = self.outside_problem()
        if problem:
            raise UsageError(problem, hint=f"set `allow_outside_project: true` under experiments.{self.name} in "
                                           "hpcexp.yaml if that folder is meant to be used")

    def trusted_root(self) -> str | None:
        """The folder every file of this experiment (its Dockerfile) must resolve inside."""
        if self.root is None:
            return None
        return os.path.realpath(self.path if self.allow_outside else self.root)

    def dockerfile(self, arch: str) -> Path:
        """The Dockerfile for ``arch``, or a NotFound that lists what exists and how to choose."""
        if arch not in ARCHES:
            raise UsageError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHES)}")
        found = self.dockerfiles.get(arch)
        if found is not None:
            self.check_inside()
            trusted = self.trusted_root()
            if trusted is not None:
                real = os.path.realpath(found)
                if not _inside(real, trusted):
                    raise UsageError(f"Dockerfile {found} leads outside the project (to {real}); "
                                     "refusing to read it", hint="copy the file into the project instead of linking it")
            return found
        have = ", ".join(f"{p.name} ({a})" for a, p in sorted(self.dockerfiles.items())) or "none"
        other = [a for a in ARCHES if a in self.dockerfiles]
        hint = (f"use --arch {other[0]}, or add {DOCKERFILE_NAMES[arch][0]}" if other
                else f"add {DOCKERFILE_NAMES[arch][0]} to {self.path}")
        raise NotFound(f"experiment {self.name!r} has no Dockerfile for {arch} in {self.path} "
                       f"(found: {have})", hint=hint)


@dataclass(frozen=True)
class Project:
    """A loaded, validated project."""

    root: Path
    config_file: Path | None
    experiments_dir: Path
    recipes_dir: Path
    images_dir: Path
    runs_dir: Path
    slurm_dir: Path
    cache_dir: Path
    experiments: Mapping[str, Experiment]
    bases: Mapping[str, BaseSpec] = field(default_factory=dict)
    slurm: SlurmResources = field(default_factory=SlurmResources)
    env: Mapping[str, str] = field(default_factory=dict)
    build_args: Mapping[str, str] = field(default_factory=dict)
    debian_mirror: str | None = None
    stand_ins: bool = True      # build: unmapped python:*/debian:* FROM -> a stand-in built here
    host_network: bool = True   # build: the host's CA bundle and proxy settings reach RUN steps
    tracking: MlflowTracking | None = None
    registry: RegistrySpec | None = None
    verify: VerifyPolicy = field(default_factory=VerifyPolicy)

    def experiment(self, name: str) -> Experiment:
        """The experiment called ``name``, or NotFound with a did-you-mean; UsageError when its
        folder leads outside the project without ``allow_outside_project``."""
        check_name(name, "experiment name")
        try:
            exp = self.experiments[name]
            exp.check_inside()
            return exp
        except KeyError:
            close = _close_matches(name, list(self.experiments), n=1)
            hint = f"did you mean {close[0]!r}?" if close else (
                f"known experiments: {', '.join(sorted(self.experiments)) or 'none'}")
            raise NotFound(f"no experiment {name!r} in {self.root}", hint=hint) from None

    def select(self, names: Sequence[str], all_: bool) -> list[Experiment]:
        """Experiments named on the command line, or all of them with --all."""
        if all_ and names:
            raise UsageError("give experiment names or --all, not both")
        if all_:
            return [self.experiments[n] for n in sorted(self.experiments)]
        if not names:
            raise UsageError("name at least one experiment, or use --all",
                             hint=f"experiments here: {', '.join(sorted(self.experiments)) or 'none'}")
        return [self.experiment(n) for n in names]


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


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------

TOP_KEYS = ("images", "runs", "recipes", "experiments_dir", "cache", "slurm_dir", "bases", "slurm",
            "env", "build_args", "debian_mirror", "build", "experiments", "tracking",
            "registry", "verify")
EXP_KEYS = ("name", "path", "allow_outside_project", "ref", "code", "description", "dockerfile", "command",
            "entrypoint", "args", "artifacts", "artifacts_path", "mount", "workdir", "writable", "gpu", "binds",
            "env", "params", "params_as", "build_args", "bases", "slurm", "tracking")
SLURM_KEYS = ("partition", "time", "cpus", "mem", "gpus", "account", "qos", "max_parallel", "sbatch_args",
              "template")
#: a Debian archive component (main, contrib, non-free, non-free-firmware, universe...)
COMPONENT_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")
BUILD_KEYS = ("stand_ins", "host_network")
BASE_KEYS = ("sif", "image", "debootstrap", "mirror", "include", "components")
BIND_KEYS = ("src", "dst", "mode")
TRACKING_KEYS = ("mlflow",)
MLFLOW_KEYS = ("uri", "experiment", "reachable_from_nodes", "artifacts", "max_artifact_mb")
REGISTRY_KEYS = ("url", "insecure")
VERIFY_KEYS = ("mode", "keys", "key_files")
REGISTRY_URL_RE = re.compile(r"^oras://(?P<host>[A-Za-z0-9.-]+(:\d{1,5})?|\[[0-9A-Fa-f:]+\](:\d{1,5})?)"
                             r"/(?P<ns>[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*)/?$")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class _Validator:
    def __init__(self, label: str, lines: Mapping[str, int], root: Path) -> None:
        self.label = label
        self.lines = lines
        self.root = root
        self.problems: list[str] = []

    # -- reporting --------------------------------------------------------------------
    def err(self, path: str, msg: str) -> None:
        line = self.lines.get(path)
        where = f"{self.label}:{line}" if line else self.label
        self.problems.append(f"{where}: {path or '(top level)'}: {msg}")

    def keys(self, path: str, value: Mapping[Any, Any], allowed: Sequence[str]) -> None:
        for key in value:
            if not isinstance(key, str):
                self.err(path, f"key {key!r} must be a string")
            elif key not in allowed:
                close = _close_matches(key, allowed, n=1, cutoff=0.6)
                suggestion = f" (did you mean {close[0]!r}?)" if close else \
                    f" (allowed: {', '.join(allowed)})"
                self.err(f"{path}.{key}" if path else key, f"unknown key {key!r}{suggestion}")

    # -- scalar types -----------------------------------------------------------------
    def mapping(self, path: str, value: Any) -> dict[Any, Any] | None:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.err(path, f"must be a mapping, got {_typename(value)} {_show(value)}")
            return None
        return value

    def string(self, path: str, value: Any, *, allow_control: bool = False,
               pattern: re.Pattern[str] | None = None, rule: str = "") -> str | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            self.err(path, f"must be a string, got {_typename(value)} {_show(value)}")
            return None
        text = str(value)
        if not allow_control and CONTROL_RE.search(text):
            self.err(path, f"control characters are not allowed: {_show(text)}")
            return None
        if "\x00" in text:
            self.err(path, f"NUL bytes are not allowed: {_show(text)}")
            return None
        if pattern is not None and not pattern.match(text):
            self.err(path, f"invalid value {_show(text)}{': ' + rule if rule else ''}")
            return None
        return text

    def integer(self, path: str, value: Any, lo: int, hi: int) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.err(path, f"must be a whole number from {lo} to {hi}, got {_show(value)}")
            return None
        if not lo <= value <= hi:
            self.err(path, f"must be from {lo} to {hi}, got {value}")
            return None
        return value

    def boolean(self, path: str, value: Any, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.err(path, f"must be true or false, got {_show(value)}")
            return default
        return value

    def str_list(self, path: str, value: Any, *, split: bool = False,
                 allow_control: bool = False) -> tuple[str, ...] | None:
        if value is None:
            return None
        if isinstance(value, str) and split:
            try:
                return tuple(shlex.split(value))
            except ValueError as exc:
                self.err(path, f"cannot split {_show(value)} into words: {exc}")
                return None
        if not isinstance(value, list):
            self.err(path, f"must be a list of strings, got {_typename(value)} {_show(value)}")
            return None
        out = []
        for i, item in enumerate(value):
            s = self.string(f"{path}[{i}]", item, allow_control=allow_control)
            if s is not None:
                out.append(s)
        return tuple(out)

    def str_map(self, path: str, value: Any, *, key_re: re.Pattern[str], key_rule: str,
                allow_control: bool) -> dict[str, str]:
        m = self.mapping(path, value)
        out: dict[str, str] = {}
        for k, v in (m or {}).items():
            kp = f"{path}.{k}"
            if not isinstance(k, str) or not key_re.match(k):
                self.err(kp, f"invalid name {_show(k)}: {key_rule}")
                continue
            if isinstance(v, (dict, list)) or v is None:
                self.err(kp, f"must be a string or number, got {_typename(v)}")
                continue
            s = self.string(kp, _scalar_text(v), allow_control=allow_control)
            if s is not None:
                out[k] = s
        return out

    def path_in_project(self, path: str, value: Any, *, allow_absolute: bool) -> Path | None:
        s = self.string(path, value)
        if s is None:
            return None
        expanded = os.path.expanduser(os.path.expandvars(s))
        p = Path(expanded)
        if p.is_absolute():
            if not allow_absolute:
                self.err(path, f"must be a path inside the project, got absolute {_show(s)}")
                return None
            return Path(os.path.normpath(p))
        resolved = Path(os.path.normpath(self.root / p))
        if resolved != self.root and self.root not in resolved.parents:
            self.err(path, f"path {_show(s)} escapes the project folder")
            return None
        return resolved

    def relpath_inside(self, path: str, value: Any) -> str | None:
        """A relative path that must stay inside the folder it is relative to."""
        s = self.string(path, value)
        if s is None:
            return None
        norm = os.path.normpath(s)
        if os.path.isabs(s) or norm == ".." or norm.startswith("../") or norm == ".":
            self.err(path, f"must be a relative path inside the experiment, got {_show(s)}")
            return None
        return norm

    def container_path(self, path: str, value: Any) -> str | None:
        s = self.string(path, value)
        if s is None:
            return None
        if not s.startswith("/") or "," in s or ":" in s:
            self.err(path, f"must be an absolute container path without ',' or ':', got {_show(s)}")
            return None
        return os.path.normpath(s)

    # -- sections ---------------------------------------------------------------------
    def slurm(self, path: str, value: Any) -> SlurmResources:
        m = self.mapping(path, value)
        if not m:
            return SlurmResources()
        self.keys(path, m, SLURM_KEYS)
        gpus = m.get("gpus")
        if isinstance(gpus, int) and not isinstance(gpus, bool):
            gpus_s: str | None = str(self.integer(f"{path}.gpus", gpus, 0, 1024))
        else:
            gpus_s = self.string(f"{path}.gpus", gpus, pattern=re.compile(r"^([A-Za-z0-9_.-]+:)?\d+$"),
                                 rule="a count or TYPE:COUNT")
        template = self.string(f"{path}.template", m.get("template"),
                               pattern=re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"),
                               rule="a template name in slurm/ (without folder)")
        word = re.compile(r"^[A-Za-z0-9_.,:@+=-]+$")
        return SlurmResources(
            partition=self.string(f"{path}.partition", m.get("partition"), pattern=word,
                                  rule="letters, digits and . _ , : @ + = -"),
            time=self.string(f"{path}.time", m.get("time"), pattern=TIME_RE,
                             rule="Slurm time: MM, MM:SS, HH:MM:SS, D-HH or D-HH:MM:SS"),
            cpus=self.integer(f"{path}.cpus", m.get("cpus"), 1, 4096),
            mem=self.string(f"{path}.mem", _scalar_text(m.get("mem")), pattern=MEM_RE,
                            rule="a size such as 4G or 500M"),
            gpus=gpus_s if gpus is not None else None,
            account=self.string(f"{path}.account", m.get("account"), pattern=word, rule="a Slurm account"),
            qos=self.string(f"{path}.qos", m.get("qos"), pattern=word, rule="a Slurm QOS"),
            max_parallel=self.integer(f"{path}.max_parallel", m.get("max_parallel"), 1, 100000),
            sbatch_args=self.str_list(f"{path}.sbatch_args", m.get("sbatch_args")) or (),
            template=template,
        )

    def bases(self, path: str, value: Any) -> dict[str, BaseSpec]:
        m = self.mapping(path, value)
        out: dict[str, BaseSpec] = {}
        for ref, spec in (m or {}).items():
            bp = f"{path}.{ref}"
            ref_s = self.string(bp, ref)
            if ref_s is None:
                continue
            if isinstance(spec, str):
                spec = {"sif": spec} if spec.endswith(".sif") and "://" not in spec else {"image": spec}
            sm = self.mapping(bp, spec)
            if sm is None:
                continue
            self.keys(bp, sm, BASE_KEYS)
            kinds = [k for k in ("sif", "image", "debootstrap") if k in sm]
            if len(kinds) != 1:
                self.err(bp, "give exactly one of sif, image or debootstrap"
                         + (f" (got {', '.join(kinds)})" if kinds else ""))
                continue
            kind = kinds[0]
            if kind == "sif":
                sif = self.path_in_project(f"{bp}.sif", sm["sif"], allow_absolute=True)
                if sif is not None:
                    out[ref_s] = BaseSpec(ref=ref_s, kind="sif", sif=sif)
            elif kind == "image":
                img = self.string(f"{bp}.image", sm["image"],
                                  pattern=re.compile(r"^(docker|oras|library|shub|docker-archive|"
                                                     r"oci-archive)://\S+$"),
                                  rule="a URI such as docker://mirror.example/library/python:3.11-slim "
                                       "or oras://...")
                if img is not None:
                    out[ref_s] = BaseSpec(ref=ref_s, kind="image", image=img)
            else:
                suite = self.string(f"{bp}.debootstrap", sm["debootstrap"],
                                    pattern=re.compile(r"^[a-z][a-z0-9-]{1,30}$"),
                                    rule="a Debian or Ubuntu suite such as bookworm or jammy")
                mirror = self.string(f"{bp}.mirror", sm.get("mirror"),
                                     pattern=re.compile(r"^(https?|file)://\S+$"), rule="an http(s) URL")
                include = self.str_list(f"{bp}.include", sm.get("include")) or ()
                for i, pkg in enumerate(include):
                    if not re.match(r"^[a-z0-9][a-z0-9+.-]+$", pkg):
                        self.err(f"{bp}.include[{i}]", f"invalid package name {_show(pkg)}")
                components = self.str_list(f"{bp}.components", sm.get("components")) or ("main",)
                for i, comp in enumerate(components):
                    if not COMPONENT_RE.fullmatch(comp):
                        self.err(f"{bp}.components[{i}]", f"invalid archive component {_show(comp)}: "
                                 "lower-case letters, digits and '-' (main, contrib, non-free-firmware)")
                if suite is not None:
                    out[ref_s] = BaseSpec(ref=ref_s, kind="debootstrap", suite=suite, mirror=mirror,
                                          include=tuple(include), components=tuple(components))
        return out

    def tracking(self, path: str, value: Any, base: MlflowTracking | None) -> MlflowTracking | None:
        """``tracking: {mlflow: {...}}``; at experiment level each key overrides the project's,
        and ``tracking: false`` turns tracking off for that experiment."""
        if value is False:
            return None
        m = self.mapping(path, value)
        if not m:
            return base
        self.keys(path, m, TRACKING_KEYS)
        if "mlflow" not in m:
            return base
        if m["mlflow"] is False:
            return None
        mm = self.mapping(f"{path}.mlflow", m["mlflow"])
        if mm is None:
            return base
        mp = f"{path}.mlflow"
        self.keys(mp, mm, MLFLOW_KEYS)
        uri: str | None = base.uri if base else None
        if "uri" in mm:
            raw = self.string(f"{mp}.uri", mm["uri"])
            if raw is not None:
                expanded = os.path.expandvars(raw)
                parts = re.match(r"^(https?)://([^/?#]*)(.*)$", expanded)
                if "@" in raw.split("://", 1)[-1].split("/", 1)[0]:
                    self.err(f"{mp}.uri", "must not hold credentials: set MLFLOW_TRACKING_USERNAME and "
                                          "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment")
                elif parts is None or not parts.group(2) or re.search(r"\s", expanded):
                    self.err(f"{mp}.uri", f"must be an http:// or https:// URL of an MLflow tracking server, "
                                          f"got {_show(raw)}")
                else:
                    uri = expanded.rstrip("/")
        experiment = base.experiment if base else None
        if "experiment" in mm:
            experiment = self.string(f"{mp}.experiment", mm["experiment"])
            if experiment is not None and not experiment.strip():
                self.err(f"{mp}.experiment", "must not be empty")
        reach = base.reachable_from_nodes if base else "auto"
        if "reachable_from_nodes" in mm:
            rv = mm["reachable_from_nodes"]
            if rv is True or rv is False:
                reach = "true" if rv else "false"
            elif rv == "auto":
                reach = "auto"
            else:
                self.err(f"{mp}.reachable_from_nodes", f"must be true, false or auto, got {_show(rv)}")
        artifacts = self.boolean(f"{mp}.artifacts", mm.get("artifacts"), base.artifacts if base else True)
        cap = base.max_artifact_mb if base else 100.0
        if "max_artifact_mb" in mm:
            cv = mm["max_artifact_mb"]
            if isinstance(cv, bool) or not isinstance(cv, (int, float)) or not 0 <= cv <= 1_000_000:
                self.err(f"{mp}.max_artifact_mb", f"must be a number of megabytes from 0 to 1000000, got {_show(cv)}")
            else:
                cap = float(cv)
        if uri is None:
            if "uri" not in mm:
                self.err(mp, "needs uri (the tracking server, e.g. http://mlflow.lab.example:5000)")
            return None
        return MlflowTracking(uri=uri, experiment=experiment, reachable_from_nodes=reach, artifacts=artifacts,
                              max_artifact_mb=cap)
    def registry(self, path: str, value: Any) -> RegistrySpec | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = {"url": value}
        m = self.mapping(path, value)
        if not m:
            return None
        self.keys(path, m, REGISTRY_KEYS)
        url = self.string(f"{path}.url", m.get("url"))
        if url is None:
            self.err(path, "needs url (oras://HOST[:PORT]/NAMESPACE)")
            return None
        if "@" in url.partition("://")[2].split("/")[0]:
            self.err(f"{path}.url", "must not hold credentials (use `apptainer registry login` or the "
                                    "environment)")
            return None
        match = REGISTRY_URL_RE.match(url)
        if not match:
            self.err(f"{path}.url", f"invalid value {_show(url)}: oras://HOST[:PORT]/NAMESPACE with a "
                                    "lower-case namespace such as oras://registry.your.site/lab")
            return None
        host = match.group("host")
        insecure = self.boolean(f"{path}.insecure", m.get("insecure"), False)
        bare = host.split("]")[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]
        if insecure:
            if bare not in LOOPBACK_HOSTS:
                self.err(f"{path}.insecure", f"plain HTTP is allowed for a registry on this machine only "
                                             f"(127.0.0.1, localhost), not {bare}: give the registry TLS")
                return None
        return RegistrySpec(url=url.rstrip("/"), host=host, namespace=match.group("ns"), insecure=insecure)

    def verify(self, path: str, value: Any) -> VerifyPolicy:
        if isinstance(value, str):
            value = {"mode": value}
        m = self.mapping(path, value)
        if not m:
            return VerifyPolicy()
        self.keys(path, m, VERIFY_KEYS)
        mode = self.string(f"{path}.mode", m.get("mode", "off"), pattern=re.compile(r"^(off|warn|require)$"),
                           rule="off, warn or require") or "off"
        keys = []
        for i, k in enumerate(self.str_list(f"{path}.keys", m.get("keys")) or ()):
            fp = k.replace(" ", "").upper()
            if not re.match(r"^[0-9A-F]{40}$", fp):
                self.err(f"{path}.keys[{i}]", f"invalid value {_show(k)}: a PGP fingerprint of 40 hex digits "
                                              "(`apptainer key list`)")
            else:
                keys.append(fp)
        files = []
        raw_files = m.get("key_files")
        if raw_files is not None and not isinstance(raw_files, list):
            self.err(f"{path}.key_files", f"must be a list of paths, got {_typename(raw_files)}")
            raw_files = []
        for i, f in enumerate(raw_files or ()):
            kp = self.path_in_project(f"{path}.key_files[{i}]", f, allow_absolute=True)
            if kp is not None:
                files.append(kp)
        if mode == "require" and not keys and not files:
            self.err(f"{path}.mode", "require needs the allowed signers: `keys:` (PGP fingerprints) or "
                                     "`key_files:` (PEM public keys)")
        return VerifyPolicy(mode=mode, keys=tuple(keys), key_files=tuple(files))

    def binds(self, path: str, value: Any) -> tuple[Bind, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.err(path, f"must be a list, got {_typename(value)}")
            return ()
        out = []
        for i, item in enumerate(value):
            ip = f"{path}[{i}]"
            if isinstance(item, str):
                if CONTROL_RE.search(item):
                    self.err(ip, f"control characters are not allowed: {_show(item)}")
                    continue
                parts = item.split(":")
                if len(parts) > 3:
                    self.err(ip, f"use the mapping form {{src, dst, mode}} for paths containing ':' "
                                 f"({_show(item)})")
                    continue
                item = {"src": parts[0], "dst": parts[1] if len(parts) > 1 else parts[0],
                        "mode": parts[2] if len(parts) > 2 else "ro"}
            m = self.mapping(ip, item)
            if m is None:
                continue
            self.keys(ip, m, BIND_KEYS)
            src = self.string(f"{ip}.src", m.get("src"))
            if src is None:
                self.err(ip, "needs src")
                continue
            src_exp = os.path.expanduser(os.path.expandvars(src))
            if not os.path.isabs(src_exp):
                src_exp = os.path.normpath(self.root / src_exp)
            dst = self.container_path(f"{ip}.dst", m.get("dst", src_exp))
            mode = self.string(f"{ip}.mode", m.get("mode", "ro"), pattern=re.compile(r"^(ro|rw)$"),
                               rule="ro or rw")
            if dst is not None and mode is not None:
                out.append(Bind(src=src_exp, dst=dst, mode=mode))
        return tuple(out)

    def experiment(self, path: str, name: str, m: Mapping[str, Any], project_defaults: dict[str, Any],
                   experiments_dir: Path) -> Experiment | None:
        self.keys(path, m, EXP_KEYS)
        for a, b in (("command", "entrypoint"), ("artifacts", "artifacts_path")):
            if a in m and b in m:
                self.err(f"{path}.{b}", f"give {a} or {b}, not both ({b} is the other spelling of {a})")
        exp_path = experiments_dir / name
        if "path" in m:
            p = self.path_in_project(f"{path}.path", m["path"], allow_absolute=False)
            if p is not None:
                exp_path = p
        dockerfiles = discover_dockerfiles(exp_path)
        if "dockerfile" in m:
            dm = m["dockerfile"]
            if isinstance(dm, str):
                dm = {"amd64": dm}
            dmm = self.mapping(f"{path}.dockerfile", dm)
            for arch, rel in (dmm or {}).items():
                if arch not in ARCHES:
                    self.err(f"{path}.dockerfile.{arch}", f"unknown architecture {_show(arch)} "
                                                         f"(use {' or '.join(ARCHES)})")
                    continue
                r = self.relpath_inside(f"{path}.dockerfile.{arch}", rel)
                if r is not None:
                    dockerfiles[arch] = exp_path / r
        command = self.str_list(f"{path}.command", m.get("command", m.get("entrypoint")), split=True)
        args = self.str_list(f"{path}.args", m.get("args"), split=True) or ()
        params_as_raw = m.get("params_as", ["args", "env"])
        if isinstance(params_as_raw, str):
            params_as_raw = [params_as_raw]
        params_as = self.str_list(f"{path}.params_as", params_as_raw) or ()
        for i, pa in enumerate(params_as):
            if pa not in ("args", "env"):
                self.err(f"{path}.params_as[{i}]", f"must be 'args' or 'env', got {_show(pa)}")
        artifacts = self.relpath_inside(f"{path}.artifacts",
                                        m.get("artifacts", m.get("artifacts_path", "results")))
        mount = self.container_path(f"{path}.mount", m.get("mount", "/experiment"))
        workdir = self.container_path(f"{path}.workdir", m.get("workdir"))
        env = dict(project_defaults["env"])
        env.update(self.str_map(f"{path}.env", m.get("env"), key_re=ENV_RE,
                                key_rule="an environment variable name", allow_control=True))
        params = self.str_map(f"{path}.params", m.get("params"), key_re=PARAM_RE,
                              key_rule="letters, digits and _, not starting with a digit", allow_control=True)
        build_args = dict(project_defaults["build_args"])
        build_args.update(self.str_map(f"{path}.build_args", m.get("build_args"), key_re=ENV_RE,
                                       key_rule="a build argument name", allow_control=False))
        bases = dict(project_defaults["bases"])
        bases.update(self.bases(f"{path}.bases", m.get("bases")))
        slurm = project_defaults["slurm"].merged(self.slurm(f"{path}.slurm", m.get("slurm")))
        return Experiment(
            name=name, path=exp_path, dockerfiles=dockerfiles, declared=True,
            ref=self.string(f"{path}.ref", m.get("ref")),
            code=self.string(f"{path}.code", m.get("code")),
            description=self.string(f"{path}.description", m.get("description")),
            command=command, args=args,
            artifacts=artifacts or "results", mount=mount or "/experiment", workdir=workdir,
            writable=self.boolean(f"{path}.writable", m.get("writable"), False),
            gpu=self.boolean(f"{path}.gpu", m.get("gpu"), False),
            binds=self.binds(f"{path}.binds", m.get("binds")),
            env=env, params=params, params_as=params_as, build_args=build_args, bases=bases, slurm=slurm,
            root=self.root,
            allow_outside=self.boolean(f"{path}.allow_outside_project", m.get("allow_outside_project"), False),
            tracking=self.tracking(f"{path}.tracking", m["tracking"], project_defaults["tracking"])
            if "tracking" in m else project_defaults["tracking"],
        )

    def project(self, data: Any, cfg_path: Path | None) -> Project | None:
        top = self.mapping("", data)
        if top is None:
            return None
        self.keys("", top, TOP_KEYS)

        def folder(key: str, default: str, allow_abs: bool = True) -> Path:
            if key not in top:
                return self.root / default
            p = self.path_in_project(key, top[key], allow_absolute=allow_abs)
            return p if p is not None else self.root / default

        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        experiments_dir = folder("experiments_dir", "experiments", allow_abs=False)
        recipes_dir = folder("recipes", "recipes", allow_abs=False)
        images_dir = folder("images", "images")
        runs_dir = folder("runs", "runs")
        slurm_dir = folder("slurm_dir", "slurm", allow_abs=False)
        cache_dir = folder("cache", "") if "cache" in top else Path(xdg) / "hpcexp"
        defaults: dict[str, Any] = {
            "env": self.str_map("env", top.get("env"), key_re=ENV_RE,
                                key_rule="an environment variable name", allow_control=True),
            "build_args": self.str_map("build_args", top.get("build_args"), key_re=ENV_RE,
                                       key_rule="a build argument name", allow_control=False),
            "bases": self.bases("bases", top.get("bases")),
            "slurm": self.slurm("slurm", top.get("slurm")),
            "tracking": self.tracking("tracking", top.get("tracking"), None),
        }
        mirror = self.string("debian_mirror", top.get("debian_mirror"),
                             pattern=re.compile(r"^(https?|file)://\S+$"), rule="an http(s) URL")
        build = self.mapping("build", top.get("build")) or {}
        self.keys("build", build, BUILD_KEYS)
        stand_ins = self.boolean("build.stand_ins", build.get("stand_ins"), True)
        host_network = self.boolean("build.host_network", build.get("host_network"), True)

        # Discovered experiments first, then what hpcexp.yaml declares.
        experiments: dict[str, Experiment] = {}
        if experiments_dir.is_dir():
            for child in sorted(experiments_dir.iterdir()):
                if child.is_dir() and NAME_RE.match(child.name):
                    dfs = discover_dockerfiles(child)
                    if dfs:
                        experiments[child.name] = Experiment(
                            name=child.name, path=child, dockerfiles=dfs, env=dict(defaults["env"]),
                            build_args=dict(defaults["build_args"]), bases=dict(defaults["bases"]),
                            slurm=defaults["slurm"], root=self.root, tracking=defaults["tracking"])

        declared = top.get("experiments")
        entries: list[tuple[str, str, Any]] = []
        if isinstance(declared, list):
            # The list shape other experiment managers use: [{name, ref, code, entrypoint, artifacts_path}]
            seen: dict[str, int] = {}
            for i, item in enumerate(declared):
                ip = f"experiments[{i}]"
                if not isinstance(item, dict):
                    self.err(ip, f"must be a mapping with a name, got {_typename(item)}")
                    continue
                name = item.get("name")
                if name is None:
                    self.err(ip, "needs a name")
                    continue
                if name in seen:
                    self.err(f"{ip}.name", f"duplicate experiment {_show(name)} (also experiments[{seen[name]}])")
                    continue
                seen[name] = i
                entries.append((ip, name, item))
        elif declared is not None:
            dm = self.mapping("experiments", declared)
            for name, item in (dm or {}).items():
                ep = f"experiments.{name}"
                if item is None:
                    item = {}
                if not isinstance(item, dict):
                    self.err(ep, f"must be a mapping, got {_typename(item)} {_show(item)}")
                    continue
                if "name" in item and item["name"] != name:
                    self.err(f"{ep}.name", f"differs from the key {_show(name)}")
                entries.append((ep, name, item))
        for ep, name, item in entries:
            if not isinstance(name, str) or not NAME_RE.match(name):
                self.err(ep, f"invalid experiment name {_show(name)}: must match "
                             "[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
                continue
            exp = self.experiment(ep, name, item, defaults, experiments_dir)
            if exp is not None:
                experiments[name] = exp

        return Project(
            root=self.root, config_file=cfg_path, experiments_dir=experiments_dir, recipes_dir=recipes_dir,
            images_dir=images_dir, runs_dir=runs_dir, slurm_dir=slurm_dir, cache_dir=cache_dir,
            experiments=experiments, bases=defaults["bases"], slurm=defaults["slurm"], env=defaults["env"],
            build_args=defaults["build_args"], debian_mirror=mirror, stand_ins=stand_ins,
            host_network=host_network,
            tracking=defaults["tracking"],
            registry=self.registry("registry", top.get("registry")), verify=self.verify("verify", top.get("verify")),
        )


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def discover_dockerfiles(folder: Path) -> dict[str, Path]:
    """Dockerfiles present in ``folder``, by architecture (first recognised name wins)."""
    found: dict[str, Path] = {}
    try:
        names = {p.name for p in folder.iterdir() if p.is_file()}
    except OSError:
        return found
    for arch, candidates in DOCKERFILE_NAMES.items():
        for cand in candidates:
            if cand in names:
                found[arch] = folder / cand
                break
    return found


def _close_matches(word: str, candidates: Sequence[str], n: int = 1, cutoff: float = 0.6) -> list[str]:
    """difflib's close matches, imported only when a did-you-mean is needed (startup time)."""
    import difflib

    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=cutoff)


def _typename(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "nothing"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"


def _scalar_text(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    return value


def with_experiment(project: Project, exp: Experiment) -> Project:
    """A copy of ``project`` with ``exp`` added or replaced (for tests and ad-hoc conversions)."""
    exps = dict(project.experiments)
    exps[exp.name] = exp
    return replace(project, experiments=exps)


BaseResolver = Callable[[str], "BaseSpec | None"]
