"""``hpcexp doctor``: what works on this machine, one line per check, with a fix for each failure.

Checks are plain functions returning :class:`Check`; :func:`run_checks` runs them all
(never stopping at the first failure) so that a researcher on a login node sees the
whole picture at once. ``required`` checks make doctor exit non-zero when they fail.
The fixes printed here are the ones README's troubleshooting section explains.
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from hpcexp.core.config import Project, host_arch
from hpcexp.infra import process
from hpcexp.runtime import apptainer

OK, WARN, FAIL = "ok", "warn", "fail"
LOW_SPACE = 5 * 1024**3
CRITICAL_SPACE = 1 * 1024**3


@dataclass(frozen=True)
class Check:
    name: str
    status: str          # ok | warn | fail
    detail: str
    fix: str | None = None
    required: bool = False

    @property
    def failed_required(self) -> bool:
        return self.status == FAIL and self.required


def check_apptainer() -> Check:
    inst = apptainer.detect()
    if inst is None:
        return Check("apptainer", FAIL, "apptainer (or singularity) not found on PATH",
                     "install Apptainer >= 1.1 or `module load apptainer`; see README 'Troubleshooting'",
                     required=True)
    if not inst.supports_unprivileged_build:
        return Check("apptainer", FAIL, f"{inst.program} {inst.version} is too old for rootless builds",
                     "Apptainer >= 1.1 (or SingularityCE >= 3.9) is needed: load a newer module", required=True)
    return Check("apptainer", OK, f"{inst.program} {inst.version} at {inst.path}", required=True)


def check_not_root() -> Check:
    if os.geteuid() == 0:
        return Check("user", WARN, "running as root: hpcexp is meant for ordinary users, and Apptainer "
                                   "may refuse to run as root without full capabilities",
                     "run hpcexp as your own user")
    return Check("user", OK, f"ordinary user (uid {os.geteuid()})")


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def check_userns() -> Check:
    max_ns = _read_int("/proc/sys/user/max_user_namespaces")
    if max_ns == 0:
        return Check("user namespaces", FAIL, "user namespaces disabled (user.max_user_namespaces=0)",
                     "ask an admin: `sysctl -w user.max_user_namespaces=15000`", required=True)
    clone = _read_int("/proc/sys/kernel/unprivileged_userns_clone")
    if clone == 0:
        return Check("user namespaces", FAIL, "unprivileged user namespaces disabled "
                                              "(kernel.unprivileged_userns_clone=0)",
                     "ask an admin: `sysctl -w kernel.unprivileged_userns_clone=1`", required=True)
    aa = _read_int("/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
    if aa == 1:
        return Check("user namespaces", WARN, "AppArmor restricts unprivileged user namespaces",
                     "ask an admin to install Apptainer's AppArmor profile")
    return Check("user namespaces", OK, f"available (max {max_ns if max_ns is not None else 'unknown'})",
                 required=True)


def subid_range(user: str, uid: int, path: str) -> tuple[int, int] | None:
    """The (start, count) of ``user``'s range in /etc/subuid or /etc/subgid, if any."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (user, str(uid)):
            try:
                return int(parts[1]), int(parts[2])
            except ValueError:
                continue
    return None


def check_fakeroot() -> Check:
    import getpass

    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001
        user = str(os.getuid())
    uid = os.getuid()
    sub_u = subid_range(user, uid, "/etc/subuid")
    sub_g = subid_range(user, uid, "/etc/subgid")
    if sub_u and sub_g and sub_u[1] >= 65536 and sub_g[1] >= 65536:
        return Check("fakeroot", OK, f"subuid/subgid range for {user} ({sub_u[1]} ids): full --fakeroot builds",
                     required=True)
    if process.which("fakeroot"):
        return Check("fakeroot", WARN, f"no /etc/subuid+subgid range of 65536 for {user}: builds use "
                                       "Apptainer's root-mapped namespace with the fakeroot command "
                                       "(some package installs may fail)",
                     f"ask an admin: `usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}`",
                     required=True)
    return Check("fakeroot", FAIL, f"no /etc/subuid+subgid range for {user} and no `fakeroot` command",
                 f"ask an admin to add a subuid/subgid range for {user}, or install the `fakeroot` package",
                 required=True)


def check_squashfuse() -> Check:
    sq = process.which("squashfuse") or process.which("squashfuse_ll")
    fuse_ok = os.access("/dev/fuse", os.R_OK | os.W_OK)
    if sq and fuse_ok:
        return Check("squashfuse", OK, "squashfuse and /dev/fuse usable: images mount without unpacking")
    missing = [] if sq else ["squashfuse"]
    if not fuse_ok:
        missing.append("read/write /dev/fuse")
    return Check("squashfuse", WARN, f"missing {', '.join(missing)}: every run unpacks the image to a "
                                     "temporary sandbox (slower, more disk)",
                 "install squashfuse and make /dev/fuse usable (mode 0666) or ask an admin")


