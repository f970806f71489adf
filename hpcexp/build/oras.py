"""Apptainer's side of the registry: ``apptainer push``/``pull`` (ORAS) argv and their errors.

One runner maps Apptainer's FATAL lines to hpcexp's errors (credentials, TLS, a full disk)
with any user information in URLs redacted."""

from __future__ import annotations

import os
import re
from pathlib import Path

from hpcexp.build.refs import Ref, redact
from hpcexp.errors import EnvironmentProblem, Failure, RegistryError
from hpcexp.infra import process

# Kept in Apptainer's otherwise scrubbed environment: registry credentials, and the PGP
# keyring folder that sign/verify use.
CRED_ENV = ("APPTAINER_DOCKER_USERNAME", "APPTAINER_DOCKER_PASSWORD",
            "SINGULARITY_DOCKER_USERNAME", "SINGULARITY_DOCKER_PASSWORD", "APPTAINER_KEYSDIR", "SINGULARITY_KEYSDIR")
TRANSFER_TIMEOUT = 3600.0


# --------------------------------------------------------------------------------------
# Apptainer push / pull / sign / verify
# --------------------------------------------------------------------------------------

def apptainer_env() -> dict[str, str]:
    """Apptainer's environment: the usual scrubbed one, plus registry credentials if the user set them."""
    from hpcexp.runtime import apptainer

    env = apptainer.clean_env()
    for key in CRED_ENV:
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def program() -> str:
    """apptainer (or singularity) on PATH. No version probe: push, pull, sign and verify need
    no rootless build support, and a pull should not wait for ``apptainer --version``."""
    path = process.which("apptainer") or process.which("singularity")
    if path is None:
        raise EnvironmentProblem("apptainer not found on PATH (nor singularity)",
                                 hint=process.INSTALL_HINTS["apptainer"])
    return path


def run_apptainer(argv: list[str], *, what: str, timeout: float = TRANSFER_TIMEOUT) -> process.Result:
    res = process.run([program(), *argv], env=apptainer_env(), timeout=timeout)
    if not res.ok:
        reason = redact(fatal_line(res))
        if any(s in reason.lower() for s in ("unauthorized", "denied", "authentication required", "401", "403")):
            raise RegistryError(f"{what} failed: {reason}",
                                hint="log in with `apptainer registry login oras://HOST` or set "
                                     "APPTAINER_DOCKER_USERNAME and APPTAINER_DOCKER_PASSWORD")
        if any(s in reason.lower() for s in ("connection refused", "no such host", "certificate", "timeout",
                                              "i/o timeout", "tls")):
            raise RegistryError(f"{what} failed: {reason}")
        if "no space left" in reason.lower() or "quota exceeded" in reason.lower():
            from hpcexp.errors import StorageError

            raise StorageError(f"{what} failed: {reason}; nothing was kept",
                               hint="free space, or point `images:` in hpcexp.yaml at a larger file system")
        raise Failure(f"{what} failed: {reason}")
    return res


def fatal_line(res: process.Result) -> str:
    for stream in (res.stderr, res.stdout):
        for line in reversed(stream.splitlines()):
            if line.strip().startswith(("FATAL", "ERROR")):
                return re.sub(r"^(FATAL|ERROR):\s*", "", line.strip())
    return res.last_line()


def push_argv(sif: Path, ref: Ref, *, insecure: bool) -> list[str]:
    return ["push", *(["--no-https"] if insecure else []), str(sif), ref.uri()]


def pull_argv(out: Path, ref: Ref, *, insecure: bool) -> list[str]:
    # --disable-cache: the images folder is the cache; Apptainer's own would keep a second
    # copy of every image in $HOME (small quotas on clusters).
    return ["pull", "--disable-cache", *(["--no-https"] if insecure else []), str(out), ref.uri()]
