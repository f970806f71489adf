"""Apptainer instances: the argv of ``apptainer instance start|stop|list`` and ``exec
instance://``, and the parser of ``apptainer instance list --json``.

Pure functions (argv lists, never shell strings), used by whatever keeps a container
running beside the host: services beside a run, and remote-call sessions. The container's
environment never goes on the command line: pass :func:`hpcexp.runtime.apptainer.payload_env`
(``APPTAINERENV_*``) as the process environment, as for ``apptainer run``.
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


def check_instance_name(name: str) -> str:
    if not INSTANCE_NAME_RE.match(name):
        raise ValueError(f"invalid instance name {name!r}")
    return name


def instance_name_for(prefix: str, run_id: str) -> str:
    """The instance name of one run: ``PREFIX-RUN_ID`` with what Apptainer refuses replaced."""
    return check_instance_name(re.sub(r"[^A-Za-z0-9._-]", "-", f"{prefix}-{run_id}")[:100])


def instance_start_argv(sif: str | Path, name: str, *, binds: Sequence[Mount] = (),
                        env: Mapping[str, str] | None = None, program: str = "apptainer",
                        containall: bool = True, writable_tmpfs: bool = True, nv: bool = False,
                        args: Sequence[str] = (), extra: Sequence[str] = ()) -> list[str]:
    """``apptainer instance start`` argv for image ``sif`` as instance ``name``.

    ``env`` is the container's environment: it is checked here (names, no NUL) but travels
    as ``APPTAINERENV_*`` in the process environment (``apptainer.payload_env``), never on
    the command line; ``--no-eval`` keeps Apptainer from shell-evaluating it.
    """
    for key, value in (env or {}).items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key) or "\x00" in value:
            raise ValueError(f"invalid container environment entry {key!r}")
    argv = [program, "instance", "start"]
    if containall:
        argv.append("--containall")
    if writable_tmpfs:
        argv.append("--writable-tmpfs")
    if nv:
        argv.append("--nv")
    for m in binds:  # no --pwd: `instance start` has none (the working directory is exec's)
        argv += m.argv()
    argv.append("--no-eval")
    argv += list(extra)
    argv += [str(sif), check_instance_name(name)]
    argv += list(args)
    return argv


def instance_exec_argv(name: str, command: Sequence[str], *, program: str = "apptainer",
                       pwd: str | None = None) -> list[str]:
    """``apptainer exec instance://NAME COMMAND...``: a process inside a running instance."""
    argv = [program, "exec"]
    if pwd:
        argv += ["--pwd", pwd]
    argv.append("--no-eval")
    argv.append(f"instance://{check_instance_name(name)}")
    argv += list(command)
    return argv


def instance_stop_argv(name: str, *, program: str = "apptainer", force: bool = False,
                       timeout: int | None = None) -> list[str]:
    """``apptainer instance stop NAME`` (``--force``: SIGKILL; ``--timeout N``: SIGKILL after N s)."""
    argv = [program, "instance", "stop"]
    if force:
        argv.append("--force")
    if timeout is not None:
        argv += ["--timeout", str(int(timeout))]
    argv.append(check_instance_name(name))
    return argv


def instance_list_argv(*, program: str = "apptainer") -> list[str]:
    """``apptainer instance list --json``: this user's instances."""
    return [program, "instance", "list", "--json"]


@dataclass(frozen=True)
class InstanceInfo:
    """One row of ``apptainer instance list --json``."""

    name: str
    pid: int | None
    image: str
    ip: str = ""
    log_out: str | None = None
    log_err: str | None = None


def parse_instance_list(text: str) -> list[InstanceInfo]:
    """The instances ``apptainer instance list --json`` printed; ValueError when it is not that."""
    data: Any = json.loads(text) if text.strip() else {"instances": []}
    rows = data.get("instances") if isinstance(data, dict) else None
    if rows is None:
        rows = []
    if not isinstance(rows, list):
        raise ValueError("`instances` is not a list")
    out = []
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("instance"), str):
            raise ValueError(f"not an instance entry: {row!r:.80}")
        pid = row.get("pid")
        out.append(InstanceInfo(name=row["instance"], pid=pid if isinstance(pid, int) else None,
                                image=str(row.get("img") or ""), ip=str(row.get("ip") or ""),
                                log_out=row.get("logOutPath"), log_err=row.get("logErrPath")))
    return out
