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
from hpcexp.infra import host as hostinfo
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
        broken = apptainer.problem()
        if broken is not None:
            return Check("apptainer", FAIL, f"apptainer does not work: {broken}",
                         "check the installation or `module load apptainer`", required=True)
        return Check("apptainer", FAIL, "apptainer (or singularity) not found on PATH",
                     "install Apptainer >= 1.1 or `module load apptainer`; see README 'Troubleshooting'",
                     required=True)
    if not inst.supports_unprivileged_build:
        return Check("apptainer", FAIL, f"{inst.label} is too old for rootless builds",
                     "Apptainer >= 1.1 (or SingularityCE >= 3.9) is needed: load a newer module", required=True)
    return Check("apptainer", OK, f"{inst.label} at {inst.path}", required=True)


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


def check_fakeroot() -> Check:
    ranges = hostinfo.subid_ranges()
    user = ranges.user
    if ranges.full:
        # Apptainer maps the range with these setuid helpers (Debian's uidmap package).
        missing = [t for t in ("newuidmap", "newgidmap") if process.find_host_tool(t) is None]
        if missing:
            return Check("fakeroot", WARN, f"subuid/subgid range for {user}, but {' and '.join(missing)} "
                                           "not installed: Apptainer cannot use the range for --fakeroot builds",
                         "ask an admin to install the `uidmap` package (newuidmap, newgidmap)", required=True)
        ids = ranges.uids[1] if ranges.uids else 0
        return Check("fakeroot", OK, f"subuid/subgid range for {user} ({ids} ids): full --fakeroot builds",
                     required=True)
    if process.find_host_tool("fakeroot"):
        need = hostinfo.FULL_SUBID_RANGE
        return Check("fakeroot", WARN, f"no /etc/subuid+subgid range of {need} for {user}: builds use "
                                       "Apptainer's root-mapped namespace with the fakeroot command "
                                       "(some package installs may fail)",
                     f"ask an admin: `usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}`",
                     required=True)
    return Check("fakeroot", FAIL, f"no /etc/subuid+subgid range for {user} and no `fakeroot` command",
                 f"ask an admin to add a subuid/subgid range for {user}, or install the `fakeroot` package",
                 required=True)


def _where(found: str) -> str:
    """``found``, noting when it is not on the user's PATH (hpcexp and Apptainer look there too)."""
    if process.which(os.path.basename(found)) == found:
        return found
    return f"{found} (not on your PATH; hpcexp and Apptainer look there too)"


def check_debootstrap() -> Check:
    """debootstrap, for bases hpcexp builds itself; Debian installs it in /usr/sbin."""
    found = process.find_host_tool("debootstrap")
    if found is None:
        return Check("debootstrap", FAIL, "hpcexp.yaml maps a base to debootstrap but `debootstrap` is not "
                                          f"installed (looked on PATH and in {', '.join(process.HOST_TOOL_DIRS)})",
                     "install Debian's debootstrap package, or map the base to a local SIF")
    return Check("debootstrap", OK, _where(found))


def check_squashfuse() -> Check:
    sq = process.find_host_tool("squashfuse") or process.find_host_tool("squashfuse_ll")
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
    from hpcexp.execute import base

    for name, status, detail, fix in base.require("slurm").doctor_checks():
        checks.append(Check(name, status, detail, fix))
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


def pip_default_index() -> str | None:
    """pip's built-in index URL, from pip itself (hpcexp names no index host)."""
    try:
        from pip._internal.models.index import PyPI  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - no pip, or another layout: nothing to check
        return None
    return str(PyPI.simple_url)


def _probe_url(url: str, cafile: str | None, timeout: float) -> str | None:
    """None when ``url`` answers over HTTP(S) verifying TLS with ``cafile``; else why not."""
    import ssl
    import urllib.error
    import urllib.request

    from hpcexp.build.hostnet import redact

    ctx = ssl.create_default_context(cafile=cafile) if url.startswith("https:") else None
    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "hpcexp-doctor"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx):  # noqa: S310 - http(s) only
            return None
    except urllib.error.HTTPError as exc:
        return None if exc.code < 500 else f"HTTP {exc.code}"   # it answered: reachable
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return redact(str(reason))


