"""The rules of each section of hpcexp.yaml: slurm, bases, tracking, registry, verify,
binds, services, remote, checkpoint and requeue, one method each.

Why methods of one class (and not functions): each rule reports through the collected
problems and the line map of :class:`~hpcexp.core.checks.Checks`, and some call others
(``services`` calls ``service`` and ``readiness``); they are read one section at a time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

from hpcexp.core import model as policy_model  # checkpoint and requeue policies
from hpcexp.core.checks import Checks, _scalar_text, _show, _typename
from hpcexp.core.model import (
    CONTROL_RE,
    ENV_RE,
    MEM_RE,
    NAME_RE,
    PORT_NAME_RE,
    SERVICE_NAME_RE,
    TIME_RE,
    BaseSpec,
    Bind,
    MlflowTracking,
    Readiness,
    RegistrySpec,
    RemoteSpec,
    Service,
    SlurmResources,
    VerifyPolicy,
    service_placeholder_problem,
)
from hpcexp.errors import UsageError

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
SERVICE_KEYS = ("image", "command", "env", "ports", "ready", "timeout", "optional")
READY_KEYS = ("tcp", "command")
REMOTE_KEYS = ("module", "factory", "python", "timeout", "max_message_mb")
#: a dotted Python module path, and one identifier (the factory)
PY_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
PY_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
REGISTRY_URL_RE = re.compile(r"^oras://(?P<host>[A-Za-z0-9.-]+(:\d{1,5})?|\[[0-9A-Fa-f:]+\](:\d{1,5})?)"
                             r"/(?P<ns>[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*)/?$")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


class Sections(Checks):
    """One method per section (or value kind) of hpcexp.yaml."""

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

    def remote(self, path: str, value: Any) -> RemoteSpec | None:
        """``remote: {module, factory, python, timeout, max_message_mb}`` (hpcexp instance)."""
        if value is None:
            return None
        m = self.mapping(path, value)
        if m is None:
            return None
        self.keys(path, m, REMOTE_KEYS)
        module = self.string(f"{path}.module", m.get("module"), pattern=PY_MODULE_RE,
                             rule="a Python module name such as bench or pkg.bench")
        factory = self.string(f"{path}.factory", m.get("factory"), pattern=PY_IDENT_RE,
                              rule="a Python name in that module, such as make")
        for key in ("module", "factory"):
            if key not in m:
                self.err(path, f"needs {key} (e.g. remote: {{module: bench, factory: make}})")
        python = self.string(f"{path}.python", m.get("python", "python3"))
        if python is not None and (not python or python.startswith("-") or " " in python):
            self.err(f"{path}.python", f"invalid value {_show(python)}: the interpreter's name or absolute path "
                                       "in the image, such as python3")
            python = None
        timeout = self.number(f"{path}.timeout", m.get("timeout", 60.0), 0.001, 7 * 86400.0)
        max_mb = self.number(f"{path}.max_message_mb", m.get("max_message_mb", 64.0), 0.001, 2047.0)
        if module is None or factory is None or python is None or timeout is None or max_mb is None:
            return None
        return RemoteSpec(module=module, factory=factory, python=python, timeout=timeout, max_message_mb=max_mb)

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

    def services(self, path: str, value: Any) -> tuple[Service, ...]:
        """``services: {NAME: {image, command, env, ports, ready, timeout, optional}}``."""
        m = self.mapping(path, value)
        out: list[Service] = []
        env_names: dict[str, str] = {}
        for name, spec in (m or {}).items():
            sp = f"{path}.{name}"
            if not isinstance(name, str) or not SERVICE_NAME_RE.match(name):
                self.err(sp, f"invalid service name {_show(name)}: a letter, then letters, digits, '_' or '-' "
                             "(at most 32)")
                continue
            svc = self.service(sp, name, spec)
            if svc is None:
                continue
            if svc.env_name in env_names:
                self.err(sp, f"service {name!r} and {env_names[svc.env_name]!r} would both be "
                             f"HPCEXP_SERVICE_{svc.env_name}_*: rename one")
                continue
            env_names[svc.env_name] = name
            out.append(svc)
        return tuple(out)

    def service(self, sp: str, name: str, spec: Any) -> Service | None:
        sm = self.mapping(sp, spec)
        if sm is None:
            return None
        self.keys(sp, sm, SERVICE_KEYS)
        before = len(self.problems)
        image: str | None = None
        sif: Path | None = None
        raw = self.string(f"{sp}.image", sm.get("image"))
        if raw is None:
            self.err(sp, "needs image: another experiment of this project, or a .sif file inside it")
        elif raw.endswith(".sif") or "/" in raw:
            sif = self.path_in_project(f"{sp}.image", raw, allow_absolute=False)
        elif NAME_RE.match(raw):
            image = raw
        else:
            self.err(f"{sp}.image", f"invalid value {_show(raw)}: an experiment name, or a path to a .sif file "
                                    "inside the project")
        ports_raw = sm.get("ports", ["port"])
        if isinstance(ports_raw, str):
            ports_raw = [ports_raw]
        ports = self.str_list(f"{sp}.ports", ports_raw) or ()
        for i, port in enumerate(ports):
            if not PORT_NAME_RE.match(port):
                self.err(f"{sp}.ports[{i}]", f"invalid port name {_show(port)}: a letter, then letters, digits "
                                             "or '_'")
            elif ports.index(port) != i:
                self.err(f"{sp}.ports[{i}]", f"port {port!r} is named twice")
        command = self.str_list(f"{sp}.command", sm.get("command"), split=True) or ()
        env = self.str_map(f"{sp}.env", sm.get("env"), key_re=ENV_RE, key_rule="an environment variable name",
                           allow_control=True)
        ready = self.readiness(f"{sp}.ready", sm.get("ready"), ports)
        for where, words in ((f"{sp}.command", command), (f"{sp}.ready.command", ready.command)):
            for i, word in enumerate(words):
                problem = service_placeholder_problem(word, ports)
                if problem:
                    self.err(f"{where}[{i}]", problem)
        for key, val in env.items():
            problem = service_placeholder_problem(val, ports)
            if problem:
                self.err(f"{sp}.env.{key}", problem)
        timeout = sm.get("timeout", 60)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 86400:
            self.err(f"{sp}.timeout", f"must be a number of seconds from 0 to 86400 (not 0), got {_show(timeout)}")
            timeout = 60
        optional = self.boolean(f"{sp}.optional", sm.get("optional"), False)
        if len(self.problems) != before:
            return None
        return Service(name=name, image=image, sif=sif, command=command, env=env, ports=tuple(ports),
                       ready=ready, timeout=float(timeout), optional=optional)

    def readiness(self, path: str, value: Any, ports: Sequence[str]) -> Readiness:
        """``ready: {tcp: PORT}`` or ``{command: [...]}``; ``ready: tcp`` is the first port;
        no ``ready``: the first port must answer (ready once started without ports)."""
        if value is None:
            return Readiness(tcp=ports[0] if ports else None)
        if value == "tcp":
            value = {"tcp": ports[0] if ports else "port"}
        m = self.mapping(path, value)
        if m is None:
            return Readiness()
        self.keys(path, m, READY_KEYS)
        if ("tcp" in m) == ("command" in m):
            self.err(path, "give exactly one of tcp (a port name that must answer) or command (must exit 0)")
            return Readiness()
        if "tcp" in m:
            tcp = self.string(f"{path}.tcp", m["tcp"])
            if tcp is not None and tcp not in ports:
                self.err(f"{path}.tcp", f"{_show(tcp)} is not one of this service's ports "
                                        f"({', '.join(ports) or 'it has none: add ports:'})")
                return Readiness()
            return Readiness(tcp=tcp)
        command = self.str_list(f"{path}.command", m["command"], split=True) or ()
        if not command:
            self.err(f"{path}.command", "must not be empty")
        return Readiness(command=command)

    def checkpoint(self, path: str, value: Any) -> policy_model.CheckpointPolicy | None:
        m = self.mapping(path, value)
        if m is None:
            return None
        self.keys(path, m, ("signal", "before"))
        CheckpointPolicy = policy_model.CheckpointPolicy  # noqa: N806
        parse_signal_name, parse_duration = policy_model.parse_signal_name, policy_model.parse_duration
        out = CheckpointPolicy()
        try:
            if m.get("signal") is not None:
                out = CheckpointPolicy(signal=parse_signal_name(m["signal"], f"{path}.signal"), before=out.before)
        except UsageError as exc:
            self.err(f"{path}.signal", exc.message.split(": ", 1)[1])
        try:
            if m.get("before") is not None:
                out = CheckpointPolicy(signal=out.signal, before=parse_duration(m["before"], f"{path}.before"))
        except UsageError as exc:
            self.err(f"{path}.before", exc.message.split(": ", 1)[1])
        return out

    def requeue(self, path: str, value: Any) -> policy_model.RequeuePolicy | None:
        m = self.mapping(path, value)
        if m is None:
            return None
        if True in m and "on" not in m:
            # YAML 1.1 reads an unquoted key `on` as true: that is the `on:` of this section
            m = {("on" if k is True else k): v for k, v in m.items()}
        self.keys(path, m, ("on", "max_attempts"))
        REQUEUE_ENDINGS, RequeuePolicy = policy_model.REQUEUE_ENDINGS, policy_model.RequeuePolicy  # noqa: N806
        on_raw = m.get("on", list(REQUEUE_ENDINGS))
        if isinstance(on_raw, str):
            on_raw = [on_raw]
        on = self.str_list(f"{path}.on", on_raw) or ()
        for i, ending in enumerate(on):
            if ending not in REQUEUE_ENDINGS:
                self.err(f"{path}.on[{i}]", f"must be one of {', '.join(REQUEUE_ENDINGS)}, got {_show(ending)} "
                                            "(a job that finished, failed or was cancelled is never requeued)")
        attempts = self.integer(f"{path}.max_attempts", m.get("max_attempts", RequeuePolicy.max_attempts), 1, 1000)
        return RequeuePolicy(on=tuple(dict.fromkeys(on)), max_attempts=attempts or RequeuePolicy.max_attempts)
