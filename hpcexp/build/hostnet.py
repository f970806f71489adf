"""The host's network settings in image builds: its CA bundle and proxy variables.

Many sites reach package indexes through a TLS-inspecting proxy whose CA only the hosts
trust. A ``RUN pip install`` inside a build then fails with CERTIFICATE_VERIFY_FAILED
although ``pip`` works on the host. So, unless turned off (``hpcexp build
--no-host-network`` or ``build: {host_network: false}`` in hpcexp.yaml), every build step
(``%post``) gets

* a copy of the host's CA bundle, found the way pip, requests and curl find it
  (:func:`find_ca_bundle`), in a folder bound read-only at :data:`BIND_DEST` for the
  build only; the variables pip, requests, curl, git, node and conda read point at it,
  and ``APT_CONFIG`` gives apt the same CA for an https mirror. They travel as
  ``APPTAINERENV_*`` variables of the build process: nothing is written into the recipe,
  and nothing of it stays in the image but the empty mount point;
* the proxy variables (``HTTP_PROXY``, ``HTTPS_PROXY``, ``NO_PROXY``, ``ALL_PROXY`` in
  either case), which Apptainer itself hands to ``%post`` from the build's environment
  and does not keep in the image. With the switch off they are removed from that
  environment.

A proxy URL may carry a password (``http://user:secret@proxy:3128``): :func:`redact`
removes it from every line hpcexp writes (the build log, the tail it prints, records).
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping
from urllib.parse import unquote

BIND_DEST = "/.hpcexp-host"
CA_NAME = "ca-certificates.crt"
# Where the distributions keep the system bundle (Debian/Ubuntu, RHEL/Rocky/Alma, SUSE, Alpine).
SYSTEM_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt",
                  "/etc/ssl/ca-bundle.pem", "/etc/ssl/cert.pem")
# Host variables naming a CA bundle, in the order pip/requests/curl give them precedence.
HOST_CA_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE")
# What a build step gets, each pointing at the bound copy.
BUILD_CA_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO",
                 "NODE_EXTRA_CA_CERTS", "CONDA_SSL_VERIFY")
PROXY_NAMES = ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "ftp_proxy")
PROXY_VARS = tuple(n for p in PROXY_NAMES for n in (p, p.upper()))

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/\s:@]*):([^/\s@]+)@")
TLS_FAILURE = re.compile(r"certificate[_ ]verify[_ ]failed|ssl certificate problem|self[- ]signed certificate"
                         r"|unable to get local issuer certificate|server certificate verification failed"
                         r"|sslcertverificationerror|unable_to_get_issuer_cert|x509: certificate",
                         re.IGNORECASE)


def pip_config_files(environ: Mapping[str, str]) -> list[Path]:
    """pip's configuration files, lowest precedence first (site, user, PIP_CONFIG_FILE)."""
    home = Path(environ.get("HOME") or os.path.expanduser("~"))
    xdg_dirs = (environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(":")
    files = [Path("/etc/pip.conf")] + [Path(d) / "pip" / "pip.conf" for d in reversed(xdg_dirs) if d]
    files += [home / ".pip" / "pip.conf", Path(environ.get("XDG_CONFIG_HOME") or home / ".config") / "pip" / "pip.conf"]
    if environ.get("PIP_CONFIG_FILE") and environ["PIP_CONFIG_FILE"] != os.devnull:
        files.append(Path(environ["PIP_CONFIG_FILE"]))
    return files


def pip_config(key: str, environ: Mapping[str, str] | None = None,
               files: list[Path] | None = None) -> tuple[str, str] | None:
    """(value, where) of a pip setting: ``PIP_KEY`` in the environment, else the last config
    file that sets it in [global] or [install]."""
    environ = os.environ if environ is None else environ
    var = "PIP_" + key.upper().replace("-", "_")
    if environ.get(var):
        return environ[var], var
    found: tuple[str, str] | None = None
    for f in files if files is not None else pip_config_files(environ):
        parser = configparser.ConfigParser(interpolation=None)
        try:
            parser.read(f, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        for section in ("global", "install"):
            if parser.has_option(section, key):
                found = parser.get(section, key).strip(), str(f)
    return found


def find_ca_bundle(environ: Mapping[str, str] | None = None,
                   pip_files: list[Path] | None = None) -> tuple[Path, str] | None:
    """(bundle, where it was found) as pip, requests and curl would: SSL_CERT_FILE,
    REQUESTS_CA_BUNDLE, PIP_CERT, CURL_CA_BUNDLE, pip's ``cert`` setting, then the
    distribution's bundle. Only readable files count."""
    environ = os.environ if environ is None else environ
    candidates: list[tuple[str, str]] = [(environ[v], v) for v in HOST_CA_VARS if environ.get(v)]
    cert = pip_config("cert", {k: v for k, v in environ.items() if k != "PIP_CERT"}, pip_files)
    if cert:
        candidates.append((cert[0], f"pip config {cert[1]}"))
    candidates += [(p, "system bundle") for p in SYSTEM_BUNDLES]
    for path, where in candidates:
        p = Path(os.path.expanduser(path))
        if p.is_file() and os.access(p, os.R_OK):
            return p, where
    return None


def proxy_secrets(environ: Mapping[str, str]) -> list[str]:
    """Passwords (raw and percent-decoded) in the proxy variables of ``environ``."""
    out: set[str] = set()
    for name in PROXY_VARS:
        for m in _USERINFO.finditer(environ.get(name, "")):
            for s in (m.group(3), unquote(m.group(3))):
                if len(s) >= 3:
                    out.add(s)
    return sorted(out, key=len, reverse=True)


def redact(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """``text`` with the password of every ``scheme://user:password@`` and each of
    ``secrets`` replaced by ``***``."""
    text = _USERINFO.sub(lambda m: f"{m.group(1)}{m.group(2)}:***@", text)
    for s in secrets:
        text = text.replace(s, "***")
    return text


@dataclass
class BuildNetwork:
    """What one build gets of the host's network settings."""

    enabled: bool
    ca_bundle: Path | None = None        # the host's bundle (the source of the bound copy)
    ca_source: str | None = None         # where it was found
    folder: Path | None = None           # the host folder bound at BIND_DEST
    env: dict[str, str] = field(default_factory=dict)   # APPTAINERENV_* to add
    proxy_vars: tuple[str, ...] = ()     # names of the proxy variables the build sees
    secrets: list[str] = field(default_factory=list)

    def apply(self, env: dict[str, str]) -> dict[str, str]:
        """The build process's environment: proxies kept or removed, CA variables added."""
        out = dict(env)
        if not self.enabled:
            for name in PROXY_VARS:
                out.pop(name, None)
        out.update(self.env)
        return out

    def bind_argv(self) -> list[str]:
        if self.folder is None:
            return []
        from hpcexp.runtime.apptainer import Mount
        return Mount(str(self.folder), BIND_DEST, readonly=True).argv()

    def describe(self) -> dict[str, object]:
        """For the image's sidecar: names and paths, never a proxy's value."""
        return {"enabled": self.enabled, "ca_bundle": str(self.ca_bundle) if self.ca_bundle else None,
                "ca_source": self.ca_source, "proxy_variables": list(self.proxy_vars)}


def prepare(folder: Path, enabled: bool, environ: Mapping[str, str] | None = None,
            prefix: str = "APPTAINERENV_") -> BuildNetwork:
    """Set up ``folder`` (a private scratch folder of the build) to be bound into it."""
    environ = os.environ if environ is None else environ
    secrets = proxy_secrets(environ)
    if not enabled:
        return BuildNetwork(enabled=False, secrets=secrets)
    net = BuildNetwork(enabled=True, secrets=secrets,
                       proxy_vars=tuple(n for n in PROXY_VARS if environ.get(n)))
    found = find_ca_bundle(environ)
    if found is None:
        return net
    net.ca_bundle, net.ca_source = found
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(found[0], folder / CA_NAME)
    os.chmod(folder / CA_NAME, 0o644)
    ca = f"{BIND_DEST}/{CA_NAME}"
    (folder / "apt.conf").write_text(f'Acquire::https::CAInfo "{ca}";\n', encoding="utf-8")
    os.chmod(folder, 0o755)
    net.folder = folder
    net.env = {prefix + v: ca for v in BUILD_CA_VARS}
    net.env[prefix + "APT_CONFIG"] = f"{BIND_DEST}/apt.conf"
    index = pip_config("index-url", environ)
    if index and re.match(r"^https?://", index[0]):
        net.env[prefix + "PIP_INDEX_URL"] = index[0]  # a site's PyPI mirror, as on the host
    return net


SETUP_LINE = f'    mkdir -p "${{APPTAINER_ROOTFS:-$SINGULARITY_ROOTFS}}{BIND_DEST}"'


def inject_mount_point(recipe: str) -> str:
    """The recipe with a ``%setup`` step in every stage creating the mount point of
    :data:`BIND_DEST` (Apptainer binds only onto paths that exist in the container)."""
    prelude: list[str] = []
    stages: list[list[str]] = []
    for line in recipe.splitlines():
        if re.match(r"^\s*Bootstrap\s*:", line, re.IGNORECASE):
            stages.append([])
        (stages[-1] if stages else prelude).append(line)
    out: list[str] = list(prelude)
    for stage in stages:
        setup = next((i for i, ln in enumerate(stage) if re.match(r"^%setup\b", ln.strip())), None)
        if setup is not None:
            stage = stage[:setup + 1] + [SETUP_LINE] + stage[setup + 1:]
        else:
            stage = [*stage, "", "%setup", SETUP_LINE, ""]
        out.extend(stage)
    return "\n".join(out) + "\n"


def tls_failure(text: str) -> bool:
    """Whether a build log shows a TLS certificate verification failure."""
    return bool(TLS_FAILURE.search(text))


def failure_hint(net: BuildNetwork | None) -> str:
    """One line naming the cause of a TLS failure in a build and the switch."""
    if net is None or not net.enabled:
        return ("a build step could not verify a TLS certificate: this network inspects TLS and the host's CA "
                "bundle was not passed in (host network settings are off: drop --no-host-network / "
                "`build: {host_network: false}`)")
    if net.ca_bundle is None:
        return ("a build step could not verify a TLS certificate and no CA bundle was found on this host to pass "
                "in: set SSL_CERT_FILE to your site's CA bundle")
    return (f"a build step could not verify a TLS certificate although the host's CA bundle {net.ca_bundle} "
            f"({net.ca_source}) was passed in: set SSL_CERT_FILE to the bundle that holds your site's CA")