def check_space(label: str, path: Path, fix_key: str | None = None) -> Check:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError as exc:
        return Check(f"space: {label}", WARN, f"cannot check {path}: {exc.strerror}")
    free_gib = usage.free / 1024**3
    move = fix_key or f"`{label}:` in hpcexp.yaml"
    if usage.free < CRITICAL_SPACE:
        return Check(f"space: {label}", FAIL, f"{free_gib:.1f} GiB free at {path}",
                     f"free space or point {move} to scratch")
    if usage.free < LOW_SPACE:
        return Check(f"space: {label}", WARN, f"only {free_gib:.1f} GiB free at {path}",
                     f"point {move} to a larger file system")
    return Check(f"space: {label}", OK, f"{free_gib:.0f} GiB free at {path}")


def check_slurm() -> list[Check]:
    missing = [t for t in ("sbatch", "squeue", "scancel", "sinfo") if process.which(t) is None]
    if missing:
        return [Check("slurm", WARN, f"{', '.join(missing)} not on PATH: `hpcexp submit` unavailable "
                                     "(local runs work)",
                      "run on a login node or `module load slurm`")]
    try:
        res = process.run(["sinfo", "-h", "-o", "%P %a %l %D %T"], timeout=20)
    except Exception as exc:  # noqa: BLE001 - doctor reports, never crashes
        return [Check("slurm", WARN, f"sinfo did not answer: {exc}")]
    if not res.ok:
        return [Check("slurm", WARN, f"no Slurm controller answers: {res.last_line()}",
                      "check that slurmctld runs (`scontrol ping`) or ask your admins")]
    checks = [Check("slurm", OK, "controller answers (sinfo)")]
    try:
        import importlib

        extra = getattr(importlib.import_module("hpcexp.execute.slurm"), "doctor_checks", None)
        if extra is not None:
            for name, status, detail, fix in extra():
                checks.append(Check(name, status, detail, fix))
    except ImportError:
        pass
    if not any(c.name.startswith("accounting") for c in checks):
        acct = process.run(["sacct", "-n", "-X", "-S", "now"], timeout=20) if process.which("sacct") else None
        if acct is None:
            checks.append(Check("accounting", WARN, "sacct not on PATH: final job states come from the job's "
                                                    "own exit markers"))
        elif not acct.ok:
            checks.append(Check("accounting", WARN, f"sacct: {acct.last_line()}; final job states come from "
                                                    "the job's own exit markers"))
        else:
            checks.append(Check("accounting", OK, "sacct works"))
    return checks


def check_arch() -> Check:
    return Check("architecture", OK, f"{platform.machine()} -> Dockerfiles for {host_arch()}")


def check_registry(project: Project) -> Check:
    """The registry of ``registry:`` answers its API, and the credentials found (if any) work."""
    from hpcexp.build import registry
    from hpcexp.errors import HpcexpError

    spec = project.registry
    assert spec is not None
    where = registry.redact(spec.url)
    try:
        ok, detail = registry.Client(spec.host, insecure=spec.insecure).ping()
    except HpcexpError as exc:
        return Check("registry", FAIL, f"{where}: {exc.message}",
                     exc.hint or "check `registry:` in hpcexp.yaml and that the registry runs")
    if not ok:
        return Check("registry", FAIL, f"{where}: {detail}",
                     "log in with `apptainer registry login oras://HOST`, or set APPTAINER_DOCKER_USERNAME "
                     "and APPTAINER_DOCKER_PASSWORD")
    plain = " over plain HTTP (insecure: true)" if spec.insecure else ""
    return Check("registry", OK, f"{where}{plain}: {detail}")


def run_checks(project: Project | None = None,
               extra: Sequence[Callable[[], Check]] = ()) -> list[Check]:
    """Run every check; a check that raises becomes a warning, never a crash."""
    checks: list[Check] = []
    for fn in (check_apptainer, check_not_root, check_userns, check_fakeroot, check_squashfuse, check_arch,
               *extra):
        try:
            checks.append(fn())
        except Exception as exc:  # noqa: BLE001
            checks.append(Check(getattr(fn, "__name__", "check"), WARN, f"check failed: {exc}"))
    if project is not None:
        checks.append(check_space("images", project.images_dir))
        checks.append(check_space("runs", project.runs_dir))
        uses_debootstrap = any(b.kind == "debootstrap" for e in project.experiments.values()
                               for b in e.bases.values())
        if uses_debootstrap and process.which("debootstrap") is None:
            checks.append(Check("debootstrap", FAIL, "hpcexp.yaml maps a base to debootstrap but `debootstrap` "
                                                     "is not on PATH",
                                "install Debian's debootstrap package, or map the base to a local SIF"))
        if project.registry is not None:
            checks.append(check_registry(project))
    tmp = Path(os.environ.get("APPTAINER_TMPDIR") or os.environ.get("TMPDIR") or "/tmp")
    checks.append(check_space("tmp", tmp, fix_key="APPTAINER_TMPDIR"))
    checks.extend(check_slurm())
    return checks