def check_package_indexes(project: Project | None = None, timeout: float = 6.0,
                          urls: Sequence[tuple[str, str]] | None = None) -> list[Check]:
    """Whether a build step can reach the package indexes the host reaches, with the CA
    bundle and proxies hpcexp passes into builds (see hpcexp.build.hostnet)."""
    from hpcexp.build import bases, hostnet

    if project is not None and not project.host_network:
        return [Check("build network", WARN, "`build: {host_network: false}`: builds get neither the host's CA "
                                             "bundle nor its proxy variables",
                      "remove that setting if RUN steps download through a TLS-inspecting proxy")]
    found = hostnet.find_ca_bundle()
    ca = str(found[0]) if found else None
    checks = [Check("build CA bundle", OK if found else WARN,
                    f"build steps get the host's CA bundle {found[0]} (from {found[1]})" if found else
                    "no CA bundle found on this host: build steps use the image's own CA certificates",
                    None if found else "set SSL_CERT_FILE to your site's CA bundle")]
    if urls is None:
        pairs: list[tuple[str, str]] = []
        index = hostnet.pip_config("index-url")
        if index and index[0].startswith(("http://", "https://")):
            pairs.append(("pip index", index[0]))
        else:
            default = pip_default_index()
            if default:
                pairs.append(("pip index", default))
        try:
            mirror = (project.debian_mirror if project is not None else None) or bases.machine_mirror()
        except Exception:  # noqa: BLE001
            mirror = None
        if mirror and mirror.startswith(("http://", "https://")):
            pairs.append(("Debian mirror", mirror.rstrip("/") + "/dists/"))
        urls = pairs
    for what, url in urls:
        shown = hostnet.redact(url)
        why = _probe_url(url, ca, timeout)
        if why is None:
            checks.append(Check(f"build network: {what}", OK, f"{shown} reachable"
                                + (" (TLS verified with that bundle)" if url.startswith("https:") else "")))
        elif hostnet.tls_failure(why):
            checks.append(Check(f"build network: {what}", WARN, f"{shown}: TLS verification fails with "
                                f"{ca or 'the default CA store'} ({why})",
                                "set SSL_CERT_FILE to the CA bundle that holds your site's proxy CA"))
        else:
            checks.append(Check(f"build network: {what}", WARN, f"{shown} not reachable ({why}): RUN steps "
                                "that download from it will fail", "map bases and vendor packages, or ask "
                                "your admins for the proxy settings (HTTPS_PROXY)"))
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


def check_tracking(project: Project | None) -> list[Check]:
    """One doctor line per tracking server the project uses."""
    if project is None:
        return []
    from hpcexp.track import export as ex

    targets: dict[str, str] = {}
    for exp in project.experiments.values():
        if exp.tracking is not None:
            targets.setdefault(exp.tracking.uri, ex.target_experiment(exp.tracking, exp.name))
    if project.tracking is not None:
        targets.setdefault(project.tracking.uri, project.tracking.experiment or "Default")
    checks = []
    for uri, name in targets.items():
        try:
            detail = ex.probe(uri, name)
            status, fix = OK, None
        except Exception as exc:  # noqa: BLE001
            detail, status = getattr(exc, "message", str(exc)), FAIL
            fix = getattr(exc, "hint", None) or "check tracking.mlflow.uri"
        checks.append(Check("tracking", status, detail, fix))
    if targets:
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            from hpcexp.track.mlflow import INSTALL_HINT

            checks.append(Check("tracking client", WARN, "the MLflow client is not installed: runs are kept "
                                                         "for export but nothing is sent", INSTALL_HINT))
        else:
            checks.append(Check("tracking client", OK, "MLflow client installed"))
    return checks


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
        if uses_debootstrap:
            checks.append(check_debootstrap())
    try:
        checks.extend(check_package_indexes(project))
    except Exception as exc:  # noqa: BLE001 - doctor reports, never crashes
        checks.append(Check("build network", WARN, f"check failed: {exc}"))
    if project is not None and project.registry is not None:
        checks.append(check_registry(project))
    tmp = Path(os.environ.get("APPTAINER_TMPDIR") or os.environ.get("TMPDIR") or "/tmp")
    checks.append(check_space("tmp", tmp, fix_key="APPTAINER_TMPDIR"))
    checks.extend(check_slurm())
    checks.extend(check_tracking(project))
    return checks
