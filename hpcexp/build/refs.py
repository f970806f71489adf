"""Registry references: parsing ``oras://HOST/REPO:TAG@sha256:...``, the names hpcexp pushes
under, and redaction of user information in URLs. Pure: no network, no files."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from hpcexp.core.config import Experiment, Project, RegistrySpec
from hpcexp.errors import UsageError

# --------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------

REPO_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Ref:
    """``scheme://host/repo[:tag][@digest]`` (scheme: oras or docker)."""

    scheme: str
    host: str
    repo: str
    tag: str | None = None
    digest: str | None = None

    def uri(self) -> str:
        text = f"{self.scheme}://{self.host}/{self.repo}"
        if self.digest:
            return f"{text}@{self.digest}"
        return f"{text}:{self.tag}" if self.tag else text

    def by_digest(self, digest: str) -> "Ref":
        return replace(self, tag=None, digest=digest)

    @property
    def reference(self) -> str:
        """What goes after /manifests/ in the registry API."""
        return self.digest or self.tag or "latest"

    @property
    def bare_host(self) -> str:
        return self.host.split("]")[0] + "]" if self.host.startswith("[") else self.host.rsplit(":", 1)[0]


def parse_ref(text: str, *, what: str = "image reference") -> Ref:
    """Parse an ``oras://`` or ``docker://`` reference that names a registry host."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in ("oras", "docker"):
        raise UsageError(f"invalid {what} {redact(text)!r}: expected oras://HOST/REPO:TAG or ...@sha256:DIGEST")
    digest = None
    if "@" in rest:
        rest, _, digest = rest.rpartition("@")
        if not DIGEST_RE.match(digest):
            raise UsageError(f"invalid {what} {redact(text)!r}: the digest must be sha256: and 64 hex digits")
    host, slash, path = rest.partition("/")
    if not slash or not path or "@" in host:
        raise UsageError(f"invalid {what} {redact(text)!r}: expected HOST/REPO (and no user information)")
    tag = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, _, tag = path.rpartition(":")
        if not TAG_RE.match(tag):
            raise UsageError(f"invalid {what} {redact(text)!r}: bad tag {tag!r}")
    if not all(REPO_COMPONENT.match(c) for c in path.split("/")):
        raise UsageError(f"invalid {what} {redact(text)!r}: repository names are lower-case letters, digits "
                         "and . _ - separators")
    return Ref(scheme=scheme, host=host, repo=path, tag=tag, digest=digest)


def names_registry_host(text: str) -> bool:
    """Whether a docker:// or oras:// reference starts with a registry host (has a '.' or ':' or is
    localhost) rather than a Docker Hub short name, which hpcexp leaves to Apptainer."""
    rest = text.partition("://")[2]
    first = rest.split("/", 1)[0]
    return "/" in rest and ("." in first or ":" in first or first == "localhost")


def redact(text: str) -> str:
    """``text`` with any ``user:password@`` in a URL replaced by ``***@``."""
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", str(text))


def repo_name(experiment: str) -> str:
    """An OCI repository component for an experiment name (lower case, valid separators)."""
    name = re.sub(r"[^a-z0-9]+", "-", experiment.lower()).strip("-")
    return name or "image"


def image_tag(arch: str, input_hash: str) -> str:
    """The human-readable tag a push adds (the lock pins the digest, never this)."""
    return f"{arch}-{input_hash[:16]}"


def target_ref(project: Project, exp: Experiment, arch: str, input_hash: str,
               to: str | None = None) -> tuple[Ref, bool]:
    """Where ``hpcexp push`` sends an image, and whether plain HTTP is allowed for it."""
    spec = project.registry
    if to is not None:
        spec = _spec_from_cli(to, project.registry)
    if spec is None:
        raise UsageError("no registry to push to: set `registry: oras://HOST/NAMESPACE` in hpcexp.yaml or pass "
                         "--to oras://HOST/NAMESPACE")
    return Ref("oras", spec.host, f"{spec.namespace}/{repo_name(exp.name)}", tag=image_tag(arch, input_hash)), \
        spec.insecure


def _spec_from_cli(to: str, configured: RegistrySpec | None) -> RegistrySpec:
    from hpcexp.core.config import REGISTRY_URL_RE

    m = REGISTRY_URL_RE.match(to)
    if not m or "@" in to.partition("://")[2].split("/")[0]:
        raise UsageError(f"--to {redact(to)!r}: expected oras://HOST[:PORT]/NAMESPACE (lower case, no credentials)")
    host = m.group("host")
    insecure = bool(configured and configured.insecure and configured.host == host)
    return RegistrySpec(url=to.rstrip("/"), host=host, namespace=m.group("ns"), insecure=insecure)


def insecure_for(project: Project, host: str) -> bool:
    spec = project.registry
    return bool(spec is not None and spec.insecure and spec.host == host)
