"""Apptainer instances: the argv of ``instance start/stop/list`` and of a command run inside
one (``exec instance://NAME``), and the parser of ``instance list --json``. Pure.

An instance is a container that stays up without a foreground payload: hpcexp runs the
services beside a run in them (docs/services.md), and remote-call sessions
(docs/remote.md). Like :mod:`hpcexp.runtime.apptainer`, nothing here is a shell string and
no environment is put on the command line: the environment of the instance or of a
command inside it travels as ``APPTAINERENV_*`` in the child's own environment
(:func:`hpcexp.runtime.apptainer.payload_env`); ``--no-eval`` keeps Apptainer from
shell-evaluating it.

Checked with Apptainer 1.4.5: ``instance start`` has no ``--pwd`` (only ``exec`` has);
``exec instance://NAME`` does not inherit the instance's environment (each command gets
its own, hence ``--cleanenv`` and ``APPTAINERENV_*`` again); ``instance stop`` kills every
process of the instance, so a command running inside it ends too; an instance whose
processes were killed another way drops out of ``instance list`` by itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from hpcexp.runtime.apptainer import Mount

#: what Apptainer accepts as an instance name (checked with 1.4.5), kept short
INSTANCE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_instance_name(name: str) -> str:
    """``name`` if Apptainer takes it as an instance name, else ValueError."""
    if not INSTANCE_NAME_RE.match(name):
        raise ValueError(f"invalid instance name {name!r}")
    return name


def instance_name(run_id: str, service: str) -> str:
    """The instance of ``service`` for run ``run_id``: unique per run (run ids are), so two
    runs on one machine never share an instance."""
    return check_instance_name(_NAME_BAD.sub("_", f"hpcexp-{run_id}-{service}"))


def instance_name_for(prefix: str, run_id: str) -> str:
    """The instance name of one session run: ``PREFIX-RUN_ID`` with what Apptainer refuses replaced."""
    return check_instance_name(_NAME_BAD.sub("-", f"{prefix}-{run_id}")[:100])


def instance_start_argv(sif: Path | str, name: str, *, binds: Sequence[Mount] = (),
                        env: Mapping[str, str] | None = None, program: str = "apptainer",
                        containall: bool = True, writable_tmpfs: bool = True, nv: bool = False,
                        args: Sequence[str] = (), extra: Sequence[str] = ()) -> list[str]:
    """``apptainer instance start`` argv for ``sif`` as instance ``name``.

    ``env`` is the instance's environment; it is not put on the command line (pass
    ``apptainer.payload_env(program, env)`` as the child's environment), only its entries
    are checked here so a bad one fails before anything starts. ``args`` go to the image's
    startscript.
    """
    for key, value in (env or {}).items():
        if not _ENV_NAME_RE.match(key) or "\x00" in value:
            raise ValueError(f"invalid container environment entry {key!r}")
    argv = [program, "instance", "start"]
    if containall:
        argv.append("--containall")
    if writable_tmpfs:
        argv.append("--writable-tmpfs")
    if nv:
        argv.append("--nv")
    argv.append("--no-eval")
    for m in binds:
        argv += m.argv()
    argv += list(extra)
    argv += [str(sif), check_instance_name(name)]
    argv += list(args)
    return argv


def instance_exec_argv(name: str, command: Sequence[str], *, program: str = "apptainer",
                       pwd: str | None = "/", cleanenv: bool = True) -> list[str]:
    """``apptainer exec instance://NAME COMMAND...``: a command inside a running instance,
    by default with a clean environment (only what ``APPTAINERENV_*`` brings)."""
    if not command:
        raise ValueError("no command to run in the instance")
    argv = [program, "exec"]
    if cleanenv:
        argv.append("--cleanenv")
    argv.append("--no-eval")
    if pwd:
        argv += ["--pwd", pwd]
    argv.append(f"instance://{check_instance_name(name)}")
    argv += list(command)
    return argv


def instance_stop_argv(name: str, *, program: str = "apptainer", force: bool = False,
                       timeout: int | None = None) -> list[str]:
    """``apptainer instance stop NAME`` (``--force``: SIGKILL at once; ``--timeout N``: SIGKILL after N s)."""
    argv = [program, "instance", "stop"]
    if force:
        argv.append("--force")
    if timeout is not None:
        argv += ["--timeout", str(int(timeout))]
    argv.append(check_instance_name(name))
    return argv


def instance_list_argv(*, program: str = "apptainer", pattern: str | None = None) -> list[str]:
    """``apptainer instance list --json [PATTERN]`` (a glob, as Apptainer takes it): this user's instances."""
    argv = [program, "instance", "list", "--json"]
    if pattern:
        argv.append(pattern)
    return argv


@dataclass(frozen=True)
class InstanceInfo:
    """One row of ``apptainer instance list --json``."""

    name: str
    pid: int | None
    image: str
    log_out: str | None = None
    log_err: str | None = None
    ip: str = ""


def parse_instance_list(text: str) -> list[InstanceInfo]:
    """The instances in ``apptainer instance list --json`` output; ValueError when it is not that."""
    data: Any = json.loads(text) if text.strip() else {}
    rows = data.get("instances") if isinstance(data, dict) else ()
    if rows is None:  # Apptainer prints null when there is none
        rows = []
    if not isinstance(rows, list):
        raise ValueError("not the output of `apptainer instance list --json`")
    out = []
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("instance"), str):
            raise ValueError(f"not an instance entry: {row!r:.80}")
        pid = row.get("pid")
        out.append(InstanceInfo(name=row["instance"], pid=pid if isinstance(pid, int) else None,
                                image=str(row.get("img") or ""), log_out=row.get("logOutPath") or None,
                                log_err=row.get("logErrPath") or None, ip=str(row.get("ip") or "")))
    return out
