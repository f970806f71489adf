"""The project model: what a validated hpcexp.yaml becomes (frozen dataclasses), and the
names and patterns every layer checks values against.

Split from the validator (:mod:`hpcexp.core.schema`) and the loader
(:mod:`hpcexp.core.config`) so that code needing only the model (a record, a launch plan,
a job script) does not carry the validator's 600 lines of rules.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

from hpcexp.errors import NotFound, UsageError, shown

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


CHECKPOINT_SIGNALS = ("USR1", "USR2", "HUP", "INT", "TERM", "ALRM", "URG", "XCPU", "PWR")
REQUEUE_ENDINGS = ("timeout", "preempted", "node_fail")
MAX_SIGNAL_LEAD = 65535          # Slurm's --signal=...@TIME is at most 0xffff seconds
_DURATION_RE = re.compile(r"^(\d{1,6})\s*(s|sec|m|min|h)?$")


@dataclass(frozen=True)
class CheckpointPolicy:
    """``checkpoint: {signal: USR1, before: 90s}``: the payload is sent ``signal`` that many
    seconds before the job's time limit (``sbatch --signal=B:SIG@SECONDS``; the job script
    forwards it into the container) and saves its state in ``HPCEXP_CHECKPOINT_DIR``."""

    signal: str = "USR1"
    before: int = 90


@dataclass(frozen=True)
class RequeuePolicy:
    """``requeue: {on: [timeout, preempted, node_fail], max_attempts: N}``: after one of
    those endings the job runs again (same run, a new attempt) until N attempts were made."""

    on: tuple[str, ...] = REQUEUE_ENDINGS
    max_attempts: int = 3


def parse_duration(value: object, what: str) -> int:
    """Seconds from ``90``, ``90s``, ``2m``, ``1h`` (for ``checkpoint.before``); UsageError naming ``what``."""
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    m = _DURATION_RE.match(text or "")
    if not m:
        raise UsageError(f"{what}: invalid duration {shown(value)}: give seconds, e.g. 90, 90s, 2m or 1h")
    seconds = int(m.group(1)) * {"s": 1, "sec": 1, None: 1, "m": 60, "min": 60, "h": 3600}[m.group(2)]
    if not 1 <= seconds <= MAX_SIGNAL_LEAD:
        raise UsageError(f"{what}: {shown(value)} must be from 1 second to {MAX_SIGNAL_LEAD} seconds")
    return seconds


def parse_signal_name(value: object, what: str) -> str:
    """``USR1``, ``SIGUSR1`` or ``usr1`` -> ``USR1``; UsageError naming ``what`` otherwise."""
    text = str(value).strip().upper() if isinstance(value, str) else ""
    if text.startswith("SIG"):
        text = text[3:]
    if text not in CHECKPOINT_SIGNALS:
        raise UsageError(f"{what}: invalid signal {shown(value)}: choose one of {', '.join(CHECKPOINT_SIGNALS)}")
    return text


def parse_checkpoint_signal(value: str, what: str = "--checkpoint-signal") -> CheckpointPolicy:
    """``SIG[@SECONDS]`` (``USR1@90``, ``USR2@2m``) -> a CheckpointPolicy (90 s when no time is given)."""
    sig, sep, lead = str(value).partition("@")
    return CheckpointPolicy(signal=parse_signal_name(sig, what),
                            before=parse_duration(lead, what) if sep else CheckpointPolicy.before)


@dataclass(frozen=True)
class Bind:
    """An extra bind: host path (absolute, as configured), container path, ro or rw."""

    src: str
    dst: str
    mode: str = "ro"


#: a service's name (``services.NAME``) and a port's name (``ports: [NAME]``)
SERVICE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
PORT_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")


@dataclass(frozen=True)
class Readiness:
    """When a service counts as ready: ``tcp`` names one of its ports that must accept a
    connection, ``command`` runs inside the service's instance and must exit 0; neither:
    ready once started (a service with no port)."""

    tcp: str | None = None
    command: tuple[str, ...] = ()


@dataclass(frozen=True)
class Service:
    """One service beside a run (``experiments.NAME.services.SERVICE``, docs/services.md).

    ``image`` names another experiment of the project (its image is built like any other),
    ``sif`` a SIF file inside the project; exactly one is set. ``command``, ``env`` and
    ``ready.command`` may hold ``{host}``, ``{port}`` (the first port) and ``{port.NAME}``,
    replaced by the values chosen for the run; ``ports`` are the names of the TCP ports
    the service needs, each a free port chosen per run.
    """

    name: str
    image: str | None = None
    sif: Path | None = None
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    ports: tuple[str, ...] = ("port",)
    ready: Readiness = field(default_factory=Readiness)
    timeout: float = 60.0
    optional: bool = False

    @property
    def env_name(self) -> str:
        """The service's part of HPCEXP_SERVICE_<NAME>_*: upper case, '-' as '_'."""
        return self.name.upper().replace("-", "_")


