"""Validation of hpcexp.yaml into the project model, one section at a time.

Every problem (unknown key with a did-you-mean, wrong type, bad name, control character,
path escaping the project) is collected with file, line and dotted key path, and
:func:`hpcexp.core.config.load_project` raises them as one ConfigError (exit code 2), so
a bad value fails at ``hpcexp list``, never halfway through a submission.

The checks of single values are :mod:`hpcexp.core.checks`, the rules of each section
(slurm, bases, tracking, registry, verify, binds, services, remote, checkpoint, requeue)
:mod:`hpcexp.core.sections`; this module reads the top level and each experiment.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from hpcexp.core.checks import _show, _typename
from hpcexp.core.model import (
    ARCHES,
    ENV_RE,
    NAME_RE,
    PARAM_RE,
    Experiment,
    Project,
    _close_matches,
    discover_dockerfiles,
)
from hpcexp.core.sections import (  # noqa: F401 - the section names config re-exports
    BASE_KEYS,
    BIND_KEYS,
    BUILD_KEYS,
    COMPONENT_RE,
    LOOPBACK_HOSTS,
    MLFLOW_KEYS,
    REGISTRY_KEYS,
    REGISTRY_URL_RE,
    SLURM_KEYS,
    TRACKING_KEYS,
    VERIFY_KEYS,
    Sections,
)

TOP_KEYS = ("images", "runs", "recipes", "experiments_dir", "cache", "slurm_dir", "bases", "slurm",
            "env", "build_args", "debian_mirror", "build", "experiments", "tracking",
            "registry", "verify")
EXP_KEYS = ("name", "path", "allow_outside_project", "ref", "code", "description", "dockerfile", "command",
            "entrypoint", "args", "artifacts", "artifacts_path", "mount", "workdir", "writable", "gpu", "binds",
            "env", "params", "params_as", "build_args", "bases", "slurm", "tracking", "services", "remote",
            "checkpoint", "requeue")


class _Validator(Sections):
    """hpcexp.yaml as a whole: the top level, each experiment, and what spans experiments."""

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
            services=self.services(f"{path}.services", m.get("services")),
            remote=self.remote(f"{path}.remote", m.get("remote")),
            checkpoint=self.checkpoint(f"{path}.checkpoint", m["checkpoint"]) if "checkpoint" in m else None,
            requeue=self.requeue(f"{path}.requeue", m["requeue"]) if "requeue" in m else None,
        )

    def service_images(self, ep: str, exp: Experiment | None, experiments: Mapping[str, Experiment]) -> None:
        """A service's ``image`` names an experiment of the project other than its own."""
        for svc in exp.services if exp is not None else ():
            if svc.image is None:
                continue
            where = f"{ep}.services.{svc.name}.image"
            if svc.image == exp.name:  # type: ignore[union-attr]
                self.err(where, "a service cannot run the experiment's own image beside it (name another "
                                "experiment)")
            elif svc.image not in experiments:
                close = _close_matches(svc.image, list(experiments), n=1)
                self.err(where, f"no experiment {svc.image!r} in this project"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))

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
        for ep, name, _item in entries:
            self.service_images(ep, experiments.get(name), experiments)

        return Project(
            root=self.root, config_file=cfg_path, experiments_dir=experiments_dir, recipes_dir=recipes_dir,
            images_dir=images_dir, runs_dir=runs_dir, slurm_dir=slurm_dir, cache_dir=cache_dir,
            experiments=experiments, bases=defaults["bases"], slurm=defaults["slurm"], env=defaults["env"],
            build_args=defaults["build_args"], debian_mirror=mirror, stand_ins=stand_ins,
            host_network=host_network,
            tracking=defaults["tracking"],
            registry=self.registry("registry", top.get("registry")), verify=self.verify("verify", top.get("verify")),
        )