@dataclass(frozen=True)
class RemoteSpec:
    """``remote:``: the object an experiment serves to the host (``hpcexp instance``, ``hpcexp.remote``).

    Inside the container hpcexp's server imports ``module`` (from the experiment folder, the
    working directory or the image's own path) and calls ``factory`` once, with the
    session's parameters as keyword arguments; the host then calls the object's public
    methods by name. ``python`` is the image's interpreter, ``timeout`` the default
    seconds a call may take before the client gives up, ``max_message_mb`` the largest
    message either side accepts.
    """

    module: str
    factory: str
    python: str = "python3"
    timeout: float = 60.0
    max_message_mb: float = 64.0


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
    services: tuple[Service, ...] = ()  # started beside each run (docs/services.md)
    remote: RemoteSpec | None = None    # remote: the object served to the host (hpcexp instance)
    checkpoint: CheckpointPolicy | None = None   # checkpoint: {signal, before}
    requeue: RequeuePolicy | None = None         # requeue: {on, max_attempts}

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




def with_experiment(project: Project, exp: Experiment) -> Project:
    """A copy of ``project`` with ``exp`` added or replaced (for tests and ad-hoc conversions)."""
    exps = dict(project.experiments)
    exps[exp.name] = exp
    return replace(project, experiments=exps)


BaseResolver = Callable[[str], "BaseSpec | None"]


#: how the launch error of a run whose services failed begins (local and Slurm alike)
SERVICE_FAILURE = "service"
SERVICE_PLACEHOLDER_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


def service_placeholder_problem(text: str, ports: Sequence[str]) -> str | None:
    """Why ``text`` (a service's command word, env value or readiness word) has a placeholder
    that cannot be filled: only ``{host}``, ``{port}`` (needs a port) and ``{port.NAME}``
    of a declared port exist; ``{{`` and ``}}`` are literal braces."""
    for m in SERVICE_PLACEHOLDER_RE.finditer(text):
        name = m.group(1)
        if name is None:
            continue
        if name == "host" or (name == "port" and ports) or (name.startswith("port.") and name[5:] in ports):
            continue
        known = ["{host}"] + (["{port}"] if ports else []) + [f"{{port.{p}}}" for p in ports]
        return f"unknown placeholder {{{name}}} (known: {', '.join(known)}; write {{{{ and }}}} for braces)"
    rest = SERVICE_PLACEHOLDER_RE.sub("", text)
    if "{" in rest or "}" in rest:
        return "unbalanced '{' or '}' (placeholders look like {port}; write {{ and }} for braces)"
    return None


def expand_service_text(text: str, host: str, ports: Mapping[str, int], order: Sequence[str]) -> str:
    """``text`` with ``{host}``, ``{port}`` (the first of ``order``) and ``{port.NAME}`` filled in."""
    def sub(m: re.Match[str]) -> str:
        token = m.group(0)
        if token in ("{{", "}}"):
            return token[0]
        name = m.group(1)
        if name == "host":
            return host
        if name == "port":
            return str(ports[order[0]])
        return str(ports[name[5:]])

    return SERVICE_PLACEHOLDER_RE.sub(sub, text)
